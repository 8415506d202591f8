"""Small helpers shared by the sequence-parallel algorithms (private)."""

from __future__ import annotations

import jax


def vary(x, axis_name: str):
    """Marks arrays as device-varying over ``axis_name`` (a no-op for ones that already are).

    Loop carries and ``ppermute`` operands must be varying under ``shard_map(check_vma=True)``;
    inputs a caller passes replicated (positions, say) are not.
    """

    def one(a):
        if a is None:
            return None
        aval = jax.typeof(a)
        mat = getattr(aval, "mat", None)
        if mat is None or axis_name in mat.varying:
            return a
        return jax.lax.pcast(a, axis_name, to="varying")

    return jax.tree.map(one, x)


def window_pair(left: int | None, right: int | None) -> tuple[int | None, int | None] | None:
    """A MaskSpec's window as ``local_window_size`` (None when there is no window)."""
    return None if left is None and right is None else (left, right)
