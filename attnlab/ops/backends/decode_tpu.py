"""Decode backend ``"pallas_tpu"``: the Mosaic TPU split-K decode kernel (TPU interpret mode on
CPU; lowered for TPU, verified in interpret mode, never run on a TPU). Forward only: its
per-split partials are merged by LSE in :func:`attnlab.ops.decode.forward_only`."""

from __future__ import annotations

from attnlab.ops._registry import Implementation
from attnlab.ops.backends import tpu_interpret
from attnlab.ops.decode import DecodeArgs, forward_only
from pallas_kernels.tpu.decode import (
    SUPPORTED_DTYPES,
    TpuDecodeConfig,
    decode_partials,
    unsupported_shape,
)


def unsupported(q, k, v, a: DecodeArgs, plat: str) -> str | None:
    """None if the TPU decode kernel takes the cache's shape, else why not."""
    return unsupported_shape(k.shape)


IMPLEMENTATION = Implementation(
    name="pallas_tpu", fn=forward_only(decode_partials, tpu_interpret), unsupported=unsupported,
    platforms=("tpu", "cpu"), dtypes=SUPPORTED_DTYPES, config_cls=TpuDecodeConfig,
    description="Mosaic TPU Pallas split-K decode kernel, lengths by scalar prefetch; forward "
    "only; lowered for TPU (v4, v5e, v5p, v6e), verified in interpret mode, never run on a TPU")
