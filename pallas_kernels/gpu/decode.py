"""Split-K decode attention on GPU: a Pallas kernel lowered to Triton (CPU-interpretable).

Decoding asks few queries (T = 1..64 per sequence) against a long K/V cache, so the work is a
streaming read of the cache and the kernel's only job is to read every K/V byte once, with
enough programs in flight to saturate memory bandwidth:

* The grid is ``(B, K * row_blocks, P)``: one program per (sequence, kv head, split of the key
  axis). A split covers ``keys_per_split`` consecutive cache entries and walks them in tiles
  of ``block_kv`` keys.
* GQA/MQA is packed: the G = N / K query heads of a kv head and the T queries form the
  ``G * T`` rows of one query tile (row ``r`` is query ``r // G`` of head ``r % G`` of the
  group), padded to at least 16 rows for ``tl.dot``. Each K/V tile is therefore loaded once for
  all of them. Only when ``G * T`` exceeds ``block_rows`` are the rows split over several
  programs (each then re-reads its K/V).
* Ragged batches: a sequence's valid length ``kv_lengths[b]`` bounds the tile loop (tiles past
  it are never loaded), and with a local window tiles before the window are skipped too.
* The cache is never padded or copied: the last tile of the key axis is shifted back to end
  at ``S`` and its keys already seen by the previous tile are masked out, so no load is out of
  bounds for any ``S >= 16``.

Each program writes its split's partial result: the output normalized within the split and
the split's log-sum-exp (``-inf`` if it saw no key). The caller combines the P partials
exactly by their LSE (``attnlab.ops.merge_n``); kernels never import ops, so the merge is not
here. Forward only: there is no VJP (decoding is inference).

Semantics of the mask: query ``t`` of sequence ``b`` sits at position
``kv_lengths[b] - T + t`` (the T queries are the sequence's last T tokens) and sees cache key
``j`` iff ``j < kv_lengths[b]`` and :func:`~pallas_kernels.common.masks.visible` allows the
pair (causal, optional window). Masked logits use the finite ``MASK_VALUE``, and tiles that
some row cannot wholly see read values through
:func:`~pallas_kernels.common.masks.finite_or_zero`: NaN or inf in a cache slot past
``kv_lengths`` (an uninitialized cache) never reaches a row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common.checks import (
    check_config,
    check_decode_inputs,
    group_rows,
    head_groups,
    ungroup_rows,
)
from pallas_kernels.common.masks import MaskSpec
from pallas_kernels.common.static_args import check_int
from pallas_kernels.gpu._common import (
    MAX_HEAD_DIM,
    MIN_BLOCK,
    TILE_RULE,
    compiler_params,
    dot,
    dot_precision,
    finish_split,
    kernel_head_dim,
    pad_axis,
    pad_head,
    round_up,
    row_block,
    split_range,
    split_step,
)

CAUSAL = MaskSpec(causal=True)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Splits are sized so that about this many programs run (several waves on an H100's 132 SMs,
# so the last wave's tail is short), within [MIN_SPLIT, MAX_SPLIT] keys per program.
TARGET_PROGRAMS = 512
MIN_SPLIT = 512
MAX_SPLIT = 8192


def _is_pow2(x: int) -> bool:
    return x > 0 and not x & (x - 1)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DecodeConfig:
    """Tiling and launch parameters of the Triton decode kernel (untuned starting points).

    Attributes:
      block_kv: keys per inner step; a power of two, at least 16. Shrunk to fit short caches.
      keys_per_split: keys per program (the split-K chunk), a multiple of ``block_kv``; None
        picks it from the shape (about ``TARGET_PROGRAMS`` programs, within
        [``MIN_SPLIT``, ``MAX_SPLIT``] keys), see :meth:`split_size`.
      block_rows: most query rows (G * T) per program; a power of two, at least 16. Larger
        groups are split over several programs.
      num_warps, num_stages: Triton warps per program and software-pipelining depth of the
        key loop.
    """

    block_kv: int = 64
    keys_per_split: int | None = None
    block_rows: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        rules = {name: dict(minimum=MIN_BLOCK, power_of_two=True, why=TILE_RULE)
                 for name in ("block_kv", "block_rows")}
        rules["num_warps"] = dict(maximum=32, power_of_two=True)
        rules["num_stages"] = {}
        for name, rule in rules.items():
            object.__setattr__(self, name, check_int(name, getattr(self, name), **rule))
        if self.keys_per_split is not None:
            kps = check_int("keys_per_split", self.keys_per_split, multiple_of=self.block_kv,
                            why=f"block_kv={self.block_kv}; or None")
            object.__setattr__(self, "keys_per_split", kps)

    @classmethod
    def get_default(cls) -> DecodeConfig:
        """Defaults for an H100-class GPU (not yet tuned on one)."""
        return cls()

    def split_size(self, programs_per_split: int, s: int, block_kv: int) -> int:
        """Keys per split for a cache of ``s`` keys, ``programs_per_split`` = B * K * row
        blocks, tiles of ``block_kv``: the configured value, or about ``TARGET_PROGRAMS``
        programs in all, as a power-of-two multiple of the tile."""
        if self.keys_per_split is not None:
            return max(block_kv, min(self.keys_per_split, round_up(s, block_kv)))
        want = -(-programs_per_split * s // TARGET_PROGRAMS)
        kps = min(max(pl.next_power_of_2(want), MIN_SPLIT), MAX_SPLIT)
        return max(block_kv, min(kps, round_up(s, block_kv)))


class Tiling(NamedTuple):
    """Static tiling of one call (see :func:`tiling`)."""

    n_rows: int  # G * T query rows per kv head
    block_rows: int  # rows per program (power of two >= 16)
    row_blocks: int  # programs per kv head along the rows
    s_eff: int  # cache length the kernel sees (S, or 16 when S < 16: padded)
    block_kv: int  # keys per tile
    keys_per_split: int  # keys per program
    num_splits: int  # P, programs along the key axis


def tiling(config: DecodeConfig, b: int, t: int, n: int, kh: int, s: int) -> Tiling:
    """The :class:`Tiling` of a call with q [b, t, n, H] and a [b, s, kh, H] cache."""
    n_rows = (n // kh) * t
    if n_rows > config.block_rows:
        block_rows = config.block_rows
    else:
        block_rows = max(MIN_BLOCK, pl.next_power_of_2(n_rows))
    row_blocks = -(-n_rows // block_rows)
    # Short caches get the largest power-of-two tile that fits; only a cache shorter than 16
    # keys is padded (a copy of at most 15 keys per head).
    s_eff = max(s, MIN_BLOCK)
    block_kv = min(config.block_kv, 1 << (s_eff.bit_length() - 1))
    kps = config.split_size(b * kh * row_blocks, s, block_kv)
    return Tiling(n_rows, block_rows, row_blocks, s_eff, block_kv, kps, -(-s // kps))


# ----------------------------------------------------------------------------- kernel


def _decode_kernel(
    len_ref,  # [] int32: valid cache length of this sequence
    q_ref,  # [Rb, H] query rows of one (batch, kv head, row block); row r = (t, g) t-major
    k_ref,  # [S_eff, H] keys of this (batch, k head); S_eff = max(S, 16)
    v_ref,  # [S_eff, Hv] values of this (batch, v head)
    o_ref,  # [Rb, Hv] f32 out: partial output of this split, normalized within the split
    lse_ref,  # [Rb] f32 out: natural-log LSE of this split, -inf for rows that saw no key
    *,
    spec: MaskSpec,
    scale: float,
    soft_cap: float | None,
    t: int,
    g: int,
    s: int,
    s_eff: int,
    n_rows: int,
    row_blocks: int,
    block_kv: int,
    keys_per_split: int,
    precision,
):
    rb_size = q_ref.shape[0]
    rb = pl.program_id(1) % row_blocks
    split = pl.program_id(2)
    length = len_ref[()]

    split_lo, split_hi, first, n_tiles = split_range(split, length, s, t, spec,
                                                     keys_per_split, block_kv)
    # Rows past G * T (the group padded to a power of two) are neither loaded nor stored.
    rows, row_mask, tile_mask = row_block(rb, rb_size, n_rows)
    q = plgpu.load(q_ref, mask=tile_mask, other=None if row_mask is None else 0.0)
    q_pos = (length - t + lax.div(rows, jnp.int32(g)))[:, None]  # [Rb, 1]

    def load(start):
        return k_ref[pl.ds(start, block_kv), :], v_ref[pl.ds(start, block_kv), :]

    step = split_step(load, lambda k: dot(q, k, tb=True, precision=precision), spec=spec,
                      q_pos=q_pos, split_lo=split_lo, split_hi=split_hi, length=length,
                      s_eff=s_eff, t=t, block_kv=block_kv, scale=scale, soft_cap=soft_cap,
                      precision=precision)
    finish_split(step, first, n_tiles, o_ref, lse_ref, row_mask, tile_mask)


@functools.partial(
    jax.jit, static_argnames=("spec", "scale", "soft_cap", "config", "interpret")
)
def _partials(q, k, v, kv_lengths, *, spec, scale, soft_cap, config, interpret):
    b, t, n, h_in = q.shape
    s, kk, kv, hv_in = k.shape[1], k.shape[2], v.shape[2], v.shape[3]
    kc, g, rk, rv = head_groups(n, kk, kv)  # programs run per query group
    h, hv = kernel_head_dim(h_in), kernel_head_dim(hv_in)
    til = tiling(config, b, t, n, kc, s)
    rows, rb = til.n_rows, til.block_rows
    q_rows = group_rows(pad_head(q, h), kc)  # [B, Kc, T*G, H]
    k = pad_axis(pad_head(k, h), 1, til.s_eff)
    v = pad_axis(pad_head(v, hv), 1, til.s_eff)
    nr, p = til.row_blocks, til.num_splits

    kernel = functools.partial(
        _decode_kernel, spec=spec, scale=scale, soft_cap=soft_cap, t=t, g=g, s=s, s_eff=til.s_eff,
        n_rows=rows, row_blocks=nr, block_kv=til.block_kv, keys_per_split=til.keys_per_split,
        precision=dot_precision(q.dtype),
    )
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, kc * nr, p),
        in_specs=[
            pl.BlockSpec((None,), lambda bi, j, si: (bi,)),
            pl.BlockSpec((None, None, rb, h), lambda bi, j, si: (bi, j // nr, j % nr, 0)),
            pl.BlockSpec((None, til.s_eff, None, h), lambda bi, j, si: (bi, 0, j // nr // rk, 0)),
            pl.BlockSpec((None, til.s_eff, None, hv),
                         lambda bi, j, si: (bi, 0, j // nr // rv, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rb, hv),
                         lambda bi, j, si: (si, bi, j // nr, j % nr, 0)),
            pl.BlockSpec((None, None, None, rb), lambda bi, j, si: (si, bi, j // nr, j % nr)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((p, b, kc, rows, hv), jnp.float32),
            jax.ShapeDtypeStruct((p, b, kc, rows), jnp.float32),
        ],
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="decode_attention_splitk",
    )(kv_lengths, q_rows, k, v)
    return ungroup_rows(o, t)[..., :hv_in], ungroup_rows(lse, t)  # [P, B, T, N, ...]


def decode_partials(
    q: jax.Array, k: jax.Array, v: jax.Array,
    kv_lengths: jax.Array | None,
    *,
    spec: MaskSpec = CAUSAL,
    scale: float,
    soft_cap: float | None = None,
    config: DecodeConfig | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Split-K partial decode attention (Pallas, Triton lowering). Forward only.

    Args:
      q: [B, T, N, H] the last T tokens' queries of each sequence (T small: 1..64).
      k: [B, S, Kk, H] key cache; v: [B, S, Kv, Hv] value cache; N a multiple of Kk and of
        Kv (query head n reads k head n // (N // Kk), v head n // (N // Kv)); one float dtype
        (float32, bfloat16 or float16). H, Hv in [1, 256]: dims other than a power of two
        >= 16 are zero-padded inside, which copies the cache on every call.
      kv_lengths: [B] int32 valid cache length per sequence (None: all S). Query t of
        sequence b sits at position kv_lengths[b] - T + t.
      spec: the static position mask; decode uses causal, optionally with a left window.
      scale: logits scale; soft_cap: c for c * tanh(logits / c), or None.
      config: :class:`DecodeConfig`, default ``DecodeConfig.get_default()``.
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      (o_parts [P, B, T, N, Hv] float32, lse_parts [P, B, T, N] float32): per split of the key
      axis, the output normalized within the split and its natural-log LSE (-inf and 0
      output for a split in which the row sees no key). Combine with ``attnlab.ops.merge_n``.

    Raises:
      ValueError: inconsistent shapes, dtypes or kv_lengths.

    Example:
      >>> o_parts, lse_parts = decode_partials(q, k, v, lengths, scale=0.125)
      >>> out, lse = merge_n(o_parts, lse_parts)
    """
    lengths = check_decode_inputs(q, k, v, kv_lengths, dtypes=SUPPORTED_DTYPES)
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(
            f"head dims must be at most {MAX_HEAD_DIM}, got q/k {q.shape[3]} and v {v.shape[3]}"
        )
    config = check_config(config, DecodeConfig)
    return _partials(
        q, k, v, lengths, spec=spec, scale=float(scale),
        soft_cap=None if soft_cap is None else float(soft_cap), config=config,
        interpret=bool(interpret),
    )
