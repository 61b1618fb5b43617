"""Public ops: validate → plan → dispatch.  Signatures and defaults follow ``torch.nn.functional``.

Every op is the same computation (``semantics.md``): per-group statistics, then

    y  = (x − mean)·scale + shift                        (scale = rstd·r·w, shift = d·w + b)
    dx = dy·A + x·B + C                                  (A = k·rstd·w, B = −k·rstd²·mean(g·x̂),
                                                          C = −k·rstd·mean(g) − mean·B, g = dy·w)

with k = r, d from batch renorm (1 and 0 otherwise).  The ops differ only in their plan (``_plan.py``:
which elements form a group) and in how they fold running statistics, so this module holds the
coefficient algebra once, on per-group arrays of a few thousand numbers — never a loop over data.
"""
import functools
import inspect
from typing import NamedTuple

import numpy as np

from . import _cpu, _plan

from ._math import backward_coefficients, forward_coefficients, merge_into, update_running
from ._plan import (_F64, _U16, check_eps, check_input, check_momentum, check_out, check_param, check_running,
                    compute_dtype, normalize_axis, per_channel_error)

__all__ = [
    "batch_norm", "batch_norm_forward", "batch_norm_backward",
    "batch_renorm", "batch_renorm_forward", "batch_renorm_backward",
    "instance_norm", "instance_norm_forward", "instance_norm_backward",
    "group_norm", "group_norm_forward", "group_norm_backward",
    "layer_norm", "layer_norm_forward", "layer_norm_backward",
    "rms_norm", "rms_norm_forward", "rms_norm_backward",
    "moments", "Moments",
]

_ONE = np.ones((1, 1))      # placeholders for kernel arguments a mode does not read
_ONE3 = np.ones((1, 1, 1))
# running_mean/running_var when there are none (never read): in the input's compute dtype, so that
# the coefficient algebra and the small-input drivers compile once per dtype, not twice (~1.5 s cold)
_NO_BUFFER = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0)}
_KERNEL_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class Context:
    """What a forward saves for its backward.  Treat as opaque; ``x`` is referenced, not copied."""

    __slots__ = ("view", "x3", "shape", "dtype", "n", "mean", "rstd", "k", "d", "batch_stats", "rms",
                 "weight", "bias", "w", "kw", "backend", "sync")


# ---------------------------------------------------------------- shared engine

def _expand(view, per_group):
    """(rows, G) per-group values → the kernels' coefficient layout: (rows, C) per channel, or as is."""
    if view.mode == _cpu.ROW or view.group_size == 1:
        return per_group
    return np.repeat(per_group, view.group_size, axis=1)


def _vector(param, length, fill, dtype):
    """weight/bias (C,) or normalized_shape → a contiguous vector of the input's compute ``dtype`` that
    the kernels read (and compute with in float64); None → ``fill`` (1 for weight, 0 for bias).  Only
    C-contiguous vectors of the compute dtype reach the kernels, so each kernel compiles once per input
    dtype, not once per parameter dtype and layout.  The usual parameters (the input's dtype) pass as
    they are: a float64 copy of each cost ~0.25 µs of a tiny call's ~10.  float64 parameters of a
    float32 input are rounded to float32 (relative 6e-8, below the output's own rounding)."""
    if param is None:
        return _filled(fill, length, dtype)
    if param.ndim != 1:
        param = param.reshape(-1)
    if param.dtype is dtype and param.flags.c_contiguous and param.flags.writeable:
        return param
    return param.astype(dtype)                      # a new contiguous, writeable vector


def _wide(param, vector, fill):
    """The weight/bias vector the CPU's parallel ``normalize_groups`` and ``apply`` read: ``vector``
    (``_vector``'s) widened to float64, exactly, so the results are the same bits.  Layer and RMS norm
    multiply x by weight[l] and add bias[l] per element, and a float32 vector cost a conversion per
    element at each use: layer norm (32, 197, 768) forward took 0.86-0.94× the time of the float32
    vectors in six of seven interleaved runs (one or two threads), 1.01× in the seventh.  The backward
    sums (``backward_fused``, ``backward_reduce``) keep ``vector``: with float64 weight the fused
    layer-norm backward ran 13% slower (one thread, 4.05 → 4.60 ms).  Only the parallel builds take it
    (``_forward``): the serial builds of tiny calls, and the GPU, take ``vector``.  The coefficient
    algebra keeps ``vector`` too, so each kernel and driver still compiles once per input dtype."""
    if vector.dtype is _F64:
        return vector
    if param is None:
        return _filled(fill, vector.size, _F64)
    return vector.astype(_F64)


