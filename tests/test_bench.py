"""``python -m fastnorm bench``: a smoke test of the command and a check that its peers compute the
same op.  Timings are never asserted — only that every figure is a positive number."""
import json
import math
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from fastnorm import _bench, _plan

try:
    import torch
except ImportError:
    torch = None


def test_bench_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba_cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "fastnorm", "bench", "--quick", "--ops", "batch_norm", "--repeat", "2",
         "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "fastnorm ms" in proc.stdout and "copy bandwidth" in proc.stdout

    report = json.loads(out.read_text())
    header, rows = report["header"], report["rows"]
    assert header["copy_gbps"] > 0 and header["numba_threads"] >= 1
    assert header["torch"] == (torch.__version__ if torch else None)
    assert [(tuple(r["shape"]), r["mode"]) for r in rows] == [
        (shape, mode) for shape in _bench.QUICK for mode in _bench.MODES]
    columns = ["fastnorm_ms", "numpy_ms", "numpy_over_fastnorm", "gbps", "pct_copy"]
    columns += ["torch_ms", "fastnorm_over_torch"] if torch else []
    for row in rows:
        assert row["op"] == "batch_norm" and row["bytes_moved"] > row["input_bytes"] > 0
        for column in columns:
            assert math.isfinite(row[column]) and row[column] > 0, (column, row)
        if not torch:
            assert row["torch_ms"] is None and row["fastnorm_over_torch"] is None
        assert all(len(s) == 2 and min(s) > 0 for s in row["samples_ms"].values())


CASES = [(op, (2, 64, 3, 2), _bench.CF) for op in _bench.OPS if op not in _bench.ROW_OPS]
CASES += [(op, (2, 3, 2, 64), _bench.CL) for op in _bench.OPS if op not in _bench.ROW_OPS]
CASES += [(op, shape, None) for op in _bench.ROW_OPS for shape in [(6, 16), (2, 3, 16)]]


def _as_numpy(a, layout):
    """A column's output as the NumPy array fastnorm returns: torch tensors of a channels-last case are
    (N, C, spatial…) views, moved back to (N, spatial…, C)."""
    if torch is not None and isinstance(a, torch.Tensor):
        a = a.detach().numpy()
        if layout == _bench.CL and a.ndim > 1:
            a = np.moveaxis(a, 1, -1)
    return np.asarray(a)


@pytest.mark.parametrize("op, shape, layout", CASES)
def test_peers_compute_the_same_op(op, shape, layout):
    """The NumPy and torch columns time the op fastnorm computes (float64; every column starts from
    its own fresh running statistics and runs fwd then fwd+bwd), so the ratios compare like with like.
    Group norm on C=64 runs 32 groups of 2 channels."""
    columns, groups, _, _ = _bench._setup(op, shape, layout, "float64", torch, out=False)
    assert op != "group_norm" or groups == 32
    if torch is not None and op == "batch_renorm":
        del columns["torch"]               # torch batch_norm is batch renorm's peer in time only
    results = {name: {mode: impls[mode]() for mode in _bench.MODES} for name, impls in columns.items()}
    expected = results.pop("fastnorm")
    expected_y, expected_grads = expected["fwd+bwd"]
    expected_grads = [g for g in expected_grads if g is not None]       # rms_norm: dbias is None
    assert results, "no peer to compare with"
    for name, got in results.items():
        np.testing.assert_allclose(_as_numpy(got["fwd"], layout), expected["fwd"], rtol=1e-9, atol=1e-9,
                                   err_msg=name)
        y, grads = got["fwd+bwd"]
        np.testing.assert_allclose(_as_numpy(y, layout), expected_y, rtol=1e-9, atol=1e-9, err_msg=name)
        assert len(grads) == len(expected_grads), name
        for g, e in zip(grads, expected_grads):
            np.testing.assert_allclose(_as_numpy(g, layout), e, rtol=1e-8, atol=1e-9, err_msg=name)


def test_traffic_counts_the_passes_of_the_plan():
    """Bytes moved per input byte: fused per-sample groups read x once (2 fwd, 5 fwd+bwd); batch norm and
    groups longer than a chunk need a statistics pass first (3, 8); channels-last samples fuse the
    forward only (2, 7), and only from FUSED_MIN_SAMPLES samples on."""
    fused, unfused = {"fwd": 2, "fwd+bwd": 5}, {"fwd": 3, "fwd+bwd": 8}
    small = np.zeros((4, 8, 6, 6), np.float32)
    last = small.transpose(0, 2, 3, 1).copy()
    assert _bench._traffic("batch_norm", small, 1, 8) == unfused
    assert _bench._traffic("instance_norm", small, 1, 8) == fused
    assert _bench._traffic("group_norm", small, 1, 4) == fused
    assert _bench._traffic("group_norm", last, -1, 4) == {"fwd": 2, "fwd+bwd": 7}
    assert _bench._traffic("group_norm", last[:_plan.FUSED_MIN_SAMPLES - 1], -1, 4) == unfused
    assert _bench._traffic("batch_norm", last, -1, 8) == unfused
    assert _bench._traffic("layer_norm", np.zeros((3, 64), np.float32), -1, 64) == fused
    assert _bench._traffic("rms_norm", np.zeros((2, _plan.CHUNK + 1), np.float32), -1, 1) == unfused


