"""Flax NNX modules: one attention module per mechanism, and the decoder LM that mixes them.

Importing this package registers every mechanism it ships (``"S"`` softmax, ``"M"``
multi-head latent attention, and ``"L"`` lightning when its module is present), so a
``Config.layer_pattern`` can name them.
"""

from attnlab.nn.attention import SoftmaxAttention
from attnlab.nn.attention_fn import attention_fn, make_attention_fn
from attnlab.nn.config import Config
from attnlab.nn.generate import decode_step, generate, init_caches, prefill
from attnlab.nn.layers import Embed, RMSNorm, SwiGLU
from attnlab.nn.mla import MultiHeadLatentAttention
from attnlab.nn.registry import get as get_mechanism
from attnlab.nn.registry import mechanisms, register
from attnlab.nn.star import StarConfig, star_generate
from attnlab.nn.transformer import Block, Transformer
from attnlab.ops.rope import rope

__all__ = [
    "Block", "Config", "Embed", "MultiHeadLatentAttention", "RMSNorm", "SoftmaxAttention",
    "StarConfig", "SwiGLU", "Transformer",
    "attention_fn", "decode_step", "generate", "get_mechanism", "init_caches",
    "make_attention_fn", "mechanisms", "prefill",
    "register", "rope", "star_generate",
]

try:  # the lightning module registers "L" when it is there
    from attnlab.nn.lightning import LightningAttention  # noqa: F401
except ImportError as e:
    if e.name != "attnlab.nn.lightning":
        raise
else:
    __all__.append("LightningAttention")
