"""LASP: sequence-parallel lightning attention with the state passed around a ring.

The sequence is split into P contiguous blocks along a mesh axis (block m on device m). Each
device summarizes its block (S_out = carry * S_in + state); the incoming states are then built
by P - 1 ring steps, each a ``lax.ppermute`` of one [B, N, H, Hv] state to the next device;
finally each device computes its block's output from its incoming state. Backward (custom
VJP): each block's incoming-state cotangent, P - 1 reverse ring steps give every block its
outgoing state's cotangent, then dq, dk, dv.

The per-block steps are the chosen implementation's block phases
(:func:`attnlab.ops.lightning.block_phases`), shared with LASP-2 through :func:`phased_shard`:
LASP and LASP-2 differ only in their :class:`StateExchange` (a ring here, one all-gather
there).

Segment ids are exact across blocks: the incoming state is zeroed when a block's first token
starts a new document relative to the previous block's last token.

This module also holds the pieces LASP-2 (:mod:`sharding.lasp2`) shares: the mesh wrapper
and the block-phase VJP.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from attnlab.ops import lightning as _L
from attnlab.ops._vma import like_vma, vary, varying
from attnlab.ops.lightning import LightningArgs
from pallas_kernels.common.lightning import scale_state
from sharding._common import check_bsn_axes, default_check_vma, mesh_shard_map


def boundary_keep(segment_ids: jax.Array | None, prev_last: jax.Array | None) -> jax.Array:
    """[B] float32: 1 where the block's first token continues the previous block's document."""
    if segment_ids is None or prev_last is None:
        return jnp.ones(() if segment_ids is None else segment_ids.shape[:1], jnp.float32)
    return (segment_ids[:, 0] == prev_last).astype(jnp.float32)


class StateExchange(NamedTuple):
    """How the blocks of a sequence-parallel lightning layer trade memory states.

    ``forward(state, carry, segment_ids, init) -> (s_in, final, res)``: from this block's
    summary (it leaves ``carry * S_in + state``; carry [B, N]) and the sequence's initial
    state, the state entering this block and the sequence's final state (identical on every
    device). ``backward(ds_in, dfinal, res, shares) -> (ds_out, dinit)``: from the cotangent
    of this block's incoming state (given its output's) and the final state's, the cotangent
    of this block's outgoing state, and the initial state's (right on device 0; invariant
    over the axis unless ``shares``). ``shares``: under ``shard_map(check_vma=False)`` each
    device holds a 1/P share of ``dfinal``, to be summed.
    """

    forward: Callable[..., tuple[jax.Array, jax.Array, Any]]
    backward: Callable[..., tuple[jax.Array, jax.Array]]


def phased_shard(
    exchange: StateExchange, q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array,
    initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None, *,
    axis_name: str, scale: float = 1.0, chunk_size: int | None = None, impl: str = "auto",
    config: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """One block of a sequence-parallel lightning layer (inside ``shard_map``), as the block
    phases of the chosen implementation (:func:`attnlab.ops.lightning.block_phases`) around
    ``exchange``: summarize, exchange, forward; backward: state cotangent, exchange back,
    dq/dk/dv. A custom VJP; log_decay gets a zero cotangent. LASP and LASP-2 differ only in
    the exchange."""
    b, _, n, h = q.shape
    hv = v.shape[-1]
    if initial_state is None:
        initial_state = jnp.zeros((b, n, h, hv), jnp.float32)

    def phases(log_decay, segment_ids):  # built from the VJP's own arguments (no closure)
        a = LightningArgs(log_decay, initial_state, segment_ids, scale, chunk_size, config)
        return _L.block_phases(q, k, v, a, impl)

    def fwd(q, k, v, init, log_decay, segment_ids):
        ph = phases(log_decay, segment_ids)
        state, aux = ph.summarize(k, v)
        carry = _L.block_carry(log_decay, segment_ids, b, q.shape[1])
        s_in, final, xres = exchange.forward(state, carry, segment_ids, init)
        o, res = ph.forward(q, k, v, s_in, aux)
        return (o, final), (res, log_decay, segment_ids, xres)

    # Under shard_map(check_vma=False) (q's type then lacks the sequence axis) each device is
    # handed a 1/P share of the replicated final state's cotangent, and the initial state's
    # cotangents are summed over the devices afterwards; with check_vma the final state's
    # cotangent comes whole and the initial state's must leave invariant.
    shares = axis_name not in varying(q)

    def bwd(res, cts):
        res, log_decay, segment_ids, xres = res
        do, dfinal = cts
        ph = phases(log_decay, segment_ids)
        ds_in, res = ph.state_grad(res, do)
        ds_out, dinit = exchange.backward(ds_in, dfinal.astype(jnp.float32), xres, shares)
        if shares:
            dinit = jnp.where(jax.lax.axis_index(axis_name) == 0, dinit, 0.0)
        dq, dk, dv = ph.backward(res, ds_out)
        return dq, dk, dv, dinit, jnp.zeros_like(log_decay), None

    @jax.custom_vjp
    def run(q, k, v, init, log_decay, segment_ids):
        return fwd(q, k, v, init, log_decay, segment_ids)[0]

    run.defvjp(fwd, bwd)
    # The initial state meets the exchanged states, which vary over every axis q does except
    # the sequence axis; marking it so up front also makes its cotangent type match (pcast's
    # transpose sums it where the caller passed it replicated).
    initial_state = vary(initial_state, tuple(sorted(varying(q) - {axis_name})))
    return run(q, k, v, initial_state, log_decay, segment_ids)


def ring_exchange(axis_name: str) -> StateExchange:
    """LASP's exchange: P - 1 ring hops (``ppermute``) of one [B, N, H, Hv] state forward,
    P - 1 hops of its cotangent back."""

    def forward(state, carry, segment_ids, init):
        p = jax.lax.axis_size(axis_name)
        idx = jax.lax.axis_index(axis_name)
        carry = carry[:, :, None, None]
        to_next = [(i, i + 1) for i in range(p - 1)]
        keep = 1.0
        if segment_ids is not None:
            prev_last = jax.lax.ppermute(segment_ids[:, -1], axis_name, to_next)
            keep = boundary_keep(segment_ids, prev_last)[:, None, None, None]
        first = idx == 0
        # Device 0 starts from the initial state, the others wait. The ring carry takes on
        # every axis the block states vary over (data axes too), so its start must too.
        x = like_vma(jnp.where(first, init, 0.0), state)

        # A state dropped at a document start (carry or keep 0) is selected away, not
        # multiplied: an earlier document's NaN must not cross it (0 * NaN is NaN).
        def hop(x, _):
            y = scale_state(carry, x) + state  # this block's outgoing state, given its incoming
            sent = scale_state(keep, jax.lax.ppermute(y, axis_name, to_next))
            return jnp.where(first, x, sent), None

        # After hop s, devices 0..s hold their final incoming states.
        x, _ = jax.lax.scan(hop, x, None, length=p - 1)
        final = jax.lax.psum(jnp.where(idx == p - 1, scale_state(carry, x) + state, 0.0),
                             axis_name)
        return x, final, (carry, keep)

    def backward(ds_in, dfinal, res, shares):
        carry, keep = res
        p = jax.lax.axis_size(axis_name)
        idx = jax.lax.axis_index(axis_name)
        if shares:
            dfinal = jax.lax.psum(dfinal, axis_name)
        last = idx == p - 1
        to_prev = [(i + 1, i) for i in range(p - 1)]
        g = like_vma(jnp.where(last, dfinal, 0.0), ds_in)

        def hop(g, _):  # block m+1 sends keep_{m+1} * (its whole incoming-state cotangent)
            sent = scale_state(keep, ds_in + scale_state(carry, g))
            return jnp.where(last, g, jax.lax.ppermute(sent, axis_name, to_prev)), None

        # After hop s, devices P-1-s..P-1 hold their outgoing states' final cotangents.
        g, _ = jax.lax.scan(hop, g, None, length=p - 1)
        dinit = jnp.where(idx == 0, ds_in + scale_state(carry, g), 0.0)
        return g, (dinit if shares else jax.lax.psum(dinit, axis_name))

    return StateExchange(forward, backward)


def lasp_shard(
    q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array,
    initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None, *,
    axis_name: str, scale: float = 1.0, chunk_size: int | None = None, impl: str = "auto",
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
      the whole sequence, identical on every device of the axis). Differentiable in q, k, v
      and initial_state.

    Example:
      >>> o, s = jax.shard_map(partial(lasp_shard, axis_name="sp"), mesh=mesh, ...)(q, k, v, ld)
    """
    return phased_shard(ring_exchange(axis_name), q, k, v, log_decay, initial_state,
                        segment_ids, axis_name=axis_name, scale=scale, chunk_size=chunk_size,
                        impl=impl, config=config)


ShardFn = Callable[..., tuple[jax.Array, jax.Array]]


def sharded_lightning(
    shard_fn: ShardFn, q: jax.Array, k: jax.Array, v: jax.Array, *, decay: Any, mesh: Mesh,
    seq_axis: str = "sp", batch_axis: str | None = None, head_axis: str | None = None,
    initial_state: jax.Array | None = None, return_state: bool = False,
    segment_ids: jax.Array | None = None, chunk_size: int | None = None,
    scale: float | None = None, impl: str = "auto", config: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Runs ``shard_fn`` (``lasp_shard`` or ``lasp2_shard``) over ``mesh`` with global arrays.

    Shared by :func:`lasp_attention` and :func:`sharding.lasp2.lasp2_attention` (same
    arguments; see there).
    """
    a = _L._normalize(q, k, v, decay, initial_state, segment_ids, scale, chunk_size, config)
    b, t, n, _ = q.shape
    check_bsn_axes(mesh, seq_axis, batch_axis, head_axis, seq=("sequence length T", t),
                   batch=b, heads=n)
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
