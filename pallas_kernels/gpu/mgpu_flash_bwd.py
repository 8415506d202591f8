"""Flash attention backward for Hopper GPUs in Pallas Mosaic GPU: dQ and dK/dV kernels.

Both kernels recompute a tile's probabilities from the forward's log-sum-exp,
``p = exp2(s - lse2)``, and use the per-row term ``delta = rowsum(dO * O) - dLSE`` (computed
in JAX), as :mod:`~pallas_kernels.gpu.flash_bwd` (the Triton backward) does::

    dp = dO V^T        ds = p * (dp - delta)   (times 1 - tanh^2 under a soft cap)
    dV = p^T dO        dK = scale * ds^T Q      dQ = scale * ds K

* dQ: a block of ``64 * compute_wgs`` queries of one (batch, head), like the forward: a
  producer warpgroup streams K and V tiles; each compute warpgroup (64 queries) computes
  ``S = Q K^T`` and ``dP = dO V^T`` (wgmma, K and V read through transposed SMEM views),
  ``ds`` in registers, and accumulates ``dQ += ds K`` (``ds`` the wgmma's A operand from
  registers).
* dK/dV: a block of ``64 * compute_wgs`` keys of one (batch, key head); each compute
  warpgroup keeps its 64 keys' K and V in SMEM and dK, dV in registers; the producer streams
  the tiles of Q, dO and the row terms of every query head of the group (GQA without atomics)
  and every query tile that sees the block. It works on transposed tiles
  (``S^T = K Q^T``, ``dP^T = V dO^T``, Q and dO read through transposed views) so that
  ``dV += P^T dO`` and ``dK += dS^T Q`` take ``P^T`` and ``dS^T`` from registers.

Masks come from the forward's tile metadata (:func:`~pallas_kernels.common.masks.tile_metadata`)
as loop bounds in each orientation: masked edges, a FULL run without an elementwise mask,
masked edges. On masked tiles ``p`` and ``ds`` are selected by the mask and the operand
summed over masked pairs (K for dQ; Q and dO for dK/dV) is read through
:func:`~pallas_kernels.gpu.mgpu_common.finite_or_zero`, so NaN where a row cannot see never
reaches a gradient.

Limits: head dims up to 128 (padded to 64 or 128: dK and dV of 64 keys live in one
warpgroup's registers), one key head per value head (Kk == Kv), no entropy cotangent;
bfloat16/float16. Interpret mode (CPU) stages the A operands in SMEM, adds fresh products
instead of accumulating in place and reads transposed tiles from transposed copies in HBM
(the interpreter has none of those three); the rest is the code a GPU compiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common.masks import MASK_VALUE, MaskSpec, tile_mask, tile_metadata
from pallas_kernels.gpu import mgpu_common as mc
from pallas_kernels.gpu._common import backward_row_terms, log2_logits, pad_axis, round_up
from pallas_kernels.gpu.flash_common import loop_bounds
from pallas_kernels.gpu.mgpu_common import WG_ROWS, MosaicFlashConfig

_ROW = plgpu.Layout.WGMMA.reduce(1)
_COL = plgpu.Layout.WGMMA.reduce(0)
# The largest head dim of the backward: a compute warpgroup holds dK and dV [64, 128] f32.
MAX_BWD_HEAD_DIM = 128
# The query tile of the dK/dV kernel's ring.
BLOCK_Q_DKV = 64


def _transposed(natural, copies, slot, compiled: bool):
    """A tile's transpose as a wgmma B operand: a transposed view of ``natural`` compiled;
    interpreted, slot ``slot`` of ``copies``, the ring of tiles of the transposed HBM copy."""
    return plgpu.transpose_ref(natural, (1, 0)) if compiled else copies.at[slot]


def _wait_tile(bar, slot, steps: int, compiled: bool):
    """Waits for a ring tile; interpreted also for its transposed copy, which lands on the
    barrier ``steps`` further (a barrier takes one TMA copy per phase)."""
    plgpu.barrier_wait(bar.at[slot])
    if not compiled:
        plgpu.barrier_wait(bar.at[slot + steps])


def _own_rows(block, wg, compute_wgs: int, bar, copies):
    """A compute warpgroup's start: its register share, its 64 rows of the block (first
    index and slice), and the copies ``copies(rows)`` = (src, dst) pairs into SMEM, awaited
    one by one on its barrier ``bar.at[wg]``."""
    if compute_wgs == 2:  # FlashAttention-3's register split of 3 warpgroups
        plgpu.set_max_registers(232, action="increase")
    r0 = block * (WG_ROWS * compute_wgs) + wg * WG_ROWS
    rows = pl.ds(r0, WG_ROWS)
    for src, dst in copies(rows):
        plgpu.copy_gmem_to_smem(src, dst, bar.at[wg])
        plgpu.barrier_wait(bar.at[wg])
    return r0, rows


def _write_out(copies):
    """SMEM tiles written by this warpgroup to GMEM: (src, dst) pairs, awaited."""
    plgpu.commit_smem()
    for src, dst in copies:
        plgpu.copy_smem_to_gmem(src, dst)
    plgpu.wait_smem_to_gmem(0)


def _producer_registers(compute_wgs: int):
    if compute_wgs == 2:  # the producer only issues copies: it gives registers away
        plgpu.set_max_registers(40, action="decrease")


def _dq_kernel(
    bounds_ref,  # [Bm, nq, 4] int32 (GMEM): kv_start, run_start, run_stop, kv_stop per block
    q_meta_ref,  # [Bm, R, Tp] int32 (GMEM): positions (and segment ids) of the queries
    kv_meta_ref,  # [Bm, R, Sp] int32 (GMEM): the same for the keys
    q_ref,  # [B, Tp, N, H]
    k_ref,  # [B, Sp, K, H]
    v_ref,  # [B, Sp, K, Hv]
    do_ref,  # [B, Tp, N, Hv]
    rows_ref,  # [B, N, 2, Tp] f32: lse2 (0 where a row sees no key) and delta
    kt_ref,  # [B, K, H, Sp] (interpreted) or None
    vt_ref,  # [B, K, Hv, Sp] (interpreted) or None
    dq_ref,  # [B, Tp, N, H] out
    *, q_smem, do_smem, rows_smem, q_meta_smem, kv_meta_smem, k_smem, v_smem, kt_smem,
    vt_smem, kc_smem, ds_smem, q_bar, kv_meta_bar, k_bar, v_bar, kv_free,
    spec: MaskSpec, scale: float, soft_cap: float | None, g: int, kv_len: int | None,
    compute_wgs: int, steps: int, compiled: bool,
):
    cast = mc.layout_hints(compiled)
    (n_idx, qb, b_idx), wg, segmented, bm, bounds = mc.block_coords(
        ("heads", "q_blocks", "batch"), bounds_ref, q_meta_ref)
    start, run_start, run_stop, stop = bounds
    bk, h = k_smem.shape[1], k_smem.shape[2]
    kh = lax.div(n_idx, jnp.int32(g))

    def slot_of(j):
        return lax.rem(j - start, jnp.int32(steps))

    @pl.when(wg < compute_wgs)
    def _compute():
        _, rows = _own_rows(qb, wg, compute_wgs, q_bar, lambda rows: (
            (q_ref.at[b_idx, rows, n_idx], q_smem.at[wg]),
            (do_ref.at[b_idx, rows, n_idx], do_smem.at[wg]),
            (rows_ref.at[b_idx, n_idx, :, rows], rows_smem.at[wg]),
            (q_meta_ref.at[bm, :, rows], q_meta_smem.at[wg])))
        lse2 = cast(rows_smem[wg, 0], _ROW)
        delta = cast(rows_smem[wg, 1], _ROW)
        q_pos = cast(q_meta_smem[wg, 0], _ROW)
        q_seg = cast(q_meta_smem[wg, 1], _ROW) if segmented else None
        shape = (WG_ROWS, bk)

        def by_row(x):
            return lax.broadcast_in_dim(x, shape, [0])

        def step(j, dq, *, masked: bool):
            slot = slot_of(j)
            if masked:
                plgpu.copy_gmem_to_smem(kv_meta_ref.at[bm, :, pl.ds(j * bk, bk)],
                                        kv_meta_smem.at[wg], kv_meta_bar.at[wg])
            _wait_tile(k_bar, slot, steps, compiled)
            _wait_tile(v_bar, slot, steps, compiled)
            k_tile = k_smem.at[slot]
            raw = mc.product(q_smem.at[wg], _transposed(k_tile, kt_smem, slot, compiled), shape)
            dp = mc.product(do_smem.at[wg], _transposed(v_smem.at[slot], vt_smem, slot, compiled),
                          shape)
            s, t = log2_logits(raw, scale, soft_cap)
            mask = None
            if masked:
                plgpu.barrier_wait(kv_meta_bar.at[wg])
                kv_pos = cast(kv_meta_smem[wg, 0], _COL)
                kv_seg = cast(kv_meta_smem[wg, 1], _COL) if segmented else None

                def cols(x):
                    return None if x is None else lax.broadcast_in_dim(x, shape, [1])

                kv_idx = j * bk + cast(lax.broadcasted_iota(jnp.int32, shape, 1),
                                       plgpu.Layout.WGMMA)
                mask = tile_mask(spec, by_row(q_pos), cols(kv_pos),
                                 None if q_seg is None else by_row(q_seg), cols(kv_seg),
                                 kv_idx, kv_len)
                if mask is not None:
                    s = jnp.where(mask, s, MASK_VALUE)
            p = jnp.exp2(s - by_row(lse2))
            ds = p * (dp - by_row(delta))
            if t is not None:
                ds = ds * (1.0 - t * t)
            if mask is not None:  # ds is 0 on masked keys, but 0 * NaN is NaN
                ds = jnp.where(mask, ds, 0.0)
                kc_smem[wg] = mc.finite_or_zero(k_tile[...])
                plgpu.commit_smem()
                k_tile = kc_smem.at[wg]
            dq = mc.accumulate(dq, ds, k_tile, compiled, None if compiled else ds_smem.at[wg])
            plgpu.barrier_arrive(kv_free.at[slot])
            return dq

        dq = cast(jnp.full((WG_ROWS, h), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        edge = functools.partial(step, masked=True)
        dq = lax.fori_loop(start, run_start, edge, dq)
        dq = lax.fori_loop(run_start, run_stop, functools.partial(step, masked=False), dq)
        dq = lax.fori_loop(run_stop, stop, edge, dq)
        q_smem[wg] = (dq * scale).astype(q_smem.dtype)
        _write_out([(q_smem.at[wg], dq_ref.at[b_idx, rows, n_idx])])

    @pl.when(wg == compute_wgs)
    def _produce():
        _producer_registers(compute_wgs)
        parts = [(k_ref, k_smem, k_bar, False), (v_ref, v_smem, v_bar, False)]
        if not compiled:
            parts += [(kt_ref, kt_smem, k_bar, True), (vt_ref, vt_smem, v_bar, True)]

        def load(j, _):
            slot = slot_of(j)

            @pl.when(j - start >= steps)
            def _():
                plgpu.barrier_wait(kv_free.at[slot])

            keys = pl.ds(j * bk, bk)
            for src, dst, bar, transposed in parts:
                tile = src.at[b_idx, kh, :, keys] if transposed else src.at[b_idx, keys, kh]
                # Interpreted, a barrier takes one copy: the transposed tiles get their own
                # phase of the same barrier array, awaited after the natural one.
                plgpu.copy_gmem_to_smem(tile, dst.at[slot], bar.at[slot + transposed * steps])
            return _

        lax.fori_loop(start, stop, load, None)

        def drain(j, _):
            plgpu.barrier_wait(kv_free.at[slot_of(j)])
            return _

        lax.fori_loop(jnp.maximum(start, stop - steps), stop, drain, None)


def _dkv_kernel(
    bounds_ref,  # [Bm, nk, 4] int32 (GMEM): q_start, run_start, run_stop, q_stop per block
    q_meta_ref,  # [Bm, R, Tp] int32 (GMEM)
    kv_meta_ref,  # [Bm, R, Sp] int32 (GMEM)
    q_ref,  # [B, Tp, N, H]
    k_ref,  # [B, Sp, K, H]
    v_ref,  # [B, Sp, K, Hv]
    do_ref,  # [B, Tp, N, Hv]
    rows_ref,  # [B, N, 2, Tp] f32: lse2 and delta
    qt_ref,  # [B, N, H, Tp] (interpreted) or None
    dot_ref,  # [B, N, Hv, Tp] (interpreted) or None
    dk_ref,  # [B, Sp, K, H] out
    dv_ref,  # [B, Sp, K, Hv] out
    *, k_smem, v_smem, kv_meta_smem, q_smem, do_smem, rows_smem, q_meta_smem, qt_smem,
    dot_smem, qc_smem, doc_smem, a_smem, kv_bar, q_bar, do_bar, rows_bar, q_free,
    spec: MaskSpec, scale: float, soft_cap: float | None, g: int, kv_len: int | None,
    q_len: int | None, compute_wgs: int, steps: int, compiled: bool,
):
    cast = mc.layout_hints(compiled)
    (kh, kb, b_idx), wg, segmented, bm, bounds = mc.block_coords(
        ("heads", "kv_blocks", "batch"), bounds_ref, q_meta_ref)
    start, run_start, run_stop, stop = bounds
    bq = q_smem.shape[1]
    h, hv = k_smem.shape[2], v_smem.shape[2]
    per_head = stop - start  # query tiles per head; the walk is heads x tiles

    def slot_of(c):
        return lax.rem(c, jnp.int32(steps))

    @pl.when(wg < compute_wgs)
    def _compute():
        k0, keys = _own_rows(kb, wg, compute_wgs, kv_bar, lambda keys: (
            (k_ref.at[b_idx, keys, kh], k_smem.at[wg]),
            (v_ref.at[b_idx, keys, kh], v_smem.at[wg]),
            (kv_meta_ref.at[bm, :, keys], kv_meta_smem.at[wg])))
        kv_pos = cast(kv_meta_smem[wg, 0], _ROW)
        kv_seg = cast(kv_meta_smem[wg, 1], _ROW) if segmented else None
        shape = (WG_ROWS, bq)

        def by_col(x):
            return lax.broadcast_in_dim(x, shape, [1])

        def by_row(x):
            return None if x is None else lax.broadcast_in_dim(x, shape, [0])

        def step(i, carry, *, gi, masked: bool):
            dk, dv = carry
            slot = slot_of(gi * per_head + i - start)
            _wait_tile(q_bar, slot, steps, compiled)
            _wait_tile(do_bar, slot, steps, compiled)
            plgpu.barrier_wait(rows_bar.at[slot])
            plgpu.barrier_wait(rows_bar.at[slot + steps])
            q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]
            raw = mc.product(k_smem.at[wg], _transposed(q_tile, qt_smem, slot, compiled), shape)
            dpt = mc.product(v_smem.at[wg], _transposed(do_tile, dot_smem, slot, compiled), shape)
            s, t = log2_logits(raw, scale, soft_cap)
            mask = None
            if masked:
                q_pos = cast(q_meta_smem[slot, 0], _COL)
                q_seg = cast(q_meta_smem[slot, 1], _COL) if segmented else None
                k_idx = k0 + cast(lax.broadcasted_iota(jnp.int32, shape, 0), plgpu.Layout.WGMMA)
                q_idx = i * bq + cast(lax.broadcasted_iota(jnp.int32, shape, 1),
                                      plgpu.Layout.WGMMA)
                mask = tile_mask(spec, by_col(q_pos), by_row(kv_pos),
                                 None if q_seg is None else by_col(q_seg), by_row(kv_seg),
                                 k_idx, kv_len, q_idx, q_len)
                if mask is not None:
                    s = jnp.where(mask, s, MASK_VALUE)
            pt = jnp.exp2(s - by_col(cast(rows_smem[slot, 0], _COL)))
            dst = pt * (dpt - by_col(cast(rows_smem[slot, 1], _COL)))
            if t is not None:
                dst = dst * (1.0 - t * t)
            if mask is not None:  # p and ds are 0 on masked pairs, but 0 * NaN is NaN
                pt = jnp.where(mask, pt, 0.0)
                dst = jnp.where(mask, dst, 0.0)
                qc_smem[wg] = mc.finite_or_zero(q_tile[...])
                doc_smem[wg] = mc.finite_or_zero(do_tile[...])
                plgpu.commit_smem()
                q_tile, do_tile = qc_smem.at[wg], doc_smem.at[wg]
            staging = None if compiled else a_smem.at[wg]
            dv = mc.accumulate(dv, pt, do_tile, compiled, staging)
            dk = mc.accumulate(dk, dst, q_tile, compiled, staging)
            plgpu.barrier_arrive(q_free.at[slot])
            return dk, dv

        def head(gi, carry):
            edge = functools.partial(step, gi=gi, masked=True)
            carry = lax.fori_loop(start, run_start, edge, carry)
            carry = lax.fori_loop(run_start, run_stop,
                                  functools.partial(step, gi=gi, masked=False), carry)
            return lax.fori_loop(run_stop, stop, edge, carry)

        zeros = [cast(jnp.full((WG_ROWS, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)
                 for d in (h, hv)]
        dk, dv = lax.fori_loop(0, g, head, tuple(zeros))
        k_smem[wg] = (dk * scale).astype(k_smem.dtype)  # K and V are done: their tiles
        v_smem[wg] = dv.astype(v_smem.dtype)  # carry the gradients out
        _write_out([(k_smem.at[wg], dk_ref.at[b_idx, keys, kh]),
                    (v_smem.at[wg], dv_ref.at[b_idx, keys, kh])])

    @pl.when(wg == compute_wgs)
    def _produce():
        _producer_registers(compute_wgs)
        total = g * per_head

        def load(c, _):
            slot = slot_of(c)
            n_idx = kh * g + lax.div(c, jnp.maximum(per_head, 1))
            i = start + lax.rem(c, jnp.maximum(per_head, 1))

            @pl.when(c >= steps)
            def _():
                plgpu.barrier_wait(q_free.at[slot])

            rows = pl.ds(i * bq, bq)
            copies = [(q_ref.at[b_idx, rows, n_idx], q_smem, q_bar, 0),
                      (do_ref.at[b_idx, rows, n_idx], do_smem, do_bar, 0),
                      (rows_ref.at[b_idx, n_idx, :, rows], rows_smem, rows_bar, 0),
                      (q_meta_ref.at[bm, :, rows], q_meta_smem, rows_bar, steps)]
            if not compiled:
                copies += [(qt_ref.at[b_idx, n_idx, :, rows], qt_smem, q_bar, steps),
                           (dot_ref.at[b_idx, n_idx, :, rows], dot_smem, do_bar, steps)]
            for src, dst, bar, offset in copies:
                plgpu.copy_gmem_to_smem(src, dst.at[slot], bar.at[slot + offset])
            return _

        lax.fori_loop(0, total, load, None)

        def drain(c, _):
            plgpu.barrier_wait(q_free.at[slot_of(c)])
            return _

        lax.fori_loop(jnp.maximum(0, total - steps), total, drain, None)


@functools.partial(jax.jit, static_argnames=("spec", "scale", "soft_cap", "config", "interpret"))
def _backward(q, k, v, out, lse, d_out, d_lse, q_pos, kv_pos, q_seg, kv_seg, *, spec, scale,
              soft_cap, config: MosaicFlashConfig, interpret):
    b, t, n, h_in = q.shape
    s, kk, hv_in = k.shape[1], k.shape[2], v.shape[-1]
    g = n // kk
    h, hv = mc.padded_head_dim(h_in), mc.padded_head_dim(hv_in)
    wgs, bk, steps = config.compute_wgs, config.block_kv, config.max_concurrent_steps
    blk = WG_ROWS * wgs  # queries of a dQ block, keys of a dK/dV block
    tp = round_up(t, max(blk, BLOCK_Q_DKV))
    sp = round_up(s, max(blk, bk))
    compiled = interpret is None
    dtype = q.dtype

    # Row terms [B, N, 2, Tp]: lse2 (0 for rows that see no key, which keeps p finite) and
    # delta = rowsum(dO * O) - dLSE; padded rows get 0 and dO = 0, so they contribute nothing.
    lse2, delta = backward_row_terms(out, lse, d_out, d_lse)
    rows = pad_axis(jnp.stack([lse2, delta], axis=-1).transpose(0, 2, 3, 1), 3, tp)

    def pad(x, d, length):
        return pad_axis(pad_axis(x, 3, d), 1, length)

    qp, dop = pad(q, h, tp), pad(d_out, hv, tp)
    kp, vp = pad(k, h, sp), pad(v, hv, sp)
    q_meta, kv_meta = (pad_axis(mc.pack_meta(pos, seg), 2, length, "edge")
                       for pos, seg, length in ((q_pos, q_seg, tp), (kv_pos, kv_seg, sp)))
    r = q_meta.shape[1]

    def transposed(x):  # [B, L, heads, D] -> [B, heads, D, L], for the interpreter
        return None if compiled else jnp.transpose(x, (0, 2, 3, 1))

    # dQ: blocks of `blk` queries, key tiles of bk.
    meta = tile_metadata(spec, q_pos, kv_pos, q_seg, kv_seg, blk, bk)
    dq_bounds = loop_bounds(meta.kind, meta.kv_start, meta.kv_stop)
    ring = 1 if compiled else 2  # interpreted: one more barrier phase per tile (K^T / V^T)
    dq_scratch = dict(
        q_smem=mc.smem_tile((wgs, WG_ROWS, h), dtype),
        do_smem=mc.smem_tile((wgs, WG_ROWS, hv), dtype),
        rows_smem=plgpu.SMEM((wgs, 2, WG_ROWS), jnp.float32),
        q_meta_smem=plgpu.SMEM((wgs, r, WG_ROWS), jnp.int32),
        kv_meta_smem=plgpu.SMEM((wgs, r, bk), jnp.int32),
        k_smem=mc.smem_tile((steps, bk, h), dtype),
        v_smem=mc.smem_tile((steps, bk, hv), dtype),
        kc_smem=mc.smem_tile((wgs, bk, h), dtype),
        q_bar=plgpu.Barrier(num_barriers=wgs),
        kv_meta_bar=plgpu.Barrier(num_barriers=wgs),
        k_bar=plgpu.Barrier(num_barriers=ring * steps),
        v_bar=plgpu.Barrier(num_barriers=ring * steps),
        kv_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=steps),
    )
    if not compiled:
        dq_scratch.update(kt_smem=mc.smem_tile((steps, h, bk), dtype),
                          vt_smem=mc.smem_tile((steps, hv, bk), dtype),
                          ds_smem=mc.smem_tile((wgs, WG_ROWS, bk), dtype))
    common = dict(spec=spec, scale=scale, soft_cap=soft_cap, g=g,
                  kv_len=None if sp == s else s, compute_wgs=wgs, steps=steps,
                  compiled=compiled)

    def with_defaults(kernel, names):
        """The kernel with None for the transposed inputs and interpreter-only scratch of a
        compiled kernel (which is not given them)."""
        def body(*refs, **scratch):
            for name in names:
                scratch.setdefault(name, None)
            if compiled:  # (..., rows, out...) -> (..., rows, None, None, out...)
                refs = (*refs[:8], None, None, *refs[8:])
            kernel(*refs, **scratch)
        return body

    dq_args = [dq_bounds, q_meta, kv_meta, qp, kp, vp, dop, rows]
    if not compiled:
        dq_args += [transposed(kp), transposed(vp)]
    dq = mc.launch(
        with_defaults(functools.partial(_dq_kernel, **common),
                      ("kt_smem", "vt_smem", "ds_smem")),
        out_type=jax.ShapeDtypeStruct((b, tp, n, h), dtype),
        grid=dict(heads=n, q_blocks=tp // blk, batch=b), compute_wgs=wgs, scratch=dq_scratch,
        interpret=interpret, name="mgpu_flash_attention_bwd_dq",
        approx_math=config.approx_math,
    )(*dq_args)

    # dK/dV: blocks of `blk` keys, query tiles of BLOCK_Q_DKV.
    bq = BLOCK_Q_DKV
    meta = tile_metadata(spec, q_pos, kv_pos, q_seg, kv_seg, bq, blk)
    kind_t = jnp.swapaxes(meta.kind, 1, 2)
    dkv_bounds = loop_bounds(kind_t, meta.q_start, meta.q_stop)
    dkv_scratch = dict(
        k_smem=mc.smem_tile((wgs, WG_ROWS, h), dtype),
        v_smem=mc.smem_tile((wgs, WG_ROWS, hv), dtype),
        kv_meta_smem=plgpu.SMEM((wgs, r, WG_ROWS), jnp.int32),
        q_smem=mc.smem_tile((steps, bq, h), dtype),
        do_smem=mc.smem_tile((steps, bq, hv), dtype),
        rows_smem=plgpu.SMEM((steps, 2, bq), jnp.float32),
        q_meta_smem=plgpu.SMEM((steps, r, bq), jnp.int32),
        qc_smem=mc.smem_tile((wgs, bq, h), dtype),
        doc_smem=mc.smem_tile((wgs, bq, hv), dtype),
        kv_bar=plgpu.Barrier(num_barriers=wgs),
        q_bar=plgpu.Barrier(num_barriers=ring * steps),
        do_bar=plgpu.Barrier(num_barriers=ring * steps),
        rows_bar=plgpu.Barrier(num_barriers=2 * steps),  # row terms; query metadata
        q_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=steps),
    )
    if not compiled:
        dkv_scratch.update(qt_smem=mc.smem_tile((steps, h, bq), dtype),
                           dot_smem=mc.smem_tile((steps, hv, bq), dtype),
                           a_smem=mc.smem_tile((wgs, WG_ROWS, bq), dtype))

    dkv_args = [dkv_bounds, q_meta, kv_meta, qp, kp, vp, dop, rows]
    if not compiled:
        dkv_args += [transposed(qp), transposed(dop)]
    dk, dv = mc.launch(
        with_defaults(functools.partial(_dkv_kernel, q_len=None if tp == t else t, **common),
                      ("qt_smem", "dot_smem", "a_smem")),
        out_type=(jax.ShapeDtypeStruct((b, sp, kk, h), k.dtype),
                  jax.ShapeDtypeStruct((b, sp, kk, hv), v.dtype)),
        grid=dict(heads=kk, kv_blocks=sp // blk, batch=b), compute_wgs=wgs,
        scratch=dkv_scratch, interpret=interpret, name="mgpu_flash_attention_bwd_dkv",
        approx_math=config.approx_math,
    )(*dkv_args)
    return dq[:, :t, :, :h_in], dk[:, :s, :, :h_in], dv[:, :s, :, :hv_in]


def unsupported_reason(q, k, v) -> str | None:
    """Why the Mosaic GPU backward cannot take these inputs (the caller then runs the Triton
    backward), or None."""
    if max(mc.padded_head_dim(q.shape[-1]), mc.padded_head_dim(v.shape[-1])) > MAX_BWD_HEAD_DIM:
        return f"head dims over {MAX_BWD_HEAD_DIM}"
    if k.shape[2] != v.shape[2]:
        return "separate key and value head counts"
    return None


def mgpu_flash_attention_bwd(
    q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, lse: jax.Array,
    d_out: jax.Array, d_lse: jax.Array, q_positions: jax.Array, kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None, kv_segment_ids: jax.Array | None = None, *,
    spec: MaskSpec, scale: float, soft_cap: float | None = None,
    config: MosaicFlashConfig | None = None, interpret=None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of :func:`~pallas_kernels.gpu.mgpu_flash_fwd.mgpu_flash_attention_fwd`.

    Args:
      q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids, spec, scale,
        soft_cap: the forward's arguments (k and v with one head count).
      out: [B, T, N, Hv]; lse: [B, T, N] float32 natural-log, the forward's outputs.
      d_out, d_lse: their cotangents.
      config: :class:`~pallas_kernels.gpu.mgpu_common.MosaicFlashConfig` (its
        ``compute_wgs``, ``block_kv``, ``max_concurrent_steps``, ``approx_math``); default
        ``MosaicFlashConfig()``.
      interpret: as for the forward.

    Returns:
      (dq, dk, dv) in the inputs' shapes and dtypes.

    Raises:
      ValueError: head dims over 128 or separate key and value head counts (see
        :func:`unsupported_reason`).
    """
    why = unsupported_reason(q, k, v)
    if why is not None:
        raise ValueError(f"the Mosaic GPU backward does not take {why}; use the Triton one")
    config = MosaicFlashConfig() if config is None else config
    q_seg = None if q_segment_ids is None else jnp.asarray(q_segment_ids, jnp.int32)
    kv_seg = None if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
    return _backward(
        q, k, v, out, lse, d_out, d_lse, jnp.asarray(q_positions, jnp.int32),
        jnp.asarray(kv_positions, jnp.int32), q_seg, kv_seg, spec=spec, scale=float(scale),
        soft_cap=None if soft_cap is None else float(soft_cap), config=config,
        interpret=interpret or None,
    )
