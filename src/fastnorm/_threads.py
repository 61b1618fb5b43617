"""Choose a Numba threading layer that is safe for concurrent calls from Python threads.

Measured here: the OpenMP and TBB layers handle calls from several Python threads at once; Numba's
``workqueue`` layer aborts the process (SIGABRT) on concurrent parallel calls.  Numba falls back to
workqueue when neither TBB nor OpenMP loads, so unless the user chose a layer
(``NUMBA_THREADING_LAYER``), we ask for 'threadsafe' (TBB, else OpenMP) and only keep the default when
neither exists on the machine.

Fork caveat: with OpenMP (the usual layer on Linux), a child process forked *after* a parallel kernel
ran in the parent dies on its first parallel kernel.  Use ``multiprocessing`` with the 'spawn' or
'forkserver' start method, or import fastnorm only in the children.
"""
import os

from numba import config


def _available(module):
    try:
        __import__(f"numba.np.ufunc.{module}")
        return True
    except ImportError:
        return False


if "NUMBA_THREADING_LAYER" not in os.environ and config.THREADING_LAYER == "default":
    if _available("tbbpool") or _available("omppool"):
        config.THREADING_LAYER = "threadsafe"
