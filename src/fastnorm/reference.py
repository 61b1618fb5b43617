"""Float64 NumPy oracle: the same names and arguments as ``fastnorm.functional``, written to be read.

Everything is computed in float64 straight from ``semantics.md``: two-pass statistics, the backward
formulas term by term.  The result is cast back to the input dtype (float16 input → float16).
It does no validation; the tests compare every kernel against it.
"""
import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _channels_to_1(x, axis):
    """(N, …, C, …) → (N, C, spatial…): the reference works channels-first and moves back at the end."""
    return np.moveaxis(x, axis, 1)


def _momentum(momentum, num_batches_tracked):
    return 1.0 / num_batches_tracked if momentum is None else momentum


def _update_running(running_mean, running_var, mean, var_unbiased, momentum):
    running_mean[...] = (1 - momentum) * running_mean + momentum * mean
    running_var[...] = (1 - momentum) * running_var + momentum * var_unbiased


def _grouped_forward(x, group_axes, eps, weight, bias, mean=None, var=None):
    """ŷ = (x − μ)/sqrt(σ² + eps), y = ŷ·weight + bias; μ, σ² over group_axes unless given."""
    if mean is None:
        mean = x.mean(axis=group_axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=group_axes, keepdims=True)   # mean subtracted first
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    return xhat * weight + bias, xhat, mean, var, rstd


def _grouped_backward(dy, xhat, rstd, weight, group_axes, batch_stats, k=1.0):
    """dx = k·rstd·(g − mean(g) − ŷ·mean(g·ŷ)), g = dy·weight (batch stats); dx = g·rstd (fixed stats)."""
    g = dy * weight
    if not batch_stats:
        return g * rstd
    term1 = g
    term2 = g.mean(axis=group_axes, keepdims=True)
    term3 = xhat * (g * xhat).mean(axis=group_axes, keepdims=True)
    return k * rstd * (term1 - term2 - term3)


def _channel_param(p, ndim, default):
    """Weight/bias of length C → broadcastable against the channels-first (N, C, spatial…) array;
    None → ``default`` (1 for weight, 0 for bias)."""
    return default if p is None else _f64(p).reshape((1, -1) + (1,) * (ndim - 2))


def _param_grad(grad, like):
    return None if like is None else grad.reshape(np.shape(like)).astype(np.asarray(like).dtype)


# ---------------------------------------------------------------- batch norm and batch renorm

def batch_norm_forward(input, running_mean, running_var, weight=None, bias=None, training=False,
                       momentum=0.1, eps=1e-5, *, axis=1, out=None, num_batches_tracked=None):
    return _bn_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, axis,
                       num_batches_tracked, renorm=None)


def batch_renorm_forward(input, running_mean, running_var, weight=None, bias=None, training=False,
                         momentum=0.1, eps=1e-5, *, rmax=3.0, dmax=5.0, axis=1, out=None,
                         num_batches_tracked=None):
    return _bn_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, axis,
                       num_batches_tracked, renorm=(rmax, dmax))


def _bn_forward(input, running_mean, running_var, weight, bias, training, momentum, eps, axis,
                num_batches_tracked, renorm):
    x = _channels_to_1(_f64(input), axis)
    axes = (0,) + tuple(range(2, x.ndim))
    w, b = _channel_param(weight, x.ndim, 1.0), _channel_param(bias, x.ndim, 0.0)
    batch_stats = training or running_mean is None
    if batch_stats:
        y, xhat, mean, var, rstd = _grouped_forward(x, axes, eps, w, b)
    else:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y, xhat, mean, var, rstd = _grouped_forward(x, axes, eps, w, b, _f64(running_mean).reshape(shape),
                                                    _f64(running_var).reshape(shape))
    r, d = 1.0, 0.0
    if renorm is not None and training and running_mean is not None:
        rmax, dmax = renorm
        shape = (1, -1) + (1,) * (x.ndim - 2)
        sigma = np.sqrt(_f64(running_var).reshape(shape) + eps)        # running stats before the update
        r = np.clip(np.sqrt(var + eps) / sigma, 1.0 / rmax, rmax)
        d = np.clip((mean - _f64(running_mean).reshape(shape)) / sigma, -dmax, dmax)
        y = (xhat * r + d) * w + b
    if training and running_mean is not None:
        n = x.size // x.shape[1]
        m = _momentum(momentum, num_batches_tracked)
        _update_running(running_mean, running_var, mean.ravel(), var.ravel() * n / (n - 1), m)
    ctx = dict(x=x, xhat=xhat, rstd=rstd, r=r, d=d, w=w, axes=axes, batch_stats=batch_stats, axis=axis,
               weight=weight, bias=bias, dtype=np.asarray(input).dtype)
    return np.moveaxis(y, 1, axis).astype(ctx["dtype"]), ctx


