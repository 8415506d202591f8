"""Attention backend ``"xla"``: memory-linear softmax attention in plain JAX, blockwise
online softmax over key blocks.

The forward pass scans over key/value blocks of ``block_kv`` keys and keeps running row
maxima, normalizers and output accumulators, so nothing of size T x S is ever live. The custom
VJP recomputes each block's probabilities from the saved log-sum-exp instead of storing them.
This is the CPU default and the fallback everywhere; it also defines the backward pass that the
kernels' custom VJPs implement.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from attnlab.ops._registry import Implementation
from attnlab.ops._vma import like_vma
from attnlab.ops.attention import AttentionArgs
from pallas_kernels.common.checks import DefaultConfig
from pallas_kernels.common.masks import MASK_VALUE, MaskSpec, finite_or_zero, mask_and, visible
from pallas_kernels.common.static_args import check_int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class XlaConfig(DefaultConfig):
    """Block size of the XLA path (keys per scan step)."""

    block_kv: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_kv", check_int("block_kv", self.block_kv))


def _pad_axis(x: jax.Array, axis: int, pad: int, value=0) -> jax.Array:
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x: jax.Array, axis: int, block: int) -> jax.Array:
    """Splits ``axis`` (a multiple of block) into [n_blocks, ...] leading the array."""
    n = x.shape[axis] // block
    x = x.reshape(*x.shape[:axis], n, block, *x.shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _bias_blocks(bias: jax.Array | None, s_pad: int, block: int, k: int) -> jax.Array | None:
    """Bias [B|1, N|1, T|1, S|1] -> per-block [nb, B|1, K|1, G|1, T|1, block|1]."""
    if bias is None:
        return None
    b, n, t, s = bias.shape
    g = n // k if n > 1 else 1
    kk = k if n > 1 else 1
    bias = bias.reshape(b, kk, g, t, s)
    nb = s_pad // block
    if s == 1:
        return jnp.broadcast_to(bias[None], (nb, b, kk, g, t, 1))
    bias = _pad_axis(bias, 4, s_pad - s)
    return _blocks(bias, 4, block)


def _logits(qg, kb, bias_b, scale, soft_cap):
    """Scaled (soft-capped) logits [B, K, G, T, bk] in f32, plus the pre-cap values."""
    s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, kb, preferred_element_type=jnp.float32) * scale
    raw = s
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    if bias_b is not None:
        s = s + bias_b.astype(jnp.float32)
    return s, raw


def _block_mask(spec, q_pos, kp_b, valid_b, q_seg, ks_b, bias_b=None):
    """Visibility [B|1, K|1, G|1, T, bk] for one key block; a -inf bias masks its key."""
    mask = visible(
        spec,
        q_pos[:, None],
        kp_b[None, :],
        None if q_seg is None else q_seg[:, None, None, :, None],
        None if ks_b is None else ks_b[:, None, None, None, :],
    )
    valid = valid_b[None, None, None, None, :]
    mask = valid if mask is None else mask_and(mask, valid)
    return mask if bias_b is None else mask_and(mask, bias_b > -jnp.inf)


def kv_groups(q, k, v) -> int:
    """Heads of the [B, T, Kc, G, H] query grouping: Kc = lcm(Kk, Kv) divides N, and query
    group c reads key head c // (Kc // Kk) and value head c // (Kc // Kv)."""
    return math.lcm(k.shape[2], v.shape[2])


