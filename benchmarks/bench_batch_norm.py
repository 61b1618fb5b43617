"""Batch norm: per channel over N and spatial dims.  ``8192x256`` is the per-activation (N, C) case."""
from .common import BACKENDS, CHANNEL_LAYOUTS, DTYPES, _FirstCall, _Memory, _TimingEval

PARAMS = [["4x8x8x8", "32x64x28x28", "8192x256"], DTYPES, CHANNEL_LAYOUTS, BACKENDS]


class BatchNorm(_TimingEval):
    op = "batch_norm"
    params = PARAMS


class BatchNormMemory(_Memory):
    op = "batch_norm"
    params = PARAMS


class BatchNormFirstCall(_FirstCall):
    op = "batch_norm"
