"""``python -m fastnorm bench``: every op against the NumPy a user would write and ``torch.nn.functional``.

One table per run.  For each op and shape, in two modes — training forward (``fwd``) and training
forward + backward (``fwd+bwd``) — it shows:

* ``fastnorm ms``: the plain call, which allocates its output (``--out`` adds a separate, labelled
  column for a preallocated ``out=``);
* ``numpy ms``: the user-style NumPy formula, e.g. batch norm
  ``(x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps) * w + b``, and its
  textbook backward;
* ``torch ms``: ``torch.nn.functional`` on ``torch.from_numpy`` of the same arrays, when torch is
  importable (backward: ``torch.autograd.grad``; batch renorm has no torch peer, so its torch column is
  ``batch_norm``, the nearest one);
* ``fn/torch`` and ``np/fn``: the two ratios;
* ``GB/s`` and ``%copy``: fastnorm's bandwidth counting the minimal bytes each pass must move —
  fwd = 3 × input (read x for the statistics, read x and write y to normalize); fwd+bwd = 8 × input
  (that, plus the backward reduction reading dy and x, plus reading dy and x and writing dx) — or,
  where the plan fuses each group's passes (a per-sample group that fits in cache: layer/RMS/instance
  norm, channels-first group norm), fwd = 2 × (read x, write y) and fwd+bwd = 5 × (plus read dy and
  x, write dx); channels-last instance/group norm fuses its forward only (from 4 samples on: 2 × and
  7 ×) — as a percentage of the best copy bandwidth measured in the same process;
* ``missed``: which targets of issue 5 the row misses (see ``TARGETS``), each time target with the
  bandwidth meeting it would take, as % of copy (``_misses``);
* with ``--against PATH``, ``against ms`` and ``fn/against``: the same calls on another fastnorm tree
  (another checkout, another commit) imported beside this one (``_load_against``), so that a change is
  timed against its base in one process, interleaved — on a shared machine whose bandwidth moves 2×
  within minutes, two separate runs (or asv's one process per benchmark) cannot tell 10% apart.

Timing: the implementations run interleaved, in a rotating order, ``--repeat`` times; one sample is a
batch of back-to-back calls lasting ≥ 50 ms, and the table shows the median sample divided by the
calls in it.  The bench never changes the environment (threads, BLAS variables); the header prints
what is set.  ``--reuse-memory`` changes one thing in this process only, and the header says so:
glibc's allocator then reuses large freed blocks instead of mapping fresh pages (``_reuse_memory``).
PyTorch and tqdm are imported here only: neither is a runtime dependency of fastnorm (both come with
the ``bench`` extra).
"""
import argparse
import ctypes
import ctypes.util
import datetime
import functools
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time

import numba
import numpy as np

import fastnorm
from fastnorm import _plan

EPS = 1e-5
MOMENTUM = 0.1
GROUPS = 32                 # group_norm runs gcd(GROUPS, C) groups: 32 on the standard shapes
# A sample is ≥ 50 ms of back-to-back calls: after another column's sample, that library's OpenMP
# threads keep spinning for a while and slow the next column's first calls.  BN 4x8x8x8 fwd+bwd over
# three runs here: 56-63 µs with 5 ms samples, 49-51 µs with 50 ms samples.
MIN_SAMPLE_S = 0.05
COPY_BYTES = 256 << 20      # 8× the 32 MiB L3 of our 2-core VM: the copy streams from memory
TINY_BYTES = 1 << 20        # below this an input is "tiny": per-call overhead, not bandwidth

# Issue 5 targets.  Tiny inputs: fastnorm ≤ torch per call (in both modes).  Otherwise: fwd ≤ 0.5×
# torch, fwd+bwd ≤ 0.7× torch, ≥ 10× faster than NumPy, and inputs ≥ 32 MiB reach ≥ 70 % of the copy
# bandwidth.
TARGETS = {"tiny_vs_torch": 1.0, "fwd_vs_torch": 0.5, "fwdbwd_vs_torch": 0.7, "vs_numpy": 10.0,
           "copy_fraction": 0.70, "copy_min_bytes": 32 << 20}

