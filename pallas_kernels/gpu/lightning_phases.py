"""Lightning attention on GPU, one block of a longer sequence in four phases (Triton).

For a sequence-parallel caller (LASP and LASP-2, ``sharding.lasp.phased_shard``) that
exchanges states between the phases, with no phase reading the block twice. The kernels are
those of :mod:`pallas_kernels.gpu.lightning_fwd` and :mod:`pallas_kernels.gpu.lightning_bwd`;
:mod:`pallas_kernels.gpu.lightning_chunk` is the whole-sequence entry point.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common.lightning import chunk_run_ids, decayed_state_scan
from pallas_kernels.gpu._common import pad_axis, round_up
from pallas_kernels.gpu.lightning_bwd import run_bwd, run_dstates
from pallas_kernels.gpu.lightning_common import (
    check_args,
    lanes,
    launch_plan,
    seeded_starts,
    span_carries,
)
from pallas_kernels.gpu.lightning_fwd import fused_segments, run_fused_fwd, segment_locals

# A block of a longer sequence in four phases, so that a sequence-parallel caller (LASP and
# LASP-2, sharding.lasp.phased_shard) exchanges states between them and no phase reads the
# block twice:
# summarize (the segment states the fused forward needs anyway give the block's own state) ->
# forward (the fused kernel, entered by the incoming state) -> state_grad (the dS kernel from a
# zero final-state cotangent gives the incoming state's cotangent) -> backward (the dq/dk/dv
# kernel adds the outgoing state's cotangent, known only after the exchange, chunk by chunk).
# Only for the fused forward (``config.fused_forward``); callers fall back otherwise.


def _block_setup(x, segment_ids, log_decay, config, hv):
    """(t, chunk, padded length, run ids or None, lanes of log_decay)."""
    b, t, n, h = x.shape
    chunk = launch_plan(config, t, h, hv)[0]
    tp = round_up(t, chunk)
    rel = None if segment_ids is None else chunk_run_ids(segment_ids, tp, chunk)
    return t, chunk, tp, rel, lanes(log_decay)


def block_summarize(k, v, log_decay, segment_ids=None, *, config, interpret=False):
    """Phase 1: (the state [B, N, H, Hv] f32 the block leaves from a zero state, aux).

    ``aux`` (every segment's own state and carry but the last's) is what
    :func:`block_forward` reuses to start its segments.
    """
    check_args(k, k, v, log_decay, None, segment_ids, interpret)
    b, _, n, h = k.shape
    hv = v.shape[-1]
    t, chunk, tp, rel, ld = _block_setup(k, segment_ids, log_decay, config, hv)
    k, v = (pad_axis(x, 1, tp) for x in (k, v))
    bv = launch_plan(config, t, h, hv)[1]
    seg_chunks, n_seg = fused_segments(config, b, n, tp // chunk, hv, bv)
    local = segment_locals(k, v, ld, rel, t=t, chunk=chunk, seg_chunks=seg_chunks,
                           count=n_seg, config=config, interpret=interpret)
    gamma = span_carries(log_decay, rel, b=b, t=t, span=seg_chunks * chunk, count=n_seg)
    state = decayed_state_scan(gamma, local, axis=2)[:, :, -1]
    return state, (local[:, :, :-1], gamma[:, :, :-1])


def block_forward(q, k, v, log_decay, segment_ids, s_in, aux, *, scale, config,
                  interpret=False):
    """Phase 2: (o [B, T, N, Hv] of the block entered by ``s_in`` [B, N, H, Hv], residuals)."""
    check_args(q, k, v, log_decay, s_in, segment_ids, interpret)
    hv = v.shape[-1]
    t, _, tp, rel, ld = _block_setup(q, segment_ids, log_decay, config, hv)
    q, k, v = (pad_axis(x, 1, tp) for x in (q, k, v))
    local, gamma = aux
    starts = seeded_starts(s_in.astype(jnp.float32), local, gamma)
    o, _, states = run_fused_fwd(q, k, v, ld, None, rel, log_decay, t=t, scale=scale,
                                 config=config, interpret=interpret, with_states=True,
                                 starts=starts)
    return o[:, :t], (q, k, v, log_decay, rel, states)


def block_state_grad(res, do, *, t, scale, config, interpret=False):
    """Phase 3: (the cotangent [B, N, H, Hv] f32 of the incoming state, given the output's
    and none on the outgoing state, residuals for :func:`block_backward`)."""
    q, k, v, log_decay, rel, states = res
    b, tp, n, h = q.shape
    do = pad_axis(do.astype(q.dtype), 1, tp)
    dstates, ds_in = run_dstates(
        q, do, lanes(log_decay), jnp.zeros((b, n, h, v.shape[-1]), jnp.float32), rel, t=t,
        scale=scale, config=config, interpret=interpret,
    )
    return ds_in, (res, do, dstates)


def block_backward(res, ds_out, *, t, scale, config, interpret=False):
    """Phase 4: (dq, dk, dv) of the block, given the outgoing state's cotangent ``ds_out``
    [B, N, H, Hv] (learned from the blocks after this one; None: none)."""
    (q, k, v, log_decay, rel, states), do, dstates = res
    b, tp = q.shape[:2]
    tail = None
    if ds_out is not None:
        chunk = launch_plan(config, t, q.shape[-1], v.shape[-1])[0]
        gamma = span_carries(log_decay, rel, b=b, t=t, span=chunk, count=tp // chunk)
        later = jnp.concatenate([gamma[..., 1:], jnp.ones_like(gamma[..., :1])], axis=-1)
        tail = jnp.flip(jnp.cumprod(jnp.flip(later, -1), axis=-1), -1)  # later carries
        ds_out = ds_out.astype(jnp.float32)
    dq, dk, dv = run_bwd(q, k, v, do, lanes(log_decay), rel, states, dstates, t=t,
                         scale=scale, config=config, interpret=interpret, tail=tail,
                         dht=ds_out)
    return dq[:, :t], dk[:, :t], dv[:, :t]
