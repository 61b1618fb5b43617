"""Bad input (issue 3 item 5, issue 4): the right exception, a message naming the argument and the
offending dtype/shape, PyTorch's exact text where PyTorch has one — and nothing modified by a call
that raises (input, weight, bias, running stats), nor by one that succeeds."""
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import fastnorm
from cases import (BN_ONE_VALUE, CHANNEL_OPS, GN_DIVISIBLE, IN_ONE_ELEMENT, OPS, ROW_OPS, RUNNING_OPS,
                   arrange, make_call)

def exactly(text):
    return "^" + re.escape(text) + "$"


class FakeDeviceArray:
    """Quacks like a CUDA device array (``__cuda_array_interface__``) of a host array's shape and dtype."""

    def __init__(self, like):
        self.shape, self.dtype, self.strides = like.shape, like.dtype, like.strides
        self.ndim, self.size, self.itemsize = like.ndim, like.size, like.itemsize

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False), "version": 3,
                "strides": None}


@dataclass
class Bad:
    id: str
    op: str
    change: Callable          # (kwargs, rng) -> None, edits the valid call's kwargs
    exc: type
    match: str
    mode: str = "train"
    shape: tuple = (4, 3, 5)
    layout: str = "first"
    backward: bool = False    # the error is raised by op_backward(grad_output, ctx)


def _valid(op, rng, mode="train", shape=(4, 3, 5), layout="first", dtype=np.float64):
    x, axis = arrange(rng.standard_normal(shape).astype(dtype), layout)
    if OPS[op].kind == "row":
        return make_call(op, x, rng=rng).kwargs
    return make_call(op, x, axis=axis, mode=mode, rng=rng).kwargs


def _set(**values):
    def change(kw, rng):
        kw.update(values)
    return change


def _input_dtype(dtype):
    def change(kw, rng):
        x = kw["input"]
        kw["input"] = np.ones(x.shape, dtype=dtype) if dtype is not object else np.full(x.shape, 1.0, dtype=object)
    return change


def _param(name, fn):
    def change(kw, rng):
        kw[name] = fn(kw[name], kw)
    return change