def _bn_backward(grad_output, ctx):
    dy = _channels_to_1(_f64(grad_output), ctx["axis"])
    dx = _grouped_backward(dy, ctx["xhat"], ctx["rstd"], ctx["w"], ctx["axes"], ctx["batch_stats"], ctx["r"])
    xhat = ctx["xhat"] * ctx["r"] + ctx["d"]
    dweight = (dy * xhat).sum(axis=ctx["axes"])
    dbias = dy.sum(axis=ctx["axes"])
    return (np.moveaxis(dx, 1, ctx["axis"]).astype(ctx["dtype"]), _param_grad(dweight, ctx["weight"]),
            _param_grad(dbias, ctx["bias"]))


batch_norm_backward = batch_renorm_backward = _bn_backward


# ---------------------------------------------------------------- instance norm and group norm

def instance_norm_forward(input, running_mean=None, running_var=None, weight=None, bias=None,
                          use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None,
                          num_batches_tracked=None):
    x = _channels_to_1(_f64(input), axis)
    axes = tuple(range(2, x.ndim))
    w, b = _channel_param(weight, x.ndim, 1.0), _channel_param(bias, x.ndim, 0.0)
    if use_input_stats:
        y, xhat, mean, var, rstd = _grouped_forward(x, axes, eps, w, b)
        if running_mean is not None:
            n = int(np.prod(x.shape[2:]))
            m = _momentum(momentum, num_batches_tracked)
            # PyTorch: per-(sample, channel) statistics, averaged over the batch, then the usual update
            _update_running(running_mean, running_var, mean.mean(axis=0).ravel(),
                            (var * n / (n - 1)).mean(axis=0).ravel(), m)
    else:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y, xhat, mean, var, rstd = _grouped_forward(x, axes, eps, w, b, _f64(running_mean).reshape(shape),
                                                    _f64(running_var).reshape(shape))
    ctx = dict(x=x, xhat=xhat, rstd=rstd, w=w, axes=axes, batch_stats=use_input_stats, axis=axis,
               weight=weight, bias=bias, dtype=np.asarray(input).dtype)
    return np.moveaxis(y, 1, axis).astype(ctx["dtype"]), ctx


