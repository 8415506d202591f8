"""Flash attention forward on GPU: a Pallas kernel lowered to Triton (CPU-interpretable).

One program computes one block of ``block_q`` queries of one (batch, query head) against
the key/value tiles of its kv head (GQA/MQA: query head n reads kv head n // G through the
BlockSpec index map, so K/V are never repeated in memory). The mask is a value: the wrapper
turns it into per-tile EMPTY/PARTIAL/FULL metadata with
:func:`pallas_kernels.common.masks.block_metadata` (a :class:`TilePlan`, built once at trace
time when the positions are static NumPy arrays, else inside the program), and each program
loops only over ``[kv_start, kv_stop)``. Inside that range the longest run of FULL tiles is
a branch-free loop with no elementwise mask; the other tiles of the range check their kind,
skip EMPTY ones and mask the rest.

Numerics: logits are carried in the log2 domain (``log2(e)`` folded into the scale, ``exp2``
in the inner loop), matmuls take the input dtype and accumulate in float32, masked logits are
``MASK_VALUE`` (finite). The public log-sum-exp is natural-log, and ``-inf`` for a row that
sees no key (whose output is 0).

This file also holds the block-size config and the ``jax.custom_vjp`` public wrapper; the
backward kernels live in :mod:`pallas_kernels.gpu.flash_bwd`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common.checks import check_attention_inputs
from pallas_kernels.common.masks import (
    EMPTY,
    FULL,
    MASK_VALUE,
    MaskSpec,
    SegmentIds,
    block_metadata,
    visible,
)
from pallas_kernels.gpu.tuned import tuned_fields

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# The running row maximum starts above MASK_VALUE, so exp2(MASK_VALUE - M_INIT) == 0: a row
# whose keys are all masked so far accumulates nothing, without a second select on p.
M_INIT = 0.5 * MASK_VALUE
# Triton's dot needs every tile dimension to be at least 16.
MIN_BLOCK = 16
# Largest static tile plan (tile kinds of the three kernels) embedded as program constants;
# beyond it (very long sequences) the plan is computed in the program, where it is cheap
# next to the attention itself.
_MAX_STATIC_TILES = 1 << 21

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
        for name in _BLOCK_FIELDS:
            b = getattr(self, name)
            if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
                raise ValueError(f"{name} must be a positive int, got {b!r}")
            if b & (b - 1):
                raise ValueError(
                    f"{name} must be a power of two (Triton tiles are), got {b}; "
                    f"try {1 << (b.bit_length() - 1)} or {1 << b.bit_length()}"
                )
            if b < MIN_BLOCK:
                raise ValueError(
                    f"{name} must be at least {MIN_BLOCK} (the smallest tile Triton's dot "
                    f"accepts), got {b}"
                )
        for name in ("num_warps", "num_warps_bwd"):
            w = getattr(self, name)
            if not isinstance(w, int) or w <= 0 or w & (w - 1) or w > 32:
                raise ValueError(f"{name} must be a power of two in [1, 32], got {w!r}")
        for name in ("num_stages", "num_stages_bwd"):
            st = getattr(self, name)
            if not isinstance(st, int) or st <= 0:
                raise ValueError(f"{name} must be a positive int, got {st!r}")

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


# ----------------------------------------------------------------------------- shared helpers


def fit_block(block: int, length: int) -> int:
    """The tile size used for a sequence of ``length``: ``block``, shrunk for short sequences."""
    return min(block, max(MIN_BLOCK, pl.next_power_of_2(length)))


def round_up(length: int, block: int) -> int:
    return -(-length // block) * block


def pad_axis(x: jax.Array | None, axis: int, length: int, mode: str = "constant"):
    """Pads ``axis`` of x at the end to ``length`` (zeros, or repeating the edge value)."""
    if x is None or x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def loop_bounds(kind: jax.Array, start: jax.Array, stop: jax.Array) -> jax.Array:
    """Per-row loop bounds [..., 4] = (start, run_start, run_stop, stop) as int32.

    kind: [..., n] tile kinds along the loop axis; start, stop: [...] the non-empty range.
    [run_start, run_stop) is the longest run of FULL tiles (empty at ``stop`` if none), which
    kernels walk without any elementwise mask; the tiles around it are checked one by one.
    """
    n = kind.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    is_full = kind == FULL
    last_break = lax.cummax(jnp.where(is_full, -1, idx), axis=kind.ndim - 1)
    run_len = jnp.where(is_full, idx - last_break, 0)
    best_len = run_len.max(-1)
    best_end = jnp.argmax(run_len, axis=-1).astype(jnp.int32) + 1
    run_stop = jnp.where(best_len > 0, best_end, stop)
    run_start = jnp.where(best_len > 0, best_end - best_len, stop)
    return jnp.stack([start, run_start, run_stop, stop], axis=-1).astype(jnp.int32)


def tile_mask(
    spec: MaskSpec,
    q_pos: jax.Array,
    kv_pos: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    kv_idx: jax.Array,
    kv_len: int | None,
) -> jax.Array | None:
    """Visibility of one tile; arguments come already broadcastable ([bq,1] vs [1,bk] or the
    transpose). ``kv_len`` (static) masks padded keys ``kv_idx >= kv_len``; None: no padding."""
    mask = visible(spec, q_pos, kv_pos, q_seg, kv_seg)
    if kv_len is not None:
        valid = kv_idx < kv_len
        mask = valid if mask is None else jnp.logical_and(mask, valid)
    return mask


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


def log2_logits(raw: jax.Array, scale: float, soft_cap: float | None):
    """Logits in the log2 domain from raw q.k (f32), and tanh(.) for the soft-cap gradient."""
    if soft_cap is None:
        return raw * (scale * LOG2E), None
    t = jnp.tanh(raw * (scale / soft_cap))
    return t * (soft_cap * LOG2E), t


def dot(a: jax.Array, b: jax.Array, *, ta: bool = False, tb: bool = False, precision=None):
    """a @ b in the inputs' dtype with f32 accumulation; ``ta``/``tb`` transpose an operand."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(
        a, b, dims, precision=precision, preferred_element_type=jnp.float32
    )


