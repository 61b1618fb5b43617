"""Layer norm over the last dim."""
from .common import BACKENDS, DTYPES, ROW_LAYOUTS, _FirstCall, _Memory, _Timing

PARAMS = [["16x64", "4096x1024"], DTYPES, ROW_LAYOUTS, BACKENDS]


class LayerNorm(_Timing):
    op = "layer_norm"
    params = PARAMS


class LayerNormMemory(_Memory):
    op = "layer_norm"
    params = PARAMS


class LayerNormFirstCall(_FirstCall):
    op = "layer_norm"