def _bad_cases():
    cases = []
    for op in OPS:
        running = op in RUNNING_OPS
        for dt, name in ((np.int64, "int64"), (np.int32, "int32"), (np.complex128, "complex128"),
                         (object, "object"), (np.bool_, "bool")):
            cases.append(Bad(f"{op}-input-{name}", op, _input_dtype(dt), TypeError, rf"dtype {name}\b"))
        cases.append(Bad(f"{op}-input-list", op, _set(input=[[1.0, 2.0], [3.0, 4.0]]), TypeError, "input"))
        params = ("weight", "bias") if OPS[op].has_bias else ("weight",)
        for p in params:
            cases.append(Bad(f"{op}-{p}-too-long", op, _param(p, lambda a, kw: np.ones(a.size + 1)), ValueError,
                             rf"{p}.*\({{n}},?\)".replace("{n}", "6" if OPS[op].kind == "row" else "4")))
            cases.append(Bad(f"{op}-{p}-2d", op, _param(p, lambda a, kw: np.ones((1,) + a.shape)), ValueError,
                             rf"{p}.*\(1, {'5' if OPS[op].kind == 'row' else '3'}\)"))
            cases.append(Bad(f"{op}-{p}-int", op, _param(p, lambda a, kw: np.ones(a.shape, np.int64)), TypeError,
                             rf"{p}.*int64"))
            cases.append(Bad(f"{op}-{p}-complex", op, _param(p, lambda a, kw: a.astype(np.complex64)), TypeError,
                             rf"{p}.*complex64"))
            cases.append(Bad(f"{op}-{p}-list", op, _param(p, lambda a, kw: a.tolist()), TypeError, p))
        cases.append(Bad(f"{op}-eps-negative", op, _set(eps=-1e-5), ValueError, "eps"))
        cases.append(Bad(f"{op}-eps-nan", op, _set(eps=float("nan")), ValueError, "eps"))
        # out
        cases.append(Bad(f"{op}-out-shape", op, lambda kw, rng: kw.update(out=np.empty((4, 3, 6))), ValueError,
                         r"\(4, 3, 6\)"))
        cases.append(Bad(f"{op}-out-dtype", op, lambda kw, rng: kw.update(out=np.empty((4, 3, 5), np.float32)),
                         ValueError, "float32"))
        cases.append(Bad(f"{op}-out-is-input", op, lambda kw, rng: kw.update(out=kw["input"]), ValueError, "alias"))
        cases.append(Bad(f"{op}-out-views-input", op, lambda kw, rng: kw.update(out=kw["input"][...]), ValueError,
                         "alias"))
        cases.append(Bad(f"{op}-out-float16-for-float16", op,
                         lambda kw, rng: kw.update(input=kw["input"].astype(np.float16),
                                                   out=np.empty((4, 3, 5), np.float32)), ValueError, "float16"))

        def readonly_out(kw, rng):
            out = np.empty_like(kw["input"])
            out.setflags(write=False)
            kw["out"] = out
        cases.append(Bad(f"{op}-out-readonly", op, readonly_out, ValueError, "read-only"))
        # host/device mix: which argument is where
        cases.append(Bad(f"{op}-weight-on-device", op, _param("weight", lambda a, kw: FakeDeviceArray(a)),
                         TypeError, r"(?is)(?=.*weight[^.;]*(GPU|device|cuda))(?=.*input[^.;]*host)"))
        cases.append(Bad(f"{op}-input-on-device", op, _param("input", lambda a, kw: FakeDeviceArray(a)),
                         TypeError, r"(?is)(?=.*input[^.;]*(GPU|device|cuda))(?=.*weight[^.;]*host)"))
        cases.append(Bad(f"{op}-out-on-device", op, lambda kw, rng: kw.update(out=FakeDeviceArray(kw["input"])),
                         TypeError, r"(?is)(?=.*out[^.;]*(GPU|device|cuda))(?=.*input[^.;]*host)"))
        # backward
        cases.append(Bad(f"{op}-grad-shape", op, None, ValueError, r"\(4, 3, 6\)", backward=True))
        cases.append(Bad(f"{op}-grad-int", op, None, TypeError, "int64", backward=True))
        cases.append(Bad(f"{op}-grad-on-device", op, None, TypeError, r"(?i)grad_output[^.;]*(GPU|device|cuda)",
                         backward=True))
        cases.append(Bad(f"{op}-ctx-not-a-context", op, None, TypeError, "ctx", backward=True))

        if OPS[op].kind == "channel":
            for axis in (3, -4, 0, -3):
                cases.append(Bad(f"{op}-axis{axis}", op, _set(axis=axis), ValueError, rf"axis={axis}\b"))
            cases.append(Bad(f"{op}-axis-float", op, _set(axis=1.0), TypeError, "axis"))
            lowest = OPS[op].min_ndim
            small = (4, 3) if lowest == 3 else (3,)
            cases.append(Bad(f"{op}-ndim-{len(small)}", op,
                             lambda kw, rng, small=small: kw.update(input=np.ones(small)), ValueError,
                             re.escape(str(small))))
        if running:
            C = 3
            for name in ("running_mean", "running_var"):
                cases.append(Bad(f"{op}-{name}-shape", op, _param(name, lambda a, kw: np.ones(C + 1)), ValueError,
                                 rf"{name}.*\(4,\)"))
                cases.append(Bad(f"{op}-{name}-2d", op, _param(name, lambda a, kw: np.ones((2, C))), ValueError,
                                 rf"{name}.*\(2, 3\)"))
                cases.append(Bad(f"{op}-{name}-int", op, _param(name, lambda a, kw: np.ones(C, np.int64)), TypeError,
                                 rf"{name}.*int64"))

                def readonly(kw, rng, name=name):
                    kw[name].setflags(write=False)
                cases.append(Bad(f"{op}-{name}-readonly-training", op, readonly, ValueError,
                                 rf"{name}.*read-only"))
                cases.append(Bad(f"{op}-{name}-on-device", op, _param(name, lambda a, kw: FakeDeviceArray(a)),
                                 TypeError, rf"(?is)(?=.*{name}[^.;]*(GPU|device|cuda))(?=.*input[^.;]*host)"))
            cases.append(Bad(f"{op}-running-var-missing", op, _set(running_var=None), ValueError, "running_var"))
            cases.append(Bad(f"{op}-momentum-none-no-count", op, _set(momentum=None), ValueError,
                             "num_batches_tracked"))
            cases.append(Bad(f"{op}-momentum-none-count-0", op, _set(momentum=None, num_batches_tracked=0),
                             ValueError, "num_batches_tracked"))
            cases.append(Bad(f"{op}-momentum-1.5", op, _set(momentum=1.5), ValueError, "momentum"))
            cases.append(Bad(f"{op}-momentum-str", op, _set(momentum="0.1"), TypeError, "momentum"))

    for op in ("batch_norm", "batch_renorm"):
        for shape, layout in (((1, 3), "first"), ((1, 3, 1, 1), "first"), ((1, 3, 1, 1), "last")):
            stored = shape if layout == "first" else (1, 1, 1, 3)
            cases.append(Bad(f"{op}-one-value-{'x'.join(map(str, shape))}-{layout}", op, lambda kw, rng: None,
                             ValueError, exactly(BN_ONE_VALUE.format(stored)), shape=shape, layout=layout))
        cases.append(Bad(f"{op}-eps-0-training", op, _set(eps=0.0), ValueError, "eps"))
    cases.append(Bad("batch_norm-one-value-no-running-stats", "batch_norm", _set(running_mean=None, running_var=None),
                     ValueError, exactly(BN_ONE_VALUE.format((1, 3))), shape=(1, 3)))
    cases.append(Bad("batch_renorm-training-without-running-stats", "batch_renorm",
                     _set(running_mean=None, running_var=None), ValueError, "running"))
    cases.append(Bad("batch_renorm-rmax-below-1", "batch_renorm", _set(rmax=0.5), ValueError, "rmax"))
    cases.append(Bad("batch_renorm-dmax-negative", "batch_renorm", _set(dmax=-1.0), ValueError, "dmax"))
    for shape, layout, stored in (((2, 3, 1), "first", (2, 3, 1)), ((2, 3, 1, 1), "last", (2, 1, 1, 3))):
        cases.append(Bad(f"instance_norm-one-spatial-element-{layout}", "instance_norm", lambda kw, rng: None,
                         ValueError, exactly(IN_ONE_ELEMENT.format(stored)), shape=shape, layout=layout))
    cases.append(Bad("instance_norm-no-input-stats-no-running", "instance_norm",
                     _set(use_input_stats=False, running_mean=None, running_var=None), ValueError, "running"))
    cases.append(Bad("group_norm-not-divisible", "group_norm", _set(num_groups=2), ValueError,
                     exactly(GN_DIVISIBLE.format([2, 5, 4], 2)), shape=(2, 5, 4)))
    cases.append(Bad("group_norm-not-divisible-channels-last", "group_norm", _set(num_groups=2), ValueError,
                     r"divisible by num_groups.*num_groups=2", shape=(2, 5, 4), layout="last"))
    for g in (0, -3, 1.5, True):
        cases.append(Bad(f"group_norm-num_groups-{g}", "group_norm", _set(num_groups=g), (ValueError, TypeError),
                         "num_groups"))
    for op in ROW_OPS:
        cases.append(Bad(f"{op}-normalized-shape-mismatch", op, _set(normalized_shape=(4,)), ValueError,
                         r"\[4, 3, 5\]"))
        cases.append(Bad(f"{op}-normalized-shape-longer-than-input", op, _set(normalized_shape=(2, 4, 3, 5)),
                         ValueError, r"\[4, 3, 5\]"))
        cases.append(Bad(f"{op}-normalized-shape-empty", op, _set(normalized_shape=()), TypeError,
                         "normalized_shape"))
    return cases


