"""Numerics (semantics.md): accuracy at an offset, NaN/inf confinement, bitwise thread-count
determinism, concurrent calls from Python threads, and float16 converted in and out as NumPy does."""
import os
import platform
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import pytest

import fastnorm
from fastnorm import _cpu, _plan, reference
from cases import (OFFSET, OFFSET_TOL, OPS, chunky_calls, arrange, assert_bitwise, assert_close,
                   determinism_outputs, group_index, make_call)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- offset 1e6

def _offset_params():
    for op, spec in OPS.items():
        for mode in spec.modes:
            layouts = ("first", "last") if spec.kind == "channel" else ("first",)
            for layout in layouts:
                for shape in ((4, 6, 9), "chunky"):
                    size = shape if shape == "chunky" else "small"
                    yield pytest.param(op, mode, layout, shape, id=f"{op}-{mode}-{layout}-{size}")


@pytest.mark.parametrize("op, mode, layout, shape", list(_offset_params()))
def test_float32_at_offset_1e6(op, mode, layout, shape, rng):
    """float32 input 1e6 + N(0, 1): y within 1e-5 of the float64 reference on the same values (PyTorch
    is off by 3.5e-2 there).  Running stats sit at the offset too.  rms_norm at an offset is trivial
    (y ≈ weight) but is held to the same bound."""
    if shape == "chunky":     # several reduction chunks per group
        shape = (2, 6, _plan.CHUNK // 3 + 5) if OPS[op].kind == "channel" else (3, 2 * _plan.CHUNK + 5)
    v = (OFFSET + rng.standard_normal(shape)).astype(np.float32)
    x, axis = arrange(v, layout)
    if OPS[op].kind == "row":
        call = make_call(op, x, rng=rng)
    else:
        call = make_call(op, x, axis=axis, mode=mode, rng=rng, groups=3 if op == "group_norm" else None)
        if call.kwargs.get("running_mean") is not None:
            call.kwargs["running_mean"] = call.kwargs["running_mean"] + np.float32(OFFSET)
    y, ctx, _ = call.forward(fastnorm)
    y_ref, ctx_ref, _ = call.forward(reference, input=x.astype(np.float64))
    assert y.dtype == np.float32
    assert_close(y, y_ref, tol=OFFSET_TOL, what="y at offset 1e6")
    # the gradient is held to the same bound (dx is O(1) like y)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = call.backward(fastnorm, dy, ctx)[0]
    dx_ref = call.backward(reference, dy.astype(np.float64), ctx_ref)[0]
    assert_close(dx, dx_ref, tol=OFFSET_TOL, what="dx at offset 1e6")


# ---------------------------------------------------------------- NaN / inf stay in their group

def _nonfinite_params():
    for op, spec in OPS.items():
        for layout in (("first", "last", "last_view") if spec.kind == "channel" else ("first", "fortran")):
            for bad in ("nan", "inf", "-inf"):
                yield pytest.param(op, layout, bad, id=f"{op}-{layout}-{bad}")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")   # the reference computes inf − inf
@pytest.mark.parametrize("op, layout, bad", list(_nonfinite_params()))
def test_nonfinite_poisons_only_its_group(op, layout, bad, rng):
    """semantics.md: NaN or inf in a group makes that group's outputs NaN (as PyTorch); the other groups
    are finite and correct — y, dx, the running stats and the weight gradients of untouched channels."""
    v = rng.standard_normal((3, 6, 5, 2)).astype(np.float32)
    x, axis = arrange(v, layout)
    groups = 3 if op == "group_norm" else None
    if OPS[op].kind == "row":
        call = make_call(op, x, rng=rng, nshape=2)
        gid = group_index(op, x, None, nshape=2)
    else:
        call = make_call(op, x, axis=axis, mode="train", rng=rng, groups=groups)
        gid = group_index(op, x, axis, groups)
    idx = tuple(int(rng.integers(0, n)) for n in x.shape)
    x[idx] = float(bad)
    inside = gid == gid[idx]

    y, ctx, kw = call.forward(fastnorm)
    y_ref, ctx_ref, kw_ref = call.forward(reference)
    assert np.isnan(y[inside]).all(), "the group holding the non-finite value must be all NaN"
    assert np.isfinite(y[~inside]).all()
    assert_close(y[~inside], y_ref[~inside], what="y outside the group")

    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, dweight, _ = call.backward(fastnorm, dy, ctx)
    dx_ref, dweight_ref, _ = call.backward(reference, dy, ctx_ref)
    assert np.isnan(dx[inside]).all()
    assert np.isfinite(dx[~inside]).all()
    assert_close(dx[~inside], dx_ref[~inside], what="dx outside the group")

    if OPS[op].kind == "channel":
        C = x.shape[axis]
        channel = np.broadcast_to(np.arange(C).reshape([C if i == axis % x.ndim else 1 for i in range(x.ndim)]),
                                  x.shape)
        touched = np.unique(channel[inside])
        clean = np.setdiff1d(np.arange(x.shape[axis]), touched)
        assert np.isnan(dweight[touched]).all()
        assert_close(dweight[clean], dweight_ref[clean], what="dweight of clean channels")
        for k in ("running_mean", "running_var"):
            if kw.get(k) is not None:
                # non-finite, not necessarily NaN: with +inf, PyTorch's running_mean becomes inf
                assert not np.isfinite(kw[k][touched]).any()
                assert_close(kw[k][clean], kw_ref[k][clean], what=k)


def test_nan_in_eval_stays_in_its_element(rng):
    """With running stats (eval) there is no reduction: only the NaN element itself is NaN."""
    x = rng.standard_normal((4, 3, 5))
    x[1, 2, 3] = np.nan
    call = make_call("batch_norm", x, mode="eval", rng=rng)
    y = call.forward(fastnorm)[0]
    assert np.isnan(y[1, 2, 3]) and np.isnan(y).sum() == 1


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("op", ["instance_norm", "group_norm", "layer_norm"])
def test_eps_zero_constant_group_is_nan(op, rng):
    """eps = 0 is allowed there; a constant group then gives 0/0 = NaN (as PyTorch), only in that group."""
    x = rng.standard_normal((3, 4, 6))
    x[1, :, :] = 2.5          # sample 1: every instance/group/row is constant
    kw = dict(groups=2) if op == "group_norm" else {}
    call = make_call(op, x, rng=rng, eps=0.0, nshape=2, **kw)
    y = call.forward(fastnorm)[0]
    assert np.isnan(y[1]).all()
    assert np.isfinite(y[[0, 2]]).all()
    assert_close(y[[0, 2]], call.forward(reference)[0][[0, 2]])


# ---------------------------------------------------------------- thread-count determinism

def test_thread_count_determinism(tmp_path):
    """Outputs and gradients of every op, both layouts, float32 and float64, on inputs of several
    CHUNKs: bitwise equal in this process and in a subprocess with another NUMBA_NUM_THREADS."""
    here = numba.get_num_threads()
    other = 1 if here > 1 else 2
    for _, call in chunky_calls(np.float32):
        assert call.x.size > 2 * _plan.CHUNK         # several chunks per reduction
    expected = determinism_outputs()                 # compiles (or loads) here, first: the child loads the cache
    path = tmp_path / "child.npz"
    script = (f"import sys, numba; sys.path.insert(0, {TESTS_DIR!r}); import cases; "
              f"cases.save_determinism_outputs({str(path)!r}); print(numba.get_num_threads())")
    env = dict(os.environ, NUMBA_NUM_THREADS=str(other))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) == other
    got = np.load(path)
    assert sorted(got.files) == sorted(expected)
    for key in expected:
        assert_bitwise(got[key], expected[key], what=f"{key} ({here} vs {other} threads)")


