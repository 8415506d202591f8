"""Input checks shared by the kernels' public wrappers (GPU and TPU): one message per mistake."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp


def check_attention_inputs(
    q: Any, k: Any, v: Any, q_positions: Any, kv_positions: Any,
    q_segment_ids: Any, kv_segment_ids: Any, *, dtypes: Sequence[Any],
) -> tuple[int, int, int, int, int, int]:
    """Validates flash-attention inputs; returns (B, T, N, H, S, K).

    q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv] with N a multiple of K and one shared dtype
    from ``dtypes``; positions [T] / [S]; segment ids both None or [B, T] / [B, S].

    Raises:
      ValueError: naming what was given and what was expected.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name} must have shape [batch, seq, heads, head_dim], got {jnp.shape(x)}"
            )
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if k.shape[0] != b or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"k must be [B, S, K, H] and v [B, S, K, Hv] for q {q.shape}; got k {k.shape}, "
            f"v {v.shape}"
        )
    if k.shape[3] != h:
        raise ValueError(f"q has head_dim {h} but k has {k.shape[3]}; they must be equal")
    if kh == 0 or n % kh:
        raise ValueError(
            f"q has {n} heads but k has {kh}; the number of q heads must be a multiple of the "
            "number of kv heads (GQA/MQA)"
        )
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        names = ", ".join(jnp.dtype(d).name for d in dtypes)
        raise ValueError(
            f"q, k, v must share one of {names}; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
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
