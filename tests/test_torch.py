"""Against torch.nn.functional in float64 (skipped without torch): forward, autograd gradients and
running stats of every op but batch renorm (which PyTorch lacks: it is checked against the reference
only).  The float64 oracle ``fastnorm.reference`` is held to the same comparison, so the tests that
trust it elsewhere rest on PyTorch too.  Also: our hard-coded PyTorch error texts are PyTorch's."""
import inspect
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as TF  # noqa: E402

import fastnorm  # noqa: E402
from fastnorm import reference  # noqa: E402
from cases import (BN_ONE_VALUE, GN_DIVISIBLE, IN_ONE_ELEMENT, OPS, ROUNDING, arrange, assert_close,  # noqa: E402
                   make_call)

TORCH_OPS = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm")


def _t(a, grad=False):
    return None if a is None else torch.tensor(np.ascontiguousarray(a), dtype=torch.float64, requires_grad=grad)


def run_torch(call, dy):
    """The call in PyTorch on channels-first tensors: (y, dx, dweight, dbias, running stats), all moved back
    to the layout of ``call``'s input."""
    kw = call.kwargs
    op = call.op
    axis = kw.get("axis", 1)
    x = kw["input"]
    channel = OPS[op].kind == "channel"
    xt = _t(np.moveaxis(x, axis, 1) if channel else x, grad=True)
    w, b = _t(kw.get("weight"), grad=True), _t(kw.get("bias"), grad=True)
    running = [_t(kw.get(k)) for k in ("running_mean", "running_var")]
    eps = kw.get("eps", 1e-5)
    if op in ("batch_norm", "instance_norm"):
        momentum = kw.get("momentum", 0.1)
        if momentum is None:                               # the module's cumulative average
            momentum = 1.0 / int(kw["num_batches_tracked"])
        if op == "batch_norm":
            # no buffers → batch statistics even in eval (api.md); torch's functional refuses that
            # combination and its modules pass training=True instead, as here
            training = kw["training"] or running[0] is None
            y = TF.batch_norm(xt, *running, w, b, training, momentum, eps)
        else:
            y = TF.instance_norm(xt, *running, w, b, kw["use_input_stats"], momentum, eps)
    elif op == "group_norm":
        y = TF.group_norm(xt, kw["num_groups"], w, b, eps)
    elif op == "layer_norm":
        y = TF.layer_norm(xt, kw["normalized_shape"], w, b, eps)
    else:
        y = TF.rms_norm(xt, kw["normalized_shape"], w, kw.get("eps"))
    y.backward(_t(np.moveaxis(dy, axis, 1) if channel else dy))
    back = (lambda a: np.moveaxis(a, 1, axis)) if channel else (lambda a: a)
    grads = [None if t is None else t.grad.numpy() for t in (w, b)]
    return (back(y.detach().numpy()), back(xt.grad.numpy()), *grads,
            *[None if r is None else r.numpy() for r in running])


def _torch_cases():
    for op in TORCH_OPS:
        for mode in OPS[op].modes:
            shapes = [(5, 3, 7), (2, 6, 3, 4)] + ([(9, 4)] if op in ("batch_norm", "group_norm") else [])
            for shape in shapes:
                layouts = ("first", "last") if OPS[op].kind == "channel" else ("first",)
                for layout in layouts:
                    for affine in (True, False):
                        yield pytest.param(op, mode, shape, layout, affine,
                                           id=f"{op}-{mode}-{'x'.join(map(str, shape))}-{layout}-"
                                              f"{'affine' if affine else 'plain'}")


@pytest.mark.parametrize("subject", [fastnorm, reference], ids=["fastnorm", "reference"])
@pytest.mark.parametrize("op, mode, shape, layout, affine", list(_torch_cases()))
def test_matches_torch(op, mode, shape, layout, affine, subject, rng):
    v = rng.standard_normal(shape) * 2 + 0.5
    x, axis = arrange(v, layout)
    extra = {}
    if op == "group_norm":
        extra["groups"] = 2 if shape[1] % 2 == 0 else 1
    if OPS[op].kind == "row":
        call = make_call(op, x, rng=rng, nshape=2, weight=affine, bias=affine)
    else:
        call = make_call(op, x, axis=axis, mode=mode, rng=rng, weight=affine, bias=affine, **extra)
    dy = rng.standard_normal(x.shape)
    y_t, dx_t, dw_t, db_t, rm_t, rv_t = run_torch(call, dy)
    y, ctx, kw = call.forward(subject)
    dx, dw, db = call.backward(subject, dy, ctx)
    assert_close(y, y_t, tol=ROUNDING, what="y")
    assert_close(dx, dx_t, tol=ROUNDING, what="dx")
    for name, g, g_t in (("dweight", dw, dw_t), ("dbias", db, db_t)):
        assert (g is None) == (g_t is None), name
        if g is not None:
            assert_close(g, g_t, tol=ROUNDING, what=name)
    for name, r_t in (("running_mean", rm_t), ("running_var", rv_t)):
        if r_t is not None:
            assert_close(kw[name], r_t, tol=ROUNDING, what=name)


