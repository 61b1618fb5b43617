"""What SyncBatchNorm costs: per training step (forward + backward), ``sync_batch_norm`` over local
``batch_norm`` on the same per-rank batch, split into compute and communication.

    mpiexec -n 2 python examples/sync_bn_overhead.py [--shape 16,64,56,56] [--dtype float32] [--repeat 50]

Both runs happen in the same MPI job, interleaved step by step, so they see the same memory traffic from
the other ranks.  Each rank gets cpu_count // ranks Numba threads (the ranks share the machine).
``mpiexec -n 1 ... --threads 1`` gives the compute overhead alone (collectives of one rank cost ~µs).  The
communicator is wrapped so every collective SyncBatchNorm makes is timed where it is called:

* ``in step``: the collective's wall time inside a training step — transfer plus waiting for the slowest
  rank to arrive (load imbalance between ranks is paid here);
* ``alone``: the same collective with the same sizes in a tight loop of ranks released together by a
  barrier — its pure latency.

Lives in ``examples/``, not in the asv suite: asv imports every module of ``benchmarks/`` to discover
benchmarks, and the ``bench`` extra does not install mpi4py.
"""
import argparse
import os
import time
from collections import defaultdict

import numba
import numpy as np
from mpi4py import MPI

import fastnorm
from fastnorm.distributed import sync_batch_norm_backward, sync_batch_norm_forward


class TimedComm(MPI.Intracomm):
    """The same communicator, adding the wall time of each collective call into ``times[name]``."""

    times = None   # set per step by the caller

    def _timed(self, name, call, *args, **kwargs):
        t0 = time.perf_counter()
        result = call(*args, **kwargs)
        self.times[name] += time.perf_counter() - t0
        return result

    def Allgather(self, send, recv):
        name = "pre-check Allgather" if np.asarray(send).dtype == np.int64 else "stats Allgather"
        return self._timed(name, super().Allgather, send, recv)

    def Allreduce(self, send, recv, op=MPI.SUM):
        return self._timed("sums Allreduce", super().Allreduce, send, recv, op)


def median_ms(samples):
    return 1e3 * float(np.median(samples))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="16,64,56,56", help="per-rank (N, C, H, W)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--threads", type=int, help="Numba threads per rank (default: cpu_count // ranks)")
    args = parser.parse_args()
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    threads = args.threads or max(1, (os.cpu_count() or 1) // size)
    numba.set_num_threads(min(numba.config.NUMBA_NUM_THREADS, threads))
    comm = TimedComm(world)

    shape = tuple(int(s) for s in args.shape.split(","))
    C = shape[1]
    rng = np.random.default_rng(rank)
    x = rng.standard_normal(shape, dtype=np.float32).astype(args.dtype)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(args.dtype)
    weight, bias = np.ones(C, args.dtype), np.zeros(C, args.dtype)
    running = (np.zeros(C, args.dtype), np.ones(C, args.dtype))

    def local_step():
        _, ctx = fastnorm.batch_norm_forward(x, *running, weight, bias, True)
        fastnorm.batch_norm_backward(dy, ctx)

    def sync_step():
        _, ctx = sync_batch_norm_forward(x, *running, weight, bias, True, comm=comm)
        sync_batch_norm_backward(dy, ctx)

    timings = defaultdict(list)      # name → per-step seconds
    for step in range(args.repeat + 2):            # the first two: compile / cache load, page faults
        for name, fn in (("local", local_step), ("sync", sync_step)):
            comm.times = defaultdict(float)
            world.Barrier()
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
            if step >= 2:
                timings[name].append(elapsed)
                for call, t in comm.times.items():
                    timings[call].append(t)
                if name == "sync":     # per step, so that min and median are those of real steps
                    timings["sync compute"].append(elapsed - sum(comm.times.values()))

    # the same collectives, alone: ranks released together, sizes as in a step
    alone = {}
    probes = {"pre-check Allgather": (np.zeros(7, np.int64), np.empty((size, 7), np.int64)),
              "stats Allgather": (np.zeros((2, C)), np.empty((size, 2, C))),
              "sums Allreduce": (MPI.IN_PLACE, np.zeros(2 * C + 1))}
    for name, (send, recv) in probes.items():
        samples = []
        for _ in range(200):
            world.Barrier()
            t0 = time.perf_counter()
            getattr(world, name.split()[-1])(send, recv)        # world.Allgather / world.Allreduce
            samples.append(time.perf_counter() - t0)
        alone[name] = median_ms(samples)

    # a data-parallel step lasts as long as its slowest rank: the max over ranks of each statistic.
    # Median and min: on a shared machine the median carries other processes' noise, the min much less.
    stats = {name: (world.allreduce(median_ms(v), op=MPI.MAX), world.allreduce(1e3 * min(v), op=MPI.MAX))
             for name, v in timings.items()}
    alone = {name: world.allreduce(v, op=MPI.MAX) for name, v in alone.items()}
    if rank == 0:
        calls = list(probes)
        step, compute = {"local": stats["local"], "sync": stats["sync"]}, stats["sync compute"]

        def row(label, values, note=""):
            print(f"  {label:32s}{values[0]:8.3f} {values[1]:8.3f}   {note}")

        print(f"{size} ranks, per-rank input {shape} {args.dtype}, {numba.get_num_threads()} Numba thread(s) per "
              f"rank, {args.repeat} steps (forward + backward, training); ms, max over ranks:")
        print(f"  {'':32s}{'median':>8s} {'min':>8s}")
        row("local batch_norm step", step["local"])
        row("sync_batch_norm step", step["sync"], "extra: " + ", ".join(
            f"{step['sync'][i] - step['local'][i]:+.3f} ms ({100 * (step['sync'][i] / step['local'][i] - 1):+.0f}%)"
            for i in (0, 1)))
        for c in calls:
            row(f"  {c} (in step)", stats[c], f"alone: {alone[c]:.3f} ms")
        row("  compute (step − collectives)", compute, "extra: " + ", ".join(
            f"{compute[i] - step['local'][i]:+.3f} ms" for i in (0, 1)))


if __name__ == "__main__":
    main()
