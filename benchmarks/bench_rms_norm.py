"""RMS norm over the last dim (eps=None: machine epsilon of the dtype)."""
from .common import BACKENDS, DTYPES, ROW_LAYOUTS, _FirstCall, _Memory, _Timing

PARAMS = [["16x64", "4096x1024"], DTYPES, ROW_LAYOUTS, BACKENDS]


class RMSNorm(_Timing):
    op = "rms_norm"
    params = PARAMS


class RMSNormMemory(_Memory):
    op = "rms_norm"
    params = PARAMS


class RMSNormFirstCall(_FirstCall):
    op = "rms_norm"
