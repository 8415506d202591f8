"""Small helpers shared by the sequence-parallel algorithms (private)."""

from __future__ import annotations

import jax


def _varying(a) -> frozenset:
    return frozenset(getattr(getattr(jax.typeof(a), "mat", None), "varying", ()))


def varying_axes(axis_name: str, *refs) -> tuple[str, ...]:
    """``axis_name`` plus every manual mesh axis one of ``refs`` (pytrees) varies over."""
    axes = {axis_name}
    for r in jax.tree.leaves(refs):
        axes |= _varying(r)
    return tuple(sorted(axes))


def vary(x, axes: str | tuple[str, ...]):
    """Marks arrays as device-varying over ``axes`` (a no-op for axes they already vary over).

    Loop carries, ``cond`` branches and ``ppermute`` operands must agree in their varying axes
    under ``shard_map(check_vma=True)``: constants and inputs a caller passes replicated
    (positions, say) vary over none, while results vary over the sequence axis and any data or
    tensor axes of the mesh.
    """
    axes = (axes,) if isinstance(axes, str) else tuple(axes)

    def one(a):
        missing = tuple(ax for ax in axes if ax not in _varying(a))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(one, x)


def window_pair(left: int | None, right: int | None) -> tuple[int | None, int | None] | None:
    """A MaskSpec's window as ``local_window_size`` (None when there is no window)."""
    return None if left is None and right is None else (left, right)
