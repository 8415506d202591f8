"""LASP-2: sequence-parallel lightning attention with one all-gather of memory states.

Block m of the sequence lives on device m of a mesh axis. Forward, per device:

1. summarize the block: S_out = carry_m * S_in + state_m (carry_m = lambda^Tl, or 0 if a
   document starts inside the block; :func:`attnlab.ops.lightning.block_carry`);
2. ONE ``all_gather`` of the [B, N, H, Hv] memory states (with segment ids, the carry and the
   block's first/last document ids ride in the same buffer: [B, N, H*Hv + 3]);
3. prefix-combine locally: S_in_m = keep_m * (carry_{m-1} S_in_{m-1} + state_{m-1}), where
   keep_m = 0 when block m's first token starts a new document relative to block m-1's last;
4. the block's output, entered by S_in_m.

Backward (custom VJP): the cotangent of S_in_m given the block's output cotangent; ONE
``all_gather`` of them; a local suffix-combine gives the cotangent of this block's outgoing
state; then dq, dk, dv. The gathered sizes depend on B, N, H, Hv and the axis size, never on
the sequence length.

The four per-block steps are :class:`attnlab.ops.lightning.BlockPhases` of the chosen
implementation, run by :func:`sharding.lasp.phased_shard` around this module's
:func:`gather_exchange` (LASP's ring is the other exchange). The Triton kernels (fused
forward) have phases of their own: the summary comes from the segment states the fused
forward computes anyway, and the outgoing state's cotangent is added inside the dq/dk/dv
kernel, so LASP-2 reads each block no more often than the single-device op does. Other
implementations take the generic phases: :func:`attnlab.ops.lightning.chunk_summary` (an
extra pass over k and v, forward and backward) and the op's own VJP.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from attnlab.ops._vma import like_vma
from pallas_kernels.common.lightning import scale_state
from sharding.hybrid import HybridParallel, register_rule
from sharding.lasp import StateExchange, phased_shard, sharded_lightning


def _gather_summaries(state, carry, segment_ids, axis_name):
    """One all-gather -> (states [P, B, N, H, Hv], carries [P, B, N], keeps [P, B])."""
    b, n, h, hv = state.shape
    if segment_ids is None:
        states = jax.lax.all_gather(state, axis_name, to="invarying")
        p = states.shape[0]
        return states, jnp.broadcast_to(carry, (p, *carry.shape)), jnp.ones((p, b), jnp.float32)
    ids = jnp.stack([segment_ids[:, 0], segment_ids[:, -1]], axis=-1)  # [B, 2] first, last
    ids = jax.lax.bitcast_convert_type(ids.astype(jnp.int32), jnp.float32)  # exact round trip
    extra = jnp.concatenate(
        [carry[..., None], jnp.broadcast_to(ids[:, None, :], (b, n, 2))], axis=-1
    )
    packed = jnp.concatenate([state.reshape(b, n, h * hv), extra], axis=-1)
    g = jax.lax.all_gather(packed, axis_name, to="invarying")  # [P, B, N, H*Hv + 3]
    states = g[..., : h * hv].reshape(g.shape[0], b, n, h, hv)
    carries = g[..., h * hv]
    first, last = (jax.lax.bitcast_convert_type(g[:, :, 0, h * hv + i], jnp.int32)
                   for i in (1, 2))
    keeps = jnp.concatenate(
        [jnp.ones((1, b), jnp.float32), (first[1:] == last[:-1]).astype(jnp.float32)], axis=0
    )
    return states, carries, keeps


def _prefix(states, carries, keeps, init):
    """Incoming state of every block [P, B, N, H, Hv] and the sequence's final state."""

    def step(prev_out, xs):
        st, c, kp = xs
        # Dropped states (keep or carry 0) are selected away: 0 * NaN is NaN.
        s_in = scale_state(kp[:, None, None, None], prev_out)
        return scale_state(c[..., None, None], s_in) + st, s_in

    final, s_ins = jax.lax.scan(step, like_vma(init, states), (states, carries, keeps))
    return s_ins, final


def _suffix(ds_ins, carries, keeps, dfinal):
    """Gradient of every block's outgoing state [P, ...] and of the initial state."""

    def step(g_out, xs):
        ds, c, kp = xs
        g_in = ds + scale_state(c[..., None, None], g_out)
        return scale_state(kp[:, None, None, None], g_in), g_out

    dinit, g_outs = jax.lax.scan(step, like_vma(dfinal, ds_ins), (ds_ins, carries, keeps),
                                 reverse=True)
    return g_outs, dinit