# ---------------------------------------------------------------- concurrent calls

def _jobs():
    rng = np.random.default_rng(11)
    jobs = []
    for dtype in (np.float32, np.float64):
        for op in OPS:
            layout = "last" if op in ("batch_norm", "group_norm") else "first"
            v = rng.standard_normal((8, 6, 40, 40)).astype(dtype) + 1.0      # parallel path: see below
            x, axis = arrange(v, layout)
            if OPS[op].kind == "row":
                call = make_call(op, x, rng=rng, nshape=2)
            else:
                call = make_call(op, x, axis=axis, mode="train", rng=rng, groups=3 if op == "group_norm" else None)
            jobs.append((call, rng.standard_normal(x.shape).astype(dtype)))
    return jobs


def _run(job, module=fastnorm):
    call, dy = job
    y, ctx, kw = call.forward(module)
    grads = call.backward(module, dy, ctx)
    running = tuple(kw[k] for k in ("running_mean", "running_var") if kw.get(k) is not None)
    return (y,) + tuple(g for g in grads if g is not None) + running


def test_concurrent_calls_from_python_threads():
    """4 Python threads × 50 calls at once (forward + backward, running-stat updates on private copies):
    every result is correct, and bitwise equal to the same call made alone."""
    jobs = _jobs()
    for call, _ in jobs:    # big enough for the parallel kernels (smaller inputs run serial builds)
        assert call.x.size >= max(getattr(_cpu, "SERIAL_BELOW", 0), 2 * _plan.CHUNK)
    alone = [_run(job) for job in jobs]
    for job, result in zip(jobs, alone):
        for a, e in zip(result, _run(job, reference)):
            assert_close(a, e)
    barrier = threading.Barrier(4)

    def worker(t):
        barrier.wait()
        return [(j, _run(jobs[j])) for j in ((t * 7 + i) % len(jobs) for i in range(50))]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = [r for rs in pool.map(worker, range(4)) for r in rs]
    assert len(results) == 200
    for j, result in results:
        assert len(result) == len(alone[j])
        for a, e in zip(result, alone[j]):
            assert_bitwise(a, e, what=f"job {j}")


