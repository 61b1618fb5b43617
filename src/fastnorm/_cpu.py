"""CPU kernel family: ``@njit(parallel=True)`` kernels on a contiguous 3-D view ``x3 = (P, Q, L)``.

Every norm is one of two reduction shapes over that view (``_plan.py`` picks the view, never the kernel):

* *lane*: a group is the contiguous lane ``x3[p, q, :]`` (channels-first BN/IN/GN: ``(N, C, H·W)``;
  layer/RMS norm: ``(1, rows, D)``).
* *column*: a group is ``cg`` adjacent columns of the rows ``x3[p, :, :]`` (channels-last
  ``(N, H·W, C)``; batch norm flattens the batch into the rows, ``(1, N·H·W, C)``).

The family: ``moments`` (per-group mean and M2), ``backward_reduce`` (Σdy, Σdy·x̂), ``apply`` (y or dx
from per-group coefficients; ``normalize`` and ``backward_apply`` call it, the interface ``_cuda``
shares); and, for per-sample groups that fit in cache, the same formulas fused group by group:
``normalize_groups`` (2 passes over memory, not 3; the lane groups of layer/RMS/instance norm and
channels-first group norm, and whole samples of channels-last instance/group norm) and
``backward_fused`` (3, not 5; the lane groups).
``forward_small``/``backward_small`` run one whole forward/backward of an input below ``SERIAL_BELOW``
in a single call: the serial builds of the kernels and the coefficient algebra of ``_math``, in order.
float16 data arrives as its bits (uint16); every kernel reads and writes data through ``load``/``store``.

Batch norm additionally merges the groups of every ``p``.  Apply kernels use one of three coefficient
layouts (``LANE``: one value per lane ``[p, q]``; ``COLUMN``: a vector per column ``[p, l]``; ``ROW``:
per-row scalars times per-column weight/bias, for layer/RMS norm).  A coefficient array whose first
dimension is 1 is broadcast over ``p``.

Determinism: every reduction is cut into chunks whose size follows the problem (``chunk`` from the
plan), never the thread count; each prange iteration writes its own partial, and partials are merged
serially in a fixed order.  ``NUMBA_NUM_THREADS=1`` and ``=2`` therefore give bitwise identical results.

Kernels never allocate and never validate: ``_plan.py`` does both, once.

Precision: every value is computed in float64.  x, dy and weight/bias arrive in the input's dtype
(float32 for float32 input: ``functional._vector``; float16 x and dy load as float32, its weight/bias
are float32), so a product of two of them must take a float64 factor first — Numba computes
float32·float32 in float32.
"""
import platform
import types

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba import types as nbtypes
from numba.core import config
from numba.core.caching import FunctionCache
from numba.core.codegen import get_host_cpu_features
from numba.core.runtime import rtsys
from numba.extending import intrinsic, overload

from ._math import backward_coefficients, dx_coefficients, forward_coefficients, merge_into, update_running

# reassoc lets LLVM split the float64 sums into vector lanes (3-4x on the stats pass in our
# measurements); the order it picks is fixed by the compiled code, not by the thread count, so results
# stay bitwise reproducible.  No nnan/ninf: NaN and inf must reach the group's output.  cache=True: a
# warm process loads the kernels in ~0.3 s instead of compiling them again (~1.2 s each, cold).
# error_model='numpy': float division follows IEEE (a constant group with eps = 0 gives 1/0 = inf, then
# NaN, as in PyTorch) instead of raising ZeroDivisionError from inside a kernel.
_JIT = dict(parallel=True, cache=True, nogil=True, error_model="numpy", fastmath={"reassoc", "contract"})

LANE, COLUMN, ROW = 0, 1, 2

# Below this many elements a kernel runs on the calling thread, compiled without prange: waking the
# pool costs ~5 µs on an idle machine and 20 µs to 1 ms on a busy one, and even a one-thread parallel
# region costs ~3 µs per prange loop (measured on 2 cores, (4, 8, 8, 8) float32: 155 µs parallel vs
# 11 µs one-thread parallel on a loaded machine).  Same source, same chunks, same merge order; the path
# depends only on the size, so a given input always takes the same one (bitwise reproducible).
SERIAL_BELOW = 1 << 15


class _CacheLoad(FunctionCache):
    """Numba's on-disk cache without the registry refresh on load.

    ``FunctionCache.load_overload`` first refreshes the target context: it imports and installs every
    typing and lowering registry Numba has (~300 modules, and ``numba.np.linalg`` imports scipy.linalg),
    0.2-0.4 s of a warm process's first call here, of 0.85 s in all.  Cached machine code needs none of
    it, only the NRT (initialized below).  A cache miss still compiles through Numba's compiler, which
    refreshes the context itself.  (Measured: warm fresh process to first batch_norm 0.85 → 0.5 s.)
    """

    def load_overload(self, sig, target_context):
        rtsys.initialize(target_context)
        with self._guard_against_spurious_io_errors():
            return self._load_overload(sig, target_context)


def _cached(dispatcher):
    # Only where the dispatcher still holds the FunctionCache this class was written against; a
    # different Numba keeps its own (slower, equally correct) cache.
    if type(getattr(dispatcher, "_cache", None)) is FunctionCache and hasattr(FunctionCache, "_load_overload"):
        dispatcher._cache = _CacheLoad(dispatcher.py_func)
    return dispatcher


