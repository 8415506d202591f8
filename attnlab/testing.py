"""What "agrees with the reference" means: one tolerance table, one case grid, random inputs.

Every implementation's tests (``tests/``) and the benchmarks' correctness checks
(``attnlab bench``, ``attnlab demo``) take their numbers and cases from here, so each is written
once. The module sits beside ``attnlab.bench`` and ``attnlab.train`` and imports jax and numpy
only.

Shapes use the attnlab letters: B batch, T queries, S keys, N query heads, K kv heads, H head dim.

Example:
  >>> from attnlab.testing import ATTENTION_CASES, case_inputs, tolerance
  >>> q, k, v, kwargs = case_inputs(ATTENTION_CASES[1], jax.random.key(0))
  >>> tol = tolerance(q.dtype)  # tol.out, tol.lse, tol.dq, tol.dk, tol.dv, tol.grad_rtol
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# XLA options for programs compiled to be checked, not timed: on CPU, XLA's backend
# optimisations only cost compile time there (about a third of it for the interpreted Pallas
# kernels, most of it for tiny models); the numerics are unchanged.
FAST_COMPILE_CPU = {"xla_backend_optimization_level": 0}

# ----------------------------------------------------------------------------- tolerances


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Tolerance:
    """Max abs error against the float32 reference, per output, for one input dtype.

    ``out``, ``lse``, ``dq``, ``dk``, ``dv`` are absolute bounds for arrays of unit scale (an
    attention output is a convex combination of rows of v ~ N(0, 1)). ``grad_rtol`` is the
    relative part of the gradient bound: gradients of a sum over a long sequence grow to
    10-30, where an absolute bound alone is wrong.

    Two ways the table is applied:

    * tests, element by element: ``|x - ref| <= atol + rtol * |ref|`` with ``atol`` the field
      and ``rtol = grad_rtol`` for gradients (0 for out and lse);
    * benchmarks, one number per array: ``max|x - ref| <= atol * max(1, max|ref|)``.
    """

    out: float
    lse: float
    dq: float
    dk: float
    dv: float
    grad_rtol: float = 0.0

    def get(self, name: str) -> float:
        """The absolute bound for ``name`` in {"out", "lse", "dq", "dk", "dv"}."""
        if name not in ("out", "lse", "dq", "dk", "dv"):
            raise ValueError(f"no tolerance named {name!r}; expected out, lse, dq, dk or dv")
        return getattr(self, name)


# Keyed by input dtype name. Why each number:
# * float32: the kernels and the reference differ only in summation order (blocked online
#   softmax vs one softmax), a few float32 ulps of O(1) values; 2e-5 leaves 10x margin.
#   dq and dk go through ds = p * (dp - delta), a difference of nearly equal terms, which
#   loses about 5x more than dv = p^T do: 1e-4 vs 5e-5.
# * bfloat16 (8-bit mantissa, ulp 2^-7 at 1): kernels round p to bf16 before the PV matmul,
#   so out is off by up to ~2 ulps of values up to ~4: 3e-2; lse is computed in float32 from
#   bf16-rounded logits: 2e-2. dq/dk (8e-2) again looser than dv (5e-2), as for float32.
#   grad_rtol 1e-2 (~1 ulp relative) for gradients of magnitude 10-30 at GPU-sized shapes.
# * float16 (11-bit mantissa, ulp 2^-10): the same reasoning 8x tighter than bfloat16:
#   out/lse 5e-3, dq/dk 1e-2, dv 8e-3, grad_rtol 2e-3 (two ulps relative).
TOLERANCES: Mapping[str, Tolerance] = {
    "float32": Tolerance(out=2e-5, lse=2e-5, dq=1e-4, dk=1e-4, dv=5e-5, grad_rtol=0.0),
    "bfloat16": Tolerance(out=3e-2, lse=2e-2, dq=8e-2, dk=8e-2, dv=5e-2, grad_rtol=1e-2),
    "float16": Tolerance(out=5e-3, lse=5e-3, dq=1e-2, dk=1e-2, dv=8e-3, grad_rtol=2e-3),
}
# Compiled float32 on GPU/TPU: matmuls at default precision run in TF32 (10-bit mantissa) or
# bf16 passes, over rows of thousands of keys, so a float32 kernel or reference there is about
# as exact as float16 with longer sums: 3e-3 for values, dq/dk 1e-2, dv 5e-3, and float16's
# relative gradient part (the same mantissa).
TF32_TOLERANCE = Tolerance(out=3e-3, lse=3e-3, dq=1e-2, dk=1e-2, dv=5e-3, grad_rtol=2e-3)


def tolerance(dtype: Any, plat: str = "cpu") -> Tolerance:
    """The :class:`Tolerance` for inputs of ``dtype`` computed on ``plat`` ('cpu', 'gpu', 'tpu').

    Args:
      dtype: the input dtype (float32, bfloat16 or float16).
      plat: where the compared arrays were computed; float32 off CPU gets
        :data:`TF32_TOLERANCE`.

    Returns:
      The :class:`Tolerance` of that dtype.

    Raises:
      ValueError: no tolerance is defined for ``dtype``.

    Example:
      >>> tolerance(jnp.bfloat16).dq
      0.08
    """
    name = jnp.dtype(dtype).name
    if name not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {name}; expected one of {sorted(TOLERANCES)}")
    if name == "float32" and plat != "cpu":
        return TF32_TOLERANCE
    return TOLERANCES[name]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LinearTolerance:
    """Error bounds for linear (lightning) attention, relative to the largest reference entry.

    Outputs and states of linear attention are unnormalized sums over up to T tokens, so their
    scale grows with T and H: the check is ``max|x - ref| <= bound * max|ref|`` (with
    ``max|ref|`` taken as at least 1) for ``values`` (o and the final state) and ``grads``
    (dq, dk, dv and the initial state's gradient).
    """

    values: float
    grads: float


# float32: summation order only (chunked vs token-by-token), as for softmax. bfloat16 and
# float16: the chunked forms round their inputs, the carried chunk states and the [C, C] score
# tile to 8 / 11 bits before matmuls with float32 accumulation: a few ulps relative (2^-8,
# 2^-11) of the largest entry. Values 2e-2 / 4e-3; gradients pass through two more rounded
# matmuls (dA, dS): 3e-2 / 6e-3. (The xla path and the kernels measured 2e-3 to 7e-3 in
# bfloat16 on the test grid.)
LINEAR_TOLERANCES: Mapping[str, LinearTolerance] = {
    "float32": LinearTolerance(values=2e-5, grads=5e-5),
    "bfloat16": LinearTolerance(values=2e-2, grads=3e-2),
    "float16": LinearTolerance(values=4e-3, grads=6e-3),
}


def linear_tolerance(dtype: Any) -> LinearTolerance:
    """The :class:`LinearTolerance` for inputs of ``dtype``; ValueError for other dtypes."""
    name = jnp.dtype(dtype).name
    if name not in LINEAR_TOLERANCES:
        raise ValueError(
            f"no tolerance for dtype {name}; expected one of {sorted(LINEAR_TOLERANCES)}"
        )
    return LINEAR_TOLERANCES[name]


# ----------------------------------------------------------------------------- inputs


def random_qkv(
    key: jax.Array, b: int, t: int, s: int, n: int, kh: int, h: int, dtype: Any = jnp.float32,
    hv: int | None = None, vh: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random normal q [B, T, N, H], k [B, S, K, H], v [B, S, Kv, Hv] (never zeros or ones).

    Drawn in float32 and cast to ``dtype``; ``hv`` defaults to ``h`` and ``vh`` (the value
    head count) to ``kh``.

    Example:
      >>> q, k, v = random_qkv(jax.random.key(0), 2, 40, 40, 4, 2, 32)
    """
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, t, n, h), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, s, kh, h), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, s, vh or kh, hv or h), jnp.float32).astype(dtype)
    return q, k, v


