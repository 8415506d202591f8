"""What the attention benchmark times: registered implementations and the anchors.

A :class:`Candidate` is ``fn(q, k, v) -> out`` with the mask baked in: one per implementation
registered in :func:`attnlab.ops.implementations` (:func:`attnlab_candidates`), and the anchors
(:func:`anchor_candidates`): jax.nn's XLA and cuDNN attention, and tokamax where it imports.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attnlab import ops as _ops
from attnlab.bench.harness import (
    ANCHOR_CUDNN,
    ANCHOR_XLA,
    TOKAMAX_IMPLS,
    runs_interpreted,
    tokamax_version,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """Something to check and time: ``fn(q, k, v) -> out`` with the mask baked in."""

    name: str
    kind: str  # "attnlab" (a registered implementation) or "anchor"
    fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    unsupported: str | None = None  # why it cannot run this call, if it cannot
    interpreted: bool = False


def registered_names() -> list[str]:
    """Names of every registered attention implementation."""
    return list(_ops.implementations())


def attnlab_candidates(
    names: Sequence[str] | None, q: Any, k: Any, v: Any, *, causal: bool, plat: str
) -> list[Candidate]:
    """Candidates for registered implementations (all of them when ``names`` is None)."""
    impls = _ops.implementations()
    names = list(impls) if names is None else list(names)
    unknown = [n for n in names if n not in impls]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; registered: {sorted(impls)}")
    why = _ops.explain(q, k, v, impl_names=tuple(names), plat=plat, is_causal=causal)
    out = []
    for name in names:
        fn = functools.partial(_ops.attention, is_causal=causal, impl=name)
        out.append(
            Candidate(name, "attnlab", fn, why.get(name), runs_interpreted(impls[name], plat))
        )
    return out


def anchor_candidates(q: Any, *, causal: bool, plat: str, tokamax: bool = True) -> list[Candidate]:
    """The anchors: jax.nn XLA, jax.nn cuDNN (GPU, bf16/fp16) and tokamax (where importable)."""

    def jax_nn(implementation: str) -> Callable[..., jax.Array]:
        def fn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=causal, implementation=implementation
            )

        return fn

    cudnn_why = None
    if plat != "gpu":
        cudnn_why = f"cuDNN needs a CUDA GPU (platform is {plat})"
    elif jnp.dtype(q.dtype).name not in ("bfloat16", "float16"):
        cudnn_why = f"cuDNN attention needs bfloat16 or float16, got {jnp.dtype(q.dtype).name}"
    out = [Candidate(ANCHOR_XLA, "anchor", jax_nn("xla"))]
    if plat == "gpu":
        out.append(Candidate(ANCHOR_CUDNN, "anchor", jax_nn("cudnn"), cudnn_why))
    if tokamax and plat == "gpu" and tokamax_version() is not None:
        import tokamax as tk  # optional: on the GPU machine only

        for impl in TOKAMAX_IMPLS:

            def fn(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = impl) -> jax.Array:
                return tk.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)

            out.append(Candidate(f"tokamax[{impl}]", "anchor", fn))
    return out