def _serial_if_small(parallel):
    """Wrap a parallel kernel with a serial build of the same Python function (its own cache file)."""
    _cached(parallel)
    f = parallel.py_func
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + "_serial"       # numba names the cache file after the qualname
    g.__doc__ = f.__doc__
    serial = _cached(njit(**dict(_JIT, parallel=False))(g))

    def launch(a3, *args):
        return (parallel if a3.size >= SERIAL_BELOW else serial)(a3, *args)
    launch.__name__ = launch.__qualname__ = f.__name__
    launch.__doc__ = f.__doc__
    launch.parallel, launch.serial = parallel, serial    # the Numba dispatchers (signatures, inspect_asm)
    return launch


# Every kernel walks its lanes, rows or groups in prange blocks of whole ones of ~BLOCK elements,
# splitting the flat index into (p, q) once per block and counting from there (``_advance``): per lane
# that division costs ~11 ns (Numba's signed floor division), as much as normalizing a whole 8-element
# row (measured 24 vs 12.8 ns per row on (256, 8)); on batch norm's 196-element lanes of
# (256, 256, 14, 14) blocking took the normalize pass from 6.0 to 5.0 ms.  A block holds whole lanes
# (or whole chunks of one), so results do not depend on the blocking.
# No kernel reshapes: Numba's tuple reshape is a helper in numba.np.arrayobj, whose environment made
# a warm process import that module and 12 more on its first call (+50 ms).
BLOCK = 4096

# _LOOPS: each prange loop is a gufunc that Numba compiles, wraps and links on its own — ~1.4 s of cold
# compile per loop here (backward_reduce with its stage-2 loop parallel vs serial, twice each: 6.5/5.9
# vs 5.2/4.3 s).  So a kernel has one prange loop for all its modes (the mode is tested once per block),
# and the stage that merges the per-chunk partials runs serially after it: it reads P·G·K values
# (K chunks per group), at most ~4 MiB of partials (layer norm (8192, 1024)).
# The loop count is a variable (``blocks = ...``): Numba does not convert ``prange(a if c else b)``, and
# says nothing while another prange loop remains in the function — the loop just runs serially.


# Stores: plain.  Non-temporal stores of y/dx (each row staged in a stack buffer, then streamed) were
# used for layer/RMS outputs of 32 MiB or more until 2026-12-07, and removed.  They had won on Zen 3
# ((8192, 1024) forward 10.6 → 12.7 GB/s), but on Zen 4, in one process, interleaved (7 rounds, full
# ops, buffers 64-byte aligned) plain stores were faster: forward (8192, 1024) 28.9 vs 25.3 GB/s,
# (65536, 256) 26.2 vs 22.7, forward+backward (8192, 1024) 18.9 vs 15.1.  Unaligned they were far worse:
# NumPy's large arrays start 16 bytes past a 64-byte boundary, so every row mixed plain and streaming
# stores in its first and last lines — (65536, 256) forward 32 → 10 GB/s.  An alignment-aware rule
# would still have lost on this VM; a CPU-specific one could not be tested here.


