"""Reuse of large output buffers (``_plan.new_array``): a buffer is handed out again only when no array
refers to it, results stay correct, and threads never share one.  And the one shared vector that
stands for a missing weight or bias.

Most tests lower ``REUSE_MIN_BYTES`` so that small inputs take the large-output path; one runs at the
real threshold (32 MiB).
"""
import gc
import threading

import numpy as np
import pytest

import fastnorm
from cases import CHANNEL_OPS, OPS, assert_close, check_against_reference, make_call, tol_for
from fastnorm import _plan, functional, reference


@pytest.fixture
def small_threshold(monkeypatch):
    """Outputs and input copies of ≥ 4 KiB count as large; the kept buffers start empty and are dropped
    afterwards."""
    monkeypatch.setattr(_plan, "REUSE_MIN_BYTES", 4096)
    monkeypatch.setattr(_plan, "COPY_MIN_BYTES", 4096)
    monkeypatch.setattr(_plan, "_reusable", [])
    yield
    gc.collect()


def _ln(x):
    return fastnorm.layer_norm(x, x.shape[-1:])


def _owner(a):
    return a if a.base is None else a.base


def test_a_dropped_output_is_reused_and_overwritten(small_threshold, rng):
    x1, x2 = rng.standard_normal((2, 64, 64)).astype(np.float32)
    y1 = _ln(x1)
    assert any(_owner(y1) is b for b in _plan._reusable), "a large output is kept for reuse"
    address = y1.__array_interface__["data"][0]
    del y1
    y2 = _ln(x2)
    assert y2.__array_interface__["data"][0] == address, "the free buffer was handed out again"
    assert_close(y2, reference.layer_norm(x2, (64,)))


@pytest.mark.parametrize("keep", ["result", "slice", "transpose", "memoryview", "array_from_buffer",
                                  "backward_dx"])
def test_a_buffer_still_referenced_is_never_handed_out(small_threshold, rng, keep):
    """Whatever still refers to the first result keeps its buffer out of reuse, and its values intact."""
    x1, x2 = rng.standard_normal((2, 64, 64)).astype(np.float32)
    y1, ctx = fastnorm.layer_norm_forward(x1, (64,))
    expected = y1.copy()
    held = {"result": lambda: y1, "slice": lambda: y1[::2], "transpose": lambda: y1.T,
            "memoryview": lambda: memoryview(y1), "array_from_buffer": lambda: np.frombuffer(y1, np.float32),
            "backward_dx": lambda: fastnorm.layer_norm_backward(np.ones_like(y1), ctx)[0]}[keep]()
    if keep != "result":
        del y1
    for _ in range(3):
        y2 = _ln(x2)
        assert_close(y2, reference.layer_norm(x2, (64,)))
        assert not np.shares_memory(y2, np.asarray(held)), f"a buffer still referenced by a {keep} was reused"
    if keep in ("result", "slice", "transpose", "memoryview", "array_from_buffer"):
        seen = np.asarray(held).reshape(-1)
        want = {"slice": expected[::2], "transpose": expected.T}.get(keep, expected).reshape(-1)
        np.testing.assert_array_equal(seen, want)


def test_backward_and_forward_outputs_are_distinct(small_threshold, rng):
    """A training step holds y, then makes dx: they never share a buffer."""
    x, dy = rng.standard_normal((2, 8, 16, 8, 8)).astype(np.float32)
    rm, rv = np.zeros(16, np.float32), np.ones(16, np.float32)
    y, ctx = fastnorm.batch_norm_forward(x, rm, rv, training=True)
    dx, _, _ = fastnorm.batch_norm_backward(dy, ctx)
    assert not np.shares_memory(y, dx)
    rm_ref, rv_ref = np.zeros(16, np.float32), np.ones(16, np.float32)
    y_ref, ctx_ref = reference.batch_norm_forward(x, rm_ref, rv_ref, training=True)
    assert_close(y, y_ref)
    assert_close(dx, reference.batch_norm_backward(dy, ctx_ref)[0])


def test_at_most_the_slots_are_kept_and_busy_buffers_are_not_evicted(small_threshold, rng):
    x = rng.standard_normal((64, 64)).astype(np.float32)
    held = [_ln(x) for _ in range(_plan.REUSE_SLOTS + 3)]          # all alive: none can be reused
    assert len(_plan._reusable) == _plan.REUSE_SLOTS
    owners = [_owner(h) for h in held]
    assert len({id(o) for o in owners}) == len(held), "every live output has its own buffer"
    kept = [b for b in _plan._reusable]
    assert all(any(k is o for o in owners[:_plan.REUSE_SLOTS]) for k in kept)
    del held, owners, kept


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_an_input_copy_comes_from_the_kept_buffers_and_lives_as_long_as_its_context(small_threshold, rng, layout):
    """An input that must be copied into the kernels' layout is copied into a kept buffer (a fresh one of
    ≥ 32 MiB pays its page faults: layer norm of a sliced (8192, 1024) took 9.4 ms, 2.7 contiguous).
    The context of its forward refers to the copy, so later calls never overwrite it before backward."""
    def sample():
        a = rng.standard_normal((16, 8, 12, 24)).astype(np.float32)
        return a[..., ::2] if layout == "sliced" else a[..., :12].transpose(0, 2, 1, 3)
    x1, dy = sample(), sample()
    before = x1.copy()
    _, ctx = fastnorm.batch_norm_forward(x1, None, None, training=True)
    assert any(np.shares_memory(ctx.x3, b) for b in _plan._reusable), "the input copy is a kept buffer"
    for _ in range(_plan.REUSE_SLOTS + 2):          # more large calls than there are kept buffers
        x2 = sample()
        fastnorm.batch_norm(x2, None, None, training=True)
        assert not np.shares_memory(ctx.x3, x2)
    dx, _, _ = fastnorm.batch_norm_backward(dy, ctx)
    np.testing.assert_array_equal(x1, before)
    _, ctx_ref = reference.batch_norm_forward(x1, None, None, training=True)
    assert_close(dx, reference.batch_norm_backward(dy, ctx_ref)[0])


