"""The demo's NumPy toolkit (``fastnorm._nn``) and ``python -m fastnorm demo --quick``.

* every layer's backward against central differences of its forward (float64), through a whole
  network with a fastnorm BatchNorm and the softmax cross-entropy; Conv2d's forward against a direct
  sum; SGD against its update rule;
* the quick demo runs in a subprocess, writes a PNG matplotlib can read and a JSON of results in which
  the sigmoid MLP reaches the target accuracy with BN and does not without it.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cases import FD_TOL, ROUNDING, assert_close, numeric_grad
from fastnorm._nn import SGD, Conv2d, Dense, Flatten, ReLU, Sequential, Sigmoid, softmax_cross_entropy
from fastnorm.layers import BatchNorm


@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 1)])
def test_network_gradients_match_finite_differences(stride, padding, rng):
    """conv → BN → ReLU → conv → sigmoid → flatten → dense → softmax CE: dx and every parameter gradient."""
    model = Sequential(Conv2d(2, 3, 3, rng, stride=stride, padding=padding, dtype=np.float64),
                       BatchNorm(3, dtype=np.float64), ReLU(),
                       Conv2d(3, 2, 2, rng, padding=padding, init="xavier", dtype=np.float64), Sigmoid(),
                       Flatten())
    x = rng.standard_normal((4, 2, 6, 5))
    features = model(x).shape[1]
    model.layers.append(Dense(features, 5, rng, init="xavier", dtype=np.float64))
    for layer in model.layers:          # nonzero biases and BN affine, so their gradients are exercised
        for p in layer.params.values():
            p += rng.normal(0.0, 0.3, p.shape)
    labels = rng.integers(0, 5, len(x))

    def loss():
        return softmax_cross_entropy(model(x), labels)[0]

    model.zero_grad()
    _, dlogits = softmax_cross_entropy(model(x), labels)
    dx = model.backward(dlogits)
    assert_close(dx, numeric_grad(loss, x), FD_TOL, "dx")
    for i, layer in enumerate(model.layers):
        for name, p in layer.params.items():
            assert_close(layer.grads[name], numeric_grad(loss, p), FD_TOL, f"layer {i} d{name}")


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 1)])
def test_conv2d_is_cross_correlation(stride, padding, rng):
    """y[n, o, i, j] = b[o] + Σ_{c, u, v} W[o, c, u, v]·x_pad[n, c, i·s + u, j·s + v] (as torch.nn.Conv2d)."""
    conv = Conv2d(3, 4, 3, rng, stride=stride, padding=padding, dtype=np.float64)
    conv.params["bias"][:] = rng.standard_normal(4)
    x = rng.standard_normal((2, 3, 7, 6))
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    Ho, Wo = (xp.shape[2] - 3) // stride + 1, (xp.shape[3] - 3) // stride + 1
    expected = np.empty((2, 4, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            window = xp[:, :, i * stride:i * stride + 3, j * stride:j * stride + 3]
            expected[:, :, i, j] = np.einsum("ncuv,ocuv->no", window, conv.params["weight"]) + conv.params["bias"]
    assert_close(conv(x), expected, ROUNDING)


def test_sgd_momentum_update():
    """v ← μv + g, p ← p − lr·v, two steps by hand."""
    p, g = np.array([1.0, -2.0]), np.zeros(2)
    opt = SGD([(p, g)], lr=0.1, momentum=0.9)
    g[:] = [0.5, 1.0]
    opt.step()
    assert_close(p, np.array([1.0 - 0.05, -2.0 - 0.1]), ROUNDING)
    g[:] = [1.0, -1.0]
    opt.step()                              # v = 0.9·[0.5, 1] + [1, −1] = [1.45, −0.1]
    assert_close(p, np.array([0.95 - 0.145, -2.1 + 0.01]), ROUNDING)


def test_softmax_cross_entropy_value():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]])    # the second row would overflow exp
    loss, _ = softmax_cross_entropy(logits, np.array([2, 0]))
    expected = (-np.log(np.exp(3.0) / np.exp([1.0, 2.0, 3.0]).sum()) + 0.0) / 2
    assert_close(np.array(loss), np.array(expected), ROUNDING)


# ---------------------------------------------------------------- the demo itself

@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """``python -m fastnorm demo --quick`` once for this module: (stdout, output directory)."""
    out = tmp_path_factory.mktemp("demo_out")
    env = dict(os.environ)
    # conftest points NUMBA_CACHE_DIR at this session's temporary cache; outside pytest, use a fresh one
    env.setdefault("NUMBA_CACHE_DIR", str(tmp_path_factory.mktemp("numba_cache")))
    done = subprocess.run([sys.executable, "-m", "fastnorm", "demo", "--quick", "--out", str(out), "--seed", "0"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, out


def test_demo_writes_a_readable_png(quick_demo):
    import matplotlib.image

    _, out = quick_demo
    image = matplotlib.image.imread(out / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0                                  # not a blank canvas


def test_demo_table_lists_every_run(quick_demo):
    stdout, out = quick_demo
    results = json.loads((out / "results.json").read_text())
    assert len(results["experiments"]) == 4
    for exp, runs in results["experiments"].items():
        for r in runs:
            assert any(exp in line and r["model"] in line for line in stdout.splitlines()), (exp, r["model"])
            assert r["final_acc"] == r["curve"][-1][1]


def test_bn_trains_the_sigmoid_net_that_fails_without_it(quick_demo):
    """Seed 0, --quick: with BN the validation accuracy reaches the target, without BN it never does."""
    _, out = quick_demo
    results = json.loads((out / "results.json").read_text())
    target = results["target"]
    runs = {r["model"]: r for r in next(iter(results["experiments"].values()))}
    with_bn, without = runs["BN"], runs["no norm"]
    assert with_bn["lr"] == without["lr"] and with_bn["steps"] == without["steps"]
    assert max(acc for _, acc in with_bn["curve"]) >= target and with_bn["final_acc"] >= target
    assert max(acc for _, acc in without["curve"]) < target
    assert with_bn["final_acc"] - without["final_acc"] > 0.3      # not a near miss: 30+ points apart