def _expand(x: jax.Array, kc: int) -> jax.Array:
    """One block [B, bk, Kx, .] of keys or values repeated to the Kc query groups."""
    return x if x.shape[2] == kc else jnp.repeat(x, kc // x.shape[2], axis=2)


def _fold(dx: jax.Array, heads: int) -> jax.Array:
    """The gradient of :func:`_expand`: [B, bk, Kc, .] summed back to ``heads`` heads."""
    b, bk, kc, d = dx.shape
    return dx if kc == heads else dx.reshape(b, bk, heads, kc // heads, d).sum(3)


def _prepare(q, k, v, bias, kv_pos, q_seg, kv_seg, block_kv):
    b, t, n, h = q.shape
    s, kh = k.shape[1], kv_groups(q, k, v)
    bk = min(block_kv, s)
    s_pad = -(-s // bk) * bk
    pad = s_pad - s
    kb = _blocks(_pad_axis(k, 1, pad), 1, bk)
    # v only ever meets probabilities (p @ v, dO v^T), which are 0 on masked keys: made finite
    # once here, so garbage in a key a row cannot see never reaches it (0 * NaN is NaN).
    vb = _blocks(_pad_axis(finite_or_zero(v), 1, pad), 1, bk)
    kp = _blocks(_pad_axis(kv_pos, 0, pad), 0, bk)
    valid = _blocks(jnp.arange(s_pad) < s, 0, bk)
    ks = None if kv_seg is None else _blocks(_pad_axis(kv_seg, 1, pad, -1), 1, bk)
    bb = _bias_blocks(bias, s_pad, bk, kh)
    qg = q.reshape(b, t, kh, n // kh, h)
    return qg, kb, vb, kp, valid, ks, bb


def _forward(
    q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, spec, scale, soft_cap, block_kv, with_entropy
):
    b, t, n, _ = q.shape
    kh, hv = kv_groups(q, k, v), v.shape[-1]
    g = n // kh
    qg, kb, vb, kp, valid, ks, bb = _prepare(q, k, v, bias, kv_pos, q_seg, kv_seg, block_kv)

    def step(carry, xs):
        m, den, pz, acc = carry
        k_b, v_b, kp_b, valid_b, ks_b, bias_b = xs
        k_b, v_b = _expand(k_b, kh), _expand(v_b, kh)
        z, _ = _logits(qg, k_b, bias_b, scale, soft_cap)
        mask = _block_mask(spec, q_pos, kp_b, valid_b, q_seg, ks_b, bias_b)
        z = jnp.where(mask, z, MASK_VALUE)
        m_new = jnp.maximum(m, z.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(z - m_new[..., None]), 0.0)
        den = alpha * den + p.sum(-1)
        if with_entropy:  # running sum_j exp(z_j - m) z_j, rescaled like den
            pz = alpha * pz + jnp.sum(p * jnp.where(mask, z, 0.0), axis=-1)
        pv = jnp.einsum(
            "BKGTS,BSKH->BKGTH", p.astype(v.dtype), v_b, preferred_element_type=jnp.float32
        )
        acc = alpha[..., None] * acc + pv
        return (m_new, den, pz, acc), None

    init = (
        jnp.full((b, kh, g, t), MASK_VALUE, jnp.float32),
        jnp.zeros((b, kh, g, t), jnp.float32),
        jnp.zeros((b, kh, g, t), jnp.float32),
        jnp.zeros((b, kh, g, t, hv), jnp.float32),
    )
    init = like_vma(init, q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg)
    (m, den, pz, acc), _ = jax.lax.scan(step, init, (kb, vb, kp, valid, ks, bb))
    seen = den > 0
    safe_den = jnp.where(seen, den, 1.0)
    out = acc / safe_den[..., None]
    out = jnp.moveaxis(out, 3, 1).reshape(b, t, n, hv).astype(q.dtype)  # BKGTH -> BTKGH
    lse = jnp.where(seen, m + jnp.log(safe_den), -jnp.inf)
    # entropy = lse - sum_j p_j z_j (0 for rows that see nothing); zeros when not asked for.
    ent = jnp.where(seen, lse - pz / safe_den, 0.0) if with_entropy else jnp.zeros_like(den)

    def to_btn(x):  # [B, K, G, T] -> [B, T, N]
        return jnp.moveaxis(x, 3, 1).reshape(b, t, n)

    return out, to_btn(lse), to_btn(ent)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def flash_attention_xla(
    q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, spec: MaskSpec, scale, soft_cap, block_kv,
    with_entropy=False,
):
    """Blockwise attention.

    Returns (out [B, T, N, Hv] q.dtype, lse [B, T, N] f32, entropy [B, T, N] f32); the entropy
    is computed only when ``with_entropy`` (zeros otherwise). All three are differentiable.
    """
    return _forward(
        q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, spec, scale, soft_cap, block_kv,
        with_entropy,
    )


def _fwd(q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, spec, scale, soft_cap, block_kv,
         with_entropy):
    out, lse, ent = _forward(
        q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, spec, scale, soft_cap, block_kv,
        with_entropy,
    )
    return (out, lse, ent), (q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, out, lse, ent)


def _bwd(spec, scale, soft_cap, block_kv, with_entropy, res, cts):
    q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, out, lse, ent = res
    d_out, d_lse, d_ent = cts
    b, t, n, h = q.shape
    s, kh = k.shape[1], kv_groups(q, k, v)
    g = n // kh
    qg, kb, vb, kp, valid, ks, bb = _prepare(q, k, v, bias, kv_pos, q_seg, kv_seg, block_kv)
    dog = d_out.reshape(b, t, kh, g, -1)
    # Operands of the matmuls that sum over masked pairs (dV = p^T dO, dK = ds^T q, and dQ =
    # ds k per block below) are made finite: their weights there are 0, and 0 * NaN is NaN.
    dog_safe, qg_safe = finite_or_zero(dog), finite_or_zero(qg)

    def to_bkgt(x):  # [B, T, N] -> [B, K, G, T]
        return jnp.moveaxis(x.reshape(b, t, kh, g), 1, 3)

    # d lse / d z = p, so the lse cotangent folds into delta: ds = p * (dp - (delta - d_lse)).
    delta = to_bkgt(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1))
    delta = delta - to_bkgt(d_lse.astype(jnp.float32))
    lse_g = to_bkgt(jnp.where(jnp.isfinite(lse), lse, 0.0))
    # Entropy H = lse - sum_j p_j z_j has dH/dz_j = -p_j (z_j - c) with c = sum_j p_j z_j
    # = lse - H, so its cotangent adds -d_ent * p * (z - c) to dz.
    d_ent_g = to_bkgt(d_ent.astype(jnp.float32)) if with_entropy else None
    c_g = lse_g - to_bkgt(ent) if with_entropy else None

    def step(dq, xs):
        k_b, v_b, kp_b, valid_b, ks_b, bias_b = xs
        k_b, v_b = _expand(k_b, kh), _expand(v_b, kh)
        z, raw = _logits(qg, k_b, bias_b, scale, soft_cap)
        mask = _block_mask(spec, q_pos, kp_b, valid_b, q_seg, ks_b, bias_b)
        p = jnp.where(mask, jnp.exp(z - lse_g[..., None]), 0.0)
        dv_b = jnp.einsum(
            "BKGTS,BTKGH->BSKH", p.astype(d_out.dtype), dog_safe,
            preferred_element_type=jnp.float32,
        )
        dp = jnp.einsum("BTKGH,BSKH->BKGTS", dog, v_b, preferred_element_type=jnp.float32)
        dz = p * (dp - delta[..., None])
        if with_entropy:
            dz = dz - d_ent_g[..., None] * p * jnp.where(mask, z - c_g[..., None], 0.0)
        dz = jnp.where(mask, dz, 0.0)  # a row's NaN delta or dO must not reach masked pairs
        dbias_b = None
        if bias_b is not None:
            dbias_b = dz.sum(
                axis=tuple(i for i in range(5) if bias_b.shape[i] == 1), keepdims=True
            )
        draw = dz
        if soft_cap is not None:  # (raw is NaN on a masked pair of garbage: select it too)
            draw = dz * (1.0 - jnp.square(jnp.tanh(jnp.where(mask, raw, 0.0) / soft_cap)))
        draw = (draw * scale).astype(q.dtype)
        dq = dq + jnp.einsum(
            "BKGTS,BSKH->BTKGH", draw, finite_or_zero(k_b), preferred_element_type=jnp.float32
        )
        dk_b = jnp.einsum("BKGTS,BTKGH->BSKH", draw, qg_safe, preferred_element_type=jnp.float32)
        return dq, (_fold(dk_b, k.shape[2]), _fold(dv_b, v.shape[2]), dbias_b)

    dq0 = like_vma(
        jnp.zeros(qg.shape, jnp.float32), q, k, v, bias, q_pos, kv_pos, q_seg, kv_seg, out,
        lse, d_out, d_lse,
    )
    dq, (dk, dv, dbias) = jax.lax.scan(step, dq0, (kb, vb, kp, valid, ks, bb))

    def unblock(x):  # [nb, B, bk, ...] -> [B, S, ...]
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :s]

    dk = unblock(dk).astype(k.dtype)
    dv = unblock(dv).astype(v.dtype)
    if bias is not None:
        # dbias: [nb, B|1, K|1, G|1, T|1, bk|1] -> bias shape
        dbias = jnp.moveaxis(dbias, 0, 4)  # [B, K, G, T, nb, bk]
        if bias.shape[3] == 1:
            dbias = dbias.sum(axis=(4, 5))
        else:
            dbias = dbias.reshape(*dbias.shape[:4], -1)[..., :s]
        dbias = dbias.reshape(bias.shape).astype(bias.dtype)
    return (dq.reshape(q.shape).astype(q.dtype), dk, dv, dbias, None, None, None, None)


flash_attention_xla.defvjp(_fwd, _bwd)


# ----------------------------------------------------------------------------- adapter


def _seg(a: AttentionArgs) -> tuple[jax.Array | None, jax.Array | None]:
    seg = a.segment_ids
    return (None, None) if seg is None else (seg.q, seg.kv)


def _config(a: AttentionArgs) -> XlaConfig:
    return a.config if a.config is not None else XlaConfig.get_default()


def _fn(q, k, v, a: AttentionArgs):
    out, lse, ent = flash_attention_xla(
        q, k, v, a.bias, a.q_positions, a.kv_positions, *_seg(a), a.spec, a.scale,
        a.logits_soft_cap, _config(a).block_kv, a.return_entropy,
    )
    return (out, lse, ent) if a.return_entropy else (out, lse)


def _block_bwd(q, k, v, out, lse, dout, dlse, a: AttentionArgs):
    res = (
        q, k, v, None, a.q_positions, a.kv_positions, *_seg(a), out, lse, jnp.zeros_like(lse),
    )
    cts = (dout, dlse, jnp.zeros_like(lse))
    return _bwd(a.spec, a.scale, a.logits_soft_cap, _config(a).block_kv, False, res, cts)[:3]


IMPLEMENTATION = Implementation(
    name="xla", fn=_fn, bwd=_block_bwd, config_cls=XlaConfig, returns_entropy=True,
    description="blockwise online softmax in JAX; memory linear in sequence")
