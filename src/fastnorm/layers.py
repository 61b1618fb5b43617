"""Stateful normalization layers for NumPy training loops: the only place in fastnorm with state.

Each layer is a thin wrapper over one ``*_forward``/``*_backward`` pair of ``fastnorm.functional``:

    y = layer(x)             # y, ctx = op_forward(x, params, buffers, mode); ctx kept for backward
    dx = layer.backward(dy)  # dx, dweight, dbias = op_backward(dy, ctx); grads[k] += dk

Parameter and buffer names, initial values and state-dict meaning are ``torch.nn``'s (weight = 1,
bias = 0, running_mean = 0, running_var = 1, num_batches_tracked = 0 as an int64 0-d array), so
``layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})`` ports a torch module.
"""
import numpy as np

from . import functional as F

__all__ = ["BatchNorm", "InstanceNorm", "LayerNorm", "GroupNorm", "RMSNorm", "BatchRenorm"]

_NOT_RUN = object()   # ctx before the first forward (None is a real ctx: the forward of an empty input)


def _float_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"dtype must be a float dtype, got {dtype}")
    return dtype


def _affine(shape, dtype, weight=True, bias=True):
    """PyTorch's initial affine parameters: weight = 1, bias = 0 (only those asked for)."""
    params = {}
    if weight:
        params["weight"] = np.ones(shape, dtype)
    if bias:
        params["bias"] = np.zeros(shape, dtype)
    return params


class _Layer:
    """params/buffers/grads, train/eval and the PyTorch state dict; subclasses supply the math.

    A subclass defines ``_forward(x) -> (y, ctx)`` and ``_backward(dy, ctx) -> (dx, dweight, dbias)``
    (None for a parameter it does not have): exactly the functional ops' contract, so for a norm layer
    ``_backward`` *is* the functional backward.  ``fastnorm._nn`` builds its demo layers on this too.
    """

    def __init__(self, params=None, buffers=None):
        self.params = dict(params or {})
        self.buffers = dict(buffers or {})
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}
        self.training = True
        self._ctx = _NOT_RUN

    def __call__(self, x):
        y, self._ctx = self._forward(x)
        return y

    def backward(self, dy):
        """dx of the last forward; **adds** dweight/dbias into ``grads`` (``zero_grad`` between steps)."""
        if self._ctx is _NOT_RUN:
            raise RuntimeError(f"{type(self).__name__}.backward called before any forward")
        dx, dweight, dbias = self._backward(dy, self._ctx)
        for name, grad in (("weight", dweight), ("bias", dbias)):
            if grad is not None:
                self.grads[name] += grad
        return dx

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for grad in self.grads.values():
            grad[...] = 0

    def state_dict(self):
        """Copies of params then buffers, under PyTorch's keys and in its order.

        Copies (torch returns views): a saved state must not change when training continues.
        """
        return {name: a.copy() for name, a in {**self.params, **self.buffers}.items()}

    def load_state_dict(self, state_dict):
        """Copy every entry of ``state_dict`` into the layer's arrays, in place (no aliasing).

        All keys, dtypes and shapes are checked before anything is written, so a bad dict raises
        ``KeyError`` (missing/unexpected keys), ``TypeError`` (not a float array; not an integer for
        ``num_batches_tracked``) or ``ValueError`` (shape) naming the key, and leaves the layer unchanged.
        In place, because an optimizer holds references to the parameter arrays.
        """
        own = {**self.params, **self.buffers}
        where = f"{type(self).__name__}.load_state_dict"
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing or unexpected:
            raise KeyError(f"{where}: missing keys {missing}, unexpected keys {unexpected} "
                           f"(expected exactly {list(own)})")
        values = {}
        for key, target in own.items():
            value = np.asarray(state_dict[key])
            integer = target.dtype.kind == "i"
            if value.dtype.kind not in ("iu" if integer else "f"):
                kind = "an integer" if integer else "a float"
                raise TypeError(f"{where}: {key!r} must be {kind} array, got dtype {value.dtype}")
            if value.shape != target.shape:
                raise ValueError(f"{where}: {key!r} has shape {value.shape}, expected {target.shape}")
            values[key] = value
        for key, value in values.items():
            own[key][...] = value


class _RunningNorm(_Layer):
    """BatchNorm, InstanceNorm, BatchRenorm: per-channel weight/bias plus PyTorch's running statistics.

    Training, or no running stats: batch statistics; with running stats, also num_batches_tracked += 1
    and running ← (1 − m)·running + m·batch in the functional op, m = momentum, or 1/num_batches_tracked
    when momentum is None (cumulative average).  Eval with running stats: normalize with them.
    """

    _op = None   # the functional forward: op(x, running_mean, running_var, weight, bias, batch_stats, ...)

    def __init__(self, num_features, eps, momentum, affine, track_running_stats, axis, dtype):
        dtype = _float_dtype(dtype)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats, self.axis = affine, track_running_stats, axis
        buffers = {}
        if track_running_stats:
            buffers = {"running_mean": np.zeros(num_features, dtype), "running_var": np.ones(num_features, dtype),
                       "num_batches_tracked": np.zeros((), np.int64)}
        super().__init__(_affine(num_features, dtype, affine, affine), buffers)

    def _op_kwargs(self):
        return {}

    def _forward(self, x):
        running_mean, running_var = self.buffers.get("running_mean"), self.buffers.get("running_var")
        batch_stats = self.training or running_mean is None
        step = {}
        if batch_stats and running_mean is not None:
            step["num_batches_tracked"] = int(self.buffers["num_batches_tracked"]) + 1
        out = self._op(x, running_mean, running_var, self.params.get("weight"), self.params.get("bias"),
                       batch_stats, self.momentum, self.eps, axis=self.axis, **step, **self._op_kwargs())
        if step:   # counted only once the op succeeded, so a rejected batch leaves the layer unchanged
            self.buffers["num_batches_tracked"][...] = step["num_batches_tracked"]
        return out


