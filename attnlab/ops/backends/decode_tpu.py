"""Decode backend ``"pallas_tpu"``: the Mosaic TPU split-K decode kernel (TPU interpret mode on
CPU; lowered for TPU, verified in interpret mode, never run on a TPU). Forward only: its
per-split partials are merged by LSE in :func:`attnlab.ops.decode.forward_only`."""

from __future__ import annotations

from attnlab.ops._registry import Implementation
from attnlab.ops.backends import tpu_interpret
from attnlab.ops.decode import forward_only
from pallas_kernels.tpu.decode import SUPPORTED_DTYPES, TpuDecodeConfig, decode_partials

# No ``unsupported``: the kernel takes every head count and head dim the op does (a cache
# whose [B, S, K*H] view a TPU cannot tile is zero-padded inside its wrapper).
IMPLEMENTATION = Implementation(
    name="pallas_tpu", fn=forward_only(decode_partials, tpu_interpret),
    platforms=("tpu", "cpu"), dtypes=SUPPORTED_DTYPES, config_cls=TpuDecodeConfig,
    description="Mosaic TPU Pallas split-K decode kernel, lengths by scalar prefetch; forward "
    "only; lowered for TPU (v4, v5e, v5p, v6e), verified in interpret mode, never run on a TPU")
