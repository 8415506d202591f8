"""Flash attention forward for Hopper GPUs in Pallas Mosaic GPU: wgmma, TMA, warp specialization.

One block (a CTA) computes ``64 * compute_wgs`` queries of one (batch, query head). It runs
``compute_wgs + 1`` warpgroups: the last one is the producer, which only issues TMA copies of
K and V tiles into a ring of ``max_concurrent_steps`` SMEM slots; each compute warpgroup owns
64 queries and, per key tile, waits for the slot, computes ``S = Q K^T`` with wgmma, releases
the K slot, runs the online softmax in registers, computes ``P V`` with wgmma from ``P`` in
registers into the rescaled output (``P`` staged in SMEM when interpreted or with
``config.p_in_registers=False``), then releases the V slot (FlashAttention-3's
producer/consumer split). With two
compute warpgroups and ``config.pingpong`` (off by default: slower on an H100) they take
turns on the tensor cores through a schedule barrier (FlashAttention-3's inter-warpgroup
ping-pong): one warpgroup's softmax runs while the other's matmuls do.

The mask is a value (:class:`~pallas_kernels.common.masks.MaskSpec` with global positions and
segment ids). The wrapper turns it into per-block loop bounds with
:func:`~pallas_kernels.common.masks.tile_metadata` and
:func:`~pallas_kernels.gpu.flash_common.loop_bounds`: a block visits only the key tiles
``[kv_start, kv_stop)``; the longest run of FULL tiles in it is computed without any
elementwise mask, the tiles before and after it with
:func:`~pallas_kernels.common.masks.tile_mask` (causal diagonal, window ends, documents,
padding). EMPTY tiles between two visible ones (packed documents) are visited and masked, not
skipped, so that producer and consumers walk one linear sequence of tiles.

The kernel is written within what JAX 0.10.2's Mosaic GPU interpreter runs (see
``pallas_kernels/gpu/README.md``), so the code the CPU tests interpret is the code a GPU
compiles:

* The QK^T wgmma reads ``K^T`` tiles from a copy of K transposed in HBM by the wrapper
  ([B, K, H, S]); compiled with ``config.k_view`` it reads K tiles through a transposed SMEM
  view (``transpose_ref``) instead, saving that pass (the interpreter has no transposed-ref
  transform).
* ``P`` goes through SMEM to the PV wgmma (the interpreter's wgmma takes SMEM operands
  only; FlashAttention-3 feeds P from registers).
* Each wgmma accumulates into a fresh accumulator that is added to the running output in
  registers (the interpreter cannot run ``pl.run_state`` / ``ACC.init``).

Numerics: logits in the log2 domain (``log2(e)`` folded into the scale), bf16/fp16 wgmma
operands with float32 accumulation, masked logits ``MASK_VALUE`` (finite), and on partially
masked tiles V is read through :func:`~pallas_kernels.common.masks.finite_or_zero` into a
per-warpgroup SMEM copy (P is 0 on masked keys, but 0 * NaN is NaN). The log-sum-exp is
natural-log, ``-inf`` for a row that sees no key (whose output is 0). float32 inputs are
refused: wgmma would multiply them as TF32.

The backward is not here: ``attnlab/ops/backends/attention_mosaic_gpu.py`` composes this
forward with the Triton backward kernels (recomputing from this forward's LSE).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common.checks import check_attention_inputs
from pallas_kernels.common.masks import MASK_VALUE, MaskSpec, tile_mask, tile_metadata
from pallas_kernels.gpu._common import LN2, M_INIT, log2_logits, pad_axis, round_up
from pallas_kernels.gpu.flash_common import loop_bounds
from pallas_kernels.gpu.mgpu_common import (
    FLOAT32_REASON,
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    WG_ROWS,
    MosaicFlashConfig,
    block_coords,
    finite_or_zero,
    launch,
    layout_hints,
    pack_meta,
    padded_head_dim,
    smem_tile,
    walk_tiles,
)

_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per query row of a wgmma tile
_COL = plgpu.Layout.WGMMA.reduce(0)  # one value per key column of a wgmma tile


def _fwd_kernel(
    bounds_ref,  # [Bm, nq, 4] int32 (GMEM): kv_start, run_start, run_stop, kv_stop per block
    q_meta_ref,  # [Bm, R, Tp] int32 (GMEM): row 0 query positions, row 1 segment ids (R = 2)
    kv_meta_ref,  # [Bm, R, Sp] int32 (GMEM): the same for the keys
    q_ref,  # [B, Tp, N, H] (GMEM)
    k_ref,  # [B, Sp, Kk, H] (GMEM) keys; interpreted: [B, Kk, H, Sp], transposed
    v_ref,  # [B, Sp, Kv, Hv] (GMEM)
    o_ref,  # [B, Tp, N, Hv] (GMEM) out
    lse_ref,  # [B, N, Tp] f32 (GMEM) out: natural-log LSE, -inf for rows that see no key
    *,
    q_smem,  # [W, 64, H] SMEM: each compute warpgroup's queries
    o_smem,  # [W, 64, Hv] SMEM: each compute warpgroup's output tile (q_smem when H == Hv)
    p_smem,  # [W, 64, bk] SMEM: probabilities, the PV wgmma's A operand, or None (registers)
    lse_smem,  # [W, 64] f32 SMEM
    q_meta_smem,  # [W, R, 64] int32 SMEM: the warpgroup's query positions (and segment ids)
    kv_meta_smem,  # [W, R, bk] int32 SMEM: a masked tile's key positions (and segment ids)
    k_smem,  # [steps, bk, H] SMEM: the producer's ring of K tiles ([steps, H, bk] K^T tiles
    # when interpreted)
    v_smem,  # [steps, bk, Hv] SMEM: the producer's ring of V tiles
    q_bar,  # W barriers: Q tile landed
    q_meta_bar,  # W barriers: query metadata landed
    kv_meta_bar,  # W barriers: key metadata of a masked tile landed
    k_bar,  # steps barriers: K^T tile landed in slot
    v_bar,  # steps barriers: V tile landed in slot
    k_free,  # steps barriers (W arrivals): every compute warpgroup is done with the K slot
    v_free,  # steps barriers (W arrivals): likewise for the V slot
    sched,  # one barrier (W arrivals): the compute warpgroups' turns on the tensor cores
    spec: MaskSpec,
    scale: float,
    soft_cap: float | None,
    gk: int,
    gv: int,
    kv_len: int | None,
    compute_wgs: int,
    steps: int,
    layouts: bool,
    k_view: bool,
    pingpong: bool,
    overlap: bool,
):
    cast = layout_hints(layouts)
    (n_idx, qb, b_idx), wg, segmented, bm, bounds = block_coords(
        ("heads", "q_blocks", "batch"), bounds_ref, q_meta_ref, reverse=spec.causal)
    start, run_start, run_stop, stop = bounds
    bk = v_smem.shape[1]
    hv = v_smem.shape[-1]
    if overlap:  # at least one tile (all masked for rows that see no key): the pipeline
        # computes the first tile's logits before its loop.
        start = jnp.minimum(start, jnp.int32(v_ref.shape[1] // bk - 1))
        stop = jnp.maximum(stop, start + 1)
        run_start, run_stop = (jnp.clip(x, start, stop) for x in (run_start, run_stop))

    def slot_of(j):
        return lax.rem(j - start, jnp.int32(steps))

    def take_turn():  # both compute warpgroups arrive; each waits for the other
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < compute_wgs)
    def _compute():
        if compute_wgs == 2:  # FlashAttention-3's register split of 3 warpgroups
            plgpu.set_max_registers(232, action="increase")
        q0 = qb * (WG_ROWS * compute_wgs) + wg * WG_ROWS
        plgpu.copy_gmem_to_smem(
            q_ref.at[b_idx, pl.ds(q0, WG_ROWS), n_idx], q_smem.at[wg], q_bar.at[wg]
        )
        plgpu.copy_gmem_to_smem(
            q_meta_ref.at[bm, :, pl.ds(q0, WG_ROWS)], q_meta_smem.at[wg], q_meta_bar.at[wg]
        )
        plgpu.barrier_wait(q_meta_bar.at[wg])
        q_pos = cast(q_meta_smem[wg, 0], _ROW)
        q_seg = cast(q_meta_smem[wg, 1], _ROW) if segmented else None
        plgpu.barrier_wait(q_bar.at[wg])

        def issue_logits(acc_ref, j):  # tile j's Q K^T wgmma, not awaited
            plgpu.barrier_wait(k_bar.at[slot_of(j)])
            k_tile = k_smem.at[slot_of(j)]  # K^T: a transposed view, or (interpreted) as is
            plgpu.wgmma(acc_ref, q_smem.at[wg],
                        plgpu.transpose_ref(k_tile, (1, 0)) if k_view else k_tile)

        def logits(j):
            def qk(acc_ref):
                issue_logits(acc_ref, j)
                if pingpong:  # QK^T issued: the other warpgroup's PV may go
                    plgpu.barrier_arrive(sched)
                plgpu.wgmma_wait(0)
                return acc_ref[...]

            raw = pl.run_scoped(qk, plgpu.ACC((WG_ROWS, bk), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot_of(j)])
            if pingpong:  # the other warpgroup's QK^T is issued too
                plgpu.barrier_wait(sched)
            return raw

        def softmax_pv(j, raw, carry, masked):
            m, row_sum, acc = carry
            slot = slot_of(j)
            if masked:  # positions (and ids) of the tile's keys
                plgpu.copy_gmem_to_smem(
                    kv_meta_ref.at[bm, :, pl.ds(j * bk, bk)], kv_meta_smem.at[wg],
                    kv_meta_bar.at[wg],
                )
            s, _ = log2_logits(raw, scale, soft_cap)
            v_tile = v_smem.at[slot]
            if masked:
                plgpu.barrier_wait(v_bar.at[slot])  # before it is made finite below
                shape = (WG_ROWS, bk)
                plgpu.barrier_wait(kv_meta_bar.at[wg])
                kv_pos = cast(kv_meta_smem[wg, 0], _COL)
                kv_seg = cast(kv_meta_smem[wg, 1], _COL) if segmented else None

                def rows(x):
                    return None if x is None else lax.broadcast_in_dim(x, shape, [0])

                def cols(x):
                    return None if x is None else lax.broadcast_in_dim(x, shape, [1])

                kv_idx = j * bk + cast(lax.broadcasted_iota(jnp.int32, shape, 1),
                                       plgpu.Layout.WGMMA)
                mask = tile_mask(
                    spec, rows(q_pos), cols(kv_pos), rows(q_seg), cols(kv_seg), kv_idx, kv_len
                )
                if mask is not None:
                    s = jnp.where(mask, s, MASK_VALUE)
                    # p is 0 on masked keys, but 0 * NaN is NaN: the slot's values are made
                    # finite in place. Both compute warpgroups may rewrite the slot at once;
                    # they write the same finite values, and each reads it for its PV only
                    # after its own rewrite, so no NaN is left for either to read.
                    v_tile[...] = finite_or_zero(v_tile[...])
                    plgpu.commit_smem()
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            row_sum = alpha * row_sum + p.sum(axis=1)

            def v_ready():
                if not masked:
                    plgpu.barrier_wait(v_bar.at[slot])

            if p_smem is None:  # compiled, config.p_in_registers: P is the A operand in
                # registers, and P V accumulates into the rescaled output itself.
                p16 = p.astype(v_tile.dtype)
                acc = lax.broadcast_in_dim(alpha, acc.shape, [0]) * acc
                if pingpong:  # softmax done (kept before the barriers, as tokamax's
                    # kernel does); wait for the tensor cores' turn
                    acc, row_sum, m_new, p16 = lax.optimization_barrier(
                        (acc, row_sum, m_new, p16))
                    plgpu.barrier_arrive(sched)
                v_ready()
                if pingpong:
                    plgpu.barrier_wait(sched)

                def pv_acc(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_tile)

                acc = pl.run_state(pv_acc)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return m_new, row_sum, acc
            p_smem[wg] = p.astype(p_smem.dtype)
            plgpu.commit_smem()
            if pingpong:
                plgpu.barrier_arrive(sched)
            v_ready()
            if pingpong:
                plgpu.barrier_wait(sched)

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_smem.at[wg], v_tile)
                plgpu.wgmma_wait(0)
                return acc_ref[...]

            acc_pv = pl.run_scoped(pv, plgpu.ACC((WG_ROWS, hv), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            acc = lax.broadcast_in_dim(alpha, acc.shape, [0]) * acc + acc_pv
            return m_new, row_sum, acc

        carry = (
            cast(jnp.full((WG_ROWS,), M_INIT, jnp.float32), _ROW),
            cast(jnp.full((WG_ROWS,), 0.0, jnp.float32), _ROW),
            cast(jnp.full((WG_ROWS, hv), 0.0, jnp.float32), plgpu.Layout.WGMMA),
        )
        # In the producer's order: masked edge, FULL run (no elementwise mask), masked edge.
        # Both warpgroups of a block walk the same tiles, so they take equally many turns;
        # warpgroup 1 starts one turn late and warpgroup 0 ends one turn late.
        if pingpong:
            pl.when(wg == 1)(take_turn)
        carry = walk_tiles(
            (start, run_start, run_stop, stop), carry, logits=logits,
            issue_logits=issue_logits, softmax_pv=softmax_pv, block_kv=bk, overlap=overlap,
            logits_done=lambda j: plgpu.barrier_arrive(k_free.at[slot_of(j)]))
        m, row_sum, acc = carry
        if pingpong:
            pl.when(wg == 0)(take_turn)

        seen = row_sum > 0.0
        l_safe = jnp.where(seen, row_sum, 1.0)
        o_smem[wg] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(o_smem.dtype)
        lse_smem[wg] = jnp.where(seen, (m + jnp.log2(l_safe)) * LN2, -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[b_idx, pl.ds(q0, WG_ROWS), n_idx])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b_idx, n_idx, pl.ds(q0, WG_ROWS)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == compute_wgs)
    def _produce():
        if compute_wgs == 2:
            plgpu.set_max_registers(40, action="decrease")
        kh = lax.div(n_idx, jnp.int32(gk))
        vh = lax.div(n_idx, jnp.int32(gv))

        def load(j, _):
            slot = slot_of(j)

            @pl.when(j - start >= steps)  # wait until every consumer released the slot
            def _():
                plgpu.barrier_wait(k_free.at[slot])

            plgpu.copy_gmem_to_smem(
                (k_ref.at[b_idx, pl.ds(j * bk, bk), kh] if k_view
                 else k_ref.at[b_idx, kh, :, pl.ds(j * bk, bk)]),
                k_smem.at[slot], k_bar.at[slot]
            )

            @pl.when(j - start >= steps)
            def _():
                plgpu.barrier_wait(v_free.at[slot])

            plgpu.copy_gmem_to_smem(
                v_ref.at[b_idx, pl.ds(j * bk, bk), vh], v_smem.at[slot], v_bar.at[slot]
            )
            return _

        lax.fori_loop(start, stop, load, None)

        # Observe the consumers' last releases, so every barrier phase is seen by its waiter.
        def drain(j, _):
            slot = slot_of(j)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            return _

        lax.fori_loop(jnp.maximum(start, stop - steps), stop, drain, None)


def _forward(
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, bounds, *, spec, scale, soft_cap,
    config: MosaicFlashConfig, interpret,
):
    b, t, n, _ = q.shape
    s, kk, kv_heads = k.shape[1], k.shape[2], v.shape[2]
    hv_out = v.shape[-1]
    h, hv = padded_head_dim(q.shape[-1]), padded_head_dim(hv_out)
    bq, bk, wgs = config.block_q, config.block_kv, config.compute_wgs
    tp, sp = round_up(t, bq), round_up(s, bk)
    q = pad_axis(pad_axis(q, 3, h), 1, tp)
    k = pad_axis(pad_axis(k, 3, h), 1, sp)
    # K through a transposed SMEM view (compiled, config.k_view), else K^T tiles from a copy
    # transposed in HBM (the interpreter has no transposed refs).
    k_view = config.k_view and interpret is None
    if not k_view:
        k = jnp.transpose(k, (0, 2, 3, 1))  # [B, Kk, H, Sp]
    v = pad_axis(pad_axis(v, 3, hv), 1, sp)
    q_meta, kv_meta = (
        pad_axis(pack_meta(pos, seg), 2, length, "edge")
        for pos, seg, length in ((q_pos, q_seg, tp), (kv_pos, kv_seg, sp))
    )
    steps = config.max_concurrent_steps
    dtype = q.dtype
    rows = q_meta.shape[1]
    scratch = dict(
        q_smem=smem_tile((wgs, WG_ROWS, h), dtype),
        lse_smem=plgpu.SMEM((wgs, WG_ROWS), jnp.float32),
        q_meta_smem=plgpu.SMEM((wgs, rows, WG_ROWS), jnp.int32),
        kv_meta_smem=plgpu.SMEM((wgs, rows, bk), jnp.int32),
        k_smem=smem_tile((steps, bk, h) if k_view else (steps, h, bk), dtype),
        v_smem=smem_tile((steps, bk, hv), dtype),
        q_bar=plgpu.Barrier(num_barriers=wgs),
        q_meta_bar=plgpu.Barrier(num_barriers=wgs),
        kv_meta_bar=plgpu.Barrier(num_barriers=wgs),
        k_bar=plgpu.Barrier(num_barriers=steps),
        v_bar=plgpu.Barrier(num_barriers=steps),
        k_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=steps),
        v_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=steps),
        sched=plgpu.Barrier(num_arrivals=wgs),
    )
    if hv != h:  # else the output tile reuses the queries' SMEM (they are done by then)
        scratch["o_smem"] = smem_tile((wgs, WG_ROWS, hv), dtype)
    # JAX 0.10.2's interpreter takes wgmma operands from SMEM only (and has no rule for the
    # run_state that accumulates in place): interpreted kernels always stage P in SMEM.
    if not config.p_in_registers or interpret is not None:
        scratch["p_smem"] = smem_tile((wgs, WG_ROWS, bk), dtype)
    kernel = functools.partial(
        _fwd_kernel, spec=spec, scale=scale, soft_cap=soft_cap, gk=n // kk, gv=n // kv_heads,
        kv_len=None if sp == s else s, compute_wgs=wgs, steps=steps,
        layouts=interpret is None, k_view=k_view, pingpong=config.pingpong and wgs == 2,
        overlap=config.overlap,
    )

    def body(*refs, **scratch_refs):
        scratch_refs.setdefault("o_smem", scratch_refs["q_smem"])
        scratch_refs.setdefault("p_smem", None)
        kernel(*refs, **scratch_refs)

    out, lse = launch(
        body,
        out_type=(
            jax.ShapeDtypeStruct((b, tp, n, hv), dtype),
            jax.ShapeDtypeStruct((b, n, tp), jnp.float32),
        ),
        grid=dict(heads=n, q_blocks=tp // bq, batch=b), compute_wgs=wgs, scratch=scratch,
        interpret=interpret, name="mgpu_flash_attention_fwd", approx_math=config.approx_math,
    )(bounds, q_meta, kv_meta, q, k, v)
    return out[:, :t, :, :hv_out], jnp.swapaxes(lse[:, :, :t], 1, 2)


def block_bounds(
    spec: MaskSpec, q_pos, kv_pos, q_seg, kv_seg, config: MosaicFlashConfig
) -> jax.Array:
    """[Bm, nq, 4] int32 loop bounds of each query block of the forward (Bm = B with segment
    ids, else 1): (kv_start, run_start, run_stop, kv_stop), see
    :func:`~pallas_kernels.gpu.flash_common.loop_bounds`."""
    meta = tile_metadata(spec, q_pos, kv_pos, q_seg, kv_seg, config.block_q, config.block_kv)
    return loop_bounds(meta.kind, meta.kv_start, meta.kv_stop)


@functools.lru_cache(maxsize=32)
def _static_bounds(spec: MaskSpec, config: MosaicFlashConfig, q_pos: bytes, kv_pos: bytes):
    """The loop bounds of a static mask, as a NumPy array (built once per mask and tiling)."""
    with jax.ensure_compile_time_eval():
        bounds = block_bounds(
            spec, np.frombuffer(q_pos, np.int32), np.frombuffer(kv_pos, np.int32), None, None,
            config,
        )
    return np.asarray(bounds)


@functools.partial(
    jax.jit, static_argnames=("spec", "scale", "soft_cap", "config", "interpret")
)
def _forward_jit(q, k, v, q_pos, kv_pos, q_seg, kv_seg, bounds, *, spec, scale, soft_cap,
                 config, interpret):
    if bounds is None:
        bounds = block_bounds(spec, q_pos, kv_pos, q_seg, kv_seg, config)
    return _forward(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, bounds, spec=spec, scale=scale,
        soft_cap=soft_cap, config=config, interpret=interpret,
    )


def mgpu_flash_attention_fwd(
    q: jax.Array, k: jax.Array, v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    *,
    spec: MaskSpec,
    scale: float,
    soft_cap: float | None = None,
    config: MosaicFlashConfig | None = None,
    interpret=None,
) -> tuple[jax.Array, jax.Array]:
    """Flash attention forward (Pallas Mosaic GPU, Hopper) with masks, GQA, soft-cap and LSE.

    Not differentiable by itself (the adapter ``attention_mosaic_gpu`` adds the backward).

    Args:
      q: [B, T, N, H] queries; k: [B, S, Kk, H] keys; v: [B, S, Kv, Hv] values; N a multiple
        of Kk and of Kv (query head n reads k head n // (N // Kk), v head n // (N // Kv)).
        bfloat16 or float16, one dtype. H and Hv in [1, 256], zero-padded inside to a
        multiple of 64.
      q_positions: [T] int32 global query positions; kv_positions: [S] int32 key positions.
        NumPy arrays (a static mask) let the loop bounds be built once at trace time.
      q_segment_ids, kv_segment_ids: [B, T] / [B, S] int32 packed-document ids, or both None.
      spec: the static mask (causal, window).
      scale: logits scale; soft_cap: c for c * tanh(logits / c), or None.
      config: :class:`MosaicFlashConfig`, default ``MosaicFlashConfig.get_default(head_dim)``.
      interpret: None or False to compile for the GPU; an ``InterpretGPUParams``
        (:func:`~pallas_kernels.gpu.mgpu_common.interpret_params`) to run in JAX's Mosaic GPU
        interpreter on CPU.

    Returns:
      (out [B, T, N, Hv] in q's dtype, lse [B, T, N] float32), lse natural-log and ``-inf``
      for a row that sees no key (its output is 0).

    Raises:
      ValueError: inconsistent shapes, float32 or other dtypes, head dims over 256, a config
        whose tiles do not fit in shared memory.

    Example:
      >>> pos = np.arange(T, dtype=np.int32)
      >>> out, lse = mgpu_flash_attention_fwd(q, k, v, pos, pos, spec=MaskSpec(causal=True),
      ...                                     scale=0.125)
    """
    if q.dtype == jnp.float32:
        raise ValueError(f"the Mosaic GPU kernel takes bfloat16 or float16, not float32: "
                         f"{FLOAT32_REASON}")
    b, t, n, h, s, _ = check_attention_inputs(
        q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
        dtypes=SUPPORTED_DTYPES,
    )
    if max(h, v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(
            f"head dims must be at most {MAX_HEAD_DIM}, got q/k {h} and v {v.shape[-1]}"
        )
    hp, hvp = padded_head_dim(h), padded_head_dim(v.shape[-1])
    if config is None:
        config = MosaicFlashConfig.get_default(head_dim=max(hp, hvp))
    if not isinstance(config, MosaicFlashConfig):
        raise ValueError(f"config must be a MosaicFlashConfig, got {type(config).__name__}")
    config.check_fits(hp, hvp)
    q_seg = None if q_segment_ids is None else jnp.asarray(q_segment_ids, jnp.int32)
    kv_seg = None if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
    bounds = None
    if (q_seg is None and isinstance(q_positions, np.ndarray)
            and isinstance(kv_positions, np.ndarray)):
        bounds = _static_bounds(spec, config, q_positions.astype(np.int32).tobytes(),
                                kv_positions.astype(np.int32).tobytes())
    return _forward_jit(
        q, k, v, jnp.asarray(q_positions, jnp.int32), jnp.asarray(kv_positions, jnp.int32),
        q_seg, kv_seg, bounds, spec=spec, scale=float(scale),
        soft_cap=None if soft_cap is None else float(soft_cap), config=config,
        interpret=interpret or None,
    )
