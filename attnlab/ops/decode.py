"""Decode attention: few queries against a long K/V cache, per-sequence lengths (ragged batch).

Shapes (attnlab letters): B batch, T queries per sequence (1..64; T > 1 is speculative or
chunked decoding), S cache length, N query heads, K kv heads (N a multiple of K), H head dim
(Hv for values; keys and values may have their own head counts, as in attention).

The T queries of sequence ``b`` are its last T tokens: query ``t`` sits at position
``p = kv_lengths[b] - T + t`` and sees cache entry ``j`` iff

    j < kv_lengths[b]   and   j <= p   (causal)   and   j >= p - window_left   (if a window)

    out = softmax(cap(scale * q k^T), masked) v
    lse = log sum_j exp(logits_j)   (per query row; -inf for a row that sees no key)

A row that sees no key (``kv_lengths[b] == 0``, or ``kv_lengths[b] < T`` for the earliest
queries) gives 0 output and lse ``-inf``, never NaN.

Masked positions never influence a row: non-finite values in a query, cache slot or output
cotangent at a position a row cannot see (uninitialized slots past ``kv_lengths`` are
common) never reach that row's output or LSE, nor the gradients of visible positions. A row
that sees a non-finite value gets an unspecified result (NaN, or a value computed with the
non-finite entries read as 0).

Implementations: ``"reference"`` (the definition), ``"xla"`` (split-K in pure JAX: chunk the
key axis, partial (out, lse) per chunk, :func:`attnlab.ops.merge_n`), ``"pallas_triton"``
(GPU split-K kernel; Pallas-interpreted on CPU) and ``"pallas_tpu"`` (TPU kernel; TPU interpret
mode on CPU; lowered for TPU, verified in interpret mode, never run on a TPU). Both Pallas
kernels return per-split partials that are merged here by :func:`~attnlab.ops.merge_n`.
``reference`` and ``xla`` are differentiable by JAX; the Pallas implementations are
forward-only (decoding is inference) and differentiating through them raises
``NotImplementedError``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops._checks import check_gqa, check_qkv
from attnlab.ops._registry import (  # noqa: F401 (platform: re-export)
    KERNEL_FIRST,
    Implementation,
    Registry,
    backends,
    platform,
)
from attnlab.ops._softmax import head_logits, masked_softmax
from attnlab.ops.merge import merge_n
from pallas_kernels.common.masks import (
    MaskSpec,
    visible,
)
from pallas_kernels.common.static_args import check_bool, check_static_float, is_int

MAX_QUERIES = 64
_FORWARD_ONLY = "decode kernels are forward-only; use impl='xla' to differentiate"


class DecodeArgs(NamedTuple):
    """Normalized, validated arguments handed to every implementation."""

    spec: MaskSpec  # causal, optionally window_left
    kv_lengths: jax.Array | None  # [B] int32, None: every sequence has S valid entries
    scale: float
    logits_soft_cap: float | None
    config: Any
    return_residuals: bool = False


# ----------------------------------------------------------------------------- reference


def reference(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs: Any
              ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The definition of decode attention, in plain ``jnp`` (materializes [B, N, T, S]).

    ``decode_attention(q, k, v, impl="reference", **kwargs)``: the same arguments (but
    ``impl`` and ``config``) and return values as :func:`decode_attention`.
    """
    for name in ("impl", "config"):
        if name in kwargs:
            raise ValueError(f"reference takes no {name}")
    return decode_attention(q, k, v, impl="reference", **kwargs)


def query_positions(kv_lengths: jax.Array | None, b: int, t: int, s: int):
    """(lengths [B], query positions [B, T]) as int32."""
    lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else kv_lengths
    return lengths, lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]


def _reference(q, k, v, a: DecodeArgs) -> tuple[jax.Array, jax.Array]:
    b, t, _, _ = q.shape
    s = k.shape[1]
    # A NaN in a cache slot a row cannot see (past kv_lengths) never reaches it (_softmax).
    z, v_n = head_logits(q, k, v, a.scale, a.logits_soft_cap)
    lengths, q_pos = query_positions(a.kv_lengths, b, t, s)
    kv_pos = jnp.arange(s, dtype=jnp.int32)[None, None, None, :]
    mask = visible(a.spec, q_pos[:, None, :, None], kv_pos)  # [B, 1, T, S]
    mask = mask & (kv_pos < lengths[:, None, None, None])
    out, lse, *_ = masked_softmax(z, mask, v_n, q.dtype)
    return out, jnp.swapaxes(lse, 1, 2)