CF, CL = "channels_first", "channels_last"
ROW_OPS = ("layer_norm", "rms_norm")
OPS = ("batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_renorm")
MODES = ("fwd", "fwd+bwd")

# The standard float32 shapes of issues 3 and 4, as stored (channels-last ones are (N, H, W, C)).
STANDARD = {
    "batch_norm": [((32, 64, 56, 56), CF), ((256, 256, 14, 14), CF), ((65536, 256), CF),
                   ((32, 56, 56, 64), CL)],
    "layer_norm": [((8192, 1024), CF), ((32, 197, 768), CF)],
    "rms_norm": [((8192, 1024), CF)],
    "group_norm": [((32, 64, 56, 56), CF), ((32, 56, 56, 64), CL)],
    "instance_norm": [((32, 64, 56, 56), CF)],
    "batch_renorm": [((32, 64, 56, 56), CF)],
}
TINY = [(4, 8, 8, 8), (16, 64)]
QUICK = [(16, 32, 32, 32), (4, 8, 8, 8), (16, 64)]


# ---------------------------------------------------------------- cases

def _parse_shape(text):
    try:
        shape = tuple(int(n) for n in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not like 32x64x56x56") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r} needs ≥ 2 positive dims")
    return shape


def _fits(op, shape):
    """instance_norm needs spatial dims; every other op takes any rank ≥ 2."""
    return op != "instance_norm" or len(shape) >= 3


def _cases(args):
    """[(op, shape, layout)] in table order; layout is None for layer/RMS norm (they normalize rows)."""
    cases, skipped = [], []
    for op in args.ops:
        if args.shapes or args.quick:
            todo = [(shape, args.layout or CF) for shape in (args.shapes or QUICK)]
        else:
            todo = [(s, lay) for s, lay in STANDARD[op] + [(t, CF) for t in TINY]
                    if args.layout is None or lay == args.layout or op in ROW_OPS]
        for shape, layout in todo:
            if _fits(op, shape):
                cases.append((op, shape, None if op in ROW_OPS else layout))
            else:
                skipped.append(f"{op} {_fmt_shape(shape)} (needs ≥ 3 dims)")
    return cases, skipped


def _fmt_shape(shape):
    return "x".join(map(str, shape))


# ---------------------------------------------------------------- the three implementations

