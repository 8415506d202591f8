"""Varying-manual-axes (vma) bookkeeping for code that may run inside ``jax.shard_map``.

Under ``shard_map(check_vma=True)`` loop carries, ``cond`` branches and ``ppermute`` operands
must agree in the mesh axes they vary over. A carry that starts as a constant (zeros, a
replicated initial state) varies over none, while the values flowing into it vary over the
sequence axis and any data or tensor axes. These helpers mark the constant to match; outside
``shard_map`` they are no-ops. One copy, shared by the ops and ``sharding/``.
"""

from __future__ import annotations

import jax


def varying(a) -> frozenset:
    """The manual mesh axes array ``a`` varies over (empty outside shard_map)."""
    return frozenset(getattr(getattr(jax.typeof(a), "mat", None), "varying", ()))


def vary(x, axes: str | tuple[str, ...]):
    """Marks the arrays of pytree ``x`` as varying over ``axes`` (no-op where they already do)."""
    axes = (axes,) if isinstance(axes, str) else tuple(axes)

    def one(a):
        missing = tuple(ax for ax in axes if ax not in varying(a))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(one, x)


def like_vma(x, *refs):
    """``x`` made varying over every manual axis that one of the pytrees ``refs`` varies over."""
    axes: set = set()
    for r in jax.tree.leaves(refs):
        axes |= varying(r)
    return vary(x, tuple(sorted(axes))) if axes else x
