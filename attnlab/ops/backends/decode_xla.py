"""Decode backend ``"xla"``: split-K in pure JAX. The key axis is chunked, each chunk gives a
partial (out, lse), and the chunks are merged by :func:`attnlab.ops.merge_n`; differentiable.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attnlab.ops._registry import Implementation
from attnlab.ops.decode import DecodeArgs, query_positions
from attnlab.ops.merge import merge_n
from pallas_kernels.common.checks import DefaultConfig
from pallas_kernels.common.masks import MASK_VALUE, finite_or_zero, visible, weighted_sum
from pallas_kernels.common.static_args import check_int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class XlaDecodeConfig(DefaultConfig):
    """Chunking of the ``"xla"`` implementation.

    Attributes:
      keys_per_split: keys per chunk of the cache; each chunk gives a partial (out, lse) and
        the chunks are merged by LSE. When S is not a multiple of the (balanced) chunk, the
        cache is padded by fewer than one key per chunk (XLA copies it); pick a value that
        divides S to avoid that.
    """

    keys_per_split: int = 512

    def __post_init__(self) -> None:
        kps = check_int("keys_per_split", self.keys_per_split)
        object.__setattr__(self, "keys_per_split", kps)


def _fn(q, k, v, a: DecodeArgs) -> tuple[jax.Array, jax.Array]:
    cfg = a.config if a.config is not None else XlaDecodeConfig.get_default()
    b, t, n, h = q.shape
    s, kk, kv, hv = k.shape[1], k.shape[2], v.shape[2], v.shape[3]
    # Balanced chunks: P chunks of C keys with P * C - S < P.
    n_chunks = -(-s // min(cfg.keys_per_split, s))
    chunk = -(-s // n_chunks)
    sp = n_chunks * chunk
    # Uninitialized cache slots (past kv_lengths) are common: every matmul operand is made
    # finite (differentiable by JAX, so k and q too) and p @ v is a weighted_sum (its dv
    # reads dO through finite_or_zero), since a masked slot's weight is 0 but 0 * NaN is NaN.
    q, k, v = (finite_or_zero(x) for x in (q, k, v))
    if sp != s:
        k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    kc = k.reshape(b, n_chunks, chunk, kk, h)
    vc = v.reshape(b, n_chunks, chunk, kv, hv)
    qg = q.reshape(b, t, kk, n // kk, h)
    prec = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    f32 = jnp.float32
    z = jnp.einsum(
        "BTKGH,BPCKH->PBKGTC", qg, kc, precision=prec, preferred_element_type=f32
    ) * a.scale
    z = z.reshape(n_chunks, b, n, t, chunk)  # query heads in order, whatever the grouping
    if a.logits_soft_cap is not None:
        z = a.logits_soft_cap * jnp.tanh(z / a.logits_soft_cap)
    lengths, q_pos = query_positions(a.kv_lengths, b, t, s)
    kv_pos = jnp.arange(sp, dtype=jnp.int32).reshape(n_chunks, 1, 1, 1, chunk)
    mask = visible(a.spec, q_pos[None, :, None, :, None], kv_pos)  # [P, B, 1, T, C]
    mask = mask & (kv_pos < jnp.minimum(lengths, s)[None, :, None, None, None])
    z = jnp.where(mask, z, MASK_VALUE)
    # One partial (out, lse) per chunk, as a split-K kernel would write them.
    lse = jax.nn.logsumexp(z, axis=-1)  # [P, B, N, T]
    p = jnp.where(mask, jnp.exp(z - lse[..., None]), 0.0)
    p = p.reshape(n_chunks, b, kv, n // kv, t, chunk)  # grouped by value head
    o = weighted_sum("PBKGTC,BPCKH->PBTKGH", p.astype(v.dtype), vc, prec, f32)
    o = o.reshape(n_chunks, b, t, n, hv)
    lse = jnp.swapaxes(jnp.where(mask.any(-1), lse, -jnp.inf), 2, 3)  # [P, B, T, N]
    out, lse = merge_n(o, lse)
    return out.astype(q.dtype), lse


IMPLEMENTATION = Implementation(
    name="xla", fn=_fn, config_cls=XlaDecodeConfig,
    description="split-K in pure JAX: partial (out, lse) per key chunk, merged by LSE")