def _numpy_plan(op, shape, axis, groups):
    """How user-style NumPy sees the op: (view shape, statistics axes, weight shape in the view,
    axes summed for dweight/dbias).  Group norm splits the channel axis into (G, C/G)."""
    nd = len(shape)
    if op in ROW_OPS:
        return shape, (nd - 1,), (1,) * (nd - 1) + shape[-1:], tuple(range(nd - 1))
    ch = axis % nd
    spatial = tuple(i for i in range(1, nd) if i != ch)
    pshape = tuple(n if i == ch else 1 for i, n in enumerate(shape))
    if op in ("batch_norm", "batch_renorm"):
        return shape, (0,) + spatial, pshape, (0,) + spatial
    if op == "instance_norm":
        return shape, spatial, pshape, (0,) + spatial
    C = shape[ch]
    view = shape[:ch] + (groups, C // groups) + shape[ch + 1:]
    spatial = tuple(i + (i > ch) for i in spatial)
    pshape = tuple(view[i] if i in (ch, ch + 1) else 1 for i in range(nd + 1))
    return view, (ch + 1,) + spatial, pshape, (0,) + spatial


def _numpy_impls(op, x, dy, w, b, running_mean, running_var, plan):
    """User-style NumPy: forward → y, forward+backward → (y, (dx, dweight[, dbias])), the textbook
    formulas in x's dtype (every column returns the same structure, so tests can compare them)."""
    view, stat, pshape, paxes = plan
    shape = x.shape          # group norm works on a (…, G, C/G, …) view and reshapes back (free)
    x, dy, w, b = x.reshape(view), dy.reshape(view), w.reshape(pshape), b.reshape(pshape)
    n = math.prod(view[i] for i in stat)
    rms_eps = np.finfo(x.dtype).eps

    def update_running(mean, var):
        running_mean[:] = (1 - MOMENTUM) * running_mean + MOMENTUM * mean.ravel()
        running_var[:] = (1 - MOMENTUM) * running_var + MOMENTUM * var.ravel() * n / (n - 1)

    def renorm_rd(mean, std_b):
        std = np.sqrt(running_var.reshape(pshape) + EPS)
        r = np.clip(std_b / std, 1 / 3.0, 3.0)                       # rmax = 3, dmax = 5: the defaults
        d = np.clip((mean - running_mean.reshape(pshape)) / std, -5.0, 5.0)
        return r, d

    if op == "rms_norm":
        def fwd():
            return x / np.sqrt((x * x).mean(stat, keepdims=True) + rms_eps) * w

        def fwd_bwd():
            rstd = 1 / np.sqrt((x * x).mean(stat, keepdims=True) + rms_eps)
            xhat = x * rstd
            y = xhat * w
            g = dy * w
            dx = rstd * (g - xhat * (g * xhat).mean(stat, keepdims=True))
            return y, (dx, (dy * xhat).sum(paxes).ravel())
        return fwd, fwd_bwd

    if op == "batch_renorm":
        def fwd():
            mean, var = x.mean(stat, keepdims=True), x.var(stat, keepdims=True)
            std_b = np.sqrt(var + EPS)
            r, d = renorm_rd(mean, std_b)
            update_running(mean, var)
            return ((x - mean) / std_b * r + d) * w + b

        def fwd_bwd():
            mean, var = x.mean(stat, keepdims=True), x.var(stat, keepdims=True)
            std_b = np.sqrt(var + EPS)
            r, d = renorm_rd(mean, std_b)
            update_running(mean, var)
            xhat_b = (x - mean) / std_b
            xhat = xhat_b * r + d
            y = xhat * w + b
            g = dy * w
            dx = r / std_b * (g - g.mean(stat, keepdims=True) - xhat_b * (g * xhat_b).mean(stat, keepdims=True))
            return y, (dx, (dy * xhat).sum(paxes).ravel(), dy.sum(paxes).ravel())
        return fwd, fwd_bwd

    running = op == "batch_norm"

    def fwd():
        mean, var = x.mean(stat, keepdims=True), x.var(stat, keepdims=True)
        if running:
            update_running(mean, var)
        return ((x - mean) / np.sqrt(var + EPS) * w + b).reshape(shape)

    def fwd_bwd():
        mean, var = x.mean(stat, keepdims=True), x.var(stat, keepdims=True)
        if running:
            update_running(mean, var)
        rstd = 1 / np.sqrt(var + EPS)
        xhat = (x - mean) * rstd
        y = xhat * w + b
        g = dy * w
        dx = rstd * (g - g.mean(stat, keepdims=True) - xhat * (g * xhat).mean(stat, keepdims=True))
        return y.reshape(shape), (dx.reshape(shape), (dy * xhat).sum(paxes).ravel(), dy.sum(paxes).ravel())
    return fwd, fwd_bwd


def _fastnorm_args(op, x, w, b, running_mean, running_var, axis, groups):
    if op in ("batch_norm", "batch_renorm"):
        return (x, running_mean, running_var, w, b), dict(training=True, momentum=MOMENTUM, eps=EPS, axis=axis)
    if op == "instance_norm":
        return (x, None, None, w, b), dict(use_input_stats=True, eps=EPS, axis=axis)
    if op == "group_norm":
        return (x, groups, w, b), dict(eps=EPS, axis=axis)
    if op == "layer_norm":
        return (x, x.shape[-1:], w, b), dict(eps=EPS)
    return (x, x.shape[-1:], w), {}                             # rms_norm: eps=None, machine epsilon


def _fastnorm_impls(op, x, dy, w, b, running_mean, running_var, axis, groups, out=None, module=fastnorm):
    """{mode: callable}; with ``out`` (a preallocated y), every forward writes into it.  ``module``: this
    fastnorm, or the ``--against`` tree."""
    args, kwargs = _fastnorm_args(op, x, w, b, running_mean, running_var, axis, groups)
    if out is not None:
        kwargs["out"] = out
    forward, backward = getattr(module, op + "_forward"), getattr(module, op + "_backward")

    def fwd_bwd():
        y, ctx = forward(*args, **kwargs)
        return y, backward(dy, ctx)

    return {"fwd": functools.partial(getattr(module, op), *args, **kwargs), "fwd+bwd": fwd_bwd}


AGAINST = "fastnorm_against"        # the module name of the --against tree


def _load_against(path):
    """The fastnorm package of another tree — ``path`` is a checkout or its ``src/fastnorm`` — imported
    beside this one as ``fastnorm_against``.  Its modules import each other relatively, so the two
    never mix; each compiles and caches its own kernels (Numba's cache follows the source files)."""
    package = os.path.abspath(path)
    if not os.path.isfile(os.path.join(package, "__init__.py")):
        package = os.path.join(package, "src", "fastnorm")
    init = os.path.join(package, "__init__.py")
    if not os.path.isfile(init):
        raise FileNotFoundError(f"--against {path}: no fastnorm package there (looked for {init})")
    spec = importlib.util.spec_from_file_location(AGAINST, init, submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules[AGAINST] = module
    spec.loader.exec_module(module)
    return module


def _torch_impls(torch, op, x, dy, w, b, running_mean, running_var, perm, groups):
    """torch.nn.functional on from_numpy views; ``perm`` turns a channels-last array into the
    (N, C, spatial…) view torch expects, which torch runs as a channels_last tensor."""
    F = torch.nn.functional

    def call(xt, wt, bt):
        if op in ("batch_norm", "batch_renorm"):
            return F.batch_norm(xt, rm, rv, wt, bt, training=True, momentum=MOMENTUM, eps=EPS)
        if op == "instance_norm":
            return F.instance_norm(xt, None, None, wt, bt, use_input_stats=True, eps=EPS)
        if op == "group_norm":
            return F.group_norm(xt, groups, wt, bt, eps=EPS)
        if op == "layer_norm":
            return F.layer_norm(xt, xt.shape[-1:], wt, bt, eps=EPS)
        return F.rms_norm(xt, xt.shape[-1:], wt)

    rm, rv = torch.from_numpy(running_mean), torch.from_numpy(running_var)
    xt, wt, bt = torch.from_numpy(x).permute(perm), torch.from_numpy(w), torch.from_numpy(b)
    dyt = torch.from_numpy(dy).permute(perm)
    xg = torch.from_numpy(x).requires_grad_().permute(perm)
    wg, bg = torch.from_numpy(w).requires_grad_(), torch.from_numpy(b).requires_grad_()
    inputs = (xg, wg) if op == "rms_norm" else (xg, wg, bg)

    def fwd_bwd():
        y = call(xg, wg, bg)
        return y, torch.autograd.grad(y, inputs, dyt)

    return {"fwd": functools.partial(call, xt, wt, bt), "fwd+bwd": fwd_bwd}


def _setup(op, shape, layout, dtype, torch, out, against=None):
    """Seeded inputs, then {column: {mode: callable}} for one case.  Each column gets its own running
    statistics (training updates them in place).  ``against``: the --against module, or None."""
    rng = np.random.default_rng(0)
    nd = len(shape)
    axis = -1 if layout == CL else 1
    C = shape[-1] if op in ROW_OPS else shape[axis]
    groups = math.gcd(GROUPS, C)

    def randn(*s):
        return rng.standard_normal(s, dtype=np.float32).astype(dtype)

    def running():
        return np.zeros(C, dtype), np.ones(C, dtype)

    x, dy = randn(*shape), randn(*shape)
    w, b = 1 + 0.1 * randn(C), 0.1 * randn(C)
    columns = {"fastnorm": _fastnorm_impls(op, x, dy, w, b, *running(), axis, groups)}
    if against is not None:
        columns["against"] = _fastnorm_impls(op, x, dy, w, b, *running(), axis, groups, module=against)
    if out:
        columns["fastnorm_out"] = _fastnorm_impls(op, x, dy, w, b, *running(), axis, groups, np.empty_like(x))
    columns["numpy"] = dict(zip(MODES, _numpy_impls(op, x, dy, w, b, *running(),
                                                    _numpy_plan(op, shape, axis, groups))))
    if torch is not None:
        perm = (0, nd - 1) + tuple(range(1, nd - 1)) if layout == CL else tuple(range(nd))
        columns["torch"] = _torch_impls(torch, op, x, dy, w, b, *running(), perm, groups)
    return columns, groups, x.nbytes, _traffic(op, x, axis, groups)


def _traffic(op, x, axis, groups):
    """{mode: bytes moved as a multiple of the input}: 2 and 5 where fastnorm's plan fuses the passes of
    each group (it is read from memory once and reused from cache), 3 and 8 otherwise; 2 and 7 where
    only the forward is fused (channels-last samples: the backward takes its two passes)."""
    if op in ROW_OPS:
        view = _plan.row_view(x, 1)
    else:
        kind = {"instance_norm": "instance", "group_norm": "group"}.get(op, "batch")
        view = _plan.channel_view(x, axis % x.ndim, kind, groups if kind == "group" else None)
    if not view.fused:
        return {"fwd": 3, "fwd+bwd": 8}
    return {"fwd": 2, "fwd+bwd": 5 if view.lane else 7}


def _run_case(op, shape, layout, args, torch, bar, against=None):
    """The rows of one case; its arrays are freed on return, before the next case allocates."""
    columns, groups, input_bytes, traffic = _setup(op, shape, layout, args.dtype, torch, args.out, against)
    rows = []
    for mode in MODES:
        bar.set_description(f"{op} {_fmt_shape(shape)} {mode}")
        samples, numbers = _measure({name: impls[mode] for name, impls in columns.items()}, args.repeat)
        rows.append(_row(op, shape, layout, mode, args.dtype, groups, input_bytes, traffic[mode], samples,
                         numbers))
        bar.update()
    return rows


# ---------------------------------------------------------------- timing

def _sample(fn, number):
    """Seconds per call of ``number`` back-to-back calls, with the garbage collector off (as timeit)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) / number
    finally:
        if gc_was_enabled:
            gc.enable()


def _measure(fns, repeat):
    """{name: [seconds per call]}: calls are warmed up and batched to ≥ MIN_SAMPLE_S, then the
    implementations are interleaved in a rotating order so that drift hits them alike."""
    numbers = {}
    for name, fn in fns.items():
        fn()                                                   # compile / first-touch allocations
        numbers[name] = max(1, math.ceil(MIN_SAMPLE_S / _sample(fn, 1)))
    names = list(fns)
    samples = {name: [] for name in names}
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(_sample(fns[name], numbers[name]))
    return samples, numbers


# glibc maps every block of ≥ 32 MiB afresh (its mmap threshold stops adapting there) and the kernel
# zeroes those pages on first touch, at every call that allocates one.  torch's layer norm of (8192,
# 1024) float32, which returns a new 32 MiB tensor, took 11.8-12.8 ms per call here by default and
# 2.3-3.3 ms after raising the thresholds; across three default bench runs its time swung 3.2-12.6 ms.
# fastnorm reuses its large outputs itself (``_plan.new_array``); NumPy's temporaries pay the same as
# torch.  With the thresholds raised, every column times its kernels rather than the allocator.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3           # mallopt parameters (malloc.h)
REUSE_THRESHOLD = 1 << 30


def _reuse_memory():
    """Raise glibc's mmap and trim thresholds to 1 GiB in this process (``mallopt``): freed blocks below
    that stay in the heap and are handed out again.  False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, REUSE_THRESHOLD)
                and libc.mallopt(M_TRIM_THRESHOLD, REUSE_THRESHOLD))


