"""Helpers shared by the Mosaic TPU kernels: tiling constants, tile logits and masks, params.

Used by the flash-attention kernels (:mod:`~pallas_kernels.tpu.flash`,
:mod:`~pallas_kernels.tpu.flash_bwd`), the split-K decode kernel
(:mod:`~pallas_kernels.tpu.decode`) and the lightning kernels
(:mod:`~pallas_kernels.tpu.lightning_chunk`). Kernels import these from here, never from one
another.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common.masks import MaskSpec, tile_mask

NUM_LANES = 128
NUM_SUBLANES = 8

# Grid (B, N, q blocks, kv blocks): the kv axis is the reduction (forward and dQ).
ROW_SEMANTICS = ("parallel", "parallel", "parallel", "arbitrary")

# dot_general dimension numbers: A @ B, A @ B^T, A^T @ B.
NN = (((1,), (0,)), ((), ()))
NT = (((1,), (1,)), ((), ()))
TN = (((0,), (0,)), ((), ()))


# ----------------------------------------------------------------------------- tile helpers


def round_up(x: int, m: int) -> int:
    """``x`` rounded up to a multiple of ``m``."""
    return -(-x // m) * m


def pad_axis(x: jax.Array, axis: int, length: int, mode: str = "constant") -> jax.Array:
    """``x`` padded at the end of ``axis`` to ``length`` (zeros, or ``mode="edge"`` repeating
    the last value); ``x`` itself, no copy, when it is that long already."""
    pad = length - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, mode=mode)


def tile_logits(
    a: jax.Array, b: jax.Array, *, scale: float, soft_cap: float | None
) -> tuple[jax.Array, jax.Array]:
    """(capped, raw) f32 logits ``a @ b^T * scale`` of one tile; raw is what the cap saw."""
    raw = lax.dot_general(a, b, NT, preferred_element_type=jnp.float32) * scale
    if soft_cap is None:
        return raw, raw
    return soft_cap * jnp.tanh(raw / soft_cap), raw


def ref_tile_mask(
    spec: MaskSpec, refs: tuple[Any, Any, Any, Any], j: jax.Array, bkv: int, kv_len: int, *,
    keys_on_lanes: bool = True, q_block: tuple[jax.Array, int, int] | None = None,
) -> jax.Array | None:
    """:func:`~pallas_kernels.common.masks.tile_mask` of key block ``j`` (``bkv`` keys, of
    ``kv_len`` real ones), read from the kernel's (q_pos, kv_pos, q_seg, kv_seg) refs.

    ``keys_on_lanes``: logits [bq, bkv]; the query refs are lane-broadcast [bq, NUM_LANES], the
    key refs [1, bkv]. Else the transpose (logits [bkv, bq]). Segment refs may be None.
    ``q_block``: (i, bq, q_len), query block i of bq rows, of q_len real ones: padded query
    rows are masked too (kernels that sum over queries need it; others slice them off).
    """
    q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref = refs
    if keys_on_lanes:
        k_index = j * bkv + lax.broadcasted_iota(jnp.int32, (1, bkv), 1)
        q_col, kv_col = slice(None, 1), slice(None)
    else:
        k_index = j * bkv + lax.broadcasted_iota(jnp.int32, (bkv, 1), 0)
        q_col, kv_col = slice(None), slice(None, 1)
    q_index = q_len = None
    if q_block is not None and q_block[2] % q_block[1]:
        i, bq, q_len = q_block
        q_shape, q_axis = ((bq, 1), 0) if keys_on_lanes else ((1, bq), 1)
        q_index = i * bq + lax.broadcasted_iota(jnp.int32, q_shape, q_axis)
    return tile_mask(
        spec,
        q_pos_ref[:, q_col],
        kv_pos_ref[:, kv_col],
        None if q_seg_ref is None else q_seg_ref[:, q_col],
        None if kv_seg_ref is None else kv_seg_ref[:, kv_col],
        k_index,
        None if kv_len % bkv == 0 else kv_len,
        q_index,
        q_len,
    )


def compiler_params(semantics: tuple[str, ...], interpret: Any) -> pltpu.CompilerParams | None:
    """Mosaic parameters: grid dimension semantics, compiled runs only.

    TPU interpret mode in JAX 0.10.2 does not account for the grid axis that ``vmap`` adds
    (it zips the user's semantics with the batched grid and fails), so interpreted calls
    leave the semantics out; the interpreter then runs every axis in order.
    """
    if interpret:
        return None
    return pltpu.CompilerParams(dimension_semantics=semantics)


def clamp_block(j: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Block index ``j`` clamped into the non-empty range ``[lo, hi)``.

    Used by index maps: grid steps outside the range (whose tiles are EMPTY) ask for the
    block already in VMEM, so the pipeline issues no copy for them.
    """
    return jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi - 1, 0))


