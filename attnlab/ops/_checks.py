"""Input checks the ops share: one message per mistake, naming what was given and expected."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common.checks import check_heads

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def check_qkv(q, k, v) -> None:
    """q, k, v are [batch, seq, heads, head_dim] arrays of one float dtype."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name} must have shape [batch, seq, heads, head_dim], got shape {jnp.shape(x)}"
            )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; use float32, bfloat16 or float16")


def check_gqa(q, k, v) -> None:
    """k [B, S, Kk, H] and v [B, S, Kv, Hv] fit q [B, T, N, H]: N a multiple of Kk and of Kv
    (query head i reads key head i // (N // Kk), value head i // (N // Kv))."""
    check_heads(q, k, v)


def head_map(n: int, heads: int) -> jax.Array:
    """[N] int32: the key (or value) head that each of ``n`` query heads reads,
    ``floor(i * heads / n)`` (GQA/MQA groups of ``n // heads`` consecutive query heads)."""
    return (jnp.arange(n, dtype=jnp.int32) * heads) // n
