"""SyncBatchNorm over MPI: batch norm with the statistics of the global batch (every rank's batch).

The math is ``functional``'s; this module only adds the collectives, through the ``sync`` seam of
``functional._forward``/``_backward``.  Per training step, on every rank of ``comm``:

    forward:  pre-check   Allgather (ok, mode, ndim, axis, C, dtype, count) 7 int64 per rank
              statistics  Allgather (mean, M2) per channel                  2·C float64 per rank
                          → Moments.merge in rank order (Chan et al., float64; never E[x²] − E[x]²)
    backward: sums        Allreduce SUM (Σdy, Σdy·x̂ per channel, failure flag)   2·C + 1 float64

Gathering the moments and merging them in rank order (rather than an Allreduce) makes the merged
statistics, hence the running stats, bitwise identical on every rank, and the count comes free with the
pre-check.  y, dx (each rank's slice), dweight, dbias and the running stats equal ``batch_norm`` on the
concatenation of all ranks' batches along axis 0: dweight and dbias come back *summed over all ranks*,
so a data-parallel loop must not all-reduce them again.  Ranks may hold different batch sizes, empty
ones included.

Why a separate pre-check: the statistics message has 2·C values, and MPI collectives whose counts differ
across ranks are undefined — with MPICH a mismatched C ends in a truncation abort or a hang.  The 7-value
header has the same size on every rank whatever it holds, so it is always safe; after it every rank has
the same facts and raises the same error, or none.  A rank that fails its *local* checks (a bad weight
shape, say) still takes part in the collective the others are waiting in, with a failure flag, and the
messages are then shared so every rank raises (error path only: one more small collective).  Every rank
must make the same calls in the same mode, as with ``torch.nn.SyncBatchNorm``: a rank in eval among
training ranks is caught when its backward's pre-check meets their forward's, but a rank that skips a
call altogether (no backward) cannot be detected and leaves the others waiting.

Eval with running statistics exchanges nothing in forward; its backward (frozen batch norm, still
learning weight and bias) does the pre-check and the sums, so dweight and dbias are global in every mode.

Importing this module imports mpi4py (``pip install 'fastnorm[mpi]'``); ``import fastnorm`` does not.
"""
import numpy as np

try:
    from mpi4py import MPI
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("fastnorm.distributed needs mpi4py: pip install 'fastnorm[mpi]'") from exc

from ._plan import normalize_axis, per_channel_error
from .functional import Moments, _backward, _bn, _first
from .layers import BatchNorm

__all__ = ["sync_batch_norm", "sync_batch_norm_forward", "sync_batch_norm_backward", "SyncBatchNorm"]

_OK, _MODE, _NDIM, _AXIS, _C, _DTYPE, _COUNT = range(7)     # the pre-check header, one int64 each
_BATCH_STATS, _RUNNING_STATS = 1, 2                          # _MODE: where the pre-check is called from
_RAISED = {"TypeError": TypeError, "ValueError": ValueError}   # other ranks raise the same class


