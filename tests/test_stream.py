"""Streaming (non-temporal) stores of layer/RMS norm's y and dx (``_cpu.STREAM_MIN_BYTES``): the
streamed path writes exactly the values of the plain one, at any row length (shorter than, equal to
and longer than the stack buffer ``_cpu.STAGE``), at any alignment of ``out``, and matches the float64
reference.

The tests lower the threshold to 0 so that small inputs stream; the parallel build is reached by
inputs of at least ``_cpu.SERIAL_BELOW`` elements.
"""
import numpy as np
import pytest

import fastnorm
from cases import assert_close
from fastnorm import _cpu, reference

WIDTHS = [1, 7, 1000, _cpu.STAGE, _cpu.STAGE + 1, 2 * _cpu.STAGE + 5]


def _rows(width, parallel):
    """Enough rows for the parallel build (≥ SERIAL_BELOW elements) or few enough for the serial one."""
    if parallel:
        return -(-_cpu.SERIAL_BELOW // width) + 3
    return max(1, min(40, (_cpu.SERIAL_BELOW - 1) // width))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_streamed_rows_equal_plain_rows(monkeypatch, rng, dtype, width, parallel, offset):
    shape = (_rows(width, parallel), width)
    x = (rng.standard_normal(shape) * 3 + 1e3).astype(dtype)      # offset 1e3: the mean matters
    w, b = rng.standard_normal(width).astype(dtype), rng.standard_normal(width).astype(dtype)
    plain_ln, plain_rms = fastnorm.layer_norm(x, (width,), w, b), fastnorm.rms_norm(x, (width,), w)

    monkeypatch.setattr(_cpu, "STREAM_MIN_BYTES", 0)
    raw = np.full(x.size + offset, np.nan, dtype)
    out = raw[offset:].reshape(shape)         # `offset` elements past an allocation: any 32-byte phase
    got = fastnorm.layer_norm(x, (width,), w, b, out=out)
    assert got is out
    np.testing.assert_array_equal(out, plain_ln)
    assert np.isnan(raw[:offset]).all(), "a streamed row wrote before its output"
    np.testing.assert_array_equal(fastnorm.rms_norm(x, (width,), w), plain_rms)
    assert_close(out, reference.layer_norm(x, (width,), w, b), what="streamed layer_norm")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_streamed_backward_equals_plain_backward(monkeypatch, rng, dtype, width, op):
    """dx of the fused row backward (parallel build) is written the same when it streams."""
    shape = (_rows(width, True), width)
    x = (rng.standard_normal(shape) * 3 + 10).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(width).astype(dtype)
    forward, backward = getattr(fastnorm.functional, op + "_forward"), getattr(fastnorm.functional, op + "_backward")
    plain = backward(dy, forward(x, (width,), w)[1])
    monkeypatch.setattr(_cpu, "STREAM_MIN_BYTES", 0)
    streamed = backward(dy, forward(x, (width,), w)[1])
    for a, e in zip(streamed, plain):
        np.testing.assert_array_equal(a, e)
    ref = getattr(reference, op + "_backward")(dy, getattr(reference, op + "_forward")(x, (width,), w)[1])
    assert_close(streamed[0], ref[0], what=f"streamed {op} dx")


def test_large_outputs_stream_and_small_ones_do_not(monkeypatch):
    """The threshold decides per call: record the ``stream`` flag the kernel receives."""
    seen = []
    kernel = _cpu.normalize_groups

    def spy(*args):
        seen.append(args[-1])
        return kernel(*args)
    monkeypatch.setattr(_cpu, "normalize_groups", spy)
    monkeypatch.setattr(_cpu, "STREAM_MIN_BYTES", 64 * 256 * 4)
    x = np.ones((64, 256), np.float32)
    fastnorm.layer_norm(x, (256,))                       # exactly the threshold: streams
    fastnorm.layer_norm(x[:63], (256,))                  # one row less: plain
    fastnorm.instance_norm(np.ones((64, 4, 256), np.float32))   # not a row layout: never streams
    assert seen == [True, False, False]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streaming_into_an_out_not_aligned_to_its_item_size(monkeypatch, rng, dtype):
    """np.frombuffer at an odd byte offset gives an array no element of which is 32-byte aligned: the
    streamed path must fall back to plain stores there, not fault on an aligned vector store."""
    shape = (_rows(1000, True), 1000)
    x = rng.standard_normal(shape).astype(dtype)
    plain = fastnorm.layer_norm(x, (1000,))
    monkeypatch.setattr(_cpu, "STREAM_MIN_BYTES", 0)
    out = np.frombuffer(bytearray(x.nbytes + 1), dtype, offset=1).reshape(shape)
    assert not out.flags.aligned and out.flags.writeable
    assert fastnorm.layer_norm(x, (1000,), out=out) is out
    np.testing.assert_array_equal(out, plain)