# ----------------------------------------------------------------------------- shared by backends


def merged_forward_only(partials: Callable[..., tuple[jax.Array, jax.Array]], *args: Any
                        ) -> tuple[jax.Array, jax.Array]:
    """(out in args[0]'s dtype, lse): ``partials(*args)``'s per-split (out, lse) merged by LSE,
    under a VJP that refuses (the split-K kernels have no backward pass)."""

    @jax.custom_vjp
    def run(*args):
        o_parts, lse_parts = partials(*args)
        out, lse = merge_n(o_parts, lse_parts)
        return out.astype(args[0].dtype), lse

    def bwd(_, cts):
        raise NotImplementedError(_FORWARD_ONLY)

    run.defvjp(lambda *args: (run(*args), None), bwd)
    return run(*args)


def forward_only(decode_partials: Callable[..., tuple[jax.Array, jax.Array]],
                 interpret: Callable[[], Any]) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """A split-K kernel as an implementation's ``fn(q, k, v, args) -> (out, lse)``: its
    partials merged by LSE, with a VJP that refuses (the kernels have no backward pass).

    ``decode_partials(q, k, v, kv_lengths, *, spec, scale, soft_cap, config, interpret)``
    returns per-split (out, lse) partials; ``interpret()`` gives its interpret argument.
    """

    def fn(q, k, v, a: DecodeArgs):
        partials = functools.partial(
            decode_partials, spec=a.spec, scale=a.scale, soft_cap=a.logits_soft_cap,
            config=a.config, interpret=interpret(),
        )
        return merged_forward_only(partials, q, k, v, a.kv_lengths)

    return fn


# ----------------------------------------------------------------------------- registry


def args_from_kwargs(q, k, v, **kwargs: Any) -> DecodeArgs:
    """The validated, normalized arguments of ``decode_attention(q, k, v, **kwargs)`` (this op's
    registry normalizer); ValueError on bad or unknown arguments."""
    return_residuals = check_bool("return_residuals", kwargs.pop("return_residuals", False))
    a = _normalize(
        q, k, v, kwargs.pop("kv_lengths", None), kwargs.pop("local_window_size", None),
        kwargs.pop("logits_soft_cap", None), kwargs.pop("scale", None),
        kwargs.pop("config", None),
    )._replace(return_residuals=return_residuals)
    if kwargs:
        raise ValueError(f"unknown arguments {sorted(kwargs)}")
    return a


# Fastest first; "auto" takes the first that supports the call.
AUTO_ORDER = KERNEL_FIRST
REGISTRY = Registry(
    "decode", normalize=args_from_kwargs, adapters=backends("decode", "xla", "pallas_triton",
                                                             "pallas_tpu"),
    reference=Implementation(name="reference", fn=_reference,
                             description="plain jnp definition; materializes [B, N, T, S]"))
register, choose, implementations = REGISTRY.register, REGISTRY.choose, REGISTRY.implementations
explain, auto_choice = REGISTRY.explain, REGISTRY.auto_choice


# ----------------------------------------------------------------------------- public op