def test_small_outputs_are_plain_arrays(rng):
    x = rng.standard_normal((4, 8)).astype(np.float32)
    before = list(_plan._reusable)
    y = _ln(x)
    assert y.base is None or y.base.nbytes < _plan.REUSE_MIN_BYTES
    assert [id(b) for b in _plan._reusable] == [id(b) for b in before]


def test_threads_never_share_a_buffer(small_threshold, rng):
    """4 threads × 40 calls, each holding its last two results: no two live results overlap, and
    every result is right."""
    inputs = [rng.standard_normal((32, 64)).astype(np.float32) + k for k in range(4)]
    expected = [reference.layer_norm(x, (64,)) for x in inputs]
    live, errors, lock = [], [], threading.Lock()
    barrier = threading.Barrier(4)

    def worker(k):
        barrier.wait()
        mine = []
        for _ in range(40):
            y = _ln(inputs[k])
            with lock:
                for other in live:
                    if np.shares_memory(y, other):
                        errors.append("two live results share a buffer")
                live.append(y)
            mine.append(y)
            if len(mine) > 2:
                old = mine.pop(0)
                with lock:
                    live[:] = [a for a in live if a is not old]
                del old
            if np.abs(y - expected[k]).max() > tol_for(np.float32).atol + tol_for(np.float32).rtol * 4:
                errors.append("wrong result")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_real_threshold_reuse(rng):
    """At the real 32 MiB threshold: the second output reuses the first one's buffer once it is dropped."""
    gc.collect()
    x = rng.standard_normal((8192, 1024), dtype=np.float32)       # 32 MiB
    y = _ln(x)
    address = y.__array_interface__["data"][0]
    del y
    y = _ln(x)
    assert y.__array_interface__["data"][0] == address
    assert_close(y[:64], reference.layer_norm(x[:64], (1024,)))


def test_real_thresholds_for_input_copies(rng):
    """At the real thresholds: a 4 MiB copy of a sliced input is kept (COPY_MIN_BYTES), its 4 MiB
    output is a plain array (below REUSE_MIN_BYTES)."""
    gc.collect()
    x = rng.standard_normal((1024, 2048), dtype=np.float32)[:, :1024]       # the copy: 4 MiB
    assert _plan.COPY_MIN_BYTES <= x.size * 4 < _plan.REUSE_MIN_BYTES
    y, ctx = fastnorm.layer_norm_forward(x, (1024,))
    assert any(np.shares_memory(ctx.x3, b) for b in _plan._reusable)
    assert not any(np.shares_memory(y, b) for b in _plan._reusable)
    assert_close(y[:64], reference.layer_norm(x[:64], (1024,)))


def test_release_memory_forgets_every_kept_buffer(small_threshold, rng):
    """release_memory() frees the kept buffers nothing uses (and says how many bytes), forgets the busy
    ones without touching their data, and the next large output is a new buffer that is kept again."""
    x1, x2 = rng.standard_normal((2, 64, 64)).astype(np.float32)
    busy = _ln(x1)
    expected = busy.copy()
    free = _ln(x2)
    freed_bytes = free.nbytes
    del free
    assert len(_plan._reusable) == 2
    assert fastnorm.release_memory() == freed_bytes
    assert _plan._reusable == []
    np.testing.assert_array_equal(busy, expected)
    y = _ln(x2)
    assert not np.shares_memory(y, busy)
    assert len(_plan._reusable) == 1 and _owner(y) is _plan._reusable[0]
    assert_close(y, reference.layer_norm(x2, (64,)))
    assert fastnorm.release_memory() == 0       # y still refers to its buffer


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", list(OPS))
def test_the_shared_vector_of_a_missing_weight_is_never_written(op, dtype, rng):
    """weight=None and bias=None become one cached vector of ones / zeros per length and dtype
    (``functional._filled``), shared by every call.  After each mode's forward and backward, with the
    caller overwriting everything returned, the vectors still hold 1 and 0 and a new call still
    matches the reference."""
    x = rng.standard_normal((2, 6, 5) if op in CHANNEL_OPS else (4, 6)).astype(dtype)
    C = 6
    for mode in OPS[op].modes:
        call = make_call(op, x, mode=mode, rng=rng, weight=False, bias=False, groups=3)
        y, ctx, _ = call.forward(fastnorm)
        dx, _, _ = call.backward(fastnorm, np.ones_like(x), ctx)
        y[...] = np.nan
        dx[...] = np.nan
        cdtype = np.dtype(dtype)
        np.testing.assert_array_equal(functional._filled(1.0, C, cdtype), np.ones(C, cdtype))
        np.testing.assert_array_equal(functional._filled(0.0, C, cdtype), np.zeros(C, cdtype))
        check_against_reference(call, rng)
