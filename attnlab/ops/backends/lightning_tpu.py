"""Lightning backend ``"pallas_tpu"``: the chunked Mosaic TPU lightning kernels, forward and
backward (TPU interpret mode on CPU; lowered for TPU, verified in interpret mode, never run
on a TPU), head dims from 1 to 256 (padded inside the kernels' wrapper). LASP over them uses
the generic block phases."""

from __future__ import annotations

from attnlab.ops._registry import Implementation
from attnlab.ops.backends import head_dims_over, tpu_interpret
from attnlab.ops.lightning import LightningArgs
from pallas_kernels.tpu.lightning_chunk import (
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    TpuLightningConfig,
    lightning_attention,
)


def unsupported(q, k, v, a: LightningArgs, plat: str) -> str | None:
    """None if the TPU kernels compute the call, else why not (head dims above 256)."""
    return head_dims_over("pallas_tpu", q, v, MAX_HEAD_DIM)


def _fn(q, k, v, a: LightningArgs):
    return lightning_attention(
        q, k, v, a.log_decay, initial_state=a.initial_state, segment_ids=a.segment_ids,
        scale=a.scale, config=a.config,
        interpret=tpu_interpret(),
    )


IMPLEMENTATION = Implementation(
    name="pallas_tpu", fn=_fn, unsupported=unsupported, platforms=("tpu", "cpu"),
    config_cls=TpuLightningConfig, dtypes=SUPPORTED_DTYPES, returns_lse=False,
    description="Pallas chunked lightning kernels on TPU (Mosaic), fwd + bwd, head dims 1 to "
    "256; lowered for TPU (v4, v5e, v5p, v6e), verified in interpret mode, never run on a TPU")
