"""One implementation registry per op: ``impl=`` names, ``"auto"``, ``"pallas"``, refusals.

Every op (softmax attention, decode, and the mechanisms to come) keeps a :class:`Registry`
of :class:`Implementation`\\ s. ``"auto"`` takes the first implementation in the op's
per-platform order that supports the call; a named implementation that cannot compute the
call raises ``NotImplementedError`` with its reason, never a silent switch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax


def platform() -> str:
    """The platform ops dispatch for: 'cpu', 'gpu' or 'tpu'."""
    p = jax.default_backend()
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


@dataclasses.dataclass(frozen=True, slots=True)
class Implementation:
    """One way of computing an op.

    fn(q, k, v, args) -> the op's outputs (for attention (out, lse), or (out, lse, entropy)
    when ``args.return_entropy``, only for implementations with ``returns_entropy``).
    ``unsupported(q, k, v, args, platform)`` returns None if the call is supported, else a
    sentence naming the argument that is not.
    """

    name: str
    fn: Callable[..., tuple[jax.Array, ...]]
    unsupported: Callable[..., str | None]
    description: str
    returns_lse: bool = True
    returns_entropy: bool = False

    def why_not(self, q, k, v, a: Any, plat: str) -> str | None:
        """None if this implementation computes the call, else the reason (capabilities first)."""
        if getattr(a, "return_entropy", False) and not self.returns_entropy:
            return f"{self.name} does not compute the attention entropy (return_entropy=True)"
        return self.unsupported(q, k, v, a, plat)


class Registry:
    """Named implementations of one op, with the per-platform ``"auto"`` order.

    Args:
      op: the op's name, for messages.
      auto_order: platform -> implementation names, fastest first.
      pallas_by_platform: what ``impl="pallas"`` means on each platform.
      loader: called before every lookup, to import optional kernel modules lazily.
    """

    def __init__(
        self, op: str, auto_order: dict[str, tuple[str, ...]],
        pallas_by_platform: dict[str, str], loader: Callable[[], None] | None = None,
    ) -> None:
        self.op = op
        self.auto_order = auto_order
        self.pallas_by_platform = pallas_by_platform
        self._loader = loader
        self._impls: dict[str, Implementation] = {}

    def _load(self) -> None:
        if self._loader is not None:
            self._loader()

    def register(self, impl: Implementation) -> None:
        self._impls[impl.name] = impl

    def implementations(self) -> dict[str, Implementation]:
        self._load()
        return dict(self._impls)

    def choose(self, q, k, v, a: Any, impl: str, plat: str | None = None) -> Implementation:
        """Resolves ``impl`` (possibly "auto" or "pallas") to a registered implementation."""
        self._load()
        plat = plat or platform()
        if impl == "pallas":
            impl = self.pallas_by_platform.get(plat, "pallas_triton")
        if impl == "auto":
            reasons = []
            for name in self.auto_order.get(plat, ("xla",)):
                cand = self._impls.get(name)
                if cand is None:
                    continue
                why = cand.why_not(q, k, v, a, plat)
                if why is None:
                    return cand
                reasons.append(f"{name}: {why}")
            raise ValueError(
                f"no {self.op} implementation supports this call: " + "; ".join(reasons)
            )
        if impl not in self._impls:
            raise ValueError(
                f"unknown impl {impl!r}; expected 'auto', 'pallas' or one of "
                f"{sorted(self._impls)}"
            )
        cand = self._impls[impl]
        why = cand.why_not(q, k, v, a, plat)
        if why is not None:
            raise NotImplementedError(f"impl={impl!r} does not support this call: {why}")
        return cand

    def explain(
        self, q, k, v, a: Any, plat: str | None = None, names: tuple[str, ...] | None = None
    ) -> dict[str, str | None]:
        """For each implementation, None if it supports the call, else why not."""
        self._load()
        plat = plat or platform()
        names = names or tuple(self._impls)
        return {n: self._impls[n].why_not(q, k, v, a, plat) for n in names if n in self._impls}

    def auto_choice(self, q, k, v, a: Any, plat: str | None = None) -> str:
        """The name ``impl="auto"`` resolves to for this call on ``plat``."""
        return self.choose(q, k, v, a, "auto", plat).name
