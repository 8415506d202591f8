"""Lightning attention (decayed causal linear attention) on GPU: Pallas kernels lowered to Triton.

Semantics (MiniMax-01 / Lightning Attention-2), per batch row and head with decay
``lambda = exp(log_decay)`` in (0, 1]::

    S_t = g_t * lambda * S_{t-1} + k_t^T v_t,      o_t = (scale * q_t) S_t,

``S_{-1} = initial_state`` (zeros if None), ``g_t = 0`` where ``segment_ids`` changes (a new
packed document) and 1 elsewhere; token 0 always continues ``initial_state``. State math is
float32; outputs come in q's dtype.

Chunked form (chunk C, the sequence padded to a whole number of chunks): within chunk c,
with ``e_i`` the number of real tokens from the chunk start up to and including i,

    O_intra = [(scale Q K^T) . D] V,   D_ij = lambda^(e_i - e_j) (i >= j, same run) else 0,
    O_inter = diag(scale lambda^e_i [row i sees the carried state]) Q S_c,
    S_{c+1} = lambda^L [no reset in chunk] S_c + (diag(w) K)^T V,  w_j = lambda^(L - e_j)
              for keys of the chunk's last run, else 0,

where L = e_(C-1) is the number of real tokens in the chunk. Counting only real tokens makes
padded positions (zero keys and values) leave the state untouched, so padding never changes
the final state. All decay factors are powers lambda^m with m >= 0: nothing is divided by a
small decay, so lambda near 0 is as stable as lambda = 1. Segment resets come in as
:func:`pallas_kernels.common.lightning.chunk_run_ids` (one int per token).

Kernels (forward, one of two kinds):

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
* backward: the forward's per-chunk states are saved (under differentiation the fused forward
  writes them too); ``lightning_dstates`` walks
  the chunks backwards (grid (B, N, H/BK, Hv/BV)) writing dS at the end of every chunk and
  the initial state's cotangent; ``lightning_bwd`` (grid (B, N, T/C)) computes dq, dk, dv of
  a chunk from its states, looping over value blocks.

Memory: the per-chunk states take (T/C) * H * Hv elements per (batch, head) in the input
dtype (512 MiB for T = 128K, N = 16, H = Hv = 128, C = 128 in bf16, a third of q, k, v): the
inference forward holds none with the fused kernel; under differentiation they are kept from
the forward to the backward, which adds one array of dS the same size.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common.lightning import (
    check_lightning_inputs,
    chunk_run_ids,
    decayed_state_scan,
)
from pallas_kernels.gpu._common import dot, dot_precision, pad_axis, round_up

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Head dims compiled for a GPU (shared-memory and register budgets are sized for these);
# the interpreter takes any power of two in [MIN_DIM, MAX_INTERPRET_DIM].
GPU_HEAD_DIMS = (64, 128)
MIN_DIM = 16
MAX_INTERPRET_DIM = 256
# exp() of this is exactly 0 in float32: masked decay entries, never -inf (no inf - inf).
NEG_BIG = -1e30
# log_decay is handed to the kernels broadcast over this many lanes (a tile Triton accepts).
_LANES = 16
# Automatic segments of the fused forward: enough for this many programs (a few per SM of an
# H100), none shorter than MIN_SEGMENT_CHUNKS chunks (each segment boundary costs one more
# read of the segment's keys and values).
FUSED_TARGET_PROGRAMS = 512
MIN_SEGMENT_CHUNKS = 8


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LightningConfig:
    """Tile sizes and launch parameters of the Triton lightning-attention kernels.

    Attributes:
      chunk: tokens per chunk C (intra-chunk tiles are [C, C]); the sequence is padded to a
        multiple of it. Shrunk (not below 16) for sequences shorter than one chunk.
      block_v: value columns per program of the output kernel (two-phase or fused) and per
        step of the dq/dk/dv kernel (shrunk to Hv if larger).
      block_k_state, block_v_state: the [block_k_state, block_v_state] float32 state tile of
        one program of the two sequential kernels (states and dS); shrunk to H / Hv.
      num_warps, num_stages: output kernel launch parameters (two-phase or fused).
      num_warps_state, num_stages_state: the states kernels' launch parameters.
      num_warps_bwd, num_stages_bwd: the dq/dk/dv kernel's.
      fused_forward: compute the forward with ``lightning_fused_fwd`` (grid
        (B, N, segments, Hv/block_v), the output kernel's tile and launch parameters, the
        state carried from chunk to chunk) instead of the two phases: it writes and reads
        back no per-chunk states. The backward is the same either way.
      segment_chunks: chunks walked by one program of the fused forward (the sequence is
        split into segments of this many chunks, run in parallel); 0 picks enough segments
        for about ``FUSED_TARGET_PROGRAMS`` programs, each of at least
        ``MIN_SEGMENT_CHUNKS`` chunks. Ignored unless ``fused_forward``.

    All sizes are powers of two, at least 16 (the smallest tile Triton's dot accepts).
    """

    chunk: int = 64
    block_v: int = 128
    block_k_state: int = 64
    block_v_state: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_state: int = 4
    num_stages_state: int = 2
    num_warps_bwd: int = 8
    num_stages_bwd: int = 1
    fused_forward: bool = False
    segment_chunks: int = 0

    def __post_init__(self) -> None:
        for name in ("chunk", "block_v", "block_k_state", "block_v_state"):
            b = getattr(self, name)
            if not isinstance(b, int) or isinstance(b, bool) or b < MIN_DIM or b & (b - 1):
                raise ValueError(
                    f"{name} must be a power of two of at least {MIN_DIM} (Triton tiles are), "
                    f"got {b!r}; try 64"
                )
        for name in ("num_warps", "num_warps_state", "num_warps_bwd"):
            w = getattr(self, name)
            if not isinstance(w, int) or w <= 0 or w & (w - 1) or w > 32:
                raise ValueError(f"{name} must be a power of two in [1, 32], got {w!r}")
        for name in ("num_stages", "num_stages_state", "num_stages_bwd"):
            s = getattr(self, name)
            if not isinstance(s, int) or s <= 0:
                raise ValueError(f"{name} must be a positive int, got {s!r}")
        if not isinstance(self.fused_forward, bool):
            raise ValueError(f"fused_forward must be a bool, got {self.fused_forward!r}")
        sc = self.segment_chunks
        if not isinstance(sc, int) or isinstance(sc, bool) or sc < 0:
            raise ValueError(f"segment_chunks must be an int >= 0 (0: automatic), got {sc!r}")

    @classmethod
    def get_default(
        cls, head_dim: int | None = None, dtype=None, device_kind: str | None = None
    ) -> LightningConfig:
        """Sizes per dtype and head dim (``device_kind`` is accepted for a future table).

        16-bit inputs at H > 64: the fused forward with [128, 128] tiles and 8 warps, the
        fastest forward of ``scripts/lightning_sweep.py --grid`` on an H100 at T = 2K and
        128K (``experiments/results/lightning_fused_grid_h100_2026-11-23.json``: 1.5x the
        two-phase forward at 2K, 2x at 128K); the backward's sizes are the best
        forward+backward of an 80-config sweep at T = 2048
        (``experiments/results/lightning_sweep_2k_h100_2026-11-23.json``).
        16-bit inputs at H <= 64: 64-token chunks, the fused forward (1.7x the two-phase
        forward at T = 2K, 3.2x at 128K on an H100; ``lightning_grid_h64*_h100_2026-11-23``).
        float32 inputs take [C, 64] value tiles: their operand tiles are twice the bytes of
        16-bit ones and [64, 128] f32 tiles crowd the H100's shared memory; they keep the
        untuned 64-token chunks and the two-phase forward (not timed fused).
        """
        del device_kind
        if dtype is not None and jnp.dtype(dtype).itemsize > 2:
            # The dq/dk/dv kernel keeps two [C, H] f32 accumulators and [C, C] tiles live:
            # 8 warps keep them in registers at H = 128.
            return cls(block_v=64, num_warps=4, num_warps_bwd=8 if (head_dim or 128) > 64 else 4)
        if head_dim is not None and head_dim <= 64:
            return cls(block_v=64, num_warps=4, num_warps_bwd=4, fused_forward=True)
        return cls(chunk=128, block_v=128, block_k_state=128, block_v_state=64, num_warps=8,
                   num_stages=2, num_warps_state=8, num_warps_bwd=8, num_stages_bwd=2,
                   fused_forward=True)


# ----------------------------------------------------------------------------- in-kernel math


def _real_counts(c: jax.Array, chunk: int, t: int) -> tuple[jax.Array, jax.Array]:
    """(e [C] f32, L scalar f32): real tokens of chunk c up to and including each position,
    and in the whole chunk. Padded positions repeat L, so they add no decay."""
    valid = jnp.minimum(chunk, t - c * chunk).astype(jnp.float32)
    e = jnp.minimum(jnp.arange(1, chunk + 1, dtype=jnp.int32).astype(jnp.float32), valid)
    return e, valid


def _row_gate(ld, e, rel):
    """[C] f32: lambda^e_i for rows that still see the carried state, 0 after a reset."""
    gate = jnp.exp(ld * e)
    return gate if rel is None else jnp.where(rel == 0, gate, 0.0)


def _key_gate(ld, e, valid, rel):
    """(w [C] f32, gamma scalar f32): each key's weight in the chunk's final state, and the
    factor on the carried state (0 if the chunk contains a reset)."""
    w = jnp.exp(ld * (valid - e))
    gamma = jnp.exp(ld * valid)
    if rel is None:
        return w, gamma
    last = jnp.max(rel)
    return jnp.where(rel == last, w, 0.0), jnp.where(last == 0, gamma, 0.0)


def _intra_decay(ld, e, rel):
    """D [C, C] f32: lambda^(e_i - e_j) for j <= i in one run, else exactly 0."""
    chunk = e.shape[0]
    i = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    j = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    keep = i >= j
    if rel is not None:
        keep = jnp.logical_and(keep, rel[:, None] == rel[None, :])
    return jnp.exp(jnp.where(keep, ld * (e[:, None] - e[None, :]), NEG_BIG))


# ----------------------------------------------------------------------------- kernels


def _chunk_output(q, k, v, s, ld, e, rel, scale, precision):
    """[C, BV] f32: one chunk's output, intra-chunk [(scale Q K^T) . D] V plus the inter-chunk
    term from the state ``s`` entering it (used in the input dtype, as the states are stored)."""
    a = dot(q, k, tb=True, precision=precision) * (scale * _intra_decay(ld, e, rel))
    o = dot(a.astype(v.dtype), v, precision=precision)
    inter = dot(q, s.astype(q.dtype), precision=precision)
    return o + (scale * _row_gate(ld, e, rel))[:, None] * inter


def _next_state(s, k, v, ld, e, valid, rel, precision):
    """[BK, BV] f32: the state after a chunk, from the float32 state ``s`` entering it."""
    w, gamma = _key_gate(ld, e, valid, rel)
    kw = (k.astype(jnp.float32) * w[:, None]).astype(k.dtype)
    return gamma * s + dot(kw, v, ta=True, precision=precision)


def _states_kernel(
    ld_ref,  # [_LANES] f32: log lambda of this head, broadcast
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
        start = pl.multiple_of(c * chunk, chunk)
        k = k_ref[pl.ds(start, chunk), :]
        v = v_ref[pl.ds(start, chunk), :]
        rel = None if rel_ref is None else rel_ref[pl.ds(start, chunk)]
        e, valid = _real_counts(c, chunk, t)
        return _next_state(s, k, v, ld, e, valid, rel, precision)

    ht_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(jnp.float32))


def _fwd_kernel(
    ld_ref,  # [_LANES] f32: log lambda of this head, broadcast
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
    e, _ = _real_counts(c, chunk, t)
    o = _chunk_output(q_ref[...], k_ref[...], v_ref[...], s_ref[...], ld, e, rel, scale,
                      precision)
    o_ref[...] = o.astype(o_ref.dtype)


def _segment_states_kernel(
    ld_ref,  # [_LANES] f32: log lambda of this head, broadcast
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
        c = first + i
        start = pl.multiple_of(c * chunk, chunk)
        k = k_ref[pl.ds(start, chunk), :]
        v = v_ref[pl.ds(start, chunk), :]
        rel = None if rel_ref is None else rel_ref[pl.ds(start, chunk)]
        e, valid = _real_counts(c, chunk, t)
        return _next_state(s, k, v, ld, e, valid, rel, precision)

    whole = n_chunks % seg_chunks == 0
    steps = seg_chunks if whole else jnp.minimum(seg_chunks, n_chunks - first)
    local_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros(local_ref.shape, jnp.float32))


def _fused_fwd_kernel(
    ld_ref,  # [_LANES] f32: log lambda of this head, broadcast
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
        e, valid = _real_counts(c, chunk, t)
        o = _chunk_output(q, k, v, s, ld, e, rel, scale, precision)
        o_ref[pl.ds(start, chunk), :] = o.astype(o_ref.dtype)
        return _next_state(s, k, v, ld, e, valid, rel, precision)

    # A dynamic trip count only where the last segment is short.
    whole = n_chunks % seg_chunks == 0
    steps = seg_chunks if whole else jnp.minimum(seg_chunks, n_chunks - first)
    ht_ref[...] = lax.fori_loop(0, steps, body, h0_ref[...].astype(jnp.float32))


def _dstates_kernel(
    ld_ref,  # [_LANES] f32: log lambda of this head, broadcast
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
        e, valid = _real_counts(c, chunk, t)
        _, gamma = _key_gate(ld, e, valid, rel)
        qg = (q.astype(jnp.float32) * (scale * _row_gate(ld, e, rel))[:, None]).astype(q.dtype)
        return gamma * ds + dot(qg, do, ta=True, precision=precision)

    dh0_ref[...] = lax.fori_loop(0, n_chunks, body, dht_ref[...].astype(jnp.float32))


def _bwd_kernel(
    ld_ref,  # [_LANES] f32: log lambda of this head, broadcast
    rel_ref,  # [C] int32 run ids of this chunk, or None
    q_ref,  # [C, H]
    k_ref,  # [C, H]
    v_ref,  # [C, Hv]
    do_ref,  # [C, Hv] output cotangent
    s_ref,  # [H, Hv] state entering this chunk (input dtype)
    ds_ref,  # [H, Hv] cotangent of the state leaving this chunk (input dtype)
    tail_ref,  # [_LANES] f32: what this chunk's leaving state is worth at the end, or None
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
    e, valid = _real_counts(c, chunk, t)
    q, k = q_ref[...], k_ref[...]
    dt = q.dtype
    d = scale * _intra_decay(ld, e, rel)
    a = (dot(q, k, tb=True, precision=precision) * d).astype(dt)
    w, _ = _key_gate(ld, e, valid, rel)
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
            ds = ds.astype(jnp.float32) + tail_ref[0] * dht_ref[:, cols]
        s, ds = s_ref[:, cols].astype(dt), ds.astype(dt)
        da = da + dot(do, v, tb=True, precision=precision)
        dq_inter = dq_inter + dot(do, s, tb=True, precision=precision)
        dk_inter = dk_inter + dot(v, ds, tb=True, precision=precision)
        dv = dot(a, do, ta=True, precision=precision)
        dv = dv + w[:, None] * dot(k, ds, precision=precision)
        dv_ref[:, cols] = dv.astype(dv_ref.dtype)
    da = (da * d).astype(dt)
    dq = dot(da, k, precision=precision) + (scale * _row_gate(ld, e, rel))[:, None] * dq_inter
    dk = dot(da, q, ta=True, precision=precision) + w[:, None] * dk_inter
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)


# ----------------------------------------------------------------------------- launchers


def _plan(config: LightningConfig, t: int, h: int, hv: int) -> tuple[int, int, int, int]:
    """Static launch geometry: (chunk, BV of the output kernels, BK and BV of the states)."""
    chunk = min(config.chunk, max(MIN_DIM, pl.next_power_of_2(t)))
    return (
        chunk, min(config.block_v, hv), min(config.block_k_state, h),
        min(config.block_v_state, hv),
    )


def _run_states(q_dtype, k, v, ld, h0, rel, *, t, config, interpret, dstates=False,
                do=None, dht=None, scale=1.0):
    """The sequential kernels: states (forward) or, with ``dstates``, state cotangents.

    Forward: k [B, Tp, N, H], v [B, Tp, N, Hv], h0 [B, N, H, Hv] f32 ->
    (states [B, N, nC * H, Hv] in q_dtype, final state [B, N, H, Hv] f32).
    dstates: k is q, v is dO, h0 is dht -> (dS after each chunk, d initial state).
    """
    b, tp, n, h = k.shape
    hv = v.shape[-1]
    chunk, _, bk, bv = _plan(config, t, h, hv)
    n_chunks = tp // chunk
    in_specs = [
        pl.BlockSpec((None, _LANES), lambda bi, ni, kb, vb: (ni, 0)),
        None if rel is None else pl.BlockSpec((None, tp), lambda bi, ni, kb, vb: (bi, 0)),
        pl.BlockSpec((None, tp, None, bk), lambda bi, ni, kb, vb: (bi, 0, ni, kb)),
        pl.BlockSpec((None, tp, None, bv), lambda bi, ni, kb, vb: (bi, 0, ni, vb)),
        pl.BlockSpec((None, None, bk, bv), lambda bi, ni, kb, vb: (bi, ni, kb, vb)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, n_chunks * h, bv), lambda bi, ni, kb, vb: (bi, ni, 0, vb)),
        pl.BlockSpec((None, None, bk, bv), lambda bi, ni, kb, vb: (bi, ni, kb, vb)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, n, n_chunks * h, hv), q_dtype),
        jax.ShapeDtypeStruct((b, n, h, hv), jnp.float32),
    ]
    common = dict(chunk=chunk, t=t, head_dim=h, precision=dot_precision(q_dtype))
    if dstates:
        kernel = functools.partial(_dstates_kernel, scale=scale, **common)
        name = "lightning_dstates"
    else:
        kernel = functools.partial(_states_kernel, **common)
        name = "lightning_states"
    return pl.pallas_call(
        kernel,
        grid=(b, n, h // bk, hv // bv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps_state, num_stages=config.num_stages_state
        ),
        interpret=interpret,
        name=name,
    )(ld, rel, k, v, h0)


def _run_fwd(q, k, v, ld, rel, states, *, t, scale, config, interpret):
    """Output kernel: o [B, Tp, N, Hv] in q's dtype."""
    b, tp, n, h = q.shape
    hv = v.shape[-1]
    chunk, bv, _, _ = _plan(config, t, h, hv)
    in_specs = [
        pl.BlockSpec((None, _LANES), lambda bi, ni, c, vb: (ni, 0)),
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
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="lightning_fwd",
    )(ld, rel, q, k, v, states)


def _segments(config: LightningConfig, b: int, n: int, n_chunks: int, hv: int, bv: int
              ) -> tuple[int, int]:
    """(chunks per segment, number of segments) of the fused forward."""
    g = config.segment_chunks
    if g == 0:
        wanted = -(-FUSED_TARGET_PROGRAMS // (b * n * (hv // bv)))
        g = max(-(-n_chunks // wanted), MIN_SEGMENT_CHUNKS)
    g = min(g, n_chunks)
    return g, -(-n_chunks // g)


def _segment_locals(k, v, ld, rel, *, t, chunk, seg_chunks, count, config, interpret):
    """[B, N, count, H, Hv] f32: the state each of the first ``count`` segments leaves when
    it starts from zero (kernel ``lightning_segment_states``)."""
    b, tp, n, h = k.shape
    hv = v.shape[-1]
    _, _, bk, bv = _plan(config, t, h, hv)
    return pl.pallas_call(
        functools.partial(_segment_states_kernel, chunk=chunk, t=t, seg_chunks=seg_chunks,
                          precision=dot_precision(k.dtype)),
        grid=(b, n, count, h // bk, hv // bv),
        in_specs=[
            pl.BlockSpec((None, _LANES), lambda bi, ni, si, kb, vb: (ni, 0)),
            None if rel is None else pl.BlockSpec((None, tp), lambda bi, ni, si, kb, vb: (bi, 0)),
            pl.BlockSpec((None, tp, None, bk), lambda bi, ni, si, kb, vb: (bi, 0, ni, kb)),
            pl.BlockSpec((None, tp, None, bv), lambda bi, ni, si, kb, vb: (bi, 0, ni, vb)),
        ],
        out_specs=pl.BlockSpec((None, None, None, bk, bv),
                               lambda bi, ni, si, kb, vb: (bi, ni, si, kb, vb)),
        out_shape=jax.ShapeDtypeStruct((b, n, count, h, hv), jnp.float32),
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps_state, num_stages=config.num_stages_state
        ),
        interpret=interpret,
        name="lightning_segment_states",
    )(ld, rel, k, v)


def _span_carries(log_decay, rel, *, b, t, span, count):
    """[B, N, count] f32: the factor each of the first ``count`` spans of ``span`` tokens puts
    on the state entering it: lambda^(real tokens), 0 if a document starts inside (chunks
    and segments alike)."""
    real = jnp.clip(t - span * jnp.arange(count), 0, span).astype(jnp.float32)
    gamma = jnp.exp(log_decay[None, :, None] * real[None, None, :])  # [1, N, count]
    gamma = jnp.broadcast_to(gamma, (b, log_decay.shape[0], count))
    if rel is not None:  # a reset anywhere in the span drops the entering state
        runs = rel[:, : count * span]  # a short last span: zeros (no reset) fill it up
        runs = jnp.pad(runs, ((0, 0), (0, count * span - runs.shape[1])))
        runs = runs.reshape(b, count, span)
        gamma = jnp.where((jnp.max(runs, axis=-1) == 0)[:, None, :], gamma, 0.0)
    return gamma


def _seeded_starts(h0, local, gamma):
    """[B, N, S, H, Hv]: the state entering each segment, given the segments' own states and
    carries ([B, N, S - 1, ...] for all but the last) and the state ``h0`` entering the first.
    Segment s leaves ``gamma_s * S_in + local_s``: an inclusive associative scan of these
    affine maps, seeded with ``h0``."""
    a = jnp.concatenate([jnp.ones((*gamma.shape[:2], 1)), gamma], axis=2)
    return decayed_state_scan(a, jnp.concatenate([h0[:, :, None], local], axis=2), axis=2)


def _segment_starts(k, v, ld, h0, rel, log_decay, *, t, chunk, seg_chunks, n_seg, config,
                    interpret):
    """[B, N, S, H, Hv] f32: the state entering each segment of the fused forward."""
    if n_seg == 1:
        return h0[:, :, None]
    local = _segment_locals(k, v, ld, rel, t=t, chunk=chunk, seg_chunks=seg_chunks,
                            count=n_seg - 1, config=config, interpret=interpret)
    gamma = _span_carries(log_decay, rel, b=k.shape[0], t=t, span=seg_chunks * chunk,
                          count=n_seg - 1)
    return _seeded_starts(h0, local, gamma)


def _run_fused_fwd(q, k, v, ld, h0, rel, log_decay, *, t, scale, config, interpret,
                   with_states=False, starts=None):
    """One-kernel forward (per segment): (o [B, Tp, N, Hv] in q's dtype, final state
    [B, N, H, Hv] f32, ``with_states``: the state entering each chunk [B, N, nC * H, Hv] in
    q's dtype, as ``_run_states`` writes it, else None). ``starts`` (the segments' entering
    states, [B, N, S, H, Hv] f32) replaces ``h0`` where the caller has them."""
    b, tp, n, h = q.shape
    hv = v.shape[-1]
    chunk, bv, _, _ = _plan(config, t, h, hv)
    seg_chunks, n_seg = _segments(config, b, n, tp // chunk, hv, bv)
    if starts is None:
        starts = _segment_starts(k, v, ld, h0, rel, log_decay, t=t, chunk=chunk,
                                 seg_chunks=seg_chunks, n_seg=n_seg, config=config,
                                 interpret=interpret)
    whole = lambda width: pl.BlockSpec(  # noqa: E731
        (None, tp, None, width), lambda bi, ni, si, vb: (bi, 0, ni, 0))
    column = pl.BlockSpec((None, tp, None, bv), lambda bi, ni, si, vb: (bi, 0, ni, vb))
    state = pl.BlockSpec((None, None, None, h, bv), lambda bi, ni, si, vb: (bi, ni, si, 0, vb))
    in_specs = [
        pl.BlockSpec((None, _LANES), lambda bi, ni, si, vb: (ni, 0)),
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
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="lightning_fused_fwd",
    )(ld, rel, q, k, v, starts)
    return o, leaving[:, :, -1], (states[0] if with_states else None)


def _run_bwd(q, k, v, do, ld, rel, states, dstates, *, t, scale, config, interpret,
             tail=None, dht=None):
    """dq/dk/dv kernel: (dq, dk, dv) padded, in the inputs' dtype. ``dht`` [B, N, H, Hv] f32
    with ``tail`` [B, N, nC] f32: a final-state cotangent that ``dstates`` lacks, added to
    chunk c's as ``tail[c] * dht`` (tail: the product of the later chunks' carries)."""
    b, tp, n, h = q.shape
    hv = v.shape[-1]
    chunk, bv, _, _ = _plan(config, t, h, hv)
    row = pl.BlockSpec((None, chunk, None, h), lambda bi, ni, c: (bi, c, ni, 0))
    row_v = pl.BlockSpec((None, chunk, None, hv), lambda bi, ni, c: (bi, c, ni, 0))
    state = pl.BlockSpec((None, None, h, hv), lambda bi, ni, c: (bi, ni, c, 0))
    seeded = dht is not None
    if seeded:
        tail = jnp.broadcast_to(tail[..., None], (*tail.shape, _LANES))
    in_specs = [
        pl.BlockSpec((None, _LANES), lambda bi, ni, c: (ni, 0)),
        None if rel is None else pl.BlockSpec((None, chunk), lambda bi, ni, c: (bi, c)),
        row, row, row_v, row_v, state, state,
        pl.BlockSpec((None, None, None, _LANES), lambda bi, ni, c: (bi, ni, c, 0))
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
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps_bwd, num_stages=config.num_stages_bwd
        ),
        interpret=interpret,
        name="lightning_bwd",
    )(ld, rel, q, k, v, do, states, dstates, tail if seeded else None, dht)


# ----------------------------------------------------------------------------- custom VJP


def _lanes(log_decay: jax.Array) -> jax.Array:
    return jnp.broadcast_to(log_decay.astype(jnp.float32)[:, None], (log_decay.shape[0], _LANES))


def _forward(q, k, v, log_decay, h0, rel, t, scale, config, interpret, *, with_states):
    """(o, final state, per-chunk states or None): the fused or two-phase forward; the
    two-phase one always has the states, the fused one writes them only ``with_states``."""
    ld = _lanes(log_decay)
    if config.fused_forward:
        return _run_fused_fwd(q, k, v, ld, h0, rel, log_decay, t=t, scale=scale,
                              config=config, interpret=interpret, with_states=with_states)
    states, ht = _run_states(q.dtype, k, v, ld, h0, rel, t=t, config=config, interpret=interpret)
    o = _run_fwd(
        q, k, v, ld, rel, states, t=t, scale=scale, config=config, interpret=interpret
    )
    return o, ht, states


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _lightning(q, k, v, log_decay, h0, rel, t, scale, config, interpret):
    o, ht, _ = _forward(q, k, v, log_decay, h0, rel, t, scale, config, interpret,
                        with_states=False)
    return o, ht


def _lightning_fwd(q, k, v, log_decay, h0, rel, t, scale, config, interpret):
    # The per-chunk states (the input dtype, (T/C) H Hv per head: a third of q, k, v at
    # C = 128, H = Hv) are saved for the backward: the fused forward writes them as it walks,
    # for much less than a recomputation by the states kernel.
    o, ht, states = _forward(q, k, v, log_decay, h0, rel, t, scale, config, interpret,
                             with_states=True)
    return (o, ht), (q, k, v, log_decay, h0, rel, states)


def _lightning_bwd(t, scale, config, interpret, res, cts):
    q, k, v, log_decay, h0, rel, states = res
    do, dht = cts
    do = do.astype(q.dtype)
    ld = _lanes(log_decay)
    dstates, dh0 = _run_states(
        q.dtype, q, do, ld, dht.astype(jnp.float32), rel, t=t, config=config,
        interpret=interpret, dstates=True, scale=scale,
    )
    dq, dk, dv = _run_bwd(
        q, k, v, do, ld, rel, states, dstates, t=t, scale=scale, config=config,
        interpret=interpret,
    )
    return dq, dk, dv, jnp.zeros_like(log_decay), dh0.astype(h0.dtype), None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def _lightning_jit(q, k, v, log_decay, initial_state, segment_ids, *, scale, config, interpret):
    b, t, n, h = q.shape
    hv = v.shape[-1]
    chunk = _plan(config, t, h, hv)[0]
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
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
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
    if config is None:
        config = LightningConfig.get_default(q.shape[-1], q.dtype)
    if not isinstance(config, LightningConfig):
        raise ValueError(f"config must be a LightningConfig, got {type(config).__name__}")
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
    chunk = _plan(config, t, h, hv)[0]
    tp = round_up(t, chunk)
    rel = None if segment_ids is None else chunk_run_ids(segment_ids, tp, chunk)
    return t, chunk, tp, rel, _lanes(log_decay)


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
    seg_chunks, n_seg = _segments(config, b, n, tp // chunk, hv, _plan(config, t, h, hv)[1])
    local = _segment_locals(k, v, ld, rel, t=t, chunk=chunk, seg_chunks=seg_chunks,
                            count=n_seg, config=config, interpret=interpret)
    gamma = _span_carries(log_decay, rel, b=b, t=t, span=seg_chunks * chunk, count=n_seg)
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
    starts = _seeded_starts(s_in.astype(jnp.float32), local, gamma)
    o, _, states = _run_fused_fwd(q, k, v, ld, None, rel, log_decay, t=t, scale=scale,
                                  config=config, interpret=interpret, with_states=True,
                                  starts=starts)
    return o[:, :t], (q, k, v, log_decay, rel, states)


def block_state_grad(res, do, *, t, scale, config, interpret=False):
    """Phase 3: (the cotangent [B, N, H, Hv] f32 of the incoming state, given the output's
    and none on the outgoing state, residuals for :func:`block_backward`)."""
    q, k, v, log_decay, rel, states = res
    b, tp, n, h = q.shape
    do = pad_axis(do.astype(q.dtype), 1, tp)
    dstates, ds_in = _run_states(
        q.dtype, q, do, _lanes(log_decay), jnp.zeros((b, n, h, v.shape[-1]), jnp.float32), rel,
        t=t, config=config, interpret=interpret, dstates=True, scale=scale,
    )
    return ds_in, (res, do, dstates)


def block_backward(res, ds_out, *, t, scale, config, interpret=False):
    """Phase 4: (dq, dk, dv) of the block, given the outgoing state's cotangent ``ds_out``
    [B, N, H, Hv] (learned from the blocks after this one; None: none)."""
    (q, k, v, log_decay, rel, states), do, dstates = res
    b, tp = q.shape[:2]
    tail = None
    if ds_out is not None:
        chunk = _plan(config, t, q.shape[-1], v.shape[-1])[0]
        gamma = _span_carries(log_decay, rel, b=b, t=t, span=chunk, count=tp // chunk)
        later = jnp.concatenate([gamma[..., 1:], jnp.ones_like(gamma[..., :1])], axis=-1)
        tail = jnp.flip(jnp.cumprod(jnp.flip(later, -1), axis=-1), -1)  # later carries
        ds_out = ds_out.astype(jnp.float32)
    dq, dk, dv = _run_bwd(q, k, v, do, _lanes(log_decay), rel, states, dstates, t=t,
                          scale=scale, config=config, interpret=interpret, tail=tail,
                          dht=ds_out)
    return dq[:, :t], dk[:, :t], dv[:, :t]
