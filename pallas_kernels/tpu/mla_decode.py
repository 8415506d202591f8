"""MLA latent decode for TPU as a Mosaic TPU Pallas kernel: split-K over the ``[c ; k_R]`` cache.

**Lowered for TPU (v4, v5e, v5p, v6e), verified in interpret mode, never run on a TPU.**

Absorbed multi-head latent attention decodes all N heads against one cache of
``D = d_c + d_R`` values per token that is the keys (all D columns) and the values (the first
``d_c``). Each grid step reads one ``[block_kv, D]`` tile (its last dim is the full width,
legal for any D) once for every query row: the N * T rows of a sequence (row ``r`` is query
``r // N`` of head ``r % N``) form one tile, padded to a multiple of 8.

Grid ``(B, P, tiles_per_split)``: P splits of the key axis (parallel), the tiles of a split
(the reduction, last). Lengths arrive by scalar prefetch; the index map clamps the key block
into the range a sequence can see, so tiles past its end issue no copy and are skipped. Each
split writes its partial output (normalized within the split) and LSE (``-inf`` where a row
saw no key); the caller merges them by LSE. Forward only. Tiles that some row cannot wholly
see read their values through :func:`~pallas_kernels.common.masks.finite_or_zero`: NaN in an
uninitialized slot past the length never reaches a row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common.checks import check_latent_decode_inputs
from pallas_kernels.common.masks import MaskSpec
from pallas_kernels.tpu._common import (
    NUM_LANES,
    compiler_params,
)
from pallas_kernels.tpu.decode import (
    TpuDecodeConfig,
    clamped_kv_block,
    split_decode_step,
    split_tiling,
)

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
SEMANTICS = ("parallel", "parallel", "arbitrary")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TpuMlaDecodeConfig(TpuDecodeConfig):
    """Tiling of the TPU latent decode kernel (untuned: no TPU to tune on): the fields and
    rules of :class:`~pallas_kernels.tpu.decode.TpuDecodeConfig`, with smaller default tiles
    (each is [block_kv, d_c + d_R] wide)."""

    block_kv: int = 256
    keys_per_split: int = 2048


def _kernel(
    len_ref,  # [B] int32 (SMEM): valid cache length per sequence
    q_ref,  # [Rp, D] query rows of one sequence
    row_t_ref,  # [Rp, NUM_LANES] int32: query index t of each row, lane-broadcast
    kv_ref,  # [bkv, D] cache tile: keys, and values in its first d_c columns
    o_ref,  # [Rp, d_c] f32 out
    lse_ref,  # [Rp, NUM_LANES] f32 out
    m_ref, l_ref, acc_ref,  # scratch: [Rp, NUM_LANES], [Rp, NUM_LANES], [Rp, d_c] f32
    *, v_dim: int, **static,
):
    def load():
        kv = kv_ref[...]
        return q_ref[...], kv, kv[:, :v_dim]

    split_decode_step(len_ref, row_t_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref, load=load,
                      batch=pl.program_id(0), split=pl.program_id(1), i=pl.program_id(2),
                      soft_cap=None, **static)


@functools.partial(jax.jit, static_argnames=("v_dim", "spec", "scale", "config", "interpret"))
def _partials(q, cache, kv_lengths, *, v_dim, spec, scale, config, interpret):
    b, t, n, d = q.shape
    s = cache.shape[1]
    rows, rp, bkv, tiles_per_split, p, row_t = split_tiling(n, t, s, config)
    q_rows = jnp.pad(q.reshape(b, rows, d), ((0, 0), (0, rp - rows), (0, 0)))

    def kv_map(bi, si, i, len_ref):
        return bi, clamped_kv_block(len_ref, bi, si, i, spec=spec, t=t, s=s, bkv=bkv,
                                    tiles_per_split=tiles_per_split), 0

    kernel = functools.partial(_kernel, spec=spec, scale=scale, v_dim=v_dim, t=t, s=s, bkv=bkv,
                               tiles_per_split=tiles_per_split)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, p, tiles_per_split),
            in_specs=[
                pl.BlockSpec((None, rp, d), lambda bi, si, i, _: (bi, 0, 0)),
                pl.BlockSpec((rp, NUM_LANES), lambda *_: (0, 0)),
                pl.BlockSpec((None, bkv, d), kv_map),
            ],
            out_specs=[
                pl.BlockSpec((None, None, rp, v_dim), lambda bi, si, i, _: (si, bi, 0, 0)),
                pl.BlockSpec((None, None, rp, NUM_LANES), lambda bi, si, i, _: (si, bi, 0, 0)),
            ],
            scratch_shapes=[
                pltpu.VMEM((rp, NUM_LANES), jnp.float32),
                pltpu.VMEM((rp, NUM_LANES), jnp.float32),
                pltpu.VMEM((rp, v_dim), jnp.float32),
            ],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((p, b, rp, v_dim), jnp.float32),
            jax.ShapeDtypeStruct((p, b, rp, NUM_LANES), jnp.float32),
        ],
        compiler_params=compiler_params(SEMANTICS, interpret),
        interpret=interpret,
        name="attnlab_tpu_mla_latent_decode",
    )(kv_lengths, q_rows, row_t, cache)
    o = o[:, :, :rows].reshape(p, b, t, n, v_dim)
    return o, lse[:, :, :rows, 0].reshape(p, b, t, n)


def decode_partials(
    q: jax.Array, cache: jax.Array, kv_lengths: jax.Array, *, v_dim: int, spec: MaskSpec,
    scale: float, config: TpuMlaDecodeConfig | None = None, interpret: bool | Any = False,
) -> tuple[jax.Array, jax.Array]:
    """Split-K partial latent decode on TPU. Forward only.

    Args:
      q: [B, T, N, D] latent-space queries; cache: [B, S, D] the ``[c ; k_R]`` cache.
      kv_lengths: [B] int32 valid lengths (query t of sequence b at kv_lengths[b] - T + t).
      v_dim: d_c, the cache's leading value columns. spec: causal (optionally a left
        window). scale: logits scale.
      config: :class:`TpuMlaDecodeConfig`. interpret: False to compile with Mosaic; an
        ``InterpretParams`` (or True) for TPU interpret mode on CPU.

    Returns:
      (o_parts [P, B, T, N, v_dim] float32, lse_parts [P, B, T, N] float32).

    Raises:
      ValueError: inconsistent shapes or dtypes.
    """
    check_latent_decode_inputs(q, cache, kv_lengths, v_dim, SUPPORTED_DTYPES)
    config = TpuMlaDecodeConfig.get_default() if config is None else config
    if not isinstance(config, TpuMlaDecodeConfig):
        raise ValueError(f"config must be a TpuMlaDecodeConfig, got {type(config).__name__}")
    if interpret is True:
        interpret = pltpu.InterpretParams()
    return _partials(q, cache, jnp.asarray(kv_lengths, jnp.int32), v_dim=int(v_dim), spec=spec,
                     scale=float(scale), config=config, interpret=interpret)
