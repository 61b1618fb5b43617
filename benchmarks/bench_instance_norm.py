"""Instance norm: per sample and channel over spatial dims; eval uses running statistics."""
from .common import BACKENDS, CHANNEL_LAYOUTS, DTYPES, _FirstCall, _Memory, _TimingEval

PARAMS = [["4x8x8x8", "32x64x28x28"], DTYPES, CHANNEL_LAYOUTS, BACKENDS]


class InstanceNorm(_TimingEval):
    op = "instance_norm"
    params = PARAMS


class InstanceNormMemory(_Memory):
    op = "instance_norm"
    params = PARAMS


class InstanceNormFirstCall(_FirstCall):
    op = "instance_norm"
