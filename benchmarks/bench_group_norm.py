"""Group norm with gcd(32, C) groups (32 on ``32x64x28x28``)."""
from .common import BACKENDS, CHANNEL_LAYOUTS, DTYPES, _FirstCall, _Memory, _Timing

PARAMS = [["4x8x8x8", "32x64x28x28"], DTYPES, CHANNEL_LAYOUTS, BACKENDS]


class GroupNorm(_Timing):
    op = "group_norm"
    params = PARAMS


class GroupNormMemory(_Memory):
    op = "group_norm"
    params = PARAMS


class GroupNormFirstCall(_FirstCall):
    op = "group_norm"
