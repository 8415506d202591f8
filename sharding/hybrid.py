"""Hybrid models over one mesh (LASP-2H): lightning layers by LASP-2, softmax layers by a ring
strategy or Ulysses.

MiniMax-01 interleaves seven lightning layers with one softmax layer. Under sequence
parallelism each kind keeps its own communication pattern on the same ``seq_axis``: a lightning
layer all-gathers one [B, N, H, Hv] memory state per device (independent of the sequence
length), a softmax layer rotates K/V blocks (ring, striped, zigzag) or swaps sequence for heads
(Ulysses). :class:`HybridParallel` holds that choice once, so a model asks it for its layer's
attention by the layer's pattern letter and never repeats the mesh plumbing.

Each mechanism's sequence-parallel rule is registered here by pattern letter and name
(:func:`register_rule`), beside the lightning and softmax rules below; a new mechanism adds
its rule in its own ``sharding/`` module with the decorator and touches nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from sharding.api import STRATEGIES
from sharding.api import attention as softmax_attention
from sharding.lasp2 import lasp2_attention

# layer kind (pattern letter or mechanism name) -> rule(plan, q, k, v, **kwargs)
_RULES: dict[str, Callable[..., Any]] = {}


def register_rule(*kinds: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: registers ``rule(plan, q, k, v, **kwargs)`` as the sequence-parallel
    attention of the layer kinds ``kinds`` (a pattern letter and a mechanism name).

    ``plan`` is the :class:`HybridParallel` (mesh, axes, per-block impl); q, k, v are global
    [B, T, N, H] arrays sharded along the plan's ``seq_axis``.

    Raises:
      ValueError: no kinds, or a kind that already has a rule.

    Example:
      >>> @register_rule("X", "xattn")
      ... def _x(plan, q, k, v, **kw):
      ...     return my_sharded_x(q, k, v, mesh=plan.mesh, seq_axis=plan.seq_axis, **kw)
    """
    if not kinds:
        raise ValueError("register_rule needs at least one layer kind (a letter and a name)")

    def deco(rule: Callable[..., Any]) -> Callable[..., Any]:
        taken = [k for k in kinds if k in _RULES]
        if taken:
            raise ValueError(f"layer kind(s) {taken} already have a sequence-parallel rule")
        _RULES.update(dict.fromkeys(kinds, rule))
        return rule

    return deco


def rules() -> tuple[str, ...]:
    """The layer kinds that have a sequence-parallel rule, sorted."""
    return tuple(sorted(_RULES))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HybridParallel:
    """How each layer kind of a hybrid model is split over a mesh's sequence axis.

    Attributes:
      mesh: the device mesh (may also hold data / tensor axes).
      seq_axis: mesh axis the sequence is split over.
      batch_axis: optional mesh axis (or axes) the batch is split over.
      softmax_strategy: ``"ring"``, ``"striped"``, ``"zigzag"`` or ``"ulysses"`` for softmax
        layers (:func:`sharding.attention`); lightning layers always use LASP-2.
      impl: per-block implementation handed to both (``"auto"`` picks per platform).

    Example:
      >>> hp = HybridParallel(mesh=jax.make_mesh((2, 4), ("data", "sp")), batch_axis="data")
      >>> y = hp.layer("L")(q, k, v, decay=decay)   # LASP-2
      >>> y = hp.layer("S")(q, k, v)                # causal ring attention
    """

    mesh: Mesh
    seq_axis: str = "sp"
    batch_axis: str | tuple[str, ...] | None = None
    softmax_strategy: str = "ring"
    impl: str = "auto"

    def __post_init__(self) -> None:
        if self.seq_axis not in self.mesh.axis_names:
            raise ValueError(
                f"seq_axis {self.seq_axis!r} is not an axis of the mesh {self.mesh.axis_names}; "
                "name one of its axes"
            )
        if self.softmax_strategy not in STRATEGIES:
            raise ValueError(
                f"softmax_strategy {self.softmax_strategy!r} is not one of {STRATEGIES}"
            )

    def lightning(self, q: jax.Array, k: jax.Array, v: jax.Array, *, decay: Any,
                  **kwargs: Any) -> Any:
        """Lightning attention of global [B, T, N, H] arrays by LASP-2 (kwargs as the op)."""
        return lasp2_attention(q, k, v, decay=decay, mesh=self.mesh, seq_axis=self.seq_axis,
                               batch_axis=self.batch_axis, impl=self.impl, **kwargs)

    def softmax(self, q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = True,
                **kwargs: Any) -> Any:
        """Softmax attention of global arrays by ``softmax_strategy`` (causal by default)."""
        return softmax_attention(q, k, v, mesh=self.mesh, seq_axis=self.seq_axis,
                                 strategy=self.softmax_strategy, batch_axis=self.batch_axis,
                                 is_causal=is_causal, impl=self.impl, **kwargs)

    def layer(self, kind: str) -> Callable[..., Any]:
        """The sharded attention of a layer kind (pattern letter or mechanism name), from its
        registered rule: ``"L"``/``"lightning"`` by LASP-2, ``"S"``/``"softmax"`` by
        ``softmax_strategy``.

        Raises:
          ValueError: a kind with no registered rule (the message lists the known ones).
        """
        rule = _RULES.get(kind)
        if rule is None:
            raise ValueError(
                f"layer kind {kind!r} has no sequence-parallel rule; known: {', '.join(rules())}"
                " (a mechanism registers one with sharding.hybrid.register_rule)"
            )
        return functools.partial(rule, self)


@register_rule("L", "lightning")
def _lightning_rule(plan: HybridParallel, q: jax.Array, k: jax.Array, v: jax.Array,
                    **kwargs: Any) -> Any:
    return plan.lightning(q, k, v, **kwargs)


@register_rule("S", "softmax")
def _softmax_rule(plan: HybridParallel, q: jax.Array, k: jax.Array, v: jax.Array,
                  **kwargs: Any) -> Any:
    return plan.softmax(q, k, v, **kwargs)