@functools.lru_cache(maxsize=32)
def _filled(fill, length, dtype):
    """The vector of a missing weight (ones) or bias (zeros), made once per length and dtype: np.ones
    took 0.79 µs of a ~10 µs tiny call (np.zeros 0.14), the cached vector takes 0.09.  Every call
    shares it; kernels and the coefficient algebra only read weight/bias.  It stays writeable: a
    read-only array is another Numba type, and every kernel would compile again for it."""
    return np.full(length, fill, dtype)


def _buffer(running):
    """A running buffer as the coefficient algebra takes it: the array itself where it can be updated in
    place (float32/float64, contiguous, writeable), else a float64 copy for the caller to write back."""
    if running.dtype in _KERNEL_FLOATS and running.flags.c_contiguous and running.flags.writeable:
        return running
    return running.astype(np.float64)


def _forward(view, x, weight, bias, eps, *, out, batch_stats, running=None, momentum=None,
             renorm=None, rms=False, sync=None):
    """The one forward: statistics, ``forward_coefficients`` (rstd, batch-renorm r/d, running-stat
    update, coefficient layout), normalize.

    running: (running_mean, running_var) — normalizes with them unless batch_stats, and is updated in
    place when batch_stats and momentum is not None.  renorm: (rmax, dmax), training only.
    sync: an object whose ``stats(count, mean, m2)`` returns the statistics of the global batch and
    whose ``sums(sum_dy, sum_dyx)`` does the same for backward (``fastnorm.distributed``); None = local.
    Three routes, one computation: a per-sample group that fits in cache (``view.fused``) is normalized
    in the sweep that takes its statistics; a small CPU input runs ``_cpu.forward_small`` (the same
    steps in one compiled call); anything else takes the steps one kernel launch at a time.
    """
    if _plan.on_host(x, weight, bias, out, *(running or ())):
        backend, K = "cpu", _cpu
    else:
        backend = _plan.backend(input=x, weight=weight, bias=bias, out=out,
                                running_mean=None if running is None else running[0],
                                running_var=None if running is None else running[1])
        K = _plan.kernels(backend)      # _cpu, or _cuda (imported on the first device array)
    if backend == "cuda":               # the per-group algebra runs on host copies of the small arrays
        weight, bias, device_running = K.to_host(weight), K.to_host(bias), running
        running = None if running is None else (K.to_host(running[0]), K.to_host(running[1]))
    cdtype = compute_dtype(x.dtype)
    x3 = view.to3(x, cdtype)
    ngroups = view.stats_shape[0] * view.stats_shape[1]
    n = x.size // ngroups if ngroups else 0
    y, y3, temporary = _output(view, out, x.dtype, x3.dtype, backend)
    w, b = _vector(weight, view.channels, 1.0, cdtype), _vector(bias, view.channels, 0.0, cdtype)
    kw, kb = w, b                   # the kernels' weight and bias: float64 for the CPU's parallel builds
    if x.size >= _cpu.SERIAL_BELOW and backend == "cpu":
        kw, kb = _wide(weight, w, 1.0), _wide(bias, b, 0.0)
    none = _NO_BUFFER[cdtype]
    buffers = (none, none) if running is None else (_buffer(running[0]), _buffer(running[1]))
    m = -1.0 if momentum is None or not batch_stats or running is None else momentum     # < 0: no update
    rmax, dmax = (0.0, 0.0) if renorm is None else renorm
    # batch renorm's r and d, written whole by the coefficient algebra (read only when renorm is given)
    k, d = (_ONE, _ONE) if renorm is None else (np.empty((1, view.channels)), np.empty((1, view.channels)))

    if batch_stats and view.fused and backend == "cpu" and x.size:
        mean, m2, rstd = np.empty(view.stats_shape), np.empty(view.stats_shape), np.empty(view.stats_shape)
        same = view.stats3 == view.shape3           # all but channels-first group norm: the statistics view is x3
        work = _ONE3
        if view.mode == _cpu.COLUMN:    # per sample: its K chunks' column means and M2s, its column mean and scale
            P, K, C = view.parts
            work = np.empty((P, 2 * K + 2, C))
        _cpu.normalize_groups(x3 if same else x3.reshape(view.stats3), view.mode, view.group_size, view.chunk, eps,
                              rms, kw, kb, mean, m2, rstd, work, y3 if same else y3.reshape(view.stats3))
        if m >= 0:        # instance norm with running buffers
            update_running(*buffers, mean, m2, n, m)
    elif backend == "cpu" and sync is None and 0 < x.size < _cpu.SERIAL_BELOW:
        stats_shape = view.stats_shape if batch_stats else (1, view.channels)
        mean, rstd, m2 = np.empty(stats_shape), np.empty(stats_shape), np.empty(stats_shape)
        coef = (3, stats_shape[0], view.channels) if view.mode != _cpu.ROW else (3, 1, 1)
        _cpu.forward_small(x3, x3.reshape(view.stats3), view.lane, view.cg, view.chunk, view.mode, view.group_size,
                           n, eps, rms, batch_stats, *buffers, m, renorm is not None, rmax, dmax, w, b, mean, rstd,
                           k, d, m2, np.empty(coef), np.empty((2,) + view.parts if batch_stats else (2, 0, 0, 0)), y3)
    else:
        if batch_stats:
            mean, m2 = _moments(view, x3)
            if sync is not None:
                n, mean, m2 = sync.stats(n, mean, m2)
            if n == 0:    # nothing to normalize and nothing to learn from (PyTorch leaves the buffers alone)
                return y, _empty_context(view, x, weight, bias, sync)
        else:
            mean = m2 = np.empty((1, view.channels))
        rstd = np.empty(mean.shape)
        expand = view.mode != _cpu.ROW
        coef = (mean.shape[0], view.channels) if expand else (1, 1)
        mean_c, scale, shift = np.empty(coef), np.empty(coef), np.empty(coef)
        forward_coefficients(mean, m2, n, eps, rms, batch_stats, *buffers, m, renorm is not None, rmax, dmax, w, b,
                             view.group_size, expand, rstd, k, d, mean_c, scale, shift)
        if x.size:
            if expand:
                K.normalize(x3, view.mode, mean_c, scale, shift, kw, kb, y3)
            else:
                K.normalize(x3, view.mode, mean, rstd, rstd, kw, kb, y3)
    _finish(view, y, y3, temporary)
    if renorm is None:
        k = d = None        # the context's "no batch renorm"

    if m >= 0:
        for buf, new in zip(running, buffers):
            if new is not buf:        # a copy was updated (another dtype or layout, or a device buffer)
                buf[...] = new
        if backend == "cuda":           # the updated host copies go back into the device buffers
            K.copy_to(device_running[0], running[0])
            K.copy_to(device_running[1], running[1])

    ctx = Context()
    ctx.view, ctx.x3, ctx.shape, ctx.dtype, ctx.n = view, x3, x.shape, x.dtype, n
    ctx.mean, ctx.rstd, ctx.k, ctx.d = mean, rstd, k, d
    ctx.batch_stats, ctx.rms, ctx.weight, ctx.bias, ctx.w, ctx.kw = batch_stats, rms, weight, bias, w, kw
    ctx.backend, ctx.sync = backend, sync
    return y, ctx


