"""CUDA kernel family: the four kernels of ``_cpu.py`` — same names, same signatures, same partial arrays
— as host-side launchers of ``@cuda.jit`` kernels.  Imported only when a device array arrives.

Work decomposition on the contiguous ``(P, Q, L)`` view (``_plan.py`` picks it, exactly as for the CPU):

* reductions, stage 1: **one block per partial** of the plan — a chunk of a lane (``pmean[p, q, k]``),
  or a chunk of rows × a tile of ``TILE`` columns (``pmean[p, k, l]``).  Batch norm over (N, C, S) thus
  gets N·K blocks per channel; layer/group/instance norm get one block per group (K = 1 below CHUNK).
* reductions, stage 2: one block per group (lanes) or per tile of columns merges the partials in a
  fixed order — slots over the partials, then the same slot tree (channels-last group norm adds a
  third launch merging each group's columns); groups of ≤ ``SERIAL_MERGE`` lane partials (layer norm's
  one per row) are merged by one thread each, in order.  No float atomics anywhere, so a result is bitwise
  reproducible run to run.
* elementwise (``normalize``, ``backward_apply``): consecutive threads own consecutive elements; a
  block covers ``THREADS`` columns of one row, or ``THREADS // L`` whole rows when rows are short.

Loads are coalesced in both layouts: a lane is read with consecutive threads on consecutive elements; a
column block reads ``TILE`` (= 32) adjacent columns of each row (128 B for float32), or whole rows
when L < 32 (then the block's reads are one contiguous range).

Reproducibility independent of the launch configuration: a reduction block has ``WIDTH`` = 256 fixed
*slots* (slot s of a lane takes elements s, s + 256, …; a column block has 256 // TILE row slots per
column); whichever thread runs a slot, the slot's sequence and the fixed pairwise tree over slots are
the same, so any ``THREADS`` (8 in the simulator tests, 256 on a GPU) and any ``MAX_BLOCKS`` give
bitwise identical results.  ``WIDTH`` and ``TILE`` are part of the numerics, like ``_plan.CHUNK``.
GPU and CPU agree to rounding, not bitwise (different summation trees).  No warp shuffles (the
simulator has none; the trees are in shared memory).

Numerics: statistics and sums accumulate in float64.  Each slot reads its values in register batches
of 4, takes their exact two-pass mean and M2 and Chan-merges the batch into its running (n, mean, M2)
(``_math.merge_into``) — one pass over x, the mean always subtracted before squaring, one float64
division per 4 elements.  On paper: ~6 float64 operations per element, i.e. 5 TFLOP/s to keep up with
an H100 SXM streaming float32 at 3.35 TB/s (0.84 G elements/ms) — 15% of its 34 TFLOP/s of FP64.  A
consumer GPU (RTX 4090: 1.0 TB/s, 1.3 TFLOP/s FP64) would need 1.5 TFLOP/s, so the moments pass runs at
~85% of its memory roofline there; a float32 Chan/Kahan variant is the knob for such parts, not needed
on data-centre GPUs.  normalize/apply are ~3 float64 operations per element.

Small per-group arguments (mean, scale, coefficients, weight vectors) may be NumPy arrays: a launcher
uploads them packed in one transfer and downloads host outputs (mean/m2, the sums) in one transfer
after its last kernel.  Big arrays (x3, y3, dy3, dx3, partials) must be device arrays.
"""
import math

import numpy as np
from numba import cuda, float64, njit
from numba.cuda.core import config

from ._cpu import COLUMN, LANE, ROW
from ._math import merge_into

# Threads per block.  Any value in 1..1024 gives the same results (see WIDTH); tests shrink it to 8 so
# that every slot loop and the multi-block paths run in the simulator.
THREADS = 256
# Cap on blocks per launch; kernels loop over their work units (grid-stride), so any cap gives the same
# results.
MAX_BLOCKS = 65535
# Columns per block of the column reductions: 32 float32 = one 128-byte line per row (≤ WIDTH).
TILE = 32
# Reduction slots per block: part of the numerics (like _plan.CHUNK), not a tuning knob.
WIDTH = 256
# Stage 2 of a lane reduction merges up to this many partials per group with one thread, in order (layer
# norm's one partial per row, batch norm over a small batch); more get a block and the slot tree, which
# costs 8 barriers however few partials there are.  Chosen from the shape alone, so still reproducible.
SERIAL_MERGE = 32
# Rows each thread walks per unit in the elementwise kernels (amortizes the index arithmetic).
EW_STEPS = 4
# THREADS, MAX_BLOCKS and TILE are read at each launch; WIDTH and EW_STEPS are compile-time constants
# of the kernels (the simulator reads them at run time, so its tests can shrink WIDTH too).  Kernels
# compile on first launch for the argument types they get (one NVVM compile each, seconds) and are
# cached on disk like the CPU kernels (cache=True, NUMBA_CACHE_DIR).

_SIM = bool(config.ENABLE_CUDASIM)
_available = None


def check_available():
    """Raise one clear RuntimeError when device arrays arrive but no CUDA device can run kernels."""
    global _available
    if _available is None:
        _available = bool(cuda.is_available())
    if not _available:
        raise RuntimeError("fastnorm got CUDA device arrays but no CUDA GPU/driver is usable in this process "
                           "(numba.cuda.is_available() is False); pass NumPy arrays to run on the CPU")


