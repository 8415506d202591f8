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
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common.masks import MaskSpec, visible

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


def tile_logits(
    a: jax.Array, b: jax.Array, *, scale: float, soft_cap: float | None
) -> tuple[jax.Array, jax.Array]:
    """(capped, raw) f32 logits ``a @ b^T * scale`` of one tile; raw is what the cap saw."""
    raw = lax.dot_general(a, b, NT, preferred_element_type=jnp.float32) * scale
    if soft_cap is None:
        return raw, raw
    return soft_cap * jnp.tanh(raw / soft_cap), raw


def tile_mask(
    spec: MaskSpec,
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array | None,
    k_seg: jax.Array | None,
    k_index: jax.Array,
    kv_len: int | None,
) -> jax.Array | None:
    """Visibility of one tile, or None when every pair is visible.

    Any orientation: the arguments broadcast against each other. ``k_index`` holds the keys'
    indices into the padded key axis; keys at or past ``kv_len`` are padding and never
    visible (``kv_len=None``: the key axis has no padding).
    """
    mask = visible(spec, q_pos, k_pos, q_seg, k_seg)
    if kv_len is not None:
        valid = k_index < kv_len
        mask = valid if mask is None else jnp.logical_and(mask, valid)
    return mask


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
