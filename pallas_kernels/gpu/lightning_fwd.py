"""Lightning attention forward on GPU: Pallas kernels lowered to Triton (CPU-interpretable).

Computes ``o_t = (scale * q_t) S_t`` and the final state of the decayed recurrence
``S_t = g_t * lambda * S_{t-1} + k_t^T v_t`` chunk by chunk (equations in
:mod:`pallas_kernels.gpu.lightning_common`). One of two kinds:

* two phases, as fla's ``chunk_lightning_attn``: ``lightning_states`` — grid
  (B, N, H/BK, Hv/BV), sequential over chunks — writes every chunk's starting state (in the
  input dtype; the carry stays float32) and the final state (state rows and columns are
  independent, hence the 2-D split); ``lightning_fwd`` — grid (B, N, T/C, Hv/BV), fully
  parallel — adds intra-chunk and inter-chunk terms.
* fused (``LightningConfig.fused_forward``, the default for 16-bit inputs):
  ``lightning_fused_fwd`` — grid (B, N, S, Hv/BV) — walks the chunks of one of S segments
  per program, the state carried in registers: no per-chunk states in memory. With S > 1
  (long sequences, too few programs otherwise), ``lightning_segment_states`` (grid
  (B, N, S - 1, H/BK, Hv/BV)) first computes each segment's own state from zero, and an
  associative scan over the segments (XLA, float32) gives every segment's entering state.

Memory: the per-chunk states take (T/C) * H * Hv elements per (batch, head) in the input
dtype (512 MiB for T = 128K, N = 16, H = Hv = 128, C = 128 in bf16, a third of q, k, v): the
inference forward holds none with the fused kernel; under differentiation they are kept from
the forward to the backward, which adds one array of dS the same size.

The public wrapper and its custom VJP are in :mod:`pallas_kernels.gpu.lightning_chunk`; the
backward kernels in :mod:`pallas_kernels.gpu.lightning_bwd`.
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
    FUSED_TARGET_PROGRAMS,
    LANES,
    MIN_SEGMENT_CHUNKS,
    LightningConfig,
    intra_decay,
    key_gate,
    lanes,
    launch_plan,
    real_counts,
    row_gate,
    run_state_pass,
    seeded_starts,
    span_carries,
)

# ----------------------------------------------------------------------------- kernels


def _chunk_output(q, k, v, s, ld, e, rel, scale, precision):
    """[C, BV] f32: one chunk's output, intra-chunk [(scale Q K^T) . D] V plus the inter-chunk
    term from the state ``s`` entering it (used in the input dtype, as the states are stored).

    Select, don't multiply: a later token's or another document's NaN never reaches a row
    (its decay-mask entry is 0, but 0 * NaN is NaN), nor does the carried state reach a row
    after a reset."""
    d = intra_decay(ld, e, rel)
    a = jnp.where(d > 0, dot(q, k, tb=True, precision=precision) * (scale * d), 0.0)
    o = dot(a.astype(v.dtype), finite_or_zero(v), precision=precision)
    inter = dot(q, s.astype(q.dtype), precision=precision)
    gate = scale * row_gate(ld, e, rel)
    return o + jnp.where((gate != 0)[:, None], gate[:, None] * inter, 0.0)


def _next_state(s, k, v, ld, e, valid, rel, precision):
    """[BK, BV] f32: the state after a chunk, from the float32 state ``s`` entering it; keys
    of earlier documents (weight 0) and a dropped state select 0 (0 * NaN is NaN)."""
    w, gamma = key_gate(ld, e, valid, rel)
    kw = jnp.where((w > 0)[:, None], k.astype(jnp.float32) * w[:, None], 0.0).astype(k.dtype)
    return scale_state(gamma, s) + dot(kw, finite_or_zero(v), ta=True, precision=precision)


def _chunk_step(c, s, ld, rel_ref, k_ref, v_ref, *, chunk: int, t: int, precision):
    """[BK, BV] f32: the state after chunk c, read from the whole-sequence refs
    (rel_ref [Tp] or None, k_ref [Tp, BK], v_ref [Tp, BV]) of a state kernel."""
    start = pl.multiple_of(c * chunk, chunk)
    k = k_ref[pl.ds(start, chunk), :]
    v = v_ref[pl.ds(start, chunk), :]
    rel = None if rel_ref is None else rel_ref[pl.ds(start, chunk)]
    e, valid = real_counts(c, chunk, t)
    return _next_state(s, k, v, ld, e, valid, rel, precision)


def _states_kernel(
    ld_ref,  # [LANES] f32: log lambda of this head, broadcast
    rel_ref,  # [Tp] int32 run ids (chunk_run_ids), or None
    k_ref,  # [Tp, BK] keys, one state-row block
    v_ref,  # [Tp, BV] values, one state-column block
    h0_ref,  # [BK, BV] f32 initial state block
    states_ref,  # [nC * H, BV] out (input dtype): the state entering each chunk
    ht_ref,  # [BK, BV] f32 out: final state block
    *,
    chunk: int,
    t: int,
    head_dim: int,
    precision,
):
    kb = pl.program_id(2)
    bk = k_ref.shape[-1]
    n_chunks = k_ref.shape[0] // chunk
    ld = ld_ref[0]

    def body(c, s):
        row = pl.multiple_of(c * head_dim + kb * bk, bk)
        states_ref[pl.ds(row, bk), :] = s.astype(states_ref.dtype)
        return _chunk_step(c, s, ld, rel_ref, k_ref, v_ref, chunk=chunk, t=t, precision=precision)

    ht_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(jnp.float32))


def _fwd_kernel(
    ld_ref,  # [LANES] f32: log lambda of this head, broadcast
    rel_ref,  # [C] int32 run ids of this chunk, or None
    q_ref,  # [C, H]
    k_ref,  # [C, H]
    v_ref,  # [C, BV]
    s_ref,  # [H, BV] state entering this chunk (input dtype)
    o_ref,  # [C, BV] out
    *,
    chunk: int,
    t: int,
    scale: float,
    precision,
):
    c = pl.program_id(2)
    ld = ld_ref[0]
    rel = None if rel_ref is None else rel_ref[...]
    e, _ = real_counts(c, chunk, t)
    o = _chunk_output(q_ref[...], k_ref[...], v_ref[...], s_ref[...], ld, e, rel, scale,
                      precision)
    o_ref[...] = o.astype(o_ref.dtype)


def _segment_states_kernel(
    ld_ref,  # [LANES] f32: log lambda of this head, broadcast
    rel_ref,  # [Tp] int32 run ids (chunk_run_ids), or None
    k_ref,  # [Tp, BK] keys, one state-row block
    v_ref,  # [Tp, BV] values, one state-column block
    local_ref,  # [BK, BV] f32 out: the state segment s leaves when it starts from zero
    *,
    chunk: int,
    t: int,
    seg_chunks: int,
    precision,
):
    """One segment's own contribution to the state (only the last one may be short)."""
    n_chunks = k_ref.shape[0] // chunk
    first = pl.program_id(2) * seg_chunks
    ld = ld_ref[0]

    def body(i, s):
        return _chunk_step(first + i, s, ld, rel_ref, k_ref, v_ref, chunk=chunk, t=t,
                           precision=precision)

    whole = n_chunks % seg_chunks == 0
    steps = seg_chunks if whole else jnp.minimum(seg_chunks, n_chunks - first)
    local_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros(local_ref.shape, jnp.float32))


