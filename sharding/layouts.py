"""Token layouts for sequence parallelism: contiguous, striped and zigzag.

A layout says which global tokens sit on which shard when a sequence of length S is split
over P shards of one mesh axis (each shard holds S / P tokens, in the order given here):

* ``"contiguous"``: shard d holds tokens [d S/P, (d+1) S/P). Causal ring attention is
  unbalanced: shard P-1 sees all keys, shard 0 only its own.
* ``"striped"`` (Brandon et al. 2023, Striped Attention): token t sits on shard t mod P, so
  shard d holds d, d + P, d + 2P, ... Every ring step is (nearly) half masked on every shard.
* ``"zigzag"``: the sequence is cut into 2P chunks of S / 2P; shard d holds chunks d and
  2P - 1 - d. Each shard has one early and one late chunk, so causal work is balanced and,
  past the first step, every ring step is exactly half of a block (see ``sharding.ring``).

:func:`permute` puts a global array (sequence on ``axis``) into layout order, so that the
usual ``PartitionSpec(..., "sp", ...)`` sharding of the result gives every shard its tokens;
:func:`unpermute` is its inverse. Masks stay exact because kernels receive the tokens'
original positions (:func:`layout_positions` globally, :func:`shard_positions` inside a
``shard_map``) instead of offsets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "striped", "zigzag")


def length_multiple(layout: str, num_shards: int, *, permute_in_shards: bool = False) -> int:
    """What a global sequence length must be a multiple of to be laid out over P shards.

    P for "contiguous", and for "striped" when the data is put in striped order beforehand
    (:func:`permute`); 2P for "zigzag" (2P chunks, two per shard); P² for "striped" with
    ``permute_in_shards``: :func:`shard_permute` deals each shard's T / P contiguous tokens
    out over the P shards, so T / P must itself be divisible by P.

    Example:
      >>> length_multiple("striped", 8, permute_in_shards=True)
      64
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "zigzag":
        return 2 * num_shards
    if layout == "striped" and permute_in_shards:
        return num_shards * num_shards
    return num_shards


def check_layout(layout: str, length: int, num_shards: int, what: str = "sequence", *,
                 permute_in_shards: bool = False) -> None:
    """Raises ValueError unless ``length`` tokens can be laid out over ``num_shards`` shards
    (the rule is :func:`length_multiple`'s; ``what`` names the sequence in the message).

    Example:
      >>> check_layout("zigzag", 4096, 8)   # needs 4096 % 16 == 0
    """
    parts = length_multiple(layout, num_shards, permute_in_shards=permute_in_shards)
    if num_shards <= 0 or length % parts:
        p = num_shards
        fix = "use a mesh axis of a size that divides it"
        if layout == "zigzag":
            why = f"zigzag cuts it into 2 x axis size chunks, two per shard, for P = {p} shards"
        elif parts != p:
            why = (f"P² for P = {p} shards: the striped layout is made inside shard_map by "
                   "dealing each shard's length / P contiguous tokens out over the P shards")
            fix = (f"put the inputs in striped order beforehand (sharding.layouts.permute; "
                   f"inputs_permuted=True in sharding.attention), which needs a multiple of "
                   f"P = {p} only")
        else:
            why = f"P: each of the P = {p} shards holds an equal block"
        raise ValueError(
            f"{what} length {length} is not divisible by {parts} ({why}); pad the {what} to a "
            f"multiple of {parts} or {fix}"
        )


def _seq_axis(x: jax.Array, axis: int) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    """(axis as a non-negative index, its length, the shape before it, the shape after)."""
    axis = axis % x.ndim
    return axis, x.shape[axis], x.shape[:axis], x.shape[axis + 1 :]