BAD = _bad_cases()


def _snapshot(kw):
    return {k: v.copy() for k, v in kw.items() if isinstance(v, np.ndarray) and k != "out"}


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_bad_input_raises_and_changes_nothing(bad, rng):
    kw = _valid(bad.op, rng, shape=bad.shape, layout=bad.layout)
    if bad.backward:
        y, ctx = getattr(fastnorm, bad.op + "_forward")(**kw)
        dy = {"grad-shape": np.ones((4, 3, 6)), "grad-int": np.ones(y.shape, np.int64),
              "grad-on-device": FakeDeviceArray(y), "ctx-not-a-context": np.ones(y.shape)}[bad.id.split("-", 1)[1]]
        args = (dy, ctx) if "ctx" not in bad.id else (dy, {"x": kw["input"]})
        before = _snapshot(kw)
        with pytest.raises(bad.exc, match=bad.match):
            getattr(fastnorm, bad.op + "_backward")(*args)
    else:
        bad.change(kw, rng)
        before = _snapshot(kw)
        with pytest.raises(bad.exc, match=bad.match):
            getattr(fastnorm, bad.op)(**kw)
    # running stats untouched and inputs unmodified by a call that raised
    for k, v in before.items():
        np.testing.assert_array_equal(kw[k], v, err_msg=f"{k} changed although the call raised")


# ---------------------------------------------------------------- legal edge cases do not raise

@pytest.mark.parametrize("op", ["batch_norm", "batch_renorm"])
def test_eps_zero_and_batch_of_one_are_fine_in_eval(op, rng):
    x = rng.standard_normal((1, 3))
    rm, rv = np.zeros(3), np.ones(3)
    y = getattr(fastnorm, op)(x, rm, rv, training=False, eps=0.0)
    np.testing.assert_allclose(y, x)     # (x − 0)/sqrt(1 + 0)


