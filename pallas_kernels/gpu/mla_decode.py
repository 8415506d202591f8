"""MLA latent decode on GPU: split-K attention over the shared ``[c ; k_R]`` cache (Triton).

Absorbed multi-head latent attention decodes every query head against one cache of
``D = d_c + d_R`` values per token that is at once the keys (all D columns) and the values
(the first ``d_c`` columns). The kernel reads each cache tile once per row block:

* Grid ``(B, row_blocks, P)``: the N * T query rows of a sequence (row ``r`` is query
  ``r // N`` of head ``r % N``; all heads share the cache) in blocks of ``block_rows``, and P
  splits of the key axis of ``keys_per_split`` keys, walked in tiles of ``block_kv``. The row
  blocks of one split are adjacent in launch order, so they read the same cache tiles while
  they are in L2.
* The cache is passed twice, as two column blocks of the same array: the latent part
  ``[block_kv, d_c]`` (column block 0) and the RoPE part ``[block_kv, d_R]`` (column block
  ``d_c / d_R``): logits ``q_c c^T + q_R k_R^T``, output ``p c``; nothing is copied.
* Ragged batches: a sequence's ``kv_lengths[b]`` bounds its tile loop; the last tile of the
  cache is shifted back to end at S (no load out of bounds), as in
  :mod:`pallas_kernels.gpu.decode`.

Each program writes its split's output (normalized within the split, float32) and LSE
(``-inf`` if it saw no key); the caller merges the P partials by LSE. Forward only. Tiles
that some row cannot wholly see read their values through
:func:`~pallas_kernels.common.masks.finite_or_zero`: NaN in an uninitialized slot past the
length never reaches a row.

Dims: d_c and d_R powers of two >= 16 with d_c a multiple of d_R run as they are (DeepSeek's
512 + 64); other dims are zero-padded inside (a copy of the cache per call).
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

from pallas_kernels.common.checks import check_latent_decode_inputs
from pallas_kernels.common.masks import MaskSpec
from pallas_kernels.gpu import _common as common

# The latent kernel is a split-K decode kernel: the decode kernel's dtypes and config fields.
from pallas_kernels.gpu.decode import SUPPORTED_DTYPES, DecodeConfig

# About this many programs in flight (several waves of an H100's 132 SMs).
TARGET_PROGRAMS = 512
MIN_SPLIT = 256
MAX_SPLIT = 8192


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MlaDecodeConfig(DecodeConfig):
    """Tiling and launch parameters of the latent decode kernel: the fields (and rules) of
    :class:`~pallas_kernels.gpu.decode.DecodeConfig`, with defaults for its wide rows.

    ``block_rows`` query rows (heads x queries) per program keep a [block_rows, d_c] float32
    accumulator: the register budget. ``keys_per_split`` None gives about
    ``TARGET_PROGRAMS`` programs in all. The defaults are the fastest of a 20-config sweep
    on an H100 at DeepSeek-V2 sizes, 32K cache (``bench_mla_sweep_h100_2026-12-07.json``:
    64-key tiles 2.14 ms against 2.43 ms for 32-key ones).
    """

    block_kv: int = 64
    block_rows: int = 64
    keys_per_split: int | None = None
    num_warps: int = 8
    num_stages: int = 2

    @classmethod
    def get_default(cls) -> MlaDecodeConfig:
        return cls()


class Tiling(NamedTuple):
    """Static tiling of one call."""

    n_rows: int  # N * T
    block_rows: int
    row_blocks: int
    s_eff: int  # cache length the kernel sees (S, or 16 when S < 16: padded)
    block_kv: int
    keys_per_split: int
    num_splits: int


def tiling(config: MlaDecodeConfig, b: int, t: int, n: int, s: int) -> Tiling:
    """The :class:`Tiling` of q [b, t, n, D] over a [b, s, D] cache."""
    n_rows = n * t
    block_rows = min(config.block_rows, max(common.MIN_BLOCK, pl.next_power_of_2(n_rows)))
    row_blocks = -(-n_rows // block_rows)
    s_eff = max(s, common.MIN_BLOCK)
    block_kv = min(config.block_kv, 1 << (s_eff.bit_length() - 1))
    if config.keys_per_split is not None:
        kps = max(block_kv, min(config.keys_per_split, common.round_up(s, block_kv)))
    else:
        want = -(-b * row_blocks * s // TARGET_PROGRAMS)
        kps = min(max(pl.next_power_of_2(want), MIN_SPLIT), MAX_SPLIT)
        kps = max(block_kv, min(kps, common.round_up(s, block_kv)))
    return Tiling(n_rows, block_rows, row_blocks, s_eff, block_kv, kps, -(-s // kps))


def kernel_dims(d_c: int, d_r: int) -> tuple[int, int]:
    """(d_c, d_R) the kernel runs at: powers of two >= 16 with d_c a multiple of d_R."""
    dc, dr = common.kernel_head_dim(d_c), common.kernel_head_dim(d_r)
    return max(dc, dr), dr


def _kernel(
    len_ref,  # [] int32: valid cache length of this sequence
    qc_ref,  # [Rb, d_c] latent part of the query rows
    qr_ref,  # [Rb, d_R] RoPE part of the query rows
    c_ref,  # [S_eff, d_c] latent cache of this sequence (keys and values)
    r_ref,  # [S_eff, d_R] RoPE keys of this sequence
    o_ref,  # [Rb, d_c] f32 out: this split's output, normalized within the split
    lse_ref,  # [Rb] f32 out: this split's natural-log LSE, -inf where no key was seen
    *, spec: MaskSpec, scale: float, t: int, n: int, s: int, s_eff: int, n_rows: int,
    block_kv: int, keys_per_split: int, precision,
):
    rb_size = qc_ref.shape[0]
    split, rb = pl.program_id(1), pl.program_id(2)  # grid (B, P, row blocks)
    length = len_ref[()]
    split_lo, split_hi, first, n_tiles = common.split_range(split, length, s, t, spec,
                                                            keys_per_split, block_kv)
    rows, row_mask, tile_mask = common.row_block(rb, rb_size, n_rows)
    other = None if row_mask is None else 0.0
    q_c = plgpu.load(qc_ref, mask=tile_mask, other=other)
    q_r = plgpu.load(qr_ref, mask=tile_mask, other=other)
    q_pos = (length - t + lax.div(rows, jnp.int32(n)))[:, None]

    def load(start):  # keys (c, k^R); the values are c again
        c = c_ref[pl.ds(start, block_kv), :]
        return (c, r_ref[pl.ds(start, block_kv), :]), c

    def raw_logits(keys):
        c, r = keys
        return (common.dot(q_c, c, tb=True, precision=precision)
                + common.dot(q_r, r, tb=True, precision=precision))

    step = common.split_step(load, raw_logits, spec=spec, q_pos=q_pos, split_lo=split_lo,
                             split_hi=split_hi, length=length, s_eff=s_eff, t=t,
                             block_kv=block_kv, scale=scale, soft_cap=None, precision=precision)
    common.finish_split(step, first, n_tiles, o_ref, lse_ref, row_mask, tile_mask)


@functools.partial(jax.jit, static_argnames=("v_dim", "spec", "scale", "config", "interpret"))
def _partials(q, cache, kv_lengths, *, v_dim, spec, scale, config, interpret):
    b, t, n, d = q.shape
    s = cache.shape[1]
    d_r_in = d - v_dim
    dc, dr = kernel_dims(v_dim, max(d_r_in, 1))
    if (dc, dr) != (v_dim, d_r_in):  # pad each part on its own (a copy of the cache)
        def split_pad(x):
            return jnp.concatenate(
                [common.pad_head(x[..., :v_dim], dc), common.pad_head(x[..., v_dim:], dr)],
                axis=-1)
        q, cache = split_pad(q), split_pad(cache)
    til = tiling(config, b, t, n, s)
    rows, rb, nr, p = til.n_rows, til.block_rows, til.row_blocks, til.num_splits
    q_rows = q.reshape(b, rows, dc + dr)  # row r = query r // N of head r % N
    cache = common.pad_axis(cache, 1, til.s_eff)
    kernel = functools.partial(
        _kernel, spec=spec, scale=scale, t=t, n=n, s=s, s_eff=til.s_eff, n_rows=rows,
        block_kv=til.block_kv, keys_per_split=til.keys_per_split,
        precision=common.dot_precision(q.dtype),
    )
    r_col = dc // dr  # the RoPE part as a column block of width d_R
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, p, nr),  # row blocks innermost: they share each split's cache tiles
        in_specs=[
            pl.BlockSpec((None,), lambda bi, si, ri: (bi,)),
            pl.BlockSpec((None, rb, dc), lambda bi, si, ri: (bi, ri, 0)),
            pl.BlockSpec((None, rb, dr), lambda bi, si, ri: (bi, ri, r_col)),
            pl.BlockSpec((None, til.s_eff, dc), lambda bi, si, ri: (bi, 0, 0)),
            pl.BlockSpec((None, til.s_eff, dr), lambda bi, si, ri: (bi, 0, r_col)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, rb, dc), lambda bi, si, ri: (si, bi, ri, 0)),
            pl.BlockSpec((None, None, rb), lambda bi, si, ri: (si, bi, ri)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((p, b, rows, dc), jnp.float32),
            jax.ShapeDtypeStruct((p, b, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="mla_latent_decode",
    )(kv_lengths, q_rows, q_rows, cache, cache)
    return o.reshape(p, b, t, n, dc)[..., :v_dim], lse.reshape(p, b, t, n)


def decode_partials(
    q: jax.Array, cache: jax.Array, kv_lengths: jax.Array, *, v_dim: int, spec: MaskSpec,
    scale: float, config: MlaDecodeConfig | None = None, interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Split-K partial latent decode. Forward only.

    Args:
      q: [B, T, N, D] latent-space queries ``[W_UK^T q^C ; q^R]``, T <= 64.
      cache: [B, S, D] the latent cache ``[c ; k^R]``, its first ``v_dim`` columns the values.
      kv_lengths: [B] int32 valid lengths; query t of sequence b sits at kv_lengths[b] - T + t.
      v_dim: d_c (1 <= d_c < D; D - d_c is d_R).
      spec: causal, optionally a left window. scale: the logits scale.
      config: :class:`MlaDecodeConfig` (default ``get_default()``).
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      (o_parts [P, B, T, N, v_dim] float32, lse_parts [P, B, T, N] float32), merged by LSE
      (``attnlab.ops.merge_n``).

    Raises:
      ValueError: inconsistent shapes, dtypes or dims.
    """
    check_latent_decode_inputs(q, cache, kv_lengths, v_dim, SUPPORTED_DTYPES)
    config = MlaDecodeConfig.get_default() if config is None else config
    if not isinstance(config, MlaDecodeConfig):
        raise ValueError(f"config must be a MlaDecodeConfig, got {type(config).__name__}")
    return _partials(
        q, cache, jnp.asarray(kv_lengths, jnp.int32), v_dim=int(v_dim), spec=spec,
        scale=float(scale), config=config, interpret=bool(interpret),
    )
