"""Multi-head latent attention (MLA; DeepSeek-V2/V3), the form TransMLA converts GQA into.

Per token t, with N heads (letters as everywhere in attnlab; d_c the latent rank, d_n the
per-head "no-RoPE" query/key dim, d_R the decoupled RoPE dim, d_v the value dim)::

    c_t      = W_DKV h_t                          the KV latent, d_c values   (cached)
    k^R_t    = RoPE(W_KR h_t)                     one RoPE key for all heads, d_R (cached)
    k_t,i    = [ W_UK,i c_t ; k^R_t ]             head i's key,   d_n + d_R
    v_t,i    = W_UV,i c_t                         head i's value, d_v
    q_t,i    = [ q^C_t,i ; RoPE(q^R_t,i) ]        head i's query (from h_t, or a low-rank c^Q_t)
    o_t,i    = sum_j softmax_j(q_t,i . k_j,i / sqrt(d_n + d_R)) v_j,i

Training and prefill (:func:`mla_attention`) materialize the per-head K/V and run softmax
attention (any :func:`attnlab.ops.attention` implementation, LSE included, so ring, star and
decode compose as for any softmax layer). Decoding (:func:`mla_decode`) never builds per-head
K/V: the up-projections are absorbed,

    q_t,i . k_j,i = (W_UK,i^T q^C_t,i) . c_j + q^R_t,i . k^R_j     (a query in latent space)
    o_t,i        = W_UV,i ( sum_j p_ij c_j )                       (the output up-projected)

so every head attends over the one shared cache ``[c ; k^R]`` (d_c + d_R values per token),
which is also its own value cache (its first d_c columns): MQA with a key dim of
d_c + d_R and a value dim of d_c. :func:`latent_decode` is that step, an op with its own
implementations (a split-K Pallas kernel that reads each cache byte once per row block).

Weights are per head: ``w_uk`` [d_c, N, d_n] and ``w_uv`` [d_c, N, d_v] (the module owns the
down-projections and RoPE).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from attnlab.ops import decode as _decode
from attnlab.ops._registry import KERNEL_FIRST, Implementation, Registry, backends
from attnlab.ops.attention import attention
from attnlab.ops.attention import reference as attention_reference
from pallas_kernels.common.masks import MaskSpec
from pallas_kernels.common.static_args import check_bool, is_int


def _check_up(name: str, w: Any, d_c: int, n: int) -> None:
    if jnp.ndim(w) != 3 or w.shape[:2] != (d_c, n):
        raise ValueError(
            f"{name} must have shape [d_c, N, dim] = [{d_c}, {n}, dim] (one up-projection per "
            f"head), got {jnp.shape(w)}"
        )


def _check_mla(q_nope, q_rope, c, k_rope, w_uk, w_uv) -> tuple[int, int, int, int]:
    """Shapes of MLA inputs; returns (N, d_n, d_R, d_c)."""
    for name, x, rank in (("q_nope", q_nope, 4), ("q_rope", q_rope, 4), ("c", c, 3),
                          ("k_rope", k_rope, 3)):
        if jnp.ndim(x) != rank:
            want = "[batch, seq, heads, dim]" if rank == 4 else "[batch, seq, dim]"
            raise ValueError(f"{name} must have shape {want}, got {jnp.shape(x)}")
    b, t, n, d_n = q_nope.shape
    if q_rope.shape[:3] != (b, t, n):
        raise ValueError(
            f"q_rope must share [batch, seq, heads] = {(b, t, n)} with q_nope, got {q_rope.shape}"
        )
    if c.shape[0] != b or k_rope.shape[:2] != c.shape[:2]:
        raise ValueError(
            f"c [B, S, d_c] and k_rope [B, S, d_R] must share batch {b} and length, got "
            f"{c.shape} and {k_rope.shape}"
        )
    d_r, d_c = q_rope.shape[3], c.shape[2]
    if k_rope.shape[2] != d_r:
        raise ValueError(f"q_rope has d_R={d_r} but k_rope has {k_rope.shape[2]}; they must match")
    _check_up("w_uk", w_uk, d_c, n)
    _check_up("w_uv", w_uv, d_c, n)
    if w_uk.shape[2] != d_n:
        raise ValueError(f"w_uk's last dim {w_uk.shape[2]} must equal q_nope's d_n={d_n}")
    return n, d_n, d_r, d_c


def materialize_kv(c: jax.Array, k_rope: jax.Array, w_uk: jax.Array, w_uv: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """Per-head keys [B, S, N, d_n + d_R] = [c W_UK ; k^R] and values [B, S, N, d_v] = c W_UV.

    Example:
      >>> k, v = materialize_kv(c, k_rope, w_uk, w_uv)
    """
    k_c = jnp.einsum("BSc,cNd->BSNd", c, w_uk, preferred_element_type=jnp.float32)
    v = jnp.einsum("BSc,cNd->BSNd", c, w_uv, preferred_element_type=jnp.float32)
    n = w_uk.shape[1]
    k_r = jnp.broadcast_to(k_rope[:, :, None, :], (*k_rope.shape[:2], n, k_rope.shape[2]))
    return jnp.concatenate([k_c.astype(c.dtype), k_r], axis=-1), v.astype(c.dtype)


def reference(q_nope: jax.Array, q_rope: jax.Array, c: jax.Array, k_rope: jax.Array,
              w_uk: jax.Array, w_uv: jax.Array, **kwargs: Any):
    """MLA by its equations: per-head k = [c W_UK ; k^R], v = c W_UV, then the softmax
    attention reference (``kwargs`` as :func:`attnlab.ops.attention`: masks, offsets, LSE)."""
    _, d_n, d_r, _ = _check_mla(q_nope, q_rope, c, k_rope, w_uk, w_uv)
    k, v = materialize_kv(c, k_rope, w_uk, w_uv)
    kwargs.setdefault("scale", 1.0 / math.sqrt(d_n + d_r))
    return attention_reference(jnp.concatenate([q_nope, q_rope], -1), k, v, **kwargs)


def mla_attention(q_nope: jax.Array, q_rope: jax.Array, c: jax.Array, k_rope: jax.Array,
                  w_uk: jax.Array, w_uv: jax.Array, **kwargs: Any):
    """MLA for training and prefill: per-head K/V materialized, then softmax attention.

    Args:
      q_nope: [B, T, N, d_n] the queries' no-RoPE part; q_rope: [B, T, N, d_R] their
        (already rotated) RoPE part.
      c: [B, S, d_c] the KV latents; k_rope: [B, S, d_R] the shared, rotated RoPE keys.
      w_uk: [d_c, N, d_n] key up-projections; w_uv: [d_c, N, d_v] value up-projections.
      **kwargs: as :func:`attnlab.ops.attention` (``is_causal``, ``segment_ids``, offsets,
        ``return_residuals``, ``impl``, ...); ``scale`` defaults to 1 / sqrt(d_n + d_R).

    Returns:
      out [B, T, N, d_v] (and the LSE / entropy when asked), as :func:`attnlab.ops.attention`.

    Example:
      >>> out = mla_attention(q_nope, q_rope, c, k_rope, w_uk, w_uv, is_causal=True)
    """
    _, d_n, d_r, _ = _check_mla(q_nope, q_rope, c, k_rope, w_uk, w_uv)
    k, v = materialize_kv(c, k_rope, w_uk, w_uv)
    kwargs.setdefault("scale", 1.0 / math.sqrt(d_n + d_r))
    return attention(jnp.concatenate([q_nope, q_rope], -1), k, v, **kwargs)


# ----------------------------------------------------------------------------- latent decode


class LatentDecodeArgs(NamedTuple):
    """Normalized arguments of :func:`latent_decode` handed to every implementation."""

    spec: MaskSpec
    kv_lengths: jax.Array | None
    scale: float
    v_dim: int
    config: Any
    return_residuals: bool = False


def as_decode_kv(cache: jax.Array, v_dim: int) -> tuple[jax.Array, jax.Array]:
    """The latent cache [B, S, D] as one shared key head [B, S, 1, D] and value head
    [B, S, 1, v_dim] (its first ``v_dim`` columns), for :func:`attnlab.ops.decode_attention`."""
    k = cache[:, :, None, :]
    return k, k[..., :v_dim]


def args_from_kwargs(q, cache, _cache=None, **kwargs: Any) -> LatentDecodeArgs:
    """The validated arguments of ``latent_decode(q, cache, **kwargs)`` (the registry's
    normalizer; ``_cache`` is the registry's third array, the same cache)."""
    if jnp.ndim(cache) != 3:
        raise ValueError(f"cache must have shape [batch, seq, d_c + d_R], got {jnp.shape(cache)}")
    if "v_dim" not in kwargs:
        raise ValueError("latent_decode needs v_dim (d_c: the cache's leading value columns)")
    v_dim = kwargs.pop("v_dim")
    d = cache.shape[2]
    if not is_int(v_dim) or not 1 <= v_dim <= d:
        raise ValueError(f"v_dim must be an int in [1, {d}] (the cache's width), got {v_dim!r}")
    return_residuals = check_bool("return_residuals", kwargs.pop("return_residuals", False))
    k, v = as_decode_kv(cache, v_dim)
    a = _decode.args_from_kwargs(q, k, v, **kwargs)
    return LatentDecodeArgs(a.spec, a.kv_lengths, a.scale, int(v_dim), a.config,
                            return_residuals)


def _reference_latent(q, cache, _cache, a: LatentDecodeArgs):
    k, v = as_decode_kv(cache, a.v_dim)
    return _decode.decode_attention(
        q, k, v, kv_lengths=a.kv_lengths, local_window_size=a.spec.window_left, scale=a.scale,
        return_residuals=True, impl="reference",
    )


def kernel_unsupported(q, cache, _cache, a: LatentDecodeArgs, plat: str) -> str | None:
    """The latent decode kernels' one limit: the cache needs a RoPE part (v_dim < width)."""
    if a.v_dim >= cache.shape[-1]:
        return "the latent decode kernels need a RoPE part (v_dim < the cache's width)"
    return None


def forward_only(decode_partials: Callable[..., tuple[jax.Array, jax.Array]],
                 interpret: Callable[[], Any]) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """A split-K latent kernel as an implementation's ``fn(q, cache, cache, args)``: its
    partials merged by LSE, with a VJP that refuses (the kernels have no backward pass).

    ``decode_partials(q, cache, kv_lengths, *, v_dim, spec, scale, config, interpret)``
    returns per-split (out, lse); ``interpret()`` gives its interpret argument.
    """

    def fn(q, cache, _cache, a: LatentDecodeArgs):
        lengths, _ = _decode.query_positions(a.kv_lengths, q.shape[0], q.shape[1],
                                             cache.shape[1])
        partials = functools.partial(decode_partials, v_dim=a.v_dim, spec=a.spec,
                                     scale=a.scale, config=a.config, interpret=interpret())
        return _decode.merged_forward_only(partials, q, cache, jnp.asarray(lengths, jnp.int32))

    return fn


REGISTRY = Registry(
    "mla_decode",
    normalize=args_from_kwargs,
    reference=Implementation(
        name="reference", fn=_reference_latent,
        description="decode reference over the latent cache as one shared K/V head"),
    adapters=backends("mla_decode", "xla", "pallas_triton", "pallas_mosaic_gpu", "pallas_tpu"),
    # On an H100 the Mosaic GPU kernel takes 0.34x the Triton kernel's time per step at 8K
    # and 0.32x at 32K in program (bench_mla_h100_2026-12-08_kernel.json); where it refuses
    # (not sm90, float32, d_c over 512, a cache length not a multiple of 8) Triton runs.
    auto_order={**KERNEL_FIRST, "gpu": ("pallas_mosaic_gpu", "pallas_triton", "xla")},
)
implementations, explain, auto_choice = (REGISTRY.implementations, REGISTRY.explain,
                                         REGISTRY.auto_choice)


def latent_decode(
    q: jax.Array, cache: jax.Array, *, v_dim: int,
    kv_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
    return_residuals: bool = False,
    impl: str = "auto",
    config: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Decode attention of N query heads over one latent cache that is keys and values at once.

    Args:
      q: [B, T, N, D] queries in latent space (``[W_UK^T q^C ; q^R]``), 1 <= T <= 64.
      cache: [B, S, D] the latent cache ``[c ; k^R]``; its first ``v_dim`` columns are the
        values.
      v_dim: d_c, the number of leading cache columns that are values.
      kv_lengths, local_window_size, scale, return_residuals, impl, config: as
        :func:`attnlab.ops.decode_attention` (query t of sequence b sits at position
        kv_lengths[b] - T + t, causal). ``scale`` defaults to 1 / sqrt(D); MLA passes
        1 / sqrt(d_n + d_R).

    Returns:
      out [B, T, N, v_dim] in q's dtype (and lse [B, T, N] float32).

    Example:
      >>> o_lat = latent_decode(q_lat, cache, v_dim=512, kv_lengths=lengths, scale=192**-0.5)
    """
    a = args_from_kwargs(
        q, cache, v_dim=v_dim, kv_lengths=kv_lengths, local_window_size=local_window_size,
        scale=scale, return_residuals=return_residuals, config=config,
    )
    out, lse = REGISTRY.choose(q, cache, cache, a, impl).fn(q, cache, cache, a)
    return (out, lse) if return_residuals else out


def absorb_query(q_nope: jax.Array, q_rope: jax.Array, w_uk: jax.Array) -> jax.Array:
    """[W_UK,i^T q^C_i ; q^R_i] per head: [B, T, N, d_c + d_R] in q's dtype."""
    q_lat = jnp.einsum("BTNd,cNd->BTNc", q_nope, w_uk, preferred_element_type=jnp.float32)
    return jnp.concatenate([q_lat.astype(q_nope.dtype), q_rope], axis=-1)


def latent_cache(c: jax.Array, k_rope: jax.Array) -> jax.Array:
    """The decode cache [B, S, d_c + d_R] = [c ; k^R] of a sequence's tokens."""
    return jnp.concatenate([c, k_rope.astype(c.dtype)], axis=-1)


def mla_decode(
    q_nope: jax.Array, q_rope: jax.Array, cache: jax.Array, w_uk: jax.Array, w_uv: jax.Array,
    *, kv_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    scale: float | None = None, return_residuals: bool = False, impl: str = "auto",
    config: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Absorbed MLA decoding: latent-space attention over the compact cache, no per-head K/V.

    Args:
      q_nope: [B, T, N, d_n]; q_rope: [B, T, N, d_R] (rotated) of the last T tokens.
      cache: [B, S, d_c + d_R] the latent cache (:func:`latent_cache`).
      w_uk: [d_c, N, d_n]; w_uv: [d_c, N, d_v] the per-head up-projections.
      kv_lengths, local_window_size, return_residuals, impl, config: as :func:`latent_decode`.
      scale: default 1 / sqrt(d_n + d_R), the same logits as :func:`mla_attention`.

    Returns:
      out [B, T, N, d_v] in q's dtype (and lse [B, T, N]); equal to decoding the
      materialized per-head K/V.

    Example:
      >>> out = mla_decode(q_nope, q_rope, cache, w_uk, w_uv, kv_lengths=lengths)
    """
    if jnp.ndim(cache) != 3:
        raise ValueError(f"cache must have shape [batch, seq, d_c + d_R], got {jnp.shape(cache)}")
    d_c = w_uk.shape[0] if jnp.ndim(w_uk) == 3 else -1
    d_r = cache.shape[2] - d_c
    _check_mla(q_nope, q_rope, cache[..., :d_c], cache[..., d_c:], w_uk, w_uv)
    if scale is None:
        scale = 1.0 / math.sqrt(q_nope.shape[3] + d_r)
    res = latent_decode(
        absorb_query(q_nope, q_rope, w_uk), cache, v_dim=d_c, kv_lengths=kv_lengths,
        local_window_size=local_window_size, scale=scale, return_residuals=True, impl=impl,
        config=config,
    )
    out = jnp.einsum("BTNc,cNv->BTNv", res[0], w_uv, preferred_element_type=jnp.float32)
    out = out.astype(q_nope.dtype)
    return (out, res[1]) if return_residuals else out
