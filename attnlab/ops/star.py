"""Star Attention (Acharya et al. 2024, arXiv 2411.17116): the definition of its context phase.

Star Attention splits a long context into blocks ``c_1 .. c_n`` (one per host) and encodes it
in two phases:

1. **Context encoding** (approximate): block ``c_1`` is encoded alone; every later block
   ``c_i`` is encoded as ``[c_1'; c_i]`` with causal attention over that window, where the
   *anchor* ``c_1'`` is the first ``anchor_size`` tokens of the context (the paper uses the
   whole first block). The anchor keeps its positions ``0 .. a-1`` and ``c_i`` its global ones,
   so rotary embeddings applied before attention stay as in the full sequence. A context token
   therefore sees the anchor and the earlier tokens of its own block, nothing else.
2. **Query encoding and decoding** (exact): the query, replicated on every host, attends to
   each host's share of the cache; the partial results are merged by their log-sum-exp
   (:mod:`attnlab.ops.merge`), which is exactly global attention.

:func:`reference` is phase 1 written as ordinary softmax attention under the mask
:func:`context_mask` (it materializes [T, T]; tests and small inputs). Phase 2 needs no
definition of its own: it equals :func:`attnlab.ops.attention` over the whole cache. The
sequence-parallel implementation is :mod:`sharding.star`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops.attention import reference as attention_reference


def check_blocks(t: int, block_size: int, anchor_size: int | None) -> int:
    """Validates the block split; returns the anchor size (default: one block).

    Raises:
      ValueError: a block size that does not divide T, or an anchor longer than a block.
    """
    if not isinstance(block_size, (int, np.integer)) or block_size <= 0 or t % block_size:
        raise ValueError(
            f"block_size must be a positive divisor of the context length {t}, got "
            f"{block_size!r}"
        )
    anchor = block_size if anchor_size is None else anchor_size
    if not isinstance(anchor, (int, np.integer)) or not 0 < anchor <= block_size:
        raise ValueError(
            f"anchor_size must be in [1, block_size = {block_size}] (the anchor is the start "
            f"of the first block), got {anchor_size!r}"
        )
    return int(anchor)


def context_mask(t: int, block_size: int, anchor_size: int | None = None,
                 is_causal: bool = True) -> np.ndarray:
    """[T, T] bool: which keys each context token sees in Star Attention's phase 1.

    Query i in block b = i // block_size sees key j if j lies in its own block (and j <= i
    when causal) or, for b > 0, if j < anchor_size (the anchor).

    Example:
      >>> context_mask(4, 2, 1).astype(int)
      array([[1, 0, 0, 0],
             [1, 1, 0, 0],
             [1, 0, 1, 0],
             [1, 0, 1, 1]])
    """
    anchor = check_blocks(t, block_size, anchor_size)
    i = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    own = (i // block_size) == (j // block_size)
    if is_causal:
        own &= j <= i
    return own | ((i >= block_size) & (j < anchor))


def reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    block_size: int,
    anchor_size: int | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
) -> jax.Array:
    """Star Attention's context encoding (phase 1): softmax attention under
    :func:`context_mask`, in plain ``jnp``.

    Args:
      q: [B, T, N, H]; k: [B, T, K, H]; v: [B, T, K, Hv] (self-attention over the context,
        positions already applied).
      block_size: tokens per block (per host); must divide T.
      anchor_size: anchor tokens (the start of block 1) prepended to every later block;
        default one whole block, as in the paper.
      is_causal: causal attention inside each window (the paper's setting).
      scale, logits_soft_cap: as :func:`attnlab.ops.attention`.

    Returns:
      [B, T, N, Hv] in q's dtype. With T == block_size (one block) this is plain attention.

    Raises:
      ValueError: q, k, v not [B, T, heads, head_dim], k of another length than q, a block
        split that does not fit (see :func:`check_blocks`), or bad attention arguments.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name} must have shape [batch, seq, heads, head_dim], got {jnp.shape(x)}"
            )
    t = q.shape[1]
    if k.shape[1] != t:
        raise ValueError(
            f"Star Attention's context phase is self-attention: q has {t} tokens, k "
            f"{k.shape[1]}"
        )
    mask = context_mask(t, block_size, anchor_size, is_causal)
    bias = jnp.where(jnp.asarray(mask), 0.0, -jnp.inf)[None, None]
    return attention_reference(q, k, v, bias=bias, scale=scale,
                               logits_soft_cap=logits_soft_cap)


__all__ = ["check_blocks", "context_mask", "reference"]
