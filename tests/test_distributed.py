"""SyncBatchNorm under real MPI: each test launches ``mpiexec -n R`` and asserts on its return code.

The checks themselves run inside the ranks (``tests/mpi_worker.py``, ``examples/sync_bn_train.py``); a
failure shows their output.  The environment, ``NUMBA_CACHE_DIR`` included, is passed on unchanged, so
the ranks share the test run's kernel cache: measured here, a 3-rank worker takes ~23 s with a cold
cache and ~5 s with a warm one on 2 cores.  The timeout turns a hang (a collective some rank never
joins) into a failure; killing mpiexec takes its ranks down with it.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mpi4py", reason="fastnorm.distributed needs the mpi extra: pip install -e '.[mpi]'")
MPIEXEC = shutil.which("mpiexec")
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not on PATH (pip install mpich)")

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300   # s: ~10× the cold-cache run above, so only a hang reaches it


def mpirun(ranks, script, *args):
    """``mpiexec -n ranks python -m mpi4py script args`` (an uncaught exception aborts every rank)."""
    command = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py", str(script), *args]
    proc = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(command)} hung (> {TIMEOUT} s); output so far:\n{output}")
    assert proc.returncode == 0, f"{' '.join(command)} exited with {proc.returncode}:\n{output}"
    return output


@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batch_norm_equals_batch_norm_on_the_global_batch(ranks):
    """y, dx, dweight, dbias, running stats; both layouts, float32/64, unequal and empty batches,
    the layer; mismatched channels/dtype/axis and one-rank failures raise on every rank."""
    output = mpirun(ranks, ROOT / "tests" / "mpi_worker.py")
    assert f"mpi_worker: {ranks} ranks, 0 failure(s)" in output, output


def test_example_losses_match_single_process_training():
    output = mpirun(2, ROOT / "examples" / "sync_bn_train.py", "--check", "--steps", "5")
    assert "losses match" in output, output


def test_import_fastnorm_does_not_import_mpi4py():
    code = "import sys, fastnorm; assert 'mpi4py' not in sys.modules, 'fastnorm imported mpi4py'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=TIMEOUT)
