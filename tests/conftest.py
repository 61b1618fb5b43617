"""Test session set-up.

Numba's on-disk cache does not notice edits to a helper in another module (``_math.py`` inlined into
``_cpu.py`` kernels), so a stale cache could test old code: every session compiles into a fresh
temporary ``NUMBA_CACHE_DIR``.  It must be set here, at import time, before anything imports numba;
subprocesses started by the tests inherit it (and so load the kernels this session compiled).
"""
import atexit
import os
import shutil
import tempfile
import zlib

_CACHE_DIR = tempfile.mkdtemp(prefix="fastnorm-numba-cache-")
os.environ["NUMBA_CACHE_DIR"] = _CACHE_DIR
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# First calls compile (~15 s per dtype), so no deadline; no example database in the work tree.
settings.register_profile("fastnorm", deadline=None, database=None, print_blob=True)
settings.load_profile("fastnorm")


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: reproducible, different for every test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
