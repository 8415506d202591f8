"""MLA latent decode backend ``"pallas_triton"``: the split-K Pallas kernel over the shared
``[c ; k_R]`` cache, lowered to Triton (compiled on a CUDA GPU; Pallas interpret mode on CPU).
Forward only: its partials are merged by LSE here."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops._registry import Implementation
from attnlab.ops.backends import triton_interpret
from attnlab.ops.decode import query_positions
from attnlab.ops.merge import merge_n
from attnlab.ops.mla import LatentDecodeArgs
from pallas_kernels.gpu.mla_decode import SUPPORTED_DTYPES, MlaDecodeConfig, decode_partials

_FORWARD_ONLY = "the latent decode kernel is forward-only; use impl='xla' to differentiate"


def unsupported(q, cache, _cache, a: LatentDecodeArgs, plat: str) -> str | None:
    """None if the kernel computes the call, else why not."""
    if a.v_dim >= cache.shape[-1]:
        return "the latent decode kernel needs a RoPE part (v_dim < the cache's width)"
    return None


def _fn(q, cache, _cache, a: LatentDecodeArgs):
    lengths, _ = query_positions(a.kv_lengths, q.shape[0], q.shape[1], cache.shape[1])

    @jax.custom_vjp
    def run(q, cache, lengths):
        o_parts, lse_parts = decode_partials(
            q, cache, lengths, v_dim=a.v_dim, spec=a.spec, scale=a.scale, config=a.config,
            interpret=triton_interpret(),
        )
        out, lse = merge_n(o_parts, lse_parts)
        return out.astype(q.dtype), lse

    def bwd(_, cts):
        raise NotImplementedError(_FORWARD_ONLY)

    run.defvjp(lambda q, cache, lengths: (run(q, cache, lengths), None), bwd)
    return run(q, cache, jnp.asarray(lengths, jnp.int32))


IMPLEMENTATION = Implementation(
    name="pallas_triton", fn=_fn, unsupported=unsupported, platforms=("gpu", "cpu"),
    dtypes=SUPPORTED_DTYPES, config_cls=MlaDecodeConfig,
    description="Pallas split-K decode over the latent cache lowered to Triton (GPU): keys "
    "and values read from one buffer, all heads per tile; forward only")
