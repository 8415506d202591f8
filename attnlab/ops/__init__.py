"""Pure functional attention ops: one module per mechanism, each with a ``reference``."""

from attnlab.ops import decode, lightning, masks, mla, star
from attnlab.ops._registry import ops, registry
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
from attnlab.ops.attention_grad import attention_bwd
from attnlab.ops.backends.attention_xla import XlaConfig
from attnlab.ops.backends.decode_xla import XlaDecodeConfig
from attnlab.ops.backends.lightning_xla import XlaLightningConfig
from attnlab.ops.decode import decode_attention
from attnlab.ops.dot_product_attention import (
    dot_product_attention,
    explain_dot_product_attention,
)
from attnlab.ops.lightning import (
    alibi_slopes,
    chunk_summary,
    lightning_attention,
    lightning_decode,
    minimax_decay,
    transnormer_decay,
)
from attnlab.ops.masks import MaskSpec, SegmentIds
from attnlab.ops.merge import merge, merge_n
from attnlab.ops.rope import rope
from attnlab.ops.star import StarConfig

__all__ = [
    "AUTO_ORDER", "AttentionArgs", "Implementation", "MaskSpec", "SegmentIds", "StarConfig",
    "XlaConfig",
    "XlaDecodeConfig", "XlaLightningConfig", "alibi_slopes", "attention", "attention_bwd",
    "auto_choice", "choose", "chunk_summary", "decode", "decode_attention", "dot_product_attention",
    "explain", "explain_dot_product_attention",
    "implementations", "lightning", "lightning_attention", "lightning_decode", "masks", "merge",
    "merge_n", "minimax_decay", "mla", "ops", "platform", "reference", "registry", "rope", "star",
    "transnormer_decay",
]
