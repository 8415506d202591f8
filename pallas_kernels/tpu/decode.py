"""Split-K decode attention for TPU as a Mosaic TPU Pallas kernel.

**Lowered for TPU (v4, v5e, v5p, v6e), verified in interpret mode, never run on a TPU.** No
TPU is available to the project: the kernel is run on CPU through
``interpret=pltpu.InterpretParams()`` and compared there with the reference, and its Mosaic
lowering is run from CPU for each generation (``tests/pallas_kernels/test_tpu_lowering.py``).
It has never been compiled for or timed on a real TPU.

Layout, chosen so the K/V cache is not copied: the public ``[B, S, K, H]`` cache is viewed
(a free reshape) as ``[B, S, K * H]``, and one kv head's tile is the block ``[block_kv, H]`` at
column block ``kh``: its last two dims are (a multiple of 8, H), legal on TPU when H is a
multiple of 128 (or K == 1, where H is the full last dim). The DMA engine does the strided
gather. A cache whose head dim breaks that rule (K > 1 and H not a multiple of 128) is
zero-padded to the next multiple of 128 inside the wrapper, a copy of the cache on every call
(see :func:`cache_head_dim`): zero key columns (q padded alike) change no logit, zero value
columns give output columns that are sliced off. Keys and values are laid out separately, so
each pads only if its own head count and dim need it.

Query heads are packed by query group: Kc = lcm(Kk, Kv) groups of G = N / Kc heads, each
reading one key head and one value head (Kc = K for GQA/MQA; query head n reads key head
n // (N / Kk) and value head n // (N / Kv)). A group's G heads and its T queries are the
``G * T`` rows of one query tile (padded to a multiple of 8), so each K/V tile is read once
for all of them (once per group that reads it when Kk != Kv).

Grid ``(B, Kc, P, tiles_per_split)``: P splits of the key axis (parallel) and the tiles of a
split (the reduction, last). Per-sequence lengths arrive by scalar prefetch (SMEM); the
index map clamps the key block into the range a sequence can see (its length, and its window
if any), so tiles past a sequence's end issue no DMA and are skipped by ``pl.when``. Each
split writes its partial result (output normalized within the split, natural-log LSE, ``-inf``
where the row saw no key); the caller merges them with ``attnlab.ops.merge_n``. Masked logits
use the finite ``MASK_VALUE``, and tiles that some row cannot wholly see read values through
:func:`~pallas_kernels.common.masks.finite_or_zero`: NaN or inf in a cache slot past the
length (an uninitialized cache) never reaches a row. Forward only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common.checks import (
    DefaultConfig,
    check_config,
    check_decode_inputs,
    group_rows,
    head_groups,
    ungroup_rows,
)
from pallas_kernels.common.masks import MASK_VALUE, MaskSpec, finite_or_zero, visible
from pallas_kernels.common.static_args import check_int
from pallas_kernels.tpu._common import (
    NN,
    NUM_LANES,
    NUM_SUBLANES,
    clamp_block,
    compiler_params,
    head_of,
    pad_axis,
    round_up,
    tile_logits,
)

CAUSAL = MaskSpec(causal=True)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
# Grid (B, K, splits, tiles of a split): the last axis is the reduction.
DECODE_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TpuDecodeConfig(DefaultConfig):
    """Tiling of the TPU decode kernel (untuned: no TPU to tune on).

    Attributes:
      block_kv: keys per tile, a multiple of 8 (the sublane count: keys are the tile's
        second-minor axis). A cache shorter than a tile is one tile.
      keys_per_split: keys per split of the key axis (each split is a parallel grid row
        and writes one partial result), a multiple of ``block_kv``.
    """

    block_kv: int = 512
    keys_per_split: int = 4096

    def __post_init__(self) -> None:
        for name in ("block_kv", "keys_per_split"):
            object.__setattr__(self, name, check_int(name, getattr(self, name)))
        if self.block_kv % NUM_SUBLANES:
            raise ValueError(
                f"block_kv={self.block_kv} is not legal on TPU: it must be a multiple of "
                f"{NUM_SUBLANES} (the sublane count); try {round_up(self.block_kv, NUM_SUBLANES)}"
            )
        if self.keys_per_split % self.block_kv:
            raise ValueError(
                f"keys_per_split={self.keys_per_split} must be a multiple of block_kv="
                f"{self.block_kv}; try {round_up(self.keys_per_split, self.block_kv)}"
            )


def cache_head_dim(heads: int, dim: int) -> int:
    """The head dim a [B, S, heads, dim] cache is read at: ``dim`` where a [block_kv, dim]
    tile of its [B, S, heads * dim] view is legal on TPU (one head, or ``dim`` a multiple of
    128, the lane width), else ``dim`` rounded up to a multiple of 128 (the wrapper zero-pads
    the cache, a copy per call)."""
    return dim if heads == 1 or dim % NUM_LANES == 0 else round_up(dim, NUM_LANES)


# ----------------------------------------------------------------------------- kernel


def split_decode_step(
    len_ref, row_t_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, *,
    load, batch: jax.Array, split: jax.Array, i: jax.Array, spec: MaskSpec, scale: float,
    soft_cap: float | None, t: int, s: int, bkv: int, tiles_per_split: int,
):
    """One grid step of a split-K decode: tile ``i`` of split ``split`` of sequence ``batch``.

    Shared by this kernel and the MLA latent decode
    (:mod:`pallas_kernels.tpu.mla_decode`). ``load()`` returns the step's
    ``(q [Rp, H], k [bkv, H], v [bkv, Hv])`` tiles; it is called only on tiles that some row
    can see. Refs as in :func:`_decode_kernel`.
    """
    length = len_ref[batch]
    start = (split * tiles_per_split + i) * bkv
    hi = jnp.minimum(length, s)

    @pl.when(i == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    needed = start < hi
    if spec.window_left is not None:
        needed = jnp.logical_and(needed, start + bkv > length - t - spec.window_left)

    # Every row sees every key of the tile (none past the length or the causal or window edge):
    # values are used as they are. Other tiles read them through finite_or_zero, since p is 0
    # on a masked key but 0 * NaN is NaN (uninitialized cache slots; the overhang of the last
    # tile, NaN in interpret mode).
    full = start + bkv <= jnp.minimum(hi, length - t + 1)
    if spec.window_left is not None:
        full = jnp.logical_and(full, start >= length - 1 - spec.window_left)

    def step(partial: bool):
        q, k, v = load()
        z, _ = tile_logits(q, k, scale=scale, soft_cap=soft_cap)  # [Rp, bkv]
        kv_idx = start + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)
        q_pos = length - t + row_t_ref[:, :1]  # [Rp, 1]
        mask = kv_idx < hi
        pos_mask = visible(spec, q_pos, kv_idx)
        if pos_mask is not None:
            mask = jnp.logical_and(mask, pos_mask)
        z = jnp.where(mask, z, MASK_VALUE)
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(z, axis=-1, keepdims=True))  # [Rp, NUM_LANES]
        # A row with nothing visible so far has m_next == MASK_VALUE == z: zero p explicitly.
        p = jnp.where(mask, jnp.exp(z - m_next[:, :1]), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=-1, keepdims=True)
        m_ref[...] = m_next
        if partial:
            v = finite_or_zero(v)
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
        acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv

    pl.when(jnp.logical_and(needed, full))(lambda: step(False))
    pl.when(jnp.logical_and(needed, jnp.logical_not(full)))(lambda: step(True))

    @pl.when(i == tiles_per_split - 1)
    def _finish():
        row_sum = l_ref[...]
        seen = row_sum > 0.0
        l_safe = jnp.where(seen, row_sum, 1.0)
        o_ref[...] = acc_ref[...] / l_safe[:, :1]
        # -inf here is the public contract for a row that sees no key, not a logit.
        lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(l_safe), -jnp.inf)


def split_tiling(
    group: int, t: int, s: int, config: TpuDecodeConfig
) -> tuple[int, int, int, int, int, jax.Array]:
    """The split-K layout of a program's ``group * t`` query rows (t-major) over ``s`` keys:
    (rows, Rp (rows padded to the sublane count), bkv (keys per tile), tiles per split, P
    (splits), row_t ([Rp, NUM_LANES] int32: the query index t of each row, lane-broadcast;
    padded rows repeat the last))."""
    rows = group * t
    rp = round_up(rows, NUM_SUBLANES)
    bkv = min(config.block_kv, round_up(s, NUM_SUBLANES))
    n_tiles = -(-s // bkv)
    tiles_per_split = max(1, min(config.keys_per_split // bkv, n_tiles))
    p = -(-n_tiles // tiles_per_split)
    row_t = jnp.minimum(jnp.arange(rp, dtype=jnp.int32) // group, t - 1)
    row_t = jnp.broadcast_to(row_t[:, None], (rp, NUM_LANES))
    return rows, rp, bkv, tiles_per_split, p, row_t


def clamped_kv_block(len_ref, batch, split, i, *, spec: MaskSpec, t: int, s: int, bkv: int,
                     tiles_per_split: int) -> jax.Array:
    """The key block a split-K decode step reads, clamped into the range sequence ``batch``
    can see (its length, and its window if any): tiles outside it repeat a neighbour's
    block index, so they issue no copy."""
    length = len_ref[batch]
    hi_blk = lax.div(jnp.minimum(length, s) + bkv - 1, jnp.int32(bkv))
    lo_blk = jnp.int32(0)
    if spec.window_left is not None:
        lo_blk = lax.div(jnp.maximum(length - t - spec.window_left, 0), jnp.int32(bkv))
    return clamp_block(split * tiles_per_split + i, lo_blk, hi_blk)


def _decode_kernel(
    len_ref,  # [B] int32 (SMEM, scalar prefetch): valid cache length per sequence
    q_ref,  # [Rp, H] query rows of one (batch, query group); row r = (t, g), t-major
    row_t_ref,  # [Rp, NUM_LANES] int32: query index t of each row, lane-broadcast
    k_ref,  # [bkv, H] key tile of the group's key head
    v_ref,  # [bkv, Hv] value tile of the group's value head
    o_ref,  # [Rp, Hv] f32 out: this split's output, normalized within the split
    lse_ref,  # [Rp, NUM_LANES] f32 out: this split's LSE (-inf: saw no key), lane-broadcast
    m_ref,  # [Rp, NUM_LANES] f32 scratch: running row max
    l_ref,  # [Rp, NUM_LANES] f32 scratch: running row sum of exp
    acc_ref,  # [Rp, Hv] f32 scratch: unnormalized output
    **static,
):
    split_decode_step(
        len_ref, row_t_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref,
        load=lambda: (q_ref[...], k_ref[...], v_ref[...]), batch=pl.program_id(0),
        split=pl.program_id(2), i=pl.program_id(3), **static)


@functools.partial(
    jax.jit, static_argnames=("spec", "scale", "soft_cap", "config", "interpret")
)
def _partials(q, k, v, kv_lengths, *, spec, scale, soft_cap, config, interpret):
    b, t, n, h_in = q.shape
    s, kk, kv, hv_in = k.shape[1], k.shape[2], v.shape[2], v.shape[3]
    kc, g, rk, rv = head_groups(n, kk, kv)  # programs run per query group
    h, hv = cache_head_dim(kk, h_in), cache_head_dim(kv, hv_in)
    rows, rp, bkv, tiles_per_split, p, row_t = split_tiling(g, t, s, config)

    # [B, Kc, T*G, H] (t-major rows), padded to Rp rows (and to the key cache's head dim): a
    # small copy of q.
    q_rows = group_rows(q, kc)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rp - rows), (0, h - h_in)))
    # Views (no copy unless a head dim is padded): head c is the column block c of width H.
    k2 = pad_axis(k, 3, h).reshape(b, s, kk * h)
    v2 = pad_axis(v, 3, hv).reshape(b, s, kv * hv)

    def kv_block(bi, si, i, len_ref):
        return clamped_kv_block(len_ref, bi, si, i, spec=spec, t=t, s=s, bkv=bkv,
                                tiles_per_split=tiles_per_split)

    def k_map(bi, ci, si, i, len_ref):
        return bi, kv_block(bi, si, i, len_ref), head_of(ci, rk)

    def v_map(bi, ci, si, i, len_ref):
        return bi, kv_block(bi, si, i, len_ref), head_of(ci, rv)

    def row_map(bi, ci, si, i, len_ref):
        return bi, ci, 0, 0

    def out_map(bi, ci, si, i, len_ref):
        return si, bi, ci, 0, 0

    kernel = functools.partial(
        _decode_kernel, spec=spec, scale=scale, soft_cap=soft_cap, t=t, s=s, bkv=bkv,
        tiles_per_split=tiles_per_split,
    )
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, kc, p, tiles_per_split),
            in_specs=[
                pl.BlockSpec((None, None, rp, h), row_map),
                pl.BlockSpec((rp, NUM_LANES), lambda *_: (0, 0)),
                pl.BlockSpec((None, bkv, h), k_map),
                pl.BlockSpec((None, bkv, hv), v_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, None, rp, hv), out_map),
                pl.BlockSpec((None, None, None, rp, NUM_LANES), out_map),
            ],
            scratch_shapes=[
                pltpu.VMEM((rp, NUM_LANES), jnp.float32),
                pltpu.VMEM((rp, NUM_LANES), jnp.float32),
                pltpu.VMEM((rp, hv), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((p, b, kc, rp, hv), jnp.float32),
            jax.ShapeDtypeStruct((p, b, kc, rp, NUM_LANES), jnp.float32),
        ],
        compiler_params=compiler_params(DECODE_SEMANTICS, interpret),
        interpret=interpret,
        name="attnlab_tpu_decode_splitk",
    )(kv_lengths, q_rows, row_t, k2, v2)
    # [P, B, Kc, T*G, ...] -> [P, B, T, N, ...]
    return ungroup_rows(o[:, :, :, :rows, :hv_in], t), ungroup_rows(lse[:, :, :, :rows, 0], t)


def decode_partials(
    q: jax.Array, k: jax.Array, v: jax.Array,
    kv_lengths: jax.Array | None,
    *,
    spec: MaskSpec = CAUSAL,
    scale: float,
    soft_cap: float | None = None,
    config: TpuDecodeConfig | None = None,
    interpret: bool | Any = False,
) -> tuple[jax.Array, jax.Array]:
    """Split-K partial decode attention on TPU (Mosaic Pallas). Forward only.

    Args:
      q: [B, T, N, H] the last T tokens' queries of each sequence (float32 or bfloat16).
      k: [B, S, Kk, H] key cache; v: [B, S, Kv, Hv] value cache; N a multiple of Kk and of Kv
        (query head n reads key head n // (N / Kk), value head n // (N / Kv)). Any H, Hv >= 1;
        read in place when its head count is 1 or its dim a multiple of 128, else
        zero-padded to a multiple of 128 inside (a copy of that cache per call; see
        :func:`cache_head_dim`).
      kv_lengths: [B] int32 valid cache length per sequence (None: all S). Query t of
        sequence b sits at position kv_lengths[b] - T + t.
      spec: the static position mask; decode uses causal, optionally with a left window.
      scale: logits scale; soft_cap: c for c * tanh(logits / c), or None.
      config: :class:`TpuDecodeConfig`, default ``TpuDecodeConfig.get_default()``.
      interpret: False to compile with Mosaic (TPU only); an ``InterpretParams`` (or True for
        the default one) for TPU interpret mode on CPU, the only mode verified so far.

    Returns:
      (o_parts [P, B, T, N, Hv] float32, lse_parts [P, B, T, N] float32): per split of the key
      axis, the output normalized within the split and its natural-log LSE (-inf, output 0,
      where the row sees no key in the split). Combine with ``attnlab.ops.merge_n``.

    Raises:
      ValueError: inconsistent shapes, dtypes or kv_lengths.

    Example:
      >>> o_parts, lse_parts = decode_partials(q, k, v, lengths, scale=0.125, interpret=True)
    """
    lengths = check_decode_inputs(q, k, v, kv_lengths, dtypes=SUPPORTED_DTYPES)
    config = check_config(config, TpuDecodeConfig)
    if interpret is True:
        interpret = pltpu.InterpretParams()
    return _partials(
        q, k, v, lengths, spec=spec, scale=float(scale),
        soft_cap=None if soft_cap is None else float(soft_cap), config=config,
        interpret=interpret,
    )
