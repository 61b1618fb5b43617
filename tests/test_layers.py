"""Stateful layers: each is its functional op plus state, with PyTorch's state dict and semantics.

* layer(x) / layer.backward(dy) equal the functional forward/backward on the same params and buffers,
  bitwise (the layer adds no math of its own), in training and eval;
* PyTorch modules: same state-dict keys, shapes and dtypes; a torch state dict (``.numpy()``) loads and
  gives torch's outputs, and one training step updates the buffers as torch does;
* state_dict round trip, copies both ways; bad state dicts raise and leave the layer unchanged;
* gradients accumulate across backward calls until zero_grad; momentum=None is a cumulative average.
"""
import numpy as np
import pytest

import fastnorm.functional as F
from cases import ROUNDING, assert_bitwise, assert_close
from fastnorm.layers import BatchNorm, BatchRenorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm

C = 6
SHAPE = (5, C, 4, 3)     # (N, C, H, W); LN/RMS normalize the trailing (4, 3)

# name → (layer factory, op, the functional call the layer must make on (x, params, buffers, training))
LAYERS = {
    "batch_norm": (lambda: BatchNorm(C, momentum=0.3), "batch_norm",
                   lambda x, p, b, t: F.batch_norm_forward(x, b["running_mean"], b["running_var"], p["weight"],
                                                           p["bias"], t, 0.3, 1e-5)),
    "batch_norm_no_stats": (lambda: BatchNorm(C, affine=False, track_running_stats=False), "batch_norm",
                            lambda x, p, b, t: F.batch_norm_forward(x, None, None, training=True)),
    "batch_norm_last": (lambda: BatchNorm(C, eps=1e-3, axis=-1), "batch_norm",
                        lambda x, p, b, t: F.batch_norm_forward(x, b["running_mean"], b["running_var"],
                                                                p["weight"], p["bias"], t, 0.1, 1e-3, axis=-1)),
    "instance_norm": (lambda: InstanceNorm(C, affine=True, track_running_stats=True), "instance_norm",
                      lambda x, p, b, t: F.instance_norm_forward(x, b["running_mean"], b["running_var"],
                                                                 p["weight"], p["bias"], t)),
    "instance_norm_default": (lambda: InstanceNorm(C), "instance_norm",
                              lambda x, p, b, t: F.instance_norm_forward(x)),
    "batch_renorm": (lambda: BatchRenorm(C, rmax=1.5, dmax=0.5), "batch_renorm",
                     lambda x, p, b, t: F.batch_renorm_forward(x, b["running_mean"], b["running_var"],
                                                               p["weight"], p["bias"], t, rmax=1.5, dmax=0.5)),
    "group_norm": (lambda: GroupNorm(3, C, eps=1e-4), "group_norm",
                   lambda x, p, b, t: F.group_norm_forward(x, 3, p["weight"], p["bias"], 1e-4)),
    "layer_norm": (lambda: LayerNorm((4, 3)), "layer_norm",
                   lambda x, p, b, t: F.layer_norm_forward(x, (4, 3), p["weight"], p["bias"])),
    "layer_norm_no_bias": (lambda: LayerNorm((4, 3), bias=False), "layer_norm",
                           lambda x, p, b, t: F.layer_norm_forward(x, (4, 3), p["weight"])),
    "rms_norm": (lambda: RMSNorm(3, eps=1e-6), "rms_norm",
                 lambda x, p, b, t: F.rms_norm_forward(x, (3,), p["weight"], 1e-6)),
}


def randomize(layer, rng):
    """Random params and running stats (through load_state_dict), so no test passes on ones and zeros."""
    state = layer.state_dict()
    for k, v in state.items():
        if k == "num_batches_tracked":
            state[k] = np.array(3, np.int64)
        elif k == "running_var":
            state[k] = rng.uniform(0.5, 2.0, v.shape)
        else:
            state[k] = rng.normal(0.5, 1.0, v.shape)
    layer.load_state_dict(state)
    return layer


