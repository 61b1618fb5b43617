"""SyncBatchNorm under ``mpiexec -n R``: every result against ``batch_norm`` on the global batch.

Launched by ``tests/test_distributed.py`` as ``mpiexec -n R python -m mpi4py tests/mpi_worker.py``
(``-m mpi4py``: an unexpected exception on one rank aborts every rank instead of leaving them waiting in
a collective).  Every rank draws the same global batch from a seed and takes its slice along axis 0;
``fastnorm.batch_norm`` on the whole batch is the reference for y, dx (this rank's slice), dweight,
dbias and the running stats.  Prints each mismatch as ``[rank r] case: what`` when found and exits 1 on any.
"""
import sys

import numpy as np
from mpi4py import MPI

import fastnorm
from fastnorm.distributed import SyncBatchNorm, sync_batch_norm, sync_batch_norm_backward, sync_batch_norm_forward
from fastnorm.layers import BatchNorm

comm = MPI.COMM_WORLD
RANK, SIZE = comm.Get_rank(), comm.Get_size()
C = 5

# atol + rtol·|ref|.  The only difference from the reference is the order in which the float64 partial
# sums are merged (per rank, then across ranks).  Measured on these cases at 2 and 3 ranks: float32
# results bitwise equal (the float64 differences vanish in the final rounding; 1e-6 ≈ 8 ulp leaves room
# for a rounding that flips), float64 within 31 eps·(|ref| + 1) (dweight, a sum that cancels): 1e-13 ≈ 450.
TOL = {np.float32: (1e-6, 1e-6), np.float64: (1e-13, 1e-13)}

# channels-first (N, C, H, W), channels-last (N, H, W, C), and (N, C) per-activation: (shape of one
# sample, axis).  The batch is axis 0 in each, so a rank's slice is x[start:stop].
LAYOUTS = {"nchw": ((C, 3, 4), 1), "nhwc": ((3, 4, C), -1), "nc": ((C,), 1)}
# Unequal batch sizes, and a rank with an empty batch (next to one with a single sample at 3 ranks,
# whose local count is 1 per channel for "nc": allowed, the global count is what matters).
BATCHES = {"unequal": [3, 5, 2, 4][:SIZE], "empty": [0, 4, 1, 3][:SIZE]}
MODES = ["train", "train-cumulative", "train-no-running", "eval", "eval-no-running"]

failures = 0


def fail(case, what):
    global failures
    failures += 1
    print(f"[rank {RANK}] {case}: {what}", flush=True)   # now: a later hang must not hide it


def check(case, name, got, ref, dtype):
    atol, rtol = TOL[dtype]
    if got is None or np.shape(got) != np.shape(ref):
        return fail(case, f"{name}: shape {np.shape(got)}, expected {np.shape(ref)}")
    if got.dtype != ref.dtype:
        return fail(case, f"{name}: dtype {got.dtype}, expected {ref.dtype}")
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    bound = atol + rtol * np.abs(ref.astype(np.float64))
    if not (err <= bound).all():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        fail(case, f"{name}: max error {err.max():.3g} > tolerance, at {tuple(map(int, i))}: {got[i]} vs {ref[i]}")


def check_same_everywhere(case, name, a):
    """Data-parallel replicas stay in step only if these are bitwise equal on every rank."""
    if not all(np.array_equal(a, other) for other in comm.allgather(a)):
        fail(case, f"{name} differs between ranks")


def my_slice(sizes):
    start = sum(sizes[:RANK])
    return slice(start, start + sizes[RANK])


def problem(layout, dtype, sizes, seed):
    """The global batch, dy, weight/bias and initial running stats; the same on every rank."""
    sample, axis = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    # offset 3: the merge must centre the data (E[x²] − E[x]² would lose float32 digits here)
    x = (rng.standard_normal((sum(sizes), *sample)) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    weight, bias = (rng.standard_normal(C).astype(dtype) for _ in range(2))
    running = (rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype))
    return x, dy, weight, bias, running, axis


