"""Shared pieces of the asv suite: parameter values, seeded cached inputs, and the benchmark bodies.

Each op family module (``bench_<op>.py``) subclasses three bases from here:

* ``_Timing`` / ``_TimingEval``: ``time_forward`` (training), ``time_backward`` (training, from the
  context a forward saved), ``time_forward_eval`` (running statistics: BN, BRN, IN only) and
  ``track_bandwidth`` (GB/s of the training forward).
* ``_Memory``: ``peakmem_forward``, in a class of its own because asv reports the peak RSS of the whole
  process, setup included: a setup that also ran a backward would count ``dx`` and the context.
* ``_FirstCall``: ``timeraw_`` import + first call in a fresh interpreter, with a cold Numba cache (an
  empty temporary ``NUMBA_CACHE_DIR``: everything compiles) and a warm one (filled by ``setup()``).

Why it is built this way (asv 0.6.6 with asv_runner 0.3.2):

* every parameter combination runs in a fresh process, and ``setup()`` runs again before every timing
  sample (asv#966), so inputs and cases are cached per process (``functools.lru_cache``): only the
  first ``setup()`` pays for the random numbers and the compile;
* ``setup()`` calls each op once, so no ``time_`` sample includes the JIT compile or the cache load;
* only the public API of ``docs/api.md`` is used, so the suite can time any commit of fastnorm;
* base classes start with ``_`` because asv collects every public class of a module's namespace,
  imported ones included;
* ``asv.conf.json`` sets ``launch_method: forkserver``: the suite (NumPy, Numba, fastnorm, numba.cuda)
  is imported once and every benchmark process is forked from it.  ``--quick --dry-run`` of the
  batch norm class took 141-148 s with asv's default "spawn" and 40-66 s with forkserver here.
  That is also why ``numba.cuda`` is imported at the top (0.35 s, paid once, instead of in each CUDA
  combination's process); ``cuda.is_available()``, which creates a CUDA context, only runs in the forked
  benchmark process.  The fork is safe: the parent never runs a parallel kernel (OpenMP does not
  survive a fork after one).

A ``shape`` parameter such as ``"32x64x28x28"`` is the channels-first (N, C, spatial…) shape of the
problem; ``channels_last`` stores the same problem as (N, spatial…, C) and passes ``axis=-1``.
"""
import functools
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from numba import cuda

import fastnorm

# float16: read and written as half by the CPU kernels (bench --dtype float16 has the torch comparison)
DTYPES = ["float32", "float64", "float16"]
CHANNEL_LAYOUTS = ["channels_first", "channels_last"]
# layer/RMS norm normalize rows, so their layouts are about rows: "strided" is the first half of each
# row of a (…, 2·D) array — what ``np.split(h, 2, axis=-1)`` hands over — and times the path for
# non-contiguous input.
ROW_LAYOUTS = ["contiguous", "strided"]
BACKENDS = ["cpu", "cuda"]
GROUPS = 32         # group_norm runs gcd(GROUPS, C) groups: 32 on the standard shapes, C on tiny ones


