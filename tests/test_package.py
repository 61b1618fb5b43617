"""Packaging: ``python -m fastnorm --version``; importing compiles nothing and does not import numba.cuda;
two processes starting at once on a cold cache both work; every parallel kernel compiles to one
parallel loop.

(First-call latency from a warm cache — ≤ 0.5 s including import — is a benchmark, not a test: it is
not timed here; what is tested is that a warm process loads its kernels without compiling and without
Numba's registry refresh, which was half of that latency.)
"""
import inspect
import json
import os
import subprocess
import sys

import numpy as np

import fastnorm
from cases import ROUNDING, assert_close

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _python(code, env=None, timeout=300):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_version_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "fastnorm", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert fastnorm.__version__ in proc.stdout
    assert fastnorm.__version__.count(".") >= 1


IMPORT_PROBE = """
import gc, json, sys
import numba.core.dispatcher
import fastnorm
dispatchers = {}
for obj in gc.get_objects():     # every Numba dispatcher of fastnorm, wherever it is kept
    if isinstance(obj, numba.core.dispatcher.Dispatcher) and obj.py_func.__module__.startswith("fastnorm"):
        dispatchers[f"{obj.py_func.__module__}.{obj.py_func.__qualname__}"] = len(obj.signatures)
print(json.dumps({"cuda": sorted(m for m in sys.modules if m == "numba.cuda" or m.startswith("numba.cuda.")),
                  "dispatchers": dispatchers,
                  "public": sorted(n for n in dir(fastnorm) if not n.startswith("_"))}))
"""


def test_import_compiles_nothing_and_skips_cuda():
    report = json.loads(_python(IMPORT_PROBE).strip().splitlines()[-1])
    assert report["cuda"] == [], "importing fastnorm imported numba.cuda"
    kernels = set(report["dispatchers"])
    assert {"fastnorm._cpu.moments", "fastnorm._cpu.apply", "fastnorm._cpu.backward_reduce",
            "fastnorm._cpu.normalize_groups", "fastnorm._cpu.backward_fused"} <= kernels, report["dispatchers"]
    compiled = {k: v for k, v in report["dispatchers"].items() if v}
    assert compiled == {}, f"compiled at import: {compiled}"
    for name in ("batch_norm", "batch_renorm", "instance_norm", "group_norm", "layer_norm", "rms_norm"):
        for suffix in ("", "_forward", "_backward"):
            assert name + suffix in report["public"]
    assert {"moments", "Moments"} <= set(report["public"])


COLD_START = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
import fastnorm
from fastnorm import reference
rng = np.random.default_rng(5)
x = rng.standard_normal((6, 4, 1500))     # 36000 elements: batch norm runs the parallel kernels
rm, rv = np.zeros(4), np.ones(4)
rm_ref, rv_ref = rm.copy(), rv.copy()
y = fastnorm.batch_norm(x, rm, rv, training=True)
w = rng.standard_normal(33)
small = x[:, :, :33]                      # layer norm of a small input: the serial builds
tiny = x[:2, :, :10]                      # batch norm of a tiny input: the one-call drivers
yt, ctx = fastnorm.batch_norm_forward(tiny, None, None, training=True)
yt_ref, ctx_ref = reference.batch_norm_forward(tiny, None, None, training=True, bias=np.zeros(4))
np.savez({out!r}, y=y, y_ref=reference.batch_norm(x, rm_ref, rv_ref, training=True, bias=np.zeros(4)),
         rm=rm, rm_ref=rm_ref, rv=rv, rv_ref=rv_ref,
         ln=fastnorm.layer_norm(small, (33,), w), ln_ref=reference.layer_norm(small, (33,), w),
         tiny=yt, tiny_ref=yt_ref, dtiny=fastnorm.batch_norm_backward(yt, ctx)[0],
         dtiny_ref=reference.batch_norm_backward(yt, ctx_ref)[0])
