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
``MASK_VALUE`` (finite), and partially masked tiles read values through
:func:`~pallas_kernels.common.masks.finite_or_zero` (p is 0 on a masked key, but 0 * NaN is
NaN), so NaN or inf where a row cannot see never reaches it. The public log-sum-exp is
natural-log, and ``-inf`` for a row that sees no key (whose output is 0).

This file also holds the ``jax.custom_vjp`` public wrapper; the config and tile planning
shared with the backward live in :mod:`pallas_kernels.gpu.flash_common`, the backward kernels
in :mod:`pallas_kernels.gpu.flash_bwd`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels.common.checks import check_attention_inputs
from pallas_kernels.common.masks import MASK_VALUE, MaskSpec, finite_or_zero, tile_mask
from pallas_kernels.gpu._common import (
    LN2,
    M_INIT,
    MAX_HEAD_DIM,
    compiler_params,
    dot,
    dot_precision,
    kernel_head_dim,
    log2_logits,
    pad_head,
)
from pallas_kernels.gpu.flash_bwd import flash_backward
from pallas_kernels.gpu.flash_common import (
    FlashConfig,
    TilePlan,
    Tiling,
    config_head_dim,
    pad_inputs,
    q_block_specs,
    tile_loops,
    tile_plan,
    tiling,
)

# Largest static tile plan (tile kinds of the three kernels) embedded as program constants;
# beyond it (very long sequences) the plan is computed in the program, where it is cheap
# next to the attention itself.
_MAX_STATIC_TILES = 1 << 21


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
                v = finite_or_zero(v)  # p is 0 on masked keys, but 0 * NaN is NaN
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
    b, t, n, _ = q.shape
    s, hv_out = k.shape[1], v.shape[-1]
    gk, gv = n // k.shape[2], n // v.shape[2]
    h, hv = kernel_head_dim(q.shape[-1]), kernel_head_dim(hv_out)
    q, k, v = pad_head(q, h), pad_head(k, h), pad_head(v, hv)
    tiles = tiling(config, t, s)
    (bq, bk), tp, sp = tiles.fwd, tiles.fwd_tp, tiles.fwd_sp
    nq = plan.fwd_kind.shape[1]
    q, k, v, q_pos, kv_pos, q_seg, kv_seg = pad_inputs(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, tp, sp
    )
    qi, in_specs = q_block_specs(plan.fwd_kind, bq, sp, h, hv, gk, gv, q_seg is not None)
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
        compiler_params=compiler_params(config),
        interpret=interpret,
        name="flash_attention_fwd",
    )(plan.fwd_bounds, plan.fwd_kind, q_pos, kv_pos, q_seg, kv_seg, q, k, v)
    out = res[0][:, :t, :, :hv_out]
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


def flash_vjp_bwd(spec, scale, soft_cap, config, interpret, return_entropy, res, cts):
    """The backward rule of ``flash_attention``'s custom VJP: (dq, dk, dv, None x 5).

    ``res`` is what the forward rule saves, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, plan, out,
    lse[, entropy]); ``cts`` the cotangents of (out, lse[, entropy]). Public because
    ``attnlab.ops.attention_grad`` calls it on residuals it assembles itself.
    """
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


_flash.defvjp(_flash_fwd, flash_vjp_bwd)


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
    config: FlashConfig | None = None,
    interpret: bool = False,
    return_entropy: bool = False,
) -> tuple[jax.Array, ...]:
    """Flash attention (Pallas, Triton lowering) with masks, GQA, soft-cap and LSE.

    Args:
      q: [B, T, N, H] queries; k: [B, S, Kk, H] keys; v: [B, S, Kv, Hv] values; N a multiple
        of Kk and of Kv (query head n reads k head n // (N // Kk), v head n // (N // Kv)).
        Same float dtype (float32, bfloat16 or float16). H and Hv in [1, 256]: other than
        powers of two >= 16 they are zero-padded to one inside (64, 128, 256 are tuned).
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
    if max(h, v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(
            f"head dims must be at most {MAX_HEAD_DIM}, got q/k {h} and v {v.shape[-1]}"
        )
    if config is None:
        config = FlashConfig.get_default(
            head_dim=config_head_dim(h, v.shape[-1]), causal=spec.causal, dtype=q.dtype
        )
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
