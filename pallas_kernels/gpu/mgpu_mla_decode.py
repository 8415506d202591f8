"""MLA latent decode for Hopper GPUs in Pallas Mosaic GPU: wgmma, TMA, two warpgroups per row block.

Absorbed multi-head latent attention decodes N query heads against one cache ``[c ; k^R]`` of
``d_c + d_R`` values per token that is at once every head's keys (all columns) and values
(the first ``d_c``). At DeepSeek's sizes (128 heads, d_c = 512, d_R = 64) a step is
compute-bound on the tensor cores (about 240 FLOP per cache byte), so this kernel is built
like FlashMLA's: the heads are the M dim of wgmma tiles and the latent output
``[64 rows, d_c]`` is split by columns over two warpgroups, as no single warpgroup can hold
a [64, 512] float32 accumulator in registers.

One block (a CTA) takes 64 query rows (row ``r`` is query ``r // N`` of head ``r % N``) of one
sequence and one split of its keys, and runs three warpgroups:

* warpgroup 2, the producer, copies cache tiles ``[block_kv, d_c + d_R]`` with TMA into a
  ring of ``max_concurrent_steps`` SMEM slots, as three column parts: the values' halves
  ``V0 = c[:, :d_c/2]``, ``V1 = c[:, d_c/2:]`` and the RoPE keys ``R``;
* warpgroup 0 computes the logits ``S = Q0 V0^T + Q1 V1^T + QR R^T`` (three wgmmas into one
  accumulator, K read through a transposed SMEM view), runs the online softmax, writes the
  probabilities ``P`` (and the rows' rescale factors) to SMEM for warpgroup 1, and
  accumulates its half of the output ``O0 = alpha O0 + P V0``;
* warpgroup 1 waits for ``P`` and accumulates ``O1 = alpha O1 + P V1``.

Each cache byte is read from HBM once per row block (both row blocks of a sequence run side
by side and share tiles through L2). Splits: each sequence's ``kv_lengths[b]`` keys are cut
into ``num_splits`` tile-aligned ranges; every block writes its split's output (normalized
within the split, in the cache's dtype) and its natural-log LSE (``-inf`` where a row saw no
key), and the caller merges the splits by LSE. Ragged lengths, the decode causal mask of
``T`` trailing queries and a left window are masked on the tiles at the ends of a split only;
on those tiles the values are read through
:func:`~pallas_kernels.gpu.mgpu_common.finite_or_zero`, so NaN in an unused slot never
reaches a row. The last tile of a cache whose length is not a multiple of ``block_kv`` is
shifted back to end at the cache's end (no copy is out of bounds), its already-seen keys
masked.

Dims run as multiples of 64 (``d_c`` of 128: halves of 64; ``d_R`` of 64); others are
zero-padded inside (a copy of the cache per call). ``d_c`` up to 512.

Interpret mode (CPU): JAX 0.10.2's Mosaic GPU interpreter has no transposed-ref transform and
no in-place accumulation (``pl.run_state`` / ``ACC.init``), so interpreted kernels read K^T
tiles from a transposed copy of the cache and add a fresh ``P V`` product to the output; the
rest (pipeline, barriers, masks, splits) is the code a GPU compiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common.checks import check_latent_decode_inputs
from pallas_kernels.common.masks import MASK_VALUE, MaskSpec
from pallas_kernels.common.static_args import check_bool, check_int
from pallas_kernels.gpu._common import LN2, LOG2E, M_INIT, pad_axis, round_up
from pallas_kernels.gpu.mgpu_common import (
    HEAD_DIM_GRANULE,
    SMEM_BYTES,
    SUPPORTED_DTYPES,
    WG_ROWS,
    accumulate,
    finite_or_zero,
    launch,
    layout_hints,
    smem_tile,
    walk_tiles,
)

_ROW = plgpu.Layout.WGMMA.reduce(1)  # one value per query row of a wgmma tile
# The largest latent rank: each of the two warpgroups keeps a [64, d_c / 2] float32 output
# in registers (128 of a thread's registers at 512).
MAX_LATENT_DIM = 512
# The cache's row count must be a multiple of this (the swizzled tiles span 8 rows).
CACHE_ROW_MULTIPLE = 8
# Streaming multiprocessors of an H100/H200 SXM: the automatic split count fills one wave.
NUM_SMS = 132


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MosaicMlaDecodeConfig:
    """Tiles and launch of the Mosaic GPU latent decode kernel.

    Attributes:
      block_kv: keys per pipeline step (the N dim of the logits wgmma, the K dim of the
        output's); a multiple of 64 (the probabilities' SMEM rows share the cache tiles'
        128-byte swizzle).
      max_concurrent_steps: cache tiles in flight (SMEM slots of the producer), >= 2.
      num_splits: key splits per sequence; None fills one wave of the GPU's 132 SMs
        (``B * row_blocks * num_splits`` blocks, one per SM: a block takes most of the
        SM's shared memory).
      approx_math: Mosaic GPU's approximate ``exp2`` and division (``CompilerParams``).
      overlap: warpgroup 0 issues the next tile's logits wgmmas before this tile's softmax
        and PV, so the tensor cores compute them while it runs the softmax
        (FlashAttention-3's intra-warpgroup overlap; one more [64, block_kv] float32
        accumulator in registers).
    """

    block_kv: int = 64
    max_concurrent_steps: int = 2
    num_splits: int | None = None
    approx_math: bool = False
    overlap: bool = False

    def __post_init__(self) -> None:
        rules = {
            "block_kv": dict(minimum=64, multiple_of=64,
                             why="P's SMEM rows share the cache tiles' 128-byte swizzle"),
            "max_concurrent_steps": dict(minimum=2),
        }
        for name, rule in rules.items():
            object.__setattr__(self, name, check_int(name, getattr(self, name), **rule))
        if self.num_splits is not None:
            object.__setattr__(self, "num_splits", check_int("num_splits", self.num_splits))
        for name in ("approx_math", "overlap"):
            object.__setattr__(self, name, check_bool(name, getattr(self, name)))

    @classmethod
    def get_default(cls) -> MosaicMlaDecodeConfig:
        return cls()

    def smem_bytes(self, half: int, dr: int, itemsize: int = 2) -> int:
        """Shared memory of the kernel at padded dims: value halves ``half``, RoPE ``dr``
        (each buffer aligned to 1 KiB as Mosaic GPU allocates them, and the barriers)."""
        steps, bk = self.max_concurrent_steps, self.block_kv
        buffers = [WG_ROWS * w * itemsize for w in (half, half, dr)]  # queries (then output)
        buffers += [steps * bk * w * itemsize for w in (half, half, dr)]  # the cache ring
        buffers += [WG_ROWS * bk * itemsize, 3 * WG_ROWS * 4]  # P; alpha, 1 / l, LSE rows
        barriers = 3 + 4 * steps + 2
        return sum(round_up(x, 1024) for x in buffers) + 8 * barriers

    def num_splits_for(self, b: int, row_blocks: int, s: int) -> int:
        """The split count of a call: the configured one, or one wave of blocks (at least two
        tiles per split)."""
        if self.num_splits is not None:
            return self.num_splits
        wave = max(1, NUM_SMS // (b * row_blocks))
        return max(1, min(wave, s // (2 * self.block_kv)))


def kernel_dims(d_c: int, d_r: int) -> tuple[int, int]:
    """(half, d_R) the kernel runs at: each value half and the RoPE part multiples of 64."""
    half = round_up(-(-d_c // 2), HEAD_DIM_GRANULE)
    return half, round_up(d_r, HEAD_DIM_GRANULE)


def _kernel(
    len_ref,  # [B] int32 (GMEM): valid cache length per sequence
    q_ref,  # [B, Rp, D] (GMEM): the query rows, D = 2 * half + dr
    c_ref,  # [B, S, D] (GMEM): the cache
    ct_ref,  # [B, D, S] (GMEM): the cache transposed (interpret mode), or None
    o_ref,  # [P, B, Rp, 2 * half] (GMEM) out: each split's normalized output
    lse_ref,  # [P, B, Rp] f32 (GMEM) out: each split's natural-log LSE, -inf: no key seen
    *,
    q_smem,  # 3 x [64, w] SMEM: the rows' query parts (values' halves, RoPE)
    c_smem,  # 3 x [steps, bk, w] SMEM: the producer's ring of cache tiles, by column part
    ct_smem,  # 3 x [steps, w, bk] SMEM: K^T tiles (interpret mode), or None
    p_smem,  # [64, bk] SMEM: warpgroup 0's probabilities, both PV wgmmas' A operand
    stats_smem,  # [3, 64] f32 SMEM: per row, the step's rescale factor, 1 / sum, LSE
    q_bar,  # 3 barriers: query parts landed
    c_bar,  # 3 x steps barriers: cache part landed in slot (6 x with K^T tiles)
    c_free,  # steps barriers (2 arrivals): both warpgroups are done with the slot
    p_full,  # 1 barrier: P and alpha written (and once more at the end: 1 / l)
    p_free,  # 1 barrier: warpgroup 1's PV wgmma has read P
    spec: MaskSpec,
    scale: float,
    t: int,
    n: int,
    s: int,
    num_splits: int,
    steps: int,
    compiled: bool,
    overlap: bool,
):
    cast = layout_hints(compiled)

    rb, split, b_idx = (lax.axis_index(a) for a in ("rows", "splits", "batch"))
    wg = lax.axis_index("wg")
    bk = c_smem[0].shape[1]
    half = c_smem[0].shape[2]
    dtype = p_smem.dtype
    r0 = rb * WG_ROWS

    # The split's key range and its tiles, identical in every warpgroup.
    length = len_ref[b_idx]
    per_split = lax.div(lax.div(length + num_splits - 1, jnp.int32(num_splits)) + bk - 1,
                        jnp.int32(bk)) * bk
    lo = split * per_split
    hi = jnp.minimum(lo + per_split, length)
    q_first, q_last = length - t, length - 1  # positions of the first and last query
    wl = spec.window_left
    lo_seen = lo if wl is None else jnp.maximum(lo, q_first - wl)
    j0 = lax.div(lo_seen, jnp.int32(bk))
    # At least one tile per block (all masked in an empty split): the overlapped pipeline
    # computes the first tile's logits before its loop.
    j1 = jnp.maximum(lax.div(hi + bk - 1, jnp.int32(bk)), j0 + 1)
    # Tiles that every row sees whole (no elementwise mask): [run_start, run_stop).
    full_lo = lo if wl is None else jnp.maximum(lo, q_last - wl)
    full_hi = jnp.minimum(hi, q_first + 1)
    run_start = jnp.clip(lax.div(full_lo + bk - 1, jnp.int32(bk)), j0, j1)
    run_stop = jnp.clip(lax.div(jnp.maximum(full_hi, 0), jnp.int32(bk)), run_start, j1)

    def tile_start(j):  # the last tile is shifted back to end at the cache's end
        return jnp.minimum(j * bk, s - bk)

    def slot_of(j):
        return lax.rem(j - j0, jnp.int32(steps))

    def tile_mask(j):
        shape = (WG_ROWS, bk)
        idx = tile_start(j) + cast(lax.broadcasted_iota(jnp.int32, shape, 1), plgpu.Layout.WGMMA)
        row = r0 + cast(lax.broadcasted_iota(jnp.int32, shape, 0), plgpu.Layout.WGMMA)
        q_pos = q_first + lax.div(row, jnp.int32(n))
        ok = (idx >= jnp.maximum(j * bk, lo)) & (idx < hi) & (idx <= q_pos)
        if wl is not None:
            ok = ok & (idx >= q_pos - wl)
        return ok

    def clean(ref):  # a masked tile's values through finite_or_zero, in place
        ref[...] = finite_or_zero(ref[...])
        plgpu.commit_smem()

    def pv(acc, alpha, v_ref):
        """alpha * acc + P V (P from SMEM)."""
        return accumulate(lax.broadcast_in_dim(alpha, acc.shape, [0]) * acc, None, v_ref,
                          compiled, p_smem)

    def finish(acc, inv_l, part):
        """Writes this warpgroup's output half through the (now free) query tile."""
        out = q_smem[part]
        out[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            out, o_ref.at[split, b_idx, pl.ds(r0, WG_ROWS), pl.ds(part * half, half)])

    acc0 = jnp.full((WG_ROWS, half), 0.0, jnp.float32)

    @pl.when(wg == 0)
    def _scores():
        plgpu.set_max_registers(232, action="increase")
        for i in range(3):
            width = q_smem[i].shape[1]
            plgpu.copy_gmem_to_smem(
                q_ref.at[b_idx, pl.ds(r0, WG_ROWS), pl.ds(i * half, width)], q_smem[i],
                q_bar.at[i])
        for i in range(3):
            plgpu.barrier_wait(q_bar.at[i])

        def issue_logits(acc_ref, j):  # the three wgmmas of tile j's logits, not awaited
            slot = slot_of(j)
            for bar in c_bar:
                plgpu.barrier_wait(bar.at[slot])
            for i in range(3):
                k_t = (plgpu.transpose_ref(c_smem[i].at[slot], (1, 0)) if compiled
                       else ct_smem[i].at[slot])
                plgpu.wgmma(acc_ref, q_smem[i], k_t)

        def logits(j):
            def body(acc_ref):
                issue_logits(acc_ref, j)
                plgpu.wgmma_wait(0)
                return acc_ref[...]

            return pl.run_scoped(body, plgpu.ACC((WG_ROWS, bk), jnp.float32))

        def softmax_pv(j, raw, carry, masked):
            m, row_sum, acc = carry
            slot = slot_of(j)
            s_ = raw * (scale * LOG2E)
            if masked:
                s_ = jnp.where(tile_mask(j), s_, MASK_VALUE)
            m_new = jnp.maximum(m, s_.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s_ - lax.broadcast_in_dim(m_new, s_.shape, [0]))
            row_sum = alpha * row_sum + p.sum(axis=1)

            @pl.when(j > j0)  # warpgroup 1 has read the last step's P
            def _():
                plgpu.barrier_wait(p_free)

            p_smem[...] = p.astype(dtype)
            stats_smem[0] = alpha
            plgpu.commit_smem()
            plgpu.barrier_arrive(p_full)
            if masked:
                clean(c_smem[0].at[slot])
            acc = pv(acc, alpha, c_smem[0].at[slot])
            plgpu.barrier_arrive(c_free.at[slot])
            return m_new, row_sum, acc

        carry = (cast(jnp.full((WG_ROWS,), M_INIT, jnp.float32), _ROW),
                 cast(jnp.full((WG_ROWS,), 0.0, jnp.float32), _ROW),
                 cast(acc0, plgpu.Layout.WGMMA))
        carry = walk_tiles((j0, run_start, run_stop, j1), carry, logits=logits,
                           issue_logits=issue_logits, softmax_pv=softmax_pv, block_kv=bk,
                           overlap=overlap)
        m, row_sum, acc = carry

        plgpu.barrier_wait(p_free)  # warpgroup 1's last PV

        seen = row_sum > 0.0
        inv_l = 1.0 / jnp.where(seen, row_sum, 1.0)
        stats_smem[1] = inv_l
        stats_smem[2] = jnp.where(seen, (m + jnp.log2(jnp.where(seen, row_sum, 1.0))) * LN2,
                                  -jnp.inf)
        plgpu.commit_smem()
        plgpu.barrier_arrive(p_full)
        finish(acc, inv_l, 0)
        plgpu.copy_smem_to_gmem(stats_smem.at[2], lse_ref.at[split, b_idx, pl.ds(r0, WG_ROWS)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _values():
        plgpu.set_max_registers(232, action="increase")

        def step(j, acc, *, masked: bool):
            slot = slot_of(j)
            plgpu.barrier_wait(p_full)
            alpha = cast(stats_smem[0], _ROW)
            plgpu.barrier_wait(c_bar[1].at[slot])
            if masked:
                clean(c_smem[1].at[slot])
            acc = pv(acc, alpha, c_smem[1].at[slot])
            plgpu.barrier_arrive(p_free)
            plgpu.barrier_arrive(c_free.at[slot])
            return acc

        acc = cast(acc0, plgpu.Layout.WGMMA)
        edge = functools.partial(step, masked=True)
        acc = lax.fori_loop(j0, run_start, edge, acc)
        acc = lax.fori_loop(run_start, run_stop, functools.partial(step, masked=False), acc)
        acc = lax.fori_loop(run_stop, j1, edge, acc)
        plgpu.barrier_wait(p_full)  # warpgroup 0's 1 / l
        finish(acc, cast(stats_smem[1], _ROW), 1)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _produce():
        plgpu.set_max_registers(40, action="decrease")
        # (destination ring, barriers, column part, K^T copy from the transposed cache)
        parts = [(c_smem[i], c_bar[i], i, False) for i in range(3)]
        if not compiled:
            parts += [(ct_smem[i], c_bar[3 + i], i, True) for i in range(3)]

        def load(j, _):
            slot = slot_of(j)

            @pl.when(j - j0 >= steps)  # both compute warpgroups released the slot
            def _():
                plgpu.barrier_wait(c_free.at[slot])

            keys = pl.ds(tile_start(j), bk)
            for dst, bar, i, transposed in parts:
                cols = pl.ds(i * half, dst.shape[1 if transposed else 2])
                src = ct_ref.at[b_idx, cols, keys] if transposed else c_ref.at[b_idx, keys, cols]
                plgpu.copy_gmem_to_smem(src, dst.at[slot], bar.at[slot])
            return _

        lax.fori_loop(j0, j1, load, None)

        def drain(j, _):  # observe the last releases, so every phase is seen by its waiter
            plgpu.barrier_wait(c_free.at[slot_of(j)])
            return _

        lax.fori_loop(jnp.maximum(j0, j1 - steps), j1, drain, None)


def cache_length_problem(s: int, config: MosaicMlaDecodeConfig | None = None) -> str | None:
    """Why a cache of ``s`` rows cannot be read by the kernel's TMA tiles, or None.

    The tiles' swizzled SMEM layout spans 8 rows, and Mosaic GPU needs the cache's row count
    to be a multiple of it. A cache shorter than one tile is padded (a small copy); a longer
    one is never copied silently."""
    bk = (config or MosaicMlaDecodeConfig.get_default()).block_kv
    if s >= bk and s % CACHE_ROW_MULTIPLE:
        return (f"pallas_mosaic_gpu reads cache rows in TMA tiles that need the cache length to "
                f"be a multiple of {CACHE_ROW_MULTIPLE}, got {s}; allocate the cache with a "
                f"length rounded up to a multiple of {CACHE_ROW_MULTIPLE} (rows past kv_lengths "
                "are masked), or use impl='pallas_triton'")
    return None


@functools.partial(jax.jit, static_argnames=("v_dim", "spec", "scale", "config", "interpret"))
def _partials(q, cache, kv_lengths, *, v_dim, spec, scale, config, interpret):
    b, t, n, d = q.shape
    s = cache.shape[1]
    half, dr = kernel_dims(v_dim, d - v_dim)
    if (2 * half, dr) != (v_dim, d - v_dim):  # pad each part on its own (a copy of the cache)
        def split_pad(x):
            return jnp.concatenate([pad_axis(x[..., :v_dim], x.ndim - 1, 2 * half),
                                    pad_axis(x[..., v_dim:], x.ndim - 1, dr)], axis=-1)

        q, cache = split_pad(q), split_pad(cache)
    bk, steps = config.block_kv, config.max_concurrent_steps
    rows = t * n
    rp = round_up(rows, WG_ROWS)
    row_blocks = rp // WG_ROWS
    q_rows = pad_axis(q.reshape(b, rows, q.shape[-1]), 1, rp)
    cache = pad_axis(cache, 1, max(s, bk))  # a cache shorter than a tile (a small copy)
    p = config.num_splits_for(b, row_blocks, s)
    dtype = q.dtype
    widths = (half, half, dr)
    compiled = interpret is None
    scratch = dict(
        q_smem=[smem_tile((WG_ROWS, w), dtype) for w in widths],
        c_smem=[smem_tile((steps, bk, w), dtype) for w in widths],
        p_smem=smem_tile((WG_ROWS, bk), dtype),
        stats_smem=plgpu.SMEM((3, WG_ROWS), jnp.float32),
        q_bar=plgpu.Barrier(num_barriers=3),
        c_bar=[plgpu.Barrier(num_barriers=steps) for _ in range(3 if compiled else 6)],
        c_free=plgpu.Barrier(num_arrivals=2, num_barriers=steps),
        p_full=plgpu.Barrier(),
        p_free=plgpu.Barrier(),
    )
    args = [kv_lengths, q_rows, cache]
    if not compiled:
        scratch["ct_smem"] = [smem_tile((steps, w, bk), dtype) for w in widths]
        args.append(jnp.swapaxes(cache, 1, 2))
    kernel = functools.partial(_kernel, spec=spec, scale=scale, t=t, n=n, s=cache.shape[1],
                               num_splits=p, steps=steps, compiled=compiled,
                               overlap=config.overlap)

    def body(len_ref, q_ref, c_ref, *refs, **scratch_refs):
        ct_ref = None if compiled else refs[0]
        o_ref, lse_ref = refs[-2:]
        scratch_refs.setdefault("ct_smem", None)
        kernel(len_ref, q_ref, c_ref, ct_ref, o_ref, lse_ref, **scratch_refs)

    o, lse = launch(
        body,
        out_type=(jax.ShapeDtypeStruct((p, b, rp, 2 * half), dtype),
                  jax.ShapeDtypeStruct((p, b, rp), jnp.float32)),
        # a sequence's row blocks side by side: they share tiles
        grid=dict(rows=row_blocks, splits=p, batch=b), compute_wgs=2, scratch=scratch,
        interpret=interpret, name="mgpu_mla_latent_decode",
        # The row reductions of wgmma tiles stay within warps: no cross-warp SMEM scratch
        # (Pallas reserves 2 KiB for it by default; the tiles need all but 2 KiB of SMEM).
        reduction_scratch_bytes=0, approx_math=config.approx_math,
    )(*args)
    o = o[:, :, :rows, :v_dim].reshape(p, b, t, n, v_dim)
    return o, lse[:, :, :rows].reshape(p, b, t, n)


def decode_partials(
    q: jax.Array, cache: jax.Array, kv_lengths: jax.Array, *, v_dim: int, spec: MaskSpec,
    scale: float, config: MosaicMlaDecodeConfig | None = None, interpret=None,
) -> tuple[jax.Array, jax.Array]:
    """Split-K partial latent decode on Hopper (Pallas Mosaic GPU). Forward only.

    Args:
      q: [B, T, N, D] latent-space queries ``[W_UK^T q^C ; q^R]``.
      cache: [B, S, D] the latent cache ``[c ; k^R]``, its first ``v_dim`` columns the values.
        bfloat16 or float16, q's dtype.
      kv_lengths: [B] int32 valid lengths; query t of sequence b sits at kv_lengths[b] - T + t.
      v_dim: d_c (1 <= d_c <= 512, d_c < D; D - d_c is d_R).
      spec: causal, optionally a left window. scale: the logits scale.
      config: :class:`MosaicMlaDecodeConfig` (default ``get_default()``).
      interpret: None to compile for the GPU; an ``InterpretGPUParams``
        (:func:`~pallas_kernels.gpu.mgpu_common.interpret_params`) to run in JAX's Mosaic GPU
        interpreter on CPU.

    Returns:
      (o_parts [P, B, T, N, v_dim] in q's dtype, lse_parts [P, B, T, N] float32), merged by
      LSE (``attnlab.ops.merge_n``).

    Raises:
      ValueError: inconsistent shapes, dtypes or dims, d_c over 512, a config whose tiles do
        not fit in shared memory, a cache length of a tile or more that is not a multiple of 8
        (:func:`cache_length_problem`).
    """
    check_latent_decode_inputs(q, cache, kv_lengths, v_dim, SUPPORTED_DTYPES)
    if v_dim > MAX_LATENT_DIM:
        raise ValueError(f"the Mosaic GPU latent kernel takes d_c (v_dim) up to "
                         f"{MAX_LATENT_DIM}, got {v_dim}")
    config = MosaicMlaDecodeConfig.get_default() if config is None else config
    if not isinstance(config, MosaicMlaDecodeConfig):
        raise ValueError(f"config must be a MosaicMlaDecodeConfig, got {type(config).__name__}")
    why = cache_length_problem(cache.shape[1], config)
    if why:
        raise ValueError(why)
    half, dr = kernel_dims(v_dim, q.shape[-1] - v_dim)
    need = config.smem_bytes(half, dr)
    if need > SMEM_BYTES:
        raise ValueError(
            f"{config} needs {need // 1024} KiB of shared memory at d_c {v_dim} and d_R "
            f"{q.shape[-1] - v_dim}, over the H100's {SMEM_BYTES // 1024} KiB; use "
            "max_concurrent_steps=2 or block_kv=64")
    return _partials(
        q, cache, jnp.asarray(kv_lengths, jnp.int32), v_dim=int(v_dim), spec=spec,
        scale=float(scale), config=config, interpret=interpret or None,
    )