def layer_input(name, rng):
    x = rng.normal(0.3, 2.0, SHAPE).astype(np.float32)
    return np.ascontiguousarray(np.moveaxis(x, 1, -1)) if name.endswith("_last") else x


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", LAYERS)
def test_layer_is_its_functional_op(name, training, rng):
    make, op, twin = LAYERS[name]
    layer = randomize(make(), rng).train(training)
    x = layer_input(name, rng)
    params = {k: v.copy() for k, v in layer.params.items()}
    params.setdefault("weight", None)
    params.setdefault("bias", None)
    buffers = {k: v.copy() for k, v in layer.buffers.items()}
    steps = buffers["num_batches_tracked"].copy() if buffers else None

    y = layer(x)
    y_ref, ctx = twin(x, params, buffers, training)
    assert_bitwise(y, y_ref, f"{name} y")
    for k in ("running_mean", "running_var"):
        if k in buffers:
            assert_bitwise(layer.buffers[k], buffers[k], f"{name} {k}")
    if steps is not None:
        assert layer.buffers["num_batches_tracked"] == steps + training
        assert layer.buffers["num_batches_tracked"].dtype == np.int64

    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(dy)
    dx_ref, dweight, dbias = getattr(F, op + "_backward")(dy, ctx)
    assert_bitwise(dx, dx_ref, f"{name} dx")
    for k, g in (("weight", dweight), ("bias", dbias)):
        if k in layer.grads:
            assert_bitwise(layer.grads[k], g, f"{name} d{k}")
        else:
            assert g is None


# ---------------------------------------------------------------- PyTorch

def torch_twins(torch):
    """name → (layer factory taking a dtype, the torch module it stands for), PyTorch's defaults on both."""
    nn = torch.nn
    return {
        "BatchNorm2d": (lambda dt: BatchNorm(C, dtype=dt), lambda: nn.BatchNorm2d(C)),
        "BatchNorm2d_no_stats": (lambda dt: BatchNorm(C, track_running_stats=False, dtype=dt),
                                 lambda: nn.BatchNorm2d(C, track_running_stats=False)),
        "InstanceNorm2d": (lambda dt: InstanceNorm(C, dtype=dt), lambda: nn.InstanceNorm2d(C)),
        "InstanceNorm2d_tracked": (lambda dt: InstanceNorm(C, affine=True, track_running_stats=True, dtype=dt),
                                   lambda: nn.InstanceNorm2d(C, affine=True, track_running_stats=True)),
        "GroupNorm": (lambda dt: GroupNorm(2, C, dtype=dt), lambda: nn.GroupNorm(2, C)),
        "LayerNorm": (lambda dt: LayerNorm((C, 4, 3), dtype=dt), lambda: nn.LayerNorm((C, 4, 3))),
        "LayerNorm_no_bias": (lambda dt: LayerNorm(3, bias=False, dtype=dt), lambda: nn.LayerNorm(3, bias=False)),
        "RMSNorm": (lambda dt: RMSNorm((4, 3), dtype=dt), lambda: nn.RMSNorm((4, 3))),
        # batch renorm's state dict is batch norm's; torch has no batch renorm, so its eval is BN's eval
        "BatchRenorm": (lambda dt: BatchRenorm(C, dtype=dt), lambda: nn.BatchNorm2d(C)),
    }


TWINS = ["BatchNorm2d", "BatchNorm2d_no_stats", "InstanceNorm2d", "InstanceNorm2d_tracked", "GroupNorm", "LayerNorm",
         "LayerNorm_no_bias", "RMSNorm", "BatchRenorm"]


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.mark.parametrize("name", TWINS)
def test_state_dict_layout_is_torch(name, torch):
    make, make_module = torch_twins(torch)[name]
    theirs = make_module().state_dict()
    state = make(np.float32).state_dict()
    assert list(state) == list(theirs)
    for k, v in theirs.items():
        assert state[k].shape == tuple(v.shape), k
        assert state[k].dtype == np.dtype(str(v.dtype).removeprefix("torch.")), k
        np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)     # PyTorch's initial values


