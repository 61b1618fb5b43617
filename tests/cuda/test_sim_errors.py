"""Host/device mixing and device-only errors."""
import numpy as np
import pytest

import fastnorm
from fastnorm import _cuda
from devcases import SIM, config, dev

X = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
W = np.ones(3, np.float32)


@pytest.mark.parametrize("device_side", ["input", "weight", "running_mean", "out"])
def test_forward_mixing_is_a_type_error(device_side):
    kw = dict(input=X, running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32), weight=W,
              training=True, out=np.empty_like(X))
    kw[device_side] = dev(kw[device_side])
    with pytest.raises(TypeError, match=f"{device_side}.*GPU.*host"):
        fastnorm.batch_norm(**kw)


def test_backward_mixing_is_a_type_error():
    y, ctx = fastnorm.layer_norm_forward(dev(X), (5,))
    with pytest.raises(TypeError, match="grad_output.*host|host.*grad_output"):
        fastnorm.layer_norm_backward(np.ones_like(X), ctx)
    y, ctx = fastnorm.layer_norm_forward(X, (5,))
    with pytest.raises(TypeError, match="grad_output.*GPU"):
        fastnorm.layer_norm_backward(dev(np.ones_like(X)), ctx)


def test_validation_still_applies_on_device():
    with pytest.raises(ValueError, match="shape"):
        fastnorm.batch_norm(dev(X), None, None, dev(np.ones(4, np.float32)), training=True)
    with pytest.raises(TypeError, match="int32"):
        fastnorm.layer_norm(dev(X.astype(np.int32)), (5,))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fastnorm.batch_norm(dev(X[:1, :, :1]), None, None, training=True)


@pytest.mark.skipif(not SIM, reason="negative-stride device views are built from the simulator's NumPy array")
def test_negative_strides_are_a_clear_error():
    with pytest.raises(ValueError, match="negative strides"):
        fastnorm.layer_norm(dev(X)[::-1], (5,))


def test_out_aliasing_the_input_on_device_is_rejected():
    d = dev(X)
    for out in (d, d[:, :, :]):
        with pytest.raises(ValueError, match=r"out must not alias input \(shape \(4, 3, 5\)\)"):
            fastnorm.layer_norm(d, (5,), out=out)
    y = fastnorm.layer_norm(d, (5,), out=dev(np.empty_like(X)))
    np.testing.assert_allclose(y.copy_to_host(), fastnorm.layer_norm(X, (5,)), rtol=1e-6, atol=1e-6)


def test_threads_setting_is_checked():
    with config(THREADS=0), pytest.raises(ValueError, match="THREADS"):
        fastnorm.layer_norm(dev(X), (5,))
    assert _cuda.THREADS == 8