@pytest.mark.parametrize("op", RUNNING_OPS)
def test_readonly_running_stats_are_fine_in_eval(op, rng):
    kw = _valid(op, rng, mode="eval")
    for k in ("running_mean", "running_var"):
        kw[k].setflags(write=False)
    before = _snapshot(kw)
    getattr(fastnorm, op)(**kw)
    for k, v in before.items():
        np.testing.assert_array_equal(kw[k], v)


def _modes(op):
    return [pytest.param(op, m, id=f"{op}-{m}") for m in OPS[op].modes]


@pytest.mark.parametrize("op, mode", [p for op in OPS for p in _modes(op)])
@pytest.mark.parametrize("layout", ["first", "last", "last_view", "strided"])
def test_successful_calls_never_modify_inputs(op, mode, layout, rng):
    """Read-only x, weight, bias and grad_output are accepted, and nothing but running stats and out changes."""
    if OPS[op].kind == "row" and layout != "first":
        layout = "strided"
    kw = _valid(op, rng, mode=mode, layout=layout)
    before = {k: v.copy() for k, v in kw.items() if isinstance(v, np.ndarray) and not k.startswith("running")}
    for k in before:
        kw[k].setflags(write=False)
    out = np.empty_like(kw["input"])
    y, ctx = getattr(fastnorm, op + "_forward")(**kw, out=out)
    dy = rng.standard_normal(y.shape)
    dy.setflags(write=False)
    dy_before = dy.copy()
    getattr(fastnorm, op + "_backward")(dy, ctx)
    getattr(fastnorm, op + "_backward")(dy, ctx)           # backward twice from one context
    for k, v in before.items():
        np.testing.assert_array_equal(kw[k], v, err_msg=f"{k} was modified")
    np.testing.assert_array_equal(dy, dy_before)


@pytest.mark.parametrize("op", CHANNEL_OPS)
def test_input_with_overlapping_weight_is_not_an_out_alias(op, rng):
    """Only aliasing *input* is rejected: an out that is a fresh array works even if weight is a view of x."""
    x = rng.standard_normal((4, 3, 5))
    kw = _valid(op, rng)
    kw["input"] = x
    kw["weight"] = x[0, :, 0]          # a view into the input: legal, and the input is not modified
    x_before = x.copy()
    getattr(fastnorm, op)(**kw, out=np.empty_like(x))
    np.testing.assert_array_equal(x, x_before)


class _DeviceView:
    """A device array as ``check_out`` sees it: shape, dtype and a ``__cuda_array_interface__`` whose
    pointer and strides are a host array's (so NumPy can say what they overlap)."""

    def __init__(self, host):
        self.shape, self.dtype = host.shape, host.dtype
        face = host.__array_interface__
        self.__cuda_array_interface__ = {"shape": face["shape"], "typestr": face["typestr"],
                                         "data": face["data"], "strides": face["strides"], "version": 3}


def test_device_out_aliasing_input_is_rejected_like_numpy():
    """``out`` overlapping the input on the device is the ValueError the host raises; the byte ranges
    come from ``__cuda_array_interface__`` (None strides: C order; negative strides; empty arrays) and
    agree with NumPy's ``byte_bounds``/``may_share_memory`` on the same layouts."""
    from fastnorm import _plan
    byte_bounds = getattr(np.lib, "array_utils", np).byte_bounds        # np.byte_bounds before NumPy 2
    base = np.zeros((8, 8), np.float32)
    # C-contiguous ones have strides None in the interface, as a device array may
    for a in (base, base[:1], base[3:5], base[::-1], base[:, ::-2], base.T, base[2:2], base[1:4, 3],
              base[::2][::-1]):
        assert _plan._byte_bounds(_DeviceView(a)) == tuple(byte_bounds(a)), a.strides
    x = base[2:5]
    for out, alias in ((base[2:5], True), (base[4:7], True), (base[0:3], True), (base[5:8], False),
                       (base[5:8][::-1], False), (base[::-1][3:6], True), (np.zeros_like(x), False)):
        assert np.may_share_memory(out, x) == alias
        if alias:
            with pytest.raises(ValueError, match=r"out must not alias input \(shape \(3, 8\)\)"):
                _plan.check_out(_DeviceView(out), _DeviceView(x), x.dtype)
        else:
            dout = _DeviceView(out)
            assert _plan.check_out(dout, _DeviceView(x), x.dtype) is dout
