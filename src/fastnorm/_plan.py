"""Validation, the canonical view of an input, and allocation — everything the kernels must not do.

A *plan* maps one input (shape, memory layout, channel axis, op) onto the kernels' contiguous
``(P, Q, L)`` view without copying it:

===============  ==================  ===========  ========================  ===========
op               memory              view         group                     coefficient
===============  ==================  ===========  ========================  ===========
batch norm       channels-first      (N, C, S)    lane, merged over N       LANE (1, C)
batch norm       channels-last/2-D   (1, N·S, C)  column                    COLUMN (1, C)
instance norm    channels-first      (N, C, S)    lane                      LANE (N, C)
instance norm    channels-last       (N, S, C)    column                    COLUMN (N, C)
group norm       channels-first      (N, G, Cg·S) lane (apply: (N, C, S))   LANE (N, C)
group norm       channels-last       (N, S, C)    Cg columns                COLUMN (N, C)
layer/RMS norm   any                 (1, rows, D) lane                      ROW (1, rows)
===============  ==================  ===========  ========================  ===========

*fused*: a per-sample group that fits in cache — a lane group that fits in one chunk (layer/RMS/
instance norm, channels-first group norm), or a whole sample of channels-last instance/group norm (see
``FUSED_SAMPLE_BYTES``) — is normalized by ``normalize_groups`` in the same sweep as its statistics,
2× the input's bytes instead of 3×.  The lane groups take ``backward_fused`` in training too: 3×
instead of 5×.

The layout is read from the strides, not from ``axis``: an ``axis=1`` array stored channels-last (a
transposed view, as PyTorch's ``channels_last``) is used as it lies.  Only an array that is neither
gets one contiguous copy.
"""
import math
import os
import sys
import threading
from functools import lru_cache

import numpy as np

from . import _cpu

# Elements per reduction chunk: 32768 float32 = 128 KiB, which stays in L2 between the two passes of
# the moments kernel.  It follows the problem, never the thread count (bitwise reproducibility).
CHUNK = 32768

# Channels-last instance/group norm fuses its forward a whole sample at a time (one sample per prange
# iteration) when there are enough samples to share out and each fits in a core's share of the
# last-level cache until it is normalized.  Group norm G=32, float32, 2 cores, fused vs unfused:
# (32, 56, 56, 64) 6.4 → 4.9 ms, (8, 64, 64, 320) (5 MiB samples) 9.3 → 8.0, (4, 56, 56, 64) 0.66 →
# 0.33; but one sample leaves a core idle, (1, 128, 128, 128) 1.8 → 2.6 ms, and (3, 128, 128, 128)
# (8 MiB samples) is even.  A rule on the shape alone: the route (and so the bits) never follows
# the thread count.
FUSED_MIN_SAMPLES = 4
FUSED_SAMPLE_BYTES = 6 << 20

# float32 first: ``dtype in _FLOATS`` tests identity, then ==, element by element; a float32 array's
# check takes 72 ns in this order and 123 ns with float16 first (a call makes five such checks).
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))
_PARAM_FLOATS = _FLOATS


# ---------------------------------------------------------------- validation

def is_device(a):
    """A CUDA device array: ``__cuda_array_interface__`` (numba, CuPy), or the CUDA simulator's array
    (numba's ``__cuda_ndarray__`` marker: the simulator's arrays have no interface)."""
    if isinstance(a, np.ndarray):
        return False
    return hasattr(a, "__cuda_array_interface__") or getattr(type(a), "__cuda_ndarray__", False)


_CUDA = None


def kernels(backend):
    """The kernel module of a backend: ``_cpu``, or ``_cuda`` — imported here, on the first device array,
    so importing fastnorm never imports numba.cuda.  CUDA unusable in this process → one RuntimeError."""
    global _CUDA
    if backend == "cpu":
        return _cpu
    if _CUDA is None:
        try:
            from . import _cuda
        except ImportError as e:
            raise RuntimeError(f"fastnorm got CUDA device arrays, but its CUDA backend needs numba-cuda "
                               f"(pip install 'fastnorm[cuda]'): {e}") from e
        _cuda.check_available()
        _CUDA = _cuda
    return _CUDA