def random_segments(key: jax.Array, b: int, length: int, n_docs: int) -> jax.Array:
    """Sorted random document ids [B, length] int32 in [0, n_docs) (packed documents).

    Example:
      >>> ids = random_segments(jax.random.key(0), 2, 40, 3)
    """
    return jnp.sort(jax.random.randint(key, (b, length), 0, n_docs), axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- case grid


@dataclasses.dataclass(frozen=True, slots=True)
class Case:
    """One softmax attention call of the shared grid: shapes, keyword arguments, documents.

    ``kwargs`` are passed to :func:`attnlab.ops.attention` as they are; ``segments > 0`` adds
    random packed-document ids with that many ids (one array when T == S, else a pair).
    ``kh``/``h`` are the key head count and head dim; values have ``vh`` heads of ``hv``
    (both default to the keys').
    """

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        """[B, T, N, Hv] of the attention output."""
        return (self.b, self.t, self.n, self.hv or self.h)

    name: str
    _: dataclasses.KW_ONLY
    description: str = ""
    b: int = 2
    t: int = 40
    s: int = 40
    n: int = 4
    kh: int = 2
    h: int = 32
    hv: int | None = None  # value head dim (default h)
    vh: int | None = None  # value head count (default kh)
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    segments: int = 0

    def __repr__(self) -> str:
        return self.name


# Small shapes (T, S <= 72, H = 32) on purpose: interpreted kernels run every case on CPU, and
# kernels are given small tiles so that these lengths still span several (edge, full, empty).
ATTENTION_CASES: tuple[Case, ...] = (
    Case("full", description="no mask, GQA 4 query heads over 2 kv heads"),
    Case("causal", description="causal", kwargs={"is_causal": True}),
    Case("causal_mqa", description="causal, 4 query heads sharing 1 kv head", kh=1,
         kwargs={"is_causal": True}),
    Case("mha_cross", description="24 queries over 72 keys, no mask, one kv head per head",
         t=24, s=72, kh=4),
    Case("window", description="two-sided window: 7 keys left, 5 right",
         kwargs={"local_window_size": (7, 5)}),
    Case("causal_window", description="causal sliding window of 10 keys",
         kwargs={"is_causal": True, "local_window_size": (9, 0)}),
    Case("offsets", description="24 queries at positions 40..63 over 64 keys, causal", t=24,
         s=64, kwargs={"is_causal": True, "q_offset": 40, "kv_offset": 0}),
    Case("segments", description="3 packed documents per row (segment ids), causal",
         segments=3, kwargs={"is_causal": True}),
    Case("segments_full", description="4 packed documents per row, no causal mask",
         segments=4),
    Case("softcap", description="logits soft-cap 3.0 (Gemma 2), causal",
         kwargs={"is_causal": True, "logits_soft_cap": 3.0}),
    Case("all_masked_rows", description="keys start at 8: queries 0..7 see no key", t=16,
         s=32, kwargs={"is_causal": True, "q_offset": 0, "kv_offset": 8}),
    Case("ragged", description="33 queries over 45 keys, 6 heads over 3, causal", t=33, s=45,
         n=6, kh=3, kwargs={"is_causal": True}),
    # Head dims kernels pad inside (not a power of two), value dims and head counts of their own.
    Case("head_dim_40", description="head dim 40, causal", h=40, kwargs={"is_causal": True}),
    Case("head_dim_80", description="head dim 80, 3 packed documents, causal", h=80,
         segments=3, kwargs={"is_causal": True}),
    Case("head_dim_96", description="head dim 96, causal sliding window of 10 keys", h=96,
         kwargs={"is_causal": True, "local_window_size": (9, 0)}),
    Case("mla_dims", description="MLA: q/k head dim 192, v head dim 128, causal", n=2, kh=2,
         h=192, hv=128, kwargs={"is_causal": True}),
    Case("kv_heads_differ", description="4 q heads over 1 k head and 2 v heads (v dim 48), "
         "causal", kh=1, vh=2, hv=48, kwargs={"is_causal": True}),
)
_BY_NAME = {c.name: c for c in ATTENTION_CASES}


def cases(*names: str) -> tuple[Case, ...]:
    """The grid's cases called ``names``, in that order; ValueError for an unknown name.

    Example:
      >>> cases("causal", "segments")
      (causal, segments)
    """
    unknown = [n for n in names if n not in _BY_NAME]
    if unknown:
        raise ValueError(f"no attention case {unknown}; the grid has {sorted(_BY_NAME)}")
    return tuple(_BY_NAME[n] for n in names)


# The demo's "every implementation vs the reference" table: one case for each kind of mask,
# head sharing and row with no key.
DEMO_CASES: tuple[Case, ...] = cases(
    "full", "causal", "causal_window", "segments", "offsets", "causal_mqa", "softcap",
    "all_masked_rows",
)


def case_inputs(
    case: Case, key: jax.Array, dtype: Any = jnp.float32
) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, Any]]:
    """(q, k, v, kwargs) for ``case``: random inputs and fresh random segment ids if it asks.

    Example:
      >>> q, k, v, kwargs = case_inputs(ATTENTION_CASES[0], jax.random.key(0), jnp.bfloat16)
      >>> out = attnlab.ops.attention(q, k, v, **kwargs)
    """
    k1, k2, k3 = jax.random.split(key, 3)
    q, k, v = random_qkv(k1, case.b, case.t, case.s, case.n, case.kh, case.h, dtype,
                         hv=case.hv, vh=case.vh)
    kwargs = dict(case.kwargs)
    if case.segments:
        qs = random_segments(k2, case.b, case.t, case.segments)
        if case.t == case.s:
            kwargs["segment_ids"] = qs
        else:
            kwargs["segment_ids"] = (qs, random_segments(k3, case.b, case.s, case.segments))
    return q, k, v, kwargs
