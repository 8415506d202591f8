"""Decode attention: few queries against a long K/V cache, per-sequence lengths (ragged batch).

Shapes (attnlab letters): B batch, T queries per sequence (1..64; T > 1 is speculative or
chunked decoding), S cache length, N query heads, K kv heads (N a multiple of K), H head dim.

The T queries of sequence ``b`` are its last T tokens: query ``t`` sits at position
``p = kv_lengths[b] - T + t`` and sees cache entry ``j`` iff

    j < kv_lengths[b]   and   j <= p   (causal)   and   j >= p - window_left   (if a window)

    out = softmax(cap(scale * q k^T), masked) v
    lse = log sum_j exp(logits_j)   (per query row; -inf for a row that sees no key)

A row that sees no key (``kv_lengths[b] == 0``, or ``kv_lengths[b] < T`` for the earliest
queries) gives 0 output and lse ``-inf``, never NaN.

Implementations: ``"reference"`` (the definition), ``"xla"`` (split-K in pure JAX: chunk the
key axis, partial (out, lse) per chunk, :func:`attnlab.ops.merge_n`), ``"pallas_triton"``
(GPU split-K kernel; Pallas-interpreted on CPU) and ``"pallas_tpu"`` (TPU kernel; TPU interpret
mode on CPU, verified in interpret mode only). Both Pallas kernels return per-split partials
that are merged here by :func:`~attnlab.ops.merge_n`. ``reference`` and ``xla`` are
differentiable by JAX; the Pallas implementations are forward-only (decoding is inference) and
differentiating through them raises ``NotImplementedError``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

from attnlab.ops._registry import Implementation, Registry, platform
from attnlab.ops.merge import merge_n
from pallas_kernels.common.masks import MASK_VALUE, MaskSpec, visible
from pallas_kernels.gpu import decode as gpu_decode
from pallas_kernels.tpu import decode as tpu_decode

MAX_QUERIES = 64
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)
_FORWARD_ONLY = "decode kernels are forward-only; use impl='xla' to differentiate"


class DecodeArgs(NamedTuple):
    """Normalized, validated arguments handed to every implementation."""

    spec: MaskSpec  # causal, optionally window_left
    kv_lengths: jax.Array | None  # [B] int32, None: every sequence has S valid entries
    scale: float
    logits_soft_cap: float | None
    config: Any
    return_residuals: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class XlaDecodeConfig:
    """Chunking of the ``"xla"`` implementation.

    Attributes:
      keys_per_split: keys per chunk of the cache; each chunk gives a partial (out, lse) and
        the chunks are merged by LSE. When S is not a multiple of the (balanced) chunk, the
        cache is padded by fewer than one key per chunk (XLA copies it); pick a value that
        divides S to avoid that.
    """

    keys_per_split: int = 512

    def __post_init__(self) -> None:
        kps = self.keys_per_split
        if not isinstance(kps, int) or isinstance(kps, bool) or kps <= 0:
            raise ValueError(f"keys_per_split must be a positive int, got {kps!r}")

    @classmethod
    def get_default(cls) -> XlaDecodeConfig:
        return cls()


# ----------------------------------------------------------------------------- reference


def reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    kv_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    logits_soft_cap: float | None = None,
    scale: float | None = None,
    return_residuals: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The definition of decode attention, in plain ``jnp`` (materializes [B, N, T, S]).

    Same arguments and return values as :func:`decode_attention`.
    """
    a = _normalize(q, k, v, kv_lengths, local_window_size, logits_soft_cap, scale, None)
    out, lse = _reference(q, k, v, a)
    return (out, lse) if return_residuals else out


def _query_positions(kv_lengths: jax.Array | None, b: int, t: int, s: int):
    """(lengths [B], query positions [B, T]) as int32."""
    lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else kv_lengths
    return lengths, lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)


def _reference(q, k, v, a: DecodeArgs) -> tuple[jax.Array, jax.Array]:
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h).astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    z = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32), precision=hi) * a.scale
    if a.logits_soft_cap is not None:
        z = a.logits_soft_cap * jnp.tanh(z / a.logits_soft_cap)
    lengths, q_pos = _query_positions(a.kv_lengths, b, t, s)
    kv_pos = jnp.arange(s, dtype=jnp.int32)
    mask = visible(a.spec, q_pos[:, None, None, :, None], kv_pos)  # [B, 1, 1, T, S]
    mask = mask & (kv_pos < lengths[:, None, None, None, None])
    z = jnp.where(mask, z, MASK_VALUE)
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jnp.where(mask, jnp.exp(z - lse[..., None]), 0.0)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p, v.astype(jnp.float32), precision=hi)
    lse = jnp.where(mask.any(-1), lse, -jnp.inf)  # [B, K, G, T]
    out = out.reshape(b, t, n, h).astype(q.dtype)
    return out, jnp.moveaxis(lse, 3, 1).reshape(b, t, n)


