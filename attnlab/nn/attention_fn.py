"""A drop-in ``attention_fn`` for Flax's attention modules, computed by attnlab.

``flax.nnx.MultiHeadAttention(..., attention_fn=attnlab.nn.attention_fn)`` and
``flax.linen.MultiHeadDotProductAttention(attention_fn=attnlab.nn.attention_fn)`` call it with
the arguments of Flax's own ``dot_product_attention``; the math goes through
:func:`attnlab.ops.dot_product_attention` (and so through attnlab's implementation registry).
``make_attention_fn(implementation=..., ...)`` binds an implementation and extra keywords.

What attnlab's kernels never compute is left to Flax's own function, which materializes the
attention weights: attention dropout (``dropout_rate > 0`` and not ``deterministic``: Flax drops
weights, with the same random bits as Flax's default, so results are identical), sowing the
weights (``sow_weights=True``), custom einsums (AQT) and non-float dtypes. With
``implementation=None`` (or ``"auto"``) such a call falls back to Flax's function; with a
named implementation it raises ``NotImplementedError``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx

from attnlab.ops.dot_product_attention import dot_product_attention, resolve_implementation

# Keywords of dot_product_attention that make_attention_fn may bind.
_BINDABLE = ("implementation", "scale", "local_window_size")
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def _flax_only(module, dropout_rate, deterministic, dtype, einsums) -> str | None:
    """Why Flax's own function must compute the call (None: attnlab computes it)."""
    if module is not None:
        return "sow the attention weights (sow_weights=True), which attnlab never materializes"
    if dropout_rate > 0.0 and not deterministic:
        return (f"apply attention dropout (dropout_rate={dropout_rate}, deterministic=False), "
                "which Flax applies to the materialized weights")
    if any(e is not None for e in einsums):
        return "use custom einsums (einsum_dot_general / qk_attn_weights_einsum / ...)"
    if jnp.dtype(dtype) not in _FLOATS:
        return f"compute in dtype {jnp.dtype(dtype).name}; attnlab takes real float dtypes"
    return None


