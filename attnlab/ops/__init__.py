"""Pure functional attention ops: one module per mechanism, each with a ``reference``."""

from attnlab.ops import decode, masks
from attnlab.ops._xla_flash import XlaConfig
from attnlab.ops.attention import (
    AUTO_ORDER,
    AttentionArgs,
    Implementation,
    attention,
    auto_choice,
    choose,
    explain,
    implementations,
    platform,
    reference,
)
from attnlab.ops.decode import XlaDecodeConfig, decode_attention
from attnlab.ops.masks import MaskSpec, SegmentIds
from attnlab.ops.merge import merge, merge_n

__all__ = [
    "AUTO_ORDER", "AttentionArgs", "Implementation", "MaskSpec", "SegmentIds", "XlaConfig",
    "XlaDecodeConfig", "attention", "auto_choice", "choose", "decode", "decode_attention",
    "explain", "implementations", "masks", "merge", "merge_n", "platform", "reference",
]
