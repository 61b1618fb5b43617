"""The rest of the API on device arrays: out=, float16, mixed parameter dtypes, running stats in place
(strided buffers, momentum=None), eval leaves them alone, empty batches, moments(), inputs untouched."""
import numpy as np
import pytest

import fastnorm
from fastnorm import _cuda
from cases import assert_close, tol_for
from devcases import dev, host, is_device, to_device


def _xw(rng, shape=(3, 4, 9), dtype=np.float32):
    return (rng.standard_normal(shape).astype(dtype) + 2.0, rng.normal(1, 0.3, shape[1]).astype(dtype),
            rng.normal(0, 1, shape[1]).astype(dtype))


@pytest.mark.parametrize("layout", ["first", "last", "last_view"])
def test_out(layout, rng):
    x, w, b = _xw(rng)
    xd, axis = to_device(x, layout)
    out, _ = to_device(np.zeros_like(x), layout)       # laid out like the input: written in place
    y = fastnorm.group_norm(xd, 2, dev(w), dev(b), axis=axis, out=out)
    assert y is out
    ref = fastnorm.group_norm(x, 2, w, b)
    assert_close(np.moveaxis(host(out), axis, 1), ref)
    out_first = dev(np.zeros_like(host(xd)))            # another layout than the input: a copy-back
    fastnorm.group_norm(xd, 2, dev(w), dev(b), axis=axis, out=out_first)
    assert_close(host(out_first), host(y))


def test_float16(rng):
    x, w, b = _xw(rng, dtype=np.float16)
    w, b = w.astype(np.float32), b.astype(np.float32)
    y, ctx = fastnorm.layer_norm_forward(dev(x), (9,))
    assert y.dtype == np.float16 and is_device(y)
    y_c, ctx_c = fastnorm.layer_norm_forward(x, (9,))
    assert_close(host(y), y_c)
    dy = rng.standard_normal(x.shape).astype(np.float16)
    dx, _, _ = fastnorm.layer_norm_backward(dev(dy), ctx)
    assert dx.dtype == np.float16
    assert_close(host(dx), fastnorm.layer_norm_backward(dy, ctx_c)[0])
    y = fastnorm.batch_norm(dev(x), None, None, dev(w), dev(b), training=True)
    assert_close(host(y), fastnorm.batch_norm(x, None, None, w, b, training=True))


def test_float64_params_with_float32_input(rng):
    x, w, b = _xw(rng)
    w64, b64 = w.astype(np.float64), b.astype(np.float64)
    y, ctx = fastnorm.instance_norm_forward(dev(x), None, None, dev(w64), dev(b64))
    y_c, ctx_c = fastnorm.instance_norm_forward(x, None, None, w64, b64)
    assert y.dtype == np.float32
    assert_close(host(y), y_c)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, dw, db = fastnorm.instance_norm_backward(dev(dy), ctx)
    _, dw_c, db_c = fastnorm.instance_norm_backward(dy, ctx_c)
    assert dw.dtype == np.float64 and db.dtype == np.float64
    assert_close(host(dw), dw_c)
    assert_close(host(db), db_c)


def test_running_stats_in_place(rng):
    """Updated in place on the device — also through strided buffers, and with momentum=None."""
    x, w, b = _xw(rng)
    rm, rv = rng.normal(0, 1, 4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)
    base = dev(np.stack([rm, rv], axis=1))             # (4, 2): rm, rv as strided device columns
    drm, drv = base[:, 0], base[:, 1]
    rm_c, rv_c = rm.copy(), rv.copy()
    for momentum, nbt in ((0.1, None), (None, 3)):
        fastnorm.batch_norm(dev(x), drm, drv, dev(w), dev(b), training=True, momentum=momentum,
                            num_batches_tracked=nbt)
        fastnorm.batch_norm(x, rm_c, rv_c, w, b, training=True, momentum=momentum, num_batches_tracked=nbt)
        assert_close(host(base)[:, 0], rm_c)
        assert_close(host(base)[:, 1], rv_c)
    before = host(base)
    y = fastnorm.batch_norm(dev(x), drm, drv, dev(w), dev(b), training=False)
    np.testing.assert_array_equal(host(base), before)
    assert_close(host(y), fastnorm.batch_norm(x, rm_c, rv_c, w, b, training=False))