@functools.lru_cache(maxsize=None)
def random_array(shape, dtype, seed=0):
    """Seeded standard normal numbers, drawn directly in ``dtype`` (a float64 temporary would show in
    ``peakmem_forward``); float16, which NumPy cannot draw, through a float32 temporary."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype) == np.float16:
        return rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
    return rng.standard_normal(shape, dtype=dtype)


def _no_sync():
    pass


class Case:
    """One op on one seeded input with its arguments bound: ``forward()`` (training), ``forward_eval()``,
    ``backward()`` (training).

    ``warm(*modes)`` calls each mode once (JIT compile or cache load); for ``"backward"`` it first runs
    the training forward that saves the context.  Training calls update the running statistics in
    place, as a training loop does.  On the ``cuda`` backend every array is a device array and each
    call ends with ``cuda.synchronize()`` so that the kernel time is counted.
    """

    def __init__(self, op, shape, dtype, layout, backend):
        shape = tuple(int(n) for n in shape.split("x"))
        if backend == "cuda":
            if not cuda.is_available():
                raise NotImplementedError("no CUDA device")      # asv shows the combination as skipped
            device, self.sync = cuda.to_device, cuda.synchronize
        else:
            device, self.sync = np.asarray, _no_sync
        self.device = device

        axis = 1
        if layout == "channels_last":
            if len(shape) == 2:
                raise NotImplementedError("a 2-D input is the same array in both layouts")
            x = device(random_array((shape[0],) + shape[2:] + shape[1:2], dtype))
            axis = -1
        elif layout == "strided":
            x = device(random_array(shape[:-1] + (2 * shape[-1],), dtype))[..., :shape[-1]]
        else:
            x = device(random_array(shape, dtype))
        self.nbytes = x.size * x.dtype.itemsize

        C = shape[-1] if op in ("layer_norm", "rms_norm") else shape[1]
        w = device(1.0 + 0.1 * random_array((C,), dtype, seed=1))
        b = device(0.1 * random_array((C,), dtype, seed=2))
        running_mean, running_var = device(np.zeros(C, dtype)), device(np.ones(C, dtype))
        stats = (x, running_mean, running_var, w, b)
        if op in ("batch_norm", "batch_renorm"):
            train, train_kw = stats, dict(training=True, axis=axis)
            self._eval = functools.partial(getattr(fastnorm, op), *stats, training=False, axis=axis)
        elif op == "instance_norm":
            train, train_kw = (x, None, None, w, b), dict(use_input_stats=True, axis=axis)
            self._eval = functools.partial(fastnorm.instance_norm, *stats, use_input_stats=False, axis=axis)
        elif op == "group_norm":
            train, train_kw = (x, math.gcd(GROUPS, C), w, b), dict(axis=axis)
        elif op == "layer_norm":
            train, train_kw = (x, (C,), w, b), {}
        elif op == "rms_norm":
            train, train_kw = (x, (C,), w), {}
        else:
            raise ValueError(f"unknown op {op!r}")
        self._train = functools.partial(getattr(fastnorm, op), *train, **train_kw)
        self._train_ctx = functools.partial(getattr(fastnorm, op + "_forward"), *train, **train_kw)
        self._backward = getattr(fastnorm, op + "_backward")
        self._warmed = set()

    def forward(self):
        self._train()
        self.sync()

    def forward_eval(self):
        self._eval()
        self.sync()

    def backward(self):
        self._backward(self.dy, self.ctx)
        self.sync()

    def warm(self, *modes):
        for mode in modes:
            if mode in self._warmed:
                continue
            if mode == "backward":
                y, self.ctx = self._train_ctx()
                self.dy = self.device(random_array(tuple(y.shape), np.dtype(y.dtype).name, seed=3))
            getattr(self, mode)()
            self._warmed.add(mode)

    def bandwidth(self, budget=0.1, max_calls=1000):
        """GB/s of the training forward over the best call of a ``budget``-second loop, counting 3 ×
        input bytes for every op (read x for the statistics, read x and write y to normalize): one fixed
        definition, so the figure compares across commits.  Where fastnorm fuses a per-sample group's
        passes (layer/RMS/instance norm, channels-first group norm) it moves 2 ×, so this reads 1.5 ×
        its real bandwidth; ``python -m fastnorm bench`` counts the plan's own traffic."""
        best = math.inf
        start = time.perf_counter()
        for calls in range(1, max_calls + 1):
            t0 = time.perf_counter()
            self.forward()
            t1 = time.perf_counter()
            best = min(best, t1 - t0)
            if calls >= 5 and t1 - start > budget:
                break
        return 3 * self.nbytes / best / 1e9


@functools.lru_cache(maxsize=None)
def get_case(op, shape, dtype, layout, backend):
    return Case(op, shape, dtype, layout, backend)


