"""The front door of sequence-parallel softmax attention: :func:`attention`.

It takes global arrays and a mesh, runs one strategy inside ``jax.shard_map`` over the
sequence axis (composing with data- and tensor-parallel axes of the same mesh), and returns
a global array sharded like the input. Inside your own ``shard_map`` call the per-shard
functions directly by axis name: :func:`sharding.ring_attention` (layouts contiguous,
striped, zigzag) and :func:`sharding.ulysses.ulysses_attention`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sharding._common import (
    check_bsn_axes,
    check_mesh_axes,
    check_softmax_call,
    default_check_vma,
    mesh_shard_map,
)
from sharding.hybrid import SOFTMAX_STRATEGIES, HybridParallel, register_rule
from sharding.layouts import check_layout, shard_permute, shard_unpermute
from sharding.ring import ring_attention
from sharding.ulysses import check_heads, ulysses_attention

STRATEGIES = SOFTMAX_STRATEGIES
_LAYOUT = {"ring": "contiguous", "striped": "striped", "zigzag": "zigzag", "ulysses": "contiguous"}


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    mesh: Mesh,
    seq_axis: str = "sp",
    strategy: str = "ring",
    batch_axis: str | tuple[str, ...] | None = None,
    head_axis: str | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    logits_soft_cap: float | None = None,
    scale: float | None = None,
    inputs_permuted: bool = False,
    return_residuals: bool = False,
    impl: str = "auto",
    config: Any = None,
    grad_accum_dtype: Any = jnp.float32,
    check_vma: bool | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Softmax attention with the sequence split over ``mesh`` axis ``seq_axis``.

    Computes exactly :func:`attnlab.ops.attention` of the global arrays (values and gradients).

    Args:
      q: [B, T, N, H]; k: [B, S, K, H]; v: [B, S, K, Hv] global arrays (any sharding; they are
        resharded to [batch_axis, seq_axis, head_axis, None]). T and S must be divisible by
        the size P of ``seq_axis``; by 2P for zigzag (2P chunks, two per device); by P² for
        striped with inputs in token order (each device's T / P tokens are dealt out over
        the P devices by one all-to-all), P with ``inputs_permuted=True``.
      mesh: the device mesh; may span several processes.
      seq_axis: the mesh axis the sequence is split over.
      strategy: "ring" (contiguous shards, K/V travel around the ring), "striped" or
        "zigzag" (ring over load-balanced token layouts, for causal masks), "ulysses"
        (all-to-all to head shards around single-device attention; N divisible by P).
      batch_axis: mesh axis (or axes) the batch is split over (data parallelism), or None.
      head_axis: mesh axis the heads are split over (tensor parallelism), or None.
      is_causal, local_window_size, segment_ids ([B, T] or a ([B, T], [B, S]) pair),
        logits_soft_cap, scale: as :func:`attnlab.ops.attention`.
      inputs_permuted: striped / zigzag only. False (default): inputs and outputs are in
        token order and the layout permutation is done here by collectives (an all-to-all
        for striped, two half-block ppermutes for zigzag, each way). True: q, k, v and
        segment ids are already in layout order (``sharding.layouts.permute``, e.g. done
        once by the data loader) and the output stays in layout order.
      return_residuals: also return lse [B, T, N] float32.
      impl: the single-device implementation used per block ("auto": fastest that fits).
      config: its block-size config.
      grad_accum_dtype: ring strategies: dtype of the backward's dQ/dK/dV accumulators
        (see :func:`sharding.ring_attention`; None: the input dtype, less memory).
      check_vma: the ``shard_map`` flag. Default: on, except when the per-block work may run
        a Pallas kernel (impl "pallas*", or "auto" on GPU/TPU), whose outputs carry no
        varying-axes types yet.

    Returns:
      out [B, T, N, Hv] sharded [batch_axis, seq_axis, head_axis, None] (and lse).

    Raises:
      ValueError: bad arguments as :func:`attnlab.ops.attention` reports them (checked on the
        global arrays: segment ids of the wrong length name the caller's shapes), unknown
        strategy or axis, lengths not divisible as above, a batch the batch axes do not
        divide, heads not divisible (Ulysses, or by ``head_axis``); all before any
        ``shard_map``.

    Example:
      >>> mesh = jax.make_mesh((2, 4), ("data", "sp"))
      >>> out = attention(q, k, v, mesh=mesh, batch_axis="data", strategy="zigzag",
      ...                 is_causal=True)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    if inputs_permuted and strategy not in ("striped", "zigzag"):
        raise ValueError(
            f"inputs_permuted=True applies to the striped and zigzag layouts, not to "
            f"strategy={strategy!r} (whose inputs are in token order)"
        )
    check_softmax_call(q, k, v, is_causal=is_causal, local_window_size=local_window_size,
                       segment_ids=segment_ids, logits_soft_cap=logits_soft_cap, scale=scale)
    check_mesh_axes(mesh, {"seq_axis": seq_axis, "batch_axis": batch_axis,
                           "head_axis": head_axis})
    batch_axes = () if batch_axis is None else (
        (batch_axis,) if isinstance(batch_axis, str) else tuple(batch_axis)
    )
    n_sp = mesh.shape[seq_axis]
    layout = _LAYOUT[strategy]
    permute_here = layout != "contiguous" and strategy != "ulysses" and not inputs_permuted
    b, t, n_heads, _ = q.shape
    s, kv_heads, v_heads = k.shape[1], k.shape[2], v.shape[2]
    # Before any shard_map: the striped all-to-all would fail inside it, naming no argument.
    check_layout(layout, t, n_sp, "q sequence", permute_in_shards=permute_here)
    check_layout(layout, s, n_sp, "kv sequence", permute_in_shards=permute_here)
    bspec = batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None)
    check_bsn_axes(mesh, seq_axis, bspec, head_axis, seq=("sequence length T", t),
                   batch=b, heads=n_heads, kv_heads=kv_heads, v_heads=v_heads)
    n_tp = 1 if head_axis is None else mesh.shape[head_axis]
    if strategy == "ulysses":
        check_heads(n_heads // n_tp, kv_heads // n_tp, n_sp, seq_axis, v_heads // n_tp)

    x_spec = P(bspec, seq_axis, head_axis, None)
    row_spec = P(bspec, seq_axis, head_axis)
    seg_spec = P(bspec, seq_axis)
    segs = None
    if segment_ids is not None:
        segs = tuple(segment_ids) if isinstance(segment_ids, (tuple, list)) else segment_ids
    seg_specs = None if segs is None else jax.tree.map(lambda _: seg_spec, segs)

    def per_shard(q, k, v, segs):
        if permute_here:
            q, k, v = (shard_permute(x, 1, layout, seq_axis) for x in (q, k, v))
            segs = jax.tree.map(lambda x: shard_permute(x, 1, layout, seq_axis), segs)
        common = dict(
            axis_name=seq_axis, is_causal=is_causal, local_window_size=local_window_size,
            segment_ids=segs, logits_soft_cap=logits_soft_cap, scale=scale,
            return_residuals=return_residuals, impl=impl, config=config,
        )
        if strategy == "ulysses":  # without the lse, "auto" may pick cuDNN for the attention
            res = ulysses_attention(q, k, v, **common)
        else:
            res = ring_attention(
                q, k, v, layout=layout, grad_accum_dtype=grad_accum_dtype, **common
            )
        if permute_here:
            res = jax.tree.map(lambda x: shard_unpermute(x, 1, layout, seq_axis), res)
        return res

    return mesh_shard_map(
        per_shard, mesh, (q, k, v, segs), (x_spec, x_spec, x_spec, seg_specs),
        (x_spec, row_spec) if return_residuals else x_spec,
        default_check_vma(impl) if check_vma is None else check_vma,
    )


@register_rule("softmax")
def softmax_rule(plan: HybridParallel, q: jax.Array, k: jax.Array, v: jax.Array, *,
                  is_causal: bool = True, **kwargs: Any) -> Any:
    """Softmax attention of a model layer by the plan's strategy (causal by default)."""
    return attention(q, k, v, mesh=plan.mesh, seq_axis=plan.seq_axis,
                     strategy=plan.softmax_strategy, batch_axis=plan.batch_axis,
                     is_causal=is_causal, impl=plan.impl, **kwargs)
