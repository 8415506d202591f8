"""Helpers shared by the Triton-lowered GPU kernels: log2-domain constants, matmul, padding.

Used by the flash-attention kernels (:mod:`~pallas_kernels.gpu.flash_common`,
:mod:`~pallas_kernels.gpu.flash_fwd`, :mod:`~pallas_kernels.gpu.flash_bwd`), the split-K decode
kernel (:mod:`~pallas_kernels.gpu.decode`) and the lightning kernels
(:mod:`~pallas_kernels.gpu.lightning_common` and the modules beside it). Kernels import these
from here, never from one another.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common.masks import MASK_VALUE, finite_or_zero, visible

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# The running row maximum starts above MASK_VALUE, so exp2(MASK_VALUE - M_INIT) == 0: a row
# whose keys are all masked so far accumulates nothing, without a second select on p.
M_INIT = 0.5 * MASK_VALUE
# Triton's dot needs every tile dimension to be at least 16.
MIN_BLOCK = 16
# Why config block sizes are checked as they are (shown in the configs' error messages).
TILE_RULE = f"Triton tiles are; {MIN_BLOCK} is the smallest its dot accepts"


def compiler_params(config: Any, pass_: str | None = None) -> plgpu.CompilerParams:
    """Triton parameters of one launch from its config: ``num_warps`` and ``num_stages``, or
    for a ``pass_`` with its own (``"bwd"``, ``"state"``) ``num_warps_<pass_>`` and
    ``num_stages_<pass_>``, as the configs name them."""
    suffix = "" if pass_ is None else f"_{pass_}"
    return plgpu.CompilerParams(num_warps=getattr(config, f"num_warps{suffix}"),
                                num_stages=getattr(config, f"num_stages{suffix}"))


def round_up(length: int, block: int) -> int:
    """``length`` rounded up to a whole number of ``block``s."""
    return -(-length // block) * block


def pad_axis(x: jax.Array | None, axis: int, length: int, mode: str = "constant"):
    """Pads ``axis`` of x at the end to ``length`` (zeros, or repeating the edge value)."""
    if x is None or x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def kernel_head_dim(h: int) -> int:
    """The head dim a kernel runs at: ``h`` rounded up to a power of two >= 16 (Triton tiles
    are powers of two). The wrappers pad q/k (or v) with zero columns, which change no logit
    and give zero output columns, and slice the padding off again."""
    return max(MIN_BLOCK, 1 << max(h - 1, 0).bit_length())


MAX_HEAD_DIM = 256


def pad_head(x: jax.Array | None, h: int) -> jax.Array | None:
    """x [..., d] zero-padded on the last axis to ``h``."""
    return pad_axis(x, x.ndim - 1, h) if x is not None else None


def log2_logits(raw: jax.Array, scale: float, soft_cap: float | None):
    """Logits in the log2 domain from raw q.k (f32), and tanh(.) for the soft-cap gradient."""
    if soft_cap is None:
        return raw * (scale * LOG2E), None
    t = jnp.tanh(raw * (scale / soft_cap))
    return t * (soft_cap * LOG2E), t


def backward_row_terms(out: jax.Array, lse: jax.Array, d_out: jax.Array, d_lse: jax.Array):
    """The flash backward's per-row terms [B, T, N] float32: ``lse2``, the log2-domain LSE (0
    for rows that see no key, which keeps their p finite), and ``delta = rowsum(dO * O) -
    dLSE`` (the LSE cotangent folds in because d lse / d z = p)."""
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = delta - d_lse.astype(jnp.float32)
    lse2 = jnp.where(jnp.isfinite(lse), lse * LOG2E, 0.0)
    return lse2, delta


def dot(a: jax.Array, b: jax.Array, *, ta: bool = False, tb: bool = False, precision=None):
    """a @ b in the inputs' dtype with f32 accumulation; ``ta``/``tb`` transpose an operand."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(
        a, b, dims, precision=precision, preferred_element_type=jnp.float32
    )


