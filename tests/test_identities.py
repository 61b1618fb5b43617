"""Identities between the ops (style.md), and the mergeable moments.

    GN(G=C) ≡ IN;   IN ≡ BN on the (1, N·C, …) reshape;   GN(G=1) ≡ LN over (C, …);
    BRN(rmax=1, dmax=0) ≡ BN (forward, backward, running stats);   merge(moments(a), moments(b)) ≡ moments(a ∪ b).

Each side is fastnorm; agreement is to the table's rounding tolerance for the output dtype.
"""
import numpy as np
import pytest

import fastnorm
from fastnorm import _plan, reference
from cases import (MERGE_OFFSET, MERGE_OFFSET_TOL, MERGE_TOL, ROUNDING, TOL, arrange, assert_bitwise, assert_close)

DTYPES = [np.float16, np.float32, np.float64]


def _fwd_bwd(op, x, dy, *args, **kwargs):
    y, ctx = getattr(fastnorm, op + "_forward")(x, *args, **kwargs)
    return (y,) + tuple(getattr(fastnorm, op + "_backward")(dy, ctx))


def _pdt(dtype):
    return np.float32 if dtype == np.float16 else dtype


# ---------------------------------------------------------------- GN(G=C) ≡ IN

@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 17, 3), (4, 1, 9)])
@pytest.mark.parametrize("layout", ["first", "last", "last_view"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_with_one_channel_per_group_is_instance_norm(shape, layout, dtype, rng):
    x, axis = arrange(rng.standard_normal(shape).astype(dtype), layout)
    C = shape[1]
    w, b = rng.standard_normal(C).astype(_pdt(dtype)), rng.standard_normal(C).astype(_pdt(dtype))
    dy = rng.standard_normal(x.shape).astype(dtype)
    gn = _fwd_bwd("group_norm", x, dy, C, w, b, axis=axis)
    inn = _fwd_bwd("instance_norm", x, dy, None, None, w, b, axis=axis)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), gn, inn):
        assert_close(a, e, what=name)


# ---------------------------------------------------------------- IN ≡ BN on (1, N·C, …)

@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 7, 3), (5, 2, 2)])
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_instance_norm_is_batch_norm_on_merged_batch(shape, layout, mode, dtype, rng):
    """Instance norm of (N, C, …) is batch norm of (1, N·C, …) with weight/bias/running stats tiled N
    times; instance norm's running-stat update is the batch average of batch norm's per-(n, c) ones."""
    v = rng.standard_normal(shape).astype(dtype)
    x, axis = arrange(v, layout)
    N, C = shape[:2]
    xb = v.reshape((1, N * C) + shape[2:])                       # channels-first values, merged
    pdt = _pdt(dtype)
    w, b = rng.standard_normal(C).astype(pdt), rng.standard_normal(C).astype(pdt)
    running_mean, running_var = rng.standard_normal(C).astype(pdt), rng.uniform(0.5, 2, C).astype(pdt)
    rm_in, rv_in = running_mean.copy(), running_var.copy()
    rm_bn, rv_bn = np.tile(running_mean, N), np.tile(running_var, N)
    dy_v = rng.standard_normal(shape).astype(dtype)
    dy, _ = arrange(dy_v, layout)
    train = mode == "train"

    inn = _fwd_bwd("instance_norm", x, dy, rm_in, rv_in, w, b, train, 0.3, axis=axis)
    bn = _fwd_bwd("batch_norm", xb, dy_v.reshape(xb.shape), rm_bn, rv_bn, np.tile(w, N), np.tile(b, N),
                  train, 0.3)
    assert_close(np.moveaxis(inn[0], axis, 1).reshape(xb.shape), bn[0], what="y")
    assert_close(np.moveaxis(inn[1], axis, 1).reshape(xb.shape), bn[1], what="dx")
    assert_close(inn[2], bn[2].astype(np.float64).reshape(N, C).sum(axis=0), tol=TOL[np.dtype(pdt)],
                 what="dweight")
    assert_close(inn[3], bn[3].astype(np.float64).reshape(N, C).sum(axis=0), tol=TOL[np.dtype(pdt)],
                 what="dbias")
    assert_close(rm_in, rm_bn.astype(np.float64).reshape(N, C).mean(axis=0), tol=TOL[np.dtype(pdt)],
                 what="running_mean")
    assert_close(rv_in, rv_bn.astype(np.float64).reshape(N, C).mean(axis=0), tol=TOL[np.dtype(pdt)],
                 what="running_var")
    if train:
        assert not np.allclose(rm_in, running_mean)


# ---------------------------------------------------------------- GN(G=1) ≡ LN over (C, …)

