"""MLA latent decode backend ``"pallas_mosaic_gpu"``: the Pallas Mosaic GPU kernel for Hopper
(wgmma, TMA, the latent output split by columns over two warpgroups), compiled by Mosaic GPU
on an sm_90 GPU and run in JAX's Mosaic GPU interpreter on CPU. Forward only: its partials
are merged by LSE in :func:`attnlab.ops.mla.forward_only`."""

from __future__ import annotations

from attnlab.ops._registry import Implementation
from attnlab.ops.backends import mosaic_gpu_interpret, not_hopper
from attnlab.ops.mla import LatentDecodeArgs, forward_only, kernel_unsupported
from pallas_kernels.gpu.mgpu_common import SUPPORTED_DTYPES
from pallas_kernels.gpu.mgpu_mla_decode import (
    MAX_LATENT_DIM,
    MosaicMlaDecodeConfig,
    cache_length_problem,
    decode_partials,
)


def unsupported(q, cache, _cache, a: LatentDecodeArgs, plat: str) -> str | None:
    """None if the Mosaic GPU latent kernel computes the call on ``plat``."""
    why = kernel_unsupported(q, cache, _cache, a, plat)
    if why is None and a.v_dim > MAX_LATENT_DIM:
        why = (f"pallas_mosaic_gpu takes a latent rank (v_dim) up to {MAX_LATENT_DIM}, got "
               f"{a.v_dim}; use impl='pallas_triton'")
    if why is None:
        why = cache_length_problem(
            cache.shape[1], a.config if isinstance(a.config, MosaicMlaDecodeConfig) else None)
    if why is None and plat == "gpu":
        why = not_hopper("pallas_mosaic_gpu", plat)
    return why


IMPLEMENTATION = Implementation(
    name="pallas_mosaic_gpu", fn=forward_only(decode_partials, mosaic_gpu_interpret),
    unsupported=unsupported, platforms=("gpu", "cpu"), dtypes=SUPPORTED_DTYPES,
    config_cls=MosaicMlaDecodeConfig,
    description="Pallas Mosaic GPU latent decode for Hopper: wgmma over the shared cache, "
    "the d_c output columns split over two warpgroups (FlashMLA's layout); forward only")
