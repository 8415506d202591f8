"""Lightning attention on GPU, what its Triton kernels share: config, decay math, geometry.

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
small decay, so lambda near 0 is as stable as lambda = 1, and lambda^0 is 1 also at
lambda = 0 (:func:`~pallas_kernels.common.lightning.decay_power`). Segment resets come in as
:func:`pallas_kernels.common.lightning.chunk_run_ids` (one int per token). Zero factors (D off
the mask, a row after a reset, an earlier document's key, a dropped state) select instead of
multiplying, and operands summed over masked tokens are read through
:func:`~pallas_kernels.common.masks.finite_or_zero`: a token a row cannot see never reaches
it, even NaN.

This module holds what the kernels of :mod:`~pallas_kernels.gpu.lightning_fwd` and
:mod:`~pallas_kernels.gpu.lightning_bwd` and the entry points of
:mod:`~pallas_kernels.gpu.lightning_chunk` share: :class:`LightningConfig`, the in-kernel decay
factors of the equations above (:func:`real_counts`, :func:`row_gate`, :func:`key_gate`,
:func:`intra_decay`), the launch geometry (:func:`launch_plan`, :func:`lanes`), the launcher of
the two sequential state kernels (:func:`run_state_pass`: states forward, state cotangents
backward), the XLA glue that carries states across spans of chunks
(:func:`span_carries`, :func:`seeded_starts`) and the head-dim padding of the entry points
(:func:`kernel_dims`, :func:`kernel_config`, :func:`pad_state`, :func:`unpad`): any H and Hv
from 1 to 256 run at the next power of two >= 16, zero-padded and sliced back inside.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.checks import check_config
from pallas_kernels.common.lightning import (
    check_lightning_kernel_inputs,
    decay_power,
    decayed_state_scan,
)
from pallas_kernels.common.static_args import check_int
from pallas_kernels.gpu._common import (
    MAX_HEAD_DIM,
    TILE_RULE,
    compiler_params,
    dot_precision,
    kernel_head_dim,
    pad_axis,
    pad_head,
)

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# The smallest tile Triton's dot accepts: config sizes and kernel head dims are at least this.
MIN_DIM = 16
# exp() of this is exactly 0 in float32: masked decay entries, never -inf (no inf - inf).
NEG_BIG = -1e30
# log_decay is handed to the kernels broadcast over this many lanes (a tile Triton accepts).
LANES = 16
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
        rules = {name: dict(minimum=MIN_DIM, power_of_two=True, why=TILE_RULE)
                 for name in ("chunk", "block_v", "block_k_state", "block_v_state")}
        rules |= {name: dict(maximum=32, power_of_two=True)
                  for name in ("num_warps", "num_warps_state", "num_warps_bwd")}
        rules |= {name: {} for name in ("num_stages", "num_stages_state", "num_stages_bwd")}
        rules["segment_chunks"] = dict(minimum=0, why="0: automatic")
        for name, rule in rules.items():
            object.__setattr__(self, name, check_int(name, getattr(self, name), **rule))
        if not isinstance(self.fused_forward, (bool, np.bool_)):
            raise ValueError(f"fused_forward must be a bool, got {self.fused_forward!r}")
        object.__setattr__(self, "fused_forward", bool(self.fused_forward))

    @classmethod
    def get_default(
        cls, head_dim: int | None = None, dtype=None, device_kind: str | None = None
    ) -> LightningConfig:
        """Sizes per dtype and the kernel's q/k head dim (``device_kind`` is accepted for a
        future table). ``head_dim`` is the padded one the kernels run at
        (:func:`kernel_dims`; :func:`kernel_config` passes it): 64 for H = 40, 128 for H = 80.

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
        H = 256 (q/k head dims 129 to 256): untuned and never timed; smaller chunks (64, 32
        in float32) and [C, 64] value tiles, because the forward and dq/dk/dv kernels hold
        whole [C, H] rows of q and k (and two [C, H] float32 accumulators) per program.
        """
        del device_kind
        wide = head_dim is not None and head_dim > 128
        if wide:
            f32 = dtype is not None and jnp.dtype(dtype).itemsize > 2
            return cls(chunk=32 if f32 else 64, block_v=64, num_warps=8, num_warps_bwd=8,
                       fused_forward=not f32)
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


def real_counts(c: jax.Array, chunk: int, t: int) -> tuple[jax.Array, jax.Array]:
    """(e [C] f32, L scalar f32): real tokens of chunk c up to and including each position,
    and in the whole chunk. Padded positions repeat L, so they add no decay."""
    valid = jnp.minimum(chunk, t - c * chunk).astype(jnp.float32)
    e = jnp.minimum(jnp.arange(1, chunk + 1, dtype=jnp.int32).astype(jnp.float32), valid)
    return e, valid


def row_gate(ld, e, rel):
    """[C] f32: lambda^e_i for rows that still see the carried state, 0 after a reset."""
    gate = jnp.exp(ld * e)
    return gate if rel is None else jnp.where(rel == 0, gate, 0.0)


def key_gate(ld, e, valid, rel):
    """(w [C] f32, gamma scalar f32): each key's weight in the chunk's final state (0 for the
    padding past the real tokens), and the factor on the carried state (0 if the chunk
    contains a reset)."""
    w = decay_power(ld, valid - e)
    w = jnp.where(jnp.arange(e.shape[0], dtype=jnp.int32).astype(jnp.float32) < valid, w, 0.0)
    gamma = decay_power(ld, valid)
    if rel is None:
        return w, gamma
    last = jnp.max(rel)
    return jnp.where(rel == last, w, 0.0), jnp.where(last == 0, gamma, 0.0)


def intra_decay(ld, e, rel):
    """D [C, C] f32: lambda^(e_i - e_j) for j <= i in one run, else exactly 0."""
    chunk = e.shape[0]
    i = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    j = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    keep = i >= j
    if rel is not None:
        keep = jnp.logical_and(keep, rel[:, None] == rel[None, :])
    age = e[:, None] - e[None, :]  # lambda^0 = 1 also at decay 0 (0 * log 0 is NaN)
    return jnp.exp(jnp.where(keep, jnp.where(age == 0, 0.0, ld * age), NEG_BIG))


# ----------------------------------------------------------------------------- launch geometry


def launch_plan(config: LightningConfig, t: int, h: int, hv: int) -> tuple[int, int, int, int]:
    """Static launch geometry: (chunk, BV of the output kernels, BK and BV of the states)."""
    chunk = min(config.chunk, max(MIN_DIM, pl.next_power_of_2(t)))
    return (
        chunk, min(config.block_v, hv), min(config.block_k_state, h),
        min(config.block_v_state, hv),
    )


def run_state_pass(kernel, name: str, q_dtype, k, v, ld, h0, rel, *, t, config, interpret):
    """Launches a sequential state kernel: grid (B, N, H/BK, Hv/BV), one [BK, BV] state tile
    per program walking the chunks in order (``lightning_states``) or in reverse
    (``lightning_dstates``).

    k [B, Tp, N, H], v [B, Tp, N, Hv], h0 [B, N, H, Hv] f32 -> (a state per chunk
    [B, N, nC * H, Hv] in q_dtype, the last carry [B, N, H, Hv] f32). ``kernel`` takes the refs
    (ld, rel, k, v, h0, per-chunk out, last out) and the keywords chunk, t, head_dim, precision.
    """
    b, tp, n, h = k.shape
    hv = v.shape[-1]
    chunk, _, bk, bv = launch_plan(config, t, h, hv)
    n_chunks = tp // chunk
    in_specs = [
        pl.BlockSpec((None, LANES), lambda bi, ni, kb, vb: (ni, 0)),
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
    kernel = functools.partial(
        kernel, chunk=chunk, t=t, head_dim=h, precision=dot_precision(q_dtype)
    )
    return pl.pallas_call(
        kernel,
        grid=(b, n, h // bk, hv // bv),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(config, "state"),
        interpret=interpret,
        name=name,
    )(ld, rel, k, v, h0)


# ----------------------------------------------------------------------------- state across spans


def lanes(log_decay: jax.Array) -> jax.Array:
    """[N, LANES] f32: log_decay [N] broadcast over the lanes the kernels read it from."""
    return jnp.broadcast_to(log_decay.astype(jnp.float32)[:, None], (log_decay.shape[0], LANES))


def span_carries(log_decay, rel, *, b, t, span, count):
    """[B, N, count] f32: the factor each of the first ``count`` spans of ``span`` tokens puts
    on the state entering it: lambda^(real tokens), 0 if a document starts inside (chunks
    and segments alike)."""
    real = jnp.clip(t - span * jnp.arange(count), 0, span).astype(jnp.float32)
    gamma = decay_power(log_decay[None, :, None], real[None, None, :])  # [1, N, count]
    gamma = jnp.broadcast_to(gamma, (b, log_decay.shape[0], count))
    if rel is not None:  # a reset anywhere in the span drops the entering state
        runs = rel[:, : count * span]  # a short last span: zeros (no reset) fill it up
        runs = jnp.pad(runs, ((0, 0), (0, count * span - runs.shape[1])))
        runs = runs.reshape(b, count, span)
        gamma = jnp.where((jnp.max(runs, axis=-1) == 0)[:, None, :], gamma, 0.0)
    return gamma


def seeded_starts(h0, local, gamma):
    """[B, N, S, H, Hv]: the state entering each segment, given the segments' own states and
    carries ([B, N, S - 1, ...] for all but the last) and the state ``h0`` entering the first.
    Segment s leaves ``gamma_s * S_in + local_s``: an inclusive associative scan of these
    affine maps, seeded with ``h0``."""
    a = jnp.concatenate([jnp.ones((*gamma.shape[:2], 1)), gamma], axis=2)
    return decayed_state_scan(a, jnp.concatenate([h0[:, :, None], local], axis=2), axis=2)


def kernel_dims(h: int, hv: int) -> tuple[int, int]:
    """(H, Hv) the kernels run at: each rounded up to a power of two >= 16 (Triton tiles are
    powers of two). The entry points zero-pad q, k (H) and v (Hv) to them and slice the
    padding off again: zero q/k columns add nothing to q.k, zero v columns give zero output
    and state columns, and a zero-padded state stays zero where it was padded."""
    return kernel_head_dim(h), kernel_head_dim(hv)


def kernel_config(config: LightningConfig | None, h: int, dtype) -> LightningConfig:
    """``config``, or the default for the q/k head dim ``h`` padded as the kernels run it
    (Hv is tiled by ``block_v``; H alone sizes the rows a program holds). ``ValueError`` if
    ``config`` is not a :class:`LightningConfig`."""
    return check_config(config, LightningConfig, kernel_head_dim(h), dtype)


def pad_state(s: jax.Array | None, h: int, hv: int) -> jax.Array | None:
    """[B, N, H0, Hv0] zero-padded to [B, N, h, hv] (None stays None)."""
    return None if s is None else pad_head(pad_axis(s, 2, h), hv)


def unpad(x: jax.Array, *sizes: int) -> jax.Array:
    """x with its last ``len(sizes)`` axes cut to ``sizes``; x itself where nothing was
    padded (no slice at the kernels' own head dims)."""
    tail = x.shape[x.ndim - len(sizes):]
    if tuple(tail) == tuple(sizes):
        return x
    return x[(Ellipsis, *(slice(0, n) for n in sizes))]


def check_args(q, k, v, log_decay, initial_state, segment_ids) -> None:
    """``check_lightning_kernel_inputs`` with the head dims the Triton kernels take, 1 to
    ``MAX_HEAD_DIM`` (the entry points of lightning_chunk and lightning_phases)."""
    check_lightning_kernel_inputs(
        q, k, v, log_decay, initial_state, segment_ids, dtypes=SUPPORTED_DTYPES,
        max_head_dim=MAX_HEAD_DIM, kernels="lightning kernels",
        padding=f"padded inside to a power of two >= {MIN_DIM}",
    )
