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

    import pytest  # noqa: E402

    import devcases  # noqa: E402

    @pytest.fixture(autouse=True)
    def small_kernels():
        """Every test runs with the shrunk kernel sizes of ``devcases`` (restored afterwards)."""
        with devcases.config(**devcases.TEST_CONFIG):
            yield