def empty(backend, shape, dtype=np.dtype(np.float64)):
    """The backend's allocator for kernel partials and temporaries: ``new_array``, or a device array."""
    return new_array(shape, dtype) if backend == "cpu" else kernels(backend).empty(shape, dtype)


# ---------------------------------------------------------------- large outputs
#
# glibc serves every allocation of 32 MiB or more (the ceiling of its mmap threshold) with fresh pages,
# which the kernel zeroes on first touch: in one bench run here, layer norm of (8192, 1024) float32 took
# 8.4 ms with a new output and 4.9 ms with a preallocated out=, and torch pays the same.  So fastnorm
# keeps the last REUSE_SLOTS large buffers it allocated for outputs and hands one out again once no
# array refers to it.  Every NumPy view of a buffer — the result, y[::2], y.T, a memoryview, an array
# made from that — holds the buffer as its ``.base``, so the buffer's reference count says whether
# anything still uses it; a buffer in use is never handed out, and what fastnorm hands out is always
# overwritten whole.  Outputs below REUSE_MIN_BYTES are plain np.empty (malloc reuses those itself).
REUSE_MIN_BYTES = 32 << 20
REUSE_SLOTS = 4
# Input copies (``View.to3``: a strided or transposed input, or dy) are kept from 4 MiB on.  glibc trims
# its heap when the free block at its top passes twice its mmap threshold, so a copy and an output of
# 25 MiB each, freed together, came back as fresh pages on the next call: batch norm of a
# (32, 64, 56, 112)[..., :56] slice, forward+backward, 16.6 ms with copies kept from 32 MiB, 11.3 ms
# from 4 MiB (forward 5.2 → 4.6; transposed or smaller copies even), interleaved in one process.  For
# outputs the same change measured mixed (0.90–1.23), so they stay at REUSE_MIN_BYTES.
COPY_MIN_BYTES = 4 << 20
_reusable = []                      # uint8 buffers, each referenced only from here when free
_reuse_lock = threading.Lock()


def _free_refs():
    probe = [np.empty(0, np.uint8)]
    return sys.getrefcount(probe[0])         # the list's reference and getrefcount's argument


_FREE = _free_refs()


def _after_fork():
    """A child forked while another thread held the lock would wait on it forever."""
    global _reuse_lock
    _reuse_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def new_array(shape, dtype, size=None, min_bytes=None):
    """``np.empty(shape, dtype)``; at ``min_bytes`` (default REUSE_MIN_BYTES) or more, in a kept buffer
    of an earlier one that nothing refers to any more when one of that size is kept (see above).
    ``dtype``: an ``np.dtype`` (every caller has one; converting cost ~0.1 µs of a tiny call).
    ``size``: the element count when the caller knows it (saves math.prod, ~0.1 µs of a tiny call)."""
    nbytes = (math.prod(shape) if size is None else size) * dtype.itemsize
    if nbytes < (REUSE_MIN_BYTES if min_bytes is None else min_bytes):
        return np.empty(shape, dtype)
    with _reuse_lock:
        free = None
        for i in range(len(_reusable)):
            if sys.getrefcount(_reusable[i]) == _FREE:
                if _reusable[i].nbytes == nbytes:
                    return _reusable[i].view(dtype).reshape(shape)
                if free is None:
                    free = i
        buffer = np.empty(nbytes, np.uint8)
        if len(_reusable) < REUSE_SLOTS:
            _reusable.append(buffer)
        elif free is not None:              # replace a kept buffer nothing uses (it is freed now)
            _reusable[free] = buffer
        return buffer.view(dtype).reshape(shape)


def release_memory():
    """Forget every kept output buffer (see above); returns the bytes freed now, those of the buffers
    nothing referred to.  A buffer still in use is freed with the last array that refers to it."""
    with _reuse_lock:
        freed = sum(_reusable[i].nbytes for i in range(len(_reusable)) if sys.getrefcount(_reusable[i]) == _FREE)
        _reusable.clear()
    return freed


