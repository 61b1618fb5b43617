"""``python -m fastnorm demo [--quick] [--out DIR] [--seed N]``: what normalization is for, measured.

Trains small NumPy networks (``fastnorm._nn`` + fastnorm's layers) on scikit-learn's bundled 8×8 digits
(1797 images, no download; a seeded 1297/500 train/validation split) and checks four claims of the
batch-norm paper (Ioffe & Szegedy 2015), the batch-renorm paper (Ioffe 2017) and the seed notes:

1. a sigmoid MLP barely trains without BN (does not reach the target accuracy), and trains with it;
2. with BN the learning rate can go 5× and 30× higher and the net still reaches the target sooner;
3. a small CNN with per-channel BN over batch × height × width (the conv case) trains faster;
4. at batch size 4, BN's train/test mismatch (batch statistics in training, running averages in eval)
   costs eval accuracy; LN and GN do not depend on the batch; batch renorm is meant to close the gap.

Settings were chosen once, not tuned: the BN paper's MNIST net (3 sigmoid layers of 100, batch 60), SGD
with the common momentum 0.9 and lr 0.01, Xavier init for sigmoid and He init for ReLU, PyTorch's
running-stat momentum 0.1, and batch renorm's rmax/dmax ramp.  Every model of an experiment starts from
the same weights and sees the same minibatches.  Accuracy is measured in eval mode (running statistics).

Prints a table (steps to the target validation accuracy, final accuracy, wall time) and the verdict on
each claim; writes ``curves.png`` and ``results.json`` to ``--out``.
"""
import argparse
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numba
import numpy as np

try:    # the optional `demo` extra (threadpoolctl comes with scikit-learn)
    from matplotlib.figure import Figure
    from sklearn.datasets import load_digits
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm
except ImportError as e:
    raise ImportError(f"python -m fastnorm demo needs the demo extra: pip install 'fastnorm[demo]' ({e})") from e

from ._nn import SGD, Conv2d, Dense, Flatten, ReLU, Sequential, Sigmoid, softmax_cross_entropy
from .layers import BatchNorm, BatchRenorm, GroupNorm, LayerNorm

TARGET = 0.95            # validation accuracy that counts as "trained" (logistic regression: 0.978, seed 0)
LR, MOMENTUM = 0.01, 0.9
BATCH, SMALL_BATCH = 60, 4   # the BN paper's MNIST minibatch; the batch-renorm paper's small minibatch
MLP_WIDTHS = (64, 100, 100, 100)     # the BN paper's MNIST net: 3 hidden sigmoid layers of 100
GROUPS = 4                           # GN: 2 and 4 channels per group in the 8- and 16-channel convs
EVALS = 100     # log-spaced validation points per run: "steps to target" to within 9% (6000^(1/99) = 1.09)
# (--quick, full) steps per run: 11k and 82k steps in all; measured on 2 cores under load: 21 s (cold
# Numba cache included) and 58 s
STEPS = {"mlp": (1000, 6000), "cnn": (400, 3000), "small": (1000, 10000)}

NORMS = {   # name → layer for a feature shape: (C,) after a dense layer, (C, H, W) after a conv
    "BN": lambda shape: BatchNorm(shape[0]),
    "LN": lambda shape: LayerNorm(shape),
    "GN": lambda shape: GroupNorm(GROUPS, shape[0]),
    "BRN": lambda shape: BatchRenorm(shape[0]),
}


def mlp(norm):
    """dense → [norm] → sigmoid, three times, then dense → 10 logits; Xavier init (sigmoid)."""
    def build(rng):
        layers = []
        for fan_in, fan_out in zip(MLP_WIDTHS[:-1], MLP_WIDTHS[1:]):
            layers.append(Dense(fan_in, fan_out, rng, init="xavier"))
            layers += [NORMS[norm]((fan_out,))] if norm else []
            layers.append(Sigmoid())
        return Sequential(*layers, Dense(MLP_WIDTHS[-1], 10, rng, init="xavier"))
    return build


def cnn(norm):
    """conv3×3 1→8 → [norm] → ReLU → conv3×3/2 8→16 → [norm] → ReLU → dense 16·4·4 → 10; He init."""
    def build(rng):
        def normed(shape):
            return [NORMS[norm](shape)] if norm else []
        return Sequential(Conv2d(1, 8, 3, rng, padding=1), *normed((8, 8, 8)), ReLU(),
                          Conv2d(8, 16, 3, rng, stride=2, padding=1), *normed((16, 4, 4)), ReLU(),
                          Flatten(), Dense(16 * 4 * 4, 10, rng))
    return build


@dataclass(frozen=True)
class Run:
    model: str
    build: Callable
    images: bool          # (N, 1, 8, 8) input instead of (N, 64)
    steps: int
    lr: float = LR
    batch: int = BATCH


