"""Every op on device arrays against the CPU backend and the float64 reference: forward, the running-stat
update in place on the device, backward — every layout, float32 and float64, training and eval."""
import numpy as np
import pytest

import fastnorm
from fastnorm import reference
from cases import OPS, assert_close, arrange, group_choices, make_call, valid
from devcases import dev, host, is_device, to_device

# Tiny, but with CHUNK = 100 (devcases): lanes of 130 split into 2 partials, channels-last batch norm
# into 8 row chunks, (25, 7) layer-norm backward into 2 row chunks; odd sizes so no tile is full.
CHANNEL_SHAPES = ((2, 3, 130), (2, 6, 5, 7), (40, 3))
ROW_SHAPES = (((3, 130), 1), ((25, 7), 1), ((2, 3, 5, 6), 2))
CHANNEL_LAYOUTS = ("first", "last", "last_view", "middle", "strided")
ROW_LAYOUTS = ("first", "fortran", "strided")


def _cases():
    """float32 in every layout; float64 (the same kernels at another dtype) in the two native layouts."""
    out = []
    for op, spec in OPS.items():
        if spec.kind == "row":
            for shape, nshape in ROW_SHAPES:
                for layout in ROW_LAYOUTS:
                    out.append((op, shape, layout, "train", dict(nshape=nshape)))
                out.append((op, shape, "first", "train", dict(nshape=nshape, dtype="float64")))
            continue
        for shape in CHANNEL_SHAPES:
            if len(shape) < spec.min_ndim:
                continue
            for layout in CHANNEL_LAYOUTS:
                if (layout == "middle" and len(shape) < 4) or (len(shape) == 2 and layout not in ("first", "last")):
                    continue                # a 2-D array has no spatial axes to lay out otherwise
                for mode in spec.modes:
                    if not valid(op, shape, mode):
                        continue
                    groups = group_choices(shape[1]) if op == "group_norm" else (None,)
                    for g in groups:
                        extra = dict(groups=g) if g else {}
                        out.append((op, shape, layout, mode, extra))
                        if layout in ("first", "last"):
                            out.append((op, shape, layout, mode, dict(extra, dtype="float64")))
    return out


CASES = _cases()


def _id(c):
    op, shape, layout, mode, extra = c
    return f"{op}-{'x'.join(map(str, shape))}-{layout}-{mode}" + "".join(f"-{k}{v}" for k, v in extra.items())


def check_device(call, xd, rng):
    """fastnorm on device arrays vs fastnorm on the host arrays (CPU) vs the reference."""
    op = call.op
    y_c, ctx_c, kw_c = call.forward(fastnorm)
    y_r, ctx_r, kw_r = call.forward(reference)
    dkw = {k: (dev(v) if isinstance(v, np.ndarray) else v) for k, v in call.fresh().items()}
    dkw["input"] = xd
    y_d, ctx_d = getattr(fastnorm, op + "_forward")(**dkw)
    assert is_device(y_d) and tuple(y_d.shape) == y_c.shape and y_d.dtype == y_c.dtype
    y_d = host(y_d)
    assert_close(y_d, y_c, what="y vs CPU")
    assert_close(y_d, y_r, what="y vs reference")
    for k in ("running_mean", "running_var"):
        if dkw.get(k) is not None:
            r = host(dkw[k])
            assert r.dtype == kw_c[k].dtype
            assert_close(r, kw_c[k], what=f"{k} vs CPU")
            assert_close(r, kw_r[k], what=f"{k} vs reference")

    dy = rng.standard_normal(y_c.shape).astype(y_c.dtype)
    g_d = getattr(fastnorm, op + "_backward")(dev(dy), ctx_d)
    g_c = getattr(fastnorm, op + "_backward")(dy, ctx_c)
    g_r = getattr(reference, op + "_backward")(dy, ctx_r)
    for name, d, c, r in zip(("dx", "dweight", "dbias"), g_d, g_c, g_r):
        if c is None:
            assert d is None, name
            continue
        assert is_device(d) and tuple(d.shape) == c.shape and d.dtype == c.dtype, name
        d = host(d)
        assert_close(d, c, what=f"{name} vs CPU")
        assert_close(d, r, what=f"{name} vs reference")
    return y_d


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_op(case, rng):
    op, shape, layout, mode, extra = case
    extra = dict(extra)
    dtype = np.dtype(extra.pop("dtype", "float32"))
    v = rng.standard_normal(shape).astype(dtype) + 3.0
    x, axis = arrange(v, layout)
    xd, axis_d = to_device(v, layout)
    assert axis == axis_d
    if OPS[op].kind == "row":
        call = make_call(op, x, rng=rng, **extra)
    else:
        call = make_call(op, x, axis=axis, mode=mode, rng=rng, **extra)
    check_device(call, xd, rng)