def on_host(*arrays):
    """True when every array argument is a NumPy array (or None): the common case, ~0.2 µs."""
    for a in arrays:
        if a is not None and type(a) is not np.ndarray:
            return False
    return True


def backend(**arrays):
    """'cpu' or 'cuda' for the array arguments of one call; mixing is a TypeError naming both sides."""
    given = {k: v for k, v in arrays.items() if v is not None}
    device = sorted(k for k, v in given.items() if is_device(v))
    if not device:
        return "cpu"
    host = sorted(k for k in given if k not in device)
    if host:
        raise TypeError(f"all array arguments must be on the same device: {', '.join(device)} on the GPU "
                        f"(__cuda_array_interface__) but {', '.join(host)} on the host (NumPy)")
    return "cuda"


# Each check starts with a fast path for the common valid call (a tiny call's whole budget is ~10 µs;
# these lines were 4 µs of it), then says exactly what is wrong.

def check_input(x, name="input"):
    if type(x) is np.ndarray and x.dtype in _FLOATS:
        return x
    if not (isinstance(x, np.ndarray) or is_device(x)):
        raise TypeError(f"{name} must be a NumPy array or a CUDA device array, got {type(x).__name__}")
    if np.dtype(x.dtype) not in _FLOATS:
        raise TypeError(f"{name} must be float16, float32 or float64, got dtype {np.dtype(x.dtype)}")
    return x


def check_param(p, name, shape):
    """weight/bias/running stats: None, or a float array of exactly ``shape``."""
    if p is None or (type(p) is np.ndarray and p.shape == shape and p.dtype in _PARAM_FLOATS):
        return p
    if not (isinstance(p, np.ndarray) or is_device(p)):
        raise TypeError(f"{name} must be a NumPy array or None, got {type(p).__name__}")
    if np.dtype(p.dtype) not in _PARAM_FLOATS:
        raise TypeError(f"{name} must be a float array, got dtype {np.dtype(p.dtype)}")
    if tuple(p.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(p.shape)}")
    return p


def check_running(running_mean, running_var, C, update):
    if running_mean is None and running_var is None:
        return
    if (type(running_mean) is np.ndarray and type(running_var) is np.ndarray and running_mean.shape == (C,)
            and running_var.shape == (C,) and running_mean.dtype in _PARAM_FLOATS
            and running_var.dtype in _PARAM_FLOATS
            and (not update or (running_mean.flags.writeable and running_var.flags.writeable))):
        return
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    check_param(running_mean, "running_mean", (C,))
    check_param(running_var, "running_var", (C,))
    if update and running_mean is not None:
        for name, a in (("running_mean", running_mean), ("running_var", running_var)):
            if isinstance(a, np.ndarray) and not a.flags.writeable:
                raise ValueError(f"{name} is read-only but must be updated in place when training "
                                 f"(shape {a.shape})")


def check_eps(eps, strict):
    if type(eps) is float and 0.0 < eps < math.inf:
        return eps
    if not isinstance(eps, (int, float, np.floating, np.integer)) or isinstance(eps, bool):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    if eps < 0 or (strict and eps <= 0) or not math.isfinite(eps):
        raise ValueError(f"eps must be {'> 0' if strict else '>= 0'} and finite, got {eps}")
    return float(eps)