@pytest.mark.parametrize("name", TWINS)
def test_torch_state_dict_loads_and_gives_torch_outputs(name, torch, rng):
    """A trained torch module's state dict → same eval output; then one training step on both sides
    gives the same output and buffers (BatchRenorm is compared in eval only: torch has none).

    Known difference: torch's InstanceNorm never counts num_batches_tracked (and treats momentum=None
    as 0, freezing the running stats); ours counts, so momentum=None is a cumulative average as for
    BatchNorm.  The count is therefore not compared for InstanceNorm.
    """
    make, make_module = torch_twins(torch)[name]
    module = make_module().double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(rng.normal(0.5, 1.0, tuple(p.shape))))
        module.train()
        for _ in range(3):                                  # non-trivial running stats
            module(torch.from_numpy(rng.normal(1.0, 3.0, SHAPE)))
    layer = make(np.float64)
    layer.load_state_dict({k: v.numpy() for k, v in module.state_dict().items()})

    x = rng.normal(0.5, 2.0, SHAPE)
    for training in ([False] if name == "BatchRenorm" else [False, True]):
        module.train(training)
        layer.train(training)
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        assert_close(layer(x), expected, ROUNDING, f"{name} training={training}")
        for k, v in module.state_dict().items():
            if v.dtype == torch.int64:
                if not name.startswith("InstanceNorm"):
                    assert layer.buffers[k] == v.item(), k
            else:
                assert_close({**layer.params, **layer.buffers}[k], v.numpy(), ROUNDING, k)


# ---------------------------------------------------------------- state dict

def test_state_dict_round_trip_copies(rng):
    a = BatchNorm(C, momentum=0.2)
    a.params["weight"][:] = rng.normal(size=C)
    for _ in range(2):
        a(rng.normal(1.0, 2.0, SHAPE).astype(np.float32))
    state = a.state_dict()
    b = BatchNorm(C, momentum=0.2)
    weight = b.params["weight"]
    b.load_state_dict(state)
    assert b.params["weight"] is weight                   # loaded in place: an optimizer's references stay valid
    for k, v in state.items():
        assert_bitwise(b.state_dict()[k], v, k)

    state["running_mean"][:] = 123.0                      # the caller's arrays are not aliased ...
    a.state_dict()["running_var"][:] = 123.0              # ... nor are the layer's
    assert not np.any(b.buffers["running_mean"] == 123.0)
    assert not np.any(a.buffers["running_var"] == 123.0)

    x = rng.normal(size=SHAPE).astype(np.float32)
    assert_bitwise(a.eval()(x), b.eval()(x), "eval output after the round trip")


def _bad_state_dicts(layer):
    good = {k: v + 1 for k, v in layer.state_dict().items()}   # differs everywhere, so a partial load shows
    missing = dict(good)
    del missing["running_var"]
    extra = dict(good, running_std=np.ones(C, np.float32))
    short = dict(good, bias=np.zeros(C - 1, np.float32))
    scalar_count = dict(good, num_batches_tracked=np.zeros(1, np.int64))
    float_count = dict(good, num_batches_tracked=np.array(2.0))
    int_weight = dict(good, weight=np.ones(C, np.int64))
    text = dict(good, running_mean="zeros")
    return [
        (missing, KeyError, ["running_var"]),
        (extra, KeyError, ["running_std"]),
        (short, ValueError, ["bias", f"({C - 1},)", f"({C},)"]),
        (scalar_count, ValueError, ["num_batches_tracked", "(1,)", "()"]),
        (float_count, TypeError, ["num_batches_tracked", "float64"]),
        (int_weight, TypeError, ["weight", "int64"]),
        (text, TypeError, ["running_mean"]),
    ]


@pytest.mark.parametrize("case", range(7), ids=["missing", "unexpected", "shape", "count_shape", "count_dtype",
                                               "int_weight", "not_an_array"])
def test_bad_state_dict_raises_and_leaves_layer_unchanged(case, rng):
    layer = randomize(BatchNorm(C), rng)
    before = layer.state_dict()
    bad, error, words = _bad_state_dicts(layer)[case]
    with pytest.raises(error) as info:
        layer.load_state_dict(bad)
    for word in words:
        assert word in str(info.value)
    for k, v in before.items():
        assert_bitwise(layer.state_dict()[k], v, k)


# ---------------------------------------------------------------- train / eval, gradients, momentum=None

