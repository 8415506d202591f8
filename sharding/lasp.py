"""LASP: sequence-parallel lightning attention with the state passed around a ring.

The sequence is split into P contiguous blocks along a mesh axis (block m on device m). Each
device summarizes its block (:func:`attnlab.ops.lightning.chunk_summary`: S_out = carry * S_in +
state); the incoming states are then built by P - 1 ring steps, each a ``lax.ppermute`` of one
[B, N, H, Hv] state to the next device; finally each device runs the single-device op on its
block with its incoming state. The backward pass is JAX's transpose of the same program: the
state gradients flow back around the ring (reverse ``ppermute``), then each device runs the
local backward.

Segment ids are exact across blocks: the incoming state is zeroed when a block's first token
starts a new document relative to the previous block's last token.

This module also holds the pieces LASP-2 (:mod:`sharding.lasp2`) shares: the mesh wrapper and
the local call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attnlab.ops import lightning as _L
from attnlab.ops._vma import like_vma
from attnlab.ops.lightning import LightningArgs
from sharding._common import check_mesh_axes, default_check_vma, mesh_shard_map


def local_call(q, k, v, a: LightningArgs, impl: str) -> tuple[jax.Array, jax.Array]:
    """The single-device op on one block (inside ``shard_map``): (o, final state)."""
    return _L.REGISTRY.choose(q, k, v, a, impl).fn(q, k, v, a)


def boundary_keep(segment_ids: jax.Array | None, prev_last: jax.Array | None) -> jax.Array:
    """[B] float32: 1 where the block's first token continues the previous block's document."""
    if segment_ids is None or prev_last is None:
        return jnp.ones(() if segment_ids is None else segment_ids.shape[:1], jnp.float32)
    return (segment_ids[:, 0] == prev_last).astype(jnp.float32)


def lasp_shard(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    axis_name: str,
    scale: float = 1.0,
    chunk_size: int | None = None,
    impl: str = "auto",
    config: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """LASP inside ``jax.shard_map``: this device's block of a sequence split over ``axis_name``.

    Args:
      q, k: [B, Tl, N, H] this device's block; v: [B, Tl, N, Hv].
      log_decay: [N] float32, log lambda (the same on every device of the axis).
      initial_state: [B, N, H, Hv] state before the whole sequence (the same on every device),
        or None.
      segment_ids: [B, Tl] this block's document ids, or None.
      axis_name: the mesh axis the sequence is split over (block m on axis index m).
      scale, chunk_size, impl, config: as :func:`attnlab.ops.lightning_attention`.

    Returns:
      (o [B, Tl, N, Hv], final_state [B, N, H, Hv] float32, the state after the last token of
      the whole sequence, identical on every device of the axis).

    Example:
      >>> o, s = jax.shard_map(partial(lasp_shard, axis_name="sp"), mesh=mesh, ...)(q, k, v, ld)
    """
    p = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    state, carry = _L.chunk_summary(k, v, log_decay, segment_ids)
    carry = carry[:, :, None, None]
    to_next = [(i, i + 1) for i in range(p - 1)]
    keep = 1.0
    if segment_ids is not None:
        prev_last = jax.lax.ppermute(segment_ids[:, -1], axis_name, to_next)
        keep = boundary_keep(segment_ids, prev_last)[:, None, None, None]
    x0 = initial_state
    if x0 is None:
        x0 = jnp.zeros(state.shape, jnp.float32)
    first = idx == 0
    x = jnp.where(first, x0, 0.0)  # device 0 starts from the initial state, the others wait
    # The ring carry takes on every axis the block states vary over (data axes too), so its
    # start must vary over them already (a zero or replicated x0 varies over none).
    x = like_vma(x, state)

    def ring_step(x, _):
        y = carry * x + state  # this block's outgoing state, given its current incoming state
        received = jax.lax.ppermute(y, axis_name, to_next)
        return jnp.where(first, x, keep * received), None

    # After step s, devices 0..s hold their final incoming states.
    x, _ = jax.lax.scan(ring_step, x, None, length=p - 1)
    a = LightningArgs(log_decay, x, segment_ids, scale, chunk_size, config)
    o, s_out = local_call(q, k, v, a, impl)
    final = jax.lax.psum(jnp.where(idx == p - 1, s_out, 0.0), axis_name)
    return o, final


ShardFn = Callable[..., tuple[jax.Array, jax.Array]]


def sharded_lightning(
    shard_fn: ShardFn,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    decay: Any,
    mesh: Mesh,
    seq_axis: str = "sp",
    batch_axis: str | None = None,
    head_axis: str | None = None,
    initial_state: jax.Array | None = None,
    return_state: bool = False,
    segment_ids: jax.Array | None = None,
    chunk_size: int | None = None,
    scale: float | None = None,
    impl: str = "auto",
    config: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Runs ``shard_fn`` (``lasp_shard`` or ``lasp2_shard``) over ``mesh`` with global arrays.

    Shared by :func:`lasp_attention` and :func:`sharding.lasp2.lasp2_attention` (same
    arguments; see there).
    """
    a = _L._normalize(q, k, v, decay, initial_state, segment_ids, scale, chunk_size, config)
    b, t, n, _ = q.shape
    check_mesh_axes(
        mesh, {"seq_axis": seq_axis, "batch_axis": batch_axis, "head_axis": head_axis},
        {"sequence length T": (t, seq_axis), "batch B": (b, batch_axis),
         "heads N": (n, head_axis)},
    )
    qs = P(batch_axis, seq_axis, head_axis, None)
    ss = P(batch_axis, head_axis, None, None)
    args: dict[str, jax.Array] = {"q": q, "k": k, "v": v, "log_decay": a.log_decay}
    specs: dict[str, P] = {"q": qs, "k": qs, "v": qs, "log_decay": P(head_axis)}
    if a.initial_state is not None:
        args["initial_state"], specs["initial_state"] = a.initial_state, ss
    if a.segment_ids is not None:
        args["segment_ids"], specs["segment_ids"] = a.segment_ids, P(batch_axis, seq_axis)

    def body(x: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return shard_fn(
            x["q"], x["k"], x["v"], x["log_decay"], x.get("initial_state"), x.get("segment_ids"),
            axis_name=seq_axis, scale=a.scale, chunk_size=a.chunk_size, impl=impl,
            config=a.config,
        )

    o, s = mesh_shard_map(body, mesh, (args,), (specs,), (qs, ss), default_check_vma(impl))
    return (o, s) if return_state else o


def lasp_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, decay: Any, mesh: Mesh, seq_axis: str = "sp",
    **kwargs: Any,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Lightning attention with the sequence split over ``mesh`` axis ``seq_axis`` (LASP ring).

    Args:
      q, k: [B, T, N, H] global arrays; v: [B, T, N, Hv]. T must be divisible by the size of
        ``seq_axis`` (block m of T / P tokens goes to axis index m).
      decay: per-head lambda [N] in (0, 1].
      mesh: a ``jax.sharding.Mesh`` containing ``seq_axis``.
      seq_axis: mesh axis the sequence is split over.
      batch_axis, head_axis: optional mesh axes for B and N (data / head parallelism).
      initial_state, return_state, segment_ids, chunk_size, scale, impl, config: as
        :func:`attnlab.ops.lightning_attention`.

    Returns:
      o [B, T, N, Hv] (sharded like q), or (o, final_state [B, N, H, Hv]) with return_state.

    Raises:
      ValueError: bad inputs (as the op), unknown mesh axes, sizes not divisible by the axes.

    Example:
      >>> o = lasp_attention(q, k, v, decay=decay, mesh=jax.make_mesh((8,), ("sp",)))
    """
    return sharded_lightning(lasp_shard, q, k, v, decay=decay, mesh=mesh, seq_axis=seq_axis,
                             **kwargs)