@njit(inline="always")
def _groups_per_block(L):
    return max(1, BLOCK // max(L, 1))


@njit(inline="always")
def _advance(p, q, Q):
    """The next (p, q) of a row-major walk over (P, Q)."""
    q += 1
    if q == Q:
        return p + 1, 0
    return p, q


@njit(inline="always")
def _advance3(p, q, k, Q, K):
    """The next (p, q, k) of a row-major walk over (P, Q, K)."""
    q, k = _advance(q, k, K)
    if q == Q:
        return p + 1, 0, k
    return p, q, k


# ---------------------------------------------------------------- float16: loads and stores
#
# Every kernel reads x and dy, and writes y and dx, through ``load`` and ``store``.  For float32 and
# float64 arrays they are plain indexing: the float32 assembly of all 19 compiled kernels and drivers
# is the one they had with plain indexing, symbol names aside.  float16 arrays arrive as their bits
# (uint16: Numba has no float16 on the CPU), widened to float32 on load and rounded to float16 on store
# by LLVM's half type, which compiles to F16C's vcvtph2ps/vcvtps2ph, vectorized.  So a float16 op moves
# float16 bytes: layer norm of (8192, 1024) took 44 ms with NumPy converting a float32 copy in and out
# (its float16 casts are scalar: 8M elements 14.0 ms in, 20.9 ms out), 7.4 ms with a parallel
# converting kernel before and after, and takes 2.8 ms reading and writing half (torch: 2.3).  A result
# is computed in float64, rounded to float32, then to float16 — as the float32 path followed by NumPy's
# cast, bitwise (float64 → half directly compiles to a call of compiler-rt's __truncdfhf2 on Zen 4,
# which Numba does not link).  Both conversions round as NumPy does (to nearest even, overflow to inf,
# subnormals kept, NaN stays NaN).
# Only where the CPU Numba compiles for converts in hardware — x86 with F16C (NUMBA_CPU_FEATURES, else
# the host's as Numba reads them: its get_host_cpu_features, which also applies NUMBA_ENABLE_AVX), or
# ARMv8, where it is the base instruction set; elsewhere LLVM would call compiler-rt helpers (measured:
# a segfault), and _plan has NumPy convert float16 to float32 copies instead.
_FEATURES = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
HALF_IN_HARDWARE = platform.machine() in ("aarch64", "arm64") or "+f16c" in _FEATURES.split(",")


@intrinsic
def _widen(typingctx, bits):
    """float16 bits (uint16) → float32, exact."""
    if bits == nbtypes.uint16:
        def widen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return nbtypes.float32(bits), widen
    return None


@intrinsic
def _narrow(typingctx, value):
    """float32 → float16 bits (uint16), rounded to nearest even."""
    if value == nbtypes.float32:
        def narrow(context, builder, sig, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return nbtypes.uint16(value), narrow
    return None


def load(a, i):
    """a[i] as a float: float16 bits widened to float32 (see above)."""


def store(a, i, value):
    """a[i] = value, rounded to a's dtype: to float32, then to float16 bits for a uint16 array."""


@overload(load, inline="always")
def _load(a, i):
    if a.dtype == nbtypes.uint16:
        return lambda a, i: _widen(a[i])
    return lambda a, i: a[i]


@overload(store, inline="always")
def _store(a, i, value):
    if a.dtype == nbtypes.uint16:
        def half(a, i, value):
            a[i] = _narrow(np.float32(value))
        return half

    def plain(a, i, value):
        a[i] = value
    return plain


# Lane formulas shared by the kernels below; inline='always' so they compile inside each kernel with
# its fastmath flags (a called function keeps its own flags, and its reduction would not vectorize).

@njit(inline="always")
def _lane_moments(v):
    """(mean, M2) of a contiguous lane in two passes while it sits in cache: mean first, then Σ(x − mean)²."""
    s = 0.0
    for i in range(v.size):
        s += load(v, i)
    mu = s / v.size
    ss = 0.0
    for i in range(v.size):
        d = load(v, i) - mu
        ss += d * d
    return mu, ss


@njit(inline="always")
def _group_stats(v, eps, rms):
    """(mean, M2, rstd) of a group that fits in cache: rstd = 1/sqrt(M2/n + eps), or for RMS norm
    1/sqrt(M2/n + mean² + eps) with the mean reported as 0 (mean(x²) = σ² + μ²: no cancellation)."""
    mu, ss = _lane_moments(v)
    mu, r = _rstd(mu, ss, v.size, eps, rms)
    return mu, ss, r


@njit(inline="always")
def _rstd(mu, ss, n, eps, rms):
    """(reported mean, rstd) of a group of n elements with mean mu and M2 ss (see ``_group_stats``)."""
    var = ss / n
    if rms:
        var += mu * mu
        mu = 0.0
    return mu, 1.0 / np.sqrt(var + eps)


@njit(inline="always")
def _zero2(a, b):
    """a[:] = b[:] = 0 as a plain loop: inside a prange body the slice fill is a nested parfor, which the
    parfor passes analyse (cold compile) only to run it serially."""
    for l in range(a.size):
        a[l] = 0.0
        b[l] = 0.0


@njit(inline="always")
def _column_moments(x2, lo, hi, acc, sq):
    """Per column of the rows x2[lo:hi]: acc = mean, sq = Σ(x − mean)², in two passes while the rows sit
    in cache (a chunk: ~CHUNK elements)."""
    L = acc.size
    _zero2(acc, sq)
    for q in range(lo, hi):
        for l in range(L):
            acc[l] += load(x2, (q, l))
    inv = 1.0 / (hi - lo)
    for l in range(L):
        acc[l] *= inv
    # the second pass reads the chunk from cache, two rows per step: sq is loaded and stored once per
    # pair of rows — those loads and stores, not the arithmetic, bound it.  (The first pass reads
    # memory; two rows per step there slowed (65536, 256) from 11 to 7 GB/s: the two 1 KiB row streams
    # defeat the prefetcher.)  Column moments, 2 cores, float32: (100352, 64) 10.6 → 12.1 GB/s,
    # (6272, 64) in cache 13.7 → 15.8, (65536, 256) 11.1 → 11.4.
    for q in range(lo, hi - 1, 2):
        for l in range(L):
            d = load(x2, (q, l)) - acc[l]
            e = load(x2, (q + 1, l)) - acc[l]
            sq[l] += d * d + e * e
    if (hi - lo) % 2:
        for l in range(L):
            d = load(x2, (hi - 1, l)) - acc[l]
            sq[l] += d * d


@njit(inline="always")
def _column_sums(dy2, x2, lo, hi, m, r, a, b):
    """Per column over the rows lo … hi − 1: a = Σ dy, b = Σ dy·(x − m)·r (r applied once per column:
    (100352, 64) 18.8 → 20.2 GB/s against r inside the sum)."""
    L = a.size
    _zero2(a, b)
    for q in range(lo, hi):
        for l in range(L):
            a[l] += load(dy2, (q, l))
            b[l] += load(dy2, (q, l)) * (load(x2, (q, l)) - m[l])
    for l in range(L):
        b[l] *= r[l]


@njit(inline="always")
def _merge_columns(n, mu, M2, pmean, pm2, Q, chunk, l0, l1):
    """(n, mu, M2) merged (Chan) with the chunk partials pmean/pm2 ``(K, L)`` of columns l0 … l1 − 1 of
    Q rows, chunk by chunk, column by column: the one fixed order of every column group."""
    for k in range(pmean.shape[0]):
        rows = min(chunk, Q - k * chunk)
        for l in range(l0, l1):
            n, mu, M2 = merge_into(n, mu, M2, rows, pmean[k, l], pm2[k, l])
    return n, mu, M2


@njit(inline="always")
def _merge_each(n, rows, pmean, pm2, mu, M2):
    """For every group g: (mu[g], M2[g]) of n elements merged (Chan) with a chunk of ``rows`` elements
    whose partials are pmean[g]/pm2[g].  Every group has the same counts, so the loop over g vectorizes
    (merge_into's division is loop-invariant)."""
    for g in range(mu.size):
        _, mu[g], M2[g] = merge_into(n, mu[g], M2[g], rows, pmean[g], pm2[g])


@njit(inline="always")
def _scale_shift(v, o, m0, s0, t0):
    """o = (v − m0)·s0 + t0: one scale and shift per lane."""
    for l in range(v.size):
        store(o, l, (load(v, l) - m0) * s0 + t0)


@njit(inline="always")
def _scale_weight(v, o, m0, s0, weight, bias):
    """o = (v − m0)·s0·weight + bias: one scale per lane, weight and bias per element (layer/RMS norm)."""
    for l in range(v.size):
        store(o, l, (load(v, l) - m0) * s0 * weight[l] + bias[l])


@njit(inline="always")
def _lane_sums(d, v, m0):
    """(Σ dy, Σ dy·(x − m0)) over a lane."""
    s1 = 0.0
    s2 = 0.0
    for i in range(d.size):
        s1 += load(d, i)
        s2 += load(d, i) * (load(v, i) - m0)
    return s1, s2


@njit(inline="always")
def _row_sums(d, v, m0, r0, weight, a, b):
    """One row of layer/RMS norm: a += dy, b += dy·x̂ per column (→ dbias, dweight), and returns the row's
    (Σ g, Σ g·x̂) with g = dy·weight (→ dx)."""
    sg = 0.0
    sgx = 0.0
    for l in range(d.size):
        xh = (load(v, l) - m0) * r0
        a[l] += load(d, l)
        b[l] += load(d, l) * xh
        g = np.float64(load(d, l)) * weight[l]       # float32 dy·weight would round g to float32
        sg += g
        sgx += g * xh
    return sg, sgx


@njit(inline="always")
def _row_block(it, K, pa, pb):
    """Block ``it`` of a walk over row chunks: its (p, k) and its column partials pa/pb[p, k], zeroed."""
    p = it // K
    k = it % K
    a = pa[p, k]
    b = pb[p, k]
    _zero2(a, b)
    return p, k, a, b


@njit(inline="always")
def _column_parts(pa, pb, p0, p1, s1, s2):
    """s1/s2[j] = Σ over p in [p0, p1) and every chunk k of the column partials pa/pb[p, k, j], in that
    order: one contiguous row of partials at a time (serial; see _LOOPS)."""
    _zero2(s1, s2)
    for p in range(p0, p1):
        for k in range(pa.shape[1]):
            for j in range(s1.size):
                s1[j] += pa[p, k, j]
                s2[j] += pb[p, k, j]


@njit(inline="always")
def _dx_lane(d, v, o, a0, b0, c0):
    """o = dy·a0 + x·b0 + c0: one coefficient triple per lane."""
    for l in range(d.size):
        store(o, l, load(d, l) * a0 + load(v, l) * b0 + c0)


@njit(inline="always")
def _dx_row(d, v, o, a0, b0, c0, weight):
    """o = dy·a0·weight + x·b0 + c0: per-row coefficients, weight per element (layer/RMS norm)."""
    for l in range(d.size):
        store(o, l, load(d, l) * a0 * weight[l] + load(v, l) * b0 + c0)


@njit(inline="always")
def _column_rows(d2, x2, o2, a, b, c, q0, q1, fwd):
    """Rows q0 … q1 − 1 of one sample's (Q, C) view: o = (x − a)·b + c (fwd; d2 unused) or dy·a + x·b + c,
    a, b, c per column.  Indexes the 2-D views: a row view x2[q] is a new array struct whose reference to
    the buffer Numba counts, ~11 ns (~40 cycles) per row."""
    L = a.size
    for q in range(q0, q1):
        if fwd:
            for l in range(L):
                store(o2, (q, l), (load(x2, (q, l)) - a[l]) * b[l] + c[l])
        else:
            for l in range(L):
                store(o2, (q, l), load(d2, (q, l)) * a[l] + load(x2, (q, l)) * b[l] + c[l])


# ---------------------------------------------------------------- one sample of a fused column group
#
# The per-sample body of normalize_groups for channels-last instance/group norm: a serial function of
# its own (the kernels' flags, not inlined), called once per sample from both builds, in the kernel's
# one prange loop.  Inlined in a prange loop of its own, it made each build compile its own copy (each
# prange loop is a gufunc compiled on its own).  It indexes x2[q, l], never takes a row
# view x2[q] (outside a prange body a view may cost an atomic reference count on the meminfo that
# every thread shares).

@_cached
@njit(**dict(_JIT, parallel=False))
def _normalize_columns(x2, cg, chunk, eps, rms, weight, bias, mean, m2, rstd, work, y2):
    """One sample ``x2`` (S, C) → y2: its column moments chunk by chunk into work (the K chunks' means,
    then their M2s), merged into its groups (``mean``/``m2``/``rstd`` (G,)) in the order ``moments``
    merges them, then y = (x − μ)·rstd·w + b with the per-column mean and scale in work's last two rows."""
    Q, L = x2.shape
    K = (work.shape[0] - 2) // 2
    for k in range(K):
        _column_moments(x2, k * chunk, min((k + 1) * chunk, Q), work[k], work[K + k])
    mc, sc = work[2 * K], work[2 * K + 1]
    for g in range(mean.size):
        n, mu, M2 = _merge_columns(0.0, 0.0, 0.0, work[:K], work[K:2 * K], Q, chunk, g * cg, (g + 1) * cg)
        mu, r = _rstd(mu, M2, n, eps, rms)
        mean[g], m2[g], rstd[g] = mu, M2, r
        for l in range(g * cg, (g + 1) * cg):
            mc[l] = mu
            sc[l] = r * weight[l]
    _column_rows(x2, x2, y2, mc, sc, bias, 0, Q, True)


@_serial_if_small
@njit(**_JIT)
def moments(x3, lane, cg, chunk, pmean, pm2, mean, m2):
    """Per-group mean and M2 = Σ(x − mean)², accumulated in float64.

    Stage 1 (parallel): each chunk (``chunk`` elements of a lane, or ``chunk`` rows of a column block)
    is read twice while it sits in cache: once for its mean, once for Σ(x − mean)² — the mean is
    subtracted before squaring, so float32 data at an offset of 1e6 loses nothing.  Partials go to
    ``pmean``/``pm2``: ``(P, Q, K)`` for lanes, ``(P, K, L)`` for columns.
    Stage 2 (serial): Chan's merge of the partials in a fixed order.  ``mean``/``m2`` are
    ``(P, G)``, or ``(1, G)`` when the groups of every p are merged (batch norm).
    """
    P, Q, L = x3.shape
    K = pmean.shape[2] if lane else pmean.shape[1]
    per = _groups_per_block(min(chunk, L)) if lane else 1
    blocks = -(-(P * Q * K) // per) if lane else P * K
    for blk in prange(blocks):          # one loop for both shapes: see _LOOPS
        if lane:
            pq, k = divmod(blk * per, K)
            p, q = divmod(pq, Q)
            for _ in range(blk * per, min(blk * per + per, P * Q * K)):
                pmean[p, q, k], pm2[p, q, k] = _lane_moments(x3[p, q, k * chunk:min((k + 1) * chunk, L)])
                p, q, k = _advance3(p, q, k, Q, K)
        else:
            p = blk // K
            k = blk % K
            _column_moments(x3[p], k * chunk, min((k + 1) * chunk, Q), pmean[p, k], pm2[p, k])

    # Stage 2 (serial: see _LOOPS).  Where a group is one lane or one column (every lane plan; columns
    # with cg = 1), the G groups hold the same counts, so they are merged together, chunk by chunk, in
    # a loop over g that vectorizes: merge_into's division is the same for every g.  Each group sees its
    # merges in the same fixed order as before (reassoc may round M2's last bit differently from the
    # one-group-at-a-time loop).  That loop took 1.75 ms for the 256 × 1024 partials of batch norm
    # (8192, 1024), whose whole forward takes ~5 ms; this one takes 0.07 ms ((65536, 256): 0.30 → 0.03).
    Pm, G = mean.shape
    for pm in range(Pm):
        p0, p1 = (0, P) if Pm == 1 else (pm, pm + 1)
        mu, M2 = mean[pm], m2[pm]
        if lane or cg == 1:
            _zero2(mu, M2)
            n = 0.0
            for p in range(p0, p1):
                for k in range(K):
                    rows = min(chunk, (L if lane else Q) - k * chunk)
                    if lane:
                        _merge_each(n, rows, pmean[p, :, k], pm2[p, :, k], mu, M2)
                    else:
                        _merge_each(n, rows, pmean[p, k], pm2[p, k], mu, M2)
                    n += rows
        else:                           # cg adjacent columns per group: merged in sequence, group by group
            for g in range(G):
                n, u, v = 0.0, 0.0, 0.0
                for p in range(p0, p1):
                    n, u, v = _merge_columns(n, u, v, pmean[p], pm2[p], Q, chunk, g * cg, (g + 1) * cg)
                mu[g], M2[g] = u, v


@_serial_if_small
@njit(**_JIT)
def normalize_groups(x3, mode, cg, chunk, eps, rms, weight, bias, mean, m2, rstd, work, y3):
    """Statistics and y of every per-sample group in one sweep: y = (x − μ)·rstd·w + b.

    The plan's ``fused`` groups: each is read from memory once and normalized while it is still in
    cache, 2× the input's bytes instead of moments-then-normalize's 3×.  Same formulas, in the same
    order, as ``moments`` and ``normalize``, so the same values.
    rstd = 1/sqrt(M2/n + eps), or for RMS norm 1/sqrt(M2/n + μ² + eps) with μ reported as 0.

    LANE (instance norm, channels-first group norm) and ROW (layer/RMS norm): groups that fit in one
    moments chunk.  x3/y3 are the stats view ``(P, G, cg·S)``: group g holds channels g·cg … g·cg + cg − 1,
    S elements each.  weight/bias: ``(C,)`` one value per channel (LANE), or ``(S,)`` one per element
    of a row (ROW, cg = 1).
    COLUMN (instance/group norm, channels-last): x3/y3 ``(P, S, C)``, one sample per iteration — its
    column moments chunk by chunk (``chunk`` rows), merged into its groups, then its y while the
    sample is still in the last-level cache.  work ``(P, 2K + 2, C)``: the K chunks' means and M2s,
    then the sample's per-column mean and scale.  weight/bias ``(C,)``.
    mean/m2/rstd: ``(P, G)``.  ``chunk`` and ``work`` are read by COLUMN only.
    """
    P, G, L = x3.shape
    S = L // cg
    per = _groups_per_block(L)
    # (p, g) is split from the flat index once per block (see BLOCK), then counted.  The mode is tested
    # once per block, not per group: a branch inside the group loop cost ~10 ns per group, a third of an
    # 8-element layer-norm row (measured 24.6 vs 16.7 ns per row on (256, 8)).  COLUMN takes one sample
    # per block.  One prange loop for all three: see _LOOPS.
    x2, y2, mean1, m21, rstd1 = x3[0], y3[0], mean[0], m2[0], rstd[0]      # ROW: (1, rows, D)
    blocks = P if mode == COLUMN else -(-(P * G) // per)
    for blk in prange(blocks):
        if mode == ROW:           # layer/RMS norm: one group per row, weight per element
            for i in range(blk * per, min(blk * per + per, G)):
                mean1[i], m21[i], rstd1[i] = _group_stats(x2[i], eps, rms)
                _scale_weight(x2[i], y2[i], mean1[i], rstd1[i], weight, bias)
        elif mode == COLUMN:      # channels-last instance/group norm: sample blk, S rows of C channels
            _normalize_columns(x3[blk], cg, chunk, eps, rms, weight, bias, mean[blk], m2[blk], rstd[blk],
                               work[blk], y3[blk])
        else:                     # LANE: cg channels of S elements, weight per channel
            p, g = divmod(blk * per, G)
            for _ in range(blk * per, min(blk * per + per, P * G)):
                v, o = x3[p, g], y3[p, g]
                mu, ss, r = _group_stats(v, eps, rms)
                mean[p, g], m2[p, g], rstd[p, g] = mu, ss, r
                for j in range(cg):
                    c = g * cg + j
                    _scale_shift(v[j * S:(j + 1) * S], o[j * S:(j + 1) * S], mu, r * weight[c], bias[c])
                p, g = _advance(p, g, G)


@_serial_if_small
@njit(**_JIT)
def backward_reduce(dy3, x3, mode, chunk, mean, rstd, weight, pa, pb, sum_dy, sum_dyx, row_g, row_gx):
    """Σ dy and Σ dy·x̂ (x̂ = (x − mean)·rstd) per coefficient, in float64 — the two sums every backward needs.

    LANE: per lane ``[p, q]``, partials ``(P, Q, K)`` over chunks of the lane.
    COLUMN: per column ``[p, l]``, partials ``(P, K, L)`` over chunks of rows.
    ROW (layer/RMS norm): per column over all rows (→ dweight, dbias) and, in the same pass, per row
    ``row_g = Σ_l dy·weight`` and ``row_gx = Σ_l dy·weight·x̂`` (→ dx).
    ``sum_dy``/``sum_dyx`` are ``(P, X)`` or ``(1, X)`` (summed over p too); stage 2 merges in fixed order.
    """
    P, Q, L = x3.shape
    bc = mean.shape[0] == 1
    lane = mode == LANE
    K = pa.shape[2] if lane else pa.shape[1]
    per = _groups_per_block(min(chunk, L)) if lane else 1
    blocks = -(-(P * Q * K) // per) if lane else P * K
    for blk in prange(blocks):          # one loop for every mode: see _LOOPS
        if lane:
            pq, k = divmod(blk * per, K)
            p, q = divmod(pq, Q)
            for _ in range(blk * per, min(blk * per + per, P * Q * K)):
                pc = 0 if bc else p
                lo = k * chunk
                hi = min(lo + chunk, L)
                s1, s2 = _lane_sums(dy3[p, q, lo:hi], x3[p, q, lo:hi], mean[pc, q])
                pa[p, q, k] = s1
                pb[p, q, k] = s2 * rstd[pc, q]
                p, q, k = _advance3(p, q, k, Q, K)
        else:
            p, k, a, b = _row_block(blk, K, pa, pb)
            pc = 0 if bc else p
            lo = k * chunk
            hi = min(lo + chunk, Q)
            if mode == COLUMN:
                _column_sums(dy3[p], x3[p], lo, hi, mean[pc], rstd[pc], a, b)
            else:
                for q in range(lo, hi):
                    row_g[p, q], row_gx[p, q] = _row_sums(dy3[p, q], x3[p, q], mean[pc, q], rstd[pc, q], weight,
                                                          a, b)

    Pc, X = sum_dy.shape
    for pc in range(Pc):                # serial: see _LOOPS
        p0, p1 = (0, P) if Pc == 1 else (pc, pc + 1)
        if lane:
            for j in range(X):
                s1 = 0.0
                s2 = 0.0
                for p in range(p0, p1):
                    for k in range(K):
                        s1 += pa[p, j, k]
                        s2 += pb[p, j, k]
                sum_dy[pc, j] = s1
                sum_dyx[pc, j] = s2
        else:
            _column_parts(pa, pb, p0, p1, sum_dy[pc], sum_dyx[pc])


@_serial_if_small
@njit(**_JIT)
def backward_fused(dy3, x3, mode, cg, chunk, rms, n, mean, rstd, weight, pa, pb, sum_dy, sum_dyx, dx3):
    """``backward_reduce`` and ``backward_apply`` fused for the lane groups ``normalize_groups`` serves: each
    group's sums, its dx coefficients (``dx_coefficients``), then its dx while dy and x are in cache —
    3× the input's bytes instead of 5×.  Training only (eval has no sums to take).

    LANE (instance/group norm): x3/dy3/dx3 are the stats view ``(P, G, cg·S)``; Σdy and Σdy·x̂ per
    sample and channel go straight to ``sum_dy``/``sum_dyx`` ``(P, C)``; weight ``(C,)``.
    ROW (layer/RMS norm): ``(1, rows, D)``; every row is a group, processed in blocks of ``chunk`` rows
    whose column partials ``pa``/``pb`` ``(1, K, D)`` are merged in fixed order into ``(1, D)``.
    The channels-last samples ``normalize_groups`` fuses take backward_reduce → backward_apply: fused
    here too, their backward ran 8.0-9.1 → 4.7-5.7 ms on (32, 56, 56, 64), but cost ~13 s more cold
    compile of this kernel, which every layer/instance/group norm backward compiles.
    """
    P, G, L = x3.shape
    lane = mode == LANE
    S = L // cg
    per = _groups_per_block(L)
    K = pa.shape[1]
    blocks = -(-(P * G) // per) if lane else P * K
    for blk in prange(blocks):          # one loop for both modes: see _LOOPS
        if lane:
            p, g = divmod(blk * per, G)
            for _ in range(blk * per, min(blk * per + per, P * G)):
                d, v, o = dy3[p, g], x3[p, g], dx3[p, g]
                m0, r0 = mean[p, g], rstd[p, g]
                sg = 0.0
                sgx = 0.0
                for j in range(cg):
                    c = g * cg + j
                    s1, s2 = _lane_sums(d[j * S:(j + 1) * S], v[j * S:(j + 1) * S], m0)
                    sum_dy[p, c] = s1
                    sum_dyx[p, c] = s2 * r0
                    sg += s1 * weight[c]
                    sgx += s2 * r0 * weight[c]
                B, C = dx_coefficients(r0, r0, m0, sg, sgx, n, rms)
                for j in range(cg):
                    c = g * cg + j
                    _dx_lane(d[j * S:(j + 1) * S], v[j * S:(j + 1) * S], o[j * S:(j + 1) * S], r0 * weight[c], B, C)
                p, g = _advance(p, g, G)
        else:                           # ROW: a block of chunk rows
            p, k, a, b = _row_block(blk, K, pa, pb)
            for q in range(k * chunk, min((k + 1) * chunk, G)):
                m0 = mean[p, q]
                r0 = rstd[p, q]
                d, v = dy3[p, q], x3[p, q]
                sg, sgx = _row_sums(d, v, m0, r0, weight, a, b)
                B, C = dx_coefficients(r0, r0, m0, sg, sgx, n, rms)
                _dx_row(d, v, dx3[p, q], r0, B, C, weight)
    if not lane:
        _column_parts(pa, pb, 0, P, sum_dy[0], sum_dyx[0])


@_serial_if_small
@njit(**_JIT)
def apply(x3, dy3, mode, ca, cb, cc, weight, bias, o3):
    """The elementwise pass of every norm, in float64, rounded once to o3's dtype.  Both directions are
    one kernel, because each prange kernel costs ~1.4 s of cold compile and, as two, these cost 2.6 s
    (parallel builds) where one costs ~1.8 s; a direction test per lane is ~1 ns.

    dy3 empty (``x3[:0]``) — y, the normalize pass: o = (x − A)·B + C.  A is the mean, B the scale,
    C the shift; ROW: o = (x − A[p, q])·B[p, q]·weight[l] + bias[l] (C unused).  Subtracting the float64
    mean first keeps float32 input at offset 1e6 exact to ~1e-7 relative.
    dy3 given — dx: o = dy·A + x·B + C.  Training: A = k·rstd·w, B = −k·rstd²·mean(g·x̂),
    C = −k·rstd·mean(g) − mean·B (k = r for batch renorm, 1 otherwise); eval: A = w·rstd, B = C = 0.
    ROW: o = dy·A[p, q]·weight[l] + x·B[p, q] + C[p, q] (bias unused).

    Coefficients (see the module docstring): LANE ``[p, q]`` scalars, COLUMN ``[p, :]`` vectors over l,
    ROW per-row scalars; a first dimension of 1 is broadcast over p.
    """
    P, Q, L = x3.shape
    bc = ca.shape[0] == 1
    fwd = dy3.size == 0
    per = _groups_per_block(L)
    for blk in prange(-(-(P * Q) // per)):
        i, end = blk * per, min(blk * per + per, P * Q)
        if mode == COLUMN:
            # Rows of C channels, tens of elements each: the block's rows are indexed in the 2-D views of
            # their sample, taken once per sample, not through a view per row.  A row view cost as much as
            # normalizing its 64 elements: y of (Q, 64) rows in cache took 0.40-0.42 → 0.24-0.27 ns per
            # element on one thread, 0.20-0.33 → 0.13 on two (see _column_rows).
            while i < end:
                p, q = divmod(i, Q)
                n = min(Q - q, end - i)
                pc = 0 if bc else p
                if fwd:
                    _column_rows(x3[p], x3[p], o3[p], ca[pc], cb[pc], cc[pc], q, q + n, fwd)
                else:
                    _column_rows(dy3[p], x3[p], o3[p], ca[pc], cb[pc], cc[pc], q, q + n, fwd)
                i += n
        else:
            p, q = divmod(i, Q)
            for _ in range(i, end):
                pc = 0 if bc else p
                v = x3[p, q]
                o = o3[p, q]
                if mode == LANE:
                    if fwd:
                        _scale_shift(v, o, ca[pc, q], cb[pc, q], cc[pc, q])
                    else:
                        _dx_lane(dy3[p, q], v, o, ca[pc, q], cb[pc, q], cc[pc, q])
                elif fwd:
                    _scale_weight(v, o, ca[pc, q], cb[pc, q], weight, bias)
                else:
                    _dx_row(dy3[p, q], v, o, ca[pc, q], cb[pc, q], cc[pc, q], weight)
                p, q = _advance(p, q, Q)


def normalize(x3, mode, mean, scale, shift, weight, bias, y3):
    """y = (x − mean)·scale + shift (``apply`` without dy; the interface ``_cuda.normalize`` shares)."""
    apply(x3, x3[:0], mode, mean, scale, shift, weight, bias, y3)


def backward_apply(dy3, x3, mode, ca, cb, cc, weight, dx3):
    """dx = dy·A + x·B + C (``apply`` with dy; the interface ``_cuda.backward_apply`` shares)."""
    apply(x3, dy3, mode, ca, cb, cc, weight, weight, dx3)


# ---------------------------------------------------------------- whole calls for small inputs
#
# A (4, 8, 8, 8) batch norm computes for ~2 µs; driving moments → coefficients → normalize from Python
# costs ~10 µs more (three dispatches, eight small allocations, the glue).  These drivers make the same
# calls, in the same order, from compiled code: one dispatch per op call.  Serial builds only, so a
# small input never compiles a parallel kernel (~5 s each, cold).  Like the kernels they allocate
# nothing (an array allocated in compiled code made the cached driver import numba.np.arrayobj and 12
# more modules on its first call, +70 ms): the caller passes the work arrays stacked, one allocation
# per shape, and the driver takes them apart by their first index.

_moments_serial, _apply_serial = moments.serial, apply.serial
_reduce_serial = backward_reduce.serial


@njit(inline="always")
def _per_channel(a, cg, out):
    """(P, G) per-group values → (P, G·cg) per channel (the kernels' coefficient layout), in ``out``."""
    if cg == 1:
        return a
    P, G = a.shape
    for p in range(P):
        for c in range(G * cg):
            out[p, c] = a[p, c // cg]
    return out


@njit(**dict(_JIT, parallel=False))
def forward_small(x3, xs3, lane, cg, chunk, mode, group_size, n, eps, rms, batch_stats, running_mean, running_var,
                  momentum, renorm, rmax, dmax, weight, bias, mean, rstd, k, d, m2, coef, partials, y3):
    """``moments`` → ``forward_coefficients`` → ``normalize`` in one call.

    Arguments as the three steps take them (``functional._forward`` passes the plan's fields): xs3 is
    the statistics view of x3; mean/rstd ``(P, G)`` (``(1, C)`` when batch_stats is False: the running
    buffers normalize) and, for batch renorm, k/d ``(1, C)`` are outputs.  Work: m2 ``(P, G)``, coef
    ``(3, P, C)`` (mean, scale, shift per channel; ``(3, 1, 1)`` for layer/RMS norm), partials
    ``(2, *plan.parts)`` (the moments partials; unused in eval).
    """
    if batch_stats:
        _moments_serial(xs3, lane, cg, chunk, partials[0], partials[1], mean, m2)
    expand = mode != ROW
    forward_coefficients(mean, m2, n, eps, rms, batch_stats, running_mean, running_var, momentum, renorm, rmax,
                         dmax, weight, bias, group_size, expand, rstd, k, d, coef[0], coef[1], coef[2])
    if expand:
        _apply_serial(x3, x3[:0], mode, coef[0], coef[1], coef[2], weight, bias, y3)
    else:
        _apply_serial(x3, x3[:0], mode, mean, rstd, rstd, weight, bias, y3)


@njit(**dict(_JIT, parallel=False))
def backward_small(dy3, x3, mode, rchunk, group_size, n, rms, batch_stats, mean, rstd, k, d, renorm, weight,
                   dweight, dbias, sums, partials, rows, coef, wide, dx3):
    """``backward_reduce`` → ``backward_coefficients`` → ``backward_apply`` in one call; dweight/dbias
    (float64 vectors) and dx3 are outputs.  Work: sums ``(2, P, X)`` (Σdy and Σdy·x̂; P = N for
    per-sample training, else 1), partials ``(2, *plan.rparts)``, rows ``(2, P, G)`` (layer/RMS norm's
    per-row sums; ``(2, 1, 1)`` otherwise), coef ``(3, P, X)`` or ``(3, P, G)`` (A, B, C), wide
    ``(2, P, C)`` (mean and rstd per channel when group_size > 1; ``(2, 0, 0)`` otherwise).
    """
    expand = mode != ROW
    _reduce_serial(dy3, x3, mode, rchunk, _per_channel(mean, group_size, wide[0]),
                   _per_channel(rstd, group_size, wide[1]), weight, partials[0], partials[1], sums[0], sums[1],
                   rows[0], rows[1])
    backward_coefficients(sums[0], sums[1], weight, mean, rstd, k, d, renorm, n, rms, batch_stats, group_size, expand,
                          rows[0], rows[1], dweight, dbias, coef[0], coef[1], coef[2])
    _apply_serial(x3, dy3, mode, coef[0], coef[1], coef[2], weight, weight, dx3)


_cached(forward_small)
_cached(backward_small)
_cached(forward_coefficients)          # these three are called from functional too
_cached(backward_coefficients)
_cached(update_running)