def permute(x: jax.Array, axis: int, layout: str, num_shards: int) -> jax.Array:
    """Reorders the sequence ``axis`` of a global array from token order into ``layout`` order.

    Args:
      x: any array, e.g. [B, S, N, H] or segment ids [B, S]; ``x.shape[axis]`` divisible by
        ``num_shards`` (2 x ``num_shards`` for zigzag).
      axis: the sequence axis.
      layout: "contiguous" (identity), "striped" or "zigzag".
      num_shards: P, the size of the mesh axis the sequence will be split over.

    Returns:
      x with its sequence axis reordered; splitting it into P equal parts gives each shard's
      tokens in the order the shard holds them.

    Example:
      >>> qz = permute(q, 1, "zigzag", 4)
    """
    a, n, pre, post = _seq_axis(x, axis)
    check_layout(layout, n, num_shards)
    if layout == "contiguous":
        return x
    if layout == "striped":  # [S/P, P] -> [P, S/P]: shard d gets t = j P + d
        y = x.reshape(*pre, n // num_shards, num_shards, *post)
        return jnp.swapaxes(y, a, a + 1).reshape(x.shape)
    # zigzag: [2, P, c]; shard d gets chunk d of the first half and chunk P-1-d of the
    # (reversed) second half, i.e. global chunk 2P-1-d.
    y = x.reshape(*pre, 2, num_shards, n // (2 * num_shards), *post)
    first = jax.lax.index_in_dim(y, 0, a, keepdims=False)
    second = jnp.flip(jax.lax.index_in_dim(y, 1, a, keepdims=False), axis=a)
    return jnp.stack([first, second], axis=a + 1).reshape(x.shape)


def unpermute(x: jax.Array, axis: int, layout: str, num_shards: int) -> jax.Array:
    """Inverse of :func:`permute`: layout order back to token order (same arguments)."""
    a, n, pre, post = _seq_axis(x, axis)
    check_layout(layout, n, num_shards)
    if layout == "contiguous":
        return x
    if layout == "striped":
        y = x.reshape(*pre, num_shards, n // num_shards, *post)
        return jnp.swapaxes(y, a, a + 1).reshape(x.shape)
    y = x.reshape(*pre, num_shards, 2, n // (2 * num_shards), *post)
    first = jax.lax.index_in_dim(y, 0, a + 1, keepdims=False)
    second = jnp.flip(jax.lax.index_in_dim(y, 1, a + 1, keepdims=False), axis=a)
    return jnp.stack([first, second], axis=a).reshape(x.shape)


def layout_positions(length: int, layout: str, num_shards: int) -> np.ndarray:
    """Original token positions in layout order: ``permute(arange(length))`` as int32 [length].

    Feed these to RoPE (or any position-dependent layer) when the data is stored permuted.
    """
    check_layout(layout, length, num_shards)
    return np.asarray(permute(np.arange(length, dtype=np.int32), 0, layout, num_shards))


def shard_positions(
    local_length: int, layout: str, index: int | jax.Array, num_shards: int
) -> jax.Array:
    """Original positions [local_length] int32 of the tokens that shard ``index`` holds.

    ``index`` may be traced (``lax.axis_index``); this is how the ring knows a block's
    positions without communicating them.
    """
    idx = jnp.asarray(index, jnp.int32)
    r = jnp.arange(local_length, dtype=jnp.int32)
    if layout == "contiguous":
        return idx * local_length + r
    if layout == "striped":
        return r * num_shards + idx
    if layout == "zigzag":
        c = local_length // 2
        chunk = jnp.where(r < c, idx, 2 * num_shards - 1 - idx)
        return chunk * c + r % c
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


# ----------------------------------------------------------------------------- inside shard_map


def _zigzag_dest(chunk: int, num_shards: int) -> int:
    """The shard that holds global chunk ``chunk`` (of 2P) in the zigzag layout."""
    return chunk if chunk < num_shards else 2 * num_shards - 1 - chunk


def _shard_geometry(
    x: jax.Array, axis: int, layout: str, axis_name: str
) -> tuple[int, int, int, tuple[int, ...], tuple[int, ...]]:
    """(axis, P, L, shape before axis, shape after) of a striped or zigzag shard of length L
    on a P-device axis; raises ValueError for other layouts or a length the layout cannot
    split (striped: L divisible by P; zigzag: L even)."""
    axis, length, pre, post = _seq_axis(x, axis)
    n = jax.lax.axis_size(axis_name)
    if layout not in ("striped", "zigzag"):
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    parts = n if layout == "striped" else 2
    if length % parts:
        why = (f"its tokens are dealt out over the {n} shards of {axis_name!r} (a global "
               f"length divisible by P² = {n * n})" if layout == "striped" else
               f"it is sent as two halves (a global length divisible by 2P = {2 * n})")
        raise ValueError(
            f"shard_permute / shard_unpermute to the {layout} layout: the per-shard sequence "
            f"length {length} is not divisible by {parts}, as {why} needs; pad the sequence"
        )
    return axis, n, length, pre, post


def shard_permute(x: jax.Array, axis: int, layout: str, axis_name: str) -> jax.Array:
    """Contiguous shards -> ``layout`` shards, inside ``shard_map``, by collectives.

    Args:
      x: this shard's contiguous block (sequence on ``axis``, length L).
      axis: the sequence axis; layout: "contiguous", "striped" or "zigzag";
      axis_name: the mesh axis the sequence is split over.

    Returns:
      This shard's block of the layout (what :func:`permute` of the global array would put
      here). Striped is one ``all_to_all``; zigzag is two ``ppermute``\\ s of half blocks.
      Nothing is gathered: each shard sends and receives L tokens.
    """
    if layout == "contiguous":
        return x
    axis, n, length, pre, post = _shard_geometry(x, axis, layout, axis_name)
    if layout == "striped":
        y = x.reshape(*pre, length // n, n, *post)
        y = jax.lax.all_to_all(y, axis_name, axis + 1, axis, tiled=True)  # [n * L/n, 1]
        return y.reshape(x.shape)
    # zigzag: _shard_geometry rejected every other layout
    x0, x1 = jnp.split(x, 2, axis=axis)  # global chunks 2e and 2e + 1
    r0 = jax.lax.ppermute(x0, axis_name, [(e, _zigzag_dest(2 * e, n)) for e in range(n)])
    r1 = jax.lax.ppermute(x1, axis_name, [(e, _zigzag_dest(2 * e + 1, n)) for e in range(n)])
    even = jax.lax.axis_index(axis_name) % 2 == 0  # then chunk d is the even one
    first, second = jnp.where(even, r0, r1), jnp.where(even, r1, r0)
    return jnp.concatenate([first, second], axis=axis)


def shard_unpermute(x: jax.Array, axis: int, layout: str, axis_name: str) -> jax.Array:
    """Inverse of :func:`shard_permute`: ``layout`` shards -> contiguous shards."""
    if layout == "contiguous":
        return x
    axis, n, length, pre, post = _shard_geometry(x, axis, layout, axis_name)
    if layout == "striped":
        # [source e, j, 1] -> [1, j, from shard c]: local token j * n + c comes from shard c.
        y = x.reshape(*pre, n, length // n, 1, *post)
        y = jax.lax.all_to_all(y, axis_name, axis, axis + 2, tiled=True)
        return y.reshape(x.shape)
    # zigzag: _shard_geometry rejected every other layout
    s0, s1 = jnp.split(x, 2, axis=axis)  # chunks d and 2P - 1 - d
    even = jax.lax.axis_index(axis_name) % 2 == 0
    ev, od = jnp.where(even, s0, s1), jnp.where(even, s1, s0)
    r0 = jax.lax.ppermute(ev, axis_name, [(_zigzag_dest(2 * e, n), e) for e in range(n)])
    r1 = jax.lax.ppermute(od, axis_name, [(_zigzag_dest(2 * e + 1, n), e) for e in range(n)])
    return jnp.concatenate([r0, r1], axis=axis)
