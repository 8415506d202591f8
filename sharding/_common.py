"""Small helpers shared by the sequence-parallel algorithms (private)."""

from __future__ import annotations

import jax

from attnlab.ops._vma import vary, varying

__all__ = ["vary", "varying_axes", "window_pair"]


def varying_axes(axis_name: str, *refs) -> tuple[str, ...]:
    """``axis_name`` plus every manual mesh axis one of ``refs`` (pytrees) varies over."""
    axes = {axis_name}
    for r in jax.tree.leaves(refs):
        axes |= varying(r)
    return tuple(sorted(axes))


def window_pair(left: int | None, right: int | None) -> tuple[int | None, int | None] | None:
    """A MaskSpec's window as ``local_window_size`` (None when there is no window)."""
    return None if left is None and right is None else (left, right)