def run_case(layout, dtype, batch, mode, seed):
    case = f"{layout}/{dtype.__name__}/{batch} {BATCHES[batch]}/{mode}"
    sizes = BATCHES[batch]
    x, dy, weight, bias, running, axis = problem(layout, dtype, sizes, seed)
    kwargs = {"axis": axis, "momentum": 0.1}
    if mode == "train-cumulative":
        kwargs.update(momentum=None, num_batches_tracked=3)
    tracked = "no-running" not in mode
    training = mode.startswith("train")
    ref_running = [r.copy() for r in running] if tracked else [None, None]
    my_running = [r.copy() for r in running] if tracked else [None, None]

    y_ref, ctx = fastnorm.batch_norm_forward(x, *ref_running, weight, bias, training, **kwargs)
    dx_ref, dw_ref, db_ref = fastnorm.batch_norm_backward(dy, ctx)

    mine = my_slice(sizes)
    y, ctx = sync_batch_norm_forward(x[mine], *my_running, weight, bias, training, **kwargs)
    dx, dw, db = sync_batch_norm_backward(dy[mine], ctx)

    check(case, "y", y, y_ref[mine], dtype)
    check(case, "dx", dx, dx_ref[mine], dtype)
    check(case, "dweight", dw, dw_ref, dtype)
    check(case, "dbias", db, db_ref, dtype)
    check_same_everywhere(case, "dweight", dw)
    if tracked:
        for name, got, ref in zip(("running_mean", "running_var"), my_running, ref_running):
            check(case, name, got, ref, dtype)
            check_same_everywhere(case, name, got)
    if not np.array_equal(sync_batch_norm(x[mine], *[r.copy() if tracked else None for r in running], weight,
                                          bias, training, **kwargs), y):
        fail(case, "sync_batch_norm (y only) differs from sync_batch_norm_forward")


def run_layer(dtype):
    """Three SGD steps of SyncBatchNorm against BatchNorm on the global batch, then eval; state dicts."""
    case = f"SyncBatchNorm/{dtype.__name__}"
    sizes = BATCHES["unequal"]
    mine = my_slice(sizes)
    ref, layer = BatchNorm(C, dtype=dtype), SyncBatchNorm(C, dtype=dtype)
    for step in range(3):
        x, dy, *_ = problem("nchw", dtype, sizes, seed=100 + step)
        y_ref, y = ref(x), layer(x[mine])
        dx_ref, dx = ref.backward(dy), layer.backward(dy[mine])
        check(case, f"step {step} y", y, y_ref[mine], dtype)
        check(case, f"step {step} dx", dx, dx_ref[mine], dtype)
        for lyr in (ref, layer):
            for name, p in lyr.params.items():
                p -= dtype(0.1) * lyr.grads[name]
            lyr.zero_grad()
    x, *_ = problem("nchw", dtype, sizes, seed=200)
    check(case, "eval y", layer.eval()(x[mine]), ref.eval()(x)[mine], dtype)
    got, expected = layer.state_dict(), ref.state_dict()
    if list(got) != list(expected):
        fail(case, f"state_dict keys {list(got)}, expected {list(expected)}")
    for key in expected:
        if key == "num_batches_tracked":
            if got[key] != expected[key]:
                fail(case, f"num_batches_tracked {got[key]}, expected {expected[key]}")
        else:
            check(case, key, got[key], expected[key], dtype)


def expect_error(case, error, text, fn):
    """fn must raise ``error`` with ``text`` in its message on this rank (and so, with no hang, on all)."""
    try:
        fn()
    except error as exc:
        if text not in str(exc):
            fail(case, f"{type(exc).__name__} without {text!r}: {exc}")
    except Exception as exc:
        fail(case, f"expected {error.__name__} with {text!r}, got {type(exc).__name__}: {exc}")
    else:
        fail(case, f"expected {error.__name__} with {text!r}, nothing raised")


