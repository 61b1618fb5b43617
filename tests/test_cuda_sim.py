"""The CUDA backend in the main suite: ``tests/cuda`` in the CUDA simulator (a subprocess, since
``NUMBA_ENABLE_CUDASIM`` must be set before numba is imported), and what happens without a GPU."""
import importlib.util
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

needs_numba_cuda = pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                                      reason="numba-cuda is not installed (pip install -e '.[cuda]')")


def _run(args, **env):
    with tempfile.TemporaryDirectory(prefix="fastnorm-cuda-cache-") as cache:
        full_env = dict(os.environ, NUMBA_CACHE_DIR=cache, **env)
        full_env.pop("FASTNORM_TEST_GPU", None)
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                              timeout=900)


@needs_numba_cuda
def test_cuda_simulator_suite():
    """Every op on device arrays vs the CPU backend and the reference, bitwise reproducibility, errors
    (~2 minutes: each simulated CUDA thread is a Python thread)."""
    proc = _run(["-m", "pytest", "tests/cuda", "-q", "-p", "no:cacheprovider", "-x"], NUMBA_ENABLE_CUDASIM="1")
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"tests/cuda failed in the CUDA simulator:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail


def test_import_does_not_import_numba_cuda():
    proc = _run(["-c", "import sys, fastnorm, fastnorm.functional, fastnorm._plan; "
                       "print('numba.cuda' in sys.modules)"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@needs_numba_cuda
def test_device_arrays_without_a_gpu_are_one_clear_runtime_error():
    """A ``__cuda_array_interface__`` object on a machine where CUDA cannot run (this one, outside the
    simulator): one RuntimeError saying so, from every op."""
    code = textwrap.dedent("""
        import numpy as np, fastnorm

        class FakeDeviceArray:
            def __init__(self, a):
                self.shape, self.strides, self.dtype, self.size, self.ndim = a.shape, a.strides, a.dtype, a.size, a.ndim
                self.__cuda_array_interface__ = dict(shape=a.shape, strides=None, typestr=a.dtype.str,
                                                     data=(0, False), version=3)

        x = FakeDeviceArray(np.ones((2, 3, 4), np.float32))
        calls = [lambda: fastnorm.batch_norm(x, None, None, training=True), lambda: fastnorm.layer_norm(x, (4,)),
                 lambda: fastnorm.group_norm(x, 3), lambda: fastnorm.moments(x)]
        for call in calls:
            try:
                call()
            except RuntimeError as e:
                assert "CUDA" in str(e), e
                print("RuntimeError:", e)
            else:
                raise AssertionError("no error")
    """)
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("RuntimeError:") == 4, proc.stdout
