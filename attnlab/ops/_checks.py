"""Input checks the ops share: one message per mistake, naming what was given and expected."""

from __future__ import annotations

import jax.numpy as jnp

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
    """k [B, S, K, H] and v [B, S, K, Hv] fit q [B, T, N, H] with N a multiple of K."""
    b, _, n, h = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in [batch, seq, heads], got {k.shape} and {v.shape}")
    if k.shape[3] != h:
        raise ValueError(f"q has head_dim {h} but k has {k.shape[3]}; they must be equal")
    kh = k.shape[2]
    if kh == 0 or n % kh:
        raise ValueError(
            f"q has {n} heads but k has {kh}; the number of q heads must be a multiple of the "
            "number of kv heads (GQA/MQA)"
        )