def _output(view, out, dtype, kdtype, backend):
    """(result, out3, temporary): the array an op returns and the (P, Q, L) array its kernels write, of
    the kernels' dtype ``kdtype`` (that of x3: float16's bits are a uint16 view of a float16 result).
    out3 is a view of result — a new array laid out like the plan, or the user's ``out`` where it can be
    viewed so — or else a temporary (another layout, or float16 without hardware conversion) that
    ``_finish`` copies into result."""
    bits = kdtype is _U16                            # float16 bits (_plan.View.to3)
    if out is None and (dtype is kdtype or bits):    # the common case: a new array in the kernels' layout
        result, out3 = view.new3(dtype, backend)
    else:
        result = view.empty(dtype, backend) if out is None else out
        out3 = view.view3(result) if result.dtype == kdtype or bits else None
        if out3 is None:
            return result, _plan.empty(backend, view.shape3, kdtype), True
    return result, out3.view(_U16) if bits else out3, False


def _finish(view, result, out3, temporary):
    """result ← out3 when ``_output`` gave a temporary."""
    if temporary:
        view.put(out3, result)


def _empty_context(view, x, weight, bias, sync):
    """A context for a batch with no elements anywhere: its backward returns empty/zero gradients."""
    ctx = Context()
    ctx.view, ctx.x3, ctx.shape, ctx.dtype, ctx.n, ctx.sync = view, None, x.shape, x.dtype, 0, sync
    ctx.weight, ctx.bias = weight, bias
    ctx.backend = "cuda" if _plan.is_device(x) else "cpu"
    return ctx