def gather_exchange(axis_name: str) -> StateExchange:
    """LASP-2's exchange: one all-gather of the block summaries forward (then a local prefix
    combine), one of the incoming states' cotangents backward (then a local suffix combine)."""

    def forward(state, carry, segment_ids, init):
        states, carries, keeps = _gather_summaries(state, carry, segment_ids, axis_name)
        s_ins, final = _prefix(states, carries, keeps, init)
        return s_ins[jax.lax.axis_index(axis_name)], final, (carries, keeps)

    def backward(ds_in, dfinal, res, shares):
        carries, keeps = res
        if shares:  # the shares of dfinal ride in the one all-gather and are summed here
            both = jax.lax.all_gather(jnp.stack([ds_in, dfinal]), axis_name,
                                      to="invarying")  # [P, 2, B, N, H, Hv]
            ds_ins, dfinal = both[:, 0], jnp.sum(both[:, 1], axis=0)
        else:
            ds_ins = jax.lax.all_gather(ds_in, axis_name, to="invarying")  # [P, B, N, H, Hv]
        g_outs, dinit = _suffix(ds_ins, carries, keeps, dfinal)
        return g_outs[jax.lax.axis_index(axis_name)], dinit

    return StateExchange(forward, backward)


def lasp2_shard(
    q: jax.Array, k: jax.Array, v: jax.Array, log_decay: jax.Array,
    initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None, *,
    axis_name: str, **kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
    """LASP-2 inside ``jax.shard_map``: this device's block of a sequence split over ``axis_name``.

    Args:
      q, k: [B, Tl, N, H] this device's block; v: [B, Tl, N, Hv]; log_decay: [N] float32.
      initial_state ([B, N, H, Hv] or None), segment_ids ([B, Tl] or None), axis_name,
        and the other keywords (scale, chunk_size, impl, config): as :func:`sharding.lasp_shard`.

    Returns:
      (o [B, Tl, N, Hv], final_state [B, N, H, Hv] float32), as
      :func:`sharding.lasp_shard`. Differentiable in q, k, v and initial_state (custom
      VJP with one all-gather); log_decay gets a zero cotangent.

    Example:
      >>> o, s = jax.shard_map(partial(lasp2_shard, axis_name="sp"), mesh=mesh, ...)(q, k, v, ld)
    """
    return phased_shard(gather_exchange(axis_name), q, k, v, log_decay, initial_state,
                        segment_ids, axis_name=axis_name, **kwargs)


def lasp2_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, decay: Any, mesh: Mesh, seq_axis: str = "sp",
    **kwargs: Any,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Lightning attention with the sequence split over ``mesh`` axis ``seq_axis`` (LASP-2).

    The same computation as :func:`sharding.lasp_attention`, with one all-gather of the
    block states in place of LASP's P - 1 ring hops.

    Args:
      q, k: [B, T, N, H] global arrays; v: [B, T, N, Hv]; T divisible by the size of
        ``seq_axis``.
      decay, mesh, seq_axis and the other keywords (batch_axis, head_axis, initial_state,
        return_state, segment_ids, chunk_size, scale, impl, config): as
        :func:`sharding.lasp_attention`.

    Returns:
      o [B, T, N, Hv] (sharded like q), or (o, final_state [B, N, H, Hv]) with return_state.

    Raises:
      ValueError: as :func:`sharding.lasp_attention`.

    Example:
      >>> o = lasp2_attention(q, k, v, decay=decay, mesh=jax.make_mesh((8,), ("sp",)))
    """
    return sharded_lightning(lasp2_shard, q, k, v, decay=decay, mesh=mesh, seq_axis=seq_axis,
                             **kwargs)


@register_rule("lightning")
def _lightning_rule(plan: HybridParallel, q: jax.Array, k: jax.Array, v: jax.Array, *,
                    decay: Any, **kwargs: Any) -> Any:
    """Lightning attention of a model layer by LASP-2 over the plan's mesh."""
    return lasp2_attention(q, k, v, decay=decay, mesh=plan.mesh, seq_axis=plan.seq_axis,
                           batch_axis=plan.batch_axis, impl=plan.impl, **kwargs)
