"""The correctness grid of ``attnlab demo``: every implementation against the reference.

:data:`attnlab.testing.DEMO_CASES` (the demo's subset of the one case grid the tests use:
masks, packed segments, offsets, GQA, soft-capping, rows that see no key); :func:`check_case`
compares one implementation with :func:`attnlab.ops.reference` on one case (out, LSE and the
three gradients, within :data:`attnlab.testing.TOLERANCES`); :func:`merge_check` checks that K/V
chunks merged by log-sum-exp give the whole.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab import ops as _ops
from attnlab.bench.harness import max_abs_err, short_error, within
from attnlab.testing import Case, case_inputs, random_qkv, tolerance

CHECKED = ("out", "lse", "dq", "dk", "dv")


@dataclasses.dataclass(slots=True, kw_only=True)
class CheckResult:
    """Errors of one implementation on one :class:`attnlab.testing.Case` (None: not computed)."""

    impl: str
    case: str
    errors: dict[str, float | None]
    status: str  # "PASS", "FAIL", "n/a" (unsupported) or "error"
    note: str = ""
    seconds: float = 0.0


def _loss_and_grads(impl: str, kwargs: Mapping[str, Any], with_lse: bool, ct_out, ct_lse):
    def loss(q, k, v):
        if with_lse:
            out, lse = _ops.attention(q, k, v, impl=impl, return_residuals=True, **kwargs)
            # A row that sees no key has lse = -inf by contract; it carries no gradient.
            lse_term = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * ct_lse)
        else:
            out, lse = _ops.attention(q, k, v, impl=impl, **kwargs), None
            lse_term = 0.0
        return jnp.sum(out.astype(jnp.float32) * ct_out) + lse_term, (out, lse)

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def _compiled(fn: Callable[..., Any], args: Sequence[Any], options: Mapping[str, Any] | None):
    lowered = jax.jit(fn).lower(*args)
    return lowered.compile(dict(options)) if options else lowered.compile()


# Checks may be compiled from several threads, but they run one at a time: Pallas interpret
# mode keeps global state in its host callbacks and breaks when two kernels run at once.
_RUN_LOCK = threading.Lock()


def check_case(
    impl: str, case: Case, key: jax.Array, *, dtype: Any = jnp.float32,
    plat: str | None = None, compiler_options: Mapping[str, Any] | None = None,
    cache: dict[Any, Any] | None = None,
) -> CheckResult:
    """Checks ``impl`` on ``case`` against the reference: out, lse and (dq, dk, dv).

    The gradient is of ``sum(out * c1) + sum(lse * c2)`` with random cotangents, so the LSE's
    backward is checked too (where the implementation returns it).

    Args:
      impl: a registered implementation name.
      case: the call; its inputs are drawn from ``key``.
      dtype: input dtype; the tolerance comes from :func:`tolerance`.
      plat: platform for support and tolerance (default: the current one).
      compiler_options: XLA options for compiling both sides (e.g. :data:`FAST_COMPILE_CPU`).
      cache: a dict shared across calls with the same (case, key) so that the reference is
        computed once per case, not once per implementation.

    Returns:
      A :class:`CheckResult`; status "n/a" with the reason when ``impl`` does not support the
      call, "error" with the message when it raised.
    """
    plat = plat or _ops.platform()
    q, k, v, kwargs = case_inputs(case, key, dtype)
    impls = _ops.implementations()
    why_lse = _ops.explain(
        q, k, v, impl_names=(impl,), plat=plat, return_residuals=True, **kwargs
    )[impl]
    with_lse = why_lse is None
    if not with_lse:
        why = _ops.explain(q, k, v, impl_names=(impl,), plat=plat, **kwargs)[impl]
        if why is not None or impls[impl].returns_lse:
            return CheckResult(impl=impl, case=case.name, errors=dict.fromkeys(CHECKED),
                               status="n/a", note=why or why_lse)
    kc1, kc2 = jax.random.split(jax.random.fold_in(key, 1))
    ct_out = jax.random.normal(kc1, case.out_shape, jnp.float32)
    ct_lse = jax.random.normal(kc2, (case.b, case.t, case.n), jnp.float32)
    tol = tolerance(dtype, plat)
    t0 = time.perf_counter()
    try:
        ck = (case.name, tuple(np.asarray(jax.random.key_data(key)).ravel().tolist()),
              jnp.dtype(dtype).name, with_lse)
        if cache is not None and ck in cache:
            ref = cache[ck]
        else:
            f = _loss_and_grads("reference", kwargs, with_lse, ct_out, ct_lse)
            exe = _compiled(f, (q, k, v), compiler_options)
            with _RUN_LOCK:
                ref = jax.block_until_ready(exe(q, k, v))
            if cache is not None:
                cache[ck] = ref
        (_, (r_out, r_lse)), r_grads = ref
        f = _loss_and_grads(impl, kwargs, with_lse, ct_out, ct_lse)
        exe = _compiled(f, (q, k, v), compiler_options)
        with _RUN_LOCK:
            (_, (out, lse)), grads = jax.block_until_ready(exe(q, k, v))
    except Exception as e:  # report it, go on to the next case
        return CheckResult(impl=impl, case=case.name, errors=dict.fromkeys(CHECKED),
                           status="error", note=short_error(e), seconds=time.perf_counter() - t0)
    pairs = {"out": (out, r_out), "lse": (lse, r_lse) if with_lse else None,
             "dq": (grads[0], r_grads[0]), "dk": (grads[1], r_grads[1]),
             "dv": (grads[2], r_grads[2])}
    errors: dict[str, float | None] = {}
    bad = []
    for name, pair in pairs.items():
        if pair is None:
            errors[name] = None
            continue
        errors[name] = max_abs_err(*pair)
        if not within(errors[name], tol.get(name), pair[1]):
            bad.append(name)
    note = ("fails on " + ", ".join(bad)) if bad else ("" if with_lse else "returns no LSE")
    return CheckResult(impl=impl, case=case.name, errors=errors,
                       status="FAIL" if bad else "PASS", note=note,
                       seconds=time.perf_counter() - t0)


@dataclasses.dataclass(frozen=True, slots=True)
class MergeResult:
    """Merged-vs-whole errors of :func:`merge_check`."""

    impl: str
    chunks: int
    out_err: float
    lse_err: float
    masked_part_rows: int  # (row, chunk) pairs where a chunk saw no key (lse = -inf)
    passed: bool


def merge_check(
    impl: str, key: jax.Array, *, chunks: int = 3, t: int = 192, n: int = 4, kh: int = 2,
    h: int = 32, compiler_options: Mapping[str, Any] | None = None,
) -> MergeResult:
    """Causal attention over K/V split into ``chunks`` pieces, merged by LSE, vs the whole.

    Each piece is computed by ``impl`` with its global ``kv_offset``, so pieces to the right of
    a query see no key (lse = -inf) and must get weight 0 in :func:`attnlab.ops.merge_n`.
    The whole is the reference.
    """
    if t % chunks:
        raise ValueError(f"t={t} must be a multiple of chunks={chunks}")
    q, k, v = random_qkv(key, 1, t, t, n, kh, h, jnp.float32)
    c = t // chunks

    def parts(q, k, v):
        outs, lses = [], []
        for i in range(chunks):
            o, lse = _ops.attention(
                q, k[:, i * c:(i + 1) * c], v[:, i * c:(i + 1) * c], is_causal=True,
                kv_offset=i * c, return_residuals=True, impl=impl,
            )
            outs.append(o)
            lses.append(lse)
        return jnp.stack(outs), jnp.stack(lses)

    outs, lses = _compiled(parts, (q, k, v), compiler_options)(q, k, v)
    out, lse = jax.jit(_ops.merge_n)(outs, lses)
    r_out, r_lse = _ops.reference(q, k, v, is_causal=True, return_residuals=True)
    tol = tolerance(jnp.float32, _ops.platform())
    oe, le = max_abs_err(out, r_out), max_abs_err(lse, r_lse)
    return MergeResult(
        impl, chunks, oe, le, int(np.sum(~np.isfinite(np.asarray(lses)))),
        within(oe, tol.out, r_out) and within(le, tol.lse, r_lse),
    )