# ================================================================= device helpers
# Written as @njit(inline="always") functions, like _math.py: CUDA kernels inline them, and unlike
# @cuda.jit(device=True) they type-check under cuda.compile_ptx without a driver (a device dispatcher
# asks the driver for the compute capability).  In the simulator they are plain Python.
_device = (lambda f: f) if _SIM else njit(inline="always")


@_device
def _chan(x1, i, hi, step):
    """(n, mean, M2) of x1[i], x1[i + step], … below hi: exact 4-value batches Chan-merged in order."""
    n = 0.0
    mu = 0.0
    m2 = 0.0
    while i + 3 * step < hi:
        v0 = float64(x1[i])
        v1 = float64(x1[i + step])
        v2 = float64(x1[i + 2 * step])
        v3 = float64(x1[i + 3 * step])
        mb = (v0 + v1 + v2 + v3) * 0.25
        d0 = v0 - mb
        d1 = v1 - mb
        d2 = v2 - mb
        d3 = v3 - mb
        n, mu, m2 = merge_into(n, mu, m2, 4.0, mb, d0 * d0 + d1 * d1 + d2 * d2 + d3 * d3)
        i += 4 * step
    while i < hi:
        n, mu, m2 = merge_into(n, mu, m2, 1.0, float64(x1[i]), 0.0)
        i += step
    return n, mu, m2


@_device
def _tree_chan(sn, smu, sm2, rs, tc, t, nt):
    """Merge slot entries r·tc + c over r into r = 0, for every c: pairs (r, r + h), h = 1, 2, 4, …

    A fixed tree whatever the block size.  Begins and ends with a barrier.
    """
    h = 1
    while h < rs:
        cuda.syncthreads()
        for s in range(t, rs * tc, nt):
            r = s // tc
            if r % (2 * h) == 0 and r + h < rs:
                o = s + h * tc
                sn[s], smu[s], sm2[s] = merge_into(sn[s], smu[s], sm2[s], sn[o], smu[o], sm2[o])
        h *= 2
    cuda.syncthreads()


@_device
def _tree_sum(sa, sb, rs, tc, t, nt):
    """Like _tree_chan, for two plain sums."""
    h = 1
    while h < rs:
        cuda.syncthreads()
        for s in range(t, rs * tc, nt):
            r = s // tc
            if r % (2 * h) == 0 and r + h < rs:
                o = s + h * tc
                sa[s] += sa[o]
                sb[s] += sb[o]
        h *= 2
    cuda.syncthreads()


# ================================================================= kernels
# After a tree, the entries [0, tc) are read by the threads that own those slots in the next unit too,
# so no barrier is needed between units.

