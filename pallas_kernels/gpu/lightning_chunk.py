"""Lightning attention (decayed causal linear attention) on GPU: Pallas kernels lowered to Triton.

Computes ``o_t = (scale * q_t) S_t`` with ``S_t = g_t * lambda * S_{t-1} + k_t^T v_t`` per batch
row and head (``lambda = exp(log_decay)``, ``g_t = 0`` where a packed document starts), from
``initial_state`` on; semantics and chunked equations in
:mod:`pallas_kernels.gpu.lightning_common`, forward kernels in
:mod:`pallas_kernels.gpu.lightning_fwd`, backward kernels in
:mod:`pallas_kernels.gpu.lightning_bwd`. This module holds the whole-sequence entry point,
:func:`lightning_attention`, with its ``jax.custom_vjp``; the block phases of one block of a
longer sequence (LASP, LASP-2) are in :mod:`pallas_kernels.gpu.lightning_phases`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common.lightning import (
    chunk_run_ids,
)
from pallas_kernels.gpu._common import pad_axis, pad_head, round_up
from pallas_kernels.gpu.lightning_bwd import run_bwd, run_dstates
from pallas_kernels.gpu.lightning_common import (
    LightningConfig,
    check_args,
    kernel_config,
    kernel_dims,
    lanes,
    launch_plan,
    pad_state,
    unpad,
)
from pallas_kernels.gpu.lightning_fwd import (
    lightning_forward,
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
    b, t, n, h_in = q.shape
    hv_in = v.shape[-1]
    h, hv = kernel_dims(h_in, hv_in)
    chunk = launch_plan(config, t, h, hv)[0]
    tp = round_up(t, chunk)
    q, k = (pad_axis(pad_head(x, h), 1, tp) for x in (q, k))
    v = pad_axis(pad_head(v, hv), 1, tp)
    h0 = (
        jnp.zeros((b, n, h, hv), jnp.float32)
        if initial_state is None
        else pad_state(initial_state.astype(jnp.float32), h, hv)
    )
    rel = None if segment_ids is None else chunk_run_ids(segment_ids, tp, chunk)
    o, ht = _lightning(
        q, k, v, log_decay.astype(jnp.float32), h0, rel, t, scale, config, interpret
    )
    return unpad(o[:, :t], hv_in), unpad(ht, h_in, hv_in)


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
      q, k: [B, T, N, H]; v: [B, T, N, Hv]; one dtype (float32, bfloat16 or float16); H and
        Hv anything from 1 to 256 (the kernels run at the next power of two >= 16, zero-padded
        and sliced back inside: 64 and 128 are taken as they are).
      log_decay: [N] float, log lambda per head (lambda in (0, 1]; 0 is plain linear
        attention). Not differentiated (its cotangent is zero).
      initial_state: [B, N, H, Hv] state continued by token 0 (None: zeros); float32 math.
      segment_ids: [B, T] int packed-document ids; the state resets where the id changes.
      scale: multiplies q.
      config: :class:`LightningConfig`, default ``LightningConfig.get_default`` of the
        padded H and q's dtype.
      interpret: run the kernels in the Pallas interpreter (CPU tests).

    Returns:
      (o [B, T, N, Hv] in q's dtype, final_state [B, N, H, Hv] float32); differentiable in
      q, k, v and initial_state (both outputs).

    Raises:
      ValueError: inconsistent shapes or dtypes, head dims above 256.

    Example:
      >>> o, state = lightning_attention(q, k, v, jnp.log(jnp.full((N,), 0.99)), scale=0.125)
    """
    check_args(q, k, v, log_decay, initial_state, segment_ids)
    config = kernel_config(config, q.shape[-1], q.dtype)
    return _lightning_jit(
        q, k, v, jnp.asarray(log_decay), initial_state,
        None if segment_ids is None else jnp.asarray(segment_ids),
        scale=float(scale), config=config, interpret=bool(interpret),
    )