# ----------------------------------------------------------------------------- xla (split-K)


def _xla(q, k, v, a: DecodeArgs) -> tuple[jax.Array, jax.Array]:
    cfg = a.config if isinstance(a.config, XlaDecodeConfig) else XlaDecodeConfig.get_default()
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    # Balanced chunks: P chunks of C keys with P * C - S < P.
    n_chunks = -(-s // min(cfg.keys_per_split, s))
    chunk = -(-s // n_chunks)
    sp = n_chunks * chunk
    if sp != s:
        k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
    kc = k.reshape(b, n_chunks, chunk, kh, h)
    vc = v.reshape(b, n_chunks, chunk, kh, h)
    qg = q.reshape(b, t, kh, g, h)
    prec = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    f32 = jnp.float32
    z = jnp.einsum(
        "BTKGH,BPCKH->PBKGTC", qg, kc, precision=prec, preferred_element_type=f32
    ) * a.scale
    if a.logits_soft_cap is not None:
        z = a.logits_soft_cap * jnp.tanh(z / a.logits_soft_cap)
    lengths, q_pos = _query_positions(a.kv_lengths, b, t, s)
    kv_pos = jnp.arange(sp, dtype=jnp.int32).reshape(n_chunks, 1, 1, 1, 1, chunk)
    mask = visible(a.spec, q_pos[None, :, None, None, :, None], kv_pos)  # [P, B, 1, 1, T, C]
    mask = mask & (kv_pos < jnp.minimum(lengths, s)[None, :, None, None, None, None])
    z = jnp.where(mask, z, MASK_VALUE)
    # One partial (out, lse) per chunk, as a split-K kernel would write them.
    lse = jax.nn.logsumexp(z, axis=-1)  # [P, B, K, G, T]
    p = jnp.where(mask, jnp.exp(z - lse[..., None]), 0.0)
    o = jnp.einsum(
        "PBKGTC,BPCKH->PBTKGH", p.astype(v.dtype), vc, precision=prec,
        preferred_element_type=f32,
    ).reshape(n_chunks, b, t, n, h)
    lse = jnp.where(mask.any(-1), lse, -jnp.inf)
    lse = jnp.moveaxis(lse, 4, 2).reshape(n_chunks, b, t, n)
    out, lse = merge_n(o, lse)
    return out.astype(q.dtype), lse


# ----------------------------------------------------------------------------- Pallas kernels


def _forward_only(partials: Callable[..., tuple[jax.Array, jax.Array]]):
    """(q, k, v, kv_lengths) -> (out, lse): a kernel's split-K partials merged by LSE, with a
    VJP that refuses (the kernels have no backward pass)."""

    @jax.custom_vjp
    def run(q, k, v, kv_lengths):
        o_parts, lse_parts = partials(q, k, v, kv_lengths)
        out, lse = merge_n(o_parts, lse_parts)
        return out.astype(q.dtype), lse

    def fwd(q, k, v, kv_lengths):
        return run(q, k, v, kv_lengths), None

    def bwd(_, cts):
        raise NotImplementedError(_FORWARD_ONLY)

    run.defvjp(fwd, bwd)
    return run


def _triton_unsupported(q, k, v, a: DecodeArgs, plat: str) -> str | None:
    if plat not in ("gpu", "cpu"):
        return (
            f"the Triton decode kernel runs on CUDA GPUs (and interpreted on CPU), not on "
            f"{plat}; use impl='pallas_tpu' or 'xla'"
        )
    if q.dtype not in gpu_decode.SUPPORTED_DTYPES:
        return f"pallas_triton needs float32, bfloat16 or float16 inputs, got {q.dtype}"
    h = q.shape[-1]
    if h & (h - 1) or not 16 <= h <= 256:
        return (
            f"pallas_triton needs a head dim that is a power of two in [16, 256] (64, 128, "
            f"256 on GPU), got {h}; use impl='xla'"
        )
    if a.config is not None and not isinstance(a.config, gpu_decode.DecodeConfig):
        return f"config must be a pallas_kernels.gpu.decode.DecodeConfig, got {_name(a.config)}"
    return None


def _triton(q, k, v, a: DecodeArgs):
    partials = functools.partial(
        gpu_decode.decode_partials, spec=a.spec, scale=a.scale, soft_cap=a.logits_soft_cap,
        config=a.config, interpret=platform() == "cpu",
    )
    return _forward_only(partials)(q, k, v, a.kv_lengths)


def _tpu_unsupported(q, k, v, a: DecodeArgs, plat: str) -> str | None:
    if plat not in ("tpu", "cpu"):
        return (
            f"the TPU decode kernel runs on TPU (or interpreted on CPU), not on {plat}; use "
            "impl='pallas_triton' or 'xla'"
        )
    if q.dtype not in tpu_decode.SUPPORTED_DTYPES:
        return f"pallas_tpu takes float32 or bfloat16 inputs, got {q.dtype}"
    why = tpu_decode.unsupported_shape(k.shape)
    if why is not None:
        return why
    if a.config is not None and not isinstance(a.config, tpu_decode.TpuDecodeConfig):
        return (
            f"config must be a pallas_kernels.tpu.decode.TpuDecodeConfig, got {_name(a.config)}"
        )
    return None


def _tpu(q, k, v, a: DecodeArgs):
    partials = functools.partial(
        tpu_decode.decode_partials, spec=a.spec, scale=a.scale, soft_cap=a.logits_soft_cap,
        config=a.config, interpret=pltpu.InterpretParams() if platform() == "cpu" else False,
    )
    return _forward_only(partials)(q, k, v, a.kv_lengths)


def _name(x: Any) -> str:
    return type(x).__name__


def _reference_unsupported(q, k, v, a: DecodeArgs, plat: str) -> str | None:
    if a.config is not None:
        return f"the reference takes no config, got {_name(a.config)}"
    return None


def _xla_unsupported(q, k, v, a: DecodeArgs, plat: str) -> str | None:
    if a.config is not None and not isinstance(a.config, XlaDecodeConfig):
        return f"config must be an XlaDecodeConfig, got {_name(a.config)}"
    return None


# ----------------------------------------------------------------------------- registry

# Fastest first; "auto" takes the first that supports the call.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "gpu": ("pallas_triton", "xla"),
    "tpu": ("pallas_tpu", "xla"),
    "cpu": ("xla",),
}
REGISTRY = Registry(
    "decode", AUTO_ORDER, {"gpu": "pallas_triton", "tpu": "pallas_tpu", "cpu": "pallas_triton"}
)
register = REGISTRY.register
implementations = REGISTRY.implementations
choose = REGISTRY.choose


def explain(
    q, k, v, *, impl_names: tuple[str, ...] | None = None, plat: str | None = None, **kwargs
) -> dict[str, str | None]:
    """For each implementation, None if it supports ``decode_attention(q, k, v, **kwargs)``,
    else why not. Arrays may be ``jax.ShapeDtypeStruct``s.

    Example:
      >>> explain(q, k, v, kv_lengths=lengths, plat="gpu")["pallas_triton"]  # None: supported
    """
    return REGISTRY.explain(q, k, v, _args_from_kwargs(q, k, v, kwargs), plat, impl_names)


def auto_choice(q, k, v, *, plat: str | None = None, **kwargs) -> str:
    """The name ``impl="auto"`` resolves to for this call on ``plat``."""
    return REGISTRY.auto_choice(q, k, v, _args_from_kwargs(q, k, v, kwargs), plat)


def _args_from_kwargs(q, k, v, kwargs: dict[str, Any]) -> DecodeArgs:
    kwargs = dict(kwargs)
    return_residuals = kwargs.pop("return_residuals", False)
    a = _normalize(
        q, k, v, kwargs.pop("kv_lengths", None), kwargs.pop("local_window_size", None),
        kwargs.pop("logits_soft_cap", None), kwargs.pop("scale", None),
        kwargs.pop("config", None),
    )._replace(return_residuals=return_residuals)
    if kwargs:
        raise ValueError(f"unknown arguments {sorted(kwargs)}")
    return a


register(
    Implementation(
        "reference", _reference, _reference_unsupported,
        "plain jnp definition; materializes [B, N, T, S]",
    )
)
register(
    Implementation(
        "xla", _xla, _xla_unsupported,
        "split-K in pure JAX: partial (out, lse) per key chunk, merged by LSE; differentiable",
    )
)
register(
    Implementation(
        "pallas_triton", _triton, _triton_unsupported,
        "Pallas split-K decode kernel lowered to Triton (GPU), GQA rows packed per tile, "
        "ragged lengths bound the key loop; forward only; Pallas-interpreted on CPU",
    )
)
register(
    Implementation(
        "pallas_tpu", _tpu, _tpu_unsupported,
        "Mosaic TPU Pallas split-K decode kernel, lengths by scalar prefetch; forward only; "
        "TPU interpret mode on CPU, verified in interpret mode only",
    )
)


# ----------------------------------------------------------------------------- public op


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
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
      k: [B, S, K, H] key cache; N must be a multiple of K (GQA/MQA, never repeated).
      v: [B, S, K, H] value cache (same shape as k).
      kv_lengths: [B] integer valid cache length per sequence, in [0, S] (None: all S).
        Query t of sequence b sits at position kv_lengths[b] - T + t and sees cache entries
        j < kv_lengths[b] with j <= its position (causal).
      local_window_size: w or (w, 0): a query at position p also needs j >= p - w. The
        window is left-only (decoding is causal); a right side must be 0 or None.
      logits_soft_cap: c: logits become c * tanh(logits / c).
      scale: logits scale, default 1 / sqrt(H).
      return_residuals: also return lse [B, T, N] float32 (-inf for a row that sees no key).
      impl: "auto" (GPU: pallas_triton, TPU: pallas_tpu, CPU: xla), "pallas" (the platform's
        kernel), "reference", "xla", "pallas_triton", "pallas_tpu".
      config: the chosen implementation's config (:class:`XlaDecodeConfig`,
        ``pallas_kernels.gpu.decode.DecodeConfig``, ``pallas_kernels.tpu.decode.TpuDecodeConfig``).

    Returns:
      out [B, T, N, H] in q's dtype, or (out, lse) when ``return_residuals``. A row that sees
      no key gives 0 output and lse -inf (never NaN).

    Raises:
      ValueError: bad shapes, dtypes, kv_lengths or arguments; unknown impl.
      NotImplementedError: the named impl cannot compute this call (the message says why), or
        a gradient is taken through a Pallas implementation (forward only).

    Example:
      >>> out = decode_attention(q, k_cache, v_cache, kv_lengths=lengths)
    """
    a = _normalize(
        q, k, v, kv_lengths, local_window_size, logits_soft_cap, scale, config
    )._replace(return_residuals=return_residuals)
    out, lse = choose(q, k, v, a, impl).fn(q, k, v, a)
    return (out, lse) if return_residuals else out


def _normalize(
    q, k, v, kv_lengths, local_window_size, logits_soft_cap, scale, config
) -> DecodeArgs:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(jnp.shape(x)) != 4:
            raise ValueError(
                f"{name} must have shape [batch, seq, heads, head_dim], got shape "
                f"{jnp.shape(x)}"
            )
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if k.shape != v.shape:
        raise ValueError(f"k and v caches must have the same shape, got {k.shape} and {v.shape}")
    if k.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[3] != h:
        raise ValueError(f"q has head_dim {h} but k has {k.shape[3]}; they must be equal")
    if kh == 0 or n % kh:
        raise ValueError(
            f"q has {n} heads but k has {kh}; the number of q heads must be a multiple of the "
            "number of kv heads (GQA/MQA)"
        )
    if not 1 <= t <= MAX_QUERIES:
        raise ValueError(
            f"q has T={t} queries per sequence; decode takes 1 to {MAX_QUERIES} (use "
            "attnlab.ops.attention for prefill)"
        )
    if s == 0:
        raise ValueError(f"the cache is empty (k has shape {k.shape}); S must be at least 1")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; use float32, bfloat16 or float16")
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
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
    if scale is None:
        scale = 1.0 / math.sqrt(h)
    return DecodeArgs(
        MaskSpec(causal=True, window_left=left), lengths, float(scale),
        None if logits_soft_cap is None else float(logits_soft_cap), config,
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
    if isinstance(local_window_size, int) and not isinstance(local_window_size, bool):
        left, right = local_window_size, None
    else:
        try:
            left, right = local_window_size
        except (TypeError, ValueError):
            raise ValueError(
                "local_window_size must be an int or a (left, 0) pair, got "
                f"{local_window_size!r}"
            ) from None
    if right not in (None, 0):
        raise ValueError(
            f"local_window_size={local_window_size!r} has a right side of {right}; decode is "
            "causal, so the window is left-only: pass an int w or (w, 0)"
        )
    if left is not None and (not isinstance(left, int) or isinstance(left, bool) or left < 0):
        raise ValueError(f"the left window must be a non-negative int or None, got {left!r}")
    return left