class _Sync:
    """The ``sync`` object of one forward and its backward(s): every collective of SyncBatchNorm."""

    def __init__(self, comm, x, axis, training):
        self.comm, self.size = comm, comm.Get_size()
        self._x, self._axis, self._training = x, axis, training   # read once _bn has validated them
        self.checked = False          # pre-check done: the ranks agree on C, layout and dtype
        self.pending_sums = False     # a backward is running and has not reached sums() yet

    # ---------------------------------------------------------------- the seam (functional._forward/_backward)

    def stats(self, n, mean, m2):
        """(count, mean, M2) of the global batch from this rank's (1, C) moments (n: in the pre-check)."""
        counts = self.check(_BATCH_STATS)
        C = mean.shape[-1]
        gathered = np.empty((self.size, 2, C))                                   # (ranks, mean|M2, C)
        self.comm.Allgather(np.concatenate([mean, m2]), gathered)
        total = Moments.merge(*(Moments(int(c), g[0], g[1]) for c, g in zip(counts, gathered)))
        return total.count, total.mean.reshape(mean.shape), total.m2.reshape(m2.shape)

    def sums(self, sum_dy, sum_dyx):
        """Global (Σdy, Σdy·x̂) per channel; the last slot of the one Allreduce counts failed ranks."""
        self.pending_sums = False     # from here on an error is raised by every rank alike
        if not self.checked:      # eval: the forward exchanged nothing, so the ranks' C is unchecked
            self.check(_RUNNING_STATS)
        C = sum_dy.shape[-1]
        buf = self._allreduce(np.concatenate([sum_dy.ravel(), sum_dyx.ravel(), [0.0]]))
        return buf[:C].reshape(sum_dy.shape), buf[C:2 * C].reshape(sum_dyx.shape)

    # ---------------------------------------------------------------- collectives and their failures

    def check(self, mode, exc=None):
        """The pre-check: one Allgather of a fixed-size header; the same verdict on every rank.

        Returns the per-rank counts.  mode: _BATCH_STATS from the forward's stats, _RUNNING_STATS from an
        eval backward — a rank in eval meeting ranks in training fails here instead of in a mismatched
        data collective.  ``exc``: this rank failed locally and only takes part (returns None).
        """
        self.checked = True
        mine = np.full(7, -1, np.int64)
        mine[[_OK, _MODE]] = exc is None, mode
        if exc is None:
            x = self._x
            axis = normalize_axis(self._axis, x.ndim)
            C = x.shape[axis]
            count = x.size // C if C else 0
            mine[[_NDIM, _AXIS, _C, _DTYPE, _COUNT]] = (x.ndim, axis, C, ord(x.dtype.char), count)
        headers = np.empty((self.size, 7), np.int64)
        self.comm.Allgather(mine, headers)
        if not headers[:, _OK].all():
            return self._share_failure(exc)
        if (headers[:, _MODE:_COUNT] != headers[0, _MODE:_COUNT]).any():   # one test on the fast path
            self._disagree(headers)
        self.channels = int(headers[0, _C])
        if self._training and headers[:, _COUNT].sum() == 1:   # as _bn's local check, on the global batch
            shape = [1] * int(headers[0, _NDIM])
            shape[headers[0, _AXIS]] = self.channels
            raise per_channel_error(shape)
        return headers[:, _COUNT]

    @staticmethod
    def _disagree(headers):
        """Raise for the first of mode, C, layout, dtype on which the ranks' headers differ."""
        for columns, error, what, describe in (
                ([_MODE], ValueError, "the same mode", lambda h: "batch statistics (training, or no running stats)"
                 if h[_MODE] == _BATCH_STATS else "running statistics (eval)"),
                ([_C], ValueError, "the same number of channels", lambda h: f"C={h[_C]}"),
                ([_AXIS, _NDIM], ValueError, "the same channel axis",
                 lambda h: f"axis {h[_AXIS]} of a {h[_NDIM]}-d input"),
                ([_DTYPE], TypeError, "the same input dtype", lambda h: str(np.dtype(chr(h[_DTYPE]))))):
            if (headers[:, columns] != headers[0, columns]).any():
                ranks = ", ".join(f"rank {r}: {describe(h)}" for r, h in enumerate(headers))
                raise error(f"sync_batch_norm needs {what} on every rank of the communicator, got {ranks}")

    def _allreduce(self, buf, exc=None):
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        if buf[-1]:
            self._share_failure(exc)
        return buf

    def fail(self, exc):
        """This rank raised ``exc`` before a collective the other ranks are in: take part in it, flagged.

        Nothing to do when the error came out of a collective (every rank raised it) or after the last one.
        """
        if not self.checked:
            self.check(-1, exc)
        elif self.pending_sums:
            self.pending_sums = False
            buf = np.zeros(2 * self.channels + 1)
            buf[-1] = 1.0
            self._allreduce(buf, exc)

    def _share_failure(self, exc):
        """Every rank knows some rank failed: gather the messages (error path only); raise them elsewhere."""
        messages = self.comm.allgather(None if exc is None else (type(exc).__name__, str(exc)))
        if exc is not None:
            return                  # the caller re-raises this rank's own exception
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        text = "; ".join(f"rank {r}: {name}: {msg}" for r, (name, msg) in failed)
        raise _RAISED.get(failed[0][1][0], RuntimeError)(
            f"sync_batch_norm raised on {len(failed)} of {self.size} ranks (so it raises on every rank): {text}")


# ---------------------------------------------------------------- functional API

def sync_batch_norm_forward(input, running_mean, running_var, weight=None, bias=None, training=True,
                            momentum=0.1, eps=1e-5, *, axis=1, comm=None, out=None, num_batches_tracked=None):
    """Batch norm over every axis but ``axis`` of the *global* batch (every rank of ``comm``'s input).

    y = (x − μ)/sqrt(σ² + eps)·weight + bias, μ and σ² per channel over all ranks' batches; returns
    ``(y, ctx)`` for ``sync_batch_norm_backward``.  Running stats are updated identically on every rank
    (unbiased over the global count).  Collective: every rank of ``comm`` (default ``MPI.COMM_WORLD``)
    must call it, in the same mode.
    """
    comm = MPI.COMM_WORLD if comm is None else comm
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm must be an mpi4py intracommunicator, got {type(comm).__name__}")
    sync = _Sync(comm, input, axis, bool(training))
    try:
        return _bn(input, running_mean, running_var, weight, bias, training, momentum, eps, axis, out,
                   num_batches_tracked, None, sync=sync)
    except Exception as exc:
        sync.fail(exc)
        raise


def sync_batch_norm_backward(grad_output, ctx):
    """(dx, dweight, dbias) of ``sync_batch_norm_forward``: dx for this rank's slice, dweight and dbias
    summed over every rank (those of the global batch).  Collective, like the forward."""
    sync = getattr(ctx, "sync", None)
    if not isinstance(sync, _Sync):
        raise TypeError("ctx must be the context returned by sync_batch_norm_forward")
    sync.pending_sums = ctx.x3 is not None     # None: the global batch was empty, no rank communicates
    try:
        return _backward(grad_output, ctx)
    except Exception as exc:
        sync.fail(exc)
        raise


sync_batch_norm = _first(sync_batch_norm_forward)


# ---------------------------------------------------------------- layer

class SyncBatchNorm(BatchNorm):
    """``BatchNorm`` with the statistics of the global batch (``torch.nn.SyncBatchNorm``).

    Same params, buffers and state dict as ``BatchNorm``; ``comm`` (default ``MPI.COMM_WORLD``) is the
    group of ranks whose batches are normalized together.  ``grads['weight']``/``grads['bias']`` are
    already summed over every rank: all-reduce the other layers' gradients, not these.
    """

    _op = staticmethod(sync_batch_norm_forward)
    _backward = staticmethod(sync_batch_norm_backward)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *,
                 axis=1, dtype=np.float32, comm=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis=axis, dtype=dtype)
        self.comm = comm

    def _op_kwargs(self):
        return {"comm": self.comm}