def test_instance_norm_running_stats(rng):
    x, w, b = _xw(rng)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    drm, drv = dev(rm), dev(rv)
    fastnorm.instance_norm(dev(x), drm, drv, dev(w), dev(b))
    fastnorm.instance_norm(x, rm, rv, w, b)
    assert_close(host(drm), rm)
    assert_close(host(drv), rv)


def test_empty_batch(rng):
    x = np.zeros((0, 3, 5), np.float32)
    w = np.ones(3, np.float32)
    y, ctx = fastnorm.batch_norm_forward(dev(x), None, None, dev(w), dev(w), training=True)
    assert is_device(y) and tuple(y.shape) == x.shape
    dx, dw, db = fastnorm.batch_norm_backward(dev(x), ctx)
    _, dw_c, db_c = fastnorm.batch_norm_backward(x, fastnorm.batch_norm_forward(x, None, None, w, w, training=True)[1])
    assert is_device(dx) and tuple(dx.shape) == x.shape
    for d, c in ((dw, dw_c), (db, db_c)):
        assert is_device(d) and d.dtype == c.dtype
        np.testing.assert_array_equal(host(d), c)


def test_moments(rng):
    x, _, _ = _xw(rng, (5, 3, 7))
    for layout in ("first", "last"):
        xd, axis = to_device(x, layout)
        m = fastnorm.moments(xd, axis=axis)
        m_c = fastnorm.moments(x)
        assert m.count == m_c.count
        assert_close(m.mean, m_c.mean)
        assert_close(m.m2, m_c.m2, tol=tol_for(np.float32))


def test_inputs_are_not_modified(rng):
    x, w, b = _xw(rng)
    xd, wd, bd = dev(x), dev(w), dev(b)
    y, ctx = fastnorm.group_norm_forward(xd, 2, wd, bd)
    dy = dev(rng.standard_normal(x.shape).astype(np.float32))
    dy_before = host(dy)
    fastnorm.group_norm_backward(dy, ctx)
    for d, h in ((xd, x), (wd, w), (bd, b), (dy, dy_before)):
        np.testing.assert_array_equal(host(d), h)


def test_copy_kernel_layouts(rng):
    """The fallback copy: 6-D with a permutation and a stride, float32 → float16."""
    a = rng.standard_normal((2, 3, 1, 4, 5, 6)).astype(np.float32)
    src = _cuda._transpose(dev(a), (5, 0, 3, 1, 4, 2))[::2]
    dst = _cuda.empty(src.shape, np.float16)
    _cuda.copy(src, dst)
    np.testing.assert_array_equal(host(dst), a.transpose(5, 0, 3, 1, 4, 2)[::2].astype(np.float16))


@pytest.mark.parametrize("op, layout", [("batch_norm", "first"), ("batch_norm", "last"), ("layer_norm", "first")])
def test_offset_1e6_float32(op, layout, rng):
    """semantics.md: float32 input at an offset of 1e6 gives y within 1e-5 of the float64 reference."""
    from cases import OFFSET, OFFSET_TOL
    from fastnorm import reference
    v = (OFFSET + rng.standard_normal((4, 3, 130))).astype(np.float32)
    xd, axis = to_device(v, layout)
    x = host(xd)
    C = 130 if op == "layer_norm" else 3
    w, b = rng.normal(1, 0.3, C).astype(np.float32), rng.normal(0, 1, C).astype(np.float32)
    if op == "layer_norm":
        y, y_ref = fastnorm.layer_norm(xd, (C,), dev(w), dev(b)), reference.layer_norm(x, (C,), w, b)
    else:
        y = fastnorm.batch_norm(xd, None, None, dev(w), dev(b), training=True, axis=axis)
        y_ref = reference.batch_norm(x, None, None, w, b, training=True, axis=axis)
    assert_close(host(y), y_ref.astype(np.float64), tol=OFFSET_TOL)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # the simulator computes inf − inf in NumPy
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_nonfinite_poisons_only_its_group(layout, bad, rng):
    v = rng.standard_normal((3, 4, 50)).astype(np.float32)
    v[1, 2, 7] = bad                                   # channel 2
    xd, axis = to_device(v, layout)
    y = np.moveaxis(host(fastnorm.batch_norm(xd, None, None, training=True, axis=axis)), axis, 1)
    assert np.isnan(y[:, 2]).all()
    assert np.isfinite(np.delete(y, 2, axis=1)).all()