class _Timing:
    """``time_forward``, ``time_backward`` and ``track_bandwidth``; subclasses set ``op`` and ``params``."""

    param_names = ["shape", "dtype", "layout", "backend"]
    modes = ("forward", "backward")

    def setup(self, shape, dtype, layout, backend):
        self.case = get_case(self.op, shape, dtype, layout, backend)
        self.case.warm(*self.modes)

    def time_forward(self, *params):
        self.case.forward()

    def time_backward(self, *params):
        self.case.backward()

    def track_bandwidth(self, *params):
        return self.case.bandwidth()

    track_bandwidth.unit = "GB/s"


class _TimingEval(_Timing):
    """``_Timing`` plus ``time_forward_eval`` for the ops with running statistics (BN, BRN, IN)."""

    modes = ("forward", "backward", "forward_eval")

    def time_forward_eval(self, *params):
        self.case.forward_eval()


class _Memory:
    """``peakmem_forward``: peak RSS of a process that made its inputs and ran training forwards only."""

    param_names = ["shape", "dtype", "layout", "backend"]

    def setup(self, shape, dtype, layout, backend):
        self.case = get_case(self.op, shape, dtype, layout, backend)
        self.case.warm("forward")

    def peakmem_forward(self, *params):
        self.case.forward()


# Arguments of each op's first call in ``_FirstCall``, on x (4, 8, 8, 8) float32: the compile cost
# depends on the dtype and layout, not on the size.
FIRST_CALL_ARGS = {
    "batch_norm": "x, rm, rv, w, b, training=True",
    "batch_renorm": "x, rm, rv, w, b, training=True",
    "instance_norm": "x, None, None, w, b, use_input_stats=True",
    "group_norm": "x, 4, w, b",
    "layer_norm": "x, (8,), w, b",
    "rms_norm": "x, (8,), w",
}


class _FirstCall:
    """``import fastnorm`` and the first call(s) of one op, timed in a fresh interpreter.

    ``cold``: every sample gets a new empty ``NUMBA_CACHE_DIR``, so all its kernels compile (issue 5
    target: everything cold ≤ 30 s).  ``warm``: ``setup()`` runs the same code once to fill a cache
    that the samples then load (target: ≤ 0.5 s).  NumPy is imported and the input made in the
    untimed part; the timed part is ``import fastnorm`` (and so Numba) plus the calls.
    """

    params = [["cold", "warm"]]
    param_names = ["cache"]
    number = 1
    repeat = (1, 3, 60.0)
    warmup_time = 0       # a warm-up would be one more multi-second compile, and then not cold
    timeout = 600

    def setup(self, cache):
        self.root = tempfile.mkdtemp(prefix="fastnorm-asv-numba-")
        if cache == "warm":
            stmt, setup = self._code(cache, "forward_backward")
            subprocess.run([sys.executable, "-c", setup + stmt], check=True)

    def teardown(self, cache):
        shutil.rmtree(self.root, ignore_errors=True)

    def _code(self, cache, what):
        """(stmt, setup) source for asv's timeraw: setup picks the cache and makes the input, untimed."""
        if cache == "warm":
            cache_dir = repr(os.path.join(self.root, "warm"))
        else:
            cache_dir = f"tempfile.mkdtemp(dir={self.root!r})"
        setup = (
            "import os, tempfile\n"
            f"os.environ['NUMBA_CACHE_DIR'] = {cache_dir}\n"
            "import numpy as np\n"
            "x = np.random.default_rng(0).standard_normal((4, 8, 8, 8), dtype=np.float32)\n"
            "rm, rv, w, b = np.zeros(8, np.float32), np.ones(8, np.float32), np.ones(8, np.float32), "
            "np.zeros(8, np.float32)\n"
        )
        args = FIRST_CALL_ARGS[self.op]
        if what == "forward":
            stmt = f"import fastnorm\nfastnorm.{self.op}({args})\n"
        else:
            stmt = (f"import fastnorm\ny, ctx = fastnorm.{self.op}_forward({args})\n"
                    f"fastnorm.{self.op}_backward(y, ctx)\n")
        return stmt, setup

    def timeraw_forward(self, cache):
        return self._code(cache, "forward")

    def timeraw_forward_backward(self, cache):
        return self._code(cache, "forward_backward")
