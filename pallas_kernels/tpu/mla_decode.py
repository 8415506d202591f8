"""MLA latent decode for TPU as a Mosaic TPU Pallas kernel: split-K over the ``[c ; k_R]`` cache.

**Lowered for TPU (v4, v5e, v5p, v6e), verified in interpret mode, never run on a TPU.**

Absorbed multi-head latent attention decodes all N heads against one cache of
``D = d_c + d_R`` values per token that is the keys (all D columns) and the values (the first
``d_c``). Each grid step reads one ``[block_kv, D]`` tile (its last dim is the full width,
legal for any D) once for every query row: the N * T rows of a sequence (row ``r`` is query
``r // N`` of head ``r % N``) form one tile, padded to a multiple of 8.

Grid ``(B, P, tiles_per_split)``: P splits of the key axis (parallel), the tiles of a split
(the reduction, last). Lengths arrive by scalar prefetch; the index map clamps the key block
into the range a sequence can see, so tiles past its end issue no copy and are skipped. Each
split writes its partial output (normalized within the split) and LSE (``-inf`` where a row
saw no key); the caller merges them by LSE. Forward only. Tiles that some row cannot wholly
see read their values through :func:`~pallas_kernels.common.masks.finite_or_zero`: NaN in an
uninitialized slot past the length never reaches a row.
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

from pallas_kernels.common.checks import check_latent_decode_inputs
from pallas_kernels.common.masks import MASK_VALUE, MaskSpec, finite_or_zero, visible
from pallas_kernels.tpu._common import (
    NN,
    NUM_LANES,
    NUM_SUBLANES,
    clamp_block,
    compiler_params,
    round_up,
    tile_logits,
)
from pallas_kernels.tpu.decode import TpuDecodeConfig

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
SEMANTICS = ("parallel", "parallel", "arbitrary")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TpuMlaDecodeConfig(TpuDecodeConfig):
    """Tiling of the TPU latent decode kernel (untuned: no TPU to tune on): the fields and
    rules of :class:`~pallas_kernels.tpu.decode.TpuDecodeConfig`, with smaller default tiles
    (each is [block_kv, d_c + d_R] wide)."""

    block_kv: int = 256
    keys_per_split: int = 2048

    @classmethod
    def get_default(cls) -> TpuMlaDecodeConfig:
        return cls()


def _kernel(
    len_ref,  # [B] int32 (SMEM): valid cache length per sequence
    q_ref,  # [Rp, D] query rows of one sequence
    row_t_ref,  # [Rp, NUM_LANES] int32: query index t of each row, lane-broadcast
    kv_ref,  # [bkv, D] cache tile: keys, and values in its first d_c columns
    o_ref,  # [Rp, d_c] f32 out
    lse_ref,  # [Rp, NUM_LANES] f32 out
    m_ref, l_ref, acc_ref,  # scratch: [Rp, NUM_LANES], [Rp, NUM_LANES], [Rp, d_c] f32
    *, spec: MaskSpec, scale: float, v_dim: int, t: int, s: int, bkv: int,
    tiles_per_split: int,
):
    bi, split, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[bi]
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

    # Every row sees every key of the tile: values are used as they are. Other tiles read
    # them through finite_or_zero, since p is 0 on a masked key but 0 * NaN is NaN
    # (uninitialized slots past the length; the overhang of the last tile, NaN in interpret
    # mode).
    full = start + bkv <= jnp.minimum(hi, length - t + 1)
    if spec.window_left is not None:
        full = jnp.logical_and(full, start >= length - 1 - spec.window_left)

    def step(partial: bool):
        kv = kv_ref[...]
        z, _ = tile_logits(q_ref[...], kv, scale=scale, soft_cap=None)  # [Rp, bkv]
        kv_idx = start + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)
        mask = kv_idx < hi
        pos_mask = visible(spec, length - t + row_t_ref[:, :1], kv_idx)
        if pos_mask is not None:
            mask = jnp.logical_and(mask, pos_mask)
        z = jnp.where(mask, z, MASK_VALUE)
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(z, axis=-1, keepdims=True))
        p = jnp.where(mask, jnp.exp(z - m_next[:, :1]), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=-1, keepdims=True)
        m_ref[...] = m_next
        values = finite_or_zero(kv[:, :v_dim]) if partial else kv[:, :v_dim]
        pv = lax.dot_general(p.astype(kv.dtype), values, NN, preferred_element_type=jnp.float32)
        acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv

    pl.when(jnp.logical_and(needed, full))(lambda: step(False))
    pl.when(jnp.logical_and(needed, jnp.logical_not(full)))(lambda: step(True))

    @pl.when(i == tiles_per_split - 1)
    def _finish():
        row_sum = l_ref[...]
        seen = row_sum > 0.0
        l_safe = jnp.where(seen, row_sum, 1.0)
        o_ref[...] = acc_ref[...] / l_safe[:, :1]
        lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(l_safe), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("v_dim", "spec", "scale", "config", "interpret"))
def _partials(q, cache, kv_lengths, *, v_dim, spec, scale, config, interpret):
    b, t, n, d = q.shape
    s = cache.shape[1]
    rows = n * t
    rp = round_up(rows, NUM_SUBLANES)
    bkv = min(config.block_kv, round_up(s, NUM_SUBLANES))
    n_tiles = -(-s // bkv)
    tiles_per_split = max(1, min(config.keys_per_split // bkv, n_tiles))
    p = -(-n_tiles // tiles_per_split)
    q_rows = jnp.pad(q.reshape(b, rows, d), ((0, 0), (0, rp - rows), (0, 0)))
    row_t = jnp.minimum(jnp.arange(rp, dtype=jnp.int32) // n, t - 1)
    row_t = jnp.broadcast_to(row_t[:, None], (rp, NUM_LANES))

    def kv_map(bi, si, i, len_ref):
        length = len_ref[bi]
        hi_blk = lax.div(jnp.minimum(length, s) + bkv - 1, bkv)
        lo_blk = jnp.int32(0)
        if spec.window_left is not None:
            lo_blk = lax.div(jnp.maximum(length - t - spec.window_left, 0), bkv)
        return bi, clamp_block(si * tiles_per_split + i, lo_blk, hi_blk), 0

    kernel = functools.partial(_kernel, spec=spec, scale=scale, v_dim=v_dim, t=t, s=s, bkv=bkv,
                               tiles_per_split=tiles_per_split)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, p, tiles_per_split),
            in_specs=[
                pl.BlockSpec((None, rp, d), lambda bi, si, i, _: (bi, 0, 0)),
                pl.BlockSpec((rp, NUM_LANES), lambda *_: (0, 0)),
                pl.BlockSpec((None, bkv, d), kv_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, rp, v_dim), lambda bi, si, i, _: (si, bi, 0, 0)),
                pl.BlockSpec((None, None, rp, NUM_LANES), lambda bi, si, i, _: (si, bi, 0, 0)),
            ],
            scratch_shapes=[
                pltpu.VMEM((rp, NUM_LANES), jnp.float32),
                pltpu.VMEM((rp, NUM_LANES), jnp.float32),
                pltpu.VMEM((rp, v_dim), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((p, b, rp, v_dim), jnp.float32),
            jax.ShapeDtypeStruct((p, b, rp, NUM_LANES), jnp.float32),
        ],
        compiler_params=compiler_params(SEMANTICS, interpret),
        interpret=interpret,
        name="attnlab_tpu_mla_latent_decode",
    )(kv_lengths, q_rows, row_t, cache)
    o = o[:, :, :rows].reshape(p, b, t, n, v_dim)
    return o, lse[:, :, :rows, 0].reshape(p, b, t, n)


def decode_partials(
    q: jax.Array, cache: jax.Array, kv_lengths: jax.Array, *, v_dim: int, spec: MaskSpec,
    scale: float, config: TpuMlaDecodeConfig | None = None, interpret: bool | Any = False,
) -> tuple[jax.Array, jax.Array]:
    """Split-K partial latent decode on TPU. Forward only.

    Args:
      q: [B, T, N, D] latent-space queries; cache: [B, S, D] the ``[c ; k_R]`` cache.
      kv_lengths: [B] int32 valid lengths (query t of sequence b at kv_lengths[b] - T + t).
      v_dim: d_c, the cache's leading value columns. spec: causal (optionally a left
        window). scale: logits scale.
      config: :class:`TpuMlaDecodeConfig`. interpret: False to compile with Mosaic; an
        ``InterpretParams`` (or True) for TPU interpret mode on CPU.

    Returns:
      (o_parts [P, B, T, N, v_dim] float32, lse_parts [P, B, T, N] float32).

    Raises:
      ValueError: inconsistent shapes or dtypes.
    """
    check_latent_decode_inputs(q, cache, kv_lengths, v_dim, SUPPORTED_DTYPES)
    config = TpuMlaDecodeConfig.get_default() if config is None else config
    if not isinstance(config, TpuMlaDecodeConfig):
        raise ValueError(f"config must be a TpuMlaDecodeConfig, got {type(config).__name__}")
    if interpret is True:
        interpret = pltpu.InterpretParams()
    return _partials(q, cache, jnp.asarray(kv_lengths, jnp.int32), v_dim=int(v_dim), spec=spec,
                     scale=float(scale), config=config, interpret=interpret)