def test_misses_name_each_target_and_the_bandwidth_it_takes():
    """A 64 MiB row that moved 192 MiB (3 × input) in 10 ms on a 20 GB/s machine (torch 12 ms, NumPy
    50 ms): fwd ≤ 0.5× torch means 6 ms, 192 MiB in 6 ms is 33.6 GB/s = 168% of copy; ≥ 10× NumPy means
    5 ms, 201%; 192 MiB / 10 ms is 20.1 GB/s, 101% of copy, so the copy target is met.  A tiny row
    misses by time only, without a bandwidth."""
    big = dict(input_bytes=64 << 20, bytes_moved=192 << 20, mode="fwd", fastnorm_ms=10.0, torch_ms=12.0,
               numpy_ms=50.0, fastnorm_over_torch=10 / 12, numpy_over_fastnorm=5.0)
    big["pct_copy"] = 100 * (192 << 20) / 10e6 / 20.0
    assert _bench._misses(big, 20.0) == ["torch≤0.5(168%)", "numpy≥10(201%)"]
    assert _bench._misses(dict(big, fastnorm_ms=20.0, fastnorm_over_torch=20 / 12, pct_copy=50.0), 20.0) == [
        "torch≤0.5(168%)", "numpy≥10(201%)", "copy≥70%"]
    fast = dict(big, fastnorm_ms=4.0, fastnorm_over_torch=4 / 12, numpy_over_fastnorm=12.5, pct_copy=252.0)
    assert _bench._misses(fast, 20.0) == []
    tiny = dict(big, input_bytes=2048, bytes_moved=6144, fastnorm_ms=0.012, torch_ms=0.010,
                fastnorm_over_torch=1.2, numpy_over_fastnorm=2.0, pct_copy=2.0)
    assert _bench._misses(tiny, 20.0) == ["torch≤1"]
    assert _bench._misses(dict(tiny, torch_ms=None, fastnorm_over_torch=None), 20.0) == []


_FAULTS = """
import resource, sys
import numpy as np
from fastnorm import _bench
if sys.argv[1] == "reuse":
    assert _bench._reuse_memory()
np.ones(1 << 24, np.float32)                       # 64 MiB, touched, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    np.ones(1 << 24, np.float32)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="--reuse-memory is glibc's mallopt")
def test_reuse_memory_hands_large_blocks_back_without_fresh_pages():
    """``--reuse-memory``: a 64 MiB block freed and allocated again three times faults its pages in at
    every allocation by default (glibc maps it afresh), and not again once the thresholds are raised
    (minor page faults of a fresh interpreter)."""
    def faults(mode):
        proc = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return int(proc.stdout)
    default, reuse = faults("default"), faults("reuse")
    assert default >= 3 * 32, default          # at least one fault per 2 MiB huge page, per allocation
    assert reuse * 10 < default, (reuse, default)


def test_the_header_says_when_memory_reuse_is_on():
    args = _bench._parser().parse_args(["--reuse-memory"])
    header = _bench._header(None, {"np.copyto": 10.0}, args)
    assert header["malloc"] == "mmap/trim thresholds 1024 MiB"
    assert "glibc malloc: mmap/trim thresholds 1024 MiB (--reuse-memory)" in _bench._table(header, [], [], False)
    header = _bench._header(None, {"np.copyto": 10.0}, _bench._parser().parse_args([]))
    assert header["malloc"] == "default" and "glibc malloc: default\n" in _bench._table(header, [], [], False)


_AGAINST = """
import sys
import numpy as np
import fastnorm
from fastnorm import _bench
other = _bench._load_against(sys.argv[1])
assert other.__name__ == _bench.AGAINST and other is not fastnorm and other._cpu is not fastnorm._cpu
x = np.random.default_rng(0).standard_normal((4, 8, 8, 8)).astype(np.float32)
np.testing.assert_array_equal(other.group_norm(x, 4), fastnorm.group_norm(x, 4))
print(other.__file__)
"""


def test_against_times_another_tree_beside_this_one(tmp_path):
    """--against PATH imports a second fastnorm — a checkout or its src/fastnorm — as its own module
    (here this very tree: same results, separate modules), adds its columns to the table and the JSON,
    and names a path without a package as a usage error."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(_bench.__file__)))      # …/src
    root = os.path.dirname(root)                                                    # the checkout
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba_cache"))
    for path in (root, os.path.join(root, "src", "fastnorm")):
        proc = subprocess.run([sys.executable, "-c", _AGAINST, path], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == os.path.join(root, "src", "fastnorm", "__init__.py")

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastnorm", "bench", "--ops", "layer_norm", "--shapes", "16x64", "--repeat", "2",
         "--against", root, "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "against ms" in proc.stdout and "fn/against" in proc.stdout
    report = json.loads(out.read_text())
    assert report["header"]["against"]["path"] == os.path.join(root, "src", "fastnorm")
    for row in report["rows"]:
        assert row["against_ms"] > 0 and math.isfinite(row["fastnorm_over_against"]), row
        assert len(row["samples_ms"]["against"]) == 2

    proc = subprocess.run([sys.executable, "-m", "fastnorm", "bench", "--against", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no fastnorm package there" in proc.stderr