import numba.core.dispatcher
from fastnorm import _cpu, _math
kernels = [getattr(f, b) for f in vars(_cpu).values() if hasattr(f, "serial") for b in ("parallel", "serial")]
kernels += [f for f in vars(_math).values() if isinstance(f, numba.core.dispatcher.Dispatcher)]
kernels += [f for f in vars(_cpu).values() if isinstance(f, numba.core.dispatcher.Dispatcher) and f not in kernels]
print(json.dumps({{"used": sum(len(k.signatures) for k in kernels),
                  "hits": sum(sum(k.stats.cache_hits.values()) for k in kernels),
                  "misses": sum(sum(k.stats.cache_misses.values()) for k in kernels),
                  "registries_loaded": "numba.np.arraymath" in sys.modules,
                  "arrayobj_loaded": "numba.np.arrayobj" in sys.modules}}))
"""


def _check_cold_result(path):
    r = np.load(path)
    for name in ("y", "rm", "rv", "ln", "tiny", "dtiny"):
        assert_close(r[name], r[name + "_ref"], tol=ROUNDING, what=name)


def test_two_processes_on_a_cold_cache(tmp_path):
    """Both compile into the same empty NUMBA_CACHE_DIR at once; both must produce correct results, and a
    third process afterwards must load what they wrote and be correct too — without compiling, and
    without Numba's registry refresh (``_cpu._CacheLoad``: 0.2-0.4 s of a warm first call) and without
    importing numba.np.arrayobj (no kernel allocates or reshapes: +50 ms on a warm first call)."""
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    outs = [tmp_path / f"run{i}.npz" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", COLD_START.format(tests=TESTS_DIR, out=str(o))], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for o in outs[:2]]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    assert any(cache.rglob("*.nbi")), "the cold runs left no cache index"
    for o in outs[:2]:
        _check_cold_result(o)
    warm = json.loads(_python(COLD_START.format(tests=TESTS_DIR, out=str(outs[2])), env=env))
    _check_cold_result(outs[2])
    # batch norm: moments, forward_coefficients, apply (parallel); small layer norm: normalize_groups;
    # tiny batch norm: forward_small, backward_small
    assert warm == {"used": 6, "hits": 6, "misses": 0, "registries_loaded": False, "arrayobj_loaded": False}


def test_every_parallel_kernel_has_one_parallel_loop():
    """Each parallel CPU kernel keeps exactly one prange loop that Numba turned into a parallel loop
    (``_cpu._LOOPS``: each loop costs ~1.4 s of cold compile).  Guards the silent failure too: Numba
    leaves ``prange(a if c else b)`` serial without a warning while another prange remains.  Compiled
    afresh (uncached) from the signatures the calls below gave, since a cached load has no diagnostics."""
    from numba import njit

    from fastnorm import _cpu

    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 32, 32), dtype=np.float32)      # 131072 elements: the parallel builds
    for v, axis in ((x, 1), (np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1)):
        y, ctx = fastnorm.batch_norm_forward(v, None, None, training=True, axis=axis)
        fastnorm.batch_norm_backward(y, ctx)
        y, ctx = fastnorm.group_norm_forward(v, 4, axis=axis)
        fastnorm.group_norm_backward(y, ctx)
    fastnorm.batch_norm(x, np.zeros(16), np.ones(16), training=False)
    y, ctx = fastnorm.layer_norm_forward(x, (32,))
    fastnorm.layer_norm_backward(y, ctx)
    parallel = sorted(name for name in dir(_cpu) if hasattr(getattr(_cpu, name), "parallel"))
    assert parallel == ["apply", "backward_fused", "backward_reduce", "moments", "normalize_groups"]
    for name in parallel:
        kernel = getattr(_cpu, name).parallel
        assert kernel.signatures, name
        fresh = njit(**dict(_cpu._JIT, cache=False))(kernel.py_func)
        sig = kernel.signatures[0]
        fresh.compile(sig)
        assert fresh.overloads[sig].metadata["parfor_diagnostics"].count_parfors() == 1, name


def test_y_only_ops_show_their_forwards_signature():
    """fastnorm.batch_norm etc. take what batch_norm_forward takes; help() must say so, not (*args, **kwargs)."""
    for op in ("batch_norm", "batch_renorm", "instance_norm", "group_norm", "layer_norm", "rms_norm"):
        forward = getattr(fastnorm, op + "_forward")
        assert inspect.signature(getattr(fastnorm, op)) == inspect.signature(forward), op
        assert "*args" not in str(inspect.signature(getattr(fastnorm, op))), op
