"""The dense softmax every op's ``reference`` shares: per-head logits, then a masked softmax.

Select, don't multiply: a masked pair has p = 0, but 0 * NaN is NaN in p @ v and in the
matmuls autodiff makes of these einsums (ds @ k, ds^T @ q, p^T dO). So the operands are made
finite, masked logits are replaced (not added to) and p @ v is a
:func:`~pallas_kernels.common.masks.weighted_sum` (whose dv reads dO through
``finite_or_zero``): garbage a row cannot see (NaN in a padding segment, in an uninitialized
cache slot) never reaches it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnlab.ops._checks import head_map
from pallas_kernels.common.masks import MASK_VALUE, finite_or_zero, weighted_sum

HIGHEST = jax.lax.Precision.HIGHEST


def head_logits(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                soft_cap: float | None) -> tuple[jax.Array, jax.Array]:
    """(z [B, N, T, S] float32 logits, v_n [B, S, N, Hv] float32 values per query head).

    q [B, T, N, H]; k [B, S, Kk, H] and v [B, S, Kv, Hv] are read by query head n at
    n // (N / Kk) and n // (N / Kv). ``soft_cap`` c gives c * tanh(z / c).
    """
    n = q.shape[2]
    k_n = finite_or_zero(k[:, :, head_map(n, k.shape[2])].astype(jnp.float32))  # [B, S, N, H]
    v_n = finite_or_zero(v[:, :, head_map(n, v.shape[2])].astype(jnp.float32))  # [B, S, N, Hv]
    q_f = finite_or_zero(q.astype(jnp.float32))
    z = jnp.einsum("BTNH,BSNH->BNTS", q_f, k_n, precision=HIGHEST) * scale
    if soft_cap is not None:
        z = soft_cap * jnp.tanh(z / soft_cap)
    return z, v_n


def masked_softmax(z: jax.Array, mask: jax.Array, v_n: jax.Array, dtype
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Softmax of z [B, N, T, S] over the keys ``mask`` (broadcastable) lets each row see.

    Returns:
      (out [B, T, N, Hv] in ``dtype``, lse [B, N, T] (-inf where a row sees no key),
      p [B, N, T, S], the masked logits z, seen [B, N, T] bool).
    """
    z = jnp.where(mask, z, MASK_VALUE)
    lse = jax.nn.logsumexp(z, axis=-1)
    p = jnp.where(mask, jnp.exp(z - lse[..., None]), 0.0)
    out = weighted_sum("BNTS,BSNH->BTNH", p, v_n, HIGHEST).astype(dtype)
    seen = jnp.broadcast_to(mask, z.shape).any(-1)
    return out, jnp.where(seen, lse, -jnp.inf), p, z, seen
