"""Ring attention (Liu et al. 2023) over one named mesh axis, forward and backward.

Inside a ``shard_map`` every device holds one shard of the queries and of the keys/values
along the sequence. For P = size of the axis, the ring runs P steps; at step i a device holds
the key/value block that started on device ``(d - i) mod P``:

    o, lse = 0, -inf
    for i in 0..P-1:
        next = ppermute(k, v, kv positions, kv segment ids)   # issued before the compute
        o_i, lse_i = attention(q, k_blk, v_blk, positions of both)  # single-device op
        o, lse = merge(o, lse, o_i, lse_i)                     # exact, by log-sum-exp

A step whose block is fully masked (causal contiguous: the block comes from a later shard;
or outside a sliding window) is skipped with ``lax.cond``. With the zigzag layout and a
causal mask every step past the diagonal is exactly half a block (one query chunk against
both key chunks, or both query chunks against one key chunk), and only that half is computed.

The backward is a second ring (``jax.custom_vjp``): k, v travel as in the forward, together
with f32 accumulators of dK and dV; each step adds that block's share from
:func:`attnlab.ops.attention_bwd` (which takes the *global* out and lse), and
after P hops the accumulators are back on the device that owns the block.

Token layouts (contiguous, striped, zigzag) only change which positions each shard holds;
positions reach the per-block op as position arrays, so masks compare original positions.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from attnlab.ops._registry import platform
from attnlab.ops.attention import attention_block, block_args
from attnlab.ops.attention_grad import attention_bwd_block
from attnlab.ops.attention_grad import implementations as _bwd_implementations
from attnlab.ops.masks import EMPTY, MaskSpec, SegmentIds, tile_kind
from attnlab.ops.merge import merge
from sharding._common import vary, varying_axes
from sharding.layouts import LAYOUTS, shard_positions


@dataclasses.dataclass(frozen=True, slots=True)
class _Ring:
    """Static description of one ring call (hashable: a custom_vjp non-diff argument)."""

    axis_name: str
    spec: MaskSpec
    scale: float
    soft_cap: float | None
    zigzag_halves: bool
    impl: str
    bwd_impl: str
    config: Any
    communicate: bool
    vma: tuple[str, ...]  # the axes every carry and branch output varies over
    unroll: bool  # unroll the ring loop (lets the scheduler overlap the ppermutes)
    accum_dtype: Any  # dtype of the dQ / dK / dV accumulators (dK, dV travel in it)


def ring_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    axis_name: str,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    layout: str = "contiguous",
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    logits_soft_cap: float | None = None,
    scale: float | None = None,
    return_residuals: bool = False,
    impl: str = "auto",
    bwd_impl: str | None = None,
    config: Any = None,
    grad_accum_dtype: Any = jnp.float32,
    communicate: bool = True,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Ring attention over ``axis_name``; call inside ``jax.shard_map`` (per-shard arrays).

    Args:
      q: [B, T, N, H] this shard's queries (T = global T / P); k: [B, S, K, H] and
        v: [B, S, K, Hv] this shard's keys/values; N a multiple of K (GQA).
      axis_name: the mesh axis the sequence is split over.
      is_causal, local_window_size, logits_soft_cap, scale: as :func:`attnlab.ops.attention`,
        in global positions.
      segment_ids: this shard's [B, T] ids (self-attention) or a ([B, T], [B, S]) pair, in the
        same layout as the tokens; kv ids travel with the keys.
      layout: "contiguous", "striped" or "zigzag": which global tokens this shard holds (see
        ``sharding.layouts``); used to derive positions when none are given.
      q_positions, kv_positions: [T] / [S] int32 original positions of this shard's tokens
        (overrides ``layout``); kv positions travel with the keys.
      return_residuals: also return lse [B, T, N] float32.
      impl: per-block forward implementation of :func:`attnlab.ops.attention` ("auto" picks
        the fastest that supports positions and the LSE).
      bwd_impl: per-block backward of :func:`attnlab.ops.attention_bwd`;
        default: ``impl`` when it has a backward there, else "auto".
      config: block-size config handed to the per-block calls.
      grad_accum_dtype: dtype in which the backward sums the P per-step shares of dQ, dK, dV
        (dK and dV travel around the ring in it). float32 (default) is the accurate choice;
        None uses the input dtype: half the accumulator and traffic memory for bf16, at the
        cost of P bf16 roundings (fine for small P).
      communicate: False replaces every ``ppermute`` by the identity. For timing the compute
        alone in benchmarks; the result is then NOT attention.

    Returns:
      out [B, T, N, Hv] in q's dtype (and lse with ``return_residuals``); differentiable.

    Raises:
      ValueError: bad shapes, an unknown layout, a zigzag shard of odd length.

    Example:
      >>> f = jax.shard_map(functools.partial(ring_attention, axis_name="sp", is_causal=True),
      ...                   mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp"))
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got {jnp.shape(x)}")
    b, t, _, h = q.shape
    s = k.shape[1]
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "zigzag" and (t % 2 or s % 2):
        raise ValueError(
            f"zigzag shards hold two chunks, so the per-shard lengths must be even, got "
            f"q {t} and kv {s}; make the global length a multiple of 2 x the axis size"
        )
    n = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    derived = q_positions is None and kv_positions is None
    if (q_positions is None) != (kv_positions is None):
        raise ValueError("q_positions and kv_positions must be given together")
    if derived:
        q_positions = shard_positions(t, layout, idx, n)
        kv_positions = shard_positions(s, layout, idx, n)
    elif jnp.shape(q_positions) != (t,) or jnp.shape(kv_positions) != (s,):
        raise ValueError(
            f"q_positions must have shape ({t},) and kv_positions ({s},) (this shard's "
            f"tokens), got {jnp.shape(q_positions)} and {jnp.shape(kv_positions)}"
        )
    q_seg = kv_seg = None
    if segment_ids is not None:
        q_seg, kv_seg = (
            segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids, segment_ids)
        )
        if jnp.shape(q_seg) != (b, t) or jnp.shape(kv_seg) != (b, s):
            raise ValueError(
                f"segment ids must have shapes ({b}, {t}) and ({b}, {s}) (this shard's "
                f"tokens), got {jnp.shape(q_seg)} and {jnp.shape(kv_seg)}"
            )
        for ids in (q_seg, kv_seg):
            if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
                raise ValueError(
                    f"segment ids must be integers (one id per document), got dtype "
                    f"{jnp.result_type(ids)}; casting would merge documents (1.5 -> 1)"
                )
        q_seg, kv_seg = jnp.asarray(q_seg, jnp.int32), jnp.asarray(kv_seg, jnp.int32)
    spec = MaskSpec.from_jax_nn(is_causal=is_causal, local_window_size=local_window_size)
    if bwd_impl is None:
        known = _bwd_implementations()
        bwd_impl = impl if impl in known or impl == "pallas" else "auto"
    cfg = _Ring(
        axis_name, spec, float(1.0 / math.sqrt(h) if scale is None else scale),
        None if logits_soft_cap is None else float(logits_soft_cap),
        layout == "zigzag" and spec.causal and derived and t == s,
        impl, bwd_impl, config, communicate,
        varying_axes(axis_name, q, k, v, q_seg, kv_seg, q_positions, kv_positions),
        platform() != "cpu" and n <= 16,
        jnp.dtype(q.dtype if grad_accum_dtype is None else grad_accum_dtype),
    )
    q_positions = jnp.asarray(q_positions, jnp.int32)
    kv_positions = jnp.asarray(kv_positions, jnp.int32)
    out, lse = _ring(cfg, q, k, v, q_positions, kv_positions, q_seg, kv_seg)
    return (out, lse) if return_residuals else out


# ----------------------------------------------------------------------------- steps


def _shift(cfg: _Ring, n: int, x):
    """Sends x one hop along the ring (device d -> d + 1)."""
    if not cfg.communicate:
        return x
    perm = [(j, (j + 1) % n) for j in range(n)]
    return jax.tree.map(lambda a: lax.ppermute(a, cfg.axis_name, perm), x)


def _is_empty(cfg: _Ring, q_pos, kv_pos) -> jax.Array:
    """True when positions alone hide the whole block (conservative)."""
    if cfg.spec.is_trivial:
        return jnp.zeros((), bool)
    kind = tile_kind(cfg.spec, (q_pos.min(), q_pos.max()), (kv_pos.min(), kv_pos.max()))
    return kind == EMPTY


def _branch(cfg: _Ring, n: int, i, q_pos, kv_pos) -> jax.Array:
    """0: skip, 1: whole block, 2: all queries x first kv chunk, 3: last q chunk x all kv."""
    empty = _is_empty(cfg, q_pos, kv_pos)
    if not cfg.zigzag_halves:
        return jnp.where(empty, 0, 1)
    idx = lax.axis_index(cfg.axis_name)
    src = (idx - i) % n
    return jnp.where(empty, 0, jnp.where(src == idx, 1, jnp.where(src < idx, 2, 3)))


def _block_args(cfg: _Ring, q_pos, kv_pos, q_seg, kv_seg):
    """The normalized arguments of one (query block, key block) pair: global positions."""
    return block_args(
        spec=cfg.spec, q_positions=q_pos, kv_positions=kv_pos,
        segment_ids=None if q_seg is None else SegmentIds(q_seg, kv_seg), scale=cfg.scale,
        logits_soft_cap=cfg.soft_cap, config=cfg.config,
    )


def _half(x, axis: int, second: bool):
    if x is None:
        return None
    m = x.shape[axis] // 2
    return lax.slice_in_dim(x, m if second else 0, x.shape[axis] if second else m, axis=axis)


def _pad_half(x, axis: int, second: bool):
    """Puts a half-length result into a zero-filled full-length array."""
    z = jnp.zeros_like(x)
    return jnp.concatenate([z, x] if second else [x, z], axis=axis)


def _fwd_step(cfg: _Ring, n: int, i, q, q_pos, q_seg, blk):
    k, v, kv_pos, kv_seg = blk
    b, t, nh, _ = q.shape

    def attend(qq, kk, vv, qp, kp, qs, ks):
        o, lse = attention_block(qq, kk, vv, _block_args(cfg, qp, kp, qs, ks), cfg.impl)
        # o stays in q's dtype (the op rounds it there anyway): half the buffer of f32.
        return vary((o, lse.astype(jnp.float32)), cfg.vma)

    def skip():
        o = jnp.zeros((b, t, nh, v.shape[-1]), q.dtype)
        return vary((o, jnp.full((b, t, nh), -jnp.inf, jnp.float32)), cfg.vma)

    def whole():
        return attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg)

    def first_kv():  # the block's late chunk is after all of this shard's queries
        return attend(
            q, _half(k, 1, False), _half(v, 1, False), q_pos, _half(kv_pos, 0, False), q_seg,
            _half(kv_seg, 1, False),
        )

    def last_q():  # this shard's early chunk is before all of the block's keys
        o, lse = attend(
            _half(q, 1, True), k, v, _half(q_pos, 0, True), kv_pos, _half(q_seg, 1, True),
            kv_seg,
        )
        neg = jnp.full_like(lse, -jnp.inf)
        return _pad_half(o, 1, True), jnp.concatenate([neg, lse], axis=1)

    branches = [skip, whole, first_kv, last_q] if cfg.zigzag_halves else [skip, whole]
    return lax.switch(_branch(cfg, n, i, q_pos, kv_pos), branches)


def _bwd_step(cfg: _Ring, n: int, i, q, q_pos, q_seg, out, lse, dout, dlse, blk):
    k, v, kv_pos, kv_seg = blk

    def grads(qq, kk, vv, oo, ll, dd, dl, qp, kp, qs, ks):
        g = attention_bwd_block(qq, kk, vv, oo, ll, dd, dl, _block_args(cfg, qp, kp, qs, ks),
                                cfg.bwd_impl)
        # Input dtypes out of the branch (as the op returns them); widened where accumulated.
        return vary(tuple(g), cfg.vma)

    def skip():
        z = tuple(jnp.zeros(x.shape, x.dtype) for x in (q, k, v))
        return vary(z, cfg.vma)

    def whole():
        return grads(q, k, v, out, lse, dout, dlse, q_pos, kv_pos, q_seg, kv_seg)

    def first_kv():
        dq, dk, dv = grads(
            q, _half(k, 1, False), _half(v, 1, False), out, lse, dout, dlse, q_pos,
            _half(kv_pos, 0, False), q_seg, _half(kv_seg, 1, False),
        )
        return dq, _pad_half(dk, 1, False), _pad_half(dv, 1, False)

    def last_q():
        def h(x):
            return _half(x, 1, True)

        dq, dk, dv = grads(
            h(q), k, v, h(out), h(lse), h(dout), h(dlse), _half(q_pos, 0, True), kv_pos,
            h(q_seg), kv_seg,
        )
        return _pad_half(dq, 1, True), dk, dv

    branches = [skip, whole, first_kv, last_q] if cfg.zigzag_halves else [skip, whole]
    return lax.switch(_branch(cfg, n, i, q_pos, kv_pos), branches)


# ----------------------------------------------------------------------------- the ring


def _forward(cfg: _Ring, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    n = lax.axis_size(cfg.axis_name)
    ax = cfg.vma
    q, q_pos, q_seg = vary((q, q_pos, q_seg), ax)
    blk = vary((k, v, kv_pos, kv_seg), ax)
    b, t, nh, _ = q.shape
    o0 = vary(jnp.zeros((b, t, nh, v.shape[-1]), jnp.float32), ax)
    lse0 = vary(jnp.full((b, t, nh), -jnp.inf, jnp.float32), ax)

    def body(i, carry):
        o, lse, blk = carry
        nxt = _shift(cfg, n, blk)  # in flight while this block is computed
        o_i, lse_i = _fwd_step(cfg, n, i, q, q_pos, q_seg, blk)
        o, lse = merge(o, lse, o_i.astype(jnp.float32), lse_i)
        return o, lse, nxt

    o, lse, blk = lax.fori_loop(0, n - 1, body, (o0, lse0, blk), unroll=cfg.unroll)
    o_i, lse_i = _fwd_step(cfg, n, n - 1, q, q_pos, q_seg, blk)  # last block: nothing to send
    o, lse = merge(o, lse, o_i.astype(jnp.float32), lse_i)
    return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _Ring, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return _forward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)


def _ring_fwd(cfg: _Ring, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = _forward(cfg, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _ring_bwd(cfg: _Ring, res, cts):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    dout, dlse = cts
    ax = cfg.vma
    n = lax.axis_size(cfg.axis_name)
    dout = vary(dout.astype(out.dtype), ax)
    dlse = vary(jnp.asarray(dlse, jnp.float32), ax)
    q, q_pos, q_seg, out, lse = vary((q, q_pos, q_seg, out, lse), ax)
    blk = vary((k, v, kv_pos, kv_seg), ax)
    acc_t = cfg.accum_dtype
    acc0 = vary((jnp.zeros(k.shape, acc_t), jnp.zeros(v.shape, acc_t)), ax)
    dq0 = vary(jnp.zeros(q.shape, acc_t), ax)

    def step(i, dq, blk, acc):
        dq_i, dk_i, dv_i = _bwd_step(cfg, n, i, q, q_pos, q_seg, out, lse, dout, dlse, blk)
        # dK/dV of this block travel on with it; after n hops they are home.
        acc = (acc[0] + dk_i.astype(acc_t), acc[1] + dv_i.astype(acc_t))
        return dq + dq_i.astype(acc_t), _shift(cfg, n, acc)

    def body(i, carry):
        dq, blk, acc = carry
        nxt = _shift(cfg, n, blk)
        dq, acc = step(i, dq, blk, acc)
        return dq, nxt, acc

    dq, blk, acc = lax.fori_loop(0, n - 1, body, (dq0, blk, acc0), unroll=cfg.unroll)
    dq, (dk, dv) = step(n - 1, dq, blk, acc)
    return (
        dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None
    )


_ring.defvjp(_ring_fwd, _ring_bwd)


def striped_attention(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs) -> Any:
    """:func:`ring_attention` with ``layout="striped"`` (inputs already striped)."""
    return ring_attention(q, k, v, layout="striped", **kwargs)


def zigzag_attention(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs) -> Any:
    """:func:`ring_attention` with ``layout="zigzag"`` (inputs already in zigzag order)."""
    return ring_attention(q, k, v, layout="zigzag", **kwargs)
