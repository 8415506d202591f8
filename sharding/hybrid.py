"""Sequence-parallel rules by mechanism name, and the plan a model hands its layers.

Each mechanism's sequence-parallel rule lives in that mechanism's own ``sharding/`` module
and registers itself there under the mechanism's name with :func:`register_rule`
(``sharding/api.py``: ``"softmax"`` by ring, striped, zigzag or Ulysses;
``sharding/lasp2.py``: ``"lightning"`` by LASP-2). A mechanism that has no sequence-parallel
form says so with :func:`not_sequence_parallel`, so a model fails at construction with the
reason instead of at the first call.

:class:`HybridParallel` (LASP-2H for MiniMax-01-style hybrids) holds the mesh choice once;
a layer asks it for its attention by mechanism name (``plan.layer("lightning")``) and never
repeats the mesh plumbing. Importing ``sharding`` registers every built-in rule.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from jax.sharding import Mesh

from sharding._common import check_mesh_axes

# mechanism name -> rule(plan, q, k, v, **kwargs)
_RULES: dict[str, Callable[..., Any]] = {}
# mechanism name -> why it has no sequence-parallel form
_NOT_PARALLEL: dict[str, str] = {}

# The softmax rule's per-layer choice; validated here so a bad plan fails at construction.
SOFTMAX_STRATEGIES = ("ring", "striped", "zigzag", "ulysses")


def _check_new(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a rule is registered under a mechanism name, got {name!r}")
    if name in _RULES or name in _NOT_PARALLEL:
        raise ValueError(f"mechanism {name!r} already has a sequence-parallel rule or marker")


def register_rule(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: registers ``rule(plan, q, k, v, **kwargs)`` as the sequence-parallel
    attention of mechanism ``name``.

    ``plan`` is the :class:`HybridParallel` (mesh, axes, per-block impl); q, k, v are global
    [B, T, N, H] arrays sharded along the plan's ``seq_axis``.

    Raises:
      ValueError: an empty name, or a mechanism that already has a rule or marker.

    Example:
      >>> @register_rule("xattn")
      ... def _x(plan, q, k, v, **kw):
      ...     return my_sharded_x(q, k, v, mesh=plan.mesh, seq_axis=plan.seq_axis, **kw)
    """
    _check_new(name)

    def deco(rule: Callable[..., Any]) -> Callable[..., Any]:
        _check_new(name)
        _RULES[name] = rule
        return rule

    return deco


def not_sequence_parallel(name: str, reason: str) -> None:
    """Marks mechanism ``name`` as having no sequence-parallel form, with the reason."""
    _check_new(name)
    if not reason:
        raise ValueError("say why the mechanism has no sequence-parallel form")
    _NOT_PARALLEL[name] = reason


def rules() -> tuple[str, ...]:
    """The mechanism names that have a sequence-parallel rule, sorted."""
    return tuple(sorted(_RULES))


def not_parallel() -> dict[str, str]:
    """Mechanism name -> why it has no sequence-parallel form."""
    return dict(_NOT_PARALLEL)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HybridParallel:
    """How each mechanism of a (hybrid) model is split over a mesh's sequence axis.

    Attributes:
      mesh: the device mesh (may also hold data / tensor axes).
      seq_axis: mesh axis the sequence is split over.
      batch_axis: optional mesh axis (or axes) the batch is split over.
      softmax_strategy: ``"ring"``, ``"striped"``, ``"zigzag"`` or ``"ulysses"`` for softmax
        layers (:func:`sharding.attention`); lightning layers always use LASP-2.
      impl: per-block implementation handed to every rule (``"auto"`` picks per platform).

    Example:
      >>> hp = HybridParallel(mesh=jax.make_mesh((2, 4), ("data", "sp")), batch_axis="data")
      >>> y = hp.layer("lightning")(q, k, v, decay=decay)   # LASP-2
      >>> y = hp.layer("softmax")(q, k, v)                  # causal ring attention
    """

    mesh: Mesh
    seq_axis: str = "sp"
    batch_axis: str | tuple[str, ...] | None = None
    softmax_strategy: str = "ring"
    impl: str = "auto"

    def __post_init__(self) -> None:
        check_mesh_axes(self.mesh, {"seq_axis": self.seq_axis, "batch_axis": self.batch_axis})
        if self.softmax_strategy not in SOFTMAX_STRATEGIES:
            raise ValueError(
                f"softmax_strategy {self.softmax_strategy!r} is not one of {SOFTMAX_STRATEGIES}"
            )
        if not isinstance(self.impl, str):
            raise ValueError(f"impl must be an implementation name such as 'auto', got "
                             f"{self.impl!r}")

    def layer(self, name: str) -> Callable[..., Any]:
        """The sharded attention of mechanism ``name``, from its registered rule.

        Raises:
          ValueError: a mechanism marked not sequence-parallel (with the reason), or one with
            no registered rule (the message lists the known ones).
        """
        if name in _NOT_PARALLEL:
            raise ValueError(f"{name} has no sequence-parallel form: {_NOT_PARALLEL[name]}")
        rule = _RULES.get(name)
        if rule is None:
            raise ValueError(
                f"mechanism {name!r} has no sequence-parallel rule; known: {', '.join(rules())}"
                " (a mechanism registers one with sharding.hybrid.register_rule)"
            )
        return functools.partial(rule, self)
