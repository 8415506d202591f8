"""Ulysses sequence parallelism (DeepSpeed-Ulysses, Jacobs et al. 2023) over one mesh axis.

Inside a ``shard_map`` each device holds a sequence shard of every head. One ``all_to_all``
per tensor turns that into all of the sequence for N / P heads; any single-device attention
implementation then runs unchanged on the full sequence; one more ``all_to_all`` turns the
output back into sequence shards:

    [B, S/P, N, H] --all_to_all--> [B, S, N/P, H] --attention--> [B, S, N/P, Hv]
                   --all_to_all--> [B, S/P, N, Hv]

Communication is 4 all-to-alls of 1/P of each tensor, independent of P's ring latency. The
number of query heads must be divisible by P. GQA: key/value heads must be divisible by P
too; when there are fewer (K < P with P a multiple of K) each kv head is repeated P / K
times so every device gets the one kv head its query heads use.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from attnlab.ops.attention import attention as _attention
from sharding.layouts import LAYOUTS, shard_positions


def check_heads(n_heads: int, kv_heads: int, axis_size: int, axis_name: str = "sp",
                v_heads: int | None = None) -> None:
    """Raises ValueError unless Ulysses can split these heads over ``axis_size`` devices
    (``v_heads``: the value head count where it differs from the key head count)."""
    if n_heads % axis_size:
        raise ValueError(
            f"Ulysses splits heads over the {axis_name!r} axis of size {axis_size}, but q has "
            f"{n_heads} heads; the number of heads must be divisible by the axis size (use "
            "strategy='ring', 'striped' or 'zigzag', or a smaller axis)"
        )
    for what, heads in (("kv", kv_heads), ("v", v_heads)):
        if heads is not None and heads % axis_size and axis_size % heads:
            raise ValueError(
                f"Ulysses needs the {heads} {what} heads to be divisible by the {axis_name!r} "
                f"axis size {axis_size}, or the axis size to be a multiple of them ({what} "
                "heads are then repeated); use a ring strategy instead"
            )


def ulysses_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    layout: str = "contiguous", q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None, return_residuals: bool = False, **kwargs: Any,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Ulysses attention over ``axis_name``; call inside ``jax.shard_map`` (per-shard arrays).

    Args:
      q: [B, T, N, H] this shard's queries; k: [B, S, Kk, H], v: [B, S, Kv, Hv] its keys and
        values. N must be divisible by the axis size P; Kk and Kv each divisible by P, or P by
        them.
      axis_name: the mesh axis the sequence is split over.
      **kwargs: ``is_causal``, ``local_window_size``, ``logits_soft_cap``, ``scale``,
        ``impl``, ``config``: as :func:`attnlab.ops.attention` (``impl`` is the single-device
        implementation); passed to it unchanged.
      segment_ids: this shard's [B, T] ids or a ([B, T], [B, S]) pair (gathered: small).
      layout: token layout of the shards ("contiguous" needs no position arrays, so e.g.
        cuDNN can run the attention).
      q_positions, kv_positions: [T] / [S] original positions of this shard's tokens
        (override ``layout``).
      return_residuals: also return lse [B, T, N] float32.

    Returns:
      out [B, T, N, Hv] (and lse), sequence-sharded like q.

    Raises:
      ValueError: heads not divisible by the axis size (see ``check_heads``).

    Example:
      >>> out = ulysses_attention(q, k, v, axis_name="sp", is_causal=True)  # in shard_map
    """
    n_dev = lax.axis_size(axis_name)
    b, t, n, _ = q.shape
    kh, vh = k.shape[2], v.shape[2]
    check_heads(n, kh, n_dev, axis_name, vh)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    # Fewer k (or v) heads than devices: each device needs one (repeated) head.
    if kh % n_dev:
        k = jnp.repeat(k, n_dev // kh, axis=2)
    if vh % n_dev:
        v = jnp.repeat(v, n_dev // vh, axis=2)

    def to_heads(x):  # [B, L, N, .] -> [B, L P, N / P, .]
        return lax.all_to_all(x, axis_name, 2, 1, tiled=True)

    def to_seq(x):  # [B, L P, N / P, ...] -> [B, L, N, ...]
        return lax.all_to_all(x, axis_name, 1, 2, tiled=True)

    def gather(x):
        return None if x is None else lax.all_gather(x, axis_name, axis=x.ndim - 1, tiled=True)

    if segment_ids is not None:
        qs, ks = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids,) * 2
        kwargs["segment_ids"] = (gather(qs), gather(ks))
    if q_positions is None and kv_positions is None and layout != "contiguous":
        idx = lax.axis_index(axis_name)
        q_positions = shard_positions(t, layout, idx, n_dev)
        kv_positions = shard_positions(k.shape[1], layout, idx, n_dev)
    if q_positions is not None or kv_positions is not None:
        kwargs["q_positions"], kwargs["kv_positions"] = gather(q_positions), gather(kv_positions)
    res = _attention(
        to_heads(q), to_heads(k), to_heads(v), return_residuals=return_residuals, **kwargs
    )
    if not return_residuals:
        return to_seq(res)
    out, lse = res
    return to_seq(out), to_seq(lse)