def _promote(query, key, value, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flax's dtype promotion: all three in ``dtype``, or their common inexact dtype."""
    q, k, v = (jnp.asarray(x) for x in (query, key, value))
    if dtype is None:
        dtype = jnp.result_type(q, k, v)
        if not jnp.issubdtype(dtype, jnp.inexact):
            dtype = jnp.result_type(dtype, jnp.float32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _to_4d(name: str, x: Any, batch: tuple[int, ...]) -> jax.Array | None:
    """A mask or bias broadcastable to [batch..., N, T, S] as [prod(batch) | 1, N|1, T|1, S|1]."""
    if x is None:
        return None
    x = jnp.asarray(x)
    rank = len(batch) + 3
    if x.ndim > rank:
        raise ValueError(
            f"{name} must have at most {rank} dims [batch..., heads, q_length, kv_length] for "
            f"batch dims {batch}, got shape {x.shape}"
        )
    x = x.reshape((1,) * (rank - x.ndim) + x.shape)
    lead = x.shape[: len(batch)]
    if all(d == 1 for d in lead):
        return x.reshape((1, *x.shape[-3:]))
    if any(d not in (1, w) for d, w in zip(lead, batch, strict=True)):
        raise ValueError(
            f"{name} of shape {x.shape} does not broadcast to the batch dims {batch} of query"
        )
    x = jnp.broadcast_to(x, batch + x.shape[-3:])
    return x.reshape((math.prod(batch), *x.shape[-3:]))


def _flax_attention(
    query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic,
    dtype, precision, module, promote_dtype, is_causal, force_fp32_for_softmax,
    einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum,
):
    """Flax's own dot_product_attention: linen's when linen called (it passes
    ``force_fp32_for_softmax``; its modules are linen Modules), else nnx's."""
    linen_call = isinstance(module, linen.Module) or (
        module is None and force_fp32_for_softmax is not None
    )
    if not linen_call:
        extra = {} if promote_dtype is None else {"promote_dtype": promote_dtype}
        return nnx.dot_product_attention(
            query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
            deterministic, dtype, precision, module, is_causal=is_causal, **extra,
        )
    if is_causal:  # linen's function has no is_causal: the same mask, explicitly
        t, s = query.shape[-3], key.shape[-3]
        causal = jnp.tril(jnp.ones((t, s), jnp.bool_)).reshape((1,) * (query.ndim - 3) + (1, t, s))
        mask = causal if mask is None else jnp.logical_and(mask.astype(jnp.bool_), causal)
    return linen.dot_product_attention(
        query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
        deterministic, dtype, precision, module,
        force_fp32_for_softmax=bool(force_fp32_for_softmax),
        einsum_dot_general=einsum_dot_general, qk_attn_weights_einsum=qk_attn_weights_einsum,
        attn_weights_value_einsum=attn_weights_value_einsum,
    )


def attention_fn(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    promote_dtype: Callable[..., Any] | None = None,
    is_causal: bool = False,
    force_fp32_for_softmax: bool | None = None,
    einsum_dot_general: Callable[..., Any] | None = None,
    qk_attn_weights_einsum: Callable[..., Any] | None = None,
    attn_weights_value_einsum: Callable[..., Any] | None = None,
    *,
    implementation: str | None = None,
    scale: float | None = None,
    local_window_size: int | tuple[int, int] | None = None,
) -> jax.Array:
    """Flax's ``dot_product_attention`` signature, computed by attnlab.

    Args:
      query: [batch..., T, N, H] (any number of batch dims, none included).
      key: [batch..., S, K, H]; N must be a multiple of K (GQA, as nnx.MultiHeadAttention).
      value: [batch..., S, K, Hv].
      bias: optional additive bias broadcastable to [batch..., N, T, S].
      mask: optional mask broadcastable to [batch..., N, T, S] (nonzero / True: attend), e.g.
        ``flax.nnx.make_attention_mask`` or the decode cache's key mask; a key-only mask
        ([..., 1, 1, S]) reaches every kernel as segment ids, others become a -inf bias
        (``attnlab.ops.dot_product_attention``).
      broadcast_dropout, dropout_rng, dropout_rate, deterministic: Flax's attention dropout;
        only active dropout goes to Flax's own function (module docstring).
      dtype: computation dtype (default: the inputs' promoted dtype, as Flax).
      precision: ignored by attnlab's implementations (they accumulate in float32), as by
        Flax's own default path through ``jax.nn.dot_product_attention``; used on fallback.
      module: a Module to sow the weights into: falls back to Flax's own function.
      promote_dtype: nnx's dtype promotion function, used on fallback only.
      is_causal: causal attention (nnx passes it).
      force_fp32_for_softmax, einsum_dot_general, qk_attn_weights_einsum,
        attn_weights_value_einsum: linen's arguments (attnlab's softmax is always float32;
        custom einsums fall back to Flax's function).
      implementation: None (``"auto"``, with Flax's fallback) or an implementation name of
        :func:`attnlab.ops.dot_product_attention` (``"xla"``, ``"pallas_triton"``, ...).
      scale: logits scale, default 1 / sqrt(H) as Flax.
      local_window_size: int or (left, right) sliding window, as jax.nn.

    Returns:
      [batch..., T, N, Hv] in the computation dtype.

    Raises:
      ValueError: bad shapes (as :func:`attnlab.ops.dot_product_attention`), mask or bias
        batch dims that do not broadcast.
      NotImplementedError: a named implementation given what only Flax's function computes
        (active dropout, sow_weights, custom einsums, non-float dtypes), or a call the named
        kernel cannot take.

    Example:
      >>> mha = nnx.MultiHeadAttention(4, 32, attention_fn=attnlab.nn.attention_fn, rngs=rngs)
    """
    einsums = (einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum)
    q, k, v = _promote(query, key, value, dtype)
    why = _flax_only(module, dropout_rate, deterministic, q.dtype, einsums)
    if why is not None:
        if implementation not in (None, "auto"):
            raise NotImplementedError(
                f"attention_fn with implementation={implementation!r} cannot {why}; use "
                "implementation=None, which leaves such calls to Flax's own attention"
            )
        return _flax_attention(
            query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
            deterministic, dtype, precision, module, promote_dtype, is_causal,
            force_fp32_for_softmax, *einsums,
        )
    if q.ndim < 3 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(
            "query, key and value must be [batch..., length, heads, depth] of one rank, got "
            f"shapes {q.shape}, {k.shape} and {v.shape}"
        )
    batch = q.shape[:-3]
    if k.shape[:-3] != batch or v.shape[:-3] != batch:
        raise ValueError(
            f"query, key and value batch dims must match, got {batch}, {k.shape[:-3]} and "
            f"{v.shape[:-3]}"
        )
    q4, k4, v4 = (x.reshape((math.prod(batch), *x.shape[-3:])) for x in (q, k, v))
    mask4 = _to_4d("mask", mask, batch)
    if mask4 is not None:
        mask4 = mask4.astype(jnp.bool_)
    out = dot_product_attention(
        q4, k4, v4, _to_4d("bias", bias, batch), mask4, scale=scale, is_causal=is_causal,
        local_window_size=local_window_size, implementation=implementation,
    )
    return out.reshape(batch + out.shape[1:])


def make_attention_fn(implementation: str | None = None, **kwargs: Any) -> Callable[..., Any]:
    """:func:`attention_fn` with an implementation and keywords bound, for Flax modules.

    Args:
      implementation: as :func:`attnlab.ops.dot_product_attention` (None: ``"auto"`` with
        Flax's fallback for dropout and sown weights).
      **kwargs: ``scale`` and/or ``local_window_size``.

    Returns:
      A function with Flax's ``attention_fn`` signature (a ``functools.partial``, so linen's
      keyword filtering by signature sees every parameter).

    Raises:
      ValueError: an unknown keyword or implementation name.

    Example:
      >>> fn = make_attention_fn("pallas_triton", local_window_size=(128, 0))
      >>> mha = nnx.MultiHeadAttention(8, 512, attention_fn=fn, decode=False, rngs=rngs)
    """
    unknown = sorted(set(kwargs) - set(_BINDABLE))
    if unknown:
        raise ValueError(
            f"make_attention_fn takes {', '.join(_BINDABLE)}; got unknown keywords {unknown}"
        )
    resolve_implementation(implementation)  # checked now, not at the first call
    return functools.partial(attention_fn, implementation=implementation, **kwargs)
