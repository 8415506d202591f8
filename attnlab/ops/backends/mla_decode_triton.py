"""MLA latent decode backend ``"pallas_triton"``: the split-K Pallas kernel over the shared
``[c ; k_R]`` cache, lowered to Triton (compiled on a CUDA GPU; Pallas interpret mode on CPU).
Forward only: its partials are merged by LSE in :func:`attnlab.ops.mla.forward_only`."""

from __future__ import annotations

from attnlab.ops._registry import Implementation
from attnlab.ops.backends import triton_interpret
from attnlab.ops.mla import forward_only, kernel_unsupported
from pallas_kernels.gpu.mla_decode import SUPPORTED_DTYPES, MlaDecodeConfig, decode_partials

IMPLEMENTATION = Implementation(
    name="pallas_triton", fn=forward_only(decode_partials, triton_interpret),
    unsupported=kernel_unsupported, platforms=("gpu", "cpu"), dtypes=SUPPORTED_DTYPES,
    config_cls=MlaDecodeConfig,
    description="Pallas split-K decode over the latent cache lowered to Triton (GPU): keys "
    "and values read from one buffer, all heads per tile; forward only")
