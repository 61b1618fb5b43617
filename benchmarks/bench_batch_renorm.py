"""Batch renormalization (Ioffe 2017): batch norm plus the r/d correction, fused."""
from .common import BACKENDS, CHANNEL_LAYOUTS, DTYPES, _FirstCall, _Memory, _TimingEval

PARAMS = [["4x8x8x8", "32x64x28x28"], DTYPES, CHANNEL_LAYOUTS, BACKENDS]


class BatchRenorm(_TimingEval):
    op = "batch_renorm"
    params = PARAMS


class BatchRenormMemory(_Memory):
    op = "batch_renorm"
    params = PARAMS


class BatchRenormFirstCall(_FirstCall):
    op = "batch_renorm"
