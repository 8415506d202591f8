"""Star Attention (Acharya et al. 2024, arXiv 2411.17116) over one mesh axis.

Block m of the context lives on device m of ``seq_axis`` (contiguous shards, one per host in
the paper). Two phases, defined in :mod:`attnlab.ops.star`:

* **Context encoding** (:func:`star_context_shard`, :func:`star_attention`): each device
  attends causally within its own block and, except device 0, fully to the anchor (the first
  ``anchor_size`` tokens, on device 0); the two partial results are merged by log-sum-exp.
  The only communication is the anchor's keys and values, broadcast once from device 0 (a
  ``psum`` in which the other devices add zeros): ``anchor_size`` tokens, whatever the number
  of devices and the context length. The ablation's other anchors: ``"previous"`` (the last
  ``anchor_size`` tokens of the block before, one ``ppermute`` to the next device) and
  ``"none"`` (no communication). Ring attention instead passes every block's K and V
  around the whole ring. This phase is approximate by design: a token sees the anchor and its
  own block only (:func:`attnlab.ops.star.reference`).
* **Query encoding and decoding** (:func:`star_query_shard`, :func:`star_query`): the query
  block, replicated on every device, attends to each device's share of the cache; one
  ``all_gather`` of the partial (output, log-sum-exp) pairs, then an exact merge
  (:func:`attnlab.ops.merge.merge_n`). This is global attention over the cache, exactly.

Both are plain JAX around :func:`attnlab.ops.attention` (any implementation that returns the
log-sum-exp, e.g. the Pallas kernels) and differentiate exactly with and without
``check_vma``, though the method is meant for inference: the query phase has its own VJP (one
all-reduce of the output's cotangent or of dq, then each device's block backward with the
global output and LSE, :func:`attnlab.ops.attention_bwd`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attnlab.ops._vma import like_vma, varying
from attnlab.ops.attention import attention as _attention
from attnlab.ops.attention_grad import attention_bwd
from attnlab.ops.merge import merge, merge_n
from attnlab.ops.star import ANCHORS, check_blocks
from sharding._common import (
    check_bsn_axes,
    check_softmax_call,
    default_check_vma,
    mesh_shard_map,
)


def star_context_shard(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    axis_name: str,
    anchor_size: int | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    impl: str = "auto",
    config: Any = None,
    anchor: str = "first",
) -> jax.Array:
    """Star Attention's context phase over ``axis_name``; call inside ``jax.shard_map``.

    Args:
      q: [B, T, N, H] this device's block of the context (block m on axis index m);
        k: [B, T, K, H], v: [B, T, K, Hv] its keys and values.
      axis_name: the mesh axis the context is split over.
      anchor_size: anchor tokens (default: one whole block, T); at most T.
      anchor: ``"first"`` (the paper), ``"previous"`` or ``"none"``
        (:mod:`attnlab.ops.star`).
      is_causal, scale, logits_soft_cap, impl, config: as :func:`attnlab.ops.attention`
        (``impl`` must be able to return the log-sum-exp, so "auto" never picks cuDNN here).

    Returns:
      [B, T, N, Hv]: this block's output, as :func:`attnlab.ops.star.reference` of the whole
      context with ``block_size = T``.
    """
    t = q.shape[1]
    size = check_blocks(t, t, anchor_size)
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    first = lax.axis_index(axis_name) == 0
    common = dict(scale=scale, logits_soft_cap=logits_soft_cap, return_residuals=True,
                  impl=impl, config=config)
    if anchor == "none":
        return _attention(q, k, v, is_causal=is_causal, **common)[0]

    def from_first(x):  # device 0's anchor on every device: the others add zeros
        a = x[:, :size]
        # Typed as varying like the local block, so its cotangent is too.
        return like_vma(lax.psum(jnp.where(first, a, jnp.zeros_like(a)), axis_name), x)

    def from_previous(x):  # the end of device m - 1's block on device m (zeros on device 0)
        p = lax.axis_size(axis_name)
        return lax.ppermute(x[:, t - size:], axis_name, [(i, i + 1) for i in range(p - 1)])

    fetch = from_first if anchor == "first" else from_previous
    o_own, lse_own = _attention(q, k, v, is_causal=is_causal, **common)
    o_anchor, lse_anchor = _attention(q, fetch(k), fetch(v), **common)
    # Device 0's block already holds the anchor (or has none): its anchor part gets weight 0.
    lse_anchor = jnp.where(first, -jnp.inf, lse_anchor)
    return merge(o_own, lse_own, o_anchor, lse_anchor)[0]


def star_query_shard(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    axis_name: str,
    q_offset: int | jax.Array,
    is_causal: bool = True,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    return_residuals: bool = False,
    impl: str = "auto",
    config: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Star Attention's query phase: exact attention of a replicated query block over a
    sequence-sharded cache; call inside ``jax.shard_map``.

    Args:
      q: [B, Tq, N, H] the query block, the same on every device of ``axis_name``.
      k: [B, S, K, H], v: [B, S, K, Hv] this device's contiguous share of the cache (keys at
        global positions ``axis_index * S ..``).
      axis_name: the mesh axis the cache is split over.
      q_offset: global position of the first query (int or traced scalar); with
        ``is_causal`` a query sees cached keys at positions <= its own.
      return_residuals: also return the global lse [B, Tq, N] float32.
      is_causal, scale, logits_soft_cap, impl, config: as :func:`attnlab.ops.attention`.

    Returns:
      [B, Tq, N, Hv] (and lse), the same on every device.
    """
    s = k.shape[1]
    kw = dict(is_causal=is_causal, scale=scale, logits_soft_cap=logits_soft_cap, config=config)
    # Under shard_map(check_vma=False) nothing is typed as varying, the replicated output's
    # cotangent reaches each device as a 1/P share, and the replicated q's cotangents are
    # summed over the devices afterwards; with check_vma the cotangent comes whole and q's
    # must leave invariant (summed here). The cache always varies over the axis.
    shares = axis_name not in varying(k)

    def partial(q, k, v, q_offset):
        kv_offset = lax.axis_index(axis_name) * s
        return _attention(q, k, v, q_offset=q_offset, kv_offset=kv_offset,
                          return_residuals=True, impl=impl, **kw)

    def fwd(q, k, v, q_offset):
        o, lse = partial(q, k, v, q_offset)
        outs = lax.all_gather(o, axis_name, to="invarying")
        lses = lax.all_gather(lse, axis_name, to="invarying")
        o_all, lse_all = merge_n(outs, lses)
        return (o_all.astype(q.dtype), lse_all), (q, k, v, q_offset, o_all, lse_all)

    def bwd(res, cts):
        q, k, v, q_offset, out, lse = res
        do, dlse = cts
        if shares:
            do, dlse = lax.psum(do, axis_name), lax.psum(dlse, axis_name)
        dlse = jnp.where(jnp.isfinite(lse), dlse, 0.0)
        # Typed as varying like the cache, so every backward returns this device's share of
        # dq (summed below), none of them an already-summed one.
        q = like_vma(q, k)
        dq, dk, dv = attention_bwd(
            q, k, v, out.astype(q.dtype), lse, do.astype(q.dtype), dlse, q_offset=q_offset,
            kv_offset=lax.axis_index(axis_name) * s, impl=impl, **kw,
        )
        if not shares:
            dq = lax.psum(dq, axis_name)
        return dq, dk, dv, None

    @jax.custom_vjp
    def run(q, k, v, q_offset):
        return fwd(q, k, v, q_offset)[0]

    run.defvjp(fwd, bwd)
    o, lse = run(q, k, v, jnp.asarray(q_offset, jnp.int32))
    return (o, lse) if return_residuals else o


