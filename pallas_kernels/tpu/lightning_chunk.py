"""Lightning attention (decayed causal linear attention) for TPU as Mosaic TPU Pallas kernels.

**Lowered for TPU (v4, v5e, v5p, v6e), verified in interpret mode, never run on a TPU.** No
TPU is available to the project: these kernels run on CPU through
``interpret=pltpu.InterpretParams()`` and are compared there with the float64 oracle and a
JAX-differentiated recurrence, and they are lowered by Pallas's Mosaic lowering for each
generation from CPU (``tests/pallas_kernels/test_tpu_lowering.py``). They have never been
compiled by Mosaic on a chip or timed.

Semantics and chunked equations are those of :mod:`pallas_kernels.gpu.lightning_common`
(``S_t = g_t lambda S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``, resets where
``segment_ids`` change, padding that never decays the state). The structure is simpler than
the GPU's two phases: one program per (batch, head, chunk) on a grid whose chunk axis is
sequential ("arbitrary"), the float32 state carried across it in VMEM scratch:

* forward (``lightning_tpu_fwd``): per chunk, intra-chunk ``[(scale Q K^T) . D] V`` plus the
  carried state's contribution, then the state update; the final state is written at the
  last chunk. For the backward it also writes every chunk's starting state (float32,
  (T/C) H Hv per head).
* backward (``lightning_tpu_bwd``): chunks in reverse, the state cotangent carried in
  scratch; dq, dk, dv of a chunk from its saved starting state and the carried cotangent;
  the initial state's cotangent at the end.

Both select where a factor is 0 (the decay mask, a row after a reset, an earlier document's
key, a dropped state) and read operands summed over masked tokens through
:func:`~pallas_kernels.common.masks.finite_or_zero`, so a token a row cannot see never reaches
it, even NaN; decay 0 is exact (:func:`~pallas_kernels.common.lightning.decay_power`).

Layout: ``[B, T, N, H]`` is transposed to heads-major ``[B, N, T, H]`` inside the wrapper.
Head dims: any H and Hv from 1 to 256; the wrapper zero-pads each to a multiple of 8 (the
sublane count: the [H, Hv] state's rows), in the same copy as the transpose, and slices the
padding off the output, the final state and the gradients.
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

from pallas_kernels.common.checks import check_config
from pallas_kernels.common.lightning import (
    check_lightning_kernel_inputs,
    chunk_run_ids,
    decay_power,
    scale_state,
)
from pallas_kernels.common.masks import finite_or_zero
from pallas_kernels.common.static_args import check_int
from pallas_kernels.tpu._common import (
    NN,
    NT,
    NUM_LANES,
    NUM_SUBLANES,
    TN,
    compiler_params,
    round_up,
)

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
MAX_HEAD_DIM = 256
# exp() of this is exactly 0 in float32: masked decay entries, never -inf.
NEG_BIG = -1e30
# Batch and head axes are independent; the chunk axis carries the state.
SEMANTICS = ("parallel", "parallel", "arbitrary")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TpuLightningConfig:
    """Chunk size of the TPU lightning kernels (untuned: no TPU to tune on).

    Attributes:
      chunk: tokens per chunk C, a multiple of 8 (the sublane count); 64 or 128 on a real
        TPU. Shrunk to the 8-padded sequence for sequences shorter than one chunk.
    """

    chunk: int = 128

    def __post_init__(self) -> None:
        chunk = check_int("chunk", self.chunk, multiple_of=NUM_SUBLANES,
                          why="the TPU sublane count; 64 or 128 on a real TPU")
        object.__setattr__(self, "chunk", chunk)

    @classmethod
    def get_default(
        cls, head_dim: int | None = None, dtype=None, device_kind: str | None = None
    ) -> TpuLightningConfig:
        del head_dim, dtype, device_kind
        return cls()


# ----------------------------------------------------------------------------- in-kernel math


def _chunk_terms(ld, c, rel_row_ref, rel_col_ref, *, chunk: int, t: int, scale: float):
    """The decay factors of chunk c, all float32.

    Returns (d [C, C]: scale * lambda^(e_i - e_j) for j <= i in one run, else 0;
    row_gate [C, 1]: scale * lambda^e_i if row i still sees the carried state, else 0;
    w [C, 1]: each key's weight in the chunk's final state (0 for padding); gamma: the carried
    state's factor), with e_i the real (unpadded) tokens from the chunk start up to and
    including i. Powers lambda^0 are 1 also at decay 0 (0 * log 0 is NaN).
    """
    valid = jnp.minimum(chunk, t - c * chunk).astype(jnp.float32)
    i = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    j = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    e_row = jnp.minimum(lax.broadcasted_iota(jnp.int32, (chunk, 1), 0) + 1, valid)
    e_col = jnp.minimum(lax.broadcasted_iota(jnp.int32, (1, chunk), 1) + 1, valid)
    e_row, e_col = e_row.astype(jnp.float32), e_col.astype(jnp.float32)
    keep = i >= j
    row_gate = scale * jnp.exp(ld * e_row)
    w = decay_power(ld, valid - e_row)
    w = jnp.where(lax.broadcasted_iota(jnp.int32, (chunk, 1), 0) < valid, w, 0.0)
    gamma = decay_power(ld, valid)
    if rel_row_ref is not None:
        rel_row = rel_row_ref[:, :1]  # [C, 1]
        rel_col = rel_col_ref[...]  # [1, C]
        keep = jnp.logical_and(keep, rel_row == rel_col)
        last = jnp.max(rel_col)
        row_gate = jnp.where(rel_row == 0, row_gate, 0.0)
        w = jnp.where(rel_row == last, w, 0.0)
        gamma = jnp.where(last == 0, gamma, 0.0)
    age = e_row - e_col
    d = scale * jnp.exp(jnp.where(keep, jnp.where(age == 0, 0.0, ld * age), NEG_BIG))
    return d, row_gate, w, gamma


def _dot(a, b, dims):
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(
    ld_ref,  # [N] f32 (SMEM): log lambda per head
    rel_row_ref,  # [C, NUM_LANES] int32 run ids (chunk_run_ids), lane-broadcast, or None
    rel_col_ref,  # [1, C] int32 run ids along lanes, or None
    q_ref,  # [C, H]
    k_ref,  # [C, H]
    v_ref,  # [C, Hv]
    h0_ref,  # [H, Hv] f32 initial state
    o_ref,  # [C, Hv] out
    ht_ref,  # [H, Hv] f32 out: final state (written at the last chunk)
    *refs,  # with_states: states_ref ([H, Hv] f32 out, state entering the chunk); then
    # s_scr ([H, Hv] f32 scratch: the carried state)
    chunk: int,
    t: int,
    scale: float,
    n_chunks: int,
    with_states: bool,
):
    states_ref, s_scr = refs if with_states else (None, *refs)
    ni, c = pl.program_id(1), pl.program_id(2)

    @pl.when(c == 0)
    def _():
        s_scr[...] = h0_ref[...].astype(jnp.float32)

    d, row_gate, w, gamma = _chunk_terms(
        ld_ref[ni], c, rel_row_ref, rel_col_ref, chunk=chunk, t=t, scale=scale
    )
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = s_scr[...]
    if states_ref is not None:
        states_ref[...] = s
    # Select, don't multiply: a later token's or another document's NaN never reaches a row
    # (its factor is 0, but 0 * NaN is NaN), nor the carried state a row after a reset.
    v_f = finite_or_zero(v)
    a = jnp.where(d != 0, _dot(q, k, NT) * d, 0.0).astype(v.dtype)
    inter = jnp.where(row_gate != 0, row_gate * _dot(q, s.astype(q.dtype), NN), 0.0)
    o = _dot(a, v_f, NN) + inter
    o_ref[...] = o.astype(o_ref.dtype)
    kw = jnp.where(w > 0, k.astype(jnp.float32) * w, 0.0).astype(k.dtype)
    s = scale_state(gamma, s) + _dot(kw, v_f, TN)
    s_scr[...] = s

    @pl.when(c == n_chunks - 1)
    def _():
        ht_ref[...] = s


def _bwd_kernel(
    ld_ref,  # [N] f32 (SMEM): log lambda per head
    rel_row_ref,  # [C, NUM_LANES] int32 run ids, lane-broadcast, or None
    rel_col_ref,  # [1, C] int32 run ids along lanes, or None
    q_ref,  # [C, H]
    k_ref,  # [C, H]
    v_ref,  # [C, Hv]
    do_ref,  # [C, Hv] output cotangent
    s_ref,  # [H, Hv] f32 state entering this chunk (from the forward)
    dht_ref,  # [H, Hv] f32 cotangent of the final state
    dq_ref,  # [C, H] out
    dk_ref,  # [C, H] out
    dv_ref,  # [C, Hv] out
    dh0_ref,  # [H, Hv] f32 out: cotangent of the initial state (written at the end)
    ds_scr,  # [H, Hv] f32 scratch: cotangent of the state leaving the current chunk
    *,
    chunk: int,
    t: int,
    scale: float,
    n_chunks: int,
):
    ni, step = pl.program_id(1), pl.program_id(2)
    c = n_chunks - 1 - step

    @pl.when(step == 0)
    def _():
        ds_scr[...] = dht_ref[...].astype(jnp.float32)

    d, row_gate, w, gamma = _chunk_terms(
        ld_ref[ni], c, rel_row_ref, rel_col_ref, chunk=chunk, t=t, scale=scale
    )
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    dt = q.dtype
    ds = ds_scr[...]
    # The forward's rule: pairs off the decay mask, keys of weight 0 and rows after a reset
    # select 0, and the operands summed over them are read finite (0 * NaN is NaN).
    keep, on, seen = d != 0, w > 0, row_gate != 0
    do_f = finite_or_zero(do)
    a = jnp.where(keep, _dot(q, k, NT) * d, 0.0).astype(dt)
    da = jnp.where(keep, _dot(do, v, NT) * d, 0.0).astype(dt)
    dq = _dot(da, finite_or_zero(k), NN) + jnp.where(
        seen, row_gate * _dot(do, s_ref[...].astype(dt), NT), 0.0)
    dk = _dot(da, finite_or_zero(q), TN) + jnp.where(on, w * _dot(v, ds.astype(dt), NT), 0.0)
    dv = _dot(a, do_f, TN) + jnp.where(on, w * _dot(k, ds.astype(dt), NN), 0.0)
    dq_ref[...] = dq.astype(dq_ref.dtype)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    qg = jnp.where(seen, q.astype(jnp.float32) * row_gate, 0.0).astype(dt)
    ds = scale_state(gamma, ds) + _dot(qg, do_f, TN)
    ds_scr[...] = ds

    @pl.when(step == n_chunks - 1)
    def _():
        dh0_ref[...] = ds


# ----------------------------------------------------------------------------- launchers


def _rel_inputs(rel: jax.Array | None, chunk: int):
    """Run ids [B, Tp] -> (lane-broadcast rows [B, Tp, NUM_LANES], rows along lanes
    [B, nC, 1, C]), both full-extent-legal blocks; (None, None) without segments."""
    if rel is None:
        return None, None
    b, tp = rel.shape
    rows = jnp.broadcast_to(rel[..., None], (b, tp, NUM_LANES))
    return rows, rel.reshape(b, tp // chunk, 1, chunk)


def _forward(q, k, v, ld, h0, rel, *, t, chunk, scale, interpret, with_states):
    """q, k [B, N, Tp, H], v [B, N, Tp, Hv] -> (o [B, N, Tp, Hv], ht f32[, states f32
    [B, N, nC, H, Hv]])."""
    b, n, tp, h = q.shape
    hv = v.shape[-1]
    n_chunks = tp // chunk
    rel_rows, rel_cols = _rel_inputs(rel, chunk)
    seq = pl.BlockSpec((None, None, chunk, h), lambda bi, ni, c: (bi, ni, c, 0))
    seq_v = pl.BlockSpec((None, None, chunk, hv), lambda bi, ni, c: (bi, ni, c, 0))
    state = pl.BlockSpec((None, None, h, hv), lambda bi, ni, c: (bi, ni, 0, 0))
    in_specs = [
        pl.BlockSpec(memory_space=pltpu.SMEM),
        None if rel is None else pl.BlockSpec(
            (None, chunk, NUM_LANES), lambda bi, ni, c: (bi, c, 0)),
        None if rel is None else pl.BlockSpec(
            (None, None, 1, chunk), lambda bi, ni, c: (bi, c, 0, 0)),
        seq, seq, seq_v, state,
    ]
    out_specs = [seq_v, state]
    out_shape = [
        jax.ShapeDtypeStruct((b, n, tp, hv), q.dtype),
        jax.ShapeDtypeStruct((b, n, h, hv), jnp.float32),
    ]
    if with_states:
        out_specs.append(
            pl.BlockSpec((None, None, None, h, hv), lambda bi, ni, c: (bi, ni, c, 0, 0))
        )
        out_shape.append(jax.ShapeDtypeStruct((b, n, n_chunks, h, hv), jnp.float32))
    kernel = functools.partial(
        _fwd_kernel, chunk=chunk, t=t, scale=scale, n_chunks=n_chunks, with_states=with_states
    )
    return pl.pallas_call(
        kernel,
        grid=(b, n, n_chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((h, hv), jnp.float32)],
        compiler_params=compiler_params(SEMANTICS, interpret),
        interpret=interpret,
        name="lightning_tpu_fwd",
    )(ld, rel_rows, rel_cols, q, k, v, h0)


def _backward(q, k, v, do, ld, states, dht, rel, *, t, chunk, scale, interpret):
    """Heads-major inputs -> (dq, dk, dv) heads-major and dh0 [B, N, H, Hv] f32."""
    b, n, tp, h = q.shape
    hv = v.shape[-1]
    n_chunks = tp // chunk
    rel_rows, rel_cols = _rel_inputs(rel, chunk)

    def rev(c):
        return n_chunks - 1 - c

    seq = pl.BlockSpec((None, None, chunk, h), lambda bi, ni, c: (bi, ni, rev(c), 0))
    seq_v = pl.BlockSpec((None, None, chunk, hv), lambda bi, ni, c: (bi, ni, rev(c), 0))
    state = pl.BlockSpec((None, None, h, hv), lambda bi, ni, c: (bi, ni, 0, 0))
    in_specs = [
        pl.BlockSpec(memory_space=pltpu.SMEM),
        None if rel is None else pl.BlockSpec(
            (None, chunk, NUM_LANES), lambda bi, ni, c: (bi, rev(c), 0)),
        None if rel is None else pl.BlockSpec(
            (None, None, 1, chunk), lambda bi, ni, c: (bi, rev(c), 0, 0)),
        seq, seq, seq_v, seq_v,
        pl.BlockSpec((None, None, None, h, hv), lambda bi, ni, c: (bi, ni, rev(c), 0, 0)),
        state,
    ]
    kernel = functools.partial(_bwd_kernel, chunk=chunk, t=t, scale=scale, n_chunks=n_chunks)
    return pl.pallas_call(
        kernel,
        grid=(b, n, n_chunks),
        in_specs=in_specs,
        out_specs=[seq, seq, seq_v, state],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct((b, n, h, hv), jnp.float32),
        ],
        scratch_shapes=[pltpu.VMEM((h, hv), jnp.float32)],
        compiler_params=compiler_params(SEMANTICS, interpret),
        interpret=interpret,
        name="lightning_tpu_bwd",
    )(ld, rel_rows, rel_cols, q, k, v, do, states, dht)


# ----------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _lightning(q, k, v, log_decay, h0, rel, t, chunk, scale, interpret):
    o, ht = _forward(
        q, k, v, log_decay, h0, rel, t=t, chunk=chunk, scale=scale, interpret=interpret,
        with_states=False,
    )
    return o, ht


def _lightning_fwd(q, k, v, log_decay, h0, rel, t, chunk, scale, interpret):
    o, ht, states = _forward(
        q, k, v, log_decay, h0, rel, t=t, chunk=chunk, scale=scale, interpret=interpret,
        with_states=True,
    )
    return (o, ht), (q, k, v, log_decay, rel, states)


def _lightning_bwd(t, chunk, scale, interpret, res, cts):
    q, k, v, log_decay, rel, states = res
    do, dht = cts
    dq, dk, dv, dh0 = _backward(
        q, k, v, do.astype(q.dtype), log_decay, states, dht.astype(jnp.float32), rel, t=t,
        chunk=chunk, scale=scale, interpret=interpret,
    )
    return dq, dk, dv, jnp.zeros_like(log_decay), dh0, None


_lightning.defvjp(_lightning_fwd, _lightning_bwd)


def kernel_dims(h: int, hv: int) -> tuple[int, int]:
    """(H, Hv) the kernels run at: each rounded up to a multiple of 8. Zero q/k columns add
    nothing to q.k, zero v columns give zero output and state columns."""
    return round_up(h, NUM_SUBLANES), round_up(hv, NUM_SUBLANES)


def _pad(x: jax.Array, widths: dict[int, int]) -> jax.Array:
    """x zero-padded at the end of each axis in ``widths`` (axis -> length); x if none."""
    pads = [(0, widths.get(i, d) - d) for i, d in enumerate(x.shape)]
    return jnp.pad(x, pads) if any(p for _, p in pads) else x


@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def _lightning_jit(q, k, v, log_decay, initial_state, segment_ids, *, scale, config, interpret):
    b, t, n, h_in = q.shape
    hv_in = v.shape[-1]
    h, hv = kernel_dims(h_in, hv_in)
    chunk = min(config.chunk, round_up(t, NUM_SUBLANES))
    tp = round_up(t, chunk)

    def heads_major(x, width):
        return _pad(jnp.swapaxes(x, 1, 2), {2: tp, 3: width})

    h0 = (
        jnp.zeros((b, n, h, hv), jnp.float32)
        if initial_state is None
        else _pad(initial_state.astype(jnp.float32), {2: h, 3: hv})
    )
    rel = None if segment_ids is None else chunk_run_ids(segment_ids, tp, chunk)
    o, ht = _lightning(
        heads_major(q, h), heads_major(k, h), heads_major(v, hv),
        log_decay.astype(jnp.float32), h0, rel, t, chunk, scale, interpret,
    )
    o = jnp.swapaxes(o[:, :, :t], 1, 2)
    if (h, hv) != (h_in, hv_in):
        o, ht = o[..., :hv_in], ht[:, :, :h_in, :hv_in]
    return o, ht


def lightning_attention(
    q: jax.Array, k: jax.Array, v: jax.Array,
    log_decay: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    scale: float = 1.0,
    config: TpuLightningConfig | None = None,
    interpret: Any = False,
) -> tuple[jax.Array, jax.Array]:
    """Lightning attention (decayed causal linear attention), Mosaic TPU Pallas kernels.

    Lowered for TPU, verified in interpret mode, never run on a TPU; see the module docstring.

    Args:
      q, k: [B, T, N, H]; v: [B, T, N, Hv]; one dtype (float32 or bfloat16); H and Hv
        anything from 1 to 256 (zero-padded inside to multiples of 8).
      log_decay: [N] float, log lambda per head (lambda in (0, 1]); not differentiated.
      initial_state: [B, N, H, Hv] state continued by token 0 (None: zeros).
      segment_ids: [B, T] int packed-document ids; the state resets where the id changes.
      scale: multiplies q.
      config: :class:`TpuLightningConfig`, default ``TpuLightningConfig.get_default`` (of
        the padded H).
      interpret: False on a TPU; ``pltpu.InterpretParams()`` to run on CPU.

    Returns:
      (o [B, T, N, Hv] in q's dtype, final_state [B, N, H, Hv] float32); differentiable in
      q, k, v and initial_state.

    Raises:
      ValueError: inconsistent shapes or dtypes, head dims above 256.

    Example:
      >>> o, s = lightning_attention(q, k, v, log_decay, interpret=pltpu.InterpretParams())
    """
    b, t, n, h, hv = check_lightning_kernel_inputs(
        q, k, v, log_decay, initial_state, segment_ids, dtypes=SUPPORTED_DTYPES,
        max_head_dim=MAX_HEAD_DIM, kernels="TPU lightning kernels",
        padding=f"padded inside to multiples of {NUM_SUBLANES}",
    )
    config = check_config(config, TpuLightningConfig, kernel_dims(h, hv)[0], q.dtype)
    return _lightning_jit(
        q, k, v, jnp.asarray(log_decay), initial_state,
        None if segment_ids is None else jnp.asarray(segment_ids),
        scale=float(scale), config=config, interpret=interpret,
    )