def experiments(quick):
    q = 0 if quick else 1
    mlp_steps, cnn_steps, small_steps = STEPS["mlp"][q], STEPS["cnn"][q], STEPS["small"][q]
    plain, bn = mlp(None), mlp("BN")
    sigmoid = [Run("no norm", plain, False, mlp_steps), Run("BN", bn, False, mlp_steps)]
    higher_lr = sigmoid + [Run(f"{name} lr×{k}", build, False, mlp_steps, lr=LR * k)
                           for k in (5, 30) for name, build in (("BN", bn), ("no norm", plain))]
    conv = [Run("no norm", cnn(None), True, cnn_steps), Run("BN", cnn("BN"), True, cnn_steps)]
    small = [Run(name, cnn(name), True, small_steps, batch=SMALL_BATCH) for name in ("BN", "BRN", "LN", "GN")]
    return {
        "1 sigmoid MLP": sigmoid,
        "2 BN at 5× and 30× the lr": higher_lr,
        "3 CNN, BN in conv layers": conv,
        f"4 CNN at batch {SMALL_BATCH}": small,
    }


def load_data(seed):
    """Digits scaled to [0, 1] (pixels are 0..16), split 1297/500 by a seeded permutation."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(x))
    train, val = order[:-500], order[-500:]
    return x[train], digits.target[train], x[val], digits.target[val]


def minibatches(n, batch, rng):
    """Endless epochs of a fresh permutation; the last partial batch of an epoch is dropped."""
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch + 1, batch):
            yield order[i:i + batch]


def accuracy(model, x, y):
    model.eval()
    correct = np.mean(model(x).argmax(axis=1) == y)
    model.train()
    return float(correct)


def renorm_limits(step, steps):
    """Batch renorm's ramp (Ioffe 2017, §4): plain BN (rmax 1, dmax 0) for 5k steps, then linear to
    dmax 5 at 25k and rmax 3 at 40k; compressed so that 40k maps to half of this run."""
    k = steps / 80_000
    def ramp(start, end, top, bottom):
        return bottom + (top - bottom) * np.clip((step - start * k) / ((end - start) * k), 0.0, 1.0)
    return float(ramp(5_000, 40_000, 3.0, 1.0)), float(ramp(5_000, 25_000, 5.0, 0.0))


def train(run, data, seed, bar):
    """SGD with momentum on a seeded minibatch stream; eval-mode validation accuracy at log-spaced steps."""
    x_train, y_train, x_val, y_val = data
    model = run.build(np.random.default_rng(seed))        # same seed: same initial weights across models
    batches = minibatches(len(x_train), run.batch, np.random.default_rng(seed + 1))
    opt = SGD(model.parameters(), run.lr, MOMENTUM)
    renorm = [layer for layer in model.layers if isinstance(layer, BatchRenorm)]
    evals = set(np.geomspace(1, run.steps, EVALS).round().astype(int).tolist())
    curve, diverged = [], False
    start = time.perf_counter()
    for step in range(1, run.steps + 1):
        for layer in renorm:
            layer.rmax, layer.dmax = renorm_limits(step, run.steps)
        idx = next(batches)
        model.zero_grad()
        loss, dlogits = softmax_cross_entropy(model(x_train[idx]), y_train[idx])
        if not np.isfinite(loss):     # a diverged run stays diverged; record it and stop
            diverged = True
            bar.update(run.steps - step + 1)
            break
        model.backward(dlogits)
        opt.step()
        bar.update(1)
        if step in evals:
            curve.append((step, accuracy(model, x_val, y_val)))
    if diverged:
        curve.append((step, accuracy(model, x_val, y_val)))
    reached = next((s for s, acc in curve if acc >= TARGET), None)
    return {"model": run.model, "lr": run.lr, "batch": run.batch, "steps": run.steps,
            "steps_to_target": reached, "final_acc": curve[-1][1], "diverged": diverged,
            "seconds": time.perf_counter() - start, "curve": curve}


def warm_up(runs, data_for):
    """One train step on 8 samples and one validation pass per model: compiles (or loads from Numba's
    cache) every kernel, the serial small-array builds and the parallel ones the 500-sample validation
    takes, so compile time is reported once instead of inflating the first runs' times."""
    start = time.perf_counter()
    for run in runs:
        x_train, y_train, x_val, y_val = data_for(run)
        model = run.build(np.random.default_rng(0))
        _, dlogits = softmax_cross_entropy(model(x_train[:8]), y_train[:8])
        model.backward(dlogits)
        accuracy(model, x_val, y_val)
    return time.perf_counter() - start


