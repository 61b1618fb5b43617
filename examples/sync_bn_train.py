"""Data-parallel training of a small NumPy MLP with SyncBatchNorm over MPI.

    mpiexec -n 2 python examples/sync_bn_train.py [--steps 20] [--batch 50] [--check]

Model: x (N, 16) → Dense(16→32) → SyncBatchNorm(32) → ReLU → Dense(32→4) → softmax cross-entropy.
Every step, each rank draws the same global batch from the step's seed and trains its replica on its
slice (``np.array_split``: sizes may differ by one).  The replicas take exactly the step one process would
take on the whole batch, because

* the loss is the mean over the *global* batch, so each rank's dlogits carry 1/N_global;
* SyncBatchNorm normalizes with the global batch's statistics, and its dweight/dbias come back already
  summed over all ranks: they are the global gradient, and are not all-reduced again;
* the dense layers' gradients are partial sums of that same global gradient: one Allreduce (SUM) of all
  of them makes every replica's gradient the global one.  (Averaging per-rank mean losses would give the
  same only when every rank has the same batch size.)

``--check``: rank 0 then trains a single-process copy (``fastnorm.layers.BatchNorm``) from the same seed
on the whole batch and asserts the per-step losses agree to 1e-6 relative, and every rank checks that
the replicas' parameters are still bitwise identical.
"""
import argparse

import numpy as np
from mpi4py import MPI

from fastnorm.distributed import SyncBatchNorm
from fastnorm.layers import BatchNorm

FEATURES, HIDDEN, CLASSES = 16, 32, 4
DTYPE = np.float64


class MLP:
    """Dense → batch norm → ReLU → Dense, with its hand-written backward."""

    def __init__(self, norm, seed=0):
        rng = np.random.default_rng(seed)
        # He initialisation: N(0, 2/fan_in) keeps the activation variance through ReLU
        self.dense = {"w1": rng.normal(0, np.sqrt(2 / FEATURES), (FEATURES, HIDDEN)), "b1": np.zeros(HIDDEN),
                      "w2": rng.normal(0, np.sqrt(2 / HIDDEN), (HIDDEN, CLASSES)), "b2": np.zeros(CLASSES)}
        self.norm = norm

    def forward(self, x):
        d = self.dense
        self.x = x                                    # (n, FEATURES)
        self.h = self.norm(x @ d["w1"] + d["b1"])     # (n, HIDDEN), normalized per feature
        self.a = np.maximum(self.h, 0)
        return self.a @ d["w2"] + d["b2"]             # (n, CLASSES) logits

    def backward(self, dlogits):
        """Dense gradients of this rank's part of the loss; the norm layer adds into its own ``grads``."""
        d = self.dense
        grads = {"w2": self.a.T @ dlogits, "b2": dlogits.sum(axis=0)}
        dh = (dlogits @ d["w2"].T) * (self.h > 0)
        dz = self.norm.backward(dh)
        grads.update(w1=self.x.T @ dz, b1=dz.sum(axis=0))
        return grads

    def sgd(self, grads, lr):
        for name, g in grads.items():
            self.dense[name] -= lr * g
        for name, p in self.norm.params.items():
            p -= lr * self.norm.grads[name]
        self.norm.zero_grad()

    def parameters(self):
        arrays = (*self.dense.values(), *self.norm.params.values(), *self.norm.buffers.values())
        return np.concatenate([np.ravel(a) for a in arrays])


def global_batch(step, size):
    """The step's batch, the same on every rank: four Gaussian blobs around random centres."""
    rng = np.random.default_rng(1000 + step)
    centres = np.random.default_rng(7).normal(0, 2, (CLASSES, FEATURES))
    labels = rng.integers(0, CLASSES, size)
    return (centres[labels] + rng.normal(0, 1, (size, FEATURES))).astype(DTYPE), labels


def loss_and_grad(logits, labels, n_global):
    """This rank's share of the global mean cross-entropy (its samples' sum / n_global), and its dlogits."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = -np.log(p[rows, labels]).sum() / n_global
    p[rows, labels] -= 1
    return loss, p / n_global


def train(model, steps, batch, lr, comm=None):
    """Per-step global losses.  comm=None: one process on the whole batch; else this rank's slice."""
    losses = []
    for step in range(steps):
        x, labels = global_batch(step, batch)
        if comm is not None:
            mine = np.array_split(np.arange(batch), comm.Get_size())[comm.Get_rank()]
            x, labels = x[mine], labels[mine]
        loss, dlogits = loss_and_grad(model.forward(x), labels, batch)
        grads = model.backward(dlogits)
        if comm is not None:
            # one Allreduce for every dense gradient and the loss: the global sums on every rank
            flat = np.concatenate([*(g.ravel() for g in grads.values()), [loss]])
            comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
            offset = 0
            for g in grads.values():
                g.ravel()[...] = flat[offset:offset + g.size]
                offset += g.size
            loss = flat[-1]
        model.sgd(grads, lr)
        losses.append(float(loss))
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=50, help="global batch size (split across the ranks)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--check", action="store_true", help="compare with a single-process run on rank 0")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()

    model = MLP(SyncBatchNorm(HIDDEN, axis=1, dtype=DTYPE, comm=comm))
    losses = train(model, args.steps, args.batch, args.lr, comm)
    if rank == 0:
        for step, loss in enumerate(losses):
            print(f"step {step:3d}  loss {loss:.10f}")

    if args.check:
        params = model.parameters()
        if not all(np.array_equal(params, other) for other in comm.allgather(params)):
            raise AssertionError(f"rank {rank}: the replicas' parameters differ after training")
        if rank == 0:
            reference = train(MLP(BatchNorm(HIDDEN, axis=1, dtype=DTYPE)), args.steps, args.batch, args.lr)
            rel = np.abs(np.subtract(losses, reference)) / np.abs(reference)
            if not (rel <= 1e-6).all():
                raise AssertionError(f"losses differ from the single-process run: {losses} vs {reference}")
            print(f"losses match the single-process run on the full batch ({comm.Get_size()} ranks, "
                  f"{args.steps} steps): max relative difference {rel.max():.1e}; replicas identical")


if __name__ == "__main__":
    main()