def _fused_fwd_kernel(
    ld_ref,  # [LANES] f32: log lambda of this head, broadcast
    rel_ref,  # [Tp] int32 run ids, or None
    q_ref,  # [Tp, H]
    k_ref,  # [Tp, H]
    v_ref,  # [Tp, BV] one value-column block
    h0_ref,  # [H, BV] f32 state entering this program's segment
    o_ref,  # [Tp, BV] out
    ht_ref,  # [H, BV] f32 out: state leaving the segment
    states_ref=None,  # [nC * H, BV] out (input dtype), or None: the state entering each chunk
    *,
    chunk: int,
    t: int,
    seg_chunks: int,
    scale: float,
    precision,
):
    """Both phases in one pass over the chunks of segment ``program_id(2)``: each chunk's
    output from the state carried in registers, then the state update. The state enters the
    inter-chunk matmul in the input dtype, as the two-phase kernels store it, so both paths
    round alike (and the stored states are the ones the backward needs)."""
    n_chunks = q_ref.shape[0] // chunk
    first = pl.program_id(2) * seg_chunks
    ld = ld_ref[0]
    h = q_ref.shape[-1]

    def body(i, s):
        c = first + i
        if states_ref is not None:
            states_ref[pl.ds(pl.multiple_of(c * h, h), h), :] = s.astype(states_ref.dtype)
        start = pl.multiple_of(c * chunk, chunk)
        q = q_ref[pl.ds(start, chunk), :]
        k = k_ref[pl.ds(start, chunk), :]
        v = v_ref[pl.ds(start, chunk), :]
        rel = None if rel_ref is None else rel_ref[pl.ds(start, chunk)]
        e, valid = real_counts(c, chunk, t)
        o = _chunk_output(q, k, v, s, ld, e, rel, scale, precision)
        o_ref[pl.ds(start, chunk), :] = o.astype(o_ref.dtype)
        return _next_state(s, k, v, ld, e, valid, rel, precision)

    # A dynamic trip count only where the last segment is short.
    whole = n_chunks % seg_chunks == 0
    steps = seg_chunks if whole else jnp.minimum(seg_chunks, n_chunks - first)
    ht_ref[...] = lax.fori_loop(0, steps, body, h0_ref[...].astype(jnp.float32))


