"""Lightning attention on GPU, one block of a longer sequence in four phases (Triton).

For a sequence-parallel caller (LASP and LASP-2, ``sharding.lasp.phased_shard``) that
exchanges states between the phases, with no phase reading the block twice. The kernels are
those of :mod:`pallas_kernels.gpu.lightning_fwd` and :mod:`pallas_kernels.gpu.lightning_bwd`;
:mod:`pallas_kernels.gpu.lightning_chunk` is the whole-sequence entry point.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common.lightning import chunk_run_ids, decayed_state_scan
from pallas_kernels.gpu._common import pad_axis, pad_head, round_up
from pallas_kernels.gpu.lightning_bwd import run_bwd, run_dstates
from pallas_kernels.gpu.lightning_common import (
    check_args,
    kernel_dims,
    lanes,
    launch_plan,
    pad_state,
    seeded_starts,
    span_carries,
    unpad,
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
# Head dims are padded as the whole-sequence entry point pads them (``kernel_dims``): what
# the phases take and return has the caller's H and Hv; residuals and ``aux`` stay padded.


def _block_setup(t, h, hv, segment_ids, log_decay, config):
    """(chunk, padded length, run ids or None, lanes of log_decay) of a block of t tokens at
    the kernels' head dims h, hv."""
    chunk = launch_plan(config, t, h, hv)[0]
    tp = round_up(t, chunk)
    rel = None if segment_ids is None else chunk_run_ids(segment_ids, tp, chunk)
    return chunk, tp, rel, lanes(log_decay)


def _pad_block(q, k, v, tp):
    """q, k (None: skipped) and v padded to the kernels' head dims and to ``tp`` tokens."""
    h, hv = kernel_dims(k.shape[-1], v.shape[-1])
    q, k = (None if x is None else pad_axis(pad_head(x, h), 1, tp) for x in (q, k))
    return q, k, pad_axis(pad_head(v, hv), 1, tp)


def block_summarize(k, v, log_decay, segment_ids=None, *, config, interpret=False):
    """Phase 1: (the state [B, N, H, Hv] f32 the block leaves from a zero state, aux).

    ``aux`` (every segment's own state and carry but the last's, at the kernels' padded
    head dims) is what :func:`block_forward` reuses to start its segments.
    """
    check_args(k, k, v, log_decay, None, segment_ids)
    b, t, n, h_in = k.shape
    hv_in = v.shape[-1]
    h, hv = kernel_dims(h_in, hv_in)
    chunk, tp, rel, ld = _block_setup(t, h, hv, segment_ids, log_decay, config)
    _, k, v = _pad_block(None, k, v, tp)
    bv = launch_plan(config, t, h, hv)[1]
    seg_chunks, n_seg = fused_segments(config, b, n, tp // chunk, hv, bv)
    local = segment_locals(k, v, ld, rel, t=t, chunk=chunk, seg_chunks=seg_chunks,
                           count=n_seg, config=config, interpret=interpret)
    gamma = span_carries(log_decay, rel, b=b, t=t, span=seg_chunks * chunk, count=n_seg)
    state = decayed_state_scan(gamma, local, axis=2)[:, :, -1]
    return unpad(state, h_in, hv_in), (local[:, :, :-1], gamma[:, :, :-1])


def block_forward(q, k, v, log_decay, segment_ids, s_in, aux, *, scale, config,
                  interpret=False):
    """Phase 2: (o [B, T, N, Hv] of the block entered by ``s_in`` [B, N, H, Hv], residuals)."""
    check_args(q, k, v, log_decay, s_in, segment_ids)
    t, hv_in = q.shape[1], v.shape[-1]
    h, hv = kernel_dims(q.shape[-1], hv_in)
    _, tp, rel, ld = _block_setup(t, h, hv, segment_ids, log_decay, config)
    q, k, v = _pad_block(q, k, v, tp)
    local, gamma = aux
    starts = seeded_starts(pad_state(s_in.astype(jnp.float32), h, hv), local, gamma)
    o, _, states = run_fused_fwd(q, k, v, ld, None, rel, log_decay, t=t, scale=scale,
                                 config=config, interpret=interpret, with_states=True,
                                 starts=starts)
    return unpad(o[:, :t], hv_in), (q, k, v, log_decay, rel, states)


def block_state_grad(res, do, *, t, head_dims, scale, config, interpret=False):
    """Phase 3: (the cotangent [B, N, H, Hv] f32 of the incoming state, given the output's
    and none on the outgoing state, residuals for :func:`block_backward`). ``head_dims``:
    the block's (H, Hv), which the (padded) residuals no longer show."""
    q, k, v, log_decay, rel, states = res
    b, tp, n, h = q.shape
    hv = v.shape[-1]
    do = pad_axis(pad_head(do.astype(q.dtype), hv), 1, tp)
    dstates, ds_in = run_dstates(
        q, do, lanes(log_decay), jnp.zeros((b, n, h, hv), jnp.float32), rel, t=t,
        scale=scale, config=config, interpret=interpret,
    )
    return unpad(ds_in, *head_dims), (res, do, dstates)


def block_backward(res, ds_out, *, t, head_dims, scale, config, interpret=False):
    """Phase 4: (dq, dk, dv) of the block, given the outgoing state's cotangent ``ds_out``
    [B, N, H, Hv] (learned from the blocks after this one; None: none). ``head_dims``: the
    block's (H, Hv), as for :func:`block_state_grad`."""
    (q, k, v, log_decay, rel, states), do, dstates = res
    b, tp, _, h = q.shape
    hv = v.shape[-1]
    tail = None
    if ds_out is not None:
        chunk = launch_plan(config, t, h, hv)[0]
        gamma = span_carries(log_decay, rel, b=b, t=t, span=chunk, count=tp // chunk)
        later = jnp.concatenate([gamma[..., 1:], jnp.ones_like(gamma[..., :1])], axis=-1)
        tail = jnp.flip(jnp.cumprod(jnp.flip(later, -1), axis=-1), -1)  # later carries
        ds_out = pad_state(ds_out.astype(jnp.float32), h, hv)
    dq, dk, dv = run_bwd(q, k, v, do, lanes(log_decay), rel, states, dstates, t=t,
                         scale=scale, config=config, interpret=interpret, tail=tail,
                         dht=ds_out)
    h_in, hv_in = head_dims
    return unpad(dq[:, :t], h_in), unpad(dk[:, :t], h_in), unpad(dv[:, :t], hv_in)
