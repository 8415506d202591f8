"""Input checks shared by the kernels' public wrappers (GPU and TPU): one message per mistake."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

C = TypeVar("C")


def check_attention_inputs(
    q: Any, k: Any, v: Any, q_positions: Any, kv_positions: Any,
    q_segment_ids: Any, kv_segment_ids: Any, *, dtypes: Sequence[Any],
) -> tuple[int, int, int, int, int, int]:
    """Validates flash-attention inputs; returns (B, T, N, H, S, K).

    q [B, T, N, H], k [B, S, Kk, H], v [B, S, Kv, Hv] (see :func:`check_heads`) of one shared
    dtype from ``dtypes``; positions [T] / [S]; segment ids both None or [B, T] / [B, S].

    Raises:
      ValueError: naming what was given and what was expected.
    """
    _check_rank4(q, k, v)
    check_heads(q, k, v)
    _check_dtypes(q, k, v, dtypes)
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if jnp.shape(q_positions) != (t,) or jnp.shape(kv_positions) != (s,):
        raise ValueError(
            f"q_positions must have shape ({t},) and kv_positions ({s},), got "
            f"{jnp.shape(q_positions)} and {jnp.shape(kv_positions)}"
        )
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    if q_segment_ids is not None and (
        jnp.shape(q_segment_ids) != (b, t) or jnp.shape(kv_segment_ids) != (b, s)
    ):
        raise ValueError(
            f"segment ids must have shapes ({b}, {t}) and ({b}, {s}), got "
            f"{jnp.shape(q_segment_ids)} and {jnp.shape(kv_segment_ids)}"
        )
    return b, t, n, h, s, kh


def check_decode_inputs(
    q: Any, k: Any, v: Any, kv_lengths: Any, *, dtypes: Sequence[Any]
) -> jax.Array:
    """Validates split-K decode inputs; returns the lengths [B] int32 (all S when None).

    q [B, T, N, H], k [B, S, Kk, H], v [B, S, Kv, Hv] (see :func:`check_heads`) of one shared
    dtype from ``dtypes``; kv_lengths None or [B].

    Raises:
      ValueError: naming what was given and what was expected.
    """
    _check_rank4(q, k, v)
    check_heads(q, k, v)
    _check_dtypes(q, k, v, dtypes)
    b = q.shape[0]
    if kv_lengths is None:
        return jnp.full((b,), k.shape[1], jnp.int32)
    if jnp.shape(kv_lengths) != (b,):
        raise ValueError(f"kv_lengths must have shape ({b},), got {jnp.shape(kv_lengths)}")
    return jnp.asarray(kv_lengths, jnp.int32)


def check_latent_decode_inputs(
    q: Any, cache: Any, kv_lengths: Any, v_dim: int, dtypes: Sequence[Any]
) -> None:
    """Validates latent (MLA) decode inputs: q [B, T, N, D], cache [B, S, D] whose first
    ``v_dim`` columns are the values (1 <= v_dim < D), one dtype from ``dtypes``, lengths [B].

    Raises:
      ValueError: naming what was given and what was expected.
    """
    if jnp.ndim(q) != 4 or jnp.ndim(cache) != 3:
        raise ValueError(
            f"q must be [B, T, N, D] and cache [B, S, D], got {jnp.shape(q)}, {jnp.shape(cache)}"
        )
    b, _, _, d = q.shape
    if cache.shape[0] != b or cache.shape[2] != d:
        raise ValueError(f"cache must be [{b}, S, {d}] for q {q.shape}, got {cache.shape}")
    if not 1 <= v_dim < d:
        raise ValueError(f"v_dim must lie in [1, {d - 1}] (the cache has a RoPE part), got {v_dim}")
    if q.dtype != cache.dtype or q.dtype not in dtypes:
        names = ", ".join(jnp.dtype(x).name for x in dtypes)
        raise ValueError(f"q and cache must share one of {names}, got {q.dtype}, {cache.dtype}")
    if jnp.shape(kv_lengths) != (b,):
        raise ValueError(f"kv_lengths must have shape ({b},), got {jnp.shape(kv_lengths)}")


class DefaultConfig:
    """Base of a config dataclass whose defaults are its field defaults: ``get_default()``
    (what ``check_config`` calls for a missing config) is ``cls()``. A config whose
    default depends on the call (head dim, dtype) defines its own ``get_default``."""

    __slots__ = ()

    @classmethod
    def get_default(cls: type[C]) -> C:
        """The config with every field at its default."""
        return cls()


def check_config(config: C | None, cls: type[C], *default_args: Any) -> C:
    """``config``, or ``cls.get_default(*default_args)`` when None.

    Raises:
      ValueError: ``config`` is neither None nor a ``cls``.
    """
    if config is None:
        config = cls.get_default(*default_args)  # type: ignore[attr-defined]
    if not isinstance(config, cls):
        raise ValueError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    return config


def _check_rank4(q: Any, k: Any, v: Any) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name} must have shape [batch, seq, heads, head_dim], got {jnp.shape(x)}"
            )


def check_heads(q: Any, k: Any, v: Any) -> None:
    """q [B, T, N, H], k [B, S, Kk, H], v [B, S, Kv, Hv]: one batch and key length, q and k
    share the head dim (H, Hv >= 1), and N is a multiple of both Kk and Kv.

    Query head i reads key head ``i // (N // Kk)`` and value head ``i // (N // Kv)``
    (``floor(i * Kk / N)``, ``floor(i * Kv / N)``): GQA/MQA when Kk == Kv, DiffQKV-style
    separate key and value head counts otherwise; heads are never repeated in memory.

    Raises:
      ValueError: naming the mismatched sizes.
    """
    b, _, n, h = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(
            f"k and v must have the same number of keys (axis 1), got k {k.shape} and v {v.shape}"
        )
    if k.shape[3] != h:
        raise ValueError(f"q has head_dim {h} but k has {k.shape[3]}; they must be equal")
    if h < 1 or v.shape[3] < 1:
        raise ValueError(
            f"head dims must be at least 1, got q/k head_dim {h} and v head_dim {v.shape[3]}"
        )
    for name, heads in (("k", k.shape[2]), ("v", v.shape[2])):
        if heads == 0 or n % heads:
            raise ValueError(
                f"q has {n} heads but {name} has {heads}; the number of q heads must be a "
                f"multiple of the number of {name} heads (GQA/MQA)"
            )


def head_groups(n: int, kk: int, kv: int) -> tuple[int, int, int, int]:
    """(kc, g, rk, rv) of N query heads over Kk key and Kv value heads (see check_heads).

    Decode kernels run per query group of the finer head split: kc = lcm(Kk, Kv) groups of
    g = N / kc heads; group c reads key head ``c // rk`` and value head ``c // rv`` (one group
    per K/V head for GQA, rk = rv = 1).
    """
    kc = math.lcm(kk, kv)
    return kc, n // kc, kc // kk, kc // kv


def group_rows(q: jax.Array, kc: int) -> jax.Array:
    """q [B, T, N, H] -> [B, Kc, T * G, H]: each query group's rows, t-major (row r is the
    token r // G of head r % G of the group)."""
    b, t, n, h = q.shape
    return jnp.swapaxes(q.reshape(b, t, kc, n // kc, h), 1, 2).reshape(b, kc, t * (n // kc), h)


def ungroup_rows(x: jax.Array, t: int) -> jax.Array:
    """The inverse of :func:`group_rows` for per-split results: x [P, B, Kc, T * G, ...] ->
    [P, B, T, Kc * G, ...]."""
    p, b, kc, rows, *rest = x.shape
    g = rows // t
    return jnp.swapaxes(x.reshape(p, b, kc, t, g, *rest), 2, 3).reshape(p, b, t, kc * g, *rest)


def _check_dtypes(q: Any, k: Any, v: Any, dtypes: Sequence[Any]) -> None:
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        names = ", ".join(jnp.dtype(d).name for d in dtypes)
        raise ValueError(
            f"q, k, v must share one of {names}; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
