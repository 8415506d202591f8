"""Small helpers shared by the sequence-parallel algorithms (private)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attnlab.ops._registry import platform
from attnlab.ops._vma import vary, varying
from attnlab.ops.attention import args_from_kwargs

__all__ = [
    "check_bsn_axes", "check_mesh_axes", "check_softmax_call", "default_check_vma",
    "mesh_shard_map", "vary", "varying_axes",
]


def varying_axes(axis_name: str, *refs) -> tuple[str, ...]:
    """``axis_name`` plus every manual mesh axis one of ``refs`` (pytrees) varies over."""
    axes = {axis_name}
    for r in jax.tree.leaves(refs):
        axes |= varying(r)
    return tuple(sorted(axes))


def check_mesh_axes(mesh: Mesh, axes: dict[str, str | tuple[str, ...] | None],
                    sizes: dict[str, tuple[int, str | tuple[str, ...] | None]] | None = None
                    ) -> None:
    """Raises ValueError unless every named axis is one of ``mesh``'s, used once, and every
    size is divisible by its axes.

    Args:
      axes: argument name -> axis name, tuple of names, or None (unused), e.g.
        ``{"seq_axis": "sp", "batch_axis": None}``.
      sizes: what -> (size, axis or axes), e.g. ``{"sequence length T": (t, "sp")}``.
    """
    if not isinstance(mesh, (Mesh, AbstractMesh)):  # abstract: lowering for another platform
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((4,), ('sp',))), got "
            f"{mesh!r} of type {type(mesh).__name__}"
        )
    names = tuple(mesh.axis_names)
    used: list[str] = []
    for arg, ax in axes.items():
        if isinstance(ax, str):
            group: tuple[Any, ...] = (ax,)
        elif ax is None and arg != "seq_axis":
            group = ()
        elif isinstance(ax, (tuple, list)) and arg == "batch_axis":
            group = tuple(ax)
        else:
            group = (ax,)
        for a in group:
            if not isinstance(a, str):
                allowed = {"seq_axis": "", "batch_axis": ", a tuple of them or None"}
                raise ValueError(
                    f"{arg} must be the name of a mesh axis (one of {names})"
                    f"{allowed.get(arg, ' or None')}, got {ax!r}"
                )
            if a not in names:
                raise ValueError(
                    f"{arg}={a!r} is not an axis of the mesh, whose axes are {names}; pass one "
                    "of those names"
                )
            used.append(a)
    if len(set(used)) != len(used):
        raise ValueError(f"the mesh axes of {list(axes)} must be distinct, got {used}")
    for what, (size, ax) in (sizes or {}).items():
        group = (ax,) if isinstance(ax, str) else (ax or ())
        parts = 1
        for a in group:
            parts *= mesh.shape[a]
        if size % parts:
            fix = "use" if "heads" in what else "pad it to"
            raise ValueError(
                f"{what}={size} is not divisible by the {ax!r} mesh axis of size {parts}; "
                f"{fix} a multiple of {parts}"
            )


def check_bsn_axes(
    mesh: Mesh, seq_axis: str, batch_axis: str | None, head_axis: str | None, *,
    seq: tuple[str, int], batch: int, heads: int, kv_heads: int | None = None,
    v_heads: int | None = None,
) -> None:
    """:func:`check_mesh_axes` for [B, seq, N, ...] arrays split over (batch_axis, seq_axis,
    head_axis): ``seq`` is (what, length), e.g. ``("sequence length T", t)``; ``kv_heads``
    (K) and ``v_heads`` (value heads, where they differ from K) are checked against
    ``head_axis`` too when given."""
    sizes = {seq[0]: (seq[1], seq_axis), "batch B": (batch, batch_axis),
             "heads N": (heads, head_axis)}
    if kv_heads is not None:
        sizes["kv heads K"] = (kv_heads, head_axis)
    if v_heads is not None:
        sizes["v heads"] = (v_heads, head_axis)
    check_mesh_axes(
        mesh, {"seq_axis": seq_axis, "batch_axis": batch_axis, "head_axis": head_axis}, sizes
    )


def check_softmax_call(q: Any, k: Any, v: Any, **kwargs: Any) -> None:
    """Checks a sequence-parallel softmax call on the caller's global arrays, as
    :func:`attnlab.ops.attention` would (ranks, shapes, dtypes, masks, segment ids, static
    scale and soft-cap, offsets), so that a mistake is reported with the shapes the caller
    gave, not a shard's or ``shard_map``'s.

    Raises:
      ValueError: naming the argument, what was given and what is allowed.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(getattr(x, "shape", ())) != 4:
            raise ValueError(
                f"{name} must be [batch, seq, heads, head_dim], got shape "
                f"{getattr(x, 'shape', None)}"
            )
    args_from_kwargs(q, k, v, **kwargs)


def default_check_vma(impl: str) -> bool:
    """``shard_map``'s ``check_vma`` where no Pallas kernel can run per block (pallas_call
    outputs carry no varying-axes types yet): impl "xla"/"reference", or "auto" on CPU."""
    if impl.startswith("pallas"):
        return False
    return not (impl == "auto" and platform() != "cpu")


def mesh_shard_map(fn: Callable[..., Any], mesh: Mesh, args: tuple[Any, ...],
                   in_specs: tuple[Any, ...], out_specs: Any, check_vma: bool) -> Any:
    """``jax.shard_map(fn, ...)(*args)``, first placing ``args`` by ``in_specs`` on a mesh
    with explicit axes (shard_map wants them placed there)."""
    if any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        def place(spec, sub):
            return jax.tree.map(lambda x: jax.reshard(x, NamedSharding(mesh, spec)), sub)

        args = jax.tree.map(place, tuple(in_specs), tuple(args),
                            is_leaf=lambda s: isinstance(s, P))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=check_vma)(*args)
