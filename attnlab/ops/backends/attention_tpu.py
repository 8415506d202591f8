"""Attention backend ``"pallas_tpu"``: the Mosaic TPU Pallas flash-attention kernels.

On TPU the kernels are compiled by Mosaic; on CPU they run in TPU interpret mode, which is how
the tests check them. They are verified in interpret mode and lowered for TPU from CPU only:
no TPU is available to the project, so they have never been timed on a chip.
"""

from __future__ import annotations

import jax

from attnlab.ops._registry import Implementation
from attnlab.ops.attention import AttentionArgs
from attnlab.ops.backends import tpu_interpret
from pallas_kernels.tpu.flash import (
    SUPPORTED_DTYPES,
    TpuFlashConfig,
    flash_attention,
    flash_vjp_bwd,
)


def unsupported(q, k, v, a: AttentionArgs, plat: str) -> str | None:
    """None if the TPU kernels compute the call on ``plat``, else why not."""
    if a.bias is not None:
        return "the TPU kernel takes no logits bias; use impl='xla' or 'reference' for a bias"
    return None


def _setup(a: AttentionArgs):
    """(config, interpret, q segment ids, kv segment ids) of a call."""
    cfg = a.config if a.config is not None else TpuFlashConfig.get_default()
    interpret = tpu_interpret()
    seg = a.segment_ids
    return cfg, interpret, None if seg is None else seg.q, None if seg is None else seg.kv


def _fn(q: jax.Array, k: jax.Array, v: jax.Array, a: AttentionArgs):
    cfg, interpret, q_seg, kv_seg = _setup(a)
    return flash_attention(
        q, k, v, a.q_positions, a.kv_positions, q_seg, kv_seg, spec=a.spec, scale=a.scale,
        soft_cap=a.logits_soft_cap, config=cfg, interpret=interpret,
        return_entropy=a.return_entropy,
    )


def _block_bwd(q, k, v, out, lse, dout, dlse, a: AttentionArgs):
    cfg, interpret, q_seg, kv_seg = _setup(a)
    res = (q, k, v, a.q_positions, a.kv_positions, q_seg, kv_seg, out, lse)
    grads = flash_vjp_bwd(
        a.spec, a.scale, a.logits_soft_cap, cfg, interpret, False, res, (dout, dlse)
    )
    return grads[:3]


IMPLEMENTATION = Implementation(
    name="pallas_tpu", fn=_fn, bwd=_block_bwd, unsupported=unsupported, platforms=("tpu", "cpu"),
    dtypes=SUPPORTED_DTYPES, config_cls=TpuFlashConfig, returns_entropy=True,
    description="Mosaic TPU Pallas flash attention (fwd + bwd kernels); LSE, entropy; "
    "lowered for TPU (v4, v5e, v5p, v6e), verified in interpret mode, never run on a TPU")
