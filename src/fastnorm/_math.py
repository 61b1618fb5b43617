"""The formulas of every norm, each written once.

Scalar formulas (``merge_into``, ``running_update``, ``renorm_rd``, ``dx_coefficients``) are
``@njit(inline='always')`` functions: prange kernels and ``numba.cuda`` kernels inline them, and
``merge_into.py_func`` merges whole ``Moments`` arrays in NumPy.  The per-group coefficient algebra
(``forward_coefficients``, ``backward_coefficients``, ``update_running``) applies them over the
groups, on the host, for every backend.
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
    # np.minimum/np.maximum rather than min/max: NaN propagates (a NaN channel stays NaN), on the CPU
    # and in CUDA kernels alike.
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


# ---------------------------------------------------------------- per-group coefficient algebra (host)
#
# What every op computes between its statistics and its elementwise pass, on per-group and per-channel
# arrays of a few thousand numbers: serial jitted loops, one call each, so that a tiny call pays ~1 µs
# here instead of ~15 µs for a dozen NumPy ufuncs on 8-element arrays (measured on (4, 8, 8, 8) batch
# norm: 29 µs per call before).  Called from ``functional`` (large inputs, the CUDA backend on host
# copies, SyncBatchNorm) and from ``_cpu.forward_small``/``backward_small``; not used inside kernels.

_HOST = dict(cache=True, nogil=True, error_model="numpy")


@njit(**_HOST)
def update_running(running_mean, running_var, mean, m2, n, momentum):
    """running ← (1 − m)·running + m·batch for both buffers, the variance unbiased (σ²·n/(n − 1)).

    mean/m2 ``(P, C)``: P = 1 (batch norm), or one row per sample (instance norm), averaged over the
    batch first (PyTorch's rule).  Buffers of any float dtype, updated in place.
    """
    P, C = mean.shape
    for c in range(C):
        mu = 0.0
        unbiased = 0.0
        for p in range(P):
            mu += mean[p, c]
            unbiased += m2[p, c] / n * (n / (n - 1))
        running_mean[c] = running_update(running_mean[c], mu / P, momentum)
        running_var[c] = running_update(running_var[c], unbiased / P, momentum)


@njit(**_HOST)
def forward_coefficients(mean, m2, n, eps, rms, batch_stats, running_mean, running_var, momentum, renorm,
                         rmax, dmax, weight, bias, cg, expand, rstd, k, d, mean_c, scale, shift):
    """Everything between the statistics and y = (x − mean_c)·scale + shift.

    batch_stats: mean/m2 ``(P, G)`` are the groups' statistics; rstd = 1/sqrt(m2/n + eps), or for RMS
    norm 1/sqrt(m2/n + μ² + eps) with mean set to 0 (mean(x²) = σ² + μ²: no cancellation).  Otherwise
    (eval) mean and rstd ``(1, C)`` come from the running buffers.
    renorm (training batch norm, P = 1): k, d ``(1, C)`` = r, d of batch renorm from the buffers *before*
    this step's update.  momentum ≥ 0: the buffers are updated (``update_running``).
    expand (lane/column layouts): mean_c, scale, shift ``(P, C)``, channel c of group c // cg:
    scale = rstd·k·weight, shift = d·weight + bias (k = 1, d = 0 without renorm).  Layer/RMS norm
    (expand False) normalize with mean and rstd per row and weight/bias per element.
    """
    P, G = mean.shape
    if batch_stats:
        for p in range(P):
            for g in range(G):
                var = m2[p, g] / n
                if rms:
                    var += mean[p, g] * mean[p, g]
                    mean[p, g] = 0.0
                rstd[p, g] = 1.0 / np.sqrt(var + eps)
    else:
        for g in range(G):
            mean[0, g] = running_mean[g]
            rstd[0, g] = 1.0 / np.sqrt(running_var[g] + eps)
    if renorm:
        for c in range(G):
            k[0, c], d[0, c] = renorm_rd(mean[0, c], 1.0 / rstd[0, c], float(running_mean[c]),
                                         np.sqrt(running_var[c] + eps), rmax, dmax)
    if momentum >= 0.0:
        update_running(running_mean, running_var, mean, m2, n, momentum)
    if expand:
        for p in range(P):
            for c in range(weight.size):
                g = c // cg
                mean_c[p, c] = mean[p, g]
                if renorm:
                    scale[p, c] = rstd[p, g] * k[0, c] * weight[c]
                    shift[p, c] = d[0, c] * weight[c] + bias[c]
                else:
                    scale[p, c] = rstd[p, g] * weight[c]
                    shift[p, c] = bias[c]


@njit(**_HOST)
def backward_coefficients(sum_dy, sum_dyx, weight, mean, rstd, k, d, renorm, n, rms, batch_stats, cg, expand,
                          row_g, row_gx, dweight, dbias, ca, cb, cc):
    """dweight, dbias and the coefficients of dx = dy·A + x·B + C from the backward sums.

    sum_dy/sum_dyx ``(P, X)``: Σdy and Σdy·x̂ per coefficient (per sample and channel for instance/group
    norm in training, else summed over the batch; per column for layer/RMS norm).
    dbias = Σ_p sum_dy, dweight = Σ_p sum_dyx (batch renorm, x̂ = x̂_B·r + d: r·Σdy·x̂_B + d·Σdy).
    Training: per group, g = dy·weight summed over the group (layer/RMS norm: the kernel's row_g/row_gx),
    then ``dx_coefficients``; eval: dx = dy·weight·rstd (B = C = 0).
    expand: A/B/C ``(P, C)`` per channel, A = k·rstd·weight; else ``(P, G)`` per row, A = rstd (the
    kernel multiplies by weight[l]).
    """
    P, X = sum_dy.shape
    for j in range(X):
        s1 = 0.0
        s2 = 0.0
        for p in range(P):
            s1 += sum_dy[p, j]
            s2 += sum_dyx[p, j]
        dbias[j] = s1
        dweight[j] = k[0, j] * s2 + d[0, j] * s1 if renorm else s2
    Pm, G = rstd.shape
    for p in range(Pm):
        for g in range(G):
            r = rstd[p, g]
            kr = r * k[0, g] if renorm else r
            B = 0.0
            C = 0.0
            if batch_stats:
                if expand:
                    sg = 0.0
                    sgx = 0.0
                    for c in range(g * cg, (g + 1) * cg):
                        sg += sum_dy[p, c] * weight[c]
                        sgx += sum_dyx[p, c] * weight[c]
                else:
                    sg = row_g[p, g]
                    sgx = row_gx[p, g]
                B, C = dx_coefficients(kr, r, mean[p, g], sg, sgx, n, rms)
            if expand:
                for c in range(g * cg, (g + 1) * cg):
                    ca[p, c] = kr * weight[c]
                    cb[p, c] = B
                    cc[p, c] = C
            else:
                ca[p, g] = kr
                cb[p, g] = B
                cc[p, g] = C
