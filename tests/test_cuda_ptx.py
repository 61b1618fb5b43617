"""Compile every CUDA kernel to PTX for a real GPU (sm_80) at float32 and float64, without a GPU.

The simulator runs the kernels as Python and checks no types; ``cuda.compile_ptx(..., cc=(8, 0))``
type-checks and compiles the real GPU code on a CPU-only machine (``numba-cuda[cu12]`` ships NVVM).
Runs in a subprocess so the main test process never imports numba.cuda.  Also checks the PTX has no
atomics (bitwise reproducibility) and no warp shuffles (the simulator cannot run them).
"""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                                reason="numba-cuda is not installed (pip install -e '.[cuda]')")

SCRIPT = textwrap.dedent("""
    import json, sys
    from numba import cuda
    from fastnorm import _cuda
    kernels = sorted(n for n, v in vars(_cuda).items() if type(v).__name__ == "CUDADispatcher")
    results, seen = [], set()
    for dtype in ("float32", "float64"):
        for kernel, sig in _cuda.signatures(dtype):
            name = kernel.py_func.__name__
            if (name, sig) in seen:          # the merge kernels are float64 at every input dtype
                continue
            seen.add((name, sig))
            try:
                ptx, _ = cuda.compile_ptx(kernel.py_func, sig, device=False, cc=(8, 0))
            except Exception as e:
                results.append(dict(name=name, sig=sig, error=f"{type(e).__name__}: {e}"[:3000]))
                continue
            results.append(dict(name=name, sig=sig, error=None, atomics=ptx.count("atom."),
                                shuffles=ptx.count("shfl."), fp64="f64" in ptx, entry=".entry" in ptx))
    print(json.dumps(dict(kernels=kernels, results=results)))
""")


def test_every_kernel_compiles_to_ptx():
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="fastnorm-ptx-cache-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        env.pop("NUMBA_ENABLE_CUDASIM", None)
        proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                              timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    results = report["results"]
    missing = set(report["kernels"]) - {r["name"] for r in results}
    assert not missing, f"kernels without a signature in _cuda.signatures: {sorted(missing)}"
    assert {"float32", "float64"} <= {d for r in results for d in ("float32", "float64") if f"{d}[::1]" in r["sig"]}
    failed = [f"{r['name']} {r['sig']}: {r['error']}" for r in results if r["error"]]
    assert not failed, "\n".join(failed)
    for r in results:
        assert r["entry"], r
        if r["name"] != "_copy8":      # statistics, sums and coefficients are float64 at every input dtype
            assert r["fp64"], f"{r['name']}: no float64 arithmetic in the PTX"
        assert r["atomics"] == 0, f"{r['name']}: atomics in the PTX break bitwise reproducibility"
        assert r["shuffles"] == 0, f"{r['name']}: warp shuffles cannot run in the simulator"
