"""Attention backend ``"pallas_mosaic_gpu"``: the Pallas Mosaic GPU flash-attention forward for
Hopper (wgmma, TMA, warp specialization), with the Triton backward kernels.

Forward: :func:`pallas_kernels.gpu.mgpu_flash_fwd.mgpu_flash_attention_fwd`, compiled by
Mosaic GPU on an sm_90 GPU (H100, H200, H800, H20, GH200) and run in JAX's Mosaic GPU
interpreter on CPU, which is how the tests check it. Backward: there is no Mosaic GPU backward
yet; the ``custom_vjp`` here recomputes the gradients with the Triton backward kernels
(:func:`attnlab.ops.backends.attention_triton.block_bwd`) from this forward's output and
log-sum-exp, which is the same function (the LSE contract is shared), compiled by Triton on
the GPU and interpreted on CPU.

Verified in CPU interpret mode and lowered for CUDA from CPU only: it has never run or been
timed on an H100, so ``impl="auto"`` does not choose it (see ``attnlab/ops/README.md``).
"""

from __future__ import annotations

import functools

import jax

from attnlab.ops._registry import Implementation
from attnlab.ops.attention import AttentionArgs, block_args
from attnlab.ops.backends import head_dims_over, mosaic_gpu_interpret, not_hopper
from attnlab.ops.backends.attention_triton import block_bwd
from pallas_kernels.common.masks import SegmentIds
from pallas_kernels.gpu import mgpu_common, mgpu_flash_bwd
from pallas_kernels.gpu.mgpu_flash_fwd import mgpu_flash_attention_fwd


def unsupported(q, k, v, a: AttentionArgs, plat: str) -> str | None:
    """None if the Mosaic GPU forward (and the Triton backward) compute the call on ``plat``."""
    if q.dtype not in mgpu_common.SUPPORTED_DTYPES:
        return (f"pallas_mosaic_gpu takes bfloat16 or float16 inputs, got {q.dtype}: "
                f"{mgpu_common.FLOAT32_REASON}; use impl='pallas_triton' or 'xla'")
    if a.bias is not None:
        return "pallas_mosaic_gpu takes no bias; use impl='xla' or 'reference' for a logits bias"
    why = head_dims_over("pallas_mosaic_gpu", q, v, mgpu_common.MAX_HEAD_DIM)
    if why is None and plat == "gpu":
        why = not_hopper("pallas_mosaic_gpu", plat)
    return why


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, spec, scale, soft_cap, config):
    return mgpu_flash_attention_fwd(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, spec=spec, scale=scale, soft_cap=soft_cap,
        config=config, interpret=mosaic_gpu_interpret(),
    )


def _attention_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, spec, scale, soft_cap, config):
    out, lse = _attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, spec, scale, soft_cap, config)
    return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _attention_bwd(spec, scale, soft_cap, config, res, cts):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    seg = None if q_seg is None else SegmentIds(q_seg, kv_seg)
    a = block_args(spec=spec, q_positions=q_pos, kv_positions=kv_pos, segment_ids=seg,
                   scale=scale, logits_soft_cap=soft_cap, config=config)
    dq, dk, dv = _block_bwd(q, k, v, out, lse, *cts, a)
    return dq, dk, dv, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _fn(q, k, v, a: AttentionArgs):
    seg = a.segment_ids
    return _attention(
        q, k, v, a.q_positions, a.kv_positions, None if seg is None else seg.q,
        None if seg is None else seg.kv, a.spec, a.scale, a.logits_soft_cap, a.config,
    )


def _block_bwd(q, k, v, out, lse, dout, dlse, a: AttentionArgs):
    """The Mosaic GPU backward where the config asks for it and it takes the call (head dims
    up to 128, one key head per value head), else the Triton kernels (with their own default
    tiles, not this forward's config)."""
    cfg = a.config
    mosaic = cfg is not None and cfg.mosaic_backward
    if mosaic and mgpu_flash_bwd.unsupported_reason(q, k, v) is None:
        seg = a.segment_ids
        return mgpu_flash_bwd.mgpu_flash_attention_bwd(
            q, k, v, out, lse, dout, dlse, a.q_positions, a.kv_positions,
            None if seg is None else seg.q, None if seg is None else seg.kv, spec=a.spec,
            scale=a.scale, soft_cap=a.logits_soft_cap, config=cfg,
            interpret=mosaic_gpu_interpret())
    return block_bwd(q, k, v, out, lse, dout, dlse, a._replace(config=None))


IMPLEMENTATION = Implementation(
    name="pallas_mosaic_gpu", fn=_fn, bwd=_block_bwd, unsupported=unsupported,
    platforms=("gpu", "cpu"), config_cls=mgpu_common.MosaicFlashConfig,
    description="Pallas Mosaic GPU flash attention forward for Hopper (wgmma, TMA, warp "
    "specialization), Triton backward; bf16/fp16, LSE; verified in interpret mode, untimed",
)
