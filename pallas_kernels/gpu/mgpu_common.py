"""What the Mosaic GPU (Hopper) attention kernels share: config, head-dim padding, SMEM layout.

:class:`MosaicFlashConfig` holds the tile sizes and warp specialization of the Mosaic GPU
flash-attention forward (:mod:`~pallas_kernels.gpu.mgpu_flash_fwd`). The helpers here pad head
dims to what wgmma and 128-byte-swizzled TMA tiles take, choose the SMEM tiling/swizzle of a
tile, estimate a kernel's SMEM footprint against the H100's 227 KiB, and name the CPU
interpreter's parameters (:func:`interpret_params`).

Mosaic GPU interpret mode (JAX 0.10.2, ``InterpretGPUParams``) and what it runs is written up
in ``pallas_kernels/gpu/README.md``; the kernels are written within that subset so that the
code the tests interpret is the code a Hopper GPU compiles.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common.static_args import check_bool, check_int

# wgmma works on 64-row slabs per warpgroup (m64nNk16): every compute warpgroup owns 64 queries.
WG_ROWS = 64
# Head dims are padded to a multiple of this: one 128-byte swizzle row of 16-bit elements, the
# granule of the K (contraction) dim of a swizzled wgmma operand and of TMA boxes.
HEAD_DIM_GRANULE = 64
MAX_HEAD_DIM = 256
# Shared memory per block on an H100 (sm_90): 227 KiB of the SM's 228.
SMEM_BYTES = 227 * 1024
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
# Why float32 is refused (shown in the adapter's and the wrapper's messages).
FLOAT32_REASON = (
    "wgmma multiplies float32 inputs as TF32 (10-bit mantissa), which is not the float32 "
    "function the other implementations compute"
)


def padded_head_dim(h: int) -> int:
    """The head dim the kernels run at: ``h`` rounded up to a multiple of 64 (64, 128, 192,
    256). The wrapper pads q/k (or v) with zero columns, which change no logit and give zero
    output columns, and slices them off again."""
    return -(-max(h, 1) // HEAD_DIM_GRANULE) * HEAD_DIM_GRANULE


def smem_tile(shape: tuple[int, ...], dtype: Any) -> plgpu.SMEM:
    """An SMEM buffer of ``shape`` whose last two dims are a wgmma/TMA tile: tiled (8, w) and
    swizzled to the widest swizzle (32, 64 or 128 bytes) its minor dim fills."""
    itemsize = jnp.dtype(dtype).itemsize
    row_bytes = shape[-1] * itemsize
    swizzle = next(sw for sw in (128, 64, 32) if row_bytes % sw == 0)
    transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


# wgmma needs its two SMEM operands equally swizzled: Q's [64, H] and the K^T tile [H, block_kv]
# (H a multiple of 64, so 128-byte swizzle) force 128 bytes = 64 16-bit keys per K^T row.
_BLOCK_KV_RULE = "the K^T tile must share Q's 128-byte swizzle, 64 16-bit keys"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MosaicFlashConfig:
    """Tiles and warp specialization of the Mosaic GPU flash-attention forward.

    Attributes:
      block_kv: keys per pipeline step (the N dim of the QK^T wgmma, the K dim of PV); a
        multiple of 64 (see ``_BLOCK_KV_RULE``).
      compute_wgs: compute warpgroups per block, each owning 64 queries (1 or 2); the block
        has one more warpgroup, the producer, that only issues TMA copies of K and V.
      max_concurrent_steps: K/V tiles in flight (SMEM slots of the producer's pipeline), >= 2.
      pingpong: with two compute warpgroups, take turns on the tensor cores
        (FlashAttention-3's inter-warpgroup schedule): one warpgroup's softmax runs while the
        other's matmuls do. No effect with one compute warpgroup. Off by default: compiled on
        an H100 (JAX 0.11.2) it passes the attention grid but runs 5-17 % slower than
        without it at H=16, D=128, 8K-32K (``experiments/results/mosaic_sweep_h100_*.json``).
      p_in_registers: the PV wgmma reads the probabilities from registers (its A operand in
        the wgmma register layout) and accumulates into the running output (``ACC.init``),
        as FlashAttention-3 does; False stages P in SMEM and adds a fresh PV product to the
        output in registers (one more [64, Hv] float32 array live, one SMEM store and fence
        per step).
      approx_math: Mosaic GPU's approximate ``exp2`` and division (``CompilerParams``), as
        JAX's own Mosaic GPU attention compiles.
      overlap: each compute warpgroup issues the next key tile's ``Q K^T`` wgmma before this
        tile's softmax and PV, so the tensor cores compute it while the softmax runs
        (FlashAttention-3's intra-warpgroup overlap; one more [64, block_kv] float32
        accumulator in registers). Not with ``pingpong``.
      k_view: compiled, the ``Q K^T`` wgmma reads K tiles through a transposed SMEM view
        instead of ``K^T`` tiles of a copy transposed in HBM (one pass over K less per call).
      mosaic_backward: the gradients from the Mosaic GPU backward
        (:mod:`~pallas_kernels.gpu.mgpu_flash_bwd`, this config's ``compute_wgs``,
        ``block_kv``, ``max_concurrent_steps`` and ``approx_math``) where it takes the call
        (head dims up to 128, one key head per value head); else, and by default, the Triton
        backward kernels with their own tiles.

    The query tile of a block is ``64 * compute_wgs``. Sequences need not be multiples of the
    tiles (the wrapper pads them and masks the padding).
    """

    block_kv: int = 64
    compute_wgs: int = 2
    max_concurrent_steps: int = 2
    pingpong: bool = False
    p_in_registers: bool = True
    approx_math: bool = False
    overlap: bool = False
    k_view: bool = False
    mosaic_backward: bool = False

    def __post_init__(self) -> None:
        rules = {
            "block_kv": dict(minimum=64, multiple_of=64, why=_BLOCK_KV_RULE),
            "compute_wgs": dict(minimum=1, maximum=2),
            "max_concurrent_steps": dict(minimum=2),
        }
        for name, rule in rules.items():
            object.__setattr__(self, name, check_int(name, getattr(self, name), **rule))
        for name in ("pingpong", "p_in_registers", "approx_math", "overlap", "k_view",
                     "mosaic_backward"):
            object.__setattr__(self, name, check_bool(name, getattr(self, name)))
        if self.pingpong and self.overlap:
            raise ValueError(
                "pingpong and overlap are two schedules of the tensor cores; choose one")

    @property
    def block_q(self) -> int:
        """The queries of a block, 64 per compute warpgroup."""
        return WG_ROWS * self.compute_wgs

    @classmethod
    def get_default(cls, *, head_dim: int | None = None) -> MosaicFlashConfig:
        """Hand-picked tiles (not yet timed on an H100): two compute warpgroups and 64-key
        steps up to head dim 128 (FlashAttention-3's shape); one compute warpgroup at larger
        head dims, where two would not fit their tiles in shared memory."""
        if head_dim is not None and head_dim > 128:
            return cls(block_kv=64, compute_wgs=1, max_concurrent_steps=2)
        return cls()

    def smem_bytes(self, h: int, hv: int, itemsize: int = 2) -> int:
        """Shared memory the forward kernel allocates at padded head dims (h, hv)."""
        wgs, bk, steps = self.compute_wgs, self.block_kv, self.max_concurrent_steps
        out = 0 if hv == h else WG_ROWS * hv  # the output reuses the queries' tile if it fits
        p = 0 if self.p_in_registers else WG_ROWS * bk
        per_wg = WG_ROWS * h + out + p  # q, out, p
        kv = steps * (h * bk + bk * hv)
        # + each warpgroup's f32 LSE row and int32 position / segment-id rows.
        return (wgs * per_wg + kv) * itemsize + wgs * (3 * WG_ROWS + 2 * bk) * 4

    def check_fits(self, h: int, hv: int) -> None:
        """Raises ValueError if the forward's tiles at head dims (h, hv) exceed SMEM."""
        need = self.smem_bytes(h, hv)
        if need > SMEM_BYTES:
            raise ValueError(
                f"MosaicFlashConfig {self} needs {need // 1024} KiB of shared memory at head "
                f"dims {h}/{hv}, over the H100's {SMEM_BYTES // 1024} KiB; use compute_wgs=1, "
                "a smaller block_kv or max_concurrent_steps=2"
            )


def interpret_params() -> Any:
    """The ``interpret`` argument that runs a Mosaic GPU kernel in JAX's CPU interpreter."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def reset_interpreter() -> None:
    """Clears the interpreter's simulated GPU state; JAX requires it after a kernel raised
    while interpreted, before the next interpreted kernel runs."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import (
        reset_gpu_interpret_mode_state,
    )

    reset_gpu_interpret_mode_state()


def finite_or_zero(x: jax.Array) -> jax.Array:
    """:func:`pallas_kernels.common.masks.finite_or_zero` as Mosaic GPU can lower it: it has
    no ``is_finite`` rule, so finiteness is ``|x| < inf`` (false for NaN and +-inf alike),
    tested in float32."""
    finite = jnp.abs(x.astype(jnp.float32)) < jnp.inf
    return jnp.where(finite, x, jnp.zeros_like(x))


def product(a_ref, b_ref, shape: tuple[int, int]) -> jax.Array:
    """a @ b (both SMEM refs, B possibly a transposed view) into a fresh float32
    accumulator."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_ref, b_ref)
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def accumulate(acc: jax.Array, a: jax.Array | None, b_ref, compiled: bool,
               a_smem=None) -> jax.Array:
    """acc + a @ b. ``a`` is a register array (compiled, the wgmma's A operand from registers;
    interpreted, where wgmma takes SMEM operands only, staged in ``a_smem``), or None when the
    A operand already is in SMEM (``a_smem``). Compiled, the product accumulates in place
    (``ACC.init``); interpreted (no ``run_state`` there) a fresh product is added."""
    if compiled:
        operand = a_smem if a is None else a.astype(b_ref.dtype)

        def body(acc_ref):
            plgpu.wgmma(acc_ref, operand, b_ref)

        return pl.run_state(body)(plgpu.ACC.init(acc))
    if a is not None:
        a_smem[...] = a.astype(a_smem.dtype)
        plgpu.commit_smem()
    return acc + product(a_smem, b_ref, acc.shape)


def walk_tiles(
    bounds: tuple[Any, Any, Any, Any], carry: tuple[Any, ...], *,
    logits: Callable[[Any], jax.Array],
    issue_logits: Callable[[Any, Any], None],
    softmax_pv: Callable[..., tuple[Any, ...]],
    block_kv: int,
    overlap: bool,
    logits_done: Callable[[Any], None] | None = None,
) -> tuple[Any, ...]:
    """A compute warpgroup's online softmax over key tiles ``[start, stop)``.

    ``bounds`` = (start, run_start, run_stop, stop): the tiles before and after the run
    ``[run_start, run_stop)`` are masked (``softmax_pv(..., masked=True)``), the run is not.
    ``logits(j)`` returns tile j's raw logits; ``issue_logits(acc_ref, j)`` issues their
    wgmmas into ``acc_ref`` without waiting; ``softmax_pv(j, raw, carry, masked)`` runs the
    softmax and the PV wgmma and returns the new carry; ``logits_done(j)`` (optional) is
    called once the logits of tile j, issued ahead, have landed.

    With ``overlap``, tile j + 1's logits are issued before tile j's softmax and PV, so the
    tensor cores compute them while the softmax runs (FlashAttention-3's intra-warpgroup
    overlap): the first tile's logits are computed before the loop (``stop > start`` is
    required) and the last tile runs on its own, masked (the mask is exact on any tile).
    """
    start, run_start, run_stop, stop = bounds

    def step(j, carry, *, masked: bool):
        return softmax_pv(j, logits(j), carry, masked)

    def step_ahead(j, carry, *, masked: bool):
        *state, raw = carry

        def body(next_ref):
            issue_logits(next_ref, j + 1)
            out = softmax_pv(j, raw, tuple(state), masked)
            plgpu.wgmma_wait(0)
            return (*out, next_ref[...])

        *out, raw_next = pl.run_scoped(body, plgpu.ACC((WG_ROWS, block_kv), jnp.float32))
        if logits_done is not None:
            logits_done(j + 1)
        return (*out, raw_next)

    if overlap:
        last = stop - 1
        carry = (*carry, logits(start))
        loops = (start, jnp.minimum(run_start, last), jnp.minimum(run_stop, last), last)
        one = step_ahead
    else:
        loops, one = bounds, step
    edge = functools.partial(one, masked=True)
    carry = lax.fori_loop(loops[0], loops[1], edge, carry)
    carry = lax.fori_loop(loops[1], loops[2], functools.partial(one, masked=False), carry)
    carry = lax.fori_loop(loops[2], loops[3], edge, carry)
    if overlap:
        *carry, raw = carry
        carry = softmax_pv(last, raw, tuple(carry), True)
    return carry


def launch(body: Callable[..., None], *, out_type: Any, grid: dict[str, int], compute_wgs: int,
           scratch: dict[str, Any], interpret: Any, name: str, **params: Any) -> Callable:
    """``plgpu.kernel`` of a warp-specialized kernel: ``compute_wgs`` compute warpgroups and
    a producer (threads named "wg"), the grid as name -> size, compiler ``params`` (e.g.
    ``approx_math``)."""
    return plgpu.kernel(
        body, out_type=out_type, grid=tuple(grid.values()), grid_names=tuple(grid),
        num_threads=compute_wgs + 1, thread_name="wg", scratch_types=scratch,
        interpret=interpret, kernel_name=name,
        compiler_params=plgpu.CompilerParams(**params),
    )


def pack_meta(pos: jax.Array, seg: jax.Array | None) -> jax.Array:
    """[Bm, R, L] int32: positions [L] (row 0) and segment ids [B, L] (row 1, if given), one
    array so that a tile's positions and ids are one TMA copy."""
    if seg is None:
        return pos[None, None, :]
    return jnp.stack([jnp.broadcast_to(pos[None, :], seg.shape), seg], axis=1)


def layout_hints(compiled: bool) -> Callable[[jax.Array, Any], jax.Array]:
    """``cast(x, layout)``: a register layout hint for the Mosaic GPU compiler (it changes no
    value) when ``compiled``; the identity when interpreted (JAX 0.10.2's interpreter has no
    rule for ``layout_cast``)."""
    def cast(x, layout):
        return plgpu.layout_cast(x, layout) if compiled else x

    return cast


def block_coords(grid_names: tuple[str, str, str], bounds_ref, meta_ref, *,
                 reverse: bool = False):
    """A block's grid indices (heads, blocks, batch order as ``grid_names``), its warpgroup,
    whether the masks carry segment ids, the batch row of the metadata and its loop bounds
    ``bounds_ref[bm, block]`` = (start, run_start, run_stop, stop).

    ``reverse``: blocks launch last to first (a causal forward's longest rows first, so the
    GPU's last wave holds the shortest)."""
    head, block, batch = (lax.axis_index(a) for a in grid_names)
    if reverse:
        block = jnp.int32(bounds_ref.shape[1] - 1) - block
    bm = batch if bounds_ref.shape[0] > 1 else 0
    bounds = tuple(bounds_ref[bm, block, i] for i in range(4))
    return (head, block, batch), lax.axis_index("wg"), meta_ref.shape[1] == 2, bm, bounds
