"""Attention backend ``"cudnn"``: cuDNN flash attention through ``jax.nn.dot_product_attention``
(GPU only; no LSE, offsets, segment ids or soft-cap through that API)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops._registry import Implementation
from attnlab.ops.attention import AttentionArgs


def unsupported(q, k, v, a: AttentionArgs, plat: str) -> str | None:
    """None if cuDNN (through jax.nn) computes the call on ``plat``, else why not."""
    if plat != "gpu":
        return f"cuDNN needs a CUDA GPU (platform is {plat})"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN attention needs bfloat16 or float16 inputs, got {q.dtype}"
    if not a.positions_are_default:
        return "cuDNN (through jax.nn) takes no q_offset/kv_offset or position arrays"
    if a.segment_ids is not None:
        return "cuDNN (through jax.nn) takes no segment_ids"
    if a.logits_soft_cap is not None:
        return "cuDNN (through jax.nn) takes no logits_soft_cap"
    if v.shape[-1] != q.shape[-1]:
        return "cuDNN (through jax.nn) needs equal q/k and v head dims"
    if v.shape[2] != k.shape[2]:
        return "cuDNN (through jax.nn) needs as many value heads as key heads"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"cuDNN needs head_dim a multiple of 8 and <= 256, got {q.shape[-1]}"
    if a.config is not None:
        return "cuDNN takes no config"
    if a.return_residuals:
        return "cuDNN (through jax.nn) cannot return the log-sum-exp (return_residuals=True)"
    return None


def _fn(q, k, v, a: AttentionArgs):
    sp = a.spec
    window = None
    if sp.window_left is not None or sp.window_right is not None:
        far = max(q.shape[1], k.shape[1])
        right = sp.window_right if sp.window_right is not None else (0 if sp.causal else far)
        window = (far if sp.window_left is None else sp.window_left, right)
    out = jax.nn.dot_product_attention(
        q, k, v, bias=a.bias, is_causal=sp.causal, scale=a.scale, local_window_size=window,
        implementation="cudnn",
    )
    return out, None


IMPLEMENTATION = Implementation(
    name="cudnn", fn=_fn, unsupported=unsupported, returns_lse=False,
    description="cuDNN flash attention via jax.nn.dot_product_attention")
