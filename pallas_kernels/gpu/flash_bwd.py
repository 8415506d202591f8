"""Flash attention backward on GPU: dQ and dK/dV Pallas kernels lowered to Triton.

Both kernels recompute the probabilities of a tile from the saved log-sum-exp,
``p = exp2(s - lse2)``, instead of storing them, and use the same per-tile mask metadata as
the forward pass (loops bounded by the non-empty range, an unmasked run of FULL tiles,
EMPTY tiles skipped). With ``delta = rowsum(dO * O) - dLSE`` (computed in JAX; the LSE
cotangent folds in because d lse / d z = p)::

    dp = dO V^T            dz = p * (dp - delta)       (times 1 - tanh^2 under a soft cap)
    dV = p^T dO            dK = scale * dz^T Q          dQ = scale * dz K

With ``return_entropy`` the entropy cotangent dH adds ``- dH * p * (z - c)`` to dz, where
``c = sum_j p_j z_j = lse - H`` (dH and c are per-row terms like delta; in the log2 domain
``z - c = ln2 * (s - c2)``). Without it the kernels are exactly those without the term.

* dK/dV: one program per (kv block, batch, kv head); it loops over the G query heads of its
  group and over the query blocks that see the kv block, so GQA needs no atomics and no
  repeated K/V. With separate key and value head counts (Kk != Kv) the programs run per
  query group of the finer split (lcm(Kk, Kv) groups) and the groups' dK/dV are summed.
  It works on transposed tiles (s^T = K Q^T, [block_kv, block_q]) so that no accumulator
  is ever transposed.
* dQ: one program per (q block, batch, q head), looping over kv blocks.

On partially masked tiles both kernels select ``p`` and ``ds`` by the mask (padded query rows
included in dK/dV) and read the operands they sum over masked pairs (k; q and dO) through
:func:`~pallas_kernels.common.masks.finite_or_zero`: NaN where a row cannot see, or in a
garbage row's lse, delta or dO, never reaches a visible position's gradient.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common.masks import MASK_VALUE, MaskSpec, finite_or_zero, tile_mask
from pallas_kernels.gpu._common import (
    LN2,
    LOG2E,
    backward_row_terms,
    compiler_params,
    dot,
    dot_precision,
    kernel_head_dim,
    log2_logits,
    pad_axis,
    pad_head,
)
from pallas_kernels.gpu.flash_common import (
    FlashConfig,
    TilePlan,
    pad_inputs,
    q_block_specs,
    tile_loops,
    tiling,
)

# ----------------------------------------------------------------------------- dQ kernel


def _dq_kernel(
    bounds_ref,  # [4] int32: kv_start, run_start, run_stop, kv_stop of this q block
    kind_ref,  # [nk] int8: EMPTY / PARTIAL / FULL of each kv tile for this q block
    q_pos_ref,  # [bq] int32 global query positions
    kv_pos_ref,  # [Sp] int32 global key positions
    q_seg_ref,  # [bq] int32 query segment ids, or None
    kv_seg_ref,  # [Sp] int32 key segment ids, or None
    q_ref,  # [bq, H] queries of one (batch, q head)
    k_ref,  # [Sp, H] keys of kv head n // G
    v_ref,  # [Sp, Hv] values of kv head n // G
    do_ref,  # [bq, Hv] output cotangent
    lse_ref,  # [bq] f32 log2-domain LSE (0 for rows that see no key)
    delta_ref,  # [bq] f32 rowsum(dO * O) - dLSE
    dh_ref,  # [bq] f32 dH * ln2 (entropy cotangent), or None (no entropy)
    c_ref,  # [bq] f32 c2 = (lse - H) * log2(e), or None (no entropy)
    dq_ref,  # [bq, H] out
    *,
    spec: MaskSpec,
    scale: float,
    soft_cap: float | None,
    block_kv: int,
    kv_len: int | None,
    precision,
):
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    with_entropy = dh_ref is not None
    if with_entropy:
        e_dh = dh_ref[...][:, None]
        e_c = c_ref[...][:, None]
    q_pos = q_pos_ref[...][:, None]
    q_seg = None if q_seg_ref is None else q_seg_ref[...][:, None]

    def step(j, _head, dq, *, masked: bool):
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        s, t = log2_logits(dot(q, k, tb=True, precision=precision), scale, soft_cap)
        if masked:
            kv_pos = kv_pos_ref[pl.ds(start, block_kv)][None, :]
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[pl.ds(start, block_kv)][None, :]
            kv_idx = (start + jnp.arange(block_kv, dtype=jnp.int32))[None, :]
            mask = tile_mask(spec, q_pos, kv_pos, q_seg, kv_seg, kv_idx, kv_len)
            if mask is not None:
                s = jnp.where(mask, s, MASK_VALUE)
        else:
            mask = None
        p = jnp.exp2(s - lse)
        dp = dot(do, v, tb=True, precision=precision)
        ds = p * (dp - delta)
        if with_entropy:
            # (p * dH) first: masked p is exactly 0 and s - c2 is finite, so this stays 0.
            ds = ds - (p * e_dh) * (s - e_c)
        if t is not None:
            ds = ds * (1.0 - t * t)
        if mask is not None:
            # Select, don't multiply: a row's NaN lse, delta or dO, or a masked key's NaN v,
            # must not reach masked pairs, nor a masked key's NaN k the sum over them.
            ds = jnp.where(mask, ds, 0.0)
            k = finite_or_zero(k)
        return dq + dot(ds.astype(k.dtype), k, precision=precision)

    dq = tile_loops(
        bounds_ref, kind_ref, functools.partial(step, masked=True),
        functools.partial(step, masked=False), jnp.zeros(q.shape, jnp.float32),
    )
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- dK/dV kernel


def _dkv_kernel(
    bounds_ref,  # [4] int32: q_start, run_start, run_stop, q_stop of this kv block
    kind_ref,  # [nq] int8: EMPTY / PARTIAL / FULL of each q tile for this kv block
    q_pos_ref,  # [Tp] int32 global query positions
    kv_pos_ref,  # [bk] int32 global key positions
    q_seg_ref,  # [Tp] int32 query segment ids, or None
    kv_seg_ref,  # [bk] int32 key segment ids, or None
    q_ref,  # [Tp, G, H] queries of the G q heads that share this kv head
    k_ref,  # [bk, H] keys
    v_ref,  # [bk, Hv] values
    do_ref,  # [Tp, G, Hv] output cotangent of the G q heads
    lse_ref,  # [G, Tp] f32 log2-domain LSE (0 for rows that see no key)
    delta_ref,  # [G, Tp] f32 rowsum(dO * O) - dLSE
    dh_ref,  # [G, Tp] f32 dH * ln2 (entropy cotangent), or None (no entropy)
    c_ref,  # [G, Tp] f32 c2 = (lse - H) * log2(e), or None (no entropy)
    dk_ref,  # [bk, H] out
    dv_ref,  # [bk, Hv] out
    *,
    spec: MaskSpec,
    scale: float,
    soft_cap: float | None,
    block_q: int,
    kv_len: int | None,
    q_len: int | None,
    precision,
):
    bk = k_ref.shape[0]
    groups = q_ref.shape[1]
    k = k_ref[...]
    v = v_ref[...]
    kv_pos = kv_pos_ref[...][:, None]
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...][:, None]
    kv_idx = (pl.program_id(0) * bk + jnp.arange(bk, dtype=jnp.int32))[:, None]

    def step(i, gi, carry, *, masked: bool):
        dk, dv = carry
        start = pl.multiple_of(i * block_q, block_q)
        q = q_ref[pl.ds(start, block_q), gi, :]
        do = do_ref[pl.ds(start, block_q), gi, :]
        lse = lse_ref[gi, pl.ds(start, block_q)][None, :]
        delta = delta_ref[gi, pl.ds(start, block_q)][None, :]
        s_t, t_t = log2_logits(dot(k, q, tb=True, precision=precision), scale, soft_cap)
        if masked:
            q_pos = q_pos_ref[pl.ds(start, block_q)][None, :]
            q_seg = None if q_seg_ref is None else q_seg_ref[pl.ds(start, block_q)][None, :]
            q_idx = (start + jnp.arange(block_q, dtype=jnp.int32))[None, :]
            mask = tile_mask(spec, q_pos, kv_pos, q_seg, kv_seg, kv_idx, kv_len, q_idx, q_len)
            if mask is not None:
                s_t = jnp.where(mask, s_t, MASK_VALUE)
        else:
            mask = None
        p_t = jnp.exp2(s_t - lse)  # [bk, bq]
        q_mm, do_mm = q, do
        if mask is not None:
            # Select, don't multiply: masked pairs (padded query rows included) add nothing,
            # whatever the query, its dO, lse or delta hold (0 * NaN is NaN).
            p_t = jnp.where(mask, p_t, 0.0)
            q_mm, do_mm = finite_or_zero(q), finite_or_zero(do)
        dv = dv + dot(p_t.astype(do.dtype), do_mm, precision=precision)
        dp_t = dot(v, do, tb=True, precision=precision)
        ds_t = p_t * (dp_t - delta)
        if dh_ref is not None:
            e_dh = dh_ref[gi, pl.ds(start, block_q)][None, :]
            e_c = c_ref[gi, pl.ds(start, block_q)][None, :]
            ds_t = ds_t - (p_t * e_dh) * (s_t - e_c)
        if t_t is not None:
            ds_t = ds_t * (1.0 - t_t * t_t)
        if mask is not None:
            ds_t = jnp.where(mask, ds_t, 0.0)
        dk = dk + dot(ds_t.astype(q.dtype), q_mm, precision=precision)
        return dk, dv

    # Every q block of every head in the group; one flat loop per kind of tile.
    dk, dv = tile_loops(
        bounds_ref, kind_ref, functools.partial(step, masked=True),
        functools.partial(step, masked=False),
        (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)), fold=groups,
    )
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- wrapper


def flash_backward(
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, plan: TilePlan, out, lse, d_out, d_lse, *,
    spec: MaskSpec, scale: float, soft_cap: float | None, config: FlashConfig, interpret: bool,
    ent=None, d_ent=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of ``flash_attention`` with respect to q, k, v.

    Args:
      q, k, v, q_pos, kv_pos, q_seg, kv_seg: the forward inputs (unpadded).
      plan: the forward's :class:`TilePlan` (its dq / dkv parts are used here).
      out: [B, T, N, Hv] and lse: [B, T, N] f32, the forward outputs.
      d_out, d_lse: their cotangents.
      ent, d_ent: the forward's entropy [B, T, N] f32 and its cotangent, or both None (the
        forward ran without ``return_entropy``).

    Returns:
      (dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, Hv]) in the input dtypes.
    """
    b, t, n, h_in = q.shape
    s, kk, kv, hv_in = k.shape[1], k.shape[2], v.shape[2], v.shape[-1]
    # Query head n reads k head n // gk and v head n // gv. The dK/dV programs run over the
    # kc = lcm(Kk, Kv) query groups (g heads each); with Kk != Kv their per-group dK/dV are
    # summed to the key and value heads afterwards (in float32).
    gk, gv, kc = n // kk, n // kv, math.lcm(kk, kv)
    g = n // kc
    h, hv = kernel_head_dim(h_in), kernel_head_dim(hv_in)
    tiles = tiling(config, t, s)
    (bq_dq, bk_dq), (bq_kv, bk_kv) = tiles.dq, tiles.dkv
    tp, sp = tiles.bwd_tp, tiles.bwd_sp
    kv_len = None if sp == s else s
    precision = dot_precision(q.dtype)
    params = compiler_params(config, "bwd")

    # Per-row terms, laid out [B, N, Tp] so kernels read them contiguously. Padded rows get
    # delta = 0 and dO = 0, so they contribute nothing; lse2 = 0 keeps their p finite.
    lse2, delta = backward_row_terms(out, lse, d_out, d_lse)
    delta = pad_axis(jnp.swapaxes(delta, 1, 2), 2, tp)
    lse2 = pad_axis(jnp.swapaxes(lse2, 1, 2), 2, tp)
    e_dh = e_c = None
    if ent is not None:
        # [B, N, Tp]: dH * ln2 and c2 = (lse - H) * log2(e); 0 for unseen and padded rows.
        seen = jnp.isfinite(lse)
        e_dh = jnp.where(seen, d_ent.astype(jnp.float32) * LN2, 0.0)
        e_c = jnp.where(seen, (lse - ent) * LOG2E, 0.0)
        e_dh = pad_axis(jnp.swapaxes(e_dh, 1, 2), 2, tp)
        e_c = pad_axis(jnp.swapaxes(e_c, 1, 2), 2, tp)
    qp, kp, vp, q_pos, kv_pos, q_seg, kv_seg = pad_inputs(
        pad_head(q, h), pad_head(k, h), pad_head(v, hv), q_pos, kv_pos, q_seg, kv_seg, tp, sp
    )
    do = pad_axis(pad_head(d_out, hv), 1, tp)
    common = dict(spec=spec, scale=scale, soft_cap=soft_cap, kv_len=kv_len, precision=precision)

    # dQ: grid over (q block, batch, q head), last q blocks first (they are the longest).
    qi, dq_specs = q_block_specs(plan.dq_kind, bq_dq, sp, h, hv, gk, gv, q_seg is not None)

    # Entropy row terms (only with return_entropy; None keeps the kernels unchanged).
    ent_spec_dq = ent_spec_dkv = None
    if e_dh is not None:
        ent_spec_dq = pl.BlockSpec((None, None, bq_dq), lambda i, bi, ni: (bi, ni, qi(i)))
        ent_spec_dkv = pl.BlockSpec((None, g, tp), lambda j, bi, ki: (bi, ki, 0))

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_kv=bk_dq, **common),
        grid=(plan.dq_kind.shape[1], b, n),
        in_specs=[
            *dq_specs,
            pl.BlockSpec((None, bq_dq, None, hv), lambda i, bi, ni: (bi, qi(i), ni, 0)),
            pl.BlockSpec((None, None, bq_dq), lambda i, bi, ni: (bi, ni, qi(i))),
            pl.BlockSpec((None, None, bq_dq), lambda i, bi, ni: (bi, ni, qi(i))),
            ent_spec_dq,
            ent_spec_dq,
        ],
        out_specs=pl.BlockSpec((None, bq_dq, None, h), lambda i, bi, ni: (bi, qi(i), ni, 0)),
        out_shape=jax.ShapeDtypeStruct((b, tp, n, h), q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_bwd_dq",
    )(
        plan.dq_bounds, plan.dq_kind,
        q_pos, kv_pos, q_seg, kv_seg, qp, kp, vp, do, lse2, delta, e_dh, e_c,
    )

    # dK/dV: grid over (kv block, batch, query group); each program covers its g q heads.
    bm, nk, nq = plan.dkv_kind.shape
    rk, rv = kc // kk, kc // kv  # query groups per k head, per v head

    def kv_meta_map(j, bi, ki):
        return (bi if bm > 1 else 0, j, 0)

    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=bq_kv, q_len=None if tp == t else t, **common),
        grid=(nk, b, kc),
        in_specs=[
            pl.BlockSpec((None, None, 4), kv_meta_map),
            pl.BlockSpec((None, None, nq), kv_meta_map),
            pl.BlockSpec((tp,), lambda j, bi, ki: (0,)),
            pl.BlockSpec((bk_kv,), lambda j, bi, ki: (j,)),
            None if q_seg is None else pl.BlockSpec((None, tp), lambda j, bi, ki: (bi, 0)),
            None if kv_seg is None else pl.BlockSpec((None, bk_kv), lambda j, bi, ki: (bi, j)),
            pl.BlockSpec((None, tp, g, h), lambda j, bi, ki: (bi, 0, ki, 0)),
            pl.BlockSpec((None, bk_kv, None, h), lambda j, bi, ki: (bi, j, ki // rk, 0)),
            pl.BlockSpec((None, bk_kv, None, hv), lambda j, bi, ki: (bi, j, ki // rv, 0)),
            pl.BlockSpec((None, tp, g, hv), lambda j, bi, ki: (bi, 0, ki, 0)),
            pl.BlockSpec((None, g, tp), lambda j, bi, ki: (bi, ki, 0)),
            pl.BlockSpec((None, g, tp), lambda j, bi, ki: (bi, ki, 0)),
            ent_spec_dkv,
            ent_spec_dkv,
        ],
        out_specs=[
            pl.BlockSpec((None, bk_kv, None, h), lambda j, bi, ki: (bi, j, ki, 0)),
            pl.BlockSpec((None, bk_kv, None, hv), lambda j, bi, ki: (bi, j, ki, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, sp, kc, h), k.dtype if rk == 1 else jnp.float32),
            jax.ShapeDtypeStruct((b, sp, kc, hv), v.dtype if rv == 1 else jnp.float32),
        ],
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_bwd_dkv",
    )(
        plan.dkv_bounds, plan.dkv_kind,
        q_pos, kv_pos, q_seg, kv_seg, qp, kp, vp, do, lse2, delta, e_dh, e_c,
    )
    dk = _fold_groups(dk[:, :s, :, :h_in], kk).astype(k.dtype)
    dv = _fold_groups(dv[:, :s, :, :hv_in], kv).astype(v.dtype)
    return dq[:, :t, :, :h_in], dk, dv


def _fold_groups(dx: jax.Array, heads: int) -> jax.Array:
    """[B, S, Kc, D] per-query-group gradients summed to ``heads`` heads (a no-op if equal)."""
    b, s, kc, d = dx.shape
    return dx if kc == heads else dx.reshape(b, s, heads, kc // heads, d).sum(3)
