"""Every op against the float64 oracle ``fastnorm.reference``: forward, running-stat update, backward.

The main grid is ``cases.GRID``: ranks 2–5, sizes 1/3/17/129, every layout (axis=1, axis=-1, a
channels-last array seen through a transposed view with axis=1, channels in the middle, strided and
negative-stride inputs, Fortran order for row ops), float16/float32/float64, training and eval.
"""
import numpy as np
import pytest

import fastnorm
from fastnorm import _cpu, reference
from cases import (CASE_IDS, CHANNEL_OPS, GRID, OPS, ROW_OPS, RUNNING_OPS, Call, arrange, assert_close,
                   case_call, check_against_reference, make_call)


@pytest.mark.parametrize("case", GRID, ids=CASE_IDS)
def test_grid(case, rng):
    check_against_reference(case_call(case, rng), rng)


# ---------------------------------------------------------------- weight / bias None, parameter dtypes

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("op, affine", [(op, a) for op in OPS for a in ("weight_only", "bias_only", "none")
                                        if OPS[op].has_bias or a != "bias_only"])
def test_weight_bias_none(op, affine, layout, dtype, rng):
    v = rng.standard_normal((3, 5, 7)).astype(dtype)
    x, axis = arrange(v, layout)
    w, b = affine == "weight_only", affine == "bias_only"
    for mode in OPS[op].modes:
        if OPS[op].kind == "row":
            call = make_call(op, x, rng=rng, weight=w, bias=b)
        else:
            call = make_call(op, x, axis=axis, mode=mode, rng=rng, weight=w, bias=b)
        check_against_reference(call, rng)


@pytest.mark.parametrize("op", [op for op in OPS if OPS[op].has_bias])
def test_bias_none_means_zero(op, rng):
    """api.md: weight/bias None mean 1 and 0 — for fastnorm and for the oracle the tests trust."""
    x = rng.standard_normal((3, 5, 7))
    call = make_call(op, x, rng=rng, bias=False)
    zeros = np.zeros_like(call.kwargs["weight"])
    for module in (fastnorm, reference):
        y_none = call.forward(module)[0]
        y_zero = call.forward(module, bias=zeros)[0]
        assert_close(y_none, y_zero, what=f"{module.__name__}.{op}: bias=None vs bias=0")
    ones = np.ones_like(call.kwargs["weight"])
    for module in (fastnorm, reference):
        assert_close(call.forward(module, weight=None)[0], call.forward(module, weight=ones)[0],
                     what=f"{module.__name__}.{op}: weight=None vs weight=1")


@pytest.mark.parametrize("pdtype", [np.float32, np.float64])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("op", list(OPS))
def test_param_dtypes(op, dtype, pdtype, rng):
    """weight/bias/running stats may be float32 or float64 whatever the input dtype; d(weight) keeps its dtype."""
    v = rng.standard_normal((4, 6, 9)).astype(dtype)
    for layout in ("first", "last"):
        x, axis = arrange(v, layout)
        for mode in OPS[op].modes:
            if OPS[op].kind == "row":
                call = make_call(op, x, rng=rng, param_dtype=pdtype, nshape=2)
            else:
                call = make_call(op, x, axis=axis, mode=mode, rng=rng, param_dtype=pdtype,
                                 groups=3 if op == "group_norm" else None)
            check_against_reference(call, rng)


# ---------------------------------------------------------------- out=

def _other_layout(x, axis, kind):
    """An empty array of x's shape and dtype, laid out differently from x."""
    if kind == "strided":
        return np.empty(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)[..., ::2]
    if kind == "fortran":
        return np.asfortranarray(np.empty(x.shape, x.dtype))
    # "transposed": channels-last memory if x is channels-first, and vice versa
    axis = axis % x.ndim
    if axis == 1:
        return np.moveaxis(np.empty(np.moveaxis(x, 1, -1).shape, x.dtype), -1, 1)
    return np.moveaxis(np.empty(np.moveaxis(x, axis, 1).shape, x.dtype), 1, axis)


