"""One implementation registry per op: ``impl=`` names, ``"auto"``, ``"pallas"``, refusals.

Every op (softmax attention, decode, lightning, and the mechanisms to come) declares one
:class:`Registry` in its module, in one statement: the op's name, its argument normalizer,
its ``reference`` implementation, the adapter modules of its other backends, the
per-platform ``"auto"`` order and what ``"pallas"`` means per platform. Each adapter module
(``attnlab/ops/backends/<op>_<backend>.py``) defines one :class:`Implementation` named
``IMPLEMENTATION``: its forward, optional backward and block phases, its own limits
(``unsupported``) and its config class. Nothing else registers anywhere.

``"auto"`` takes the first implementation in the op's per-platform order that supports the
call; a named implementation that cannot compute the call raises ``NotImplementedError``
with its reason, never a silent switch. See ``attnlab/ops/README.md`` for the template.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


def platform() -> str:
    """The platform ops dispatch for: 'cpu', 'gpu' or 'tpu'.

    The platform of the active abstract mesh's device when it names one, else JAX's default
    backend. The abstract mesh is how a program is lowered for a chip this machine does not
    have: under ``jax.sharding.use_abstract_mesh(AbstractMesh(..., abstract_device=
    AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")))`` ops dispatch
    for TPU (the Pallas TPU kernels run through Mosaic, not in interpret mode), and
    ``jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))`` gives the module a TPU would
    compile. ``lowering_platforms`` alone cannot do this: it is only known after tracing,
    when the dispatch has been made. A concrete mesh (``jax.set_mesh``) names its own
    devices' platform, which is the default backend's.
    """
    device = jax.sharding.get_abstract_mesh().abstract_device
    p = jax.default_backend() if device is None else device.platform
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


# op name -> its Registry (filled as each op module declares its one Registry).
_OPS: dict[str, Registry] = {}


def registry(op: str) -> Registry:
    """The :class:`Registry` of op ``op`` ("attention", "decode", "lightning_attention", ...)."""
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(sorted(_OPS))}")
    return _OPS[op]


def ops() -> tuple[str, ...]:
    """The names of every op that declared a registry, sorted."""
    return tuple(sorted(_OPS))


# The usual per-platform choices: the platform's kernel first, the XLA path everywhere.
KERNEL_FIRST: dict[str, tuple[str, ...]] = {
    "gpu": ("pallas_triton", "xla"),
    "tpu": ("pallas_tpu", "xla"),
    "cpu": ("xla",),
}
PALLAS: dict[str, str] = {"gpu": "pallas_triton", "tpu": "pallas_tpu", "cpu": "pallas_triton"}


def backends(stem: str, *names: str) -> dict[str, str]:
    """Implementation name -> its adapter module, by the convention
    ``attnlab/ops/backends/<stem>_<name without "pallas_">.py``.

    Example:
      >>> backends("decode", "xla", "pallas_triton")["pallas_triton"]
      'attnlab.ops.backends.decode_triton'
    """
    return {n: f"attnlab.ops.backends.{stem}_{n.removeprefix('pallas_')}" for n in names}


def _no_limits(q, k, v, a: Any, plat: str) -> str | None:
    return None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Implementation:
    """One way of computing an op.

    Attributes:
      name: the ``impl=`` name ("xla", "pallas_triton", ...).
      description: one line for ``attnlab info``.
      fn: ``fn(q, k, v, args)`` -> the op's outputs (the op's docstring says which).
      unsupported: ``unsupported(q, k, v, args, platform)`` -> None if the backend computes
        the call, else a sentence naming the argument that it cannot take.
      platforms: where it runs ("cpu" meaning Pallas interpret mode for a kernel); empty:
        everywhere.
      dtypes: the input dtypes it takes; empty: every dtype the op takes.
      config_cls: the config class ``config=`` must be an instance of; None: takes no config.
      bwd: optional backward of one block given the global output and LSE (softmax ops):
        ``bwd(q, k, v, out, lse, dout, dlse, args) -> (dq, dk, dv)``.
      phases: optional ``phases(q, k, v, args)`` -> the backend's own block phases for
        sequence parallelism, or None where the generic ones apply (linear-attention ops).
      returns_lse: the forward's second output is the exact log-sum-exp (softmax ops).
      returns_entropy: the forward can also return the attention entropy.
    """

    name: str
    description: str
    fn: Callable[..., Any]
    unsupported: Callable[..., str | None] = _no_limits
    platforms: tuple[str, ...] = ()
    dtypes: tuple[Any, ...] = ()
    config_cls: type | None = None
    bwd: Callable[..., Any] | None = None
    phases: Callable[..., Any] | None = None
    returns_lse: bool = True
    returns_entropy: bool = False

    def why_not(self, q, k, v, a: Any, plat: str, need: str | None = None) -> str | None:
        """None if this implementation computes the call, else the reason."""
        if need is not None and getattr(self, need) is None:
            return f"{self.name} has no {need} pass"
        if getattr(a, "return_entropy", False) and not self.returns_entropy:
            return f"{self.name} does not compute the attention entropy (return_entropy=True)"
        if self.platforms and plat not in self.platforms:
            chips = " or ".join(p.upper() for p in self.platforms if p != "cpu")
            cpu = " (or interpreted on CPU)" if "cpu" in self.platforms else ""
            return f"{self.name} runs on {chips}{cpu}, not on {plat}"
        if self.dtypes and q.dtype not in self.dtypes:
            *rest, last = [jnp.dtype(d).name for d in self.dtypes]
            names = f"{', '.join(rest)} or {last}" if rest else last
            return f"{self.name} takes {names} inputs, got {q.dtype}"
        why = self.unsupported(q, k, v, a, plat)
        if why is not None:
            return why
        config = getattr(a, "config", None)
        if config is not None:
            got = type(config).__name__
            if self.config_cls is None:
                return f"{self.name} takes no config, got {got}"
            if not isinstance(config, self.config_cls):
                return f"config must be a {self.config_cls.__name__} for {self.name}, got {got}"
        return None


class Registry:
    """Named implementations of one op, with the per-platform ``"auto"`` order.

    Args:
      op: the op's name, for messages.
      normalize: ``normalize(q, k, v, **kwargs)`` -> the op's validated argument tuple
        (raises ``ValueError`` on bad or unknown arguments); used by :meth:`explain` and
        :meth:`auto_choice`.
      reference: the op's definition, registered as ``"reference"``.
      adapters: implementation name -> module defining ``IMPLEMENTATION`` of that name
        (:func:`backends` writes the table);
        imported on first lookup (a module that fails to import is recorded, and
        :meth:`explain` and :meth:`choose` say why).
      auto_order: platform -> implementation names, fastest first (default: the platform's
        kernel, then ``"xla"``).
      pallas: what ``impl="pallas"`` means on each platform (default: the platform's kernel).
    """

    def __init__(
        self, op: str, *, normalize: Callable[..., Any], reference: Implementation,
        adapters: Mapping[str, str], auto_order: Mapping[str, tuple[str, ...]] = KERNEL_FIRST,
        pallas: Mapping[str, str] = PALLAS,
    ) -> None:
        self.op = op
        self.normalize = normalize
        self.adapters = dict(adapters)
        self.auto_order = dict(auto_order)
        self.pallas = dict(pallas)
        self._impls: dict[str, Implementation] = {reference.name: reference}
        self._import_errors: dict[str, str] = {}
        self._loaded = False
        if op in _OPS:
            raise ValueError(f"op {op!r} already has a registry")
        _OPS[op] = self

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for name, mod_name in self.adapters.items():
            try:
                impl = importlib.import_module(mod_name).IMPLEMENTATION
            except ImportError as e:  # a backend whose kernels cannot import here
                self._import_errors[name] = f"{mod_name} did not import ({e})"
                continue
            if impl.name != name:
                raise ValueError(f"{mod_name} defines {impl.name!r}, registered as {name!r}")
            self.register(impl)

    def register(self, impl: Implementation) -> None:
        """Adds (or replaces) an implementation; research code may register its own."""
        self._impls[impl.name] = impl

    def implementations(self, need: str | None = None) -> dict[str, Implementation]:
        """name -> Implementation, of those that have ``need`` ("bwd", "phases") if given."""
        self._load()
        return {n: i for n, i in self._impls.items() if need is None or getattr(i, need)}

    def choose(
        self, q, k, v, a: Any, impl: str, plat: str | None = None, need: str | None = None
    ) -> Implementation:
        """Resolves ``impl`` ("auto", "pallas" or a name) for normalized arguments ``a``."""
        self._load()
        if not isinstance(impl, str):
            raise ValueError(
                f"impl must be a name, 'auto' or 'pallas', got {impl!r} of type "
                f"{type(impl).__name__}; registered: {sorted(self._impls)}"
            )
        plat = plat or platform()
        if impl == "pallas":
            impl = self.pallas.get(plat, "pallas_triton")
        if impl == "auto":
            reasons = []
            for name in self.auto_order.get(plat, ("xla",)):
                cand = self._impls.get(name)
                if cand is None:
                    continue
                why = cand.why_not(q, k, v, a, plat, need)
                if why is None:
                    return cand
                reasons.append(f"{name}: {why}")
            raise ValueError(
                f"no {self.op} implementation supports this call: " + "; ".join(reasons)
            )
        if impl in self._import_errors:
            raise NotImplementedError(f"impl={impl!r} is not available: "
                                      f"{self._import_errors[impl]}")
        if impl not in self._impls:
            raise ValueError(
                f"unknown impl {impl!r}; expected 'auto', 'pallas' or one of "
                f"{sorted(self._impls)}"
            )
        cand = self._impls[impl]
        why = cand.why_not(q, k, v, a, plat, need)
        if why is not None:
            raise NotImplementedError(f"impl={impl!r} does not support this call: {why}")
        return cand

    def explain(
        self, q, k, v, *, impl_names: tuple[str, ...] | None = None, plat: str | None = None,
        need: str | None = None, **kwargs: Any,
    ) -> dict[str, str | None]:
        """For each implementation, None if it supports ``op(q, k, v, **kwargs)``, else why not.

        Arrays may be ``jax.ShapeDtypeStruct``\\ s; ``attnlab info`` prints this.
        """
        a = self.normalize(q, k, v, **kwargs)
        self._load()
        plat = plat or platform()
        names = impl_names or (*self._impls, *self._import_errors)
        unknown = [n for n in names if n not in self._impls and n not in self._import_errors]
        if unknown:
            raise ValueError(
                f"unknown impl name(s) {unknown} in impl_names; registered: {sorted(self._impls)}"
            )
        out: dict[str, str | None] = {}
        for n in names:
            if n in self._impls:
                out[n] = self._impls[n].why_not(q, k, v, a, plat, need)
            elif n in self._import_errors:
                out[n] = self._import_errors[n]
        return out

    def auto_choice(self, q, k, v, *, plat: str | None = None, **kwargs: Any) -> str:
        """The name ``impl="auto"`` resolves to for ``op(q, k, v, **kwargs)`` on ``plat``."""
        return self.choose(q, k, v, self.normalize(q, k, v, **kwargs), "auto", plat).name
