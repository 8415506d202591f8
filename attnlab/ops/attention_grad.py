"""One block's share of the attention gradient, given the *global* output and log-sum-exp.

When attention over a long key sequence is split into key blocks (ring attention, split-K)
and the partial results are merged by their log-sum-exp, the gradient of the merged result
with respect to one (query block, key block) pair is the flash-attention backward of that
pair evaluated with the merged (global) ``out`` and ``lse``:

    p_ij  = exp(z_ij - lse_i)                       (global lse: p is the global probability)
    delta_i = sum_h dout_ih * out_ih - dlse_i       (global out)
    dv_j  = sum_i p_ij dout_i
    dz_ij = p_ij * (dout_i . v_j - delta_i)
    dq_i  = scale * sum_j dz_ij cap'(z_ij) k_j,     dk_j = scale * sum_i dz_ij cap'(z_ij) q_i

Summing the pairs' (dq, dk, dv) over all key blocks gives exactly the gradient of the whole
attention. :func:`attention_bwd` computes one pair's share; the ring backward in
``sharding.ring`` calls it once per ring step.

Implementations: ``"reference"`` (the definition: ``jax.vjp`` of the block's forward with the
cotangents the merge passes to it), ``"xla"`` (the blockwise backward of ``_xla_flash``),
``"pallas_triton"`` and ``"pallas_tpu"`` (the kernels' own backward passes).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attnlab.ops._registry import Implementation, Registry, platform
from attnlab.ops._xla_flash import XlaConfig
from attnlab.ops._xla_flash import _bwd as _xla_bwd
from attnlab.ops.attention import AttentionArgs, _normalize
from attnlab.ops.attention import attention as _attention

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "gpu": ("pallas_triton", "xla"),
    "tpu": ("pallas_tpu", "xla"),
    "cpu": ("xla",),
}
REGISTRY = Registry(
    "attention_bwd", AUTO_ORDER,
    {"gpu": "pallas_triton", "tpu": "pallas_tpu", "cpu": "pallas_triton"},
)
implementations = REGISTRY.implementations


def attention_bwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    dlse: jax.Array | None = None,
    *,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    q_offset: int | jax.Array = 0,
    kv_offset: int | jax.Array = 0,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    logits_soft_cap: float | None = None,
    scale: float | None = None,
    impl: str = "auto",
    config: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradient share (dq, dk, dv) of one (query block, key block) pair.

    Args:
      q: [B, T, N, H] queries of the block; k: [B, S, K, H], v: [B, S, K, Hv] one key block.
      out: [B, T, N, Hv] the *global* attention output of these queries (all key blocks
        merged); lse: [B, T, N] float32 their global log-sum-exp (-inf: row sees no key).
      dout: [B, T, N, Hv] cotangent of ``out``; dlse: [B, T, N] cotangent of ``lse`` or None.
      is_causal, local_window_size, segment_ids, q_offset, kv_offset, q_positions,
        kv_positions, logits_soft_cap, scale: the block's mask and logits, exactly as
        :func:`attnlab.ops.attention` takes them (global offsets / positions of the block).
      impl: "auto", "reference", "xla", "pallas", "pallas_triton", "pallas_tpu".
      config: block-size config of the chosen implementation.

    Returns:
      (dq [B, T, N, H], dk [B, S, K, H], dv [B, S, K, Hv]) in the input dtypes. With a single
      key block (out, lse the block's own), this is the gradient of attention itself.

    Raises:
      ValueError: bad shapes or arguments, unknown impl.
      NotImplementedError: the named impl cannot compute this call.

    Example:
      >>> dq, dk, dv = attention_bwd(q, k_blk, v_blk, out, lse, dout, is_causal=True,
      ...                            q_offset=q0, kv_offset=k0)
    """
    a = _normalize(
        q, k, v, None, is_causal, local_window_size, segment_ids, q_offset, kv_offset,
        q_positions, kv_positions, logits_soft_cap, scale, config,
    )
    b, t, n, _ = q.shape
    want = {"out": (b, t, n, v.shape[-1]), "lse": (b, t, n), "dout": (b, t, n, v.shape[-1])}
    got = {"out": out, "lse": lse, "dout": dout, **({"dlse": dlse} if dlse is not None else {})}
    want["dlse"] = want["lse"]
    for name, x in got.items():
        if jnp.shape(x) != want[name]:
            raise ValueError(f"{name} must have shape {want[name]}, got {jnp.shape(x)}")
    if dlse is None:
        dlse = jnp.zeros(lse.shape, jnp.float32)
    chosen = REGISTRY.choose(q, k, v, a, impl)
    return chosen.fn(q, k, v, out, lse.astype(jnp.float32), dout, dlse, a)


# ----------------------------------------------------------------------------- reference


