"""Central-difference gradient checks, float64, of every op's (dx, dweight, dbias), training and eval.

The loss is L = Σ y·r for a fixed random r, so the analytic gradients are ``op_backward(r, ctx)``.
Each finite-difference evaluation starts from fresh copies of the running stats (``Call.forward``).
Batch renorm treats r and d as constants: where they are clipped they *are* locally constant and the
plain finite difference applies; where they are not, dx is checked against the finite difference of
the forward with r and d frozen (batch norm with weight·r and bias + weight·d).
"""
import numpy as np
import pytest

import fastnorm
from fastnorm import reference
from cases import FD_TOL, OPS, assert_close, arrange, make_call, numeric_grad


def check_gradients(call, rng, wrt=("input", "weight", "bias"), frozen=None):
    """Analytic backward of ``call`` vs central differences of its forward.

    ``frozen``: optional Call whose forward is differentiated instead for the input gradient.
    """
    y, ctx, _ = call.forward(fastnorm)
    r = rng.standard_normal(y.shape)
    analytic = dict(zip(("input", "weight", "bias"), call.backward(fastnorm, r, ctx)))
    for name in wrt:
        target = frozen if (frozen is not None and name == "input") else call
        a = target.kwargs.get(name)
        if a is None:
            assert analytic[name] is None
            continue
        numeric = numeric_grad(lambda: float(np.sum(target.forward(fastnorm)[0] * r)), a)
        assert_close(analytic[name], numeric, tol=FD_TOL, what=f"d{name}")


TINY = {2: (5, 4), 3: (3, 4, 5), 4: (2, 4, 2, 3)}


def _channel_cases():
    for op in ("batch_norm", "batch_renorm", "instance_norm", "group_norm"):
        for mode in OPS[op].modes:
            for ndim in (2, 3, 4):
                if ndim < OPS[op].min_ndim:
                    continue
                for layout in ("first", "last"):
                    yield pytest.param(op, mode, ndim, layout, id=f"{op}-{mode}-{ndim}d-{layout}")


@pytest.mark.parametrize("op, mode, ndim, layout", list(_channel_cases()))
def test_channel_ops(op, mode, ndim, layout, rng):
    v = rng.standard_normal(TINY[ndim]) * 1.5 + 0.3
    x, axis = arrange(v, layout)
    call = make_call(op, x, axis=axis, mode=mode, rng=rng, groups=2 if op == "group_norm" else None)
    if op == "batch_renorm" and mode in ("train", "train_clip"):
        # r and d (not all clipped): dx is the gradient with r, d held constant (stop-gradient)
        _, ctx_ref = reference.batch_renorm_forward(**call.fresh())
        r, d = (np.broadcast_to(np.asarray(ctx_ref[k], float).reshape(-1), (x.shape[axis],)) for k in "rd")
        if mode == "train":
            assert not np.all((r == 3.0) | (r == 1 / 3.0)), "every r is clipped: meant to test unclipped r"
        w, b = call.kwargs["weight"], call.kwargs["bias"]
        frozen = make_call("batch_norm", x, axis=axis, mode="train_nostats", rng=rng)
        frozen.kwargs.update(weight=w * r, bias=b + w * d)
        check_gradients(call, rng, frozen=frozen)
    else:
        check_gradients(call, rng)


@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("clip", ["high", "low"])
def test_batch_renorm_clipped(clip, layout, rng):
    """r and d clipped in every channel: locally constant, so the plain finite difference applies."""
    v = rng.standard_normal((3, 4, 5))
    x, axis = arrange(v, layout)
    if clip == "high":   # σ = 0.01: σ_B/σ ≈ 100 → r = rmax; |μ_B − μ|/σ ≈ 1000 → d = ±dmax
        running_mean, running_var = np.array([10.0, -10.0, 10.0, -10.0]), np.full(4, 1e-4)
    else:                # σ = 100: σ_B/σ ≈ 0.01 → r = 1/rmax; μ = ±1000 → |d| = 10 → d = ±dmax
        running_mean, running_var = np.array([1e3, -1e3, 1e3, -1e3]), np.full(4, 1e4)
    call = make_call("batch_renorm", x, axis=axis, mode="train", rng=rng, running_mean=running_mean,
                     running_var=running_var, rmax=2.0, dmax=0.5)
    _, ctx_ref = reference.batch_renorm_forward(**call.fresh())
    r, d = np.ravel(ctx_ref["r"]), np.ravel(ctx_ref["d"])
    assert np.all(r == (2.0 if clip == "high" else 0.5)) and np.all(np.abs(d) == 0.5)
    check_gradients(call, rng)


def test_batch_renorm_identity_gradients(rng):
    """rmax=1, dmax=0: r = 1, d = 0 exactly, so batch renorm's gradient is batch norm's, by finite differences."""
    x = rng.standard_normal((3, 4, 5))
    check_gradients(make_call("batch_renorm", x, mode="train", rng=rng, rmax=1.0, dmax=0.0), rng)


@pytest.mark.parametrize("affine", ["both", "none"])
@pytest.mark.parametrize("nshape", [1, 2])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_row_ops(op, nshape, affine, rng):
    x = rng.standard_normal((3, 4, 5)) * 1.5 + 0.3
    call = make_call(op, x, rng=rng, nshape=nshape, weight=affine == "both", bias=affine == "both")
    check_gradients(call, rng)


@pytest.mark.parametrize("op", ["instance_norm", "group_norm", "layer_norm"])
def test_without_affine(op, rng):
    x = rng.standard_normal((2, 4, 6))
    call = make_call(op, x, rng=rng, weight=False, bias=False, **({"groups": 2} if op == "group_norm" else {}))
    check_gradients(call, rng)


def test_strided_input_gradients(rng):
    """A non-contiguous input is copied once; the gradient still refers to the caller's layout."""
    v = rng.standard_normal((3, 4, 5))
    x, axis = arrange(v, "strided")
    check_gradients(make_call("batch_norm", x, axis=axis, mode="train", rng=rng), rng)
