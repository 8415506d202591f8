"""Lightning attention (decayed causal linear attention) on GPU: Pallas kernels lowered to Triton.

Computes ``o_t = (scale * q_t) S_t`` with ``S_t = g_t * lambda * S_{t-1} + k_t^T v_t`` per batch
row and head (``lambda = exp(log_decay)``, ``g_t = 0`` where a packed document starts), from
``initial_state`` on; semantics and chunked equations in
:mod:`pallas_kernels.gpu.lightning_common`, forward kernels in
:mod:`pallas_kernels.gpu.lightning_fwd`, backward kernels in
:mod:`pallas_kernels.gpu.lightning_bwd`. This module holds their two entry points:

* :func:`lightning_attention`, the whole sequence, with its ``jax.custom_vjp``;
* the block phases ``block_summarize`` -> ``block_forward`` -> ``block_state_grad`` ->
  ``block_backward``: one block of a longer sequence, so that a sequence-parallel caller
  (LASP, LASP-2) exchanges states between the phases.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common.checks import check_config
from pallas_kernels.common.lightning import (
    check_lightning_inputs,
    chunk_run_ids,
    decayed_state_scan,
)
from pallas_kernels.gpu._common import pad_axis, round_up
from pallas_kernels.gpu.lightning_bwd import run_bwd, run_dstates
from pallas_kernels.gpu.lightning_common import (
    GPU_HEAD_DIMS,
    MAX_INTERPRET_DIM,
    MIN_DIM,
    SUPPORTED_DTYPES,
    LightningConfig,
    lanes,
    launch_plan,
    seeded_starts,
    span_carries,
)
from pallas_kernels.gpu.lightning_fwd import (
    fused_segments,
    lightning_forward,
    run_fused_fwd,
    segment_locals,
)

# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _lightning(q, k, v, log_decay, h0, rel, t, scale, config, interpret):
    o, ht, _ = lightning_forward(q, k, v, log_decay, h0, rel, t, scale, config, interpret,
                                 with_states=False)
    return o, ht


def _lightning_fwd(q, k, v, log_decay, h0, rel, t, scale, config, interpret):
    # The per-chunk states (the input dtype, (T/C) H Hv per head: a third of q, k, v at
    # C = 128, H = Hv) are saved for the backward: the fused forward writes them as it walks,
    # for much less than a recomputation by the states kernel.
    o, ht, states = lightning_forward(q, k, v, log_decay, h0, rel, t, scale, config, interpret,
                                      with_states=True)
    return (o, ht), (q, k, v, log_decay, h0, rel, states)


def _lightning_bwd(t, scale, config, interpret, res, cts):
    q, k, v, log_decay, h0, rel, states = res
    do, dht = cts
    do = do.astype(q.dtype)
    ld = lanes(log_decay)
    dstates, dh0 = run_dstates(
        q, do, ld, dht.astype(jnp.float32), rel, t=t, scale=scale, config=config,
        interpret=interpret,
    )
    dq, dk, dv = run_bwd(
        q, k, v, do, ld, rel, states, dstates, t=t, scale=scale, config=config,
        interpret=interpret,
    )
    return dq, dk, dv, jnp.zeros_like(log_decay), dh0.astype(h0.dtype), None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def _lightning_jit(q, k, v, log_decay, initial_state, segment_ids, *, scale, config, interpret):
    b, t, n, h = q.shape
    hv = v.shape[-1]
    chunk = launch_plan(config, t, h, hv)[0]
    tp = round_up(t, chunk)
    q, k, v = (pad_axis(x, 1, tp) for x in (q, k, v))
    h0 = (
        jnp.zeros((b, n, h, hv), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )
    rel = None if segment_ids is None else chunk_run_ids(segment_ids, tp, chunk)
    o, ht = _lightning(
        q, k, v, log_decay.astype(jnp.float32), h0, rel, t, scale, config, interpret
    )
    return o[:, :t], ht


def lightning_attention(
    q: jax.Array, k: jax.Array, v: jax.Array,
    log_decay: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    scale: float = 1.0,
    config: LightningConfig | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Lightning attention (decayed causal linear attention), chunked Pallas/Triton kernels.

    Args:
      q, k: [B, T, N, H]; v: [B, T, N, Hv]; one dtype (float32, bfloat16 or float16). On a
        GPU H and Hv must be 64 or 128; interpreted, any power of two in [16, 256].
      log_decay: [N] float, log lambda per head (lambda in (0, 1]; 0 is plain linear
        attention). Not differentiated (its cotangent is zero).
      initial_state: [B, N, H, Hv] state continued by token 0 (None: zeros); float32 math.
      segment_ids: [B, T] int packed-document ids; the state resets where the id changes.
      scale: multiplies q.
      config: :class:`LightningConfig`, default ``LightningConfig.get_default(H, q.dtype)``.
      interpret: run the kernels in the Pallas interpreter (CPU tests).

    Returns:
      (o [B, T, N, Hv] in q's dtype, final_state [B, N, H, Hv] float32); differentiable in
      q, k, v and initial_state (both outputs).

    Raises:
      ValueError: inconsistent shapes or dtypes, unsupported head dims.

    Example:
      >>> o, state = lightning_attention(q, k, v, jnp.log(jnp.full((N,), 0.99)), scale=0.125)
    """
    _check_args(q, k, v, log_decay, initial_state, segment_ids, interpret)
    config = check_config(config, LightningConfig, q.shape[-1], q.dtype)
    return _lightning_jit(
        q, k, v, jnp.asarray(log_decay), initial_state,
        None if segment_ids is None else jnp.asarray(segment_ids),
        scale=float(scale), config=config, interpret=bool(interpret),
    )


def _check_args(q, k, v, log_decay, initial_state, segment_ids, interpret) -> None:
    """check_lightning_inputs plus the head dims these kernels compile for."""
    _, _, _, h, hv = check_lightning_inputs(
        q, k, v, log_decay, initial_state, segment_ids, dtypes=SUPPORTED_DTYPES
    )
    for name, dim in (("head_dim H", h), ("value head_dim Hv", hv)):
        if interpret:
            if dim < MIN_DIM or dim > MAX_INTERPRET_DIM or dim & (dim - 1):
                raise ValueError(
                    f"{name} is {dim}; the lightning kernels take powers of two in "
                    f"[{MIN_DIM}, {MAX_INTERPRET_DIM}] (pad the head dim)"
                )
        elif dim not in GPU_HEAD_DIMS:
            raise ValueError(
                f"{name} is {dim}; the compiled lightning kernels support {GPU_HEAD_DIMS} "
                "(pad the head dim, or use the reference implementation)"
            )


# ----------------------------------------------------------------------------- sequence blocks
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
    _check_args(k, k, v, log_decay, None, segment_ids, interpret)
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
    _check_args(q, k, v, log_decay, s_in, segment_ids, interpret)
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
