"""Registers the Mosaic TPU Pallas flash attention kernel as ``impl="pallas_tpu"``.

On TPU the kernel is compiled by Mosaic; on CPU it runs in TPU interpret mode, which is how
the tests check it. The kernel is verified in interpret mode only: no TPU is available to the
project, so it has never been compiled for or timed on a chip.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

from attnlab.ops.attention import AttentionArgs, Implementation, platform, register
from pallas_kernels.tpu.flash import SUPPORTED_DTYPES, TpuFlashConfig, flash_attention


def _unsupported(q, k, v, a: AttentionArgs, plat: str) -> str | None:
    if plat not in ("tpu", "cpu"):
        return (
            f"the Mosaic TPU kernel runs on TPU (or interpreted on CPU), not on {plat}; "
            "use impl='pallas_triton' or 'xla'"
        )
    if a.bias is not None:
        return "the TPU kernel takes no logits bias; use impl='xla' or 'reference' for a bias"
    if v.shape[-1] != q.shape[-1]:
        return (
            f"the TPU kernel needs the v head dim to equal the q head dim, got "
            f"{v.shape[-1]} and {q.shape[-1]}"
        )
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the TPU kernel takes float32 or bfloat16 inputs, got {q.dtype}"
    if a.config is not None and not isinstance(a.config, TpuFlashConfig):
        return f"config must be a TpuFlashConfig, got {type(a.config).__name__}"
    return None


def _fn(q: jax.Array, k: jax.Array, v: jax.Array, a: AttentionArgs):
    cfg = a.config if isinstance(a.config, TpuFlashConfig) else TpuFlashConfig.get_default()
    interpret = pltpu.InterpretParams() if platform() == "cpu" else False
    seg = a.segment_ids
    return flash_attention(
        q, k, v, a.q_positions, a.kv_positions,
        None if seg is None else seg.q, None if seg is None else seg.kv,
        spec=a.spec, scale=a.scale, soft_cap=a.logits_soft_cap, config=cfg,
        interpret=interpret, return_entropy=a.return_entropy,
    )


register(
    Implementation(
        "pallas_tpu", _fn, _unsupported,
        "Mosaic TPU Pallas flash attention (fwd + bwd kernels); TPU interpret mode on CPU, "
        "verified in interpret mode only; LSE, entropy",
        returns_entropy=True,
    )
)
