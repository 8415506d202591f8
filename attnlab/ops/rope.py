"""Rotary position embedding (RoPE), full or partial: the one implementation in attnlab.

Shapes: B batch, T tokens, N heads, H head dim; R = ``rope_dim`` rotated dims (even, <= H).

The first R dims of each head are rotated, the remaining H - R pass through unchanged
(partial RoPE, as GPT-NeoX ``rotary_pct`` and the MiniMax softmax layers). Within the rotated
part the pairs are split in halves ("rotate half", Llama/NeoX layout): dim ``i`` pairs with
dim ``i + R/2`` and, as a complex number ``x_i + j x_{i+R/2}``, is multiplied by
``exp(j * p * theta^(-2i/R))`` for a token at position ``p``. Hence the relative-position
property: ``<rope(q, p), rope(k, s)>`` depends on p and s only through ``p - s``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common.static_args import check_int, check_static_float


def rope(
    x: jax.Array,
    positions: jax.Array,
    *,
    theta: float = 10_000.0,
    rope_dim: int | None = None,
) -> jax.Array:
    """Rotates the first ``rope_dim`` dims of every head by its token's position.

    Computed in float32 (angles of large positions lose precision in 16-bit), returned in
    ``x.dtype``.

    Args:
      x: [B, T, N, H] queries or keys.
      positions: [B, T] integer global token positions.
      theta: RoPE base, a static Python float (not traced under ``jax.jit``).
      rope_dim: R, the number of leading head dims rotated; even, 0 <= R <= H (default H).
        0 returns x unchanged.

    Returns:
      [B, T, N, H] array in x's dtype.

    Raises:
      ValueError: x not 4-d, positions not [B, T], rope_dim odd or outside [0, H], theta <= 0.

    Example:
      >>> q = rope(q, positions, theta=10_000.0, rope_dim=q.shape[-1] // 2)
    """
    if jnp.ndim(x) != 4:
        raise ValueError(f"x must have shape [batch, seq, heads, head_dim], got {jnp.shape(x)}")
    b, t, _, h = x.shape
    if jnp.shape(positions) != (b, t):
        raise ValueError(
            f"positions must have shape [batch, seq] = ({b}, {t}) to match x {x.shape}, got "
            f"{jnp.shape(positions)}"
        )
    rope_dim = h if rope_dim is None else check_int("rope_dim", rope_dim, minimum=0)
    if rope_dim % 2 or not 0 <= rope_dim <= h:
        raise ValueError(
            f"rope_dim={rope_dim} must be an even number in [0, head_dim={h}]; pick an even "
            "number of dims to rotate"
        )
    if not check_static_float("theta", theta) > 0:
        raise ValueError(f"theta={theta} must be positive (10000 is the usual base)")
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rope_dim)  # [R/2]
    pos = positions.astype(jnp.float32)[:, :, None, None]  # [B, T, 1, 1]
    angle = pos * inv_freq[None, None, None]  # [B, T, 1, R/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half:rope_dim], xf[..., rope_dim:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)
