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
:func:`context_mask` (it materializes [T, T]; tests and small inputs);
:func:`context_attention` computes the same on one device in O(T * (anchor + block)) memory
(the blocks become batch rows, each attending to its anchor and itself). Phase 2 needs no
definition of its own: it equals :func:`attnlab.ops.attention` over the whole cache. The
sequence-parallel implementation is :mod:`sharding.star`.

Anchors (the paper's anchor ablation): ``"first"`` (the paper's method: the first
``anchor_size`` tokens of block 1), ``"previous"`` (the ``anchor_size`` tokens right before
the block, i.e. the end of the previous block) and ``"none"`` (blocks encoded alone). Every
key keeps its global position. The anchor is read from the keys and values the anchor tokens
got in their own encoding, at every layer: for ``"first"`` that is exactly the paper's
re-encoding of ``[c_1; c_i]`` (block 1 is encoded alone either way); for ``"previous"`` the
paper re-encodes ``c_{i-1}`` as a prefix of the window, so from the second layer on its keys
differ from ours (which saw their own anchor). :class:`StarConfig` holds the choice.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops.attention import attention
from attnlab.ops.attention import reference as attention_reference
from pallas_kernels.common.static_args import is_int

ANCHORS = ("first", "previous", "none")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StarConfig:
    """How Star Attention splits and anchors the context (phase 1).

    Attributes:
      block_size: tokens per context block (per host in the paper); must divide the context.
      anchor: ``"first"`` (the paper), ``"previous"`` or ``"none"`` (module docstring).
      anchor_size: anchor tokens, in [1, block_size]; default one whole block (the paper).
        Ignored (must be None) for ``anchor="none"``.

    Raises:
      ValueError: a block size that is not a positive int, an unknown anchor, an anchor size
        outside [1, block_size].

    Example:
      >>> StarConfig(block_size=512, anchor="first")
    """

    block_size: int
    anchor: str = "first"
    anchor_size: int | None = None

    def __post_init__(self) -> None:
        if not is_int(self.block_size) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.anchor == "none" and self.anchor_size is not None:
            raise ValueError(
                f"anchor='none' takes no anchor_size, got anchor_size={self.anchor_size!r}; "
                "drop it or choose anchor='first' or 'previous'"
            )
        if self.anchor_size is not None and (
                not is_int(self.anchor_size) or not 0 < self.anchor_size <= self.block_size):
            raise ValueError(
                f"anchor_size must be in [1, block_size = {self.block_size}] (the anchor is "
                f"taken from one block), got {self.anchor_size!r}"
            )

    @property
    def anchor_tokens(self) -> int:
        """The number of anchor tokens each later block sees (0 for ``"none"``, else anchor_size
        or one block)."""
        if self.anchor == "none":
            return 0
        return self.block_size if self.anchor_size is None else int(self.anchor_size)

    def num_blocks(self, t: int) -> int:
        """Blocks in a context of ``t`` tokens; ValueError unless block_size divides t."""
        if not is_int(t) or t <= 0 or t % self.block_size:
            raise ValueError(
                f"block_size={self.block_size} must divide the context length {t}; pad or cut "
                f"the context to a multiple of {self.block_size} or choose another block size"
            )
        return t // self.block_size


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
                 is_causal: bool = True, anchor: str = "first") -> np.ndarray:
    """[T, T] bool: which keys each context token sees in Star Attention's phase 1.

    Query i in block b = i // block_size sees key j if j lies in its own block (and j <= i
    when causal) or, for b > 0, if j is in its anchor: j < anchor_size (``"first"``), or
    ``b * block_size - anchor_size <= j < b * block_size`` (``"previous"``); ``"none"`` has
    no anchor.

    Example:
      >>> context_mask(4, 2, 1).astype(int)
      array([[1, 0, 0, 0],
             [1, 1, 0, 0],
             [1, 0, 1, 0],
             [1, 0, 1, 1]])
    """
    a = check_blocks(t, block_size, anchor_size)
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    i = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    own = (i // block_size) == (j // block_size)
    if is_causal:
        own &= j <= i
    if anchor == "none":
        return own
    if anchor == "first":
        return own | ((i >= block_size) & (j < a))
    start = i // block_size * block_size
    return own | ((i >= block_size) & (j < start) & (j >= start - a))


def reference(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    block_size: int,
    anchor_size: int | None = None,
    is_causal: bool = True,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    anchor: str = "first",
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
      anchor: ``"first"`` (the paper), ``"previous"`` or ``"none"`` (module docstring).

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
    mask = context_mask(t, block_size, anchor_size, is_causal, anchor)
    bias = jnp.where(jnp.asarray(mask), 0.0, -jnp.inf)[None, None]
    return attention_reference(q, k, v, bias=bias, scale=scale,
                               logits_soft_cap=logits_soft_cap)


def context_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    star: StarConfig,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Star Attention's causal context phase on one device, without a [T, T] mask.

    The T / block_size blocks become batch rows; each attends causally to its anchor
    (global positions before its own, so all visible) followed by itself. Block 1's anchor
    slot is hidden by a segment id. Any :func:`attnlab.ops.attention` implementation that
    takes offsets and segment ids computes it.

    Args:
      q: [B, T, N, H]; k: [B, T, K, H]; v: [B, T, K, Hv] the context, positions applied.
      star: block size and anchor.
      scale, logits_soft_cap, impl: as :func:`attnlab.ops.attention`.

    Returns:
      [B, T, N, Hv]: :func:`reference` with ``is_causal=True`` and the same block and anchor.

    Raises:
      ValueError: block_size not dividing T (:meth:`StarConfig.num_blocks`), k and q of
        different lengths, or bad attention arguments.

    Example:
      >>> out = context_attention(q, k, v, star=StarConfig(block_size=256))
    """
    if not isinstance(star, StarConfig):
        raise ValueError(f"star must be a StarConfig, got {type(star).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name} must have shape [batch, seq, heads, head_dim], got {jnp.shape(x)}"
            )
    b, t = q.shape[:2]
    if k.shape[1] != t or v.shape[1] != t:
        raise ValueError(
            f"Star Attention's context phase is self-attention: q has {t} tokens, k "
            f"{k.shape[1]}, v {v.shape[1]}"
        )
    nb, bs, a = star.num_blocks(t), star.block_size, star.anchor_tokens
    kw = dict(scale=scale, logits_soft_cap=logits_soft_cap, impl=impl)

    def split(x):  # [B, T, ...] -> [B, nb, bs, ...]
        return x.reshape(b, nb, bs, *x.shape[2:])

    def rows(x):  # [B, nb, s, ...] -> [B * nb, s, ...]
        return x.reshape(b * x.shape[1], *x.shape[2:])

    if a == 0 or nb == 1:
        out = attention(rows(split(q)), rows(split(k)), rows(split(v)), is_causal=True, **kw)
        return out.reshape(q.shape[:3] + v.shape[3:])

    def anchors(x):  # [B, nb, a, ...]: block i's anchor (block 0's is hidden below)
        if star.anchor == "first":
            return jnp.broadcast_to(x[:, None, :a], (b, nb, a, *x.shape[2:]))
        prev = split(x)[:, :-1, bs - a:]
        return jnp.concatenate([jnp.zeros_like(prev[:, :1]), prev], axis=1)

    def window(x):  # [B * nb, a + bs, ...]
        return rows(jnp.concatenate([anchors(x), split(x)], axis=2))

    has_anchor = jnp.arange(nb) > 0
    kv_seg = jnp.concatenate([jnp.broadcast_to(has_anchor[None, :, None], (b, nb, a)),
                              jnp.ones((b, nb, bs), bool)], axis=2).astype(jnp.int32)
    out = attention(
        rows(split(q)), window(k), window(v), is_causal=True, q_offset=a,
        segment_ids=(jnp.ones((b * nb, bs), jnp.int32), rows(kv_seg)), **kw,
    )
    return out.reshape(q.shape[:3] + v.shape[3:])


__all__ = ["ANCHORS", "StarConfig", "check_blocks", "context_attention", "context_mask",
           "reference"]