def _copy_bandwidth(repeat=10):
    """Best copy GB/s (bytes = 2 × size) of a 256 MiB array: single-thread ``np.copyto`` and a prange
    copy on Numba's threads (on a 2-core VM the latter was 14 % faster, 30.3 vs 26.6 GB/s; taking the
    better one keeps %copy honest).  ``main`` measures it before and after the ops and keeps the best:
    on our VM the figure moved from 30.0 to 24.6 GB/s between two runs minutes apart."""
    @numba.njit(parallel=True)
    def parallel_copy(dst, src):
        for i in numba.prange(src.size):
            dst[i] = src[i]

    src = np.ones(COPY_BYTES // 4, np.float32)
    dst = np.empty_like(src)
    result = {}
    for name, fn in (("np.copyto", lambda: np.copyto(dst, src)),
                     ("prange", lambda: parallel_copy(dst, src))):
        fn()                                                   # first touch of dst, and the compile
        result[name] = 2 * src.nbytes / min(_sample(fn, 1) for _ in range(repeat)) / 1e9
    return result


# ---------------------------------------------------------------- rows, header, table

def _misses(row, copy_gbps):
    """The targets a row misses.  A missed time target of a non-tiny row carries the bandwidth it would
    take, as % of the copy bandwidth: ``torch≤0.5(139%)`` — meeting it means moving the plan's bytes at
    1.39× copy speed, out of reach unless the input stays in the last-level cache."""
    misses = []
    tiny = row["input_bytes"] < TINY_BYTES

    def needs(ms):        # % of copy bandwidth that moving the row's bytes in ``ms`` takes
        return "" if tiny else f"({100 * row['bytes_moved'] / (ms * 1e6) / copy_gbps:.0f}%)"

    if row["fastnorm_over_torch"] is not None:
        key = "tiny_vs_torch" if tiny else "fwd_vs_torch" if row["mode"] == "fwd" else "fwdbwd_vs_torch"
        limit = TARGETS[key]
        if row["fastnorm_over_torch"] > limit:
            misses.append(f"torch≤{limit:g}" + needs(limit * row["torch_ms"]))
    if not tiny and row["numpy_over_fastnorm"] < TARGETS["vs_numpy"]:
        misses.append(f"numpy≥{TARGETS['vs_numpy']:g}" + needs(row["numpy_ms"] / TARGETS["vs_numpy"]))
    if row["input_bytes"] >= TARGETS["copy_min_bytes"] and row["pct_copy"] < 100 * TARGETS["copy_fraction"]:
        misses.append(f"copy≥{100 * TARGETS['copy_fraction']:.0f}%")
    return misses


def _row(op, shape, layout, mode, dtype, groups, input_bytes, passes, samples, numbers):
    ms = {name: 1e3 * statistics.median(s) for name, s in samples.items()}
    moved = passes * input_bytes
    gbps = moved / ms["fastnorm"] / 1e6
    row = {
        "op": op, "shape": list(shape), "layout": layout, "groups": groups if op == "group_norm" else None,
        "mode": mode, "dtype": dtype, "input_bytes": input_bytes, "bytes_moved": moved,
        "fastnorm_ms": ms["fastnorm"], "numpy_ms": ms["numpy"], "torch_ms": ms.get("torch"),
        "fastnorm_over_torch": ms["fastnorm"] / ms["torch"] if "torch" in ms else None,
        "numpy_over_fastnorm": ms["numpy"] / ms["fastnorm"],
        "gbps": gbps,
        "samples_ms": {name: [1e3 * t for t in s] for name, s in samples.items()},
        "calls_per_sample": numbers,
    }
    if "fastnorm_out" in ms:
        row["fastnorm_out_ms"] = ms["fastnorm_out"]
    if "against" in ms:
        row["against_ms"] = ms["against"]
        row["fastnorm_over_against"] = ms["fastnorm"] / ms["against"]
    return row


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _header(torch, copy, args, against=None):
    env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "NUMBA_NUM_THREADS",
                                          "OMP_NUM_THREADS")}
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
        "torch": torch.__version__ if torch is not None else None, "fastnorm": fastnorm.__version__,
        "numba_threads": numba.get_num_threads(), "numba_threading_layer": numba.threading_layer(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "env": env, "copy_gbps": max(copy.values()), "copy_gbps_by_method": copy,
        "dtype": args.dtype, "repeat": args.repeat, "statistic": "median",
        "malloc": f"mmap/trim thresholds {REUSE_THRESHOLD >> 20} MiB" if args.reuse_memory else "default",
        "targets": TARGETS,
        "against": None if against is None else {"path": os.path.dirname(against.__file__),
                                                 "fastnorm": against.__version__},
    }


