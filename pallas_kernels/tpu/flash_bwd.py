"""Flash attention backward as Mosaic TPU Pallas kernels: one for dQ, one for dK/dV.

Lowered for TPU (v4, v5e, v5p, v6e), verified in interpret mode
(``interpret=pltpu.InterpretParams()`` on CPU), never run on a TPU: no TPU is available to the
project, so these kernels have been lowered from CPU (``tests/pallas_kernels/
test_tpu_lowering.py``) but never compiled by Mosaic or timed on a chip.

Both kernels recompute the probabilities of a tile from the log-sum-exp saved by the forward
pass, ``p = exp(z - lse)``, and use ``delta = rowsum(dO * O) - dLSE`` computed in JAX, so the
cotangent of the returned LSE is folded in exactly as in :mod:`attnlab.ops.backends.attention_xla`:

    ds = p * (dO v^T - delta),   dz/draw = 1 - tanh(raw / cap)^2 (soft-cap),
    dq = scale * ds k,   dk = scale * ds^T q,   dv = p^T dO.

With the entropy output (``entropy=(dH, c)`` rows, c = lse - H) its cotangent adds
``- dH * p * (z - c)`` to ds before the soft-cap chain rule; without it the kernels are
unchanged.

PARTIAL tiles select ``p`` and ``ds`` by the mask (padded query rows included in dK/dV) and
read the operands they sum over masked pairs (k; q and dO) through
:func:`~pallas_kernels.common.masks.finite_or_zero`: garbage where a row cannot see never
reaches a visible position's gradient.

The dQ kernel walks a query block's key blocks as its reduction axis; the dK/dV kernel walks
the query blocks of every query head of a query group: a KV head's group (GQA/MQA), or with
separate key and value head counts Kk != Kv one of the lcm(Kk, Kv) groups that read one key
head and one value head, whose float32 dK/dV are summed per head afterwards. K/V are never
repeated.
It works in the transposed orientation (keys on sublanes, queries on lanes), so no tile is
transposed inside the kernel.

The tile helpers shared with the forward, decode and lightning kernels are in
:mod:`pallas_kernels.tpu._common`. Arrays arrive here already in kernel layout;
:mod:`pallas_kernels.tpu.flash` does the layout.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common.masks import FULL, PARTIAL, MaskSpec, finite_or_zero
from pallas_kernels.tpu._common import (
    NN,
    NT,
    NUM_LANES,
    ROW_SEMANTICS,
    clamp_block,
    compiler_params,
    head_of,
    q_row_specs,
    ref_tile_mask,
    tile_logits,
)


def soft_cap_grad(dz: jax.Array, raw: jax.Array, soft_cap: float | None) -> jax.Array:
    """Chain rule through ``cap * tanh(raw / cap)``."""
    if soft_cap is None:
        return dz
    t = jnp.tanh(raw / soft_cap)
    return dz * (1.0 - t * t)


def _grad_in_specs(
    q_map: Any, k_map: Any, v_map: Any, row_map: Any, block_q: int, block_kv: int, h: int,
    hv: int, entropy: Any,
) -> list[Any]:
    """Block specs of (q, k, v, dO, lse, delta, dH, c), the inputs both backward kernels take
    alike (the row terms [B, N, 1, T_pad]; dH and c are None without entropy)."""
    row = pl.BlockSpec((None, None, 1, block_q), row_map)
    return [
        pl.BlockSpec((None, None, block_q, h), q_map),
        pl.BlockSpec((None, None, block_kv, h), k_map),
        pl.BlockSpec((None, None, block_kv, hv), v_map),
        pl.BlockSpec((None, None, block_q, hv), q_map),
        row,
        row,
        *((None, None) if entropy is None else (row, row)),
    ]


# ----------------------------------------------------------------------------- dQ kernel


def _dq_kernel(
    kind_ref,  # [Bm * nq * nk] int32 (SMEM): EMPTY / PARTIAL / FULL per tile
    kv_lo_ref,  # [Bm * nq] int32 (SMEM): first non-empty kv block of each q block
    kv_hi_ref,  # [Bm * nq] int32 (SMEM): one past the last non-empty kv block
    q_ref,  # [bq, H]
    k_ref,  # [bkv, H]
    v_ref,  # [bkv, Hv]
    do_ref,  # [bq, Hv]
    lse_ref,  # [1, bq] f32 (0 for rows that see no key)
    delta_ref,  # [1, bq] f32: rowsum(dO * O) - dLSE
    dh_ref,  # [1, bq] f32 entropy cotangent, or None (no entropy)
    c_ref,  # [1, bq] f32 lse - entropy, or None (no entropy)
    q_pos_ref,  # [bq, NUM_LANES] int32, lane-broadcast
    kv_pos_ref,  # [1, bkv] int32
    q_seg_ref,  # [bq, NUM_LANES] int32, lane-broadcast, or None
    kv_seg_ref,  # [1, bkv] int32, or None
    dq_ref,  # [bq, H] out
    dq_acc_ref,  # [bq, H] f32 scratch
    *,
    spec: MaskSpec,
    scale: float,
    soft_cap: float | None,
    kv_len: int,
    bkv: int,
    nq: int,
    nk: int,
    per_batch: bool,
):
    del kv_lo_ref, kv_hi_ref  # used by the index maps only
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b if per_batch else 0
    kind = kind_ref[(row * nq + i) * nk + j]

    @pl.when(j == 0)
    def _init():
        dq_acc_ref[...] = jnp.zeros_like(dq_acc_ref)

    def step(masked: bool):
        q = q_ref[...]
        k = k_ref[...]
        z, raw = tile_logits(q, k, scale=scale, soft_cap=soft_cap)  # [bq, bkv]
        lse = jnp.expand_dims(lse_ref[0], -1)  # [bq, 1]
        delta = jnp.expand_dims(delta_ref[0], -1)  # [bq, 1]
        p = jnp.exp(z - lse)
        mask = None
        if masked:
            mask = ref_tile_mask(spec, (q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref), j, bkv,
                                 kv_len)
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
        do = do_ref[...]
        dp = lax.dot_general(do, v_ref[...], NT, preferred_element_type=jnp.float32)
        dz = dp - delta
        if dh_ref is not None:
            dh = jnp.expand_dims(dh_ref[0], -1)  # [bq, 1]
            c = jnp.expand_dims(c_ref[0], -1)  # [bq, 1]
            dz = dz - dh * (z - c)
        ds = soft_cap_grad(p * dz, raw, soft_cap) * scale
        if mask is not None:
            # Select, don't multiply: a row's NaN lse, delta or dO, or a masked key's NaN v
            # or k, must not reach masked pairs or the sum over them (0 * NaN is NaN).
            ds = jnp.where(mask, ds, 0.0)
            k = finite_or_zero(k)
        dq_acc_ref[...] += lax.dot_general(
            ds.astype(k.dtype), k, NN, preferred_element_type=jnp.float32
        )

    pl.when(kind == FULL)(lambda: step(False))
    pl.when(kind == PARTIAL)(lambda: step(True))

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = dq_acc_ref[...].astype(dq_ref.dtype)


def flash_dq(
    q: jax.Array,  # [B, N, T_pad, H]
    k: jax.Array,  # [B, Kk, S_pad, H]
    v: jax.Array,  # [B, Kv, S_pad, Hv]
    do: jax.Array,  # [B, N, T_pad, Hv]
    lse: jax.Array,  # [B, N, 1, T_pad] f32
    delta: jax.Array,  # [B, N, 1, T_pad] f32
    q_pos: jax.Array,  # [T_pad, NUM_LANES] int32
    kv_pos: jax.Array,  # [1, S_pad] int32
    q_seg: jax.Array | None,  # [B, T_pad, NUM_LANES] int32
    kv_seg: jax.Array | None,  # [B, 1, S_pad] int32
    meta: tuple[jax.Array, jax.Array, jax.Array],  # flat (kind, kv_lo, kv_hi)
    *,
    spec: MaskSpec,
    scale: float,
    soft_cap: float | None,
    kv_len: int,
    block_q: int,
    block_kv: int,
    per_batch: bool,
    interpret: Any,
    entropy: tuple[jax.Array, jax.Array] | None = None,  # ([B, N, 1, T_pad] f32 dH, c)
) -> jax.Array:
    """dQ [B, N, T_pad, H] in q's dtype, in kernel layout (the caller slices off padding)."""
    b, n, t_pad, h = q.shape
    s_pad = k.shape[2]
    nq, nk = t_pad // block_q, s_pad // block_kv

    q_map, k_map, v_map, mask_specs = q_row_specs(
        n // k.shape[1], n // v.shape[1], nq, per_batch, block_q, block_kv, q_seg is not None
    )

    def row_map(bi, ni, i, j, kind_ref, lo_ref, hi_ref):
        return bi, ni, 0, i

    in_specs = [
        *_grad_in_specs(q_map, k_map, v_map, row_map, block_q, block_kv, h, v.shape[3],
                        entropy),
        *mask_specs,
    ]
    kernel = functools.partial(
        _dq_kernel, spec=spec, scale=scale, soft_cap=soft_cap, kv_len=kv_len, bkv=block_kv,
        nq=nq, nk=nk, per_batch=per_batch,
    )
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, n, nq, nk),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, block_q, h), q_map),
            scratch_shapes=[pltpu.VMEM((block_q, h), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params(ROW_SEMANTICS, interpret),
        interpret=interpret,
        name="attnlab_tpu_flash_dq",
    )(*meta, q, k, v, do, lse, delta, *(entropy or (None, None)), q_pos, kv_pos, q_seg, kv_seg)


# ----------------------------------------------------------------------------- dK/dV kernel


def _dkv_kernel(
    kind_ref,  # [Bm * nq * nk] int32 (SMEM): EMPTY / PARTIAL / FULL per tile
    q_lo_ref,  # [Bm * nk] int32 (SMEM): first non-empty q block of each kv block
    q_hi_ref,  # [Bm * nk] int32 (SMEM): one past the last non-empty q block
    q_ref,  # [bq, H]
    k_ref,  # [bkv, H]
    v_ref,  # [bkv, Hv]
    do_ref,  # [bq, Hv]
    lse_ref,  # [1, bq] f32 (0 for rows that see no key)
    delta_ref,  # [1, bq] f32: rowsum(dO * O) - dLSE
    dh_ref,  # [1, bq] f32 entropy cotangent, or None (no entropy)
    c_ref,  # [1, bq] f32 lse - entropy, or None (no entropy)
    q_pos_ref,  # [1, bq] int32
    kv_pos_ref,  # [bkv, NUM_LANES] int32, lane-broadcast
    q_seg_ref,  # [1, bq] int32, or None
    kv_seg_ref,  # [bkv, NUM_LANES] int32, lane-broadcast, or None
    dk_ref,  # [bkv, H] out
    dv_ref,  # [bkv, Hv] out
    dk_acc_ref,  # [bkv, H] f32 scratch
    dv_acc_ref,  # [bkv, Hv] f32 scratch
    *,
    spec: MaskSpec,
    scale: float,
    soft_cap: float | None,
    kv_len: int,
    q_len: int,
    bq: int,
    bkv: int,
    nq: int,
    nk: int,
    groups: int,
    per_batch: bool,
):
    del q_lo_ref, q_hi_ref  # used by the index maps only
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    row = b if per_batch else 0
    kind = kind_ref[(row * nq + i) * nk + j]

    @pl.when(jnp.logical_and(g == 0, i == 0))
    def _init():
        dk_acc_ref[...] = jnp.zeros_like(dk_acc_ref)
        dv_acc_ref[...] = jnp.zeros_like(dv_acc_ref)

    def step(masked: bool):
        q = q_ref[...]
        do = do_ref[...]
        # Transposed orientation: keys on sublanes, queries on lanes; [bkv, bq] tiles.
        z, raw = tile_logits(k_ref[...], q, scale=scale, soft_cap=soft_cap)
        p = jnp.exp(z - lse_ref[...])
        mask = None
        if masked:
            mask = ref_tile_mask(spec, (q_pos_ref, kv_pos_ref, q_seg_ref, kv_seg_ref), j, bkv,
                                 kv_len, keys_on_lanes=False, q_block=(i, bq, q_len))
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
        # Masked pairs (padded query rows included) add nothing, whatever the query, its dO,
        # lse or delta hold: select, and read the summed operands through finite_or_zero.
        q_mm, do_mm = (q, do) if mask is None else (finite_or_zero(q), finite_or_zero(do))
        dv_acc_ref[...] += lax.dot_general(
            p.astype(do.dtype), do_mm, NN, preferred_element_type=jnp.float32
        )
        dp = lax.dot_general(v_ref[...], do, NT, preferred_element_type=jnp.float32)
        dz = dp - delta_ref[...]
        if dh_ref is not None:
            dz = dz - dh_ref[...] * (z - c_ref[...])
        ds = soft_cap_grad(p * dz, raw, soft_cap) * scale
        if mask is not None:
            ds = jnp.where(mask, ds, 0.0)
        dk_acc_ref[...] += lax.dot_general(
            ds.astype(q.dtype), q_mm, NN, preferred_element_type=jnp.float32
        )

    pl.when(kind == FULL)(lambda: step(False))
    pl.when(kind == PARTIAL)(lambda: step(True))

    @pl.when(jnp.logical_and(g == groups - 1, i == nq - 1))
    def _finish():
        dk_ref[...] = dk_acc_ref[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def flash_dkv(
    q: jax.Array,  # [B, N, T_pad, H]
    k: jax.Array,  # [B, Kk, S_pad, H]
    v: jax.Array,  # [B, Kv, S_pad, Hv]
    do: jax.Array,  # [B, N, T_pad, Hv]
    lse: jax.Array,  # [B, N, 1, T_pad] f32
    delta: jax.Array,  # [B, N, 1, T_pad] f32
    q_pos: jax.Array,  # [1, T_pad] int32
    kv_pos: jax.Array,  # [S_pad, NUM_LANES] int32
    q_seg: jax.Array | None,  # [B, 1, T_pad] int32
    kv_seg: jax.Array | None,  # [B, S_pad, NUM_LANES] int32
    meta: tuple[jax.Array, jax.Array, jax.Array],  # flat (kind, q_lo, q_hi)
    *,
    spec: MaskSpec,
    scale: float,
    soft_cap: float | None,
    kv_len: int,
    block_q: int,
    block_kv: int,
    per_batch: bool,
    interpret: Any,
    entropy: tuple[jax.Array, jax.Array] | None = None,  # ([B, N, 1, T_pad] f32 dH, c)
    q_len: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(dK [B, Kk, S_pad, H], dV [B, Kv, S_pad, Hv]) in k's / v's dtype, in kernel layout.

    The grid is (B, Kc, kv blocks, G, q blocks) over the Kc = lcm(Kk, Kv) query groups of
    G = N / Kc heads (each group reads one key head and one value head); the last two axes
    are the reduction, so a group's G query heads accumulate into one dK/dV block. With
    Kk == Kv (GQA/MQA) the groups are the KV heads and the kernel writes dK/dV directly; else
    it writes one float32 block per group and the groups that share a key (value) head are
    summed here. ``q_len``: the real query rows (None: T_pad); the padded ones are masked,
    whatever they hold.
    """
    b, n, t_pad, h = q.shape
    q_len = t_pad if q_len is None else q_len
    kk, kv, s_pad, hv = k.shape[1], v.shape[1], k.shape[2], v.shape[3]
    kc = math.lcm(kk, kv)
    g, rk, rv = n // kc, kc // kk, kc // kv  # heads per group; groups per k head, per v head
    nq, nk = t_pad // block_q, s_pad // block_kv

    def q_i(bi, i, j, q_lo_ref, q_hi_ref):
        r = (bi if per_batch else 0) * nk + j
        return clamp_block(i, q_lo_ref[r], q_hi_ref[r])

    def q_map(bi, ci, j, gi, i, kind_ref, lo_ref, hi_ref):
        return bi, ci * g + gi, q_i(bi, i, j, lo_ref, hi_ref), 0

    def row_map(bi, ci, j, gi, i, kind_ref, lo_ref, hi_ref):
        return bi, ci * g + gi, 0, q_i(bi, i, j, lo_ref, hi_ref)

    def k_map(bi, ci, j, gi, i, *_):
        return bi, head_of(ci, rk), j, 0

    def v_map(bi, ci, j, gi, i, *_):
        return bi, head_of(ci, rv), j, 0

    def out_map(bi, ci, j, gi, i, *_):
        return bi, ci, j, 0

    in_specs = _grad_in_specs(q_map, k_map, v_map, row_map, block_q, block_kv, h, hv, entropy)
    in_specs += [
        pl.BlockSpec(
            (1, block_q), lambda bi, ci, j, gi, i, kd, lo, hi: (0, q_i(bi, i, j, lo, hi))
        ),
        pl.BlockSpec((block_kv, NUM_LANES), lambda bi, ci, j, gi, i, *_: (j, 0)),
    ]
    if q_seg is None:
        in_specs += [None, None]
    else:
        in_specs += [
            pl.BlockSpec(
                (None, 1, block_q),
                lambda bi, ci, j, gi, i, kd, lo, hi: (bi, 0, q_i(bi, i, j, lo, hi)),
            ),
            pl.BlockSpec((None, block_kv, NUM_LANES), lambda bi, ci, j, gi, i, *_: (bi, j, 0)),
        ]
    kernel = functools.partial(
        _dkv_kernel, spec=spec, scale=scale, soft_cap=soft_cap, kv_len=kv_len, q_len=q_len,
        bq=block_q, bkv=block_kv, nq=nq, nk=nk, groups=g, per_batch=per_batch,
    )
    dk, dv = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(b, kc, nk, g, nq),
            in_specs=in_specs,
            out_specs=[
                pl.BlockSpec((None, None, block_kv, h), out_map),
                pl.BlockSpec((None, None, block_kv, hv), out_map),
            ],
            scratch_shapes=[
                pltpu.VMEM((block_kv, h), jnp.float32),
                pltpu.VMEM((block_kv, hv), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((b, kc, s_pad, h), k.dtype if rk == 1 else jnp.float32),
            jax.ShapeDtypeStruct((b, kc, s_pad, hv), v.dtype if rv == 1 else jnp.float32),
        ],
        compiler_params=compiler_params(("parallel",) * 3 + ("arbitrary",) * 2, interpret),
        interpret=interpret,
        name="attnlab_tpu_flash_dkv",
    )(*meta, q, k, v, do, lse, delta, *(entropy or (None, None)), q_pos, kv_pos, q_seg, kv_seg)
    return _fold_groups(dk, kk).astype(k.dtype), _fold_groups(dv, kv).astype(v.dtype)


def _fold_groups(dx: jax.Array, heads: int) -> jax.Array:
    """[B, Kc, S, D] per-query-group gradients summed to ``heads`` heads (a no-op if equal)."""
    b, kc, s, d = dx.shape
    return dx if kc == heads else dx.reshape(b, heads, kc // heads, s, d).sum(2)
