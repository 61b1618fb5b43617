"""Hypothesis: random shapes, memory layouts, axis, eps, momentum, groups — every op vs the reference.

Values come from a NumPy generator seeded by hypothesis (not from hypothesis floats), so shrinking acts
on shapes/arguments and the data stay ordinary.  Few examples and no deadline: first calls compile.
"""
import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fastnorm
from fastnorm import reference
from cases import (CHANNEL_OPS, MERGE_TOL, MODES, OPS, ROUNDING, ROW_OPS, assert_close,
                   check_against_reference, make_call)

dtypes = st.sampled_from([np.float16, np.float32, np.float64])


@st.composite
def arrays(draw, shape, dtype):
    """Values N(loc, scale²) of ``shape`` in a random memory order, maybe strided: x is a view of storage
    laid out by a random permutation of the axes, with every other element taken along one of them."""
    seed = draw(st.integers(0, 2**32 - 1))
    loc = draw(st.floats(-3, 3))
    scale = 10 ** draw(st.floats(-1, 1))
    perm = draw(st.permutations(range(len(shape))))
    step_axis = draw(st.one_of(st.none(), st.integers(0, len(shape) - 1)))
    rng = np.random.default_rng(seed)
    stored = [shape[p] * (2 if i == step_axis else 1) for i, p in enumerate(perm)]
    base = (rng.standard_normal(stored) * scale + loc).astype(dtype)
    if step_axis is not None:
        index = [slice(None)] * len(shape)
        index[step_axis] = slice(None, None, 2)
        base = base[tuple(index)]
    x = base.transpose(np.argsort(perm))
    assert x.shape == tuple(shape)
    return x, rng


@st.composite
def channel_calls(draw):
    op = draw(st.sampled_from(CHANNEL_OPS))
    ndim = draw(st.integers(OPS[op].min_ndim, 5))
    shape = draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(1, ndim - 1))
    axis = axis - ndim if draw(st.booleans()) else axis        # negative spelling too
    mode = draw(st.sampled_from(OPS[op].modes))
    C, N = shape[axis], shape[0]
    per_channel = int(np.prod(shape)) // C
    uses_batch, _, mode_kw = MODES[op][mode]
    if op in ("batch_norm", "batch_renorm") and mode_kw.get("training"):
        assume(per_channel > 1)
    if op == "instance_norm" and uses_batch:
        assume(per_channel // N > 1)
    x, rng = draw(arrays(shape, draw(dtypes)))
    extra = dict(eps=10 ** draw(st.floats(-5, 0)))
    if op in ("batch_norm", "batch_renorm", "instance_norm"):
        momentum = draw(st.one_of(st.none(), st.floats(0, 1)))
        extra["momentum"] = momentum
        if momentum is None:
            extra["num_batches_tracked"] = draw(st.integers(1, 10))
    if op == "batch_renorm":
        extra["rmax"] = draw(st.floats(1, 4))
        extra["dmax"] = draw(st.floats(0, 6))
    groups = None
    if op == "group_norm":
        groups = draw(st.sampled_from([g for g in range(1, C + 1) if C % g == 0]))
    call = make_call(op, x, axis=axis, mode=mode, rng=rng, groups=groups, weight=draw(st.booleans()),
                     bias=draw(st.booleans()), param_dtype=draw(st.sampled_from([None, np.float64])), **extra)
    return call, rng


@given(channel_calls())
@settings(max_examples=80)
def test_channel_ops_match_reference(problem):
    call, rng = problem
    check_against_reference(call, rng)


@st.composite
def row_calls(draw):
    op = draw(st.sampled_from(ROW_OPS))
    ndim = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 7), min_size=ndim, max_size=ndim))
    k = draw(st.integers(1, ndim))
    x, rng = draw(arrays(shape, draw(dtypes)))
    if op == "rms_norm":
        eps = draw(st.one_of(st.none(), st.floats(-6, 0).map(lambda e: 10 ** e)))
    else:
        eps = 10 ** draw(st.floats(-5, 0))
    # a group of one element is legal for layer norm: x̂ = 0 (and y = bias)
    call = make_call(op, x, rng=rng, nshape=k, weight=draw(st.booleans()), bias=draw(st.booleans()), eps=eps)
    return call, rng


@given(row_calls())
@settings(max_examples=60)
def test_row_ops_match_reference(problem):
    call, rng = problem
    check_against_reference(call, rng)


@given(st.data())
@settings(max_examples=40)
def test_moments_match_reference_and_merge(data):
    ndim = data.draw(st.integers(2, 4))
    shape = data.draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim))
    shape[0] = data.draw(st.integers(2, 9))
    axis = data.draw(st.integers(1, ndim - 1))
    x, _ = data.draw(arrays(shape, np.float64))
    m = fastnorm.moments(x, axis=axis)
    count, mean, m2 = reference.moments(x, axis=axis)
    assert m.count == count
    assert_close(m.mean, mean, tol=ROUNDING)
    assert_close(m.m2, m2, tol=ROUNDING)
    cut = data.draw(st.integers(1, shape[0] - 1))
    merged = fastnorm.Moments.merge(fastnorm.moments(x[:cut], axis=axis), fastnorm.moments(x[cut:], axis=axis))
    assert merged.count == m.count
    # the merge's own error is relative to the data's scale: compare against |mean| + std
    scale = np.abs(m.mean) + np.sqrt(m.m2 / m.count)
    assert np.all(np.abs(merged.mean - m.mean) <= MERGE_TOL.rtol * scale)
    assert np.all(np.abs(merged.m2 - m.m2) <= MERGE_TOL.rtol * (m.m2 + m.count * scale**2))