def _fmt_ms(v):
    return "—" if v is None else f"{v:.3g}" if v < 1 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _fmt_ratio(v):
    return "—" if v is None else f"{v:.2f}" if v < 10 else f"{v:.0f}"


def _table(header, rows, skipped, out):
    h = header
    lines = [
        f"fastnorm {h['fastnorm']} bench · {h['date']}",
        f"CPU {h['cpu']} · {h['logical_cpus']} logical CPUs ({h['usable_cpus']} usable) · "
        f"numba {h['numba_threads']} threads ({h['numba_threading_layer']}) · "
        f"torch {h['torch_threads'] if h['torch'] else '—'} threads",
        f"python {h['python']} · numpy {h['numpy']} · numba {h['numba']} · "
        f"torch {h['torch'] or 'not installed'}",
        "env: " + " · ".join(f"{k}={'unset' if v is None else repr(v)}" for k, v in h["env"].items()),
        f"copy bandwidth {h['copy_gbps']:.1f} GB/s (best of: "
        + ", ".join(f"{k} {v:.1f}" for k, v in h["copy_gbps_by_method"].items())
        + "; 256 MiB, bytes = 2 × size, best before and after the ops)",
        f"{h['dtype']} · median of {h['repeat']} interleaved samples, each ≥ {1e3 * MIN_SAMPLE_S:.0f} ms of "
        "back-to-back calls · fastnorm = plain call (allocates y) · glibc malloc: " + h["malloc"]
        + (" (--reuse-memory)" if h["malloc"] != "default" else ""),
        "",
    ]
    against = h.get("against")
    cols = ["op", "shape", "axis", "mode", "fastnorm ms"] + (["out= ms"] if out else []) + (
        ["against ms", "fn/against"] if against else []) + [
        "numpy ms", "torch ms", "fn/torch", "np/fn", "GB/s", "%copy", "missed"]
    table = []
    for r in rows:
        op = r["op"] + (f" G={r['groups']}" if r["groups"] else "")
        axis = "" if r["layout"] is None else "1" if r["layout"] == CF else "-1"
        cells = [op, _fmt_shape(r["shape"]), axis, r["mode"], _fmt_ms(r["fastnorm_ms"])]
        if out:
            cells.append(_fmt_ms(r["fastnorm_out_ms"]))
        if against:
            cells += [_fmt_ms(r["against_ms"]), _fmt_ratio(r["fastnorm_over_against"])]
        cells += [_fmt_ms(r["numpy_ms"]), _fmt_ms(r["torch_ms"]), _fmt_ratio(r["fastnorm_over_torch"]),
                  _fmt_ratio(r["numpy_over_fastnorm"]), f"{r['gbps']:.1f}", f"{r['pct_copy']:.0f}",
                  ",".join(r["missed"])]
        table.append(cells)
    widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(cols)]     # table may be empty
    numeric = set(range(4, len(cols) - 1))
    for cells in [cols] + table:
        lines.append("  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                               for i, (c, w) in enumerate(zip(cells, widths))).rstrip())
    t = TARGETS
    lines += [
        "",
        "bytes moved (minimal): fwd = 3 × input, fwd+bwd = 8 × input (2 × and 5 × where each group's passes "
        "are fused: layer/RMS/instance norm, channels-first group norm; 2 × and 7 × for channels-last "
        "instance/group norm from 4 samples on, whose forward only is fused); an input that fits in the "
        "last-level cache can pass 100 % copy (later passes re-read it from cache).",
        f"missed: issue 5 targets — "
        f"fwd ≤ {t['fwd_vs_torch']}× torch, fwd+bwd ≤ {t['fwdbwd_vs_torch']}× torch, "
        f"≥ {t['vs_numpy']:g}× numpy, "
        f"≥ {100 * t['copy_fraction']:.0f}% copy for inputs ≥ {t['copy_min_bytes'] >> 20} MiB; "
        f"inputs < {TINY_BYTES >> 20} MiB: ≤ torch per call.  (N%): the bandwidth, as % of copy, that a "
        "missed time target takes (over 100%: out of reach unless the input stays in cache).",
    ]
    if any(r["op"] == "batch_renorm" for r in rows):
        lines.append("batch_renorm: the torch column is torch batch_norm (torch has no batch renorm).")
    if out:
        lines.append("out= ms: fastnorm with a preallocated out= (the forward's output), not the default call.")
    if against:
        lines.append(f"against ms: the same calls on the fastnorm {against['fastnorm']} tree at {against['path']}, "
                     "interleaved with this one in this process; fn/against < 1: this tree is faster.")
    lines += [f"skipped: {s}" for s in skipped]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line

def _parser():
    p = argparse.ArgumentParser(
        prog="python -m fastnorm bench",
        description="Time every op (training forward, and forward+backward) against user-style NumPy "
                    "and torch.nn.functional, with GB/s against a copy measured in the same process.")
    p.add_argument("--ops", type=lambda s: s.split(","), default=list(OPS),
                   help=f"comma-separated subset of {','.join(OPS)} (default: all)")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--shapes", type=lambda s: [_parse_shape(t) for t in s.split(",")],
                       help="comma-separated shapes as stored, e.g. 32x64x56x56,32x56x56x64 "
                            "(default: the standard shapes of issues 3 and 4, plus 4x8x8x8 and 16x64)")
    sizes.add_argument("--quick", action="store_true",
                       help=f"small shapes only: {', '.join(map(_fmt_shape, QUICK))}")
    p.add_argument("--layout", choices=(CF, CL),
                   help="channel layout of --shapes for batch/instance/group norm and batch renorm "
                        "(channels_last: channels on the last axis, axis=-1); without --shapes, keep only "
                        "the standard cases of that layout")
    p.add_argument("--dtype", choices=("float32", "float64", "float16"), default="float32")
    p.add_argument("--repeat", type=int, default=5, help="interleaved samples per implementation (default 5)")
    p.add_argument("--out", action="store_true",
                   help="add a column timing fastnorm with a preallocated out= (the default column "
                        "stays the plain call)")
    p.add_argument("--reuse-memory", action="store_true",
                   help="raise glibc's mmap/trim thresholds in this process, so that large freed blocks "
                        "(NumPy's temporaries, torch's outputs) are reused instead of mapped and zeroed "
                        "afresh at every call: times kernels, not the allocator (glibc only)")
    p.add_argument("--against", metavar="PATH",
                   help="also time another fastnorm tree (a checkout or its src/fastnorm, e.g. a git "
                        "worktree of the base commit) in this process, interleaved: columns 'against ms' "
                        "and 'fn/against'")
    p.add_argument("--json", metavar="PATH", help="also write the header and every row (with all samples) here")
    return p


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    unknown = sorted(set(args.ops) - set(OPS))
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    if args.repeat < 1:
        parser.error("--repeat must be ≥ 1")
    if args.reuse_memory and not _reuse_memory():
        parser.error("--reuse-memory needs glibc's mallopt")
    try:
        from tqdm import tqdm
    except ImportError:
        sys.exit("python -m fastnorm bench needs tqdm: pip install 'fastnorm[bench]'")
    try:
        import torch
    except ImportError:
        torch = None
    try:
        against = None if args.against is None else _load_against(args.against)
    except FileNotFoundError as e:
        parser.error(str(e))

    cases, skipped = _cases(args)
    copy = _copy_bandwidth()
    rows = []
    with tqdm(total=len(cases) * len(MODES), unit="row", disable=None) as bar:
        for op, shape, layout in cases:
            rows += _run_case(op, shape, layout, args, torch, bar, against)
    after = _copy_bandwidth()
    copy = {name: max(gbps, after[name]) for name, gbps in copy.items()}
    for row in rows:
        row["pct_copy"] = 100 * row["gbps"] / max(copy.values())
        row["missed"] = _misses(row, max(copy.values()))

    header = _header(torch, copy, args, against)
    print(_table(header, rows, skipped, args.out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows, "skipped": skipped}, f, indent=1)
    return 0
