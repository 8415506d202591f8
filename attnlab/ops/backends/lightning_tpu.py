"""Lightning backend ``"pallas_tpu"``: the chunked Mosaic TPU lightning kernels, forward and
backward (TPU interpret mode on CPU; verified in interpret mode only). LASP over them uses
the generic block phases."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from attnlab.ops._registry import Implementation, platform
from attnlab.ops.lightning import LightningArgs
from pallas_kernels.tpu.lightning_chunk import TpuLightningConfig, lightning_attention


def unsupported(q, k, v, a: LightningArgs, plat: str) -> str | None:
    """None if the TPU lightning kernels compute the call on ``plat``, else why not."""
    if plat not in ("tpu", "cpu"):
        return f"pallas_tpu runs on tpu (interpreted on CPU), not {plat}"
    if q.dtype == jnp.float64:
        return "pallas_tpu takes float32, bfloat16 or float16 inputs, got float64"
    return None


def _fn(q, k, v, a: LightningArgs):
    return lightning_attention(
        q, k, v, a.log_decay, initial_state=a.initial_state, segment_ids=a.segment_ids,
        scale=a.scale, config=a.config,
        interpret=pltpu.InterpretParams() if platform() == "cpu" else False,
    )


IMPLEMENTATION = Implementation(
    name="pallas_tpu",
    description="Pallas chunked lightning kernel on TPU (Mosaic), fwd + bwd; interpreted on CPU",
    fn=_fn,
    unsupported=unsupported,
    config_cls=TpuLightningConfig,
    returns_lse=False,
)