def test_train_uses_batch_stats_and_eval_running_stats(rng):
    layer = BatchNorm(C, dtype=np.float64)
    x = rng.normal(3.0, 2.0, SHAPE)
    y = layer(x)                                                      # training: per channel mean 0, var 1
    assert_close(y.mean(axis=(0, 2, 3)), np.zeros(C), ROUNDING)
    n = x.size // C
    var = x.var(axis=(0, 2, 3))
    assert_close(y.var(axis=(0, 2, 3)), var / (var + 1e-5), ROUNDING)
    assert_close(layer.buffers["running_mean"], 0.1 * x.mean(axis=(0, 2, 3)), ROUNDING)
    assert_close(layer.buffers["running_var"], 0.9 + 0.1 * var * n / (n - 1), ROUNDING)

    layer.eval()
    before = layer.state_dict()
    mean, var = layer.buffers["running_mean"], layer.buffers["running_var"]
    expected = (x - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)
    assert_close(layer(x), expected, ROUNDING)
    for k, v in before.items():                                       # eval updates nothing
        assert_bitwise(layer.state_dict()[k], v, k)

    untracked = BatchNorm(C, track_running_stats=False, dtype=np.float64).eval()
    assert untracked.buffers == {} and "running_mean" not in untracked.state_dict()
    assert_bitwise(untracked(x), BatchNorm(C, track_running_stats=False, dtype=np.float64)(x), "batch stats in eval")


def test_rejected_batch_leaves_layer_unchanged():
    layer = BatchNorm(C)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(np.ones((1, C), np.float32))
    assert layer.buffers["num_batches_tracked"] == 0


def test_gradients_accumulate_until_zero_grad(rng):
    layer = randomize(GroupNorm(3, C), rng)
    xs = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2)]
    dys = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2)]
    expected = {"weight": 0.0, "bias": 0.0}
    for x, dy in zip(xs, dys):
        layer(x)
        layer.backward(dy)
        _, ctx = F.group_norm_forward(x, 3, layer.params["weight"], layer.params["bias"])
        _, dweight, dbias = F.group_norm_backward(dy, ctx)
        expected["weight"] = expected["weight"] + dweight
        expected["bias"] = expected["bias"] + dbias
    for k, v in expected.items():
        assert_bitwise(layer.grads[k], v, k)
    layer.zero_grad()
    for g in layer.grads.values():
        assert not g.any()


def test_backward_before_forward_raises():
    with pytest.raises(RuntimeError, match="before any forward"):
        LayerNorm(3).backward(np.ones((2, 3), np.float32))


@pytest.mark.parametrize("make", [lambda: BatchNorm(C, momentum=None, dtype=np.float64),
                                  lambda: BatchRenorm(C, momentum=None, dtype=np.float64),
                                  lambda: InstanceNorm(C, momentum=None, track_running_stats=True,
                                                       dtype=np.float64)],
                         ids=["BatchNorm", "BatchRenorm", "InstanceNorm"])
def test_momentum_none_is_cumulative_average(make, rng):
    """After k batches the running stats are the plain means of the k batch statistics (unbiased var)."""
    layer = make()
    instance = isinstance(layer, InstanceNorm)
    axes = (2, 3) if instance else (0, 2, 3)
    means, variances = [], []
    for _ in range(4):
        x = rng.normal(rng.normal(), rng.uniform(0.5, 3.0), SHAPE)
        layer(x)
        n = np.prod([x.shape[a] for a in axes])
        m, v = x.mean(axis=axes), x.var(axis=axes) * n / (n - 1)
        means.append(m.mean(axis=0) if instance else m)          # instance norm: the batch mean
        variances.append(v.mean(axis=0) if instance else v)
    assert layer.buffers["num_batches_tracked"] == 4
    assert_close(layer.buffers["running_mean"], np.mean(means, axis=0), ROUNDING)
    assert_close(layer.buffers["running_var"], np.mean(variances, axis=0), ROUNDING)


def test_constructor_errors():
    with pytest.raises(ValueError, match="divisible"):
        GroupNorm(4, C)
    with pytest.raises(TypeError, match="float dtype"):
        BatchNorm(C, dtype=np.int32)
