"""Scalar formulas shared by the CPU and CUDA kernels.

Each is an ``@njit(inline='always')`` function: prange kernels and ``numba.cuda`` kernels both inline
it, and ``.py_func`` is the same formula evaluated by NumPy on whole arrays in the public layer
(``running_update.py_func(running_mean, mean, m)``), so every formula is written exactly once.
"""
import numpy as np
from numba import njit


@njit(inline="always")
def merge_into(count, mean, m2, n_b, mean_b, m2_b):
    """Chan et al. (1979) pairwise merge of (count, mean, M2) with a second part (n_b, mean_b, M2_b).

    delta = mean_b - mean;  n = count + n_b;  mean += delta·n_b/n;  M2 += M2_b + delta²·count·n_b/n.
    Never E[x²] - E[x]²: M2 only ever adds non-negative terms, so no cancellation.
    """
    n = count + n_b
    if n_b == 0:
        return count, mean, m2
    delta = mean_b - mean
    frac = n_b / n
    return n, mean + delta * frac, m2 + m2_b + delta * delta * count * frac


@njit(inline="always")
def running_update(running, batch, momentum):
    """running ← (1 − m)·running + m·batch (PyTorch's exponential moving average)."""
    return (1.0 - momentum) * running + momentum * batch


@njit(inline="always")
def renorm_rd(mean_b, std_b, running_mean, running_std, rmax, dmax):
    """Batch renorm (Ioffe 2017, Alg. 1): r = clip(σ_B/σ, 1/rmax, rmax), d = clip((μ_B − μ)/σ, ±dmax)."""
    # np.minimum/np.maximum rather than min/max: they compile for CPU and CUDA kernels *and* work on
    # whole arrays through .py_func (NaN propagates in both).  Written out, not through a jitted clip
    # helper: .py_func calling a dispatcher compiled it on every process's first renorm (+0.25 s).
    r = np.minimum(np.maximum(std_b / running_std, 1.0 / rmax), rmax)
    d = np.minimum(np.maximum((mean_b - running_mean) / running_std, -dmax), dmax)
    return r, d


@njit(inline="always")
def dx_coefficients(kr, rstd, mean, sg, sgx, n, rms):
    """B and C of dx = dy·A + x·B + C (A = kr·w) from a group's sums sg = Σg, sgx = Σg·x̂ (g = dy·w).

    term 3: B = −kr·rstd·mean(g·x̂);  term 2: C = −kr·mean(g) − mean·B (RMS norm has no mean to
    subtract, so no term 2).  kr = k·rstd (k = r for batch renorm, 1 otherwise).
    """
    mg = 0.0 if rms else sg / n
    B = -kr * rstd * (sgx / n)
    return B, -kr * mg - mean * B
