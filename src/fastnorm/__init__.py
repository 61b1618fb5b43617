"""fastnorm: Numba-accelerated normalization kernels for NumPy arrays (CPU prange, CUDA).

Importing compiles nothing and does not import numba.cuda: kernels compile (or load from the on-disk
cache) on first use.
"""
__version__ = "0.1.0"

from . import _threads  # noqa: F401  (chooses a thread-safe Numba threading layer before any kernel runs)
from .functional import (  # noqa: F401
    batch_norm, batch_norm_backward, batch_norm_forward,
    batch_renorm, batch_renorm_backward, batch_renorm_forward,
    group_norm, group_norm_backward, group_norm_forward,
    instance_norm, instance_norm_backward, instance_norm_forward,
    Moments, moments,
    layer_norm, layer_norm_backward, layer_norm_forward,
    rms_norm, rms_norm_backward, rms_norm_forward,
)
from .layers import BatchNorm, BatchRenorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm  # noqa: F401
from ._plan import release_memory  # noqa: F401