@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 7, 3), (5, 17), (2, 3, 1, 3, 2)])
@pytest.mark.parametrize("layout", ["first", "last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_with_one_group_is_layer_norm(shape, layout, dtype, rng):
    x, axis = arrange(rng.standard_normal(shape).astype(dtype), layout)
    dy = rng.standard_normal(x.shape).astype(dtype)
    gn = _fwd_bwd("group_norm", x, dy, 1, axis=axis)
    ln = _fwd_bwd("layer_norm", x, dy, x.shape[1:])
    assert_close(gn[0], ln[0], what="y")
    assert_close(gn[1], ln[1], what="dx")
    assert gn[2] is gn[3] is ln[2] is ln[3] is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_group_norm_with_one_group_is_layer_norm_with_expanded_affine(dtype, rng):
    """With affine: LN's per-element weight is GN's per-channel weight broadcast over the spatial dims."""
    x = rng.standard_normal((3, 4, 5, 2)).astype(dtype)
    w, b = rng.standard_normal(4).astype(dtype), rng.standard_normal(4).astype(dtype)
    wl = np.ascontiguousarray(np.broadcast_to(w[:, None, None], (4, 5, 2)))
    bl = np.ascontiguousarray(np.broadcast_to(b[:, None, None], (4, 5, 2)))
    dy = rng.standard_normal(x.shape).astype(dtype)
    gn = _fwd_bwd("group_norm", x, dy, 1, w, b)
    ln = _fwd_bwd("layer_norm", x, dy, (4, 5, 2), wl, bl)
    assert_close(gn[0], ln[0], what="y")
    assert_close(gn[1], ln[1], what="dx")
    assert_close(gn[2], ln[2].astype(np.float64).sum(axis=(1, 2)), what="dweight")
    assert_close(gn[3], ln[3].astype(np.float64).sum(axis=(1, 2)), what="dbias")


# ---------------------------------------------------------------- BRN(rmax=1, dmax=0) ≡ BN

@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 7), (9, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("layout", ["first", "last", "last_view"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_renorm_without_correction_is_batch_norm(dtype, layout, shape, training, affine, rng):
    """r = clip(·, 1, 1) = 1 and d = clip(·, 0, 0) = 0: forward, backward and running stats are batch norm's
    (semantics.md: "bitwise or within float rounding"; the tolerance is the rounding one)."""
    x, axis = arrange(rng.standard_normal(shape).astype(dtype) * 2 + 1, layout)
    C, pdt = x.shape[axis], _pdt(dtype)
    w = rng.standard_normal(C).astype(pdt) if affine else None
    b = rng.standard_normal(C).astype(pdt) if affine else None
    running = (rng.standard_normal(C).astype(pdt), rng.uniform(0.5, 2, C).astype(pdt))
    rs_bn, rs_brn = [a.copy() for a in running], [a.copy() for a in running]
    dy = rng.standard_normal(x.shape).astype(dtype)
    bn = _fwd_bwd("batch_norm", x, dy, *rs_bn, w, b, training, 0.2, 1e-3, axis=axis)
    brn = _fwd_bwd("batch_renorm", x, dy, *rs_brn, w, b, training, 0.2, 1e-3, rmax=1.0, dmax=0.0, axis=axis)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), brn, bn):
        if e is None:
            assert a is None, name
        else:
            assert_close(a, e, what=name)
    for a, e, name in zip(rs_brn, rs_bn, ("running_mean", "running_var")):
        assert_close(a, e, what=name)
    if training:
        assert not np.array_equal(rs_bn[0], running[0])


def test_batch_renorm_cumulative_momentum_matches_batch_norm(rng):
    C = 3
    rs_bn = [np.zeros(C), np.ones(C)]
    rs_brn = [np.zeros(C), np.ones(C)]
    for step in (1, 2, 3):
        x = rng.standard_normal((5, C, 4)) + step
        y_bn = fastnorm.batch_norm(x, *rs_bn, training=True, momentum=None, num_batches_tracked=step)
        y_brn = fastnorm.batch_renorm(x, *rs_brn, training=True, momentum=None, num_batches_tracked=step,
                                      rmax=1.0, dmax=0.0)
        assert_close(y_brn, y_bn)
        assert_close(rs_brn[0], rs_bn[0])
        assert_close(rs_brn[1], rs_bn[1])


# ---------------------------------------------------------------- moments

@pytest.mark.parametrize("layout", ["first", "last", "last_view", "strided"])
@pytest.mark.parametrize("shape", [(16, 3), (10, 5, 33), (6, 4, 3, 7), (64, 5, 33)])
def test_moments_merge_of_halves_equals_whole(shape, layout, rng):
    # ordinary data: per-channel means away from 0 (so "relative" is meaningful for the mean too)
    C = shape[1]
    loc = rng.uniform(-5, 5, C).reshape((1, C) + (1,) * (len(shape) - 2))
    v = rng.standard_normal(shape) * rng.uniform(0.5, 3.0) + loc
    x, axis = arrange(v, layout)
    half = shape[0] // 2
    merged = fastnorm.Moments.merge(fastnorm.moments(x[:half], axis=axis), fastnorm.moments(x[half:], axis=axis))
    whole = fastnorm.moments(x, axis=axis)
    assert merged.count == whole.count == x.size // C
    assert_close(merged.mean, whole.mean, tol=MERGE_TOL, what="mean")
    assert_close(merged.m2, whole.m2, tol=MERGE_TOL, what="m2")


def test_moments_merge_of_many_uneven_parts(rng):
    x = rng.standard_normal((37, 4, 6)) * 2 + np.arange(1, 5).reshape(1, 4, 1)
    cuts = [0, 1, 5, 6, 20, 37]
    parts = [fastnorm.moments(x[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    merged = fastnorm.Moments.merge(*parts)
    whole = fastnorm.moments(x)
    assert merged.count == whole.count
    assert_close(merged.mean, whole.mean, tol=MERGE_TOL)
    assert_close(merged.m2, whole.m2, tol=MERGE_TOL)


def test_moments_merge_at_offset(rng):
    """Offset data (1e6 + N(0, 1)) loses more than 1e-12 — see MERGE_OFFSET_TOL in cases.py for the
    measured loss (~2e-11 relative in m2, for the whole-batch moments as much as for the merged ones)."""
    x = rng.standard_normal((64, 5, 33)) + MERGE_OFFSET
    merged = fastnorm.Moments.merge(fastnorm.moments(x[:32]), fastnorm.moments(x[32:]))
    whole = fastnorm.moments(x)
    xs = x - MERGE_OFFSET                                    # exact in float64 (Sterbenz)
    exact_m2 = ((xs - xs.mean(axis=(0, 2), keepdims=True)) ** 2).sum(axis=(0, 2))
    assert_close(merged.mean, whole.mean, tol=MERGE_TOL, what="mean")     # the mean still is exact
    assert_close(merged.m2, whole.m2, tol=MERGE_OFFSET_TOL, what="m2 merged vs whole")
    assert_close(merged.m2, exact_m2, tol=MERGE_OFFSET_TOL, what="m2 merged vs exact")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", [
    (shape, layout) for shape in [(17, 3), (3, 17, 129), (2, 9, 3, 3), (2, 3, 1, 17, 3)]
    for layout in ["first", "last", "last_view", "middle", "strided"] if layout != "middle" or len(shape) >= 4])
def test_moments_vs_reference(shape, layout, dtype, rng):
    x, axis = arrange((rng.standard_normal(shape) * 3 + 1).astype(dtype), layout)
    m = fastnorm.moments(x, axis=axis)
    count, mean, m2 = reference.moments(x, axis=axis)
    assert isinstance(m, fastnorm.Moments)
    assert m.mean.dtype == m.m2.dtype == np.float64
    assert m.count == count
    assert_close(m.mean, mean, tol=ROUNDING)     # float64 statistics of the same (exactly widened) values
    assert_close(m.m2, m2, tol=ROUNDING)


@pytest.mark.parametrize("ddof", [0, 1])
def test_moments_var_std(ddof, rng):
    x = rng.standard_normal((8, 3, 5)) * 2 + 1
    m = fastnorm.moments(x)
    assert_close(m.var(ddof), x.var(axis=(0, 2), ddof=ddof), tol=ROUNDING)
    assert_close(m.std(ddof), x.std(axis=(0, 2), ddof=ddof), tol=ROUNDING)
    assert_close(m.var(), x.var(axis=(0, 2)), tol=ROUNDING)          # ddof defaults to 0


def test_moments_merge_with_empty_part(rng):
    x = rng.standard_normal((6, 3, 4))
    whole = fastnorm.moments(x)
    merged = fastnorm.Moments.merge(fastnorm.moments(x[:0]), whole, fastnorm.moments(x[:0]))
    assert merged.count == whole.count
    assert_close(merged.mean, whole.mean, tol=MERGE_TOL)
    assert_close(merged.m2, whole.m2, tol=MERGE_TOL)


def test_moments_are_batch_norm_statistics(rng):
    """batch_norm's running-stat update uses exactly these moments (m = 1: running = batch stats)."""
    x = rng.standard_normal((7, 4, 5)) * 3 - 2
    m = fastnorm.moments(x)
    running_mean, running_var = np.zeros(4), np.ones(4)
    fastnorm.batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    assert_close(running_mean, m.mean, tol=ROUNDING)
    assert_close(running_var, m.var(ddof=1), tol=ROUNDING)


# ---------------------------------------------------------------- per-sample ops ≡ their samples one by one

# Channels-last instance/group norm fuses the forward of a batch of ≥ FUSED_MIN_SAMPLES samples (one
# sample per prange iteration, normalize_groups); fewer samples take moments → normalize.  A per-sample
# op on x[:k] is the first k samples of the op on x, so the routes must agree: y bit for bit, and dx
# (the same backward kernels, from the two routes' statistics) to a rounding in float64, bit for bit in
# float32.
# (5, 3, 7, 12): below SERIAL_BELOW (serial builds); (4, 1001, 40): parallel, two chunks of rows, the
# second of odd length (the two-row step's tail).
@pytest.mark.parametrize("shape, groups", [((5, 3, 7, 12), 4), ((4, 1001, 40), 8), ((6, 2, 2, 3), 3)])
@pytest.mark.parametrize("op", ["group_norm", "instance_norm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_channels_last_batch_is_its_samples(shape, groups, op, dtype, rng):
    x = (rng.standard_normal(shape) * 2 + 100).astype(dtype)       # an offset: the mean must come first
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[-1]
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    kind = "group" if op == "group_norm" else "instance"
    assert _plan.channel_view(x, x.ndim - 1, kind, groups if kind == "group" else None).fused
    assert not _plan.channel_view(x[:3], x.ndim - 1, kind, groups if kind == "group" else None).fused

    def run(a, d):
        if op == "group_norm":
            return _fwd_bwd(op, a, d, groups, w, b, axis=-1)
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        return _fwd_bwd(op, a, d, rm, rv, w, b, use_input_stats=True, axis=-1) + (rm, rv)

    whole, part = run(x, dy), run(x[:3], dy[:3])
    assert_bitwise(whole[0][:3], part[0], "y")
    if dtype == np.float32:
        assert_bitwise(whole[1][:3], part[1], "dx")
    else:
        assert_close(whole[1][:3], part[1], ROUNDING, "dx")
    if op == "group_norm":
        y_ref, ctx_ref = reference.group_norm_forward(x, groups, w, b, axis=-1)
    else:                           # and the running statistics, updated from every sample's moments
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        y_ref, ctx_ref = reference.instance_norm_forward(x, rm, rv, w, b, use_input_stats=True, axis=-1)
        assert_close(whole[4], rm, what="running_mean")
        assert_close(whole[5], rv, what="running_var")
    assert_close(whole[0], y_ref, what="y vs reference")
    for name, a, e in zip(("dx", "dweight", "dbias"), whole[1:4], getattr(reference, op + "_backward")(dy, ctx_ref)):
        assert_close(a, e, what=f"{name} vs reference")


def test_channels_last_samples_too_large_for_cache_are_not_fused():
    S = _plan.FUSED_SAMPLE_BYTES // (4 * 8)               # rows of a float32 sample of 8 channels at the limit
    assert _plan.channel_view(np.empty((_plan.FUSED_MIN_SAMPLES, S, 8), np.float32), 2, "group", 4).fused
    assert not _plan.channel_view(np.empty((_plan.FUSED_MIN_SAMPLES, S + 1, 8), np.float32), 2, "group", 4).fused


# ---------------------------------------------------------------- layer/RMS norm rows ≡ the rows alone

# Rows are independent, so a batch's first rows are those rows normalized alone.  The batch is large
# enough for the parallel builds, which read weight and bias as exact float64 copies
# (``functional._wide``); the rows alone run the serial builds, which read them in the input's dtype
# (float64 parameters of a float32 input rounded to float32 on both routes).  y and dx bit for bit.
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype, pdtype", [(np.float32, np.float32), (np.float32, np.float64),
                                           (np.float64, np.float64), (np.float16, np.float32)])
def test_row_ops_batch_is_its_rows(op, dtype, pdtype, rng):
    from fastnorm import _cpu
    D, k = 96, 5
    rows = _cpu.SERIAL_BELOW // D + 3
    x = (rng.standard_normal((rows, D)) * 2 + 10).astype(dtype)
    dy = rng.standard_normal((rows, D)).astype(dtype)
    w, b = rng.standard_normal(D).astype(pdtype), rng.standard_normal(D).astype(pdtype)
    args = (w,) if op == "rms_norm" else (w, b)
    whole, part = _fwd_bwd(op, x, dy, (D,), *args), _fwd_bwd(op, x[:k], dy[:k], (D,), *args)
    assert x.size >= _cpu.SERIAL_BELOW > x[:k].size
    assert_bitwise(whole[0][:k], part[0], "y")
    assert_bitwise(whole[1][:k], part[1], "dx")
