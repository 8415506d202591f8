"""Hybrid models over one mesh (LASP-2H): lightning layers by LASP-2, softmax layers by a ring
strategy or Ulysses.

MiniMax-01 interleaves seven lightning layers with one softmax layer. Under sequence
parallelism each kind keeps its own communication pattern on the same ``seq_axis``: a lightning
layer all-gathers one [B, N, H, Hv] memory state per device (independent of the sequence
length), a softmax layer rotates K/V blocks (ring, striped, zigzag) or swaps sequence for heads
(Ulysses). :class:`HybridParallel` holds that choice once, so a model asks it for its layer's
attention by the layer's pattern letter and never repeats the mesh plumbing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from sharding.api import STRATEGIES
from sharding.api import attention as softmax_attention
from sharding.lasp2 import lasp2_attention

_LIGHTNING = ("L", "lightning")
_SOFTMAX = ("S", "softmax")


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
        """The sharded attention of a layer kind: ``"L"``/``"lightning"``, ``"S"``/``"softmax"``."""
        if kind in _LIGHTNING:
            return self.lightning
        if kind in _SOFTMAX:
            return self.softmax
        raise ValueError(
            f"layer kind {kind!r} has no sequence-parallel rule; known: L/lightning (LASP-2), "
            "S/softmax (ring, striped, zigzag, ulysses)"
        )