def star_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    mesh: Mesh,
    seq_axis: str = "sp",
    batch_axis: str | None = None,
    head_axis: str | None = None,
    anchor_size: int | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    impl: str = "auto",
    config: Any = None,
    check_vma: bool | None = None,
    anchor: str = "first",
) -> jax.Array:
    """Star Attention's context phase (prefill) with the context split over ``seq_axis``.

    Args:
      q: [B, T, N, H]; k: [B, T, K, H]; v: [B, T, K, Hv] global arrays; T must be divisible
        by the size P of ``seq_axis`` (block size T / P, one block per device).
      mesh: the device mesh; seq_axis, batch_axis, head_axis: its axes for the sequence, the
        batch (data parallelism) and the heads (tensor parallelism; N and K divisible).
      anchor_size: anchor tokens (default: one block, T / P, as in the paper).
      anchor: ``"first"`` (the paper), ``"previous"`` or ``"none"`` (:mod:`attnlab.ops.star`).
      is_causal, scale, logits_soft_cap, impl, config: as :func:`star_context_shard`.
      check_vma: the ``shard_map`` flag (default: on unless a Pallas kernel may run).

    Returns:
      [B, T, N, Hv] sharded like q: :func:`attnlab.ops.star.reference` with
      ``block_size = T / P`` and the same anchor (plain causal attention when P = 1).

    Raises:
      ValueError: unknown or repeated mesh axes, sizes not divisible by their axes, an anchor
        longer than a block, an unknown anchor.

    Example:
      >>> mesh = jax.make_mesh((4,), ("sp",))
      >>> out = star_attention(q, k, v, mesh=mesh)  # 4 blocks, anchor = block 1
    """
    check_softmax_call(q, k, v, is_causal=is_causal, scale=scale,
                       logits_soft_cap=logits_soft_cap)
    if k.shape[1] != q.shape[1]:
        raise ValueError(
            f"Star Attention's context phase is self-attention: q has {q.shape[1]} tokens, k "
            f"{k.shape[1]} (use star_query for a query block over a cache)"
        )
    b, t, n, _ = q.shape
    check_bsn_axes(mesh, seq_axis, batch_axis, head_axis, seq=("sequence length T", t),
                   batch=b, heads=n, kv_heads=k.shape[2], v_heads=v.shape[2])
    check_blocks(t, t // mesh.shape[seq_axis], anchor_size)
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    spec = P(batch_axis, seq_axis, head_axis, None)

    def per_shard(q, k, v):
        return star_context_shard(
            q, k, v, axis_name=seq_axis, anchor_size=anchor_size, is_causal=is_causal,
            scale=scale, logits_soft_cap=logits_soft_cap, impl=impl, config=config,
            anchor=anchor,
        )

    return mesh_shard_map(per_shard, mesh, (q, k, v), (spec, spec, spec), spec,
                          default_check_vma(impl) if check_vma is None else check_vma)


def star_query(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    mesh: Mesh,
    seq_axis: str = "sp",
    batch_axis: str | None = None,
    head_axis: str | None = None,
    q_offset: int | jax.Array | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    return_residuals: bool = False,
    impl: str = "auto",
    config: Any = None,
    check_vma: bool | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Star Attention's query phase: a query block [B, Tq, N, H] over a cache [B, S, K, H]
    split over ``seq_axis``; exactly :func:`attnlab.ops.attention` of the whole cache.

    Args:
      q: [B, Tq, N, H] (replicated over ``seq_axis``); k: [B, S, K, H]; v: [B, S, K, Hv] the
        cache, S divisible by the size of ``seq_axis``.
      q_offset: global position of the first query (default S: the query follows the cache).
      mesh, seq_axis, batch_axis, head_axis, check_vma: as :func:`star_attention`.
      is_causal, scale, logits_soft_cap, return_residuals, impl, config: as
        :func:`star_query_shard`.

    Returns:
      [B, Tq, N, Hv] replicated over ``seq_axis`` (and lse [B, Tq, N]).

    Raises:
      ValueError: bad arguments as :func:`attnlab.ops.attention` reports them (q, k, v not
        [B, T, heads, head_dim], mismatched shapes, a traced scale), unknown or repeated mesh
        axes, a cache length or batch not divisible by its axes.

    Example:
      >>> out = star_query(q_block, k_cache, v_cache, mesh=mesh)
    """
    offset = k.shape[1] if q_offset is None and jnp.ndim(k) == 4 else q_offset
    check_softmax_call(q, k, v, is_causal=is_causal, scale=scale,
                       logits_soft_cap=logits_soft_cap, q_offset=0 if offset is None else offset)
    b, s, kh, _ = k.shape
    check_bsn_axes(mesh, seq_axis, batch_axis, head_axis, seq=("cache length S", s), batch=b,
                   heads=q.shape[2], kv_heads=kh, v_heads=v.shape[2])
    q_spec = P(batch_axis, None, head_axis, None)
    kv_spec = P(batch_axis, seq_axis, head_axis, None)
    out_specs = (q_spec, P(batch_axis, None, head_axis)) if return_residuals else q_spec

    def per_shard(q, k, v, offset):
        return star_query_shard(
            q, k, v, axis_name=seq_axis, q_offset=offset, is_causal=is_causal, scale=scale,
            logits_soft_cap=logits_soft_cap, return_residuals=return_residuals, impl=impl,
            config=config,
        )

    return mesh_shard_map(per_shard, mesh, (q, k, v, jnp.asarray(offset, jnp.int32)),
                          (q_spec, kv_spec, kv_spec, P()), out_specs,
                          default_check_vma(impl) if check_vma is None else check_vma)


__all__ = ["star_attention", "star_context_shard", "star_query", "star_query_shard"]