def decode_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    kv_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    scale: float | None = None,
    return_residuals: bool = False,
    impl: str = "auto",
    config: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention of the last T tokens of each sequence over its K/V cache (decoding).

    Args:
      q: [B, T, N, H] queries of each sequence's last T tokens, 1 <= T <= 64.
      k: [B, S, Kk, H] key cache; N must be a multiple of Kk (GQA/MQA, never repeated).
      v: [B, S, Kv, Hv] value cache; N a multiple of Kv. Query head i reads key head
        i // (N // Kk) and value head i // (N // Kv). Any head dims >= 1 (pallas_triton
        takes up to 256 and zero-pads dims that are not a power of two >= 16; pallas_tpu
        zero-pads a cache of more than one head whose dim is not a multiple of 128; either
        pad copies the cache per call: keep such caches padded if decode speed matters).
      kv_lengths: [B] integer valid cache length per sequence, in [0, S] (None: all S).
        Query t of sequence b sits at position kv_lengths[b] - T + t and sees cache entries
        j < kv_lengths[b] with j <= its position (causal).
      local_window_size: w or (w, 0): a query at position p also needs j >= p - w. The
        window is left-only (decoding is causal); a right side must be 0 or None.
      logits_soft_cap: c > 0: logits become c * tanh(logits / c).
      scale: logits scale, default 1 / sqrt(H). ``scale``, ``logits_soft_cap`` and
        ``local_window_size`` are static (Python numbers, not traced under ``jax.jit``);
        traced ``kv_lengths`` are fine, but only concrete ones are checked to lie in [0, S].
      return_residuals: also return lse [B, T, N] float32 (-inf for a row that sees no key).
      impl: "auto" (GPU: pallas_triton, TPU: pallas_tpu, CPU: xla), "pallas" (the platform's
        kernel), "reference", "xla", "pallas_triton", "pallas_tpu".
      config: the chosen implementation's config (:class:`XlaDecodeConfig`,
        ``pallas_kernels.gpu.decode.DecodeConfig``, ``pallas_kernels.tpu.decode.TpuDecodeConfig``).

    Returns:
      out [B, T, N, Hv] in q's dtype, or (out, lse) when ``return_residuals``. A row that sees
      no key gives 0 output and lse -inf (never NaN). Cache slots a row cannot see (past
      kv_lengths: uninitialized, even NaN) never influence it (module docstring).

    Raises:
      ValueError: bad shapes, dtypes, kv_lengths or arguments; unknown impl.
      NotImplementedError: the named impl cannot compute this call (the message says why), or
        a gradient is taken through a Pallas implementation (forward only).

    Example:
      >>> out = decode_attention(q, k_cache, v_cache, kv_lengths=lengths)
    """
    return_residuals = check_bool("return_residuals", return_residuals)
    a = _normalize(
        q, k, v, kv_lengths, local_window_size, logits_soft_cap, scale, config
    )._replace(return_residuals=return_residuals)
    out, lse = choose(q, k, v, a, impl).fn(q, k, v, a)
    return (out, lse) if return_residuals else out


def _normalize(
    q, k, v, kv_lengths, local_window_size, logits_soft_cap, scale, config
) -> DecodeArgs:
    check_qkv(q, k, v)
    check_gqa(q, k, v)
    b, t, n, h = q.shape
    s = k.shape[1]
    if not 1 <= t <= MAX_QUERIES:
        raise ValueError(
            f"q has T={t} queries per sequence; decode takes 1 to {MAX_QUERIES} (use "
            "attnlab.ops.attention for prefill)"
        )
    if s == 0:
        raise ValueError(f"the cache is empty (k has shape {k.shape}); S must be at least 1")
    lengths = None
    if kv_lengths is not None:
        if jnp.shape(kv_lengths) != (b,):
            raise ValueError(
                f"kv_lengths must have shape ({b},) (one length per sequence), got "
                f"{jnp.shape(kv_lengths)}"
            )
        # A ShapeDtypeStruct (from explain) carries shape and dtype only.
        shape_only = isinstance(kv_lengths, jax.ShapeDtypeStruct)
        lengths = kv_lengths if shape_only else jnp.asarray(kv_lengths)
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(
                f"kv_lengths must be an integer array (int32), got dtype {lengths.dtype}"
            )
        if not shape_only:
            _check_length_values(lengths, s)
            lengths = lengths.astype(jnp.int32)
    left = _window_left(local_window_size)
    if logits_soft_cap is not None:
        logits_soft_cap = check_static_float("logits_soft_cap", logits_soft_cap, positive=True)
    scale = 1.0 / math.sqrt(h) if scale is None else check_static_float("scale", scale)
    return DecodeArgs(
        MaskSpec(causal=True, window_left=left), lengths, scale, logits_soft_cap, config,
    )


def _check_length_values(lengths: jax.Array, s: int) -> None:
    """Concrete lengths must lie in [0, S]; traced ones (under jit) cannot be checked."""
    try:
        values = np.asarray(lengths)
    except jax.errors.TracerArrayConversionError:
        return
    if values.size and (values.min() < 0 or values.max() > s):
        raise ValueError(
            f"kv_lengths must lie in [0, S={s}], got values in [{values.min()}, {values.max()}]"
        )


def _window_left(local_window_size) -> int | None:
    if local_window_size is None:
        return None
    if is_int(local_window_size):
        left, right = local_window_size, None
    elif isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2:
        left, right = local_window_size
    else:
        raise ValueError(
            "local_window_size must be None, a non-negative int w or a (w, 0) pair, got "
            f"{local_window_size!r}"
        )
    if right is not None and not (is_int(right) and right == 0):
        raise ValueError(
            f"local_window_size={local_window_size!r} has a right side of {right!r}; decode is "
            "causal, so the window is left-only: pass an int w or (w, 0)"
        )
    if left is not None and (not is_int(left) or left < 0):
        raise ValueError(
            f"local_window_size={local_window_size!r}: the left window must be a non-negative "
            f"int or None, got {left!r}"
        )
    return None if left is None else int(left)