def check_momentum(momentum, num_batches_tracked, update):
    """The running-average factor m: ``momentum``, or 1/num_batches_tracked when momentum is None."""
    if type(momentum) is float and 0.0 <= momentum <= 1.0:
        return momentum
    if momentum is None:
        if not update:
            return None
        if isinstance(num_batches_tracked, np.ndarray) and num_batches_tracked.ndim == 0:
            num_batches_tracked = num_batches_tracked.item()
        if not isinstance(num_batches_tracked, (int, np.integer)) or num_batches_tracked < 1:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked=<int >= 1, "
                             f"the count including this step>, got {num_batches_tracked!r}")
        return 1.0 / int(num_batches_tracked)
    if not isinstance(momentum, (int, float, np.floating, np.integer)) or isinstance(momentum, bool):
        raise TypeError(f"momentum must be a number or None, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return float(momentum)


def normalize_axis(axis, ndim, name="axis"):
    if type(axis) is int and -ndim < axis < ndim and axis != 0:
        return axis % ndim
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim or axis % ndim == 0:
        raise ValueError(f"{name}={axis} is out of range for an input of {ndim} dimensions: the channel "
                         f"axis must be one of 1..{ndim - 1} (or -1..-{ndim - 1}); axis 0 is the batch")
    return int(axis) % ndim


def check_out(out, x, dtype):
    if out is None:
        return None
    if not (isinstance(out, np.ndarray) or is_device(out)):
        raise TypeError(f"out must be a NumPy array, got {type(out).__name__}")
    if tuple(out.shape) != tuple(x.shape) or np.dtype(out.dtype) != dtype:
        raise ValueError(f"out must have shape {tuple(x.shape)} and dtype {dtype}, got shape "
                         f"{tuple(out.shape)} and dtype {np.dtype(out.dtype)}")
    if isinstance(out, np.ndarray):
        if not out.flags.writeable:
            raise ValueError(f"out is read-only (shape {out.shape})")
        alias = np.may_share_memory(out, x)
    else:
        alias = is_device(x) and _overlap(_byte_bounds(out), _byte_bounds(x))
    if alias:
        raise ValueError(f"out must not alias input (shape {tuple(x.shape)}); fastnorm never works in place")
    return out


def _byte_bounds(a):
    """[lo, hi) of the bytes a device array spans, from its ``__cuda_array_interface__`` (the CUDA
    simulator's arrays have none: the NumPy array they wrap answers ``__array_interface__``)."""
    face = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    ptr, shape = face["data"][0], tuple(face["shape"])
    itemsize = np.dtype(face["typestr"]).itemsize
    if math.prod(shape) == 0:
        return ptr, ptr
    strides = face.get("strides") or _c_strides(shape, itemsize)     # None: C-contiguous
    lo = hi = ptr
    for n, st in zip(shape, strides):
        if st < 0:
            lo += (n - 1) * st
        else:
            hi += (n - 1) * st
    return lo, hi + itemsize


def _overlap(a, b):
    """Whether two [lo, hi) byte ranges intersect (``np.may_share_memory``'s bounds test)."""
    return a[0] < b[1] and b[0] < a[1]


def per_channel_error(shape):
    return ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(shape)}")


# ---------------------------------------------------------------- the canonical view

