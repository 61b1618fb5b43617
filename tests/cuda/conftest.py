"""The CUDA backend's tests: in the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before numba is
imported — ``tests/test_cuda_sim.py`` runs this directory so, in a subprocess), or on a real GPU with
``FASTNORM_TEST_GPU=1``.  In any other pytest process these files are not collected, so the main suite
never imports numba.cuda.  Sizes: see ``devcases.py``.
"""
import os
import sys

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
GPU = os.environ.get("FASTNORM_TEST_GPU") == "1"

if not (SIM or GPU):
    collect_ignore_glob = ["*.py"]
else:
    if SIM:
        # Measured (issue 8): a syncthreads-heavy simulated kernel ran ~8x faster with a 0.1 ms switch
        # interval (~10 s → 1.25 s): simulated threads wait at barriers, and the default 5 ms idles them.
        sys.setswitchinterval(1e-4)

        # The simulator (numba-cuda 0.30) finds a block's shared array by the caller's file and line with
        # an unlocked check-then-set; when two threads of a block reach `cuda.shared.array` together,
        # both can miss and each gets a private "shared" array.  The block's reduction then merges slots
        # from an uninitialized buffer: results off by a few percent, in ~1 of 2 runs of this directory
        # (a different test each time, and never on hardware).  The same lookup under a lock:
        import threading

        import numpy as np

        from numba.core import types
        from numba.cuda.simulator import kernelapi
        from numba.np import numpy_support

        _shared_lock = threading.Lock()
        _simulator_array = kernelapi.FakeCUDAShared.array

        def _shared_array(self, shape, dtype, alignment=None):
            if alignment is not None or shape == 0:       # dynamic shared memory: no lookup to race
                return _simulator_array(self, shape, dtype, alignment)
            if isinstance(dtype, types.Type):
                dtype = numpy_support.as_dtype(dtype)
            caller = sys._getframe(1)
            key = (caller.f_code.co_filename, caller.f_lineno)
            with _shared_lock:
                if key not in self._allocations:
                    self._allocations[key] = np.empty(shape, dtype)
                return self._allocations[key]

        kernelapi.FakeCUDAShared.array = _shared_array

    import pytest  # noqa: E402

    import devcases  # noqa: E402

    @pytest.fixture(autouse=True)
    def small_kernels():
        """Every test runs with the shrunk kernel sizes of ``devcases`` (restored afterwards)."""
        with devcases.config(**devcases.TEST_CONFIG):
            yield
