"""Helpers of the CUDA tests: device arrays in every layout, and the kernel sizes the tests run with.

In the simulator every CUDA thread is a Python thread, so the sizes are shrunk to keep the run short
while every code path still runs on tiny shapes:

* ``THREADS`` = 8: every slot loop runs several slots per thread, elementwise blocks span several rows;
* ``MAX_BLOCKS`` = 2: the grid-stride loops over work units run;
* ``WIDTH`` = 16 reduction slots and ``TILE`` = 4 columns: the register batches of 4 and several
  column tiles run on lanes of ~100 elements (with 256 slots they need lanes of > 1024);
* ``SERIAL_MERGE`` = 2: stage 2 of lane reductions takes the block path for 3+ partials per group and
  the one-thread path for 1–2, so both run;
* the plan's ``CHUNK`` = 100 elements: reductions split into several partials, as 32768 does on real
  sizes.  CPU and GPU results in one test come from the same plan.

``test_sim_determinism.py`` also runs the production constants.  On a real GPU (``FASTNORM_TEST_GPU=1``)
WIDTH stays 256: it is compiled into the kernels.
"""
import contextlib
import os

import numpy as np
from numba import cuda

from fastnorm import _cuda, _plan

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

if SIM:
    TEST_CONFIG = dict(THREADS=8, MAX_BLOCKS=2, WIDTH=16, TILE=4, SERIAL_MERGE=2, CHUNK=100)
else:
    TEST_CONFIG = dict(THREADS=8, MAX_BLOCKS=2, TILE=4, SERIAL_MERGE=2, CHUNK=100)
PRODUCTION = dict(THREADS=256, MAX_BLOCKS=65535, WIDTH=256, TILE=32, SERIAL_MERGE=32, CHUNK=32768)


def _set(config):
    for k, v in config.items():
        if k == "CHUNK":
            _plan.CHUNK = v
            _plan._channel_view.cache_clear()     # plans are cached per shape
            _plan._row_view.cache_clear()
        else:
            setattr(_cuda, k, v)


@contextlib.contextmanager
def config(**new):
    old = {k: (_plan.CHUNK if k == "CHUNK" else getattr(_cuda, k)) for k in new}
    _set(new)
    try:
        yield
    finally:
        _set(old)


def to_device(v, layout):
    """Logical channels-first values → (device array, axis) laid out as ``cases.arrange`` lays out host ones."""
    if layout == "first":
        return cuda.to_device(np.ascontiguousarray(v)), 1
    if layout == "last":
        return cuda.to_device(np.ascontiguousarray(np.moveaxis(v, 1, -1))), -1
    if layout == "last_view":
        perm = (0, v.ndim - 1) + tuple(range(1, v.ndim - 1))
        return _cuda._transpose(cuda.to_device(np.ascontiguousarray(np.moveaxis(v, 1, -1))), perm), 1
    if layout == "middle":
        return cuda.to_device(np.ascontiguousarray(np.moveaxis(v, 1, 2))), 2
    if layout == "strided":
        base = np.zeros(v.shape[:-1] + (2 * v.shape[-1],), v.dtype)
        base[..., ::2] = v
        return cuda.to_device(base)[..., ::2], 1
    if layout == "fortran":
        return cuda.to_device(np.asfortranarray(v)), 1
    raise ValueError(layout)


def dev(a):
    """A host array → a device copy (None stays None)."""
    return None if a is None else cuda.to_device(np.ascontiguousarray(a))


def host(a):
    """A device result → NumPy (None stays None)."""
    return None if a is None else _cuda.to_host(a)


def is_device(a):
    return _plan.is_device(a)
