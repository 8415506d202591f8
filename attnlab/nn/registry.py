"""Attention mechanisms by name, so a model's ``layer_pattern`` can name one per layer.

A mechanism is an NNX module class with this contract (every attention module follows it):

  * ``Mechanism(cfg: Config, *, layer_idx: int, rngs: nnx.Rngs, parallel=None)``;
  * ``y, cache = module(x, *, positions, segment_ids=None, cache=None)`` with x [B, T, D],
    positions [B, T] int32 (global token positions), segment_ids [B, T] int32 or None, and
    ``cache`` None (training / full forward) or the pytree from ``init_cache`` (generation:
    the module reads it, appends the T new tokens and returns the updated cache);
  * sequence parallelism: ``parallel`` is None (single device) or a
    :class:`sharding.hybrid.HybridParallel`, kept as a static attribute. Without a cache the
    module then computes its attention with ``parallel.layer(mechanism_name)(q, k, v, ...)``
    on global [B, T, N, H] arrays, so the sharded rule of a mechanism lives in ``sharding/``
    beside the others and nothing in the model or the trainer names it; with a cache it
    raises (:func:`check_no_cache`: generation is single-device);
  * ``module.init_cache(batch_size, max_len, dtype)`` -> an empty cache pytree;
  * ``Mechanism.cache_bytes_per_token(cfg, dtype_bytes=2)`` -> float (0 for constant-state
    mechanisms such as lightning, whose fixed state is ``state_bytes``);
  * it subclasses :class:`Mechanism`, whose ``__init__`` checks ``cfg.attention_impl``
    against the mechanism's op and keeps ``cfg``, ``layer_idx`` and ``parallel``;

Registering: ``@register("S", "softmax", ops=("attention", "decode"), experiment=None)`` on
the class, once. The letter is what ``layer_pattern`` uses (letters exist only here); the
name is what the CLI's ``--attention`` flag, error messages and the mechanism's other pieces
use: its sequence-parallel rule is registered under the same name in ``sharding/``
(:func:`sharding.hybrid.register_rule`, or :func:`sharding.hybrid.not_sequence_parallel`).
``ops`` names the ``attnlab.ops`` registries the module computes with (each has a
``reference`` and fast implementations); ``experiment`` names the paper reproduction script
``experiments/<experiment>.py``, or is None while there is none yet (the README's feature
table then says "none yet"). ``tests/test_mechanisms.py`` walks this registry and checks all
five pieces of every mechanism.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax.numpy as jnp
from flax import nnx

_BY_LETTER: dict[str, type] = {}
_BY_NAME: dict[str, type] = {}


def register(
    letter: str, name: str, *, ops: tuple[str, ...], experiment: str | None = None
) -> Callable[[type], type]:
    """Class decorator: makes the mechanism available to ``layer_pattern`` as ``letter``.

    Args:
      letter: one character, the mechanism's pattern letter.
      name: the mechanism's name, shared by its sharding rule and its experiment.
      ops: the ``attnlab.ops`` registries (op names) the module computes with.
      experiment: ``experiments/<experiment>.py``, or None: no reproduction yet.
    """
    if len(letter) != 1:
        raise ValueError(f"a mechanism letter is one character, got {letter!r}")
    if not ops:
        raise ValueError(f"mechanism {name!r} must name the attnlab.ops op(s) it computes with")

    def deco(cls: type) -> type:
        for table, key in ((_BY_LETTER, letter), (_BY_NAME, name)):
            if key in table and table[key] is not cls:
                raise ValueError(f"mechanism {key!r} is already registered to {table[key]}")
            table[key] = cls
        cls.mechanism_letter = letter
        cls.mechanism_name = name
        cls.mechanism_ops = tuple(ops)
        cls.mechanism_experiment = experiment
        return cls

    return deco


def mechanisms() -> dict[str, str]:
    """Letter -> name of every registered mechanism."""
    return {letter: cls.mechanism_name for letter, cls in sorted(_BY_LETTER.items())}


def get(letter_or_name: str) -> Any:
    """The mechanism class for a pattern letter or a name; ValueError naming the known ones."""
    cls = _BY_LETTER.get(letter_or_name) or _BY_NAME.get(letter_or_name)
    if cls is None:
        known = ", ".join(f"{k}={v}" for k, v in mechanisms().items())
        raise ValueError(f"unknown attention mechanism {letter_or_name!r}; known: {known}")
    return cls


def check_impl(impl: str, implementations: Iterable[str], what: str) -> None:
    """ValueError unless ``impl`` is "auto", "pallas" or one of ``implementations`` (of
    ``what``, e.g. "an attention", for the message)."""
    known = {"auto", "pallas", *implementations}
    if impl not in known:
        raise ValueError(
            f"attention_impl={impl!r} is not {what} implementation; choose one of "
            f"{sorted(known)}"
        )


class Mechanism(nnx.Module):
    """Base class of the registered modules: the contract's common start.

    A subclass names its op's implementations (``_implementations``, a function returning
    their names, and ``impl_kind`` for messages, e.g. "an attention");
    ``super().__init__(cfg, layer_idx=layer_idx, parallel=parallel)`` checks
    ``cfg.attention_impl`` against them (``check_impl``) and keeps ``cfg``,
    ``layer_idx`` and ``parallel`` as static attributes (part of the graph definition, not
    parameters).
    """

    _implementations: Callable[[], Iterable[str]]
    impl_kind: str

    def __init__(self, cfg: Any, *, layer_idx: int, parallel: Any = None) -> None:
        check_impl(cfg.attention_impl, type(self)._implementations(), self.impl_kind)
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.parallel = parallel


def check_inputs(x: Any, d_model: int, positions: Any, segment_ids: Any) -> tuple[int, int]:
    """(B, T) of a mechanism's input x [B, T, D]; ValueError naming the argument when x is not
    [B, T, d_model] or positions / segment_ids (each may be None) are not [B, T] integers."""
    if jnp.ndim(x) != 3 or jnp.shape(x)[-1] != d_model:
        raise ValueError(f"x must have shape [batch, seq, {d_model}], got {jnp.shape(x)}")
    b, t, _ = jnp.shape(x)
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
        if arr is None:
            continue
        if jnp.shape(arr) != (b, t):
            raise ValueError(f"{name} must have shape ({b}, {t}), got {jnp.shape(arr)}")
        if not jnp.issubdtype(jnp.result_type(arr), jnp.integer):
            raise ValueError(f"{name} must be an integer array (int32), got dtype "
                             f"{jnp.result_type(arr)}")
    return b, t


def check_no_cache(parallel: Any, cache: Any, mechanism: str) -> None:
    """ValueError when a sequence-parallel module (``parallel`` set) is given a cache."""
    if parallel is not None and cache is not None:
        raise ValueError(
            f"{mechanism} attention was built with parallel= (sequence parallelism over mesh "
            f"axis {getattr(parallel, 'seq_axis', '?')!r}) but was given a cache; generation is "
            "single-device: build the model without parallel (attnlab.train.load_run does) "
            "to decode"
        )