# ---------------------------------------------------------------- float16 in and out

@numba.njit
def _convert(src, dst):
    """dst[i] = src[i] through the kernels' load and store: float16 bits widen, float32 rounds to them."""
    for i in range(src.size):
        _cpu.store(dst, i, _cpu.load(src, i))


@pytest.mark.skipif(not _cpu.HALF_IN_HARDWARE, reason="no hardware float16 conversion: NumPy converts")
def test_float16_loads_and_stores_convert_exactly_as_numpy(rng):
    """_cpu.load/store against NumPy's casts: all 65536 float16 bit patterns widened to float32, and
    random float32 bit patterns plus the edges (largest half, the overflow boundary, subnormals, ±0,
    ±inf) rounded to float16 — bitwise, NaN as NaN."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    wide = np.empty(bits.size, np.float32)
    _convert(bits, wide)
    expected = bits.view(np.float16).astype(np.float32)
    assert np.array_equal(np.isnan(wide), np.isnan(expected))
    assert_bitwise(wide[~np.isnan(expected)], expected[~np.isnan(expected)], "float16 → float32")

    edges = np.float32([65504, 65519.99, 65520, 1e30, 2.98e-8, 2.9802322e-8, 5.96e-8, 6.1e-5, 6.1035156e-5,
                        -0.0, 0.0, np.inf, -np.inf, np.nan])
    values = np.concatenate([edges, rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint32).view(np.float32)])
    narrow = np.empty(values.size, np.uint16)
    _convert(values, narrow)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = values.astype(np.float16)
    got = narrow.view(np.float16)
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    assert_bitwise(got[~np.isnan(expected)], expected[~np.isnan(expected)], "float32 → float16")


@pytest.mark.skipif(not _cpu.HALF_IN_HARDWARE, reason="no hardware float16 conversion: NumPy converts")
@pytest.mark.parametrize("op, case", [(op, case) for op in OPS for case in
                                      ("contiguous", "channels_last", "strided", "out_fortran", "parallel",
                                       "parallel_channels_last")
                                      if "channels_last" not in case or OPS[op].kind == "channel"])
def test_float16_results_are_those_of_numpy_conversion(op, case, rng, monkeypatch):
    """float16 read and written by the kernels as half gives bitwise the results of NumPy's astype/copyto
    around the float32 kernels, forward and backward: a view of the output, and an out= that the plan
    cannot view (Fortran order), which goes through a temporary."""
    shape = (4, 6, 9, 5) if OPS[op].kind == "channel" else (6, 9, 5)
    if case.startswith("parallel"):     # ≥ SERIAL_BELOW elements: the parallel builds
        shape = (8, 6, 30, 30) if OPS[op].kind == "channel" else (48, 30, 30)
    x = rng.standard_normal(shape).astype(np.float16)
    dy = rng.standard_normal(shape).astype(np.float16)
    if case.endswith("channels_last"):
        x, dy = np.moveaxis(np.moveaxis(x, 1, -1).copy(), -1, 1), np.moveaxis(np.moveaxis(dy, 1, -1).copy(), -1, 1)
    elif case == "strided":
        x, dy = np.repeat(x, 2, axis=-1)[..., ::2], np.repeat(dy, 2, axis=-1)[..., ::2]
    extra = dict(groups=3) if op == "group_norm" else {}
    if OPS[op].kind == "channel":
        extra["axis"] = 1

    def run():
        out = np.empty(shape, np.float16, order="F") if case == "out_fortran" else None
        call = make_call(op, x, rng=np.random.default_rng(7), **extra, **({} if out is None else {"out": out}))
        y, ctx, _ = call.forward(fastnorm)
        assert out is None or y is out
        dx = call.backward(fastnorm, dy, ctx)[0]
        return y, dx

    fast = run()
    monkeypatch.setattr(_cpu, "HALF_IN_HARDWARE", False)
    slow = run()
    for name, a, b in zip(("y", "dx"), fast, slow):
        assert a.dtype == np.float16
        assert_bitwise(a, b, name)


@pytest.mark.parametrize("op", ["batch_norm", "layer_norm"])
@pytest.mark.parametrize("x_dtype, dy_dtype", [(np.float16, np.float32), (np.float16, np.float64),
                                               (np.float32, np.float16)])
def test_grad_output_of_another_dtype(op, x_dtype, dy_dtype, rng):
    """grad_output is taken in the input's compute dtype (float32 for float16 input), whatever its own:
    dx has the input's dtype and matches the reference on dy rounded so.  With half in hardware, float16
    and float32 meet in one kernel call (bits on one side)."""
    shape = (4, 6, 9, 5) if OPS[op].kind == "channel" else (6, 9, 5)
    x = rng.standard_normal(shape).astype(x_dtype)
    dy = rng.standard_normal(shape).astype(dy_dtype)
    call = make_call(op, x, rng=rng)
    _, ctx, _ = call.forward(fastnorm)
    _, ctx_ref, _ = call.forward(reference, input=x.astype(np.float64))
    dx = call.backward(fastnorm, dy, ctx)[0]
    assert dx.dtype == x_dtype
    dx_ref = call.backward(reference, dy.astype(np.float32).astype(np.float64), ctx_ref)[0]
    assert_close(dx, dx_ref)


@pytest.mark.skipif(not _cpu.HALF_IN_HARDWARE or platform.machine() not in ("x86_64", "AMD64"),
                    reason="needs an x86 CPU with F16C, to compile without it")
def test_float16_without_f16c_in_numbas_target_converts_with_numpy(tmp_path):
    """NUMBA_CPU_FEATURES without F16C: Numba's code may not use it (the half conversion would call an
    unlinked helper: a crash, measured), so HALF_IN_HARDWARE is False and NumPy converts."""
    from llvmlite import binding
    features = binding.get_host_cpu_features().flatten().replace("+f16c", "-f16c")
    env = dict(os.environ, NUMBA_CPU_FEATURES=features, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float16)
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy as np, fastnorm\nfrom fastnorm import _cpu\n"
              "assert not _cpu.HALF_IN_HARDWARE\n"
              "np.save(sys.argv[2], fastnorm.layer_norm(np.load(sys.argv[1]), (64,)))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == np.float16
    assert_close(y, reference.layer_norm(x.astype(np.float64), (64,)))
