"""A softmax layer's cache while Star Attention encodes a context, on one device or a mesh.

Shapes: B batch, C context length, T new tokens, N query heads, K kv heads, H head dim,
L cache slots.

:func:`attnlab.nn.star.star_generate` hands these to :class:`~attnlab.nn.SoftmaxAttention`
in place of its ``{"k", "v", "length"}`` dict; the module then calls ``cache.attend(q, k, v)``
with its projected, rotated q, k, v, so the projections stay in one place and only the
attention differs:

* :class:`StarContextCache` (phase 1, the whole context in one call): block-local attention
  with the anchor (:func:`attnlab.ops.star.context_attention` on one device,
  :func:`sharding.star.star_attention` over a mesh axis, one block per device). On one device
  it returns the ordinary dict cache, so the query and the new tokens decode by the module's
  usual exact path; on a mesh it returns a :class:`StarQueryCache`.
* :class:`StarQueryCache` (phase 2 on a mesh): the context's K/V stay where they were
  encoded (sharded over the axis); the query and generated tokens' K/V are kept replicated
  (the paper keeps them on the query host). Attention is
  :func:`sharding.star.star_query` over the context merged by log-sum-exp with attention over
  the local tokens: exactly global attention.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attnlab.ops.attention import attention
from attnlab.ops.merge import merge
from attnlab.ops.star import StarConfig, context_attention
from sharding.star import star_attention, star_query

_write = jax.vmap(lambda c, new, at: jax.lax.dynamic_update_slice_in_dim(c, new, at, 0))


@dataclasses.dataclass(frozen=True)
class StarCache:
    """Base of the caches that run a Star Attention phase (``attend``)."""

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
               logits_soft_cap: float | None, impl: str) -> tuple[jax.Array, Any]:
        raise NotImplementedError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StarContextCache(StarCache):
    """Phase 1. k, v: empty [B, L, K, H] slots for what follows the context's own K/V (on one
    device the whole sequence, L >= C; on a mesh the query and new tokens); length [B] 0."""

    k: jax.Array
    v: jax.Array
    length: jax.Array
    star: StarConfig = dataclasses.field(metadata=dict(static=True))
    mesh: Mesh | None = dataclasses.field(default=None, metadata=dict(static=True))
    seq_axis: str = dataclasses.field(default="sp", metadata=dict(static=True))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
               logits_soft_cap: float | None, impl: str) -> tuple[jax.Array, Any]:
        """q [B, C, N, H], k, v [B, C, K, H] (the whole context) -> (out [B, C, N, H], the
        cache for phase 2)."""
        dt = self.k.dtype
        q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
        kw = dict(logits_soft_cap=logits_soft_cap, impl=impl)
        if self.mesh is None:
            out = context_attention(q, k, v, star=self.star, **kw)
            ck = jax.lax.dynamic_update_slice_in_dim(self.k, k, 0, axis=1)
            cv = jax.lax.dynamic_update_slice_in_dim(self.v, v, 0, axis=1)
            return out, {"k": ck, "v": cv, "length": self.length + q.shape[1]}
        star = self.star
        # Each device keeps the K/V of the block it encoded.
        spec = NamedSharding(self.mesh, P(None, self.seq_axis))
        k, v = (jax.lax.with_sharding_constraint(x, spec) for x in (k, v))
        out = star_attention(
            q, k, v, mesh=self.mesh, seq_axis=self.seq_axis, anchor=star.anchor,
            anchor_size=star.anchor_tokens or None, **kw,
        )
        return out, StarQueryCache(context_k=k, context_v=v, k=self.k, v=self.v,
                                   length=self.length, mesh=self.mesh, seq_axis=self.seq_axis)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StarQueryCache(StarCache):
    """Phase 2 on a mesh. context_k, context_v: [B, C, K, H] sharded over ``seq_axis``;
    k, v: [B, L, K, H] the tokens after the context (replicated); length [B] of those."""

    context_k: jax.Array
    context_v: jax.Array
    k: jax.Array
    v: jax.Array
    length: jax.Array
    mesh: Mesh = dataclasses.field(metadata=dict(static=True))
    seq_axis: str = dataclasses.field(default="sp", metadata=dict(static=True))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *,
               logits_soft_cap: float | None, impl: str) -> tuple[jax.Array, Any]:
        """q [B, T, N, H], k, v [B, T, K, H] new tokens -> (out [B, T, N, H], cache)."""
        dt = self.k.dtype
        q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
        ck, cv = _write(self.k, k, self.length), _write(self.v, v, self.length)
        # The whole context precedes every query: no mask there.
        o_ctx, lse_ctx = star_query(
            q, self.context_k, self.context_v, mesh=self.mesh, seq_axis=self.seq_axis,
            is_causal=False, return_residuals=True, logits_soft_cap=logits_soft_cap, impl=impl,
        )

        def one_row(qr, kr, vr, offset):  # slots past a row's length lie in its future
            o, lse = attention(qr[None], kr[None], vr[None], is_causal=True, q_offset=offset,
                               logits_soft_cap=logits_soft_cap, return_residuals=True,
                               impl=impl)
            return o[0], lse[0]

        o_new, lse_new = jax.vmap(one_row)(q, ck, cv, self.length)
        out = merge(o_ctx, lse_ctx, o_new, lse_new)[0].astype(q.dtype)
        return out, dataclasses.replace(self, k=ck, v=cv, length=self.length + q.shape[1])


def init_star_caches(layers: list[Any], batch_size: int, slots: int, star: StarConfig,
                     mesh: Mesh | None, seq_axis: str, dtype: Any) -> list[StarContextCache]:
    """Empty :class:`StarContextCache` per softmax layer, ``slots`` free slots each."""
    caches = []
    for attn in layers:
        c = attn.init_cache(batch_size, slots, dtype)
        caches.append(StarContextCache(k=c["k"], v=c["v"], length=c["length"], star=star,
                                       mesh=mesh, seq_axis=seq_axis))
    return caches


__all__ = ["StarCache", "StarContextCache", "StarQueryCache", "init_star_caches"]