class View:
    """One input's mapping onto the kernels (see the module table).  Cached per (shape, strides, op)."""

    __slots__ = ("perm", "inverse", "identity", "moved_shape", "shape3", "stats3", "lane", "cg", "chunk",
                 "parts", "stats_shape", "mode", "groups", "group_size", "channels", "per_sample", "rchunk",
                 "rparts", "fused", "size")

    # perm: the input's axes in memory order (channels moved to 1 or last), inverse: back again;
    # identity: perm is 0, 1, …, so the input's order already is the kernels' (no transpose at all).
    # transpose with a precomputed permutation costs ~0.3 µs; np.moveaxis ~5 µs (tiny shapes pay it).

    def to3(self, a, dtype):
        """a (the input's shape) → the contiguous (P, Q, L) view the kernels read, for the compute
        ``dtype``: of that dtype, or for float16 where the CPU converts half in hardware, its bits
        (uint16: ``_cpu.load``).  Copies only an array laid out otherwise, or of another dtype.  Device
        arrays: ``_cuda.to3``.

        The one copy goes into ``new_array``, kept from COPY_MIN_BYTES on: a large strided or transposed
        input took a fresh np.ascontiguousarray, whose page faults cost more than the op — layer norm of
        x[:, :1024] of an (8192, 2048) float32 array took 9.4 ms against 2.7 for a contiguous x, the
        copy alone 7.2 ms of it (3.8 into a reused buffer; a parallel copy kernel measured no faster,
        3.1 vs 3.3 ms: the copy is bound by memory)."""
        if a.dtype is dtype and self.identity and type(a) is np.ndarray and a.flags.c_contiguous:
            return a.reshape(self.shape3)        # the common call, first: 0.41 → 0.31 µs of a ~7 µs tiny call
        if not isinstance(a, np.ndarray):
            return kernels("cuda").to3(self, a, dtype)
        t = a if self.identity else a.transpose(self.perm)
        half = a.dtype == _F16 and dtype == _F32 and _cpu.HALF_IN_HARDWARE
        if t.flags.c_contiguous and (half or a.dtype == dtype):
            a3 = t.reshape(self.shape3)          # a view (no view of a non-contiguous t is contiguous)
        else:
            a3 = new_array(self.shape3, a.dtype if half else dtype, self.size, COPY_MIN_BYTES)
            np.copyto(a3.reshape(t.shape), t, casting="unsafe")
        return a3.view(_U16) if half else a3

    def view3(self, a):
        """Like to3, but None where ``a`` cannot be viewed without a copy (so results cannot be written into it)."""
        if not isinstance(a, np.ndarray):
            return kernels("cuda").view3(self, a)
        a = a.transpose(self.perm)
        return a.reshape(self.shape3) if a.flags.c_contiguous else None

    def empty(self, dtype, backend="cpu"):
        """A new output laid out like the planned view, returned in the input's axis order."""
        if backend != "cpu":
            return kernels(backend).view_empty(self, dtype)
        return new_array(self.moved_shape, dtype).transpose(self.inverse)

    def new3(self, dtype, backend="cpu"):
        """(a, a3): a new output in the input's axis order and its (P, Q, L) view, from one allocation."""
        if backend != "cpu":
            a = kernels(backend).view_empty(self, dtype)
            return a, kernels(backend).view3(self, a)
        a3 = new_array(self.shape3, dtype, self.size)
        return self.from3(a3), a3

    def from3(self, a3):
        """Inverse of to3 for a kernel result: the input's shape and axis order (a view, no copy)."""
        if self.identity:
            return a3.reshape(self.moved_shape)
        return a3.reshape(self.moved_shape).transpose(self.inverse)

    def put(self, a3, dst):
        """dst (the input's shape and axis order) ← the kernel result a3, cast to dst's dtype (float16
        bits are float16)."""
        if not isinstance(dst, np.ndarray):
            return kernels("cuda").put3(self, a3, dst)
        np.copyto(dst, self.from3(a3.view(_F16) if a3.dtype == _U16 else a3), casting="unsafe")