@cuda.jit(cache=True)
def _moments_lane(x1, Q, L, K, chunk, pmean1, pm21):
    """Stage 1, lanes: block per chunk u = (p·Q + q)·K + k of lane x3[p, q, :] → pmean/pm2 (P, Q, K),
    passed flat."""
    sn = cuda.shared.array(WIDTH, float64)
    smu = cuda.shared.array(WIDTH, float64)
    sm2 = cuda.shared.array(WIDTH, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    for u in range(cuda.blockIdx.x, pmean1.size, cuda.gridDim.x):
        row = u // K
        k = u - row * K
        lo = row * L + k * chunk
        hi = row * L + min((k + 1) * chunk, L)
        for s in range(t, WIDTH, nt):
            sn[s], smu[s], sm2[s] = _chan(x1, lo + s, hi, WIDTH)
        _tree_chan(sn, smu, sm2, WIDTH, 1, t, nt)
        if t == 0:
            pmean1[u] = smu[0]
            pm21[u] = sm2[0]


@cuda.jit(cache=True)
def _moments_column(x1, Q, L, K, chunk, tc, pmean, pm2):
    """Stage 1, columns: block per (p, k, tile of tc columns); slot (r, c) takes rows lo + r, lo + r + rs, …
    of column tile·tc + c → pmean/pm2 (P, K, L)."""
    sn = cuda.shared.array(WIDTH, float64)
    smu = cuda.shared.array(WIDTH, float64)
    sm2 = cuda.shared.array(WIDTH, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    P = pmean.shape[0]
    rs = WIDTH // tc
    ntiles = (L + tc - 1) // tc
    for u in range(cuda.blockIdx.x, P * K * ntiles, cuda.gridDim.x):
        pk = u // ntiles
        tile = u - pk * ntiles
        p = pk // K
        k = pk - p * K
        rlo = k * chunk
        hi = (p * Q + min(rlo + chunk, Q)) * L
        for s in range(t, rs * tc, nt):
            r = s // tc
            l = tile * tc + s - r * tc
            if l < L:
                sn[s], smu[s], sm2[s] = _chan(x1, (p * Q + rlo + r) * L + l, hi, rs * L)
            else:
                sn[s] = 0.0
                smu[s] = 0.0
                sm2[s] = 0.0
        _tree_chan(sn, smu, sm2, rs, tc, t, nt)
        for c in range(t, tc, nt):
            l = tile * tc + c
            if l < L:
                pmean[p, k, l] = smu[c]
                pm2[p, k, l] = sm2[c]


@cuda.jit(cache=True)
def _merge_lane(pmean, pm2, chunk, L, mean, m2):
    """Stage 2, lanes: block per group (pm, g); slot s Chan-merges the partials j = s, s + WIDTH, … of the
    group's (p, k) in order (chunk k holds min(chunk, L − k·chunk) values), then the slot tree."""
    sn = cuda.shared.array(WIDTH, float64)
    smu = cuda.shared.array(WIDTH, float64)
    sm2 = cuda.shared.array(WIDTH, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    P, G, K = pmean.shape
    Pm = mean.shape[0]
    items = (P if Pm == 1 else 1) * K
    for u in range(cuda.blockIdx.x, Pm * G, cuda.gridDim.x):
        pm = u // G
        g = u - pm * G
        p0 = 0 if Pm == 1 else pm
        for s in range(t, WIDTH, nt):
            n = 0.0
            mu = 0.0
            M2 = 0.0
            for j in range(s, items, WIDTH):
                dp = j // K
                k = j - dp * K
                n, mu, M2 = merge_into(n, mu, M2, float64(min(chunk, L - k * chunk)), pmean[p0 + dp, g, k],
                                       pm2[p0 + dp, g, k])
            sn[s] = n
            smu[s] = mu
            sm2[s] = M2
        _tree_chan(sn, smu, sm2, WIDTH, 1, t, nt)
        if t == 0:
            mean[pm, g] = smu[0]
            m2[pm, g] = sm2[0]


@cuda.jit(cache=True)
def _merge_lane_serial(pmean, pm2, chunk, L, mean, m2):
    """Stage 2, lanes, few partials per group: one thread per group (pm, g) merges its (p, k) in order."""
    P, G, K = pmean.shape
    Pm = mean.shape[0]
    for it in range(cuda.grid(1), Pm * G, cuda.gridsize(1)):
        pm = it // G
        g = it - pm * G
        p0 = 0 if Pm == 1 else pm
        p1 = P if Pm == 1 else pm + 1
        n = 0.0
        mu = 0.0
        M2 = 0.0
        for p in range(p0, p1):
            for k in range(K):
                n, mu, M2 = merge_into(n, mu, M2, float64(min(chunk, L - k * chunk)), pmean[p, g, k], pm2[p, g, k])
        mean[pm, g] = mu
        m2[pm, g] = M2


@cuda.jit(cache=True)
def _merge_column(pmean, pm2, chunk, Q, tc, cg, mean, m2):
    """Stage 2, columns: block per (pm, tile of tc columns); slot (r, c) Chan-merges the partial rows
    j = r, r + rs, … of (p, k) for its column (coalesced across c), then the tree over r.  cg == 1: the
    column is the group → mean/m2; else the column's moments go to pmean[p0, 0, l] for _merge_groups."""
    sn = cuda.shared.array(WIDTH, float64)
    smu = cuda.shared.array(WIDTH, float64)
    sm2 = cuda.shared.array(WIDTH, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    P, K, L = pmean.shape
    Pm = mean.shape[0]
    rs = WIDTH // tc
    ntiles = (L + tc - 1) // tc
    items = (P if Pm == 1 else 1) * K
    for u in range(cuda.blockIdx.x, Pm * ntiles, cuda.gridDim.x):
        pm = u // ntiles
        tile = u - pm * ntiles
        p0 = 0 if Pm == 1 else pm
        for s in range(t, rs * tc, nt):
            r = s // tc
            l = tile * tc + s - r * tc
            n = 0.0
            mu = 0.0
            M2 = 0.0
            if l < L:
                for j in range(r, items, rs):
                    dp = j // K
                    k = j - dp * K
                    n, mu, M2 = merge_into(n, mu, M2, float64(min(chunk, Q - k * chunk)), pmean[p0 + dp, k, l],
                                           pm2[p0 + dp, k, l])
            sn[s] = n
            smu[s] = mu
            sm2[s] = M2
        _tree_chan(sn, smu, sm2, rs, tc, t, nt)
        for c in range(t, tc, nt):
            l = tile * tc + c
            if l < L:
                if cg == 1:
                    mean[pm, l] = smu[c]
                    m2[pm, l] = sm2[c]
                else:       # this block alone reads and writes column l of sample p0's partials
                    pmean[p0, 0, l] = smu[c]
                    pm2[p0, 0, l] = sm2[c]


@cuda.jit(cache=True)
def _merge_groups(pmean, pm2, cg, ncol, mean, m2):
    """Stage 3 (column groups of cg > 1 columns, group norm): one thread per group merges its columns'
    moments (ncol values each, left in pmean[p0, 0, :] by _merge_column) in order."""
    Pm, G = mean.shape
    for it in range(cuda.grid(1), Pm * G, cuda.gridsize(1)):
        pm = it // G
        g = it - pm * G
        p0 = 0 if Pm == 1 else pm
        n = 0.0
        mu = 0.0
        M2 = 0.0
        for l in range(g * cg, (g + 1) * cg):
            n, mu, M2 = merge_into(n, mu, M2, ncol, pmean[p0, 0, l], pm2[p0, 0, l])
        mean[pm, g] = mu
        m2[pm, g] = M2


@cuda.jit(cache=True)
def _normalize(x1, Q, L, lt, rows, mode, mean, scale, shift, weight, bias, y1):
    """y = (x − mean)·scale + shift in float64 (ROW: (x − mean)·scale·weight[l] + bias[l]), rounded once."""
    t = cuda.threadIdx.x
    rr = t // lt
    if rr >= rows:
        return
    l0 = t - rr * lt
    R = x1.size // L
    nlt = (L + lt - 1) // lt
    span = rows * EW_STEPS
    bc = mean.shape[0] == 1
    for u in range(cuda.blockIdx.x, ((R + span - 1) // span) * nlt, cuda.gridDim.x):
        rt = u // nlt
        l = (u - rt * nlt) * lt + l0
        r = rt * span + rr
        p = r // Q
        q = r - p * Q
        for _ in range(EW_STEPS):
            if r >= R or l >= L:
                break
            pc = 0 if bc else p
            i = r * L + l
            v = x1[i]
            if mode == COLUMN:
                y1[i] = (v - mean[pc, l]) * scale[pc, l] + shift[pc, l]
            elif mode == LANE:
                y1[i] = (v - mean[pc, q]) * scale[pc, q] + shift[pc, q]
            else:
                y1[i] = (v - mean[pc, q]) * scale[pc, q] * weight[l] + bias[l]
            r += rows
            q += rows
            if q >= Q:
                p += q // Q
                q = q % Q


@cuda.jit(cache=True)
def _apply(dy1, x1, Q, L, lt, rows, mode, ca, cb, cc, weight, dx1):
    """dx = dy·A + x·B + C in float64 (ROW: dy·A·weight[l] + x·B + C); same walk as _normalize."""
    t = cuda.threadIdx.x
    rr = t // lt
    if rr >= rows:
        return
    l0 = t - rr * lt
    R = x1.size // L
    nlt = (L + lt - 1) // lt
    span = rows * EW_STEPS
    bc = ca.shape[0] == 1
    for u in range(cuda.blockIdx.x, ((R + span - 1) // span) * nlt, cuda.gridDim.x):
        rt = u // nlt
        l = (u - rt * nlt) * lt + l0
        r = rt * span + rr
        p = r // Q
        q = r - p * Q
        for _ in range(EW_STEPS):
            if r >= R or l >= L:
                break
            pc = 0 if bc else p
            i = r * L + l
            d = dy1[i]
            v = x1[i]
            if mode == COLUMN:
                dx1[i] = d * ca[pc, l] + v * cb[pc, l] + cc[pc, l]
            elif mode == LANE:
                dx1[i] = d * ca[pc, q] + v * cb[pc, q] + cc[pc, q]
            else:
                dx1[i] = d * ca[pc, q] * weight[l] + v * cb[pc, q] + cc[pc, q]
            r += rows
            q += rows
            if q >= Q:
                p += q // Q
                q = q % Q


@cuda.jit(cache=True)
def _sums_lane(dy1, x1, Q, L, K, chunk, mean, rstd, weight, weighted, oa, ob):
    """Block per chunk u of lane x3[p, q, :]: oa[u] = Σ dy, ob[u] = rstd·Σ dy·(x − mean)   (LANE), or
    with g = dy·weight[l]: oa[u] = Σ g, ob[u] = Σ g·x̂   (weighted: layer/RMS norm's per-row sums)."""
    sa = cuda.shared.array(WIDTH, float64)
    sb = cuda.shared.array(WIDTH, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    bc = mean.shape[0] == 1
    for u in range(cuda.blockIdx.x, oa.size, cuda.gridDim.x):
        row = u // K
        k = u - row * K
        p = row // Q
        q = row - p * Q
        pc = 0 if bc else p
        m0 = mean[pc, q]
        r0 = rstd[pc, q]
        base = row * L
        hi = base + min((k + 1) * chunk, L)
        for s in range(t, WIDTH, nt):
            s1 = 0.0
            s2 = 0.0
            i = base + k * chunk + s
            if weighted:
                while i < hi:
                    g = dy1[i] * weight[i - base]
                    s1 += g
                    s2 += g * ((x1[i] - m0) * r0)
                    i += WIDTH
            else:
                while i < hi:
                    d = float64(dy1[i])
                    s1 += d
                    s2 += d * (x1[i] - m0)
                    i += WIDTH
            sa[s] = s1
            sb[s] = s2
        _tree_sum(sa, sb, WIDTH, 1, t, nt)
        if t == 0:
            oa[u] = sa[0]
            ob[u] = sb[0] if weighted else sb[0] * r0


@cuda.jit(cache=True)
def _sums_column(dy1, x1, Q, L, K, chunk, tc, row_stats, mean, rstd, pa, pb):
    """Block per (p, k, column tile): pa[p, k, l] = Σ dy, pb[p, k, l] = Σ dy·x̂ over the chunk's rows;
    x̂ = (x − mean)·rstd with per-column stats (COLUMN) or per-row stats (row_stats: layer/RMS norm)."""
    sa = cuda.shared.array(WIDTH, float64)
    sb = cuda.shared.array(WIDTH, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    P = pa.shape[0]
    bc = mean.shape[0] == 1
    rs = WIDTH // tc
    ntiles = (L + tc - 1) // tc
    for u in range(cuda.blockIdx.x, P * K * ntiles, cuda.gridDim.x):
        pk = u // ntiles
        tile = u - pk * ntiles
        p = pk // K
        k = pk - p * K
        pc = 0 if bc else p
        rhi = min(k * chunk + chunk, Q)
        for s in range(t, rs * tc, nt):
            r = s // tc
            l = tile * tc + s - r * tc
            s1 = 0.0
            s2 = 0.0
            if l < L:
                q = k * chunk + r
                if row_stats:
                    while q < rhi:
                        i = (p * Q + q) * L + l
                        d = float64(dy1[i])
                        s1 += d
                        s2 += d * ((x1[i] - mean[pc, q]) * rstd[pc, q])
                        q += rs
                else:
                    m = mean[pc, l]
                    rl = rstd[pc, l]
                    while q < rhi:
                        i = (p * Q + q) * L + l
                        d = float64(dy1[i])
                        s1 += d
                        s2 += d * (x1[i] - m) * rl
                        q += rs
            sa[s] = s1
            sb[s] = s2
        _tree_sum(sa, sb, rs, tc, t, nt)
        for c in range(t, tc, nt):
            l = tile * tc + c
            if l < L:
                pa[p, k, l] = sa[c]
                pb[p, k, l] = sb[c]


@cuda.jit(cache=True)
def _merge_lane_sums(pa, pb, sum_dy, sum_dyx):
    """Stage 2 of the backward sums, lanes: block per (pc, j); slot s sums the partials s, s + WIDTH, … of
    (p, k) in order, then the slot tree."""
    sa = cuda.shared.array(WIDTH, float64)
    sb = cuda.shared.array(WIDTH, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    P, X, K = pa.shape
    Pc = sum_dy.shape[0]
    items = (P if Pc == 1 else 1) * K
    for u in range(cuda.blockIdx.x, Pc * X, cuda.gridDim.x):
        pc = u // X
        j = u - pc * X
        p0 = 0 if Pc == 1 else pc
        for s in range(t, WIDTH, nt):
            s1 = 0.0
            s2 = 0.0
            for i in range(s, items, WIDTH):
                dp = i // K
                k = i - dp * K
                s1 += pa[p0 + dp, j, k]
                s2 += pb[p0 + dp, j, k]
            sa[s] = s1
            sb[s] = s2
        _tree_sum(sa, sb, WIDTH, 1, t, nt)
        if t == 0:
            sum_dy[pc, j] = sa[0]
            sum_dyx[pc, j] = sb[0]


@cuda.jit(cache=True)
def _merge_lane_sums_serial(pa, pb, sum_dy, sum_dyx):
    """Stage 2 of the backward sums, lanes, few partials: one thread per (pc, j) sums its (p, k) in order."""
    P, X, K = pa.shape
    Pc = sum_dy.shape[0]
    for it in range(cuda.grid(1), Pc * X, cuda.gridsize(1)):
        pc = it // X
        j = it - pc * X
        p0 = 0 if Pc == 1 else pc
        p1 = P if Pc == 1 else pc + 1
        s1 = 0.0
        s2 = 0.0
        for p in range(p0, p1):
            for k in range(K):
                s1 += pa[p, j, k]
                s2 += pb[p, j, k]
        sum_dy[pc, j] = s1
        sum_dyx[pc, j] = s2


@cuda.jit(cache=True)
def _merge_column_sums(pa, pb, tc, sum_dy, sum_dyx):
    """Stage 2 of the backward sums, columns: block per (pc, tile of tc columns); slot (r, c) sums the
    partial rows r, r + rs, … of (p, k) for its column (coalesced across c), then the tree over r."""
    sa = cuda.shared.array(WIDTH, float64)
    sb = cuda.shared.array(WIDTH, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    P, K, L = pa.shape
    Pc = sum_dy.shape[0]
    rs = WIDTH // tc
    ntiles = (L + tc - 1) // tc
    items = (P if Pc == 1 else 1) * K
    for u in range(cuda.blockIdx.x, Pc * ntiles, cuda.gridDim.x):
        pc = u // ntiles
        tile = u - pc * ntiles
        p0 = 0 if Pc == 1 else pc
        for s in range(t, rs * tc, nt):
            r = s // tc
            l = tile * tc + s - r * tc
            s1 = 0.0
            s2 = 0.0
            if l < L:
                for i in range(r, items, rs):
                    dp = i // K
                    k = i - dp * K
                    s1 += pa[p0 + dp, k, l]
                    s2 += pb[p0 + dp, k, l]
            sa[s] = s1
            sb[s] = s2
        _tree_sum(sa, sb, rs, tc, t, nt)
        for c in range(t, tc, nt):
            l = tile * tc + c
            if l < L:
                sum_dy[pc, l] = sa[c]
                sum_dyx[pc, l] = sb[c]


@cuda.jit(cache=True)
def _copy8(src, dst, shape):
    """dst[idx] = src[idx] (with dst's dtype) for two strided 8-D arrays of ``shape``: layout changes and
    the float16 ↔ float32 conversions.  A fallback path: 8 index divisions per element."""
    n = 1
    for d in range(8):
        n *= shape[d]
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        r = i
        i7 = r % shape[7]
        r //= shape[7]
        i6 = r % shape[6]
        r //= shape[6]
        i5 = r % shape[5]
        r //= shape[5]
        i4 = r % shape[4]
        r //= shape[4]
        i3 = r % shape[3]
        r //= shape[3]
        i2 = r % shape[2]
        r //= shape[2]
        i1 = r % shape[1]
        i0 = r // shape[1]
        dst[i0, i1, i2, i3, i4, i5, i6, i7] = src[i0, i1, i2, i3, i4, i5, i6, i7]


# ================================================================= launchers (the _cpu signatures)

def _threads():
    t = THREADS
    if not (isinstance(t, int) and 1 <= t <= 1024):
        raise ValueError(f"fastnorm._cuda.THREADS must be an int in 1..1024, got {t!r}")
    return t


def _blocks(kernel, units):
    """kernel[grid, block] with one block per work unit (capped at MAX_BLOCKS; kernels loop over units)."""
    return kernel[max(1, min(units, MAX_BLOCKS)), _threads()]


def _per_thread(kernel, items):
    """kernel[grid, block] with one thread per item."""
    t = _threads()
    return kernel[max(1, min(-(-items // t), MAX_BLOCKS)), t]


def _flat(a):
    return a.reshape(a.size)


def _ew_layout(L):
    """Elementwise walk: lt threads along a row, ``rows`` rows per block step (whole rows when short)."""
    t = _threads()
    lt = t if L >= t else L
    return lt, t // lt


def _ew_units(P, Q, L, lt, rows):
    span = rows * EW_STEPS
    return -(-(P * Q) // span) * -(-L // lt)


def moments(x3, lane, cg, chunk, pmean, pm2, mean, m2):
    """Per-group mean and M2 (see ``_cpu.moments``): stage-1 blocks write pmean/pm2, stage-2 blocks merge
    them per group.  2 launches (3 for channels-last group norm); reads x once."""
    P, Q, L = x3.shape
    x1 = _flat(x3)
    (dmean, dm2), finish = _outputs(mean, m2)
    groups = mean.shape[0] * mean.shape[1]
    if lane:
        K = pmean.shape[2]
        _blocks(_moments_lane, P * Q * K)(x1, Q, L, K, chunk, _flat(pmean), _flat(pm2))
        if (P if mean.shape[0] == 1 else 1) * K <= SERIAL_MERGE:
            _per_thread(_merge_lane_serial, groups)(pmean, pm2, chunk, L, dmean, dm2)
        else:
            _blocks(_merge_lane, groups)(pmean, pm2, chunk, L, dmean, dm2)
    else:
        K = pmean.shape[1]
        tc = min(L, TILE, WIDTH)
        _blocks(_moments_column, P * K * -(-L // tc))(x1, Q, L, K, chunk, tc, pmean, pm2)
        _blocks(_merge_column, mean.shape[0] * -(-L // tc))(pmean, pm2, chunk, Q, tc, cg, dmean, dm2)
        if cg > 1:
            ncol = float((P if mean.shape[0] == 1 else 1) * Q)
            _per_thread(_merge_groups, groups)(pmean, pm2, cg, ncol, dmean, dm2)
    finish()


def normalize(x3, mode, mean, scale, shift, weight, bias, y3):
    """y = (x − mean)·scale + shift (see ``_cpu.normalize``).  1 launch; reads x, writes y."""
    P, Q, L = x3.shape
    mean, scale, shift, weight, bias = _inputs(mean, scale, shift, weight, bias)
    lt, rows = _ew_layout(L)
    _blocks(_normalize, _ew_units(P, Q, L, lt, rows))(_flat(x3), Q, L, lt, rows, mode, mean, scale, shift,
                                                      weight, bias, _flat(y3))


def backward_reduce(dy3, x3, mode, chunk, mean, rstd, weight, pa, pb, sum_dy, sum_dyx, row_g, row_gx):
    """Σ dy and Σ dy·x̂ per coefficient (see ``_cpu.backward_reduce``).  LANE/COLUMN: 2 launches reading
    dy and x once.  ROW: 3 launches — the per-row sums (row_g, row_gx) are a second pass over dy and x
    with one block per row, as ATen's layer-norm backward, instead of the CPU's fused loop."""
    P, Q, L = x3.shape
    mean, rstd, weight = _inputs(mean, rstd, weight)
    row = mode == ROW
    outs, finish = _outputs(*((sum_dy, sum_dyx, row_g, row_gx) if row else (sum_dy, sum_dyx)))
    x1, dy1 = _flat(x3), _flat(dy3)
    if mode == LANE:
        K = pa.shape[2]
        _blocks(_sums_lane, P * Q * K)(dy1, x1, Q, L, K, chunk, mean, rstd, weight, False, _flat(pa), _flat(pb))
        if (P if sum_dy.shape[0] == 1 else 1) * K <= SERIAL_MERGE:
            _per_thread(_merge_lane_sums_serial, sum_dy.size)(pa, pb, outs[0], outs[1])
        else:
            _blocks(_merge_lane_sums, sum_dy.size)(pa, pb, outs[0], outs[1])
    else:
        K = pa.shape[1]
        tc = min(L, TILE, WIDTH)
        _blocks(_sums_column, P * K * -(-L // tc))(dy1, x1, Q, L, K, chunk, tc, row, mean, rstd, pa, pb)
        _blocks(_merge_column_sums, sum_dy.shape[0] * -(-L // tc))(pa, pb, tc, outs[0], outs[1])
        if row:
            _blocks(_sums_lane, P * Q)(dy1, x1, Q, L, 1, L, mean, rstd, weight, True, _flat(outs[2]),
                                       _flat(outs[3]))
    finish()


def backward_apply(dy3, x3, mode, ca, cb, cc, weight, dx3):
    """dx = dy·A + x·B + C (see ``_cpu.backward_apply``).  1 launch; reads dy and x, writes dx."""
    P, Q, L = x3.shape
    ca, cb, cc, weight = _inputs(ca, cb, cc, weight)
    lt, rows = _ew_layout(L)
    _blocks(_apply, _ew_units(P, Q, L, lt, rows))(_flat(dy3), _flat(x3), Q, L, lt, rows, mode, ca, cb, cc,
                                                  weight, _flat(dx3))


# ================================================================= small transfers

def _inputs(*arrays):
    """Device arrays for a launch: NumPy arrays (small per-group values) go up as float64 in one packed
    host→device copy; device arrays pass through."""
    host = [a for a in arrays if isinstance(a, np.ndarray)]
    if not host:
        return [as_device(a) for a in arrays]
    buf = np.concatenate([np.asarray(a, np.float64).ravel() for a in host])
    dbuf = cuda.to_device(buf)
    out, o = [], 0
    for a in arrays:
        if isinstance(a, np.ndarray):
            out.append(dbuf[o:o + a.size].reshape(a.shape))
            o += a.size
        else:
            out.append(as_device(a))
    return out


def _outputs(*arrays):
    """(device arrays to write, finish): NumPy arrays get slices of one float64 device buffer, which
    ``finish()`` copies back in one device→host copy; device arrays pass through."""
    host = [a for a in arrays if isinstance(a, np.ndarray)]
    if not host:
        return [as_device(a) for a in arrays], lambda: None
    dbuf = cuda.device_array(sum(a.size for a in host), np.float64)
    out, spans, o = [], [], 0
    for a in arrays:
        if isinstance(a, np.ndarray):
            out.append(dbuf[o:o + a.size].reshape(a.shape))
            spans.append((a, o))
            o += a.size
        else:
            out.append(as_device(a))

    def finish():
        hbuf = dbuf.copy_to_host()
        for a, o in spans:
            a[...] = hbuf[o:o + a.size].reshape(a.shape)
    return out, finish


# ================================================================= device arrays: views, copies, transfers

def as_device(a):
    """A numba device array for any ``__cuda_array_interface__`` object (zero-copy); None stays None."""
    if a is None or getattr(type(a), "__cuda_ndarray__", False):
        return a
    return cuda.as_cuda_array(a)


def empty(shape, dtype=np.float64):
    """The CUDA backend's allocator (``np.empty``'s counterpart)."""
    return cuda.device_array(tuple(shape), np.dtype(dtype))


def _strided(a, shape, strides):
    """A view of a's memory from its element [0, …, 0] with new shape and byte strides (no copy)."""
    if any(s < 0 for s in a.strides) or any(s < 0 for s in strides):
        raise ValueError(f"device arrays with negative strides are not supported (strides {a.strides}); "
                         "pass a copy")
    if _SIM:
        return type(a)(np.lib.stride_tricks.as_strided(a._ary, tuple(shape), tuple(strides)))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    return DeviceNDArray(tuple(shape), tuple(strides), a.dtype, stream=a.stream, gpu_data=a.gpu_data)


def _transpose(a, perm):
    if tuple(perm) == tuple(range(len(perm))):
        return a
    return _strided(a, [a.shape[i] for i in perm], [a.strides[i] for i in perm])


def _contiguous(a):
    from ._plan import _is_c_contiguous
    return _is_c_contiguous((tuple(a.shape), tuple(a.strides)), a.dtype.itemsize)


def _reshape(a, shape):
    """Contiguous a → shape, a view."""
    from ._plan import _c_strides
    return _strided(a, shape, _c_strides(shape, a.dtype.itemsize))


def copy(src, dst):
    """dst[...] = src (same shape, any strides, dst's dtype): one launch of the 8-D copy kernel."""
    shape = [int(n) for n in src.shape]
    if tuple(shape) != tuple(dst.shape):
        raise ValueError(f"copy: shapes {tuple(src.shape)} and {tuple(dst.shape)} differ")
    if not math.prod(shape):
        return
    dims = [(n, s, d) for n, s, d in zip(shape, src.strides, dst.strides) if n != 1]
    merged = []
    for n, s, d in dims:       # fuse a dim into the previous one where both arrays allow it
        if merged and merged[-1][1] == s * n and merged[-1][2] == d * n:
            merged[-1] = (merged[-1][0] * n, s, d)
        else:
            merged.append((n, s, d))
    if len(merged) > 8:
        raise NotImplementedError(f"device arrays with more than 8 non-mergeable dimensions are not "
                                  f"supported (shape {tuple(shape)})")
    merged = [(1, 0, 0)] * (8 - len(merged)) + merged
    shape8 = tuple(m[0] for m in merged)
    s8 = _strided(src, shape8, [m[1] for m in merged])
    d8 = _strided(dst, shape8, [m[2] for m in merged])
    _per_thread(_copy8, math.prod(shape8))(s8, d8, shape8)


def to3(view, a, dtype=None):
    """``View.to3`` on the device: the (P, Q, L) view, or a contiguous (converted) copy (1 launch)."""
    a = _transpose(as_device(a), view.perm)
    if (dtype is None or np.dtype(dtype) == a.dtype) and _contiguous(a):
        return _reshape(a, view.shape3)
    out = empty(a.shape, a.dtype if dtype is None else dtype)
    copy(a, out)
    return _reshape(out, view.shape3)


def view3(view, a):
    """``View.view3`` on the device: the (P, Q, L) view of ``a``, or None when that needs a copy."""
    a = _transpose(as_device(a), view.perm)
    return _reshape(a, view.shape3) if _contiguous(a) else None


def view_empty(view, dtype):
    """``View.empty`` on the device: laid out like the plan, returned in the input's axis order."""
    return _transpose(empty(view.moved_shape, dtype), view.inverse)


def put3(view, a3, dst):
    """dst (input's shape and axis order) ← a3 (the (P, Q, L) result), casting: 1 launch."""
    d = _transpose(as_device(dst), view.perm)
    copy(_reshape(a3, d.shape), d)


def to_host(a):
    """Device array → NumPy array (None stays None); a strided array is compacted on the device first."""
    if a is None:
        return None
    a = as_device(a)
    if not _contiguous(a):
        c = empty(a.shape, a.dtype)
        copy(a, c)
        a = c
    return a.copy_to_host()


def to_device(a):
    """NumPy array → new device array (None stays None)."""
    return None if a is None else cuda.to_device(np.ascontiguousarray(a))


def copy_to(dst, a):
    """Device array ``dst`` ← NumPy ``a`` in place (cast to dst's dtype), e.g. running statistics."""
    dst = as_device(dst)
    a = np.ascontiguousarray(np.asarray(a).reshape(dst.shape), dst.dtype)
    if _contiguous(dst):
        dst.copy_to_device(a)
    else:
        copy(cuda.to_device(a), dst)


# ================================================================= PTX signatures

def signatures(dtype):
    """(kernel, signature) for every kernel at input dtype ``dtype`` ('float32' or 'float64'): what
    ``cuda.compile_ptx(kernel.py_func, sig, cc=...)`` type-checks without a GPU (tests/test_cuda_ptx.py)."""
    x = f"{dtype}[::1]"
    c2 = "float64[:, ::1]"
    c3 = "float64[:, :, ::1]"
    c1 = "float64[::1]"
    i = "int64"
    s8 = ", ".join([":"] * 8)
    return [
        (_moments_lane, f"void({x}, {i}, {i}, {i}, {i}, {c1}, {c1})"),
        (_moments_column, f"void({x}, {i}, {i}, {i}, {i}, {i}, {c3}, {c3})"),
        (_merge_lane, f"void({c3}, {c3}, {i}, {i}, {c2}, {c2})"),
        (_merge_lane_serial, f"void({c3}, {c3}, {i}, {i}, {c2}, {c2})"),
        (_merge_column, f"void({c3}, {c3}, {i}, {i}, {i}, {i}, {c2}, {c2})"),
        (_merge_groups, f"void({c3}, {c3}, {i}, float64, {c2}, {c2})"),
        (_normalize, f"void({x}, {i}, {i}, {i}, {i}, {i}, {c2}, {c2}, {c2}, {c1}, {c1}, {x})"),
        (_apply, f"void({x}, {x}, {i}, {i}, {i}, {i}, {i}, {c2}, {c2}, {c2}, {c1}, {x})"),
        (_sums_lane, f"void({x}, {x}, {i}, {i}, {i}, {i}, {c2}, {c2}, {c1}, boolean, {c1}, {c1})"),
        (_sums_column, f"void({x}, {x}, {i}, {i}, {i}, {i}, {i}, boolean, {c2}, {c2}, {c3}, {c3})"),
        (_merge_lane_sums, f"void({c3}, {c3}, {c2}, {c2})"),
        (_merge_lane_sums_serial, f"void({c3}, {c3}, {c2}, {c2})"),
        (_merge_column_sums, f"void({c3}, {c3}, {i}, {c2}, {c2})"),
        (_copy8, f"void({dtype}[{s8}], {dtype}[{s8}], UniTuple(int64, 8))"),
        (_copy8, f"void(float16[{s8}], {dtype}[{s8}], UniTuple(int64, 8))"),
        (_copy8, f"void({dtype}[{s8}], float16[{s8}], UniTuple(int64, 8))"),
    ]