@pytest.mark.parametrize("layout", ["first", "last"])
def test_cumulative_momentum_matches_torch_module(layout, rng):
    """momentum=None over several steps equals torch.nn.BatchNorm1d(momentum=None), which counts batches."""
    C = 4
    module = torch.nn.BatchNorm1d(C, momentum=None, dtype=torch.float64)
    state = {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}
    running_mean, running_var = state["running_mean"], state["running_var"]
    for step in range(1, 5):
        v = rng.standard_normal((6, C, 5)) * step + step
        x, axis = arrange(v, layout)
        module.train()
        y_t = module(torch.tensor(v)).detach().numpy()
        y = fastnorm.batch_norm(x, running_mean, running_var, module.weight.detach().numpy(),
                                module.bias.detach().numpy(), True, None, axis=axis,
                                num_batches_tracked=step)
        assert int(module.num_batches_tracked) == step
        assert_close(np.moveaxis(y, axis, 1), y_t, tol=ROUNDING)
        assert_close(running_mean, module.running_mean.numpy(), tol=ROUNDING)
        assert_close(running_var, module.running_var.numpy(), tol=ROUNDING)


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rms_norm_eps_matches_torch(eps, rng):
    x = rng.standard_normal((3, 8)) * 1e-7        # tiny values: eps dominates
    assert_close(fastnorm.rms_norm(x, (8,), eps=eps),
                 TF.rms_norm(torch.tensor(x), (8,), eps=eps).numpy(), tol=ROUNDING)


def _torch_message(fn):
    with pytest.raises(Exception) as info:
        fn()
    # torch prints sizes as torch.Size([1, 3]); our texts print the tuple (1, 3)
    return re.sub(r"torch\.Size\(\[([^\]]*)\]\)", lambda m: str(tuple(int(s) for s in m.group(1).split(","))),
                  str(info.value))


def test_error_texts_are_torchs():
    assert _torch_message(lambda: TF.batch_norm(torch.ones(1, 3), None, None, training=True)) == \
        BN_ONE_VALUE.format((1, 3))
    assert _torch_message(lambda: TF.batch_norm(torch.ones(1, 3, 1, 1), None, None, training=True)) == \
        BN_ONE_VALUE.format((1, 3, 1, 1))
    assert _torch_message(lambda: TF.instance_norm(torch.ones(2, 3, 1))) == IN_ONE_ELEMENT.format((2, 3, 1))
    assert _torch_message(lambda: TF.group_norm(torch.ones(2, 5, 4), 2)) == GN_DIVISIBLE.format([2, 5, 4], 2)
    # and fastnorm's are the same
    with pytest.raises(ValueError) as info:
        fastnorm.group_norm(np.ones((2, 5, 4)), 2)
    assert str(info.value) == _torch_message(lambda: TF.group_norm(torch.ones(2, 5, 4), 2))
    with pytest.raises(ValueError) as info:
        fastnorm.batch_norm(np.ones((1, 3)), None, None, training=True)
    assert str(info.value) == _torch_message(lambda: TF.batch_norm(torch.ones(1, 3), None, None, training=True))


@pytest.mark.parametrize("op", ["batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm"])
@pytest.mark.parametrize("form", ["", "_forward"])
def test_signatures_begin_with_torchs(op, form):
    """Code ports line by line: torch.nn.functional's parameters are fastnorm's first ones, in its order,
    with its defaults; fastnorm's own (axis, out, num_batches_tracked) follow, keyword-only."""
    ours = list(inspect.signature(getattr(fastnorm, op + form)).parameters.values())
    theirs = list(inspect.signature(getattr(TF, op)).parameters.values())
    assert [(p.name, p.default, p.kind) for p in ours[:len(theirs)]] == \
        [(p.name, p.default, p.kind) for p in theirs]
    assert all(p.kind is p.KEYWORD_ONLY for p in ours[len(theirs):])
