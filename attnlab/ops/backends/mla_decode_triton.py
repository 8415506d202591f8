"""MLA latent decode backend ``"pallas_triton"``: the split-K Pallas kernel over the shared
``[c ; k_R]`` cache, lowered to Triton (compiled on a CUDA GPU; Pallas interpret mode on CPU).
Forward only: its partials are merged by LSE in :func:`attnlab.ops.mla.forward_only`."""

from __future__ import annotations

from attnlab.ops._registry import Implementation
from attnlab.ops.backends import triton_interpret
from attnlab.ops.mla import LatentDecodeArgs, forward_only
from pallas_kernels.gpu.mla_decode import SUPPORTED_DTYPES, MlaDecodeConfig, decode_partials


def unsupported(q, cache, _cache, a: LatentDecodeArgs, plat: str) -> str | None:
    """None if the kernel computes the call, else why not."""
    if a.v_dim >= cache.shape[-1]:
        return "the latent decode kernel needs a RoPE part (v_dim < the cache's width)"
    return None


IMPLEMENTATION = Implementation(
    name="pallas_triton", fn=forward_only(decode_partials, triton_interpret),
    unsupported=unsupported, platforms=("gpu", "cpu"), dtypes=SUPPORTED_DTYPES,
    config_cls=MlaDecodeConfig,
    description="Pallas split-K decode over the latent cache lowered to Triton (GPU): keys "
    "and values read from one buffer, all heads per tile; forward only")
