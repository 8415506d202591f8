"""Attention masks as values, shared by the reference, the XLA path, the kernels and sharding.

A mask has two parts:

* a static :class:`MaskSpec` (causal or not, a local window), hashable so it can be a
  ``jit`` static argument and a kernel's compile-time constant;
* runtime arrays: global token positions of the queries and keys (``q_positions`` [T],
  ``kv_positions`` [S], int32) and optional segment ids (``q_segment_ids`` [B, T],
  ``kv_segment_ids`` [B, S]) for packed documents.

Whether query ``i`` may see key ``j`` is decided by :func:`visible` from the positions and
segment ids alone. Because positions are global, any block of a longer sequence (a ring step,
a striped or zigzag shard, a star-attention context block) gets the right mask by handing in
the right positions; no call site needs its own flag.

:func:`block_metadata` turns a mask into per-tile ``EMPTY / PARTIAL / FULL`` flags from the
per-tile ranges of positions and segment ids, which kernels use to skip empty tiles and to
drop the elementwise mask on full ones; :func:`tile_metadata` is the same from the kernels'
(positions, segment ids) arguments, and :func:`tile_mask` the elementwise mask of one kernel
tile, padded keys (and, for kernels that reduce over queries, padded queries) included.

Masked positions never influence a row: a masked logit is *selected* away (``MASK_VALUE``) and
its probability is *selected* to 0, and the other operand of every matmul whose zero weights
sit on masked positions (``v`` in ``p @ v``; ``k``, ``q``, ``dO`` in the backward) goes
through :func:`finite_or_zero` where a tile is partially masked, because ``0 * NaN`` is NaN.
So NaN or inf in a key, value, query or cotangent that a row cannot see (an uninitialized
cache slot, a padding document, the padded rows of a partial tile) never reaches that row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common.static_args import is_int

# Masked logits use a large finite negative value inside kernels (never -inf), so that a tile
# whose every entry is masked gives exp(x - max) = exp(0) * 0-weight instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MaskSpec:
    """Static part of an attention mask.

    Attributes:
      causal: query at position ``p`` sees keys at positions ``<= p``.
      window_left: if set, query at ``p`` sees keys at positions ``>= p - window_left``.
      window_right: if set, query at ``p`` sees keys at positions ``<= p + window_right``.

    The same names as ``jax.nn.dot_product_attention``: ``local_window_size=(left, right)``
    maps to ``window_left`` / ``window_right``.
    """

    causal: bool = False
    window_left: int | None = None
    window_right: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.causal, (bool, np.bool_)):
            raise ValueError(
                f"causal (is_causal) must be a bool, got {self.causal!r} of type "
                f"{type(self.causal).__name__}; a traced value cannot choose the mask"
            )
        object.__setattr__(self, "causal", bool(self.causal))
        for name in ("window_left", "window_right"):
            w = getattr(self, name)
            if w is not None:
                if not is_int(w) or w < 0:
                    raise ValueError(f"{name} must be a non-negative int or None, got {w!r}")
                object.__setattr__(self, name, int(w))

    @property
    def is_trivial(self) -> bool:
        """True when positions alone never hide a key (no causal mask, no window)."""
        return not self.causal and self.window_left is None and self.window_right is None

    @classmethod
    def from_jax_nn(
        cls, *, is_causal: bool = False, local_window_size: int | tuple[int, int] | None = None
    ) -> MaskSpec:
        """Builds a spec from ``jax.nn.dot_product_attention``-style arguments.

        ``local_window_size``: None, an int w (w keys on each side) or a (left, right) pair
        of ints or None (unbounded side); Python or NumPy integers, never traced values.

        Raises:
          ValueError: naming ``local_window_size`` and the value given.
        """
        if local_window_size is None:
            return cls(causal=is_causal)
        bad = ValueError(
            "local_window_size must be None, a non-negative int or a (left, right) pair of "
            f"non-negative ints or None, got {local_window_size!r}"
        )
        if is_int(local_window_size):
            left = right = local_window_size
        elif isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2:
            left, right = local_window_size
        else:
            raise bad
        for side in (left, right):
            if side is not None and (not is_int(side) or side < 0):
                raise bad
        return cls(causal=is_causal, window_left=left, window_right=right)


class SegmentIds(NamedTuple):
    """Segment ids of packed documents: a query sees only keys with the same id.

    q: [B, T] int32; kv: [B, S] int32.
    """

    q: jax.Array
    kv: jax.Array


def positions_from_offset(offset: int | jax.Array, length: int) -> jax.Array:
    """Global positions ``offset + arange(length)`` as int32 [length]."""
    return jnp.asarray(offset, jnp.int32) + jnp.arange(length, dtype=jnp.int32)


def mask_and(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a & b`` broadcast explicitly (ranks may differ), so it holds under
    ``jax_numpy_rank_promotion="raise"``."""
    shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
    return jnp.logical_and(jnp.broadcast_to(a, shape), jnp.broadcast_to(b, shape))


