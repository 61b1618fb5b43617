"""A minimal NumPy network toolkit for ``fastnorm.demo`` only; not part of fastnorm's API.

The layers share ``fastnorm.layers``' machinery (``params``/``grads``/``train``/``eval``, ``backward``
adding into ``grads``), so a fastnorm normalization layer drops into a ``Sequential`` like any other.
Layouts are PyTorch's: Dense weight (out, in); Conv2d NCHW with weight (out, in, k, k).
"""
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .layers import _Layer


def init_weight(rng, shape, fan_in, fan_out, init, dtype):
    """He: N(0, 2/fan_in), keeps the activation variance through ReLU (He et al. 2015).
    Xavier: U(±sqrt(6/(fan_in + fan_out))), keeps it through sigmoid/tanh (Glorot & Bengio 2010)."""
    if init == "he":
        w = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif init == "xavier":
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        w = rng.uniform(-limit, limit, shape)
    else:
        raise ValueError(f"init must be 'he' or 'xavier', got {init!r}")
    return w.astype(dtype)


class Dense(_Layer):
    """y = x·Wᵀ + b: (N, in) → (N, out)."""

    def __init__(self, fan_in, fan_out, rng, *, init="he", dtype=np.float32):
        super().__init__({"weight": init_weight(rng, (fan_out, fan_in), fan_in, fan_out, init, dtype),
                          "bias": np.zeros(fan_out, dtype)})

    def _forward(self, x):
        return x @ self.params["weight"].T + self.params["bias"], x

    def _backward(self, dy, x):
        return dy @ self.params["weight"], dy.T @ x, dy.sum(axis=0)


class Conv2d(_Layer):
    """y[n, o] = Σ_c W[o, c] ⋆ x[n, c] + b[o] (cross-correlation, as torch), as one matmul on im2col columns.

    The output is an NCHW-shaped view of NHWC memory (the matmul's natural layout); fastnorm reads the
    strides and normalizes it in place, without a transposed copy.
    """

    def __init__(self, in_channels, out_channels, kernel_size, rng, *, stride=1, padding=0, init="he",
                 dtype=np.float32):
        k = kernel_size
        shape = (out_channels, in_channels, k, k)
        super().__init__({"weight": init_weight(rng, shape, in_channels * k * k, out_channels * k * k, init, dtype),
                          "bias": np.zeros(out_channels, dtype)})
        self.kernel_size, self.stride, self.padding = k, stride, padding

    def _forward(self, x):
        k, s, p = self.kernel_size, self.stride, self.padding
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        windows = sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::s, ::s]   # (N, C, Ho, Wo, k, k)
        N, C, Ho, Wo = windows.shape[:4]
        cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(N * Ho * Wo, C * k * k)
        weight = self.params["weight"]
        y = cols @ weight.reshape(len(weight), -1).T + self.params["bias"]       # (N·Ho·Wo, O)
        return y.reshape(N, Ho, Wo, -1).transpose(0, 3, 1, 2), (x.shape, cols)

    def _backward(self, dy, ctx):
        (N, C, H, W), cols = ctx
        k, s, p = self.kernel_size, self.stride, self.padding
        weight = self.params["weight"]
        O, Ho, Wo = dy.shape[1:]
        dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, O)                             # (N·Ho·Wo, O)
        dweight = (dy2.T @ cols).reshape(weight.shape)
        dcols = (dy2 @ weight.reshape(O, -1)).reshape(N, Ho, Wo, C, k, k)
        dxp = np.zeros((N, C, H + 2 * p, W + 2 * p), dy.dtype)
        for i in range(k):            # col2im: each kernel tap scatters back onto a strided grid
            for j in range(k):
                dxp[:, :, i:i + s * Ho:s, j:j + s * Wo:s] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        return dxp[:, :, p:p + H, p:p + W], dweight, dy2.sum(axis=0)


class ReLU(_Layer):
    """y = max(x, 0)."""

    def _forward(self, x):
        return np.maximum(x, 0), x > 0

    def _backward(self, dy, positive):
        return dy * positive, None, None


class Sigmoid(_Layer):
    """y = 1/(1 + e^−x), computed as (1 + tanh(x/2))/2, which cannot overflow; dy/dx = y(1 − y)."""

    def _forward(self, x):
        y = 0.5 * (1.0 + np.tanh(0.5 * x))
        return y, y

    def _backward(self, dy, y):
        return dy * y * (1.0 - y), None, None


class Flatten(_Layer):
    """(N, …) → (N, prod(…))."""

    def _forward(self, x):
        return x.reshape(len(x), -1), x.shape

    def _backward(self, dy, shape):
        return dy.reshape(shape), None, None


class Sequential:
    """layers applied in order; backward in reverse; train/eval/zero_grad reach every layer."""

    def __init__(self, *layers):
        self.layers = list(layers)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def train(self, mode=True):
        for layer in self.layers:
            layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for layer in self.layers:
            layer.zero_grad()

    def parameters(self):
        """[(param, grad), …] for every layer, in order."""
        return [(layer.params[name], layer.grads[name]) for layer in self.layers for name in layer.params]


def softmax_cross_entropy(logits, labels):
    """loss = mean over the batch of −log softmax(logits)[label]; dloss/dlogits = (softmax − onehot)/N."""
    n = len(labels)
    z = logits - logits.max(axis=1, keepdims=True)        # shift: exp cannot overflow
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -log_p[np.arange(n), labels].mean()
    dlogits = np.exp(log_p)
    dlogits[np.arange(n), labels] -= 1.0
    return float(loss), dlogits / n


class SGD:
    """v ← μ·v + g, p ← p − lr·v (torch.optim.SGD with momentum μ, no dampening); updates in place."""

    def __init__(self, parameters, lr, momentum=0.0):
        self.parameters, self.lr, self.momentum = list(parameters), lr, momentum
        self.velocity = [np.zeros_like(p) for p, _ in self.parameters]

    def step(self):
        for (p, g), v in zip(self.parameters, self.velocity):
            v *= self.momentum
            v += g
            p -= self.lr * v
