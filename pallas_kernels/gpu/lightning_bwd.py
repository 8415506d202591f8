"""Lightning attention backward on GPU: Pallas kernels lowered to Triton (CPU-interpretable).

Gradients of the chunked lightning attention of :mod:`pallas_kernels.gpu.lightning_fwd`
(equations in :mod:`pallas_kernels.gpu.lightning_common`), from the per-chunk states the
forward saved (under differentiation the fused forward writes them too):

* ``lightning_dstates`` walks the chunks backwards (grid (B, N, H/BK, Hv/BV)) writing dS at
  the end of every chunk and the initial state's cotangent;
* ``lightning_bwd`` (grid (B, N, T/C)) computes dq, dk, dv of a chunk from its states,
  looping over value blocks.

The custom VJP that calls them is in :mod:`pallas_kernels.gpu.lightning_chunk`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.lightning import scale_state
from pallas_kernels.common.masks import finite_or_zero
from pallas_kernels.gpu._common import compiler_params, dot, dot_precision
from pallas_kernels.gpu.lightning_common import (
    LANES,
    intra_decay,
    key_gate,
    launch_plan,
    real_counts,
    row_gate,
    run_state_pass,
)

# ----------------------------------------------------------------------------- kernels


def _dstates_kernel(
    ld_ref,  # [LANES] f32: log lambda of this head, broadcast
    rel_ref,  # [Tp] int32 run ids, or None
    q_ref,  # [Tp, BK] queries, one state-row block
    do_ref,  # [Tp, BV] output cotangent, one state-column block
    dht_ref,  # [BK, BV] f32 cotangent of the final state
    dstates_ref,  # [nC * H, BV] out (input dtype): cotangent of the state leaving each chunk
    dh0_ref,  # [BK, BV] f32 out: cotangent of the initial state
    *,
    chunk: int,
    t: int,
    head_dim: int,
    scale: float,
    precision,
):
    kb = pl.program_id(2)
    bk = q_ref.shape[-1]
    n_chunks = q_ref.shape[0] // chunk
    ld = ld_ref[0]

    def body(i, ds):
        c = n_chunks - 1 - i
        row = pl.multiple_of(c * head_dim + kb * bk, bk)
        dstates_ref[pl.ds(row, bk), :] = ds.astype(dstates_ref.dtype)
        start = pl.multiple_of(c * chunk, chunk)
        q = q_ref[pl.ds(start, chunk), :]
        do = do_ref[pl.ds(start, chunk), :]
        rel = None if rel_ref is None else rel_ref[pl.ds(start, chunk)]
        e, valid = real_counts(c, chunk, t)
        _, gamma = key_gate(ld, e, valid, rel)
        # Select, don't multiply: rows after a reset (gate 0) and a dropped state add nothing,
        # whatever their q, dO or the later cotangent hold (0 * NaN is NaN).
        gate = (scale * row_gate(ld, e, rel))[:, None]
        qg = jnp.where(gate != 0, q.astype(jnp.float32) * gate, 0.0).astype(q.dtype)
        return scale_state(gamma, ds) + dot(qg, finite_or_zero(do), ta=True,
                                            precision=precision)

    dh0_ref[...] = lax.fori_loop(0, n_chunks, body, dht_ref[...].astype(jnp.float32))


def _bwd_kernel(
    ld_ref,  # [LANES] f32: log lambda of this head, broadcast
    rel_ref,  # [C] int32 run ids of this chunk, or None
    q_ref,  # [C, H]
    k_ref,  # [C, H]
    v_ref,  # [C, Hv]
    do_ref,  # [C, Hv] output cotangent
    s_ref,  # [H, Hv] state entering this chunk (input dtype)
    ds_ref,  # [H, Hv] cotangent of the state leaving this chunk (input dtype)
    tail_ref,  # [LANES] f32: what this chunk's leaving state is worth at the end, or None
    dht_ref,  # [H, Hv] f32 cotangent of the final state not in ds_ref, or None
    dq_ref,  # [C, H] out
    dk_ref,  # [C, H] out
    dv_ref,  # [C, Hv] out
    *,
    chunk: int,
    t: int,
    scale: float,
    block_v: int,
    precision,
):
    c = pl.program_id(2)
    ld = ld_ref[0]
    rel = None if rel_ref is None else rel_ref[...]
    e, valid = real_counts(c, chunk, t)
    q, k = q_ref[...], k_ref[...]
    dt = q.dtype
    # Select, don't multiply (the forward's rule): pairs off the decay mask, keys of weight 0
    # and rows after a reset add nothing, and the operands summed over them are read finite.
    d = scale * intra_decay(ld, e, rel)
    keep = d != 0
    a = jnp.where(keep, dot(q, k, tb=True, precision=precision) * d, 0.0).astype(dt)
    w, _ = key_gate(ld, e, valid, rel)
    w_on = (w > 0)[:, None]
    gate = (scale * row_gate(ld, e, rel))[:, None]
    h = q.shape[-1]
    da = jnp.zeros((chunk, chunk), jnp.float32)
    dq_inter = jnp.zeros((chunk, h), jnp.float32)
    dk_inter = jnp.zeros((chunk, h), jnp.float32)
    # Value blocks are a static loop: the [C, H] accumulators stay live, a [C, BV] block of
    # dv is finished and stored per step.
    for j in range(v_ref.shape[-1] // block_v):
        cols = slice(j * block_v, (j + 1) * block_v)
        v, do = v_ref[:, cols], do_ref[:, cols]
        ds = ds_ref[:, cols]
        if dht_ref is not None:  # dS_c += tail_c * dS_T: a final-state cotangent seeded late
            ds = ds.astype(jnp.float32) + scale_state(tail_ref[0], dht_ref[:, cols])
        s, ds = s_ref[:, cols].astype(dt), ds.astype(dt)
        da = da + dot(do, v, tb=True, precision=precision)
        dq_inter = dq_inter + dot(do, s, tb=True, precision=precision)
        dk_inter = dk_inter + dot(v, ds, tb=True, precision=precision)
        dv = dot(a, finite_or_zero(do), ta=True, precision=precision)
        dv = dv + jnp.where(w_on, w[:, None] * dot(k, ds, precision=precision), 0.0)
        dv_ref[:, cols] = dv.astype(dv_ref.dtype)
    da = jnp.where(keep, da * d, 0.0).astype(dt)
    dq = dot(da, finite_or_zero(k), precision=precision)
    dq = dq + jnp.where(gate != 0, gate * dq_inter, 0.0)
    dk = dot(da, finite_or_zero(q), ta=True, precision=precision)
    dk = dk + jnp.where(w_on, w[:, None] * dk_inter, 0.0)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)


# ----------------------------------------------------------------------------- launchers


def run_dstates(q, do, ld, dht, rel, *, t, scale, config, interpret):
    """State-cotangent kernel ``lightning_dstates``: q [B, Tp, N, H], dO [B, Tp, N, Hv], the
    final state's cotangent dht [B, N, H, Hv] f32 -> (the cotangent of the state leaving each
    chunk [B, N, nC * H, Hv] in q's dtype, the initial state's [B, N, H, Hv] f32)."""
    return run_state_pass(functools.partial(_dstates_kernel, scale=scale), "lightning_dstates",
                          q.dtype, q, do, ld, dht, rel, t=t, config=config, interpret=interpret)


def run_bwd(q, k, v, do, ld, rel, states, dstates, *, t, scale, config, interpret,
            tail=None, dht=None):
    """dq/dk/dv kernel: (dq, dk, dv) padded, in the inputs' dtype. ``dht`` [B, N, H, Hv] f32
    with ``tail`` [B, N, nC] f32: a final-state cotangent that ``dstates`` lacks, added to
    chunk c's as ``tail[c] * dht`` (tail: the product of the later chunks' carries)."""
    b, tp, n, h = q.shape
    hv = v.shape[-1]
    chunk, bv, _, _ = launch_plan(config, t, h, hv)
    row = pl.BlockSpec((None, chunk, None, h), lambda bi, ni, c: (bi, c, ni, 0))
    row_v = pl.BlockSpec((None, chunk, None, hv), lambda bi, ni, c: (bi, c, ni, 0))
    state = pl.BlockSpec((None, None, h, hv), lambda bi, ni, c: (bi, ni, c, 0))
    seeded = dht is not None
    if seeded:
        tail = jnp.broadcast_to(tail[..., None], (*tail.shape, LANES))
    in_specs = [
        pl.BlockSpec((None, LANES), lambda bi, ni, c: (ni, 0)),
        None if rel is None else pl.BlockSpec((None, chunk), lambda bi, ni, c: (bi, c)),
        row, row, row_v, row_v, state, state,
        pl.BlockSpec((None, None, None, LANES), lambda bi, ni, c: (bi, ni, c, 0))
        if seeded else None,
        pl.BlockSpec((None, None, h, hv), lambda bi, ni, c: (bi, ni, 0, 0)) if seeded else None,
    ]
    kernel = functools.partial(
        _bwd_kernel, chunk=chunk, t=t, scale=scale, block_v=bv,
        precision=dot_precision(q.dtype),
    )
    return pl.pallas_call(
        kernel,
        grid=(b, n, tp // chunk),
        in_specs=in_specs,
        out_specs=[row, row, row_v],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        compiler_params=compiler_params(config, "bwd"),
        interpret=interpret,
        name="lightning_bwd",
    )(ld, rel, q, k, v, do, states, dstates, tail if seeded else None, dht)