def group_norm_forward(input, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None):
    x = _channels_to_1(_f64(input), axis)
    N, C = x.shape[:2]
    xg = x.reshape((N, num_groups, C // num_groups) + x.shape[2:])     # (N, G, C/G, spatial…)
    axes = tuple(range(2, xg.ndim))
    _, xhat, _, _, rstd = _grouped_forward(xg, axes, eps, 1.0, 0.0)
    w, b = _channel_param(weight, x.ndim, 1.0), _channel_param(bias, x.ndim, 0.0)
    xhat_c = xhat.reshape(x.shape)
    ctx = dict(x=x, xhat=xhat, rstd=rstd, w=w, axes=axes, batch_stats=True, axis=axis, groups=num_groups,
               weight=weight, bias=bias, dtype=np.asarray(input).dtype)
    return np.moveaxis(xhat_c * w + b, 1, axis).astype(ctx["dtype"]), ctx


def _channel_backward(grad_output, ctx):
    """Backward of instance/group norm: the group is (sample, group of channels) × spatial."""
    dy = _channels_to_1(_f64(grad_output), ctx["axis"])
    N, C = dy.shape[:2]
    G = ctx.get("groups", C)
    grouped = (N, G, C // G) + dy.shape[2:]
    w = np.broadcast_to(ctx["w"], (1, C) + (1,) * (dy.ndim - 2)).reshape((1, G, C // G) + (1,) * (dy.ndim - 2))
    if G == C and "groups" not in ctx:
        dx = _grouped_backward(dy, ctx["xhat"], ctx["rstd"], ctx["w"], ctx["axes"], ctx["batch_stats"])
    else:
        dx = _grouped_backward(dy.reshape(grouped), ctx["xhat"], ctx["rstd"], w, ctx["axes"],
                               ctx["batch_stats"]).reshape(dy.shape)
    xhat = ctx["xhat"].reshape(dy.shape)
    sum_axes = (0,) + tuple(range(2, dy.ndim))
    return (np.moveaxis(dx, 1, ctx["axis"]).astype(ctx["dtype"]),
            _param_grad((dy * xhat).sum(axis=sum_axes), ctx["weight"]),
            _param_grad(dy.sum(axis=sum_axes), ctx["bias"]))


instance_norm_backward = group_norm_backward = _channel_backward


# ---------------------------------------------------------------- layer norm and RMS norm

def _trailing(normalized_shape, x):
    shape = (normalized_shape,) if np.isscalar(normalized_shape) else tuple(normalized_shape)
    return tuple(range(x.ndim - len(shape), x.ndim))


def layer_norm_forward(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None):
    x = _f64(input)
    axes = _trailing(normalized_shape, x)
    w = 1.0 if weight is None else _f64(weight)
    b = 0.0 if bias is None else _f64(bias)
    y, xhat, _, _, rstd = _grouped_forward(x, axes, eps, w, b)
    ctx = dict(xhat=xhat, rstd=rstd, w=w, axes=axes, weight=weight, bias=bias, rms=False,
               dtype=np.asarray(input).dtype)
    return y.astype(ctx["dtype"]), ctx


def rms_norm_forward(input, normalized_shape, weight=None, eps=None, *, out=None):
    """y = x / sqrt(mean(x²) + eps) · weight, eps=None → machine epsilon of the input dtype."""
    x = _f64(input)
    axes = _trailing(normalized_shape, x)
    eps = np.finfo(np.asarray(input).dtype).eps if eps is None else eps
    rstd = 1.0 / np.sqrt((x * x).mean(axis=axes, keepdims=True) + eps)
    xhat = x * rstd
    w = 1.0 if weight is None else _f64(weight)
    ctx = dict(xhat=xhat, rstd=rstd, w=w, axes=axes, weight=weight, bias=None, rms=True,
               dtype=np.asarray(input).dtype)
    return (xhat * w).astype(ctx["dtype"]), ctx


def _row_backward(grad_output, ctx):
    dy = _f64(grad_output)
    xhat, rstd, axes = ctx["xhat"], ctx["rstd"], ctx["axes"]
    g = dy * ctx["w"]
    if ctx["rms"]:   # no mean subtracted, so no mean(g) term
        dx = rstd * (g - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    else:
        dx = _grouped_backward(dy, xhat, rstd, ctx["w"], axes, True)
    lead = tuple(range(dy.ndim - len(axes)))
    return (dx.astype(ctx["dtype"]), _param_grad((dy * xhat).sum(axis=lead), ctx["weight"]),
            _param_grad(dy.sum(axis=lead), ctx["bias"]))


layer_norm_backward = rms_norm_backward = _row_backward


# ---------------------------------------------------------------- plain forms (y only)

def _first(forward):
    def op(*args, **kwargs):
        return forward(*args, **kwargs)[0]
    op.__name__ = forward.__name__.replace("_forward", "")
    op.__doc__ = f"``{forward.__name__}(...)[0]``."
    return op


batch_norm = _first(batch_norm_forward)
batch_renorm = _first(batch_renorm_forward)
instance_norm = _first(instance_norm_forward)
group_norm = _first(group_norm_forward)
layer_norm = _first(layer_norm_forward)
rms_norm = _first(rms_norm_forward)


def moments(input, axis=1):
    """Per-channel (count, mean, M2) over every axis but ``axis``, float64."""
    x = _channels_to_1(_f64(input), axis)
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.mean(axis=axes)
    m2 = ((x - mean.reshape((1, -1) + (1,) * (x.ndim - 2))) ** 2).sum(axis=axes)
    return x.size // x.shape[1], mean, m2