def _reference(q, k, v, out, lse, dout, dlse, a: AttentionArgs):
    """jax.vjp of the block forward, with the cotangents the LSE merge hands the block.

    The merged result is out = sum_b w_b o_b with w_b = exp(lse_b - lse); so the block's
    (o_b, lse_b) receive do_b = w_b dout and dlse_b = w_b (dout . (o_b - out) + dlse).
    """
    seg = a.segment_ids

    def block(q, k, v):
        return _attention(
            q, k, v, is_causal=a.spec.causal,
            local_window_size=(a.spec.window_left, a.spec.window_right),
            segment_ids=None if seg is None else (seg.q, seg.kv),
            q_positions=a.q_positions, kv_positions=a.kv_positions,
            logits_soft_cap=a.logits_soft_cap, scale=a.scale, return_residuals=True,
            impl="reference",
        )

    (o_b, lse_b), vjp = jax.vjp(block, q, k, v)
    fin = jnp.isfinite(lse_b) & jnp.isfinite(lse)
    w = jnp.where(fin, jnp.exp(jnp.where(fin, lse_b - lse, 0.0)), 0.0)
    df = dout.astype(jnp.float32)
    do_b = (w[..., None] * df).astype(o_b.dtype)
    corr = jnp.sum(df * (o_b.astype(jnp.float32) - out.astype(jnp.float32)), axis=-1)
    dlse_b = w * (corr + dlse.astype(jnp.float32))
    return vjp((do_b, dlse_b))


def _never(q, k, v, a, plat) -> str | None:
    return None


# ----------------------------------------------------------------------------- xla


def _xla(q, k, v, out, lse, dout, dlse, a: AttentionArgs):
    cfg = a.config if isinstance(a.config, XlaConfig) else XlaConfig.get_default()
    seg = a.segment_ids
    res = (
        q, k, v, None, a.q_positions, a.kv_positions,
        None if seg is None else seg.q, None if seg is None else seg.kv,
        out, lse, jnp.zeros_like(lse),
    )
    cts = (dout, dlse, jnp.zeros_like(lse))
    dq, dk, dv = _xla_bwd(a.spec, a.scale, a.logits_soft_cap, cfg.block_kv, False, res, cts)[:3]
    return dq, dk, dv


# ----------------------------------------------------------------------------- kernels


def _triton_unsupported(q, k, v, a: AttentionArgs, plat: str) -> str | None:
    from attnlab.ops import _attention_triton

    return _attention_triton._unsupported(q, k, v, a, plat)


def _triton(q, k, v, out, lse, dout, dlse, a: AttentionArgs):
    from pallas_kernels.gpu.flash_common import FlashConfig, tile_plan, tiling
    from pallas_kernels.gpu.flash_fwd import flash_vjp_bwd as _flash_bwd

    h = q.shape[-1]
    cfg = a.config if isinstance(a.config, FlashConfig) else None
    if cfg is None:
        cfg = FlashConfig.get_default(head_dim=h, causal=a.spec.causal, dtype=q.dtype)
    seg = a.segment_ids
    q_seg = None if seg is None else seg.q
    kv_seg = None if seg is None else seg.kv
    plan = tile_plan(
        a.spec, a.q_positions, a.kv_positions, q_seg, kv_seg,
        tiling(cfg, q.shape[1], k.shape[1]),
    )
    res = (q, k, v, a.q_positions, a.kv_positions, q_seg, kv_seg, plan, out, lse)
    grads = _flash_bwd(
        a.spec, a.scale, a.logits_soft_cap, cfg, platform() == "cpu", False, res, (dout, dlse)
    )
    return grads[:3]


def _tpu_unsupported(q, k, v, a: AttentionArgs, plat: str) -> str | None:
    from attnlab.ops import _attention_tpu

    return _attention_tpu._unsupported(q, k, v, a, plat)


def _tpu(q, k, v, out, lse, dout, dlse, a: AttentionArgs):
    from jax.experimental.pallas import tpu as pltpu

    from pallas_kernels.tpu.flash import TpuFlashConfig
    from pallas_kernels.tpu.flash import flash_vjp_bwd as _flash_bwd

    cfg = a.config if isinstance(a.config, TpuFlashConfig) else TpuFlashConfig.get_default()
    interpret = pltpu.InterpretParams() if platform() == "cpu" else False
    seg = a.segment_ids
    res = (
        q, k, v, a.q_positions, a.kv_positions,
        None if seg is None else seg.q, None if seg is None else seg.kv, out, lse,
    )
    grads = _flash_bwd(
        a.spec, a.scale, a.logits_soft_cap, cfg, interpret, False, res, (dout, dlse)
    )
    return grads[:3]


REGISTRY.register(
    Implementation("reference", _reference, _never, "jax.vjp of the reference block forward")
)
REGISTRY.register(
    Implementation("xla", _xla, _never, "blockwise XLA flash backward (memory linear)")
)
REGISTRY.register(
    Implementation("pallas_triton", _triton, _triton_unsupported, "Triton flash backward kernels")
)
REGISTRY.register(
    Implementation("pallas_tpu", _tpu, _tpu_unsupported, "Mosaic TPU flash backward kernels")
)
