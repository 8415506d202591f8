"""Attention backend ``"pallas_triton"``: the Pallas flash-attention kernels lowered to Triton
(compiled on a CUDA GPU; Pallas interpret mode on CPU, for tests)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attnlab.ops._registry import Implementation
from attnlab.ops.attention import AttentionArgs
from attnlab.ops.backends import head_dims_over, triton_interpret
from pallas_kernels.gpu._common import MAX_HEAD_DIM
from pallas_kernels.gpu.flash_common import (
    FlashConfig,
    config_head_dim,
    tile_plan,
    tiling,
)
from pallas_kernels.gpu.flash_fwd import flash_attention, flash_vjp_bwd

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def unsupported(q, k, v, a: AttentionArgs, plat: str) -> str | None:
    """None if the Triton kernels compute the call on ``plat``, else why not."""
    if a.bias is not None:
        return "pallas_triton takes no bias; use impl='xla' or 'reference' for a logits bias"
    return head_dims_over("pallas_triton", q, v, MAX_HEAD_DIM)


def _seg(a: AttentionArgs):
    seg = a.segment_ids
    return (None, None) if seg is None else (seg.q, seg.kv)


def _fn(q, k, v, a: AttentionArgs):
    q_pos, kv_pos = a.q_positions, a.kv_positions
    if a.positions_are_default:  # static: the kernel builds its tile metadata at trace time
        q_pos = np.arange(q.shape[1], dtype=np.int32)
        kv_pos = np.arange(k.shape[1], dtype=np.int32)
    return flash_attention(
        q, k, v, q_pos, kv_pos, *_seg(a), spec=a.spec, scale=a.scale,
        soft_cap=a.logits_soft_cap, config=a.config, interpret=triton_interpret(),
        return_entropy=a.return_entropy,
    )


def block_bwd(q, k, v, out, lse, dout, dlse, a: AttentionArgs):
    """The Triton backward kernels on one block, from the forward's output and LSE: (dq, dk,
    dv). Also the backward of ``pallas_mosaic_gpu``, whose forward computes the same LSE."""
    cfg = a.config
    if cfg is None:
        cfg = FlashConfig.get_default(
            head_dim=config_head_dim(q.shape[-1], v.shape[-1]), causal=a.spec.causal,
            dtype=q.dtype,
        )
    q_seg, kv_seg = _seg(a)
    plan = tile_plan(
        a.spec, a.q_positions, a.kv_positions, q_seg, kv_seg,
        tiling(cfg, q.shape[1], k.shape[1]),
    )
    res = (q, k, v, a.q_positions, a.kv_positions, q_seg, kv_seg, plan, out, lse)
    grads = flash_vjp_bwd(
        a.spec, a.scale, a.logits_soft_cap, cfg, triton_interpret(), False, res, (dout, dlse)
    )
    return grads[:3]


IMPLEMENTATION = Implementation(
    name="pallas_triton", fn=_fn, bwd=block_bwd, unsupported=unsupported, platforms=("gpu", "cpu"),
    dtypes=_DTYPES, config_cls=FlashConfig, returns_entropy=True, description="Pallas flash "
    "attention lowered to Triton (GPU); masks as block metadata, GQA, soft-cap, LSE, entropy")