def visible(
    spec: MaskSpec,
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array | None = None,
    k_seg: jax.Array | None = None,
) -> jax.Array | None:
    """Elementwise visibility. The single definition of the mask.

    Args:
      spec: the static mask.
      q_pos: query positions, broadcastable against ``k_pos`` (e.g. [..., T, 1]).
      k_pos: key positions (e.g. [..., 1, S]).
      q_seg, k_seg: segment ids with the same broadcasting, or None.

    Returns:
      A boolean array of the broadcast shape, or None when nothing is masked.
      Works on whole arrays (reference), on blocks (XLA path) and on kernel tiles.
    """
    mask = None

    def both(a: jax.Array | None, b: jax.Array) -> jax.Array:
        return b if a is None else mask_and(a, b)

    if spec.causal:
        mask = both(mask, k_pos <= q_pos)
    if spec.window_left is not None:
        mask = both(mask, k_pos >= q_pos - spec.window_left)
    if spec.window_right is not None:
        mask = both(mask, k_pos <= q_pos + spec.window_right)
    if q_seg is not None:
        mask = both(mask, q_seg == k_seg)
    return mask


def tile_kind(
    spec: MaskSpec,
    q_pos_range: tuple[jax.Array, jax.Array],
    k_pos_range: tuple[jax.Array, jax.Array],
    q_seg_range: tuple[jax.Array, jax.Array] | None = None,
    k_seg_range: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Classifies a tile as EMPTY, PARTIAL or FULL from the (min, max) of its positions/ids.

    Conservative: a tile reported EMPTY has no visible pair and a tile reported FULL has every
    pair visible; anything else is PARTIAL. Arguments broadcast, so this classifies a whole grid
    of tiles at once.
    """
    q_lo, q_hi = q_pos_range
    k_lo, k_hi = k_pos_range
    empty = jnp.zeros(jnp.broadcast_shapes(jnp.shape(q_lo), jnp.shape(k_lo)), bool)
    full = jnp.ones_like(empty)
    if spec.causal:  # visible iff k <= q
        empty |= k_lo > q_hi
        full &= k_hi <= q_lo
    if spec.window_left is not None:  # visible iff q - k <= L
        empty |= q_lo - k_hi > spec.window_left
        full &= q_hi - k_lo <= spec.window_left
    if spec.window_right is not None:  # visible iff k - q <= R
        empty |= k_lo - q_hi > spec.window_right
        full &= k_hi - q_lo <= spec.window_right
    if q_seg_range is not None:
        (qs_lo, qs_hi), (ks_lo, ks_hi) = q_seg_range, k_seg_range
        empty |= (qs_hi < ks_lo) | (ks_hi < qs_lo)
        full &= (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo)
    return jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)


def _tile_ranges(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """(min, max) over consecutive tiles of ``block`` along the last axis (padded at the end)."""
    n = x.shape[-1]
    pad = -n % block
    lo_pad = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], mode="edge")
    tiles = lo_pad.reshape(*x.shape[:-1], (n + pad) // block, block)
    return tiles.min(-1), tiles.max(-1)


class BlockMetadata(NamedTuple):
    """Per-tile mask metadata.

    Attributes:
      kind: [B or 1, num_q_blocks, num_kv_blocks] int32 in {EMPTY, PARTIAL, FULL}.
      kv_start, kv_stop: [B or 1, num_q_blocks] int32, the half-open range of kv blocks that
        contains every non-empty tile of a query block (so kernels can bound their loop).
      q_start, q_stop: [B or 1, num_kv_blocks] int32, likewise for a kv block (backward
        dK/dV).
    """

    kind: jax.Array
    kv_start: jax.Array
    kv_stop: jax.Array
    q_start: jax.Array
    q_stop: jax.Array


def block_metadata(
    spec: MaskSpec,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    *,
    block_q: int,
    block_kv: int,
    segment_ids: SegmentIds | None = None,
    kv_length: int | None = None,
) -> BlockMetadata:
    """Turns a mask into per-tile EMPTY/PARTIAL/FULL flags and loop bounds.

    Args:
      spec: static mask.
      q_positions: [T] int32 global query positions.
      kv_positions: [S] int32 global key positions.
      block_q, block_kv: tile sizes; T and S need not be multiples (the last tile is partial).
      segment_ids: optional packed-document ids.
      kv_length: number of valid keys when ``kv_positions`` is already padded; tiles that
        contain padding are at best PARTIAL.

    Returns:
      :class:`BlockMetadata`.
    """
    if block_q <= 0 or block_kv <= 0:
        raise ValueError(
            f"block sizes must be positive, got block_q={block_q}, block_kv={block_kv}"
        )
    t, s = q_positions.shape[-1], kv_positions.shape[-1]
    qp = _tile_ranges(q_positions, block_q)
    kp = _tile_ranges(kv_positions, block_kv)
    q_rng = (qp[0][:, None], qp[1][:, None])
    k_rng = (kp[0][None, :], kp[1][None, :])
    if segment_ids is not None:
        qs = _tile_ranges(segment_ids.q, block_q)
        ks = _tile_ranges(segment_ids.kv, block_kv)
        kind = tile_kind(
            spec,
            (q_rng[0][None], q_rng[1][None]),
            (k_rng[0][None], k_rng[1][None]),
            (qs[0][:, :, None], qs[1][:, :, None]),
            (ks[0][:, None, :], ks[1][:, None, :]),
        )
    else:
        kind = tile_kind(spec, q_rng, k_rng)[None]
    # A ragged last tile (or padding) never counts as FULL: kernels must mask it.
    n_valid = s if kv_length is None else kv_length
    ragged_kv = jnp.arange(kind.shape[-1]) * block_kv + block_kv > n_valid
    ragged_q = jnp.arange(kind.shape[-2]) * block_q + block_q > t
    ragged = ragged_q[:, None] | ragged_kv[None, :]
    kind = jnp.where(ragged[None] & (kind == FULL), PARTIAL, kind)
    kind = kind.astype(jnp.int32)
    nonempty = kind != EMPTY
    nk, nq = kind.shape[-1], kind.shape[-2]
    kv_idx = jnp.arange(nk, dtype=jnp.int32)
    q_idx = jnp.arange(nq, dtype=jnp.int32)
    kv_start = jnp.min(jnp.where(nonempty, kv_idx, nk), axis=-1)
    kv_stop = jnp.max(jnp.where(nonempty, kv_idx + 1, 0), axis=-1)
    q_start = jnp.min(jnp.where(nonempty, q_idx[:, None], nq), axis=-2)
    q_stop = jnp.max(jnp.where(nonempty, q_idx[:, None] + 1, 0), axis=-2)
    kv_start = jnp.minimum(kv_start, kv_stop)
    q_start = jnp.minimum(q_start, q_stop)
    return BlockMetadata(kind, kv_start, kv_stop, q_start, q_stop)


def tile_metadata(spec: MaskSpec, q_pos: jax.Array, kv_pos: jax.Array, q_seg: jax.Array | None,
                  kv_seg: jax.Array | None, block_q: int, block_kv: int) -> BlockMetadata:
    """:func:`block_metadata` of a kernel's mask arguments: positions [T] / [S] and segment ids
    [B, T] / [B, S] (both None, or both given)."""
    seg = None if q_seg is None else SegmentIds(q_seg, kv_seg)
    return block_metadata(
        spec, q_pos, kv_pos, block_q=block_q, block_kv=block_kv, segment_ids=seg
    )


def tile_mask(spec: MaskSpec, q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array | None,
              k_seg: jax.Array | None, k_index: jax.Array, kv_len: int | None,
              q_index: jax.Array | None = None, q_len: int | None = None,
              ) -> jax.Array | None:
    """Visibility of one kernel tile, or None when every pair is visible.

    Any orientation: the arguments broadcast against each other ([bq, 1] vs [1, bk] or the
    transpose). ``k_index`` holds the keys' indices into the padded key axis; keys at or past
    ``kv_len`` (static) are padding and never visible (``kv_len=None``: no padding). Likewise
    ``q_index`` / ``q_len`` for padded query rows, which kernels that sum over queries (dK/dV)
    must mask: whatever a padded row holds must not reach a real key's gradient.
    """
    mask = visible(spec, q_pos, k_pos, q_seg, k_seg)
    for index, length in ((k_index, kv_len), (q_index, q_len)):
        if length is not None:
            valid = index < length
            mask = valid if mask is None else jnp.logical_and(mask, valid)
    return mask


def finite_or_zero(x: jax.Array) -> jax.Array:
    """``x`` with its non-finite entries (NaN, +-inf) replaced by 0.

    The operand of a matmul whose zero weights sit on masked positions: the probability of a
    masked key is exactly 0, but ``0 * NaN`` is NaN, so ``p @ v`` (or ``ds @ k``,
    ``ds^T @ q``, ``p^T @ dO``) would carry garbage from a position a row cannot see into the
    row. Select, don't multiply. Kernels apply it on partially masked tiles only (a FULL tile
    has no masked position; an EMPTY one is skipped). A row that does see a non-finite value
    gets an unspecified result: NaN, or this zero where the value was read through here.
    """
    # The test in float32: Mosaic has no 16-bit is_finite (chips without a bf16 VPU).
    finite = jnp.isfinite(x if jnp.dtype(x.dtype).itemsize >= 4 else x.astype(jnp.float32))
    return jnp.where(finite, x, jnp.zeros_like(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def weighted_sum(spec: str, w: jax.Array, x: jax.Array, precision=None,
                 preferred_element_type=None) -> jax.Array:
    """``jnp.einsum(spec, w, x)`` for weights ``w`` that are exactly 0 on masked pairs
    (probabilities, decay-masked scores), differentiable without letting a row's garbage
    cotangent out: the gradient of ``x`` (a sum over rows, ``w^T dO``) reads the cotangent
    through :func:`finite_or_zero`, since a masked pair's weight is 0 but 0 * NaN is NaN.
    The gradient of ``w`` is the plain one (``dO x^T``, selected by the caller's mask).

    For code differentiated by JAX (the references, the XLA paths); kernels with their own
    backward select and sanitize in place. ``x`` must be finite (:func:`finite_or_zero`).
    """
    return jnp.einsum(spec, w, x, precision=precision,
                      preferred_element_type=preferred_element_type)


def _weighted_sum_fwd(spec, w, x, precision, preferred_element_type):
    return weighted_sum(spec, w, x, precision, preferred_element_type), (w, x)


def _weighted_sum_bwd(spec, precision, preferred_element_type, res, ct):
    w, x = res
    (a, b), out = spec.split("->")[0].split(","), spec.split("->")[1]
    f32 = jnp.float32
    dw = jnp.einsum(f"{out},{b}->{a}", ct, x, precision=precision, preferred_element_type=f32)
    dx = jnp.einsum(f"{a},{out}->{b}", w, finite_or_zero(ct), precision=precision,
                    preferred_element_type=f32)
    return dw.astype(w.dtype), dx.astype(x.dtype)


weighted_sum.defvjp(_weighted_sum_fwd, _weighted_sum_bwd)