def _moments(view, x3):
    """Per-group (mean, M2), float64 arrays of ``view.stats_shape``; zeros for an empty input."""
    mean, m2 = np.zeros(view.stats_shape), np.zeros(view.stats_shape)
    if x3.size:
        backend = "cpu" if isinstance(x3, np.ndarray) else "cuda"
        pmean, pm2 = _plan.empty(backend, view.parts), _plan.empty(backend, view.parts)
        _plan.kernels(backend).moments(x3.reshape(view.stats3), view.lane, view.cg, view.chunk, pmean, pm2,
                                       mean, m2)
    return mean, m2


def _backward(grad_output, ctx):
    """The one backward: Σdy and Σdy·x̂ per coefficient (one pass), ``backward_coefficients``, then dx
    (one pass) — by the same three routes as ``_forward``."""
    if not isinstance(ctx, Context):
        raise TypeError(f"ctx must be the context returned by the matching _forward, got {type(ctx).__name__}")
    check_input(grad_output, "grad_output")
    if tuple(grad_output.shape) != tuple(ctx.shape):
        raise ValueError(f"grad_output must have the input's shape {tuple(ctx.shape)}, got "
                         f"{tuple(grad_output.shape)}")
    view, x3 = ctx.view, ctx.x3
    if ctx.x3 is None:   # the whole (global) batch was empty: nothing flowed, so zero gradients
        zero = [None if p is None else np.zeros_like(p) for p in (ctx.weight, ctx.bias)]
        if ctx.backend == "cuda":       # ctx.weight/bias are host copies on this backend
            zero = [_plan.kernels("cuda").to_device(z) for z in zero]
        return view.empty(ctx.dtype, ctx.backend), zero[0], zero[1]
    if not _plan.on_host(grad_output, x3):
        _plan.backend(grad_output=grad_output, input=x3)
    K = _plan.kernels(ctx.backend)
    dy3 = view.to3(grad_output, compute_dtype(ctx.dtype))
    expand = view.mode != _cpu.ROW
    per_sample = ctx.batch_stats and view.per_sample and expand
    X = view.channels
    sums_shape = (view.stats_shape[0] if per_sample else 1, X)
    dx, dx3, temporary = _output(view, None, ctx.dtype, x3.dtype, ctx.backend)
    renorm = ctx.k is not None
    k, d = (ctx.k, ctx.d) if renorm else (_ONE, _ONE)

    if ctx.batch_stats and view.fused and view.lane and ctx.backend == "cpu" and x3.size:
        # the lane groups the forward fused take one fused backward too; ctx.k and ctx.sync are None here.
        # Below SERIAL_BELOW this runs backward_fused's serial build (1.6 s of cold compile); routing those
        # to backward_small instead took group norm (16, 64), G=32, fwd+bwd from 40 to 59 µs (its lanes
        # are 1 element long; the fused groups are 2) and layer norm over rows of 8 +3 µs of 23.
        sum_dy, sum_dyx = np.empty(sums_shape), np.empty(sums_shape)
        pa, pb = np.empty(view.rparts), np.empty(view.rparts)
        _cpu.backward_fused(dy3.reshape(view.stats3), x3.reshape(view.stats3), view.mode, view.group_size,
                            view.rchunk, ctx.rms, ctx.n, ctx.mean, ctx.rstd, ctx.w, pa, pb, sum_dy, sum_dyx,
                            dx3.reshape(view.stats3))
        dbias, dweight = (sum_dy[0], sum_dyx[0]) if sums_shape[0] == 1 else (sum_dy.sum(0), sum_dyx.sum(0))
    elif ctx.backend == "cpu" and ctx.sync is None and 0 < x3.size < _cpu.SERIAL_BELOW:
        dweight, dbias = np.empty(X), np.empty(X)
        P, G = ctx.rstd.shape
        _cpu.backward_small(dy3, x3, view.mode, view.rchunk, view.group_size, ctx.n, ctx.rms, ctx.batch_stats,
                            ctx.mean, ctx.rstd, k, d, renorm, ctx.w, dweight, dbias, np.empty((2,) + sums_shape),
                            np.empty((2,) + view.rparts), np.empty((2, 1, 1) if expand else (2, P, G)),
                            np.empty((3, P, X) if expand else (3, P, G)),
                            np.empty((2, P, X) if view.group_size > 1 else (2, 0, 0)), dx3)
    else:
        sum_dy, sum_dyx = np.zeros(sums_shape), np.zeros(sums_shape)
        row_g = row_gx = _ONE
        if x3.size:
            pa, pb = _plan.empty(ctx.backend, view.rparts), _plan.empty(ctx.backend, view.rparts)
            if not expand:
                row_g, row_gx = np.empty(view.stats_shape), np.empty(view.stats_shape)
            K.backward_reduce(dy3, x3, view.mode, view.rchunk, _expand(view, ctx.mean), _expand(view, ctx.rstd),
                              ctx.w, pa, pb, sum_dy, sum_dyx, row_g, row_gx)
        if ctx.sync is not None:
            sum_dy, sum_dyx = ctx.sync.sums(sum_dy, sum_dyx)
        dweight, dbias = np.empty(X), np.empty(X)
        coef = (ctx.rstd.shape[0], X) if expand else ctx.rstd.shape
        ca, cb, cc = np.empty(coef), np.empty(coef), np.empty(coef)
        backward_coefficients(sum_dy, sum_dyx, ctx.w, ctx.mean, ctx.rstd, k, d, renorm, ctx.n, ctx.rms,
                              ctx.batch_stats, view.group_size, expand, row_g, row_gx, dweight, dbias, ca, cb, cc)
        if x3.size:
            K.backward_apply(dy3, x3, view.mode, ca, cb, cc, ctx.kw, dx3)
    _finish(view, dx, dx3, temporary)
    dweight, dbias = _param_grad(dweight, ctx.weight), _param_grad(dbias, ctx.bias)
    if ctx.backend == "cuda":
        dweight, dbias = K.to_device(dweight), K.to_device(dbias)
    return dx, dweight, dbias


