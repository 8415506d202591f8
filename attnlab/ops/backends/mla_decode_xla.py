"""MLA latent decode backend ``"xla"``: the split-K XLA decode over the latent cache as one
shared key head and one shared value head (its leading ``v_dim`` columns); differentiable."""

from __future__ import annotations

from attnlab.ops._registry import Implementation
from attnlab.ops.backends.decode_xla import XlaDecodeConfig
from attnlab.ops.decode import decode_attention
from attnlab.ops.mla import LatentDecodeArgs, as_decode_kv


def _fn(q, cache, _cache, a: LatentDecodeArgs):
    k, v = as_decode_kv(cache, a.v_dim)
    return decode_attention(
        q, k, v, kv_lengths=a.kv_lengths, local_window_size=a.spec.window_left, scale=a.scale,
        return_residuals=True, impl="xla", config=a.config,
    )


IMPLEMENTATION = Implementation(
    name="xla", fn=_fn, config_cls=XlaDecodeConfig,
    description="split-K XLA decode over the latent cache (one shared K/V head)")
