"""Pure functional attention ops: one module per mechanism, each with a ``reference``."""

from attnlab.ops import masks
from attnlab.ops._xla_flash import XlaConfig
from attnlab.ops.attention import (
    AttentionArgs,
    Implementation,
    attention,
    auto_choice,
    explain,
    choose,
    implementations,
    platform,
    reference,
)
from attnlab.ops.masks import MaskSpec, SegmentIds
from attnlab.ops.merge import merge, merge_n

__all__ = [
    "AttentionArgs", "Implementation", "MaskSpec", "SegmentIds", "XlaConfig", "attention", "auto_choice", "explain",
    "choose", "implementations", "masks", "merge", "merge_n", "platform", "reference",
]