def _param_grad(grad, param):
    return None if param is None else grad.reshape(param.shape).astype(param.dtype)


# ---------------------------------------------------------------- batch norm and batch renorm

def batch_norm_forward(input, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, axis=1, out=None, num_batches_tracked=None):
    """Batch norm over every axis but ``axis``; returns ``(y, ctx)`` for ``batch_norm_backward``.

    y = (x − μ)/sqrt(σ² + eps)·weight + bias with batch statistics when training (or when no running
    stats are given), running statistics otherwise; running stats are updated in place when training.
    """
    return _bn(input, running_mean, running_var, weight, bias, training, momentum, eps, axis, out,
               num_batches_tracked, None)


def batch_renorm_forward(input, running_mean, running_var, weight=None, bias=None, training=False,
                         momentum=0.1, eps=1e-5, *, rmax=3.0, dmax=5.0, axis=1, out=None,
                         num_batches_tracked=None):
    """Batch renormalization (Ioffe 2017): x̂ = (x − μ_B)/σ_B·r + d, r and d clipped and held constant.

    r = clip(σ_B/σ, 1/rmax, rmax), d = clip((μ_B − μ)/σ, −dmax, dmax) from the running stats before
    this step's update.  Eval is batch norm eval.  Fused: no pass more than batch norm.
    """
    if not (isinstance(rmax, (int, float, np.floating)) and rmax >= 1):
        raise ValueError(f"rmax must be a number >= 1, got {rmax!r}")
    if not (isinstance(dmax, (int, float, np.floating)) and dmax >= 0):
        raise ValueError(f"dmax must be a number >= 0, got {dmax!r}")
    if training and running_mean is None:
        raise ValueError("batch_renorm in training needs running_mean and running_var: r and d are "
                         "measured against them")
    return _bn(input, running_mean, running_var, weight, bias, training, momentum, eps, axis, out,
               num_batches_tracked, (float(rmax), float(dmax)))


