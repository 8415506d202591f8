"""Softmax attention: the definition (``reference``) and the dispatching op (``attention``).

Shapes (letters used everywhere in attnlab): B batch, T queries, S keys, N query heads,
K key/value heads (N must be a multiple of K: GQA/MQA), H head dim (Hv for values). Keys and
values may have different head counts (Kk, Kv, both dividing N): query head i reads key head
``i // (N // Kk)`` and value head ``i // (N // Kv)``.

    out = softmax(cap(scale * q k^T) + bias, masked) v
    lse = log sum_j exp(logits_ij)       (per query row; -inf for a row that sees no key)
    entropy = -sum_j p_ij log p_ij = lse - sum_j p_ij logits_ij   (0 for a row that sees no key)

Every implementation registered here computes exactly this function; ``impl="auto"`` picks
the fastest one that supports the call on the current platform, and never a different
function.

Masked positions never influence a row, in any implementation: non-finite values (NaN, inf)
in a query, key, value or output cotangent at a position a row cannot see (causal future,
outside a window, another document, a -inf bias, padding) never reach that row's output, LSE
or entropy, nor the gradients of the positions only such clean rows see. A row that sees a
non-finite value gets an unspecified result (usually NaN; an implementation may read the
value as 0). Implementations select rather than multiply by a zero weight (0 * NaN is NaN):
``attnlab/ops/README.md``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from attnlab.ops._checks import check_gqa, check_qkv
from attnlab.ops._registry import (  # noqa: F401 (platform: re-export)
    Implementation,
    Registry,
    backends,
    platform,
)
from attnlab.ops._softmax import head_logits, masked_softmax
from pallas_kernels.common.masks import (
    MaskSpec,
    SegmentIds,
    mask_and,
    visible,
)
from pallas_kernels.common.static_args import check_bool, check_static_float


class AttentionArgs(NamedTuple):
    """Normalized, validated arguments handed to every implementation."""

    spec: MaskSpec
    q_positions: jax.Array  # [T] int32
    kv_positions: jax.Array  # [S] int32
    segment_ids: SegmentIds | None
    bias: jax.Array | None  # [B|1, N|1, T|1, S|1]
    scale: float
    logits_soft_cap: float | None
    positions_are_default: bool  # positions were 0..T-1 / 0..S-1 (no offsets given)
    config: Any
    return_residuals: bool = False
    return_entropy: bool = False


# ----------------------------------------------------------------------------- reference


def reference(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs: Any
              ) -> jax.Array | tuple[jax.Array, ...]:
    """The definition of softmax attention, in plain ``jnp`` (materializes [B, N, T, S]).

    ``attention(q, k, v, impl="reference", **kwargs)``: the same arguments (but ``impl`` and
    ``config``) and return values as :func:`attention`; the math is ``_reference`` below.
    """
    for name in ("impl", "config"):
        if name in kwargs:
            raise ValueError(f"reference takes no {name}")
    return attention(q, k, v, impl="reference", **kwargs)


def _assemble(res: tuple[jax.Array, ...], return_residuals: bool, return_entropy: bool):
    """(out, lse[, entropy]) -> out, (out, lse), (out, entropy) or (out, lse, entropy)."""
    out, lse = res[0], res[1]
    extra = ([lse] if return_residuals else []) + ([res[2]] if return_entropy else [])
    return (out, *extra) if extra else out


def _reference(q, k, v, a: AttentionArgs) -> tuple[jax.Array, ...]:
    z, v_n = head_logits(q, k, v, a.scale, a.logits_soft_cap)
    if a.bias is not None:
        z = z + a.bias.astype(jnp.float32)
    seg = a.segment_ids
    mask = visible(
        a.spec,
        a.q_positions[:, None],
        a.kv_positions[None, :],
        None if seg is None else seg.q[:, None, :, None],
        None if seg is None else seg.kv[:, None, None, :],
    )
    if mask is None:
        mask = jnp.ones((1, 1, q.shape[1], k.shape[1]), bool)
    if a.bias is not None:  # a -inf bias masks its key (a row of them sees no key, as in xla)
        mask = mask_and(mask, z > -jnp.inf)
    out, lse, p, z, seen = masked_softmax(z, mask, v_n, q.dtype)
    result = (out, jnp.swapaxes(lse, 1, 2))
    if a.return_entropy:
        entropy = jnp.where(seen, lse - jnp.sum(p * z, axis=-1), 0.0)
        result += (jnp.swapaxes(entropy, 1, 2),)
    return result


# ----------------------------------------------------------------------------- registry


def _reference_bwd(q, k, v, out, lse, dout, dlse, a: AttentionArgs):
    """jax.vjp of the block forward, with the cotangents the LSE merge hands the block.

    The merged result is out = sum_b w_b o_b with w_b = exp(lse_b - lse); so the block's
    (o_b, lse_b) receive do_b = w_b dout and dlse_b = w_b (dout . (o_b - out) + dlse).
    """
    (o_b, lse_b), vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, a)[:2], q, k, v)
    fin = jnp.isfinite(lse_b) & jnp.isfinite(lse)
    w = jnp.where(fin, jnp.exp(jnp.where(fin, lse_b - lse, 0.0)), 0.0)
    df = dout.astype(jnp.float32)
    do_b = (w[..., None] * df).astype(o_b.dtype)
    corr = jnp.sum(df * (o_b.astype(jnp.float32) - out.astype(jnp.float32)), axis=-1)
    dlse_b = w * (corr + dlse.astype(jnp.float32))
    return vjp((do_b, dlse_b))


def args_from_kwargs(q, k, v, **kwargs: Any) -> AttentionArgs:
    """The validated, normalized arguments of ``attention(q, k, v, **kwargs)`` (this op's
    registry normalizer); ValueError on bad or unknown arguments."""
    flags = {name: check_bool(name, kwargs.pop(name, False))
             for name in ("return_residuals", "return_entropy")}
    a = _normalize(
        q, k, v, kwargs.pop("bias", None), kwargs.pop("is_causal", False),
        kwargs.pop("local_window_size", None), kwargs.pop("segment_ids", None),
        kwargs.pop("q_offset", 0), kwargs.pop("kv_offset", 0), kwargs.pop("q_positions", None),
        kwargs.pop("kv_positions", None), kwargs.pop("logits_soft_cap", None),
        kwargs.pop("scale", None), kwargs.pop("config", None),
    )
    if kwargs:
        raise ValueError(f"unknown arguments {sorted(kwargs)}")
    return a._replace(**flags)


# Fastest first; "auto" takes the first that supports the call. On GPU cuDNN is measured
# faster than our Triton kernel (experiments/results/bench_attention_h100_*.json), so it goes
# first where it applies; the Triton kernel takes what cuDNN cannot (offsets, position arrays,
# segment ids, soft-cap, the LSE, entropy). pallas_mosaic_gpu (the Hopper forward) is not in
# the order: on an H100 it measured 0.77-0.82x cuDNN (attnlab/ops/README.md); name it to use it.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "gpu": ("cudnn", "pallas_triton", "xla"),
    "tpu": ("pallas_tpu", "xla"),
    "cpu": ("xla",),
}
REGISTRY = Registry(
    "attention",
    normalize=args_from_kwargs,
    reference=Implementation(
        name="reference", description="plain jnp definition; materializes [B, N, T, S]",
        fn=_reference, bwd=_reference_bwd, returns_entropy=True,
    ),
    adapters=backends(
        "attention", "xla", "cudnn", "pallas_triton", "pallas_tpu", "pallas_mosaic_gpu"
    ),
    auto_order=AUTO_ORDER,
)
register, choose, implementations = REGISTRY.register, REGISTRY.choose, REGISTRY.implementations
explain, auto_choice = REGISTRY.explain, REGISTRY.auto_choice


# ----------------------------------------------------------------------------- public op


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    bias: jax.Array | None = None,
    is_causal: bool = False,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    q_offset: int | jax.Array = 0,
    kv_offset: int | jax.Array = 0,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    logits_soft_cap: float | None = None,
    scale: float | None = None,
    return_residuals: bool = False,
    return_entropy: bool = False,
    impl: str = "auto",
    config: Any = None,
) -> jax.Array | tuple[jax.Array, ...]:
    """Softmax attention with masks, GQA, soft-cap and an exact log-sum-exp.

    Args:
      q: [B, T, N, H] queries.
      k: [B, S, Kk, H] keys; N must be a multiple of Kk (GQA/MQA, never repeated in memory).
      v: [B, S, Kv, Hv] values; N must be a multiple of Kv. Query head i reads key head
        i // (N // Kk) and value head i // (N // Kv); Hv may differ from H (e.g. MLA's 192
        query/key and 128 value dims). Any head dims >= 1 (pallas_triton takes up to 256 and
        pads internally; pallas_tpu reads whole head dims and needs no padding).
      bias: optional additive logits bias, shape broadcastable as [B|1, N|1, T|1, S|1].
      is_causal: query at position p sees keys at positions <= p.
      local_window_size: int w or (left, right): query at p sees keys in [p - left, p + right].
        A side given as None is unbounded.
      segment_ids: [B, T] ids (self-attention, T == S) or a pair ([B, T], [B, S]); queries see
        only keys with the same id (packed documents).
      q_offset, kv_offset: global position of the first query / key (int or traced scalar),
        so a block of a longer sequence gets the right mask.
      q_positions, kv_positions: [T] / [S] int32 global positions (instead of offsets), for
        permuted layouts such as striped or zigzag sequence parallelism.
      logits_soft_cap: c > 0: logits become c * tanh(logits / c) (Gemma 2 style), before the
        bias.
      scale: logits scale, default 1 / sqrt(H).
        ``scale`` and ``logits_soft_cap`` are static Python floats: under ``jax.jit`` they
        cannot be traced arguments (pass them as static arguments), as ``is_causal`` and
        ``local_window_size`` cannot. Traced offsets, positions and segment ids are fine, but
        their values are not checked (positions in range, ids per document).
      return_residuals: also return lse [B, T, N] float32, the natural log-sum-exp of each
        row's logits (-inf for a row that sees no key).
      return_entropy: also return the attention entropy of each row, [B, T, N] float32,
        -sum_j p_ij log p_ij (0 for a row that sees no key), computed from the same pass
        (lse - sum_j p_ij z_ij) and differentiable (entropy-regularized training).
      impl: "auto", "reference", "xla", "cudnn", "pallas", "pallas_triton", "pallas_tpu",
        "pallas_mosaic_gpu" (Hopper; bfloat16/float16; never chosen by "auto").
      config: block-size config of the chosen implementation (e.g. ``XlaConfig``).

    Returns:
      out [B, T, N, Hv] in q's dtype; with ``return_residuals`` and/or ``return_entropy`` a
      tuple (out, lse) / (out, entropy) / (out, lse, entropy). Rows that see no key give 0
      output (never NaN). Whatever a row cannot see (even NaN or inf) never influences its
      results or the gradients of what it sees (module docstring).

    Raises:
      ValueError: bad shapes (H = 0 or S = 0 included), dtypes or arguments (non-integer
        offsets or positions, traced or non-finite scale / soft-cap), unknown impl.
      NotImplementedError: the named impl cannot compute this call (the message says why).

    Example:
      >>> out = attention(q, k, v, is_causal=True)
    """
    return_residuals = check_bool("return_residuals", return_residuals)
    return_entropy = check_bool("return_entropy", return_entropy)
    a = _normalize(
        q, k, v, bias, is_causal, local_window_size, segment_ids, q_offset, kv_offset,
        q_positions, kv_positions, logits_soft_cap, scale, config,
    )._replace(return_residuals=return_residuals, return_entropy=return_entropy)
    chosen = choose(q, k, v, a, impl)
    return _assemble(chosen.fn(q, k, v, a), return_residuals, return_entropy)


def block_args(
    *, spec: MaskSpec, q_positions: jax.Array, kv_positions: jax.Array,
    segment_ids: SegmentIds | None, scale: float, logits_soft_cap: float | None,
    config: Any = None,
) -> AttentionArgs:
    """Normalized arguments of one block of a longer, already validated call.

    For sequence-parallel callers (ring, star) that checked the whole call once and hand
    each block its global positions: the mask stays a :class:`MaskSpec` value, nothing is
    unpacked to keywords and validated again.
    """
    return AttentionArgs(spec, q_positions, kv_positions, segment_ids, None, float(scale),
                         logits_soft_cap, False, config, return_residuals=True)


def attention_block(q: jax.Array, k: jax.Array, v: jax.Array, a: AttentionArgs,
                    impl: str = "auto") -> tuple[jax.Array, jax.Array]:
    """(out [B, T, N, Hv], lse [B, T, N] float32) of one block, from :func:`block_args`."""
    out, lse = choose(q, k, v, a, impl).fn(q, k, v, a)[:2]
    return out, lse


def _normalize(
    q, k, v, bias, is_causal, local_window_size, segment_ids, q_offset, kv_offset,
    q_positions, kv_positions, logits_soft_cap, scale, config,
) -> AttentionArgs:
    check_qkv(q, k, v)
    check_gqa(q, k, v)
    b, t, n, h = q.shape
    s = k.shape[1]
    if s == 0:
        raise ValueError(
            f"k and v hold no keys (S=0: k {k.shape}); attention needs at least one key"
        )
    spec = MaskSpec.from_jax_nn(is_causal=is_causal, local_window_size=local_window_size)

    default_pos = q_positions is None and kv_positions is None
    if q_positions is not None or kv_positions is not None:
        if not (_is_zero(q_offset) and _is_zero(kv_offset)):
            raise ValueError("give either q_offset/kv_offset or q_positions/kv_positions, not both")
        if q_positions is None or kv_positions is None:
            raise ValueError("q_positions and kv_positions must be given together")
        if jnp.shape(q_positions) != (t,) or jnp.shape(kv_positions) != (s,):
            raise ValueError(
                f"q_positions must have shape ({t},) and kv_positions ({s},), got "
                f"{jnp.shape(q_positions)} and {jnp.shape(kv_positions)}"
            )
        for name, pos in (("q_positions", q_positions), ("kv_positions", kv_positions)):
            _check_integer(name, pos)
        q_pos = jnp.asarray(q_positions, jnp.int32)
        kv_pos = jnp.asarray(kv_positions, jnp.int32)
    else:
        for name, off in (("q_offset", q_offset), ("kv_offset", kv_offset)):
            if jnp.ndim(off) != 0:
                raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(off)}")
            _check_integer(name, off)
        default_pos = _is_zero(q_offset) and _is_zero(kv_offset)
        q_pos = jnp.asarray(q_offset, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
        kv_pos = jnp.asarray(kv_offset, jnp.int32) + jnp.arange(s, dtype=jnp.int32)

    seg = None
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError("segment_ids must be an array or a (q_ids, kv_ids) pair")
            qs, ks = segment_ids
        else:
            if t != s:
                raise ValueError(
                    f"a single segment_ids array needs T == S (got T={t}, S={s}); pass a "
                    "(q_segment_ids, kv_segment_ids) pair"
                )
            qs = ks = segment_ids
        if jnp.shape(qs) != (b, t) or jnp.shape(ks) != (b, s):
            raise ValueError(
                f"segment ids must have shapes ({b}, {t}) and ({b}, {s}), got "
                f"{jnp.shape(qs)} and {jnp.shape(ks)}"
            )
        for name, ids in (("q segment ids", qs), ("kv segment ids", ks)):
            if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
                raise ValueError(
                    f"{name} must be integers (one id per document), got dtype "
                    f"{jnp.result_type(ids)}; casting would merge documents (1.5 -> 1)"
                )
        seg = SegmentIds(jnp.asarray(qs, jnp.int32), jnp.asarray(ks, jnp.int32))

    if bias is not None:
        want = (b, n, t, s)
        if jnp.ndim(bias) != 4 or any(d not in (1, w) for d, w in zip(bias.shape, want)):
            raise ValueError(
                f"bias must be broadcastable as [B|1, N|1, T|1, S|1] = {want}, got {bias.shape}"
            )
    if logits_soft_cap is not None:
        logits_soft_cap = check_static_float("logits_soft_cap", logits_soft_cap, positive=True)
    scale = 1.0 / math.sqrt(h) if scale is None else check_static_float("scale", scale)
    return AttentionArgs(
        spec, q_pos, kv_pos, seg, bias, scale, logits_soft_cap, default_pos, config,
    )


def _is_zero(x) -> bool:
    return isinstance(x, (int, float)) and x == 0


def _check_integer(name: str, x: Any) -> None:
    """Positions and offsets are integers: a float would be truncated into another mask."""
    dtype = x.dtype if isinstance(x, jax.ShapeDtypeStruct) else jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        given = f"{x!r} of " if isinstance(x, (float, bool)) else ""
        raise ValueError(f"{name} must hold integers (token positions), got {given}dtype {dtype}")
