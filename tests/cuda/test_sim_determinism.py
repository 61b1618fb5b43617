"""Bitwise reproducibility of the CUDA kernels: two runs, any block size, any grid cap — and the
production constants (256 slots, 32-column tiles, CHUNK 32768) on a few shapes."""
import numpy as np
import pytest

import fastnorm
from cases import arrange, assert_bitwise, assert_close, make_call
from devcases import PRODUCTION, config, dev, host, to_device

# (name, op, logical shape, layout, extra): every reduction kernel — lane and column moments, lane,
# column and row sums — with several partials per group (CHUNK = 100).
CALLS = (
    ("bn-first", "batch_norm", (2, 3, 130), "first", {}),
    ("bn-last", "batch_norm", (2, 3, 130), "last", {}),
    ("brn-last", "batch_renorm", (3, 5, 40), "last", dict(rmax=1.5, dmax=0.5)),
    ("in-first", "instance_norm", (2, 3, 130), "first", {}),
    ("gn-last", "group_norm", (2, 6, 35), "last", dict(groups=3)),
    ("ln", "layer_norm", (25, 7), "first", {}),
    ("rms", "rms_norm", (3, 130), "first", {}),
)


def run(name, op, shape, layout, extra, dtype=np.float32):
    """Every device output of forward (y, running stats) and backward, as host arrays."""
    rng = np.random.default_rng(11)
    v = rng.standard_normal(shape).astype(dtype) + 0.5
    x, axis = arrange(v, layout)
    xd, _ = to_device(v, layout)
    if op in ("layer_norm", "rms_norm"):
        call = make_call(op, x, rng=rng, **extra)
    else:
        call = make_call(op, x, axis=axis, rng=rng, **extra)
    kw = {k: (dev(a) if isinstance(a, np.ndarray) else a) for k, a in call.fresh().items()}
    kw["input"] = xd
    y, ctx = getattr(fastnorm, op + "_forward")(**kw)
    dy = rng.standard_normal(x.shape).astype(dtype)
    grads = getattr(fastnorm, op + "_backward")(dev(dy), ctx)
    out = {"y": host(y)}
    out.update({k: host(kw[k]) for k in ("running_mean", "running_var") if kw.get(k) is not None})
    out.update({k: host(g) for k, g in zip(("dx", "dweight", "dbias"), grads) if g is not None})
    return out, call, dy


@pytest.mark.parametrize("spec", CALLS, ids=[c[0] for c in CALLS])
def test_two_runs_and_block_sizes_bitwise(spec):
    first, _, _ = run(*spec)
    again, _, _ = run(*spec)
    with config(THREADS=3, MAX_BLOCKS=1):         # one block walks every unit; 3 threads, not a power of 2
        odd, _, _ = run(*spec)
    with config(THREADS=13, MAX_BLOCKS=64):
        wide, _, _ = run(*spec)
    for k in first:
        assert_bitwise(again[k], first[k], what=f"{spec[0]} {k}: second run")
        assert_bitwise(odd[k], first[k], what=f"{spec[0]} {k}: THREADS=3, MAX_BLOCKS=1")
        assert_bitwise(wide[k], first[k], what=f"{spec[0]} {k}: THREADS=13, MAX_BLOCKS=64")


# The production constants: only the block size stays small (a simulated block is 8 Python threads).
# (2, 2, 1100): lanes longer than 3·256, so the register batches run with 256 slots.
PRODUCTION_CALLS = (
    ("bn-first", "batch_norm", (2, 2, 1100), "first", {}),
    ("bn-last", "batch_norm", (2, 37, 6), "last", {}),
    ("ln", "layer_norm", (5, 40), "first", {}),
)


@pytest.mark.parametrize("spec", PRODUCTION_CALLS, ids=[c[0] for c in PRODUCTION_CALLS])
def test_production_constants(spec):
    with config(**dict(PRODUCTION, THREADS=8, MAX_BLOCKS=4)):
        out, call, dy = run(*spec)
        y, ctx, kw = call.forward(fastnorm)
        dx, dw, db = getattr(fastnorm, spec[1] + "_backward")(dy, ctx)
    assert_close(out["y"], y, what="y")
    assert_close(out["dx"], dx, what="dx")
    assert_close(out["dweight"], dw, what="dweight")
    assert_close(out["dbias"], db, what="dbias")
    for k in ("running_mean", "running_var"):
        if k in out:
            assert_close(out[k], kw[k], what=k)