class BatchNorm(_RunningNorm):
    """y = (x − μ)/sqrt(σ² + eps)·weight + bias, μ and σ² per channel over every axis but ``axis``.

    ``torch.nn.BatchNorm1d/2d/3d`` in one class: batch statistics in training (updating the running
    stats when tracked), running statistics in eval; ``track_running_stats=False`` always uses batch
    statistics and has no buffers.
    """

    _op = staticmethod(F.batch_norm_forward)
    _backward = staticmethod(F.batch_norm_backward)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *,
                 axis=1, dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis, dtype)


class InstanceNorm(_RunningNorm):
    """y = (x − μ)/sqrt(σ² + eps)·weight + bias, μ and σ² per sample and channel over the spatial dims.

    ``torch.nn.InstanceNorm1d/2d/3d``: no affine and no running stats by default.  With
    ``track_running_stats=True``, eval normalizes with the running stats, which training updates with
    the batch mean of the per-instance statistics.  One deliberate difference: torch's instance norm
    never counts ``num_batches_tracked`` and turns momentum=None into 0 (running stats frozen); here
    training counts batches and momentum=None is the cumulative average, as for BatchNorm.
    """

    _op = staticmethod(F.instance_norm_forward)
    _backward = staticmethod(F.instance_norm_backward)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False, *,
                 axis=1, dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis, dtype)


class BatchRenorm(_RunningNorm):
    """x̂ = (x − μ_B)/σ_B·r + d, y = x̂·weight + bias in training (Ioffe 2017); batch-norm eval.

    r = clip(σ_B/σ, 1/rmax, rmax), d = clip((μ_B − μ)/σ, −dmax, dmax) against the running stats, held
    constant in backward.  ``rmax``/``dmax`` are plain attributes, so a training loop can ramp them from
    (1, 0) (= batch norm) as the paper does.  State dict as BatchNorm's.
    """

    _op = staticmethod(F.batch_renorm_forward)
    _backward = staticmethod(F.batch_renorm_backward)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, *, rmax=3.0, dmax=5.0, axis=1,
                 dtype=np.float32):
        super().__init__(num_features, eps, momentum, affine, True, axis, dtype)
        self.rmax, self.dmax = rmax, dmax

    def _op_kwargs(self):
        return {"rmax": self.rmax, "dmax": self.dmax}


class GroupNorm(_Layer):
    """y = (x − μ)/sqrt(σ² + eps)·weight + bias, μ and σ² per sample over C/num_groups channels × spatial.

    ``torch.nn.GroupNorm``: per-channel weight/bias, no running stats (train and eval are the same).
    """

    _backward = staticmethod(F.group_norm_backward)

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, axis=1, dtype=np.float32):
        if num_channels % num_groups:
            raise ValueError(f"num_channels must be divisible by num_groups, got num_channels={num_channels} "
                             f"and num_groups={num_groups}")
        self.num_groups, self.num_channels, self.eps, self.affine, self.axis = (num_groups, num_channels, eps,
                                                                                affine, axis)
        super().__init__(_affine(num_channels, _float_dtype(dtype), affine, affine))

    def _forward(self, x):
        return F.group_norm_forward(x, self.num_groups, self.params.get("weight"), self.params.get("bias"),
                                    self.eps, axis=self.axis)


def _shape(normalized_shape):
    if isinstance(normalized_shape, (int, np.integer)):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


class LayerNorm(_Layer):
    """y = (x − μ)/sqrt(σ² + eps)·weight + bias, μ and σ² over the trailing ``normalized_shape`` dims.

    ``torch.nn.LayerNorm``: elementwise weight/bias of ``normalized_shape``; ``bias=False`` drops the bias.
    """

    _backward = staticmethod(F.layer_norm_backward)

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *, dtype=np.float32):
        self.normalized_shape, self.eps, self.elementwise_affine = _shape(normalized_shape), eps, elementwise_affine
        super().__init__(_affine(self.normalized_shape, _float_dtype(dtype), elementwise_affine,
                                 elementwise_affine and bias))

    def _forward(self, x):
        return F.layer_norm_forward(x, self.normalized_shape, self.params.get("weight"),
                                    self.params.get("bias"), self.eps)


class RMSNorm(_Layer):
    """y = x/sqrt(mean(x²) + eps)·weight over the trailing ``normalized_shape`` dims (``torch.nn.RMSNorm``).

    eps=None → machine epsilon of the input dtype; weight only (no bias).
    """

    _backward = staticmethod(F.rms_norm_backward)

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, *, dtype=np.float32):
        self.normalized_shape, self.eps, self.elementwise_affine = _shape(normalized_shape), eps, elementwise_affine
        super().__init__(_affine(self.normalized_shape, _float_dtype(dtype), elementwise_affine, False))

    def _forward(self, x):
        return F.rms_norm_forward(x, self.normalized_shape, self.params.get("weight"), self.eps)
