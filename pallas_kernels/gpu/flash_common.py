"""Flash attention on GPU, what the forward and backward kernels share: config and tile plan.

:class:`FlashConfig` holds the tile sizes and launch parameters of all three Triton kernels
(forward, dQ, dK/dV). :func:`tiling` fits them to one (T, S), and :func:`tile_plan` turns the
mask (a :class:`~pallas_kernels.common.masks.MaskSpec` with positions and segment ids) into
the per-row loop bounds and per-tile EMPTY/PARTIAL/FULL kinds the kernels read
(:class:`TilePlan`). :func:`tile_loops` is the in-kernel side of that plan: the loop over a
row's non-empty tiles (the elementwise mask of one tile is
:func:`~pallas_kernels.common.masks.tile_mask`).

Used by :mod:`~pallas_kernels.gpu.flash_fwd` and :mod:`~pallas_kernels.gpu.flash_bwd`, and by
``attnlab.ops.attention_grad`` (which builds a plan for the backward kernels alone) and
``attnlab.bench.autotune`` (which searches :class:`FlashConfig` fields).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common.masks import EMPTY, FULL, MaskSpec, tile_metadata
from pallas_kernels.common.static_args import check_int
from pallas_kernels.gpu._common import (
    MIN_BLOCK,
    TILE_RULE,
    kernel_head_dim,
    pad_axis,
    round_up,
)
from pallas_kernels.gpu.tuned import tuned_fields

_BLOCK_FIELDS = (
    "block_q", "block_kv", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq",
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FlashConfig:
    """Tile sizes and launch parameters of the Triton flash-attention kernels.

    Attributes:
      block_q, block_kv: forward tile (queries per program, keys per inner step).
      num_warps, num_stages: forward launch parameters (Triton warps per program, software
        pipelining depth of the key loop).
      block_kv_dkv, block_q_dkv: dK/dV kernel tile (keys per program, queries per step).
      block_q_dq, block_kv_dq: dQ kernel tile (queries per program, keys per step).
      num_warps_bwd, num_stages_bwd: launch parameters of both backward kernels.

    Block sizes are powers of two, at least 16; sequences need not be multiples of them
    (the wrapper pads), and blocks larger than a short sequence are shrunk to fit.
    """

    block_q: int = 128
    block_kv: int = 64
    num_warps: int = 8
    num_stages: int = 3
    block_q_dkv: int = 64
    block_kv_dkv: int = 64
    block_q_dq: int = 64
    block_kv_dq: int = 64
    num_warps_bwd: int = 8
    num_stages_bwd: int = 2

    def __post_init__(self) -> None:
        rules = {name: dict(minimum=MIN_BLOCK, power_of_two=True, why=TILE_RULE)
                 for name in _BLOCK_FIELDS}
        rules |= {name: dict(maximum=32, power_of_two=True)
                  for name in ("num_warps", "num_warps_bwd")}
        rules |= {name: {} for name in ("num_stages", "num_stages_bwd")}
        for name, rule in rules.items():
            object.__setattr__(self, name, check_int(name, getattr(self, name), **rule))

    @classmethod
    def get_default(
        cls, *, head_dim: int | None = None, causal: bool | None = None,
        device_kind: str | None = None, dtype=None,
    ) -> FlashConfig:
        """Tuned sizes for this GPU if ``tuned_configs.json`` has them, else hand-picked ones.

        The tuned table (``pallas_kernels/gpu/tuned.py``) is keyed by device kind, head dim
        and causal/full; it is written by ``python -m attnlab.bench.autotune`` on the device.
        Hand-picked fallbacks: tiles shrink and warps grow with the head dim so that the f32
        accumulators (the forward's [block_q, H] output, the dK/dV kernel's two
        [block_kv_dkv, H]) stay at about 64 registers per thread.
        """
        base = cls._hand_picked(head_dim)
        if head_dim is None or causal is None:
            return base
        # The table is measured with 16-bit inputs; float32 tiles are twice the bytes and the
        # tuned ones can exceed shared memory (seen on the H100: 384 KiB asked, 227 KiB there).
        if dtype is not None and jnp.dtype(dtype).itemsize != 2:
            return base
        fields = tuned_fields(head_dim, causal, device_kind)
        return dataclasses.replace(base, **fields) if fields else base

    @classmethod
    def _hand_picked(cls, head_dim: int | None) -> FlashConfig:
        if head_dim is not None and head_dim > 128:
            return cls(
                block_q=64, block_kv=32, num_warps=8, num_stages=2,
                block_q_dkv=32, block_kv_dkv=32, block_q_dq=32, block_kv_dq=32,
                num_warps_bwd=8, num_stages_bwd=2,
            )
        if head_dim is not None and head_dim <= 64:
            return cls(num_warps=4, num_warps_bwd=4)
        return cls()


# ----------------------------------------------------------------------------- tile planning


def fit_block(block: int, length: int) -> int:
    """The tile size used for a sequence of ``length``: ``block``, shrunk for short sequences."""
    return min(block, max(MIN_BLOCK, pl.next_power_of_2(length)))


def loop_bounds(kind: jax.Array, start: jax.Array, stop: jax.Array) -> jax.Array:
    """Per-row loop bounds [..., 4] = (start, run_start, run_stop, stop) as int32.

    kind: [..., n] tile kinds along the loop axis; start, stop: [...] the non-empty range.
    [run_start, run_stop) is the longest run of FULL tiles (empty at ``stop`` if none), which
    kernels walk without any elementwise mask; the tiles around it are checked one by one.
    """
    n = kind.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), kind.shape)  # strict rank promotion
    is_full = kind == FULL
    last_break = lax.cummax(jnp.where(is_full, -1, idx), axis=kind.ndim - 1)
    run_len = jnp.where(is_full, idx - last_break, 0)
    best_len = run_len.max(-1)
    best_end = jnp.argmax(run_len, axis=-1).astype(jnp.int32) + 1
    run_stop = jnp.where(best_len > 0, best_end, stop)
    run_start = jnp.where(best_len > 0, best_end - best_len, stop)
    return jnp.stack([start, run_start, run_stop, stop], axis=-1).astype(jnp.int32)


def tile_loops(bounds_ref, kind_ref, masked_step, full_step, carry, *, fold: int = 1):
    """A kernel's loop over the non-empty tiles of its row of the mask.

    bounds_ref: [4] int32 (start, run_start, run_stop, stop), see :func:`loop_bounds`;
    kind_ref: [n] int32 tile kinds of the row. The FULL run [run_start, run_stop) is one
    branch-free loop of ``full_step``; the other tiles of [start, stop) (the "edges": a causal
    diagonal, the ends of a window, segment boundaries) form one loop that skips EMPTY tiles
    and calls ``masked_step`` on the rest. Steps are ``step(tile, r, carry) -> carry``; with
    ``fold > 1`` every tile is visited once per r in [0, fold) (the q heads of a GQA group),
    as one flat loop so Triton pipelines across heads.
    """
    start, run_start, run_stop, stop = (bounds_ref[i] for i in range(4))
    n_before = run_start - start

    def edge_step(e, r, c):
        i = jnp.where(e < n_before, start + e, run_stop + (e - n_before))
        return lax.cond(kind_ref[i] == EMPTY, lambda c: c, lambda c: masked_step(i, r, c), c)

    def run_step(e, r, c):
        return full_step(run_start + e, r, c)

    def loop(n, body, c):
        if fold == 1:
            return lax.fori_loop(0, n, lambda e, c: body(e, 0, c), c)
        return lax.fori_loop(0, fold * n, lambda e, c: body(e % n, e // n, c), c)

    carry = loop(n_before + (stop - run_stop), edge_step, carry)
    return loop(run_stop - run_start, run_step, carry)


class Tiling(NamedTuple):
    """Tile sizes (block_q, block_kv) of the three kernels for one (T, S), and the padded
    lengths: the forward pads to its own tiles, the backward to the largest of its tiles."""

    fwd: tuple[int, int]
    dq: tuple[int, int]
    dkv: tuple[int, int]
    fwd_tp: int
    fwd_sp: int
    bwd_tp: int
    bwd_sp: int


def tiling(config: FlashConfig, t: int, s: int) -> Tiling:
    if not isinstance(config, FlashConfig):  # every kernel reads its config through here
        raise ValueError(f"config must be a FlashConfig, got {type(config).__name__}")
    fwd = (fit_block(config.block_q, t), fit_block(config.block_kv, s))
    dq = (fit_block(config.block_q_dq, t), fit_block(config.block_kv_dq, s))
    dkv = (fit_block(config.block_q_dkv, t), fit_block(config.block_kv_dkv, s))
    return Tiling(
        fwd, dq, dkv, round_up(t, fwd[0]), round_up(s, fwd[1]),
        round_up(t, max(dq[0], dkv[0])), round_up(s, max(dq[1], dkv[1])),
    )


class TilePlan(NamedTuple):
    """The mask as the kernels read it: per-row loop bounds and per-tile kinds.

    fwd_bounds [Bm, nq, 4] int32, fwd_kind [Bm, nq, nk] int8: forward, one row per q block.
    dq_bounds, dq_kind: the same for the dQ kernel's tiles.
    dkv_bounds [Bm, nk, 4], dkv_kind [Bm, nk, nq]: dK/dV kernel, one row per kv block.
    Bm is B with segment ids, else 1.
    """

    fwd_bounds: jax.Array
    fwd_kind: jax.Array
    dq_bounds: jax.Array
    dq_kind: jax.Array
    dkv_bounds: jax.Array
    dkv_kind: jax.Array


def tile_plan(
    spec: MaskSpec,
    q_pos: jax.Array,
    kv_pos: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    tiles: Tiling,
) -> TilePlan:
    """Builds the :class:`TilePlan` of all three kernels from the (unpadded) mask values."""
    def meta(blocks):
        return tile_metadata(spec, q_pos, kv_pos, q_seg, kv_seg, *blocks)

    fwd, dq, dkv = meta(tiles.fwd), meta(tiles.dq), meta(tiles.dkv)
    dkv_kind = jnp.swapaxes(dkv.kind, 1, 2)
    # Kinds are quadratic in the sequence length: keep them small (int8).
    return TilePlan(
        loop_bounds(fwd.kind, fwd.kv_start, fwd.kv_stop), fwd.kind.astype(jnp.int8),
        loop_bounds(dq.kind, dq.kv_start, dq.kv_stop), dq.kind.astype(jnp.int8),
        loop_bounds(dkv_kind, dkv.q_start, dkv.q_stop), dkv_kind.astype(jnp.int8),
    )


def config_head_dim(h: int, hv: int) -> int:
    """The head dim that picks a default :class:`FlashConfig`: the larger padded one."""
    return max(kernel_head_dim(h), kernel_head_dim(hv))


def q_block_specs(
    kind: jax.Array, bq: int, sp: int, h: int, hv: int, gk: int, gv: int, segmented: bool
) -> tuple[Callable[[int], int], list[pl.BlockSpec | None]]:
    """The grid (q block, batch, q head) of the forward and dQ kernels, last q blocks first
    (causal rows get longer towards the end).

    kind: the kernel's [Bm, nq, nk] tile kinds; bq: its query tile; sp: the padded S; gk, gv:
    the query heads per key head and per value head (query head n reads k head n // gk and v
    head n // gv). Returns (qi, specs): ``qi(i)`` the q block of grid step i, and the block
    specs of the inputs both kernels start with: (bounds, kind, q_pos, kv_pos, q_seg, kv_seg,
    q, k, v), the segment specs None unless ``segmented``.
    """
    bm, nq, nk = kind.shape

    def qi(i):
        return nq - 1 - i

    def meta_map(i, bi, ni):
        return (bi if bm > 1 else 0, qi(i), 0)

    return qi, [
        pl.BlockSpec((None, None, 4), meta_map),
        pl.BlockSpec((None, None, nk), meta_map),
        pl.BlockSpec((bq,), lambda i, bi, ni: (qi(i),)),
        pl.BlockSpec((sp,), lambda i, bi, ni: (0,)),
        pl.BlockSpec((None, bq), lambda i, bi, ni: (bi, qi(i))) if segmented else None,
        pl.BlockSpec((None, sp), lambda i, bi, ni: (bi, 0)) if segmented else None,
        pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, qi(i), ni, 0)),
        pl.BlockSpec((None, sp, None, h), lambda i, bi, ni: (bi, 0, ni // gk, 0)),
        pl.BlockSpec((None, sp, None, hv), lambda i, bi, ni: (bi, 0, ni // gv, 0)),
    ]


def pad_inputs(q, k, v, q_pos, kv_pos, q_seg, kv_seg, tp: int, sp: int):
    """Pads sequences at the end: q/k/v with zeros, positions and segment ids with the edge
    value. Padded keys are masked by index in the kernels; padded query rows are sliced off."""
    return (
        pad_axis(q, 1, tp), pad_axis(k, 1, sp), pad_axis(v, 1, sp),
        pad_axis(q_pos, 0, tp, "edge"), pad_axis(kv_pos, 0, sp, "edge"),
        pad_axis(q_seg, 1, tp, "edge"), pad_axis(kv_seg, 1, sp, "edge"),
    )