def dot_precision(dtype) -> lax.Precision | None:
    """float32 inputs get true f32 matmuls (IEEE, not TF32) so results match the reference."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def split_range(split, length, s: int, t: int, spec, keys_per_split: int, block_kv: int):
    """(split_lo, split_hi, first, n_tiles) of split-K decode split ``split``: its key range
    [split_lo, split_hi) cut at the sequence's length and the cache's real length ``s``, and
    the tiles ``first .. n_tiles - 1`` a row can see (a left window skips the earliest)."""
    split_lo = split * keys_per_split
    split_hi = jnp.minimum(jnp.minimum(split_lo + keys_per_split, length), s)
    first = jnp.int32(0)
    if spec.window_left is not None:
        # The earliest query (position length - T) sees nothing before this key.
        lo = length - t - spec.window_left
        first = lax.div(jnp.maximum(lo - split_lo, 0), jnp.int32(block_kv))
    n_tiles = lax.div(jnp.maximum(split_hi - split_lo, 0) + block_kv - 1, jnp.int32(block_kv))
    return split_lo, split_hi, first, n_tiles


def row_block(rb, rb_size: int, n_rows: int):
    """(rows [Rb], row_mask, tile_mask) of row block ``rb``: the masks are None when the
    rows divide evenly, else they mark the real rows (padding rows are neither loaded nor
    stored)."""
    rows = rb * rb_size + jnp.arange(rb_size, dtype=jnp.int32)
    row_mask = None if n_rows % rb_size == 0 else (rows < n_rows)
    return rows, row_mask, None if row_mask is None else row_mask[:, None]


def finish_split(step, first, n_tiles, o_ref, lse_ref, row_mask, tile_mask) -> None:
    """Runs a split's online softmax ``step`` over tiles ``first .. n_tiles - 1`` and stores
    its normalized output and LSE (masked to the real rows)."""
    rb_size, width = o_ref.shape
    carry = (
        jnp.full((rb_size,), M_INIT, jnp.float32),
        jnp.zeros((rb_size,), jnp.float32),
        jnp.zeros((rb_size, width), jnp.float32),
    )
    o, lse = softmax_finish(*lax.fori_loop(first, n_tiles, step, carry))
    plgpu.store(o_ref, o, mask=tile_mask)
    plgpu.store(lse_ref, lse, mask=row_mask)


def decode_tile(spec, q_pos, start, start_c, split_hi, length, t: int, block_kv: int):
    """(full, mask) of one split-K decode tile: ``mask`` [R, block_kv] the keys each row sees
    (in the split, causal/window, not seen by the previous shifted tile); ``full`` whether
    every row sees the whole tile (then its values need no finite_or_zero)."""
    full = (start_c == start) & (start + block_kv <= jnp.minimum(split_hi, length - t + 1))
    if spec.window_left is not None:
        full = full & (start >= length - 1 - spec.window_left)
    kv_idx = (start_c + jnp.arange(block_kv, dtype=jnp.int32))[None, :]
    mask = (kv_idx >= start) & (kv_idx < split_hi)
    pos_mask = visible(spec, q_pos, kv_idx)
    return full, mask if pos_mask is None else mask & pos_mask


def split_step(load, raw_logits, *, spec, q_pos, split_lo, split_hi, length, s_eff: int,
               t: int, block_kv: int, scale: float, soft_cap: float | None, precision):
    """The online-softmax step over tile ``i`` of a split-K decode split, for ``finish_split``.

    ``load(start)`` reads the keys (any pytree) and values of the ``block_kv`` cache rows from
    ``start``; ``raw_logits(keys)`` gives the [R, block_kv] unscaled q.k. The cache's last
    tile is shifted back to end at ``s_eff`` (no out-of-bounds load); keys it shares with the
    previous tile are masked. A tile some row cannot wholly see (past the length:
    uninitialized slots; the shifted last tile; the causal or window edge) reads its values
    through ``finite_or_zero``: p is 0 there, but 0 * NaN is NaN. Tiles every row sees whole
    skip it.
    """
    def step(i, carry):
        start = split_lo + i * block_kv
        start_c = jnp.minimum(start, s_eff - block_kv)
        keys, v = load(start_c)
        full, mask = decode_tile(spec, q_pos, start, start_c, split_hi, length, t, block_kv)
        v = lax.cond(full, lambda v: v, finite_or_zero, v)
        z, _ = log2_logits(raw_logits(keys), scale, soft_cap)
        return softmax_step(*carry, jnp.where(mask, z, MASK_VALUE), v, precision)
    return step


def softmax_step(m, row_sum, acc, z, v, precision):
    """One online-softmax step (log2 domain) over masked logits z [R, bk] and values v."""
    m_new = jnp.maximum(m, z.max(axis=-1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(z - m_new[:, None])
    row_sum = alpha * row_sum + p.sum(axis=-1)
    acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v, precision=precision)
    return m_new, row_sum, acc


def softmax_finish(m, row_sum, acc):
    """(output, natural-log LSE) of an online softmax; a row that saw no key gives 0 and -inf
    (the public contract for "saw no key", not a logit)."""
    seen = row_sum > 0.0
    l_safe = jnp.where(seen, row_sum, 1.0)
    return acc / l_safe[:, None], jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)