# ----------------------------------------------------------------------------- launchers


def run_states(q_dtype, k, v, ld, h0, rel, *, t, config, interpret):
    """States kernel ``lightning_states``: k [B, Tp, N, H], v [B, Tp, N, Hv], h0
    [B, N, H, Hv] f32 -> (the state entering each chunk [B, N, nC * H, Hv] in q_dtype, final
    state [B, N, H, Hv] f32)."""
    return run_state_pass(_states_kernel, "lightning_states", q_dtype, k, v, ld, h0, rel, t=t,
                          config=config, interpret=interpret)


def _run_fwd(q, k, v, ld, rel, states, *, t, scale, config, interpret):
    """Output kernel: o [B, Tp, N, Hv] in q's dtype."""
    b, tp, n, h = q.shape
    hv = v.shape[-1]
    chunk, bv, _, _ = launch_plan(config, t, h, hv)
    in_specs = [
        pl.BlockSpec((None, LANES), lambda bi, ni, c, vb: (ni, 0)),
        None if rel is None else pl.BlockSpec((None, chunk), lambda bi, ni, c, vb: (bi, c)),
        pl.BlockSpec((None, chunk, None, h), lambda bi, ni, c, vb: (bi, c, ni, 0)),
        pl.BlockSpec((None, chunk, None, h), lambda bi, ni, c, vb: (bi, c, ni, 0)),
        pl.BlockSpec((None, chunk, None, bv), lambda bi, ni, c, vb: (bi, c, ni, vb)),
        pl.BlockSpec((None, None, h, bv), lambda bi, ni, c, vb: (bi, ni, c, vb)),
    ]
    kernel = functools.partial(
        _fwd_kernel, chunk=chunk, t=t, scale=scale, precision=dot_precision(q.dtype)
    )
    return pl.pallas_call(
        kernel,
        grid=(b, n, tp // chunk, hv // bv),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, chunk, None, bv), lambda bi, ni, c, vb: (bi, c, ni, vb)),
        out_shape=jax.ShapeDtypeStruct((b, tp, n, hv), q.dtype),
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="lightning_fwd",
    )(ld, rel, q, k, v, states)


def fused_segments(
    config: LightningConfig, b: int, n: int, n_chunks: int, hv: int, bv: int
) -> tuple[int, int]:
    """(chunks per segment, number of segments) of the fused forward."""
    g = config.segment_chunks
    if g == 0:
        wanted = -(-FUSED_TARGET_PROGRAMS // (b * n * (hv // bv)))
        g = max(-(-n_chunks // wanted), MIN_SEGMENT_CHUNKS)
    g = min(g, n_chunks)
    return g, -(-n_chunks // g)


def segment_locals(k, v, ld, rel, *, t, chunk, seg_chunks, count, config, interpret):
    """[B, N, count, H, Hv] f32: the state each of the first ``count`` segments leaves when
    it starts from zero (kernel ``lightning_segment_states``)."""
    b, tp, n, h = k.shape
    hv = v.shape[-1]
    _, _, bk, bv = launch_plan(config, t, h, hv)
    return pl.pallas_call(
        functools.partial(_segment_states_kernel, chunk=chunk, t=t, seg_chunks=seg_chunks,
                          precision=dot_precision(k.dtype)),
        grid=(b, n, count, h // bk, hv // bv),
        in_specs=[
            pl.BlockSpec((None, LANES), lambda bi, ni, si, kb, vb: (ni, 0)),
            None if rel is None else pl.BlockSpec((None, tp), lambda bi, ni, si, kb, vb: (bi, 0)),
            pl.BlockSpec((None, tp, None, bk), lambda bi, ni, si, kb, vb: (bi, 0, ni, kb)),
            pl.BlockSpec((None, tp, None, bv), lambda bi, ni, si, kb, vb: (bi, 0, ni, vb)),
        ],
        out_specs=pl.BlockSpec((None, None, None, bk, bv),
                               lambda bi, ni, si, kb, vb: (bi, ni, si, kb, vb)),
        out_shape=jax.ShapeDtypeStruct((b, n, count, h, hv), jnp.float32),
        compiler_params=compiler_params(config, "state"),
        interpret=interpret,
        name="lightning_segment_states",
    )(ld, rel, k, v)


def _segment_starts(k, v, ld, h0, rel, log_decay, *, t, chunk, seg_chunks, n_seg, config,
                    interpret):
    """[B, N, S, H, Hv] f32: the state entering each segment of the fused forward."""
    if n_seg == 1:
        return h0[:, :, None]
    local = segment_locals(k, v, ld, rel, t=t, chunk=chunk, seg_chunks=seg_chunks,
                           count=n_seg - 1, config=config, interpret=interpret)
    gamma = span_carries(log_decay, rel, b=k.shape[0], t=t, span=seg_chunks * chunk,
                         count=n_seg - 1)
    return seeded_starts(h0, local, gamma)


def run_fused_fwd(q, k, v, ld, h0, rel, log_decay, *, t, scale, config, interpret,
                  with_states=False, starts=None):
    """One-kernel forward (per segment): (o [B, Tp, N, Hv] in q's dtype, final state
    [B, N, H, Hv] f32, ``with_states``: the state entering each chunk [B, N, nC * H, Hv] in
    q's dtype, as ``run_states`` writes it, else None). ``starts`` (the segments' entering
    states, [B, N, S, H, Hv] f32) replaces ``h0`` where the caller has them."""
    b, tp, n, h = q.shape
    hv = v.shape[-1]
    chunk, bv, _, _ = launch_plan(config, t, h, hv)
    seg_chunks, n_seg = fused_segments(config, b, n, tp // chunk, hv, bv)
    if starts is None:
        starts = _segment_starts(k, v, ld, h0, rel, log_decay, t=t, chunk=chunk,
                                 seg_chunks=seg_chunks, n_seg=n_seg, config=config,
                                 interpret=interpret)
    whole = lambda width: pl.BlockSpec(  # noqa: E731
        (None, tp, None, width), lambda bi, ni, si, vb: (bi, 0, ni, 0))
    column = pl.BlockSpec((None, tp, None, bv), lambda bi, ni, si, vb: (bi, 0, ni, vb))
    state = pl.BlockSpec((None, None, None, h, bv), lambda bi, ni, si, vb: (bi, ni, si, 0, vb))
    in_specs = [
        pl.BlockSpec((None, LANES), lambda bi, ni, si, vb: (ni, 0)),
        None if rel is None else pl.BlockSpec((None, tp), lambda bi, ni, si, vb: (bi, 0)),
        whole(h), whole(h), column, state,
    ]
    kernel = functools.partial(
        _fused_fwd_kernel, chunk=chunk, t=t, seg_chunks=seg_chunks, scale=scale,
        precision=dot_precision(q.dtype),
    )
    out_specs = [column, state]
    out_shape = [jax.ShapeDtypeStruct((b, tp, n, hv), q.dtype),
                 jax.ShapeDtypeStruct((b, n, n_seg, h, hv), jnp.float32)]
    if with_states:
        out_specs.append(pl.BlockSpec((None, None, (tp // chunk) * h, bv),
                                      lambda bi, ni, si, vb: (bi, ni, 0, vb)))
        out_shape.append(jax.ShapeDtypeStruct((b, n, (tp // chunk) * h, hv), q.dtype))
    o, leaving, *states = pl.pallas_call(
        kernel,
        grid=(b, n, n_seg, hv // bv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="lightning_fused_fwd",
    )(ld, rel, q, k, v, starts)
    return o, leaving[:, :, -1], (states[0] if with_states else None)


def lightning_forward(q, k, v, log_decay, h0, rel, t, scale, config, interpret, *, with_states):
    """(o, final state, per-chunk states or None): the fused or two-phase forward; the
    two-phase one always has the states, the fused one writes them only ``with_states``."""
    ld = lanes(log_decay)
    if config.fused_forward:
        return run_fused_fwd(q, k, v, ld, h0, rel, log_decay, t=t, scale=scale,
                             config=config, interpret=interpret, with_states=with_states)
    states, ht = run_states(q.dtype, k, v, ld, h0, rel, t=t, config=config, interpret=interpret)
    o = _run_fwd(
        q, k, v, ld, rel, states, t=t, scale=scale, config=config, interpret=interpret
    )
    return o, ht, states