def _bn(x, running_mean, running_var, weight, bias, training, momentum, eps, axis, out,
        num_batches_tracked, renorm, sync=None):
    """Validate and run batch norm / renorm.  With ``sync`` (SyncBatchNorm) the statistics are the
    global batch's, so the one-value-per-channel check is the caller's, on the global count."""
    check_input(x)
    if x.ndim < 2:
        raise ValueError(f"batch_norm needs input of at least 2 dimensions (N, C, …), got shape {x.shape}")
    axis = normalize_axis(axis, x.ndim)
    C = x.shape[axis]
    training = bool(training)
    update = training and running_mean is not None
    check_running(running_mean, running_var, C, update)
    check_param(weight, "weight", (C,))
    check_param(bias, "bias", (C,))
    eps = check_eps(eps, strict=training)
    m = check_momentum(momentum, num_batches_tracked, update)
    check_out(out, x, x.dtype)
    if training and sync is None and x.size and x.size // C <= 1:
        raise per_channel_error(x.shape)
    view = _plan.channel_view(x, axis, "batch")
    batch_stats = training or running_mean is None
    return _forward(view, x, weight, bias, eps, out=out, batch_stats=batch_stats,
                    running=None if running_mean is None else (running_mean, running_var),
                    momentum=m if update else None, renorm=renorm if training else None, sync=sync)


def batch_norm_backward(grad_output, ctx):
    """(dx, dweight, dbias) of ``batch_norm_forward``; training differentiates through the batch stats."""
    return _backward(grad_output, ctx)


batch_renorm_backward = batch_norm_backward


# ---------------------------------------------------------------- instance norm and group norm

def instance_norm_forward(input, running_mean=None, running_var=None, weight=None, bias=None,
                          use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None,
                          num_batches_tracked=None):
    """Instance norm: per sample and channel over the spatial dims; PyTorch's running-stat averaging."""
    check_input(input)
    if input.ndim < 3:
        raise ValueError(f"instance_norm needs input of at least 3 dimensions (N, C, spatial…), got shape "
                         f"{input.shape}")
    axis = normalize_axis(axis, input.ndim)
    C = input.shape[axis]
    update = bool(use_input_stats) and running_mean is not None
    check_running(running_mean, running_var, C, update)
    if not use_input_stats and running_mean is None:
        raise ValueError("instance_norm with use_input_stats=False needs running_mean and running_var")
    check_param(weight, "weight", (C,))
    check_param(bias, "bias", (C,))
    eps = check_eps(eps, strict=False)
    m = check_momentum(momentum, num_batches_tracked, update)
    check_out(out, input, input.dtype)
    if use_input_stats and input.size and input.size // (input.shape[0] * C) <= 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size "
                         f"{tuple(input.shape)}")
    view = _plan.channel_view(input, axis, "instance")
    return _forward(view, input, weight, bias, eps, out=out, batch_stats=bool(use_input_stats),
                    running=None if running_mean is None else (running_mean, running_var),
                    momentum=m if update else None)


def group_norm_forward(input, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None):
    """Group norm: per sample over C/num_groups channels × spatial."""
    check_input(input)
    if input.ndim < 2:
        raise ValueError(f"group_norm needs input of at least 2 dimensions (N, C, …), got shape {input.shape}")
    axis = normalize_axis(axis, input.ndim)
    C = input.shape[axis]
    if not isinstance(num_groups, (int, np.integer)) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if C % num_groups:
        raise ValueError(f"Expected number of channels in input to be divisible by num_groups, but got "
                         f"input of shape {list(input.shape)} and num_groups={num_groups}")
    check_param(weight, "weight", (C,))
    check_param(bias, "bias", (C,))
    eps = check_eps(eps, strict=False)
    check_out(out, input, input.dtype)
    view = _plan.channel_view(input, axis, "group", int(num_groups))
    return _forward(view, input, weight, bias, eps, out=out, batch_stats=True)


def instance_norm_backward(grad_output, ctx):
    return _backward(grad_output, ctx)


group_norm_backward = instance_norm_backward


# ---------------------------------------------------------------- layer norm and RMS norm