def head_of(i: jax.Array, group: int) -> jax.Array:
    """The head that query head (or query group) ``i`` reads when ``group`` consecutive ones
    share it: ``i // group``, as a truncating division (``i`` is a non-negative grid index;
    floor division would lower to sign and remainder arithmetic), and ``i`` itself when
    ``group`` is 1."""
    return i if group == 1 else lax.div(i, jnp.int32(group))


def q_row_specs(
    gk: int, gv: int, nq: int, per_batch: bool, bq: int, bkv: int, segmented: bool
) -> tuple[Any, Any, Any, list[pl.BlockSpec | None]]:
    """Index maps of a kernel over grid (B, N, q blocks, kv blocks) with scalar prefetch
    (kind, kv_lo, kv_hi), whose kv steps are clamped into [kv_lo, kv_hi) of their q block
    (the forward and dQ kernels).

    gk, gv: query heads per key head and per value head (query head n reads key head
    ``n // gk`` and value head ``n // gv``); nq: q blocks; per_batch: the metadata has a row
    per batch (segment ids). Returns (q_map, k_map, v_map, mask_specs): q_map for
    [B, N, T_pad, .] blocks of bq rows, k_map / v_map for [B, Kk, S_pad, H] / [B, Kv, S_pad, Hv]
    blocks of bkv keys, and the specs of the mask inputs (q_pos [T_pad, NUM_LANES], kv_pos
    [1, S_pad], q_seg [B, T_pad, NUM_LANES], kv_seg [B, 1, S_pad]), the segment specs None
    unless ``segmented``.
    """

    def kv_j(bi, i, j, lo_ref, hi_ref):
        r = (bi if per_batch else 0) * nq + i
        return clamp_block(j, lo_ref[r], hi_ref[r])

    def q_map(bi, ni, i, j, kind_ref, lo_ref, hi_ref):
        return bi, ni, i, 0

    def k_map(bi, ni, i, j, kind_ref, lo_ref, hi_ref):
        return bi, head_of(ni, gk), kv_j(bi, i, j, lo_ref, hi_ref), 0

    def v_map(bi, ni, i, j, kind_ref, lo_ref, hi_ref):
        return bi, head_of(ni, gv), kv_j(bi, i, j, lo_ref, hi_ref), 0

    mask_specs = [
        pl.BlockSpec((bq, NUM_LANES), lambda bi, ni, i, j, *_: (i, 0)),
        pl.BlockSpec((1, bkv), lambda bi, ni, i, j, kd, lo, hi: (0, kv_j(bi, i, j, lo, hi))),
    ]
    if not segmented:
        return q_map, k_map, v_map, [*mask_specs, None, None]
    return q_map, k_map, v_map, [
        *mask_specs,
        pl.BlockSpec((None, bq, NUM_LANES), lambda bi, ni, i, j, *_: (bi, i, 0)),
        pl.BlockSpec(
            (None, 1, bkv), lambda bi, ni, i, j, kd, lo, hi: (bi, 0, kv_j(bi, i, j, lo, hi))
        ),
    ]
