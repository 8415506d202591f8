"""MLA latent decode backend ``"pallas_tpu"``: the Mosaic TPU split-K kernel over the shared
``[c ; k_R]`` cache (TPU interpret mode on CPU; lowered for TPU from CPU, never run on one).
Forward only: its partials are merged by LSE in :func:`attnlab.ops.mla.forward_only`."""

from __future__ import annotations

from attnlab.ops._registry import Implementation
from attnlab.ops.backends import tpu_interpret
from attnlab.ops.mla import forward_only, kernel_unsupported
from pallas_kernels.tpu.mla_decode import SUPPORTED_DTYPES, TpuMlaDecodeConfig, decode_partials

IMPLEMENTATION = Implementation(
    name="pallas_tpu", fn=forward_only(decode_partials, tpu_interpret),
    unsupported=kernel_unsupported, platforms=("tpu", "cpu"), dtypes=SUPPORTED_DTYPES,
    config_cls=TpuMlaDecodeConfig,
    description="Mosaic TPU split-K decode over the latent cache, one [block_kv, d_c + d_R] "
    "tile per step for all heads; forward only; lowered for TPU, verified in interpret mode")