def _normalized(input, normalized_shape):
    check_input(input)
    if type(normalized_shape) is tuple and len(normalized_shape) == 1:      # the common call, fast
        normalized_shape = normalized_shape[0]
    if (type(normalized_shape) is int and type(input) is np.ndarray and input.ndim
            and input.shape[-1] == normalized_shape):
        return (normalized_shape,)
    shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
    if not shape or any(not isinstance(s, (int, np.integer)) for s in shape):
        raise TypeError(f"normalized_shape must be an int or a non-empty tuple of ints, got {normalized_shape!r}")
    if input.ndim < len(shape) or tuple(input.shape[input.ndim - len(shape):]) != shape:
        raise ValueError(f"Given normalized_shape={list(shape)}, expected input with shape [*, "
                         f"{', '.join(map(str, shape))}], but got input of size {list(input.shape)}")
    return shape


def layer_norm_forward(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    """Layer norm over the trailing ``normalized_shape`` dims; weight/bias of that shape."""
    shape = _normalized(input, normalized_shape)
    check_param(weight, "weight", shape)
    check_param(bias, "bias", shape)
    eps = check_eps(eps, strict=False)
    check_out(out, input, input.dtype)
    view = _plan.row_view(input, len(shape))
    return _forward(view, input, weight, bias, eps, out=out, batch_stats=True)


def rms_norm_forward(input, normalized_shape, weight=None, eps=None, *, out=None):
    """RMS norm: y = x / sqrt(mean(x²) + eps)·weight; eps=None → machine epsilon of the input dtype."""
    shape = _normalized(input, normalized_shape)
    check_param(weight, "weight", shape)
    eps = float(np.finfo(input.dtype).eps) if eps is None else check_eps(eps, strict=False)
    check_out(out, input, input.dtype)
    view = _plan.row_view(input, len(shape))
    return _forward(view, input, weight, None, eps, out=out, batch_stats=True, rms=True)


def layer_norm_backward(grad_output, ctx):
    return _backward(grad_output, ctx)


rms_norm_backward = layer_norm_backward


# ---------------------------------------------------------------- y-only forms

def _first(forward):
    def op(*args, **kwargs):
        return forward(*args, **kwargs)[0]
    op.__name__ = op.__qualname__ = forward.__name__.replace("_forward", "")
    op.__doc__ = (forward.__doc__ or "") + f"\n\nReturns y only; ``{forward.__name__}`` also returns the context."
    op.__signature__ = inspect.signature(forward)       # help() and IDEs show torch's parameters, not *args
    return op


batch_norm = _first(batch_norm_forward)
batch_renorm = _first(batch_renorm_forward)
instance_norm = _first(instance_norm_forward)
group_norm = _first(group_norm_forward)
layer_norm = _first(layer_norm_forward)
rms_norm = _first(rms_norm_forward)


# ---------------------------------------------------------------- mergeable moments

class Moments(NamedTuple):
    """Per-channel statistics of a set of samples: ``count`` values each, their ``mean`` and
    ``m2`` = Σ(x − mean)², float64 arrays of length C.  Mergeable exactly (Chan et al.)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @staticmethod
    def merge(first, *others):
        """Moments of the union: Chan's pairwise merge, left to right (exact to rounding)."""
        n, mean, m2 = first
        for part in others:
            if np.shape(part.mean) != np.shape(mean):
                raise ValueError(f"cannot merge moments of shapes {np.shape(mean)} and {np.shape(part.mean)}")
            n, mean, m2 = merge_into.py_func(n, mean, m2, part.count, part.mean, part.m2)
        return Moments(int(n), np.asarray(mean, np.float64), np.asarray(m2, np.float64))

    def var(self, ddof=0):
        """m2 / (count − ddof): ddof=0 the biased (population) variance, ddof=1 the unbiased one."""
        return self.m2 / (self.count - ddof)

    def std(self, ddof=0):
        return np.sqrt(self.var(ddof))


def moments(input, axis=1):
    """Per-channel ``Moments`` over every axis but ``axis`` (batch norm's groups), in float64."""
    check_input(input)
    if input.ndim < 2:
        raise ValueError(f"moments needs input of at least 2 dimensions (N, C, …), got shape {input.shape}")
    axis = normalize_axis(axis, input.ndim)
    view = _plan.channel_view(input, axis, "batch")
    cdtype = compute_dtype(input.dtype)
    mean, m2 = _moments(view, view.to3(input, cdtype))
    return Moments(input.size // input.shape[axis] if input.shape[axis] else 0, mean[0], m2[0])
