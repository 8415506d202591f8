"""Exact combination of partial attention results by their log-sum-exp.

If attention over keys A gives (o_a, lse_a) and over keys B gives (o_b, lse_b), attention over
A ∪ B is

    lse = log(exp(lse_a) + exp(lse_b))
    o   = exp(lse_a - lse) * o_a + exp(lse_b - lse) * o_b

Ring attention, star attention's second phase and split-K decoding are all this merge. A part
with lse = -inf (it saw no key) gets weight 0 and its output is never read (even NaN there
stays out); if every part is -inf the result is o = 0 and lse = -inf, never NaN, and
gradients stay finite.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def merge_n(
    outs: jax.Array | Sequence[jax.Array], lses: jax.Array | Sequence[jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """Merges P partial results.

    Args:
      outs: [P, B, T, N, H] stacked partial outputs (or a sequence of [B, T, N, H]).
      lses: [P, B, T, N] matching log-sum-exps (or a sequence of [B, T, N]).

    Returns:
      (out [B, T, N, H] in the outputs' dtype, lse [B, T, N] float32).

    Raises:
      ValueError: no parts, different numbers of outputs and lses, parts of different
        shapes, or an lse that is not its output's shape without the head_dim axis.

    Example:
      >>> o, lse = merge_n([o1, o2, o3], [l1, l2, l3])
    """
    outs, lses = _stack("outs", outs), _stack("lses", lses)
    if outs.ndim < 2 or lses.ndim < 1:
        raise ValueError(
            f"outs must be [P, ..., H] and lses [P, ...], got outs {outs.shape} and lses "
            f"{lses.shape}"
        )
    if outs.shape[0] != lses.shape[0]:
        raise ValueError(
            f"outs has {outs.shape[0]} parts but lses has {lses.shape[0]}; give one lse per "
            "partial output"
        )
    if outs.shape[:-1] != lses.shape:
        raise ValueError(
            f"each lse must be its output's shape without the head_dim axis: outs "
            f"{outs.shape} (parts of {outs.shape[1:]}) need lses {outs.shape[:-1]}, got lses "
            f"{lses.shape}"
        )
    lses = lses.astype(jnp.float32)
    m = jnp.max(lses, axis=0)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lses - m[None])  # -inf parts -> 0
    total = jnp.sum(w, axis=0)
    seen = total != 0  # a NaN part (the row saw garbage) stays NaN rather than "saw nothing"
    safe_total = jnp.where(seen, total, 1.0)
    lse = jnp.where(seen, m + jnp.log(safe_total), -jnp.inf)
    weights = w / safe_total[None]
    # Select, don't multiply: a part of weight 0 (it saw no key) brings nothing in, whatever
    # its output holds (0 * NaN is NaN, also in the gradient of its weight).
    parts = jnp.where((w > 0)[..., None], outs.astype(jnp.float32), 0.0)
    out = jnp.sum(weights[..., None] * parts, axis=0)
    return out.astype(outs.dtype), lse


def _stack(name: str, parts: jax.Array | Sequence[jax.Array]) -> jax.Array:
    """Stacked parts [P, ...] of ``name``: an array as given, a sequence stacked after its
    parts' shapes are checked to agree."""
    if isinstance(parts, (jax.Array, np.ndarray)):
        return jnp.asarray(parts)
    parts = list(parts)
    if not parts:
        raise ValueError(f"{name} is empty; merge_n needs at least one partial result")
    shapes = [jnp.shape(p) for p in parts]
    for i, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise ValueError(
                f"{name} parts must share one shape, but part 0 has shape {shapes[0]} and "
                f"part {i} has {shape}"
            )
    return jnp.stack(parts)


def merge(
    o_a: jax.Array, lse_a: jax.Array, o_b: jax.Array, lse_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Merges two partial attention results exactly (see module docstring).

    Args:
      o_a, o_b: [B, T, N, H] partial outputs over disjoint key sets.
      lse_a, lse_b: [B, T, N] their log-sum-exps.

    Returns:
      (out [B, T, N, H], lse [B, T, N] float32).
    """
    if o_a.shape != o_b.shape:
        raise ValueError(f"o_a and o_b must have one shape, got {o_a.shape} and {o_b.shape}")
    if lse_a.shape != lse_b.shape:
        raise ValueError(
            f"lse_a and lse_b must have one shape, got {lse_a.shape} and {lse_b.shape}"
        )
    return merge_n(jnp.stack([o_a, o_b]), jnp.stack([lse_a, lse_b]))