def dot_precision(dtype) -> lax.Precision | None:
    """float32 inputs get true f32 matmuls (IEEE, not TF32) so results match the reference."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


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
    seg = None if q_seg is None else SegmentIds(q_seg, kv_seg)

    def meta(blocks):
        return block_metadata(
            spec, q_pos, kv_pos, block_q=blocks[0], block_kv=blocks[1], segment_ids=seg
        )

    fwd, dq, dkv = meta(tiles.fwd), meta(tiles.dq), meta(tiles.dkv)
    dkv_kind = jnp.swapaxes(dkv.kind, 1, 2)
    # Kinds are quadratic in the sequence length: keep them small (int8).
    return TilePlan(
        loop_bounds(fwd.kind, fwd.kv_start, fwd.kv_stop), fwd.kind.astype(jnp.int8),
        loop_bounds(dq.kind, dq.kv_start, dq.kv_stop), dq.kind.astype(jnp.int8),
        loop_bounds(dkv_kind, dkv.q_start, dkv.q_stop), dkv_kind.astype(jnp.int8),
    )


def pad_inputs(q, k, v, q_pos, kv_pos, q_seg, kv_seg, tp: int, sp: int):
    """Pads sequences at the end: q/k/v with zeros, positions and segment ids with the edge
    value. Padded keys are masked by index in the kernels; padded query rows are sliced off."""
    return (
        pad_axis(q, 1, tp), pad_axis(k, 1, sp), pad_axis(v, 1, sp),
        pad_axis(q_pos, 0, tp, "edge"), pad_axis(kv_pos, 0, sp, "edge"),
        pad_axis(q_seg, 1, tp, "edge"), pad_axis(kv_seg, 1, sp, "edge"),
    )


# ----------------------------------------------------------------------------- forward kernel


def _fwd_kernel(
    bounds_ref,  # [4] int32: kv_start, run_start, run_stop, kv_stop of this q block
    kind_ref,  # [nk] int8: EMPTY / PARTIAL / FULL of each kv tile for this q block
    q_pos_ref,  # [bq] int32 global query positions
    kv_pos_ref,  # [Sp] int32 global key positions
    q_seg_ref,  # [bq] int32 query segment ids, or None
    kv_seg_ref,  # [Sp] int32 key segment ids, or None
    q_ref,  # [bq, H] queries of one (batch, q head)
    k_ref,  # [Sp, H] keys of kv head n // G
    v_ref,  # [Sp, Hv] values of kv head n // G
    o_ref,  # [bq, Hv] out
    lse_ref,  # [bq] f32 out: natural-log LSE, -inf for rows that see no key
    ent_ref=None,  # [bq] f32 out: entropy (only with return_entropy), 0 for unseen rows
    *,
    spec: MaskSpec,
    scale: float,
    soft_cap: float | None,
    block_kv: int,
    kv_len: int | None,
    precision,
):
    bq = q_ref.shape[0]
    q = q_ref[...]
    q_pos = q_pos_ref[...][:, None]
    q_seg = None if q_seg_ref is None else q_seg_ref[...][:, None]

    with_entropy = ent_ref is not None

    def step(j, _head, carry, *, masked: bool):
        if with_entropy:
            m, row_sum, acc, u = carry
        else:
            m, row_sum, acc = carry
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        s, _ = log2_logits(dot(q, k, tb=True, precision=precision), scale, soft_cap)
        if masked:
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[pl.ds(start, block_kv)][None, :]
            kv_idx = (start + jnp.arange(block_kv, dtype=jnp.int32))[None, :]
            kv_pos = kv_pos_ref[pl.ds(start, block_kv)][None, :]
            mask = tile_mask(spec, q_pos, kv_pos, q_seg, kv_seg, kv_idx, kv_len)
            if mask is not None:
                s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp2(m - m_new)
        if with_entropy:
            d = s - m_new[:, None]
            p = jnp.exp2(d)
        else:
            p = jnp.exp2(s - m_new[:, None])
        row_sum_new = alpha * row_sum + p.sum(axis=-1)
        acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v, precision=precision)
        if not with_entropy:
            return m_new, row_sum_new, acc
        # u = sum_j exp2(s_j - m) (s_j - m), kept relative to the running max m (no
        # cancellation against large logits); re-basing to m_new adds (m - m_new) * row_sum.
        # Masked logits have p == 0 exactly and a finite d, so they add nothing.
        u = alpha * (u + (m - m_new) * row_sum) + jnp.sum(p * d, axis=-1)
        return m_new, row_sum_new, acc, u

    carry = (
        jnp.full((bq,), M_INIT, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
    )
    if with_entropy:
        carry = (*carry, jnp.zeros((bq,), jnp.float32))
    carry = tile_loops(
        bounds_ref, kind_ref, functools.partial(step, masked=True),
        functools.partial(step, masked=False), carry,
    )
    m, row_sum, acc = carry[:3]

    seen = row_sum > 0.0
    l_safe = jnp.where(seen, row_sum, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    log2_l = jnp.log2(l_safe)
    lse_ref[...] = jnp.where(seen, (m + log2_l) * LN2, -jnp.inf)
    if with_entropy:
        # H = lse - sum_j p_j z_j = ln2 * (log2(l) - u / l) in the log2 domain.
        ent_ref[...] = jnp.where(seen, (log2_l - carry[3] / l_safe) * LN2, 0.0)


def _forward(
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, plan: TilePlan, *, spec, scale, soft_cap,
    config: FlashConfig, interpret: bool, return_entropy: bool = False,
):
    """Runs the forward kernel. Returns out [B, T, N, Hv] and lse [B, T, N] f32, and with
    ``return_entropy`` also the entropy [B, T, N] f32."""
    b, t, n, h = q.shape
    s, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
    g = n // kh
    tiles = tiling(config, t, s)
    (bq, bk), tp, sp = tiles.fwd, tiles.fwd_tp, tiles.fwd_sp
    bm, nq, nk = plan.fwd_kind.shape
    q, k, v, q_pos, kv_pos, q_seg, kv_seg = pad_inputs(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, tp, sp
    )

    # Causal rows get longer towards the end: launch the last q blocks first.
    def qi(i):
        return nq - 1 - i

    def meta_map(i, bi, ni):
        return (bi if bm > 1 else 0, qi(i), 0)

    in_specs = [
        pl.BlockSpec((None, None, 4), meta_map),
        pl.BlockSpec((None, None, nk), meta_map),
        pl.BlockSpec((bq,), lambda i, bi, ni: (qi(i),)),
        pl.BlockSpec((sp,), lambda i, bi, ni: (0,)),
        None if q_seg is None else pl.BlockSpec((None, bq), lambda i, bi, ni: (bi, qi(i))),
        None if kv_seg is None else pl.BlockSpec((None, sp), lambda i, bi, ni: (bi, 0)),
        pl.BlockSpec((None, bq, None, h), lambda i, bi, ni: (bi, qi(i), ni, 0)),
        pl.BlockSpec((None, sp, None, h), lambda i, bi, ni: (bi, 0, ni // g, 0)),
        pl.BlockSpec((None, sp, None, hv), lambda i, bi, ni: (bi, 0, ni // g, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, hv), lambda i, bi, ni: (bi, qi(i), ni, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, qi(i))),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, tp, n, hv), q.dtype),
        jax.ShapeDtypeStruct((b, n, tp), jnp.float32),
    ]
    if return_entropy:
        out_specs.append(pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, qi(i))))
        out_shape.append(jax.ShapeDtypeStruct((b, n, tp), jnp.float32))
    kernel = functools.partial(
        _fwd_kernel, spec=spec, scale=scale, soft_cap=soft_cap, block_kv=bk,
        kv_len=None if sp == s else s, precision=dot_precision(q.dtype),
    )
    res = pl.pallas_call(
        kernel,
        grid=(nq, b, n),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(
            num_warps=config.num_warps, num_stages=config.num_stages
        ),
        interpret=interpret,
        name="flash_attention_fwd",
    )(plan.fwd_bounds, plan.fwd_kind, q_pos, kv_pos, q_seg, kv_seg, q, k, v)
    out = res[0][:, :t]
    return (out, *(jnp.swapaxes(x[:, :, :t], 1, 2) for x in res[1:]))


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12, 13))
def _flash(
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, plan, spec, scale, soft_cap, config, interpret,
    return_entropy,
):
    return _forward(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, plan, spec=spec, scale=scale, soft_cap=soft_cap,
        config=config, interpret=interpret, return_entropy=return_entropy,
    )


def _flash_fwd(
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, plan, spec, scale, soft_cap, config, interpret,
    return_entropy,
):
    res = _flash(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, plan, spec, scale, soft_cap, config, interpret,
        return_entropy,
    )
    return res, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, plan, *res)


def _flash_bwd(spec, scale, soft_cap, config, interpret, return_entropy, res, cts):
    # Imported here: flash_bwd builds on the helpers above.
    from pallas_kernels.gpu.flash_bwd import flash_backward

    q, k, v, q_pos, kv_pos, q_seg, kv_seg, plan, out, lse = res[:10]
    ent = res[10] if return_entropy else None
    d_out, d_lse = cts[:2]
    d_ent = cts[2] if return_entropy else None
    dq, dk, dv = flash_backward(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, plan, out, lse, d_out, d_lse, spec=spec,
        scale=scale, soft_cap=soft_cap, config=config, interpret=interpret, ent=ent,
        d_ent=d_ent,
    )
    return dq, dk, dv, None, None, None, None, None


@functools.lru_cache(maxsize=32)
def _static_plan(spec: MaskSpec, tiles: Tiling, q_pos: bytes, kv_pos: bytes) -> TilePlan:
    """The tile plan of a static mask, as NumPy arrays (built once per mask and tiling)."""
    with jax.ensure_compile_time_eval():
        plan = tile_plan(
            spec, np.frombuffer(q_pos, np.int32), np.frombuffer(kv_pos, np.int32), None, None,
            tiles,
        )
    return jax.tree.map(np.asarray, plan)


@functools.partial(
    jax.jit,
    static_argnames=("spec", "scale", "soft_cap", "config", "interpret", "return_entropy"),
)
def _flash_jit(
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, plan, *, spec, scale, soft_cap, config, interpret,
    return_entropy,
):
    if plan is None:
        plan = tile_plan(spec, q_pos, kv_pos, q_seg, kv_seg, tiling(config, q.shape[1], k.shape[1]))
    return _flash(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, plan, spec, scale, soft_cap, config, interpret,
        return_entropy,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    *,
    spec: MaskSpec,
    scale: float,
    soft_cap: float | None = None,
    config: FlashConfig | None = None,
    interpret: bool = False,
    return_entropy: bool = False,
) -> tuple[jax.Array, ...]:
    """Flash attention (Pallas, Triton lowering) with masks, GQA, soft-cap and LSE.

    Args:
      q: [B, T, N, H] queries; k: [B, S, K, H] keys; v: [B, S, K, Hv] values; N a multiple of
        K (GQA/MQA). Same float dtype (float32, bfloat16 or float16). On a GPU, H and Hv must
        be powers of two (64, 128, 256 are tuned).
      q_positions: [T] int32 global query positions; kv_positions: [S] int32 key positions.
        NumPy arrays (a static mask) let the tile metadata be built once at trace time;
        jax arrays (e.g. traced offsets) build it inside the program.
      q_segment_ids, kv_segment_ids: [B, T] / [B, S] int32 packed-document ids, or both None.
      spec: the static mask (causal, window).
      scale: logits scale; soft_cap: c for c * tanh(logits / c), or None.
      config: :class:`FlashConfig`, default ``FlashConfig.get_default(head_dim=H)``.
      interpret: run the kernels in the Pallas interpreter (CPU tests).
      return_entropy: (static) also compute the attention entropy of each row,
        ``H = -sum_j p_j log p_j = lse - sum_j p_j z_j`` (z the final logits), accumulated
        online in the forward kernel. When False the kernels are exactly those without it.

    Returns:
      (out [B, T, N, Hv] in q's dtype, lse [B, T, N] float32), lse natural-log and ``-inf``
      for a row that sees no key (its output is 0); with ``return_entropy`` a third element,
      entropy [B, T, N] float32 (0 for a row that sees no key). Differentiable in q, k, v
      (all outputs).

    Raises:
      ValueError: inconsistent shapes or dtypes.

    Example:
      >>> pos = jnp.arange(T, dtype=jnp.int32)
      >>> out, lse = flash_attention(q, k, v, pos, pos, spec=MaskSpec(causal=True), scale=0.125)
    """
    b, t, n, h, s, kh = check_attention_inputs(
        q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
        dtypes=(jnp.float32, jnp.bfloat16, jnp.float16),
    )
    if config is None:
        config = FlashConfig.get_default(head_dim=h, causal=spec.causal, dtype=q.dtype)
    q_seg = None if q_segment_ids is None else jnp.asarray(q_segment_ids, jnp.int32)
    kv_seg = None if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
    plan = None
    if isinstance(q_positions, np.ndarray) and isinstance(kv_positions, np.ndarray):
        q_positions = q_positions.astype(np.int32)
        kv_positions = kv_positions.astype(np.int32)
        tiles = tiling(config, t, s)
        n_tiles = sum(-(-t // bq) * -(-s // bk) for bq, bk in (tiles.fwd, tiles.dq, tiles.dkv))
        if q_seg is None and n_tiles <= _MAX_STATIC_TILES:
            # The mask is static: the tile plan becomes program constants instead of being
            # recomputed on every call (at short sequences those small XLA ops would cost
            # about as much as the kernel).
            plan = _static_plan(spec, tiles, q_positions.tobytes(), kv_positions.tobytes())
    return _flash_jit(
        q, k, v, jnp.asarray(q_positions, jnp.int32), jnp.asarray(kv_positions, jnp.int32),
        q_seg, kv_seg, plan, spec=spec, scale=float(scale),
        soft_cap=None if soft_cap is None else float(soft_cap), config=config,
        interpret=bool(interpret), return_entropy=bool(return_entropy),
    )