def _chunks(length):
    """Chunks of a lane of ``length`` elements."""
    return max(1, -(-length // CHUNK))


def _row_chunks(rows, width):
    """(rows per chunk, chunks) for blocks of whole rows of ``width`` columns, ~CHUNK elements each."""
    chunk = max(1, CHUNK // max(width, 1))
    return chunk, max(1, -(-rows // chunk))


@lru_cache(maxsize=512)
def _channel_view(shape, strides, itemsize, axis, op, groups):
    """op: 'batch' (reduce over N and spatial), 'instance' or 'group' (per sample)."""
    v = View()
    N, C = shape[0], shape[axis]
    S = math.prod(shape) // (N * C) if N * C else 0
    first = _is_c_contiguous(_moved(shape, strides, axis, 1), itemsize)
    last = not first and _is_c_contiguous(_moved(shape, strides, axis, len(shape) - 1), itemsize)
    if op == "batch" and not (first or last) and _is_c_contiguous((shape, strides), itemsize):
        # channels in the middle of a contiguous array: (A, C, B), every A and B reduced
        move = None
        N, S = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
        first = True
    else:
        move = len(shape) - 1 if last else 1
        first = not last                                # neither layout: to3 copies to channels-first
    _set_perm(v, len(shape), axis, move, shape)
    if op == "batch" and first and S == 1:
        first, last, S, N = False, True, N, 1           # (N, C) per-activation BN is a column reduction
    elif op == "batch" and last:
        S, N = N * S, 1                                 # the batch is just more rows
    G = groups if op == "group" else C
    v.groups, v.group_size, v.channels = G, C // G, C
    v.per_sample = op != "batch"
    v.lane = not last
    v.mode = _cpu.LANE if v.lane else _cpu.COLUMN
    v.shape3 = (N, C, S) if v.lane else (N, S, C)
    if v.lane:
        v.stats3 = (N, G, (C // G) * S)
        v.cg, v.chunk = 1, CHUNK
        v.parts = (N, G, _chunks((C // G) * S))
        v.fused = v.per_sample and v.parts[2] == 1
    else:
        v.fused = v.per_sample and N >= FUSED_MIN_SAMPLES and S * C * itemsize <= FUSED_SAMPLE_BYTES
        v.stats3 = v.shape3
        v.cg = C // G
        v.chunk, K = _row_chunks(S, C)
        v.parts = (N, K, C)
    v.stats_shape = (N if v.per_sample else 1, G)
    _backward_chunks(v)
    return v


@lru_cache(maxsize=512)
def _row_view(shape, ndim_normalized):
    v = View()
    D = math.prod(shape[len(shape) - ndim_normalized:])
    rows = math.prod(shape[:len(shape) - ndim_normalized])
    _set_perm(v, len(shape), None, None, shape)
    v.shape3 = v.stats3 = (1, rows, D)
    v.lane, v.cg, v.chunk = True, 1, CHUNK
    v.parts = (1, rows, _chunks(D))
    v.fused = v.parts[2] == 1
    v.stats_shape = (1, rows)
    v.mode = _cpu.ROW
    v.groups, v.group_size, v.channels, v.per_sample = rows, 1, D, True
    _backward_chunks(v)
    return v


def _backward_chunks(v):
    """backward_reduce partials: chunks of each lane (LANE), or chunks of rows × columns (COLUMN, ROW);
    and ``size``, the view's element count."""
    P, Q, L = v.shape3
    v.size = P * Q * L
    if v.mode == _cpu.LANE:
        v.rchunk, v.rparts = CHUNK, (P, Q, _chunks(L))
    else:
        v.rchunk, K = _row_chunks(Q, L)
        v.rparts = (P, K, L)


def _order(ndim, src, dst):
    """The axes 0..ndim−1 with axis ``src`` moved to position ``dst`` (np.moveaxis's permutation)."""
    order = [i for i in range(ndim) if i != src]
    order.insert(dst, src)
    return order


def _set_perm(v, ndim, axis, move, shape):
    order = list(range(ndim)) if move is None else _order(ndim, axis, move)
    v.perm = tuple(order)
    v.inverse = tuple(np.argsort(order).tolist())
    v.identity = v.perm == tuple(range(ndim))
    v.moved_shape = tuple(shape[i] for i in order)


def _moved(shape, strides, src, dst):
    order = _order(len(shape), src, dst)
    return tuple(shape[i] for i in order), tuple(strides[i] for i in order)


def _c_strides(shape, itemsize):
    """The byte strides of a C-contiguous array of ``shape``."""
    strides, s = [], itemsize
    for n in reversed(shape):
        strides.append(s)
        s *= max(n, 1)
    return tuple(reversed(strides))


def _is_c_contiguous(shape_strides, itemsize):
    shape, strides = shape_strides
    expected = itemsize
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def channel_view(x, axis, op, groups=None):
    return _channel_view(x.shape, x.strides, x.dtype.itemsize, axis, op, groups)   # device arrays: no .itemsize


def row_view(x, ndim_normalized):
    # layer/RMS norm read rows of the trailing dims: a non-contiguous input is copied once by to3
    return _row_view(x.shape, ndim_normalized)


_F16, _F32, _F64, _U16 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.uint16)


def compute_dtype(dtype):
    """float16 is computed in float32 and returned as float16 (the kernels read and write its bits, or
    without hardware conversion a converted copy)."""
    if dtype is _F32 or dtype is _F64:      # NumPy's built-in dtypes are singletons: 40 ns, not 170
        return dtype
    return _F32 if dtype == _F16 else np.dtype(dtype)