def claims(results):
    """Each claim → (statement, holds, evidence) from the runs' numbers."""
    def by_model(exp):
        return {r["model"]: r for r in results[exp]}
    names = list(results)
    out = []

    sig = by_model(names[0])
    out.append((f"sigmoid MLP: BN reaches {TARGET:.0%}, no norm does not in the same number of steps",
                sig["BN"]["steps_to_target"] is not None and sig["no norm"]["steps_to_target"] is None,
                f"steps no norm {_steps(sig['no norm']['steps_to_target'])}, BN {_steps(sig['BN']['steps_to_target'])};"
                f" final acc no norm {sig['no norm']['final_acc']:.3f}, BN {sig['BN']['final_acc']:.3f}"))

    lr = by_model(names[1])
    base = [lr["BN"]["steps_to_target"], lr["no norm"]["steps_to_target"]]
    base = min((s for s in base if s is not None), default=None)
    faster = [lr[f"BN lr×{k}"]["steps_to_target"] for k in (5, 30)]
    out.append(("BN at lr×5 and lr×30 reaches the target in fewer steps than either model at lr×1",
                all(s is not None for s in faster) and (base is None or max(faster) < base),
                "steps " + ", ".join(f"{m} {_steps(r['steps_to_target'])}" for m, r in lr.items())))

    conv = by_model(names[2])
    plain, bn = conv["no norm"]["steps_to_target"], conv["BN"]["steps_to_target"]
    out.append(("CNN: BN over N×H×W per channel reaches the target in fewer steps",
                bn is not None and (plain is None or bn < plain),
                "steps " + ", ".join(f"{m} {_steps(r['steps_to_target'])}" for m, r in conv.items())))

    small = {m: r["final_acc"] for m, r in by_model(names[3]).items()}
    out.append((f"batch {SMALL_BATCH}: BN's eval accuracy is below LN's and GN's, and BRN's is above BN's",
                small["BN"] < min(small["LN"], small["GN"]) and small["BRN"] > small["BN"],
                "final acc " + ", ".join(f"{m} {a:.3f}" for m, a in small.items())))
    return out


def _steps(s):
    return "never" if s is None else str(s)


def table(results, compile_seconds):
    head = ("experiment", "model", "lr", "batch", f"steps to {TARGET:.0%}", "final val acc", "time s")
    rows = [(exp, r["model"] + (" (diverged)" if r["diverged"] else ""), f"{r['lr']:g}", str(r["batch"]),
             _steps(r["steps_to_target"]), f"{r['final_acc']:.3f}", f"{r['seconds']:.1f}")
            for exp, runs in results.items() for r in runs]
    widths = [max(len(row[i]) for row in rows + [head]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"(Numba compile / cache load before training: {compile_seconds:.1f} s; accuracy in eval mode)")
    return "\n".join(lines)


def plot(results, path):
    fig = Figure(figsize=(12, 8), layout="constrained")
    for ax, (exp, runs) in zip(fig.subplots(2, 2).ravel(), results.items()):
        for r in runs:
            steps, acc = zip(*r["curve"])
            ax.plot(steps, acc, label=f"{r['model']} (lr {r['lr']:g})")
        ax.axhline(TARGET, color="gray", linestyle=":", linewidth=1)
        # log steps: the models differ in the first few hundred steps, then all sit near the top
        ax.set(title=exp, xlabel="training step", ylabel="validation accuracy (eval mode)", ylim=(0, 1),
               xscale="log")
        ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=100)


@contextmanager
def single_threaded():
    """One thread for BLAS and for Numba, restored on exit.

    Every array here is small (≤ 500×8×8×8), so threads only add synchronization, and on a busy machine
    a parallel region waits for whichever worker the OS descheduled.  Measured on this 2-core machine
    under load (--quick): 66 s wall with the default threads and BLAS already limited, 26 s with Numba on
    one thread too; before BLAS was limited, OpenBLAS threads alone made a sigmoid-MLP step 20 ms
    instead of 0.85 ms.
    """
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(threads)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastnorm demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps (under a minute on 2 cores)")
    parser.add_argument("--out", default="demo_out", help="directory for curves.png and results.json")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, the weights and the minibatches")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = load_data(args.seed)
    image_data = (data[0].reshape(-1, 1, 8, 8), data[1], data[2].reshape(-1, 1, 8, 8), data[3])

    def data_for(run):
        return image_data if run.images else data

    exps = experiments(args.quick)
    unique = list(dict.fromkeys(run for runs in exps.values() for run in runs))   # exp 2 repeats exp 1's

    with single_threaded(), np.errstate(over="ignore", invalid="ignore"):   # a diverging run is a result
        compile_seconds = warm_up(unique, data_for)
        done = {}
        with tqdm(total=sum(r.steps for r in unique), unit="step", mininterval=0.5) as bar:
            for run in unique:
                bar.set_description(run.model)
                done[run] = train(run, data_for(run), args.seed, bar)
    results = {exp: [done[run] for run in runs] for exp, runs in exps.items()}

    verdicts = claims(results)
    print(table(results, compile_seconds))
    print()
    for i, (claim, holds, evidence) in enumerate(verdicts, 1):
        print(f"claim {i} {'REPRODUCED' if holds else 'NOT reproduced'}: {claim} ({evidence})")
    plot(results, out / "curves.png")
    total = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps({
        "seed": args.seed, "quick": args.quick, "target": TARGET,
        "compile_seconds": compile_seconds, "total_seconds": total, "experiments": results,
        "claims": [{"claim": c, "holds": bool(h), "evidence": e} for c, h, e in verdicts]}, indent=1))
    print(f"\nwrote {out / 'curves.png'} and {out / 'results.json'} in {total:.0f} s", file=sys.stderr)
    return 0