@pytest.mark.parametrize("out_layout", ["same", "transposed", "strided", "fortran"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", ["first", "last", "last_view"])
@pytest.mark.parametrize("op", list(OPS))
def test_out(op, layout, dtype, out_layout, rng):
    v = rng.standard_normal((3, 6, 4, 5)).astype(dtype)
    x, axis = arrange(v, layout)
    for mode in OPS[op].modes:
        if OPS[op].kind == "row":
            call = make_call(op, x, rng=rng, nshape=2)
        else:
            call = make_call(op, x, axis=axis, mode=mode, rng=rng, groups=3 if op == "group_norm" else None)
        out = np.empty_like(x) if out_layout == "same" else _other_layout(x, axis, out_layout)
        out[...] = np.nan
        y, _, _ = call.forward(fastnorm, out=out)
        assert y is out
        y_ref = call.forward(reference)[0]
        assert_close(out, y_ref, what=f"out ({out_layout}) in {mode}")
        # the same call without out gives the same values
        np.testing.assert_array_equal(call.forward(fastnorm)[0], out)


@pytest.mark.parametrize("n", [(_cpu.SERIAL_BELOW - 1) // 1000, _cpu.SERIAL_BELOW // 1000 + 1])   # serial, parallel
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_not_aligned_to_its_item_size(dtype, n, rng):
    """np.frombuffer at an odd byte offset: an out no element of which is aligned to its item size (Numba
    types it apart, as an unaligned array) is written with the values of an aligned one."""
    x = rng.standard_normal((n, 1000)).astype(dtype)
    out = np.frombuffer(bytearray(x.nbytes + 1), dtype, offset=1).reshape(x.shape)
    assert not out.flags.aligned and out.flags.writeable
    assert fastnorm.layer_norm(x, (1000,), out=out) is out
    np.testing.assert_array_equal(out, fastnorm.layer_norm(x, (1000,)))


# ---------------------------------------------------------------- running statistics

@pytest.mark.parametrize("layout", ["first", "last", "last_view"])
@pytest.mark.parametrize("op", RUNNING_OPS)
def test_running_stats_updated_in_place(op, layout, rng):
    """The caller's buffers (here strided views into larger arrays) are updated in place, nothing else."""
    v = rng.standard_normal((5, 4, 6)) * 2.0 + 1.0
    x, axis = arrange(v, layout)
    C = 4
    base_mean, base_var = rng.standard_normal(2 * C), rng.uniform(0.5, 2.0, 2 * C)
    mean_before, var_before = base_mean.copy(), base_var.copy()
    running_mean, running_var = base_mean[::2], base_var[::2]
    kw = dict(running_mean=running_mean, running_var=running_var, weight=None, bias=None, axis=axis)
    kw.update(dict(use_input_stats=True) if op == "instance_norm" else dict(training=True))
    exp_mean, exp_var = mean_before[::2].copy(), var_before[::2].copy()
    getattr(reference, op)(x, **dict(kw, running_mean=exp_mean, running_var=exp_var))
    getattr(fastnorm, op)(x, **kw)
    assert_close(running_mean, exp_mean, what="running_mean")
    assert_close(running_var, exp_var, what="running_var")
    assert not np.allclose(running_mean, mean_before[::2])          # it did move
    np.testing.assert_array_equal(base_mean[1::2], mean_before[1::2])
    np.testing.assert_array_equal(base_var[1::2], var_before[1::2])


@pytest.mark.parametrize("nbt_type", [int, np.int64, "0-d array"])
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("op", RUNNING_OPS)
def test_cumulative_momentum(op, layout, nbt_type, rng):
    """momentum=None: m = 1/num_batches_tracked; vs the reference at every step."""
    C = 3
    running = [rng.standard_normal(C), rng.uniform(0.5, 2.0, C)]
    running_ref = [a.copy() for a in running]
    w, b = rng.normal(1.0, 0.5, C), rng.standard_normal(C)
    mode_kw = dict(use_input_stats=True) if op == "instance_norm" else dict(training=True)
    for step in range(1, 4):
        v = rng.standard_normal((4, C, 5)) * step + step
        x, axis = arrange(v, layout)
        nbt = np.array(step) if nbt_type == "0-d array" else nbt_type(step)
        kw = dict(momentum=None, num_batches_tracked=nbt, axis=axis, weight=w, bias=b, **mode_kw)
        y = getattr(fastnorm, op)(x, *running, **kw)
        y_ref = getattr(reference, op)(x, *running_ref, **kw)
        assert_close(y, y_ref, what=f"y, step {step}")
        assert_close(running[0], running_ref[0], what=f"running_mean, step {step}")
        assert_close(running[1], running_ref[1], what=f"running_var, step {step}")


@pytest.mark.parametrize("op", ["batch_norm", "batch_renorm"])
def test_cumulative_momentum_is_the_average(op, rng):
    """After k steps with momentum=None the running stats are the plain average of the k batches'
    mean and unbiased variance, whatever they started at (the first step has m = 1)."""
    C = 4
    running_mean, running_var = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    means, variances = [], []
    for step in range(1, 5):
        x = rng.standard_normal((6, C, 3)) * rng.uniform(0.5, 3.0) + rng.uniform(-2, 2)
        getattr(fastnorm, op)(x, running_mean, running_var, training=True, momentum=None,
                              num_batches_tracked=step)
        means.append(x.mean(axis=(0, 2)))
        variances.append(x.var(axis=(0, 2), ddof=1))
    assert_close(running_mean, np.mean(means, axis=0), tol=None)
    assert_close(running_var, np.mean(variances, axis=0), tol=None)


@pytest.mark.parametrize("momentum", [0.0, 1.0, 0.3])
@pytest.mark.parametrize("op", RUNNING_OPS)
def test_momentum_values(op, momentum, rng):
    x = rng.standard_normal((4, 3, 5)) + 2.0
    call = make_call(op, x, rng=rng, momentum=momentum)
    _, kw = check_against_reference(call, rng)
    if momentum == 0.0:
        np.testing.assert_array_equal(kw["running_mean"], call.kwargs["running_mean"])
        np.testing.assert_array_equal(kw["running_var"], call.kwargs["running_var"])


@pytest.mark.parametrize("op", ["batch_norm", "batch_renorm", "instance_norm"])
def test_eval_leaves_running_stats_alone(op, rng):
    x = rng.standard_normal((4, 3, 5))
    call = make_call(op, x, mode="eval", rng=rng)
    _, kw = check_against_reference(call, rng)
    np.testing.assert_array_equal(kw["running_mean"], call.kwargs["running_mean"])
    np.testing.assert_array_equal(kw["running_var"], call.kwargs["running_var"])


def test_instance_norm_running_stats_eval_with_one_spatial_element(rng):
    """use_input_stats=False normalizes with the running stats, so one spatial element is fine."""
    x = rng.standard_normal((3, 4, 1))
    check_against_reference(make_call("instance_norm", x, mode="eval", rng=rng), rng)


def test_batch_norm_eval_with_batch_of_one(rng):
    x = rng.standard_normal((1, 5))
    check_against_reference(make_call("batch_norm", x, mode="eval", rng=rng), rng)


# ---------------------------------------------------------------- eps

@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.5])
@pytest.mark.parametrize("op", ["instance_norm", "group_norm", "layer_norm", "rms_norm"])
def test_eps(op, eps, rng):
    """eps = 0 is allowed outside batch-norm training; larger eps changes the result as the oracle does."""
    x = rng.standard_normal((3, 6, 7))
    call = make_call(op, x, rng=rng, eps=eps, **({"groups": 2} if op == "group_norm" else {}))
    check_against_reference(call, rng)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_rms_norm_default_eps_is_machine_epsilon(dtype, rng):
    x = (rng.standard_normal((4, 8)) * 1e-3).astype(dtype)   # small values: eps matters
    y = fastnorm.rms_norm(x, (8,))
    assert_close(y, fastnorm.rms_norm(x, (8,), eps=float(np.finfo(dtype).eps)))
    assert_close(y, reference.rms_norm(x, (8,)))


@pytest.mark.parametrize("op", CHANNEL_OPS)
def test_positional_signature_follows_torch(op, rng):
    """The positional arguments are torch.nn.functional's, in order."""
    x = rng.standard_normal((4, 3, 5))
    w, b = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    if op in ("batch_norm", "batch_renorm"):
        pos = getattr(fastnorm, op)(x, rm.copy(), rv.copy(), w, b, True, 0.2, 1e-3)
        kw = dict(running_mean=rm.copy(), running_var=rv.copy(), weight=w, bias=b, training=True, momentum=0.2,
                  eps=1e-3)
    elif op == "instance_norm":
        pos = fastnorm.instance_norm(x, rm.copy(), rv.copy(), w, b, True, 0.2, 1e-3)
        kw = dict(running_mean=rm.copy(), running_var=rv.copy(), weight=w, bias=b, use_input_stats=True,
                  momentum=0.2, eps=1e-3)
    else:
        pos = fastnorm.group_norm(x, 3, w, b, 1e-3)
        kw = dict(num_groups=3, weight=w, bias=b, eps=1e-3)
    assert_close(pos, Call(op, input=x, **kw).forward(reference)[0])


def test_row_ops_positional_signature(rng):
    x = rng.standard_normal((4, 3, 5))
    w, b = rng.standard_normal(5), rng.standard_normal(5)
    assert_close(fastnorm.layer_norm(x, (5,), w, b, 1e-3), reference.layer_norm(x, (5,), w, b, 1e-3))
    assert_close(fastnorm.layer_norm(x, 5, w, b, 1e-3), reference.layer_norm(x, (5,), w, b, 1e-3))
    assert_close(fastnorm.rms_norm(x, [5], w, 1e-3), reference.rms_norm(x, (5,), w, 1e-3))


@pytest.mark.parametrize("op", ROW_OPS)
def test_row_ops_normalize_whole_sample(op, rng):
    """normalized_shape may cover every dim but the first (and even the first)."""
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    check_against_reference(make_call(op, x, rng=rng, nshape=3), rng)


# ---------------------------------------------------------------- inputs big enough for the parallel kernels

def _large_cases():
    for op, spec in OPS.items():
        for mode in spec.modes:
            layouts = ("first", "last", "last_view") if spec.kind == "channel" else ("first", "fortran")
            shapes = [(3, 6, 50, 50)] + ([(8000, 6)] if op in ("batch_norm", "batch_renorm", "group_norm") else [])
            for shape in shapes:
                for layout in layouts:
                    for dtype in (np.float32, np.float64):
                        name = f"{op}-{mode}-{'x'.join(map(str, shape))}-{layout}-{np.dtype(dtype).name}"
                        yield pytest.param(op, mode, shape, layout, dtype, id=name)


@pytest.mark.parametrize("op, mode, shape, layout, dtype", list(_large_cases()))
def test_large_inputs(op, mode, shape, layout, dtype, rng):
    """The grid above is small, so it runs the serial builds; these sizes run the parallel kernels."""
    from fastnorm import _cpu
    v = rng.standard_normal(shape).astype(dtype)
    x, axis = arrange(v, layout)
    assert x.size >= getattr(_cpu, "SERIAL_BELOW", 0)
    if OPS[op].kind == "row":
        call = make_call(op, x, rng=rng, nshape=2)
    else:
        call = make_call(op, x, axis=axis, mode=mode, rng=rng, groups=3 if op == "group_norm" else None)
    check_against_reference(call, rng)
