"""Flash attention for TPU as Mosaic TPU Pallas kernels: forward kernel, config, custom VJP.

**Lowered for TPU (v4, v5e, v5p, v6e), verified in interpret mode, never run on a TPU.** No
TPU is available to the project, so these kernels are run on CPU through
``interpret=pltpu.InterpretParams()`` (which simulates TPU memory spaces, scalar prefetch and
the grid) and compared there with the reference, and lowered by Pallas's Mosaic lowering for
each generation from CPU (``tests/pallas_kernels/test_tpu_lowering.py``). They have never been
compiled by Mosaic (its layout and VMEM passes run on a TPU) nor timed.

Layout: the public ``[B, T, N, H]`` arrays are transposed inside the wrapper to heads-major
``[B, N, T, H]`` (K ``[B, Kk, S, H]``, V ``[B, Kv, S, Hv]``), and sequence lengths are padded
up to a whole number of blocks (padded keys are masked, padded query rows are sliced off).
Head dims need no padding: a block spans the whole head dim, which the TPU tiling rule
accepts whatever its size, and every head dim sits on lanes (never sublanes) in every tile
and matmul; Mosaic's matmul masks the lanes past a short contraction (its layout pass, which
runs only where a TPU compiles the kernel, never here). K/V heads are never
repeated: the index maps send query head ``n`` to key head ``n // (N / Kk)`` and value head
``n // (N / Kv)`` (GQA/MQA, or separate key and value head counts); the value head dim Hv
may differ from H (MLA).

Masks are data: :func:`pallas_kernels.common.masks.block_metadata` classifies every
(query block, key block) tile as EMPTY, PARTIAL or FULL from the positions and segment ids;
the flags and per-block loop bounds reach the kernel through scalar prefetch (SMEM). EMPTY
tiles are skipped (and their K/V copies elided, because the index map clamps the key block
into the non-empty range), FULL tiles run without the elementwise mask, and only PARTIAL
tiles evaluate :func:`~pallas_kernels.common.masks.visible`. Masked logits use the finite
``MASK_VALUE``; a row that sees no key gives 0 output and an LSE of ``-inf``. PARTIAL tiles
also read the operands of their matmuls (v; k, q, dO in the backward) through
:func:`~pallas_kernels.common.masks.finite_or_zero` and select ds: a masked pair's weight is
0, but 0 * NaN is NaN, and garbage where a row cannot see must never reach it.

The backward kernels are in :mod:`pallas_kernels.tpu.flash_bwd`, the tile helpers shared with
them in :mod:`pallas_kernels.tpu._common`.
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

from pallas_kernels.common.checks import DefaultConfig, check_attention_inputs, check_config
from pallas_kernels.common.masks import (
    FULL,
    MASK_VALUE,
    PARTIAL,
    BlockMetadata,
    MaskSpec,
    finite_or_zero,
    tile_metadata,
)
from pallas_kernels.common.static_args import check_int
from pallas_kernels.tpu._common import (
    NN,
    NUM_LANES,
    NUM_SUBLANES,
    ROW_SEMANTICS,
    compiler_params,
    pad_axis,
    q_row_specs,
    ref_tile_mask,
    round_up,
    tile_logits,
)
from pallas_kernels.tpu.flash_bwd import flash_dkv, flash_dq

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TpuFlashConfig(DefaultConfig):
    """Block sizes of the TPU flash attention kernels (untuned: no TPU to tune on).

    A block is the number of queries (``block_q*``) or keys (``block_kv*``) in one tile.
    Blocks that lie on the lane (minor) axis of some tile must be multiples of 128; the
    others multiples of 8 (the sublane count). A sequence shorter than a block is handled
    as one block covering the whole (padded) sequence, which TPUs always accept.

    Attributes:
      block_q, block_kv: forward tiles; logits [block_q, block_kv] (keys on lanes).
      block_q_dq, block_kv_dq: dQ kernel tiles (keys on lanes; the LSE row puts queries on
        lanes too).
      block_q_dkv, block_kv_dkv: dK/dV kernel tiles, transposed: logits [block_kv_dkv,
        block_q_dkv] (queries on lanes).
    """

    block_q: int = 512
    block_kv: int = 512
    block_q_dq: int = 512
    block_kv_dq: int = 512
    block_q_dkv: int = 512
    block_kv_dkv: int = 512

    _LANE_FIELDS = ("block_kv", "block_q_dq", "block_kv_dq", "block_q_dkv")
    _SUBLANE_FIELDS = ("block_q", "block_kv_dkv")

    def __post_init__(self) -> None:
        for name in self._LANE_FIELDS + self._SUBLANE_FIELDS:
            value = check_int(name, getattr(self, name))
            object.__setattr__(self, name, value)
            multiple = NUM_LANES if name in self._LANE_FIELDS else NUM_SUBLANES
            if value % multiple:
                what = "lane width" if multiple == NUM_LANES else "sublane count"
                raise ValueError(
                    f"{name}={value} is not legal on TPU: it must be a multiple of {multiple} "
                    f"(the {what}); try {name}={round_up(value, multiple)}"
                )


# ----------------------------------------------------------------------------- layout


def _fit(block: int, length: int) -> int:
    """The block used for an axis of ``length``: ``block``, or the whole 8-padded axis if
    shorter (a block equal to the array dim is legal whatever its size)."""
    return min(block, round_up(length, NUM_SUBLANES))


def _heads_major(x: jax.Array, length: int) -> jax.Array:
    """[B, T, N, H] -> [B, N, T_pad, H], zero-padded along T."""
    return pad_axis(jnp.swapaxes(x, 1, 2), 2, length)


def _lane_column(x: jax.Array, length: int) -> jax.Array:
    """[..., T] int -> [..., T_pad, NUM_LANES]: one value per sublane row, repeated on lanes."""
    x = pad_axis(x, x.ndim - 1, length, mode="edge")
    return jnp.broadcast_to(x[..., None], (*x.shape, NUM_LANES))


def _sublane_row(x: jax.Array, length: int) -> jax.Array:
    """[..., T] -> [..., 1, T_pad]: values along lanes."""
    return pad_axis(x, x.ndim - 1, length, mode="edge")[..., None, :]


def _row_bnt(x: jax.Array, length: int) -> jax.Array:
    """[B, T, N] f32 -> [B, N, 1, T_pad] (zero-padded)."""
    return pad_axis(jnp.swapaxes(x, 1, 2), 2, length)[:, :, None, :]


def _metadata(spec: MaskSpec, q_pos: jax.Array, kv_pos: jax.Array, q_seg: jax.Array | None,
              kv_seg: jax.Array | None, *, block_q: int, block_kv: int) -> BlockMetadata:
    """:func:`~pallas_kernels.common.masks.tile_metadata` flattened to 1-D int32 arrays, the
    form scalar prefetch (SMEM) takes."""
    md = tile_metadata(spec, q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv)
    return BlockMetadata(*(x.reshape(-1).astype(jnp.int32) for x in md))


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(
    kind_ref,  # [Bm * nq * nk] int32 (SMEM): EMPTY / PARTIAL / FULL per tile
    kv_lo_ref,  # [Bm * nq] int32 (SMEM): first non-empty kv block of each q block
    kv_hi_ref,  # [Bm * nq] int32 (SMEM): one past the last non-empty kv block
    q_ref,  # [bq, H]
    k_ref,  # [bkv, H]
    v_ref,  # [bkv, Hv]
    q_pos_ref,  # [bq, NUM_LANES] int32, lane-broadcast
    kv_pos_ref,  # [1, bkv] int32
    q_seg_ref,  # [bq, NUM_LANES] int32, lane-broadcast, or None
    kv_seg_ref,  # [1, bkv] int32, or None
    out_ref,  # [bq, Hv]
    lse_ref,  # [bq, NUM_LANES] f32, lane-broadcast
    *refs,
    # refs: with_entropy: ent_ref ([bq, NUM_LANES] f32 out, lane-broadcast), then scratch
    # m_ref, l_ref, acc_ref, u_ref; else only m_ref, l_ref, acc_ref. Scratch:
    # m_ref [bq, NUM_LANES] f32 running row max (lane-broadcast); l_ref [bq, NUM_LANES] f32
    # running row sum of exp; acc_ref [bq, Hv] f32 unnormalized output; u_ref [bq, NUM_LANES]
    # f32 running sum_j exp(z_j - m) (z_j - m) (entropy only).
    spec: MaskSpec,
    scale: float,
    soft_cap: float | None,
    kv_len: int,
    bkv: int,
    nq: int,
    nk: int,
    per_batch: bool,
    with_entropy: bool = False,
):
    del kv_lo_ref, kv_hi_ref  # used by the index maps only
    if with_entropy:
        ent_ref, m_ref, l_ref, acc_ref, u_ref = refs
    else:
        m_ref, l_ref, acc_ref = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b if per_batch else 0
    kind = kind_ref[(row * nq + i) * nk + j]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, MASK_VALUE)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)
        if with_entropy:
            u_ref[...] = jnp.zeros_like(u_ref)

    def step(masked: bool):
        z, _ = tile_logits(q_ref[...], k_ref[...], scale=scale, soft_cap=soft_cap)  # [bq, bkv]
        mask = None
        if masked:
            mask = ref_tile_mask(spec, (q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref), j, bkv,
                                 kv_len)
        v = v_ref[...]
        if mask is not None:
            z = jnp.where(mask, z, MASK_VALUE)
            v = finite_or_zero(v)  # p is 0 on masked keys, but 0 * NaN is NaN
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(z, axis=-1, keepdims=True))  # [bq, NUM_LANES]
        d = z - m_next[:, :1]
        p = jnp.exp(d)
        if mask is not None:
            # A row with nothing visible so far has m_next == MASK_VALUE == z, so exp gives 1:
            # zero it explicitly.
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_next)  # [bq, NUM_LANES]
        l_prev = l_ref[...]
        l_ref[...] = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
        m_ref[...] = m_next
        if with_entropy:
            # u = sum_j exp(z_j - m) (z_j - m), kept relative to the running max (no
            # cancellation against large logits); re-basing to m_next adds (m - m_next) * l.
            # Masked entries have p == 0 and a finite d, so they add nothing.
            u_ref[...] = alpha * (u_ref[...] + (m_prev - m_next) * l_prev) + jnp.sum(
                p * d, axis=-1, keepdims=True
            )
        pv = lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=jnp.float32)
        acc_ref[...] = alpha[:, :1] * acc_ref[...] + pv

    pl.when(kind == FULL)(lambda: step(False))
    pl.when(kind == PARTIAL)(lambda: step(True))

    @pl.when(j == nk - 1)
    def _finish():
        row_sum = l_ref[...]
        seen = row_sum > 0.0
        l_safe = jnp.where(seen, row_sum, 1.0)
        out_ref[...] = (acc_ref[...] / l_safe[:, :1]).astype(out_ref.dtype)
        # -inf here is the public contract for a row that sees no key, not a logit.
        lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(l_safe), -jnp.inf)
        if with_entropy:
            # H = lse - sum_j p_j z_j = log(l) - u / l; 0 for a row that sees no key.
            ent_ref[...] = jnp.where(seen, jnp.log(l_safe) - u_ref[...] / l_safe, 0.0)


def _forward(
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, spec, scale, soft_cap, config, interpret,
    return_entropy=False,
) -> tuple[jax.Array, ...]:
    """(out [B, T, N, Hv], lse [B, T, N]) and, with ``return_entropy``, entropy [B, T, N]."""
    b, t, n, h = q.shape
    s, hv = k.shape[1], v.shape[3]
    bq, bkv = _fit(config.block_q, t), _fit(config.block_kv, s)
    t_pad, s_pad = round_up(t, bq), round_up(s, bkv)
    nq, nk = t_pad // bq, s_pad // bkv
    per_batch = q_seg is not None
    md = _metadata(spec, q_pos, kv_pos, q_seg, kv_seg, block_q=bq, block_kv=bkv)

    q_map, k_map, v_map, mask_specs = q_row_specs(
        n // k.shape[2], n // v.shape[2], nq, per_batch, bq, bkv, q_seg is not None
    )
    in_specs = [
        pl.BlockSpec((None, None, bq, h), q_map),
        pl.BlockSpec((None, None, bkv, h), k_map),
        pl.BlockSpec((None, None, bkv, hv), v_map),
        *mask_specs,
    ]
    q_seg_c = kv_seg_r = None
    if q_seg is not None:
        q_seg_c, kv_seg_r = _lane_column(q_seg, t_pad), _sublane_row(kv_seg, s_pad)
    kernel = functools.partial(
        _fwd_kernel, spec=spec, scale=scale, soft_cap=soft_cap, kv_len=s, bkv=bkv, nq=nq,
        nk=nk, per_batch=per_batch, with_entropy=return_entropy,
    )
    out_specs = [
        pl.BlockSpec((None, None, bq, hv), q_map),
        pl.BlockSpec((None, None, bq, NUM_LANES), q_map),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((b, n, t_pad, hv), q.dtype),
        jax.ShapeDtypeStruct((b, n, t_pad, NUM_LANES), jnp.float32),
    ]
    scratch_shapes = [
        pltpu.VMEM((bq, NUM_LANES), jnp.float32),
        pltpu.VMEM((bq, NUM_LANES), jnp.float32),
        pltpu.VMEM((bq, hv), jnp.float32),
    ]
    if return_entropy:
        out_specs.append(pl.BlockSpec((None, None, bq, NUM_LANES), q_map))
        out_shape.append(jax.ShapeDtypeStruct((b, n, t_pad, NUM_LANES), jnp.float32))
        scratch_shapes.append(pltpu.VMEM((bq, NUM_LANES), jnp.float32))
    res = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, n, nq, nk),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch_shapes,
        ),
        out_shape=out_shape,
        compiler_params=compiler_params(ROW_SEMANTICS, interpret),
        interpret=interpret,
        name="attnlab_tpu_flash_fwd",
    )(
        md.kind, md.kv_start, md.kv_stop,
        _heads_major(q, t_pad), _heads_major(k, s_pad), _heads_major(v, s_pad),
        _lane_column(q_pos, t_pad), _sublane_row(kv_pos, s_pad), q_seg_c, kv_seg_r,
    )
    out = jnp.swapaxes(res[0][:, :, :t], 1, 2)  # [B, T, N, Hv]
    rows = (jnp.swapaxes(x[:, :, :t, 0], 1, 2) for x in res[1:])  # lse[, entropy]: [B, T, N]
    return (out, *rows)


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11, 12))
def _flash(
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, spec, scale, soft_cap, config, interpret,
    return_entropy,
):
    return _forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, spec, scale, soft_cap, config,
                    interpret, return_entropy)


def _flash_fwd(
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, spec, scale, soft_cap, config, interpret,
    return_entropy,
):
    res = _forward(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, spec, scale, soft_cap, config, interpret,
        return_entropy,
    )
    return res, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, *res)


def flash_vjp_bwd(spec, scale, soft_cap, config, interpret, return_entropy, res, cts):
    """The backward rule of ``flash_attention``'s custom VJP: (dq, dk, dv, None x 4).

    ``res`` is what the forward rule saves, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out,
    lse[, entropy]); ``cts`` the cotangents of (out, lse[, entropy]). Public because
    ``attnlab.ops.attention_grad`` calls it on residuals it assembles itself.
    """
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res[:9]
    d_out, d_lse = cts[:2]
    t, s = q.shape[1], k.shape[1]
    per_batch = q_seg is not None
    # d lse / d z = p, so the LSE cotangent folds into delta: ds = p * (dp - (delta - d_lse)).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = delta - d_lse.astype(jnp.float32)  # [B, T, N]
    seen = jnp.isfinite(lse)
    ent_rows = None
    if return_entropy:
        # The entropy cotangent dH adds -dH * p * (z - c) to dz, c = lse - H per row; both are
        # 0 for rows that see no key (whose p is 0 by mask anyway).
        ent, d_ent = res[9], cts[2]
        ent_rows = (
            jnp.where(seen, d_ent.astype(jnp.float32), 0.0), jnp.where(seen, lse - ent, 0.0)
        )
    lse = jnp.where(seen, lse, 0.0)  # rows that see no key get p = 0 by mask
    common = dict(spec=spec, scale=scale, soft_cap=soft_cap, kv_len=s, per_batch=per_batch,
                  interpret=interpret)

    def run(kernel, block_q: int, block_kv: int, keys_on_lanes: bool):
        # The dQ kernel puts keys on lanes and walks kv blocks; the dK/dV kernel is its
        # transpose (queries on lanes) and walks q blocks.
        bq, bkv = _fit(block_q, t), _fit(block_kv, s)
        t_pad, s_pad = round_up(t, bq), round_up(s, bkv)
        md = _metadata(spec, q_pos, kv_pos, q_seg, kv_seg, block_q=bq, block_kv=bkv)
        ent_pad = None if ent_rows is None else tuple(_row_bnt(x, t_pad) for x in ent_rows)
        q_lay, kv_lay = (
            (_lane_column, _sublane_row) if keys_on_lanes else (_sublane_row, _lane_column)
        )
        bounds = (md.kv_start, md.kv_stop) if keys_on_lanes else (md.q_start, md.q_stop)
        return kernel(
            _heads_major(q, t_pad), _heads_major(k, s_pad), _heads_major(v, s_pad),
            _heads_major(d_out, t_pad), _row_bnt(lse, t_pad), _row_bnt(delta, t_pad),
            q_lay(q_pos, t_pad), kv_lay(kv_pos, s_pad),
            None if q_seg is None else q_lay(q_seg, t_pad),
            None if kv_seg is None else kv_lay(kv_seg, s_pad),
            (md.kind, *bounds), block_q=bq, block_kv=bkv, entropy=ent_pad, **common,
            **({} if keys_on_lanes else {"q_len": t}),
        )

    dq = run(flash_dq, config.block_q_dq, config.block_kv_dq, keys_on_lanes=True)
    dk, dv = run(flash_dkv, config.block_q_dkv, config.block_kv_dkv, keys_on_lanes=False)
    dq = jnp.swapaxes(dq[:, :, :t], 1, 2)
    dk = jnp.swapaxes(dk[:, :, :s], 1, 2)
    dv = jnp.swapaxes(dv[:, :, :s], 1, 2)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, flash_vjp_bwd)


# ----------------------------------------------------------------------------- public


def flash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    *,
    spec: MaskSpec,
    scale: float,
    soft_cap: float | None = None,
    config: TpuFlashConfig | None = None,
    interpret: bool | pltpu.InterpretParams = False,
    return_entropy: bool = False,
) -> tuple[jax.Array, ...]:
    """Flash attention on TPU (Mosaic Pallas), with a kernel backward pass.

    Args:
      q: [B, T, N, H] queries, float32 or bfloat16.
      k: [B, S, Kk, H] keys; v: [B, S, Kv, Hv] values. N must be a multiple of Kk and of Kv:
        query head n reads key head n // (N / Kk) and value head n // (N / Kv). Any head
        dims H, Hv >= 1.
      q_positions: [T] int32 global query positions; kv_positions: [S] int32.
      q_segment_ids, kv_segment_ids: [B, T] / [B, S] int32 packed-document ids, or both None.
      spec: the static mask (causal, window).
      scale: logits scale.
      soft_cap: c: logits become c * tanh(logits / c); None for no cap.
      config: block sizes; :class:`TpuFlashConfig` with its defaults if None.
      interpret: False to compile with Mosaic (TPU only); an ``InterpretParams`` (or True for
        the default one) to run in TPU interpret mode on CPU, the only mode verified so far.
      return_entropy: (static) also compute each row's attention entropy
        ``H = -sum_j p_j log p_j = lse - sum_j p_j z_j`` (z the final logits), accumulated
        online in the forward kernel; differentiable. When False the kernels are exactly
        those without it.

    Returns:
      (out [B, T, N, Hv] in q's dtype, lse [B, T, N] float32), and with ``return_entropy`` a
      third element, entropy [B, T, N] float32. A row that sees no key gives 0 output, lse
      -inf and entropy 0.

    Raises:
      ValueError: shapes, head counts, dtypes or arguments that do not fit.

    Example:
      >>> out, lse = flash_attention(q, k, v, jnp.arange(T), jnp.arange(S),
      ...     spec=MaskSpec(causal=True), scale=H ** -0.5, interpret=True)
    """
    b, t, n, h, s, kh = check_attention_inputs(
        q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
        dtypes=SUPPORTED_DTYPES,
    )
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be positive or None, got {soft_cap}")
    config = check_config(config, TpuFlashConfig)
    if interpret is True:
        interpret = pltpu.InterpretParams()

    def ids(x: Any) -> jax.Array | None:
        return None if x is None else jnp.asarray(x, jnp.int32)

    return _flash(
        q, k, v, ids(q_positions), ids(kv_positions), ids(q_segment_ids), ids(kv_segment_ids),
        spec, float(scale), None if soft_cap is None else float(soft_cap), config, interpret,
        bool(return_entropy),
    )