def run_errors():
    last = RANK == SIZE - 1
    x = np.random.default_rng(7).standard_normal((2, C, 3, 3)).astype(np.float32)
    running = (np.zeros(C, np.float32), np.ones(C, np.float32))

    def forward(x, running=running, weight=None, training=True, axis=1):
        return sync_batch_norm_forward(x, *running, weight, None, training, axis=axis)

    odd = x[:, :C - 1].copy()            # the last rank alone has C − 1 channels (its own running stats)
    expect_error("channel mismatch", ValueError, "same number of channels",
                 lambda: forward(odd, (running[0][:-1], running[1][:-1])) if last else forward(x))
    if not (np.array_equal(running[0], np.zeros(C)) and np.array_equal(running[1], np.ones(C))):
        fail("channel mismatch", "running stats changed by a call that raised")
    expect_error("dtype mismatch", TypeError, "same input dtype",
                 lambda: forward(x.astype(np.float64) if last else x))
    # same C on every rank, but the last one reads it from another axis
    square = np.random.default_rng(8).standard_normal((2, C, 3, C)).astype(np.float32)
    expect_error("axis mismatch", ValueError, "same channel axis",
                 lambda: forward(square, axis=-1 if last else 1))
    # the last rank in eval: its forward exchanges nothing, its backward's pre-check meets the others' forward
    expect_error("mode mismatch", ValueError, "same mode",
                 lambda: sync_batch_norm_backward(x, forward(x, training=not last)[1]))
    expect_error("local check fails on one rank", ValueError, "weight must have shape",
                 lambda: forward(x, weight=np.ones(C + 1 if last else C, np.float32)))

    for mode in ("train", "eval"):      # eval: the pre-check runs in the backward
        y, ctx = forward(x, training=mode == "train")
        dy = np.ones((3, C, 3, 3), np.float32) if last else np.ones_like(y)
        expect_error(f"bad grad_output on one rank ({mode})", ValueError,
                     "grad_output must have the input's shape", lambda: sync_batch_norm_backward(dy, ctx))
    y, ctx = forward(odd if last else x, (running[0][:-1], running[1][:-1]) if last else running, training=False)
    expect_error("channel mismatch in eval backward", ValueError, "same number of channels",
                 lambda: sync_batch_norm_backward(np.ones_like(y), ctx))

    # one value per channel in the global batch: PyTorch's message, on every rank, buffers untouched
    fresh = (np.zeros(C, np.float32), np.ones(C, np.float32))
    one = np.ones((1 if RANK == 0 else 0, C), np.float32)
    expect_error("global count 1", ValueError,
                 f"Expected more than 1 value per channel when training, got input size (1, {C})",
                 lambda: forward(one, fresh))
    # every rank empty: nothing to normalize, no rank communicates in backward, buffers untouched
    y, ctx = forward(np.empty((0, C, 3, 3), np.float32), fresh)
    dx, dw, db = sync_batch_norm_backward(np.empty((0, C, 3, 3), np.float32), ctx)
    if y.shape != (0, C, 3, 3) or dx.shape != (0, C, 3, 3):
        fail("all ranks empty", f"y {y.shape}, dx {dx.shape}")
    if not (np.array_equal(fresh[0], np.zeros(C)) and np.array_equal(fresh[1], np.ones(C))):
        fail("global count 1 / all ranks empty", "running stats changed")


def main():
    seed = 0
    for layout in LAYOUTS:
        for dtype in (np.float32, np.float64):
            for batch in BATCHES:
                for mode in MODES:
                    run_case(layout, dtype, batch, mode, seed)
                    seed += 1
    for dtype in (np.float32, np.float64):
        run_layer(dtype)
    run_errors()
    run_case("nchw", np.float32, "unequal", "train", seed)   # the communicator still works after the errors

    total = comm.allreduce(failures)
    if RANK == 0:
        print(f"mpi_worker: {SIZE} ranks, {total} failure(s)", flush=True)
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    main()
