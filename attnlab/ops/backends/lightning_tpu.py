"""Lightning backend ``"pallas_tpu"``: the chunked Mosaic TPU lightning kernels, forward and
backward (TPU interpret mode on CPU; verified in interpret mode only). LASP over them uses
the generic block phases."""

from __future__ import annotations

from jax.experimental.pallas import tpu as pltpu

from attnlab.ops._registry import Implementation, platform
from attnlab.ops.lightning import LightningArgs
from pallas_kernels.tpu.lightning_chunk import (
    SUPPORTED_DTYPES,
    TpuLightningConfig,
    lightning_attention,
)


def _fn(q, k, v, a: LightningArgs):
    return lightning_attention(
        q, k, v, a.log_decay, initial_state=a.initial_state, segment_ids=a.segment_ids,
        scale=a.scale, config=a.config,
        interpret=pltpu.InterpretParams() if platform() == "cpu" else False,
    )


IMPLEMENTATION = Implementation(
    name="pallas_tpu", fn=_fn, platforms=("tpu", "cpu"), config_cls=TpuLightningConfig,
    dtypes=SUPPORTED_DTYPES, returns_lse=False,
    description="Pallas chunked lightning kernels on TPU (Mosaic), fwd + bwd; verified in TPU "
    "interpret mode only")
