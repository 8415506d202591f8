"""Benchmark and correctness harness for attention (used by ``attnlab bench`` and ``attnlab demo``).

The rules follow ``BENCHMARKS.md``:

* FLOPs: the forward counts ``4 * B * S * S * N * H`` (two matmuls of 2 FLOPs per multiply-add),
  halved when causal (T == S assumed); a forward+backward ("fwdbwd") counts 3.5x the forward.
* Time: jit-compiled, two warm-up calls, then the median of ``repeats`` calls, each wrapped in
  ``jax.block_until_ready``; inputs are random normal, never zeros.
* Every implementation, the anchors included, is checked against :func:`attnlab.ops.reference`
  before it is timed; one that fails is reported as ``FAILED`` and not timed.
* Ratios are to the anchors timed in the same process on the same inputs: cuDNN and XLA through
  ``jax.nn.dot_product_attention``, and tokamax where it can be imported.

Implementations are discovered through :func:`attnlab.ops.implementations`; only the anchors are
named here.

Shapes use the attnlab letters: B batch, T queries, S keys, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab import ops as _ops

GiB = 1 << 30
PASSES = ("fwd", "fwdbwd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# Anchor names (the only implementation names this module knows).
ANCHOR_XLA = "jax.nn[xla]"
ANCHOR_CUDNN = "jax.nn[cudnn]"
TOKAMAX_IMPLS = ("mosaic", "triton")

# Row statuses written to the JSON. INEXACT is for anchors only: an anchor outside our
# tolerance is still timed (the ratios need it), with the error in its note.
OK, FAILED, SKIPPED, UNSUPPORTED, ERROR = "ok", "FAILED", "skipped", "unsupported", "error"
INEXACT = "inexact"


# ----------------------------------------------------------------------------- tolerances


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Tolerance:
    """Max abs error allowed against the float32 reference, per output, for one input dtype.

    Errors are compared with ``tol * max(1, max|reference|)`` so the same table works for
    outputs of unit scale and for larger gradients.
    """

    out: float
    lse: float
    dq: float
    dk: float
    dv: float

    def get(self, name: str) -> float:
        """The tolerance for ``name`` in {"out", "lse", "dq", "dk", "dv"}."""
        return getattr(self, name)


# dq and dk go through ds = p * (dp - delta), which loses more in low precision than dv = p^T do.
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(out=2e-5, lse=2e-5, dq=1e-4, dk=1e-4, dv=5e-5),
    "bfloat16": Tolerance(out=3e-2, lse=2e-2, dq=8e-2, dk=8e-2, dv=5e-2),
    "float16": Tolerance(out=5e-3, lse=5e-3, dq=1e-2, dk=1e-2, dv=8e-3),
}
# On GPU/TPU, float32 matmuls at default precision run in TF32 / bf16 passes, so a compiled
# float32 kernel is only as exact as that.
_TF32 = Tolerance(out=3e-3, lse=3e-3, dq=1e-2, dk=1e-2, dv=5e-3)


def tolerance(dtype: Any, plat: str = "cpu") -> Tolerance:
    """The :class:`Tolerance` for inputs of ``dtype`` on platform ``plat`` ('cpu', 'gpu', 'tpu')."""
    name = jnp.dtype(dtype).name
    if name not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {name}; expected one of {sorted(TOLERANCES)}")
    if name == "float32" and plat != "cpu":
        return _TF32
    return TOLERANCES[name]


def max_abs_err(x: Any, ref: Any) -> float:
    """Max |x - ref| as a float; equal infinities count as 0, a NaN counts as +inf."""
    a = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    with np.errstate(invalid="ignore"):
        d = np.where(a == b, 0.0, np.abs(a - b))
    d = np.where(np.isnan(d), np.inf, d)
    return float(d.max()) if d.size else 0.0


def _scale(ref: Any) -> float:
    r = np.abs(np.asarray(jnp.asarray(ref, jnp.float32)))
    r = r[np.isfinite(r)]
    return max(1.0, float(r.max())) if r.size else 1.0


def within(err: float, tol: float, ref: Any) -> bool:
    """True when ``err <= tol * max(1, max|ref|)``."""
    return err <= tol * _scale(ref)


# ----------------------------------------------------------------------------- FLOPs and timing


def attention_flops(
    batch: int, seq: int, heads: int, head_dim: int, *, causal: bool, pass_: str = "fwd"
) -> float:
    """FLOPs of softmax attention as counted in BENCHMARKS.md (T == S).

    Args:
      batch, seq, heads, head_dim: B, S, N, H.
      causal: halves the count (only the lower triangle is computed).
      pass_: "fwd", or "fwdbwd" for forward + backward together (3.5x the forward).

    Returns:
      The FLOP count as a float.

    Raises:
      ValueError: unknown ``pass_``.

    Example:
      >>> attention_flops(1, 1024, 8, 128, causal=False)  # 4 * 1024**2 * 8 * 128
      4294967296.0
    """
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    flops = 4.0 * batch * seq * seq * heads * head_dim
    if causal:
        flops /= 2
    return flops * (3.5 if pass_ == "fwdbwd" else 1.0)


def tflops_per_s(flops: float, ms: float) -> float:
    """Throughput in TFLOP/s for ``flops`` done in ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


@dataclasses.dataclass(frozen=True, slots=True)
class Timing:
    """Result of :func:`time_call`: the median and every timed call, in milliseconds."""

    median_ms: float
    times_ms: tuple[float, ...]
    first_call_s: float  # the first warm-up call: compilation + one run


def time_call(fn: Callable[..., Any], *args: Any, repeats: int = 20, warmup: int = 2) -> Timing:
    """Times ``fn(*args)``: ``warmup`` untimed calls, then the median of ``repeats`` timed calls.

    Each call is wrapped in ``jax.block_until_ready`` so the time covers the device work, not
    just the dispatch. ``fn`` should be jit-compiled; the first warm-up call compiles it.

    Example:
      >>> time_call(jax.jit(f), x, repeats=20).median_ms
    """
    if repeats < 1 or warmup < 1:
        raise ValueError(f"need repeats >= 1 and warmup >= 1, got {repeats} and {warmup}")
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), tuple(times), first)


def temp_memory_bytes(fn: Callable[..., Any], *args: Any) -> int | None:
    """XLA's temporary buffer size for ``jax.jit(fn)(*args)``, from the compiled executable.

    ``args`` may be ``jax.ShapeDtypeStruct``s, so nothing is allocated. Returns None where the
    backend gives no memory analysis.
    """
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes)


# ----------------------------------------------------------------------------- candidates


def runs_interpreted(impl: _ops.Implementation, plat: str) -> bool:
    """True when ``impl`` would run through the Pallas interpreter on ``plat`` (far too slow to
    time; it is checked for correctness only).

    An implementation may say so itself with an ``interpreted(plat) -> bool`` attribute;
    otherwise Pallas kernels (names starting with "pallas") are interpreted on CPU.
    """
    flag = getattr(impl, "interpreted", None)
    if callable(flag):
        return bool(flag(plat))
    return plat == "cpu" and impl.name.startswith("pallas")


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """Something to check and time: ``fn(q, k, v) -> out`` with the mask baked in."""

    name: str
    kind: str  # "attnlab" (a registered implementation) or "anchor"
    fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    unsupported: str | None = None  # why it cannot run this call, if it cannot
    interpreted: bool = False


def tokamax_version() -> str | None:
    """tokamax's version if ``import tokamax`` works here, else None."""
    try:
        mod = importlib.import_module("tokamax")
    except Exception:  # any import failure means not available
        return None
    return str(getattr(mod, "__version__", "unknown"))


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


# ----------------------------------------------------------------------------- bench attention


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class BenchConfig:
    """What ``attnlab bench attention`` measures.

    Attributes:
      shapes: sequence lengths S (T == S).
      batch_tokens: B * S; B = batch_tokens // S for each shape (ignored when ``batch`` is set).
      batch: a fixed B for every shape instead of ``batch_tokens // S``.
      heads, kv_heads, head_dim: N, K (default N), H.
      dtype: "bfloat16", "float16" or "float32".
      causal: the causal flags to run.
      passes: subset of ("fwd", "fwdbwd").
      bwd_causal_only: run "fwdbwd" for causal calls only (as the BENCHMARKS.md table).
      impls: registered implementation names, or None for all that support the call.
      exclude: registered names to leave out when ``impls`` is None.
      anchors: also time jax.nn (xla, cudnn) and tokamax.
      repeats, warmup: timed and untimed calls per measurement.
      max_ref_bytes: the reference is not timed when B*N*S*S*4 bytes exceed this.
      max_logits_bytes: jax.nn XLA is not timed when its B*N*S*S logits exceed this.
      check_max_s: the correctness check crops S to this when the full check would not fit.
      max_check_bytes: the check runs at full S only while 1*N*S*S*4 bytes stay below this.
      seed: PRNG seed of the random inputs.
    """

    shapes: tuple[int, ...]
    batch_tokens: int = 32768
    batch: int | None = None
    heads: int = 16
    kv_heads: int | None = None
    head_dim: int = 128
    dtype: str = "bfloat16"
    causal: tuple[bool, ...] = (False, True)
    passes: tuple[str, ...] = PASSES
    bwd_causal_only: bool = False
    impls: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    anchors: bool = True
    repeats: int = 20
    warmup: int = 2
    max_ref_bytes: int = 2 * GiB
    max_logits_bytes: int = 8 * GiB
    check_max_s: int = 2048
    max_check_bytes: int = 1 * GiB
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.shapes or any(s <= 0 for s in self.shapes):
            raise ValueError(f"shapes must be positive sequence lengths, got {self.shapes}")
        if self.batch is None:
            bad = [s for s in self.shapes if self.batch_tokens % s or self.batch_tokens < s]
            if bad:
                raise ValueError(
                    f"--batch-tokens {self.batch_tokens} is not a multiple of S={bad}; every "
                    "shape must divide batch-tokens (B = batch_tokens // S)"
                )
        elif self.batch <= 0:
            raise ValueError(f"batch must be positive, got {self.batch}")
        if self.heads <= 0 or self.head_dim <= 0:
            raise ValueError(f"heads and head_dim must be positive, got {self.heads}, "
                             f"{self.head_dim}")
        if self.heads % self.n_kv_heads:
            raise ValueError(
                f"heads={self.heads} is not a multiple of kv_heads={self.n_kv_heads}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        bad_passes = [p for p in self.passes if p not in PASSES]
        if bad_passes or not self.passes:
            raise ValueError(f"passes must be a non-empty subset of {PASSES}, got {self.passes}")
        if not self.causal:
            raise ValueError("causal must name at least one flag")
        if self.repeats < 1 or self.warmup < 1:
            raise ValueError(f"need repeats >= 1 and warmup >= 1, got {self.repeats}, "
                             f"{self.warmup}")

    @property
    def n_kv_heads(self) -> int:
        """K: the number of key/value heads."""
        return self.kv_heads or self.heads

    def batch_for(self, s: int) -> int:
        """B for sequence length ``s``."""
        return self.batch if self.batch is not None else self.batch_tokens // s

    def groups(self) -> list[tuple[int, bool, str]]:
        """The (S, causal, pass) combinations to run, in order."""
        out = []
        for s in self.shapes:
            for causal in self.causal:
                for p in self.passes:
                    if p == "fwdbwd" and self.bwd_causal_only and not causal:
                        continue
                    out.append((s, causal, p))
        return out


@dataclasses.dataclass(slots=True, kw_only=True)
class Row:
    """One measurement.

    ``status``: "ok" (checked, then timed); "FAILED" (outside tolerance vs the reference: not
    timed); "inexact" (an anchor outside tolerance: timed anyway); "skipped" (not timed, the
    note says why); "unsupported" (the implementation cannot compute this call); "error" (it
    raised; the note has the message).
    """

    impl: str
    kind: str
    S: int
    B: int
    causal: bool
    pass_: str
    ms: float | None = None
    tflops: float | None = None
    ratio_cudnn: float | None = None
    ratio_xla: float | None = None
    max_abs_err: float | None = None
    grad_err: dict[str, float] | None = None
    check_S: int | None = None
    status: str = OK
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON-ready dict (``pass_`` is written as "pass")."""
        d = dataclasses.asdict(self)
        d["pass"] = d.pop("pass_")
        return d


def random_qkv(
    key: jax.Array, b: int, t: int, s: int, n: int, kh: int, h: int, dtype: Any
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random normal q [B,T,N,H], k [B,S,K,H], v [B,S,K,H] in ``dtype`` (never zeros)."""
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (b, t, n, h), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, s, kh, h), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, s, kh, h), jnp.float32).astype(dtype)
    return q, k, v


def grad_fn(
    fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """``(q, k, v, ct) -> (dq, dk, dv)`` of ``sum(fn(q, k, v) * ct)``: the timed forward+backward.

    The cotangent is an argument, not a closure, so a large one is not baked into the program.
    """

    def loss(q: jax.Array, k: jax.Array, v: jax.Array, ct: jax.Array) -> jax.Array:
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def short_error(e: BaseException) -> str:
    """The exception's type, its message's first line and, for a multi-line message (a
    traceback from a callback, say), its last line, where the cause usually is."""
    msg = [m for m in str(e).strip().splitlines() if m.strip()]
    if not msg:
        return type(e).__name__
    text = msg[0][:200] + (f" ... {msg[-1].strip()[:200]}" if len(msg) > 1 else "")
    return f"{type(e).__name__}: {text}"


def _skip_reason(c: Candidate, cfg: BenchConfig, b: int, s: int, itemsize: int) -> str | None:
    n = cfg.heads
    if c.interpreted:
        return "runs in Pallas interpret mode on this platform: checked by tests/demo, not timed"
    if c.name == "reference" and b * n * s * s * 4 > cfg.max_ref_bytes:
        return (f"reference not timed: its [B,N,T,S] f32 logits need "
                f"{b * n * s * s * 4 / GiB:.1f} GiB > {cfg.max_ref_bytes / GiB:.1f} GiB")
    if c.name == ANCHOR_XLA and b * n * s * s * itemsize > cfg.max_logits_bytes:
        return (f"jax.nn xla not timed: its S x S logits need "
                f"{b * n * s * s * itemsize / GiB:.1f} GiB > {cfg.max_logits_bytes / GiB:.1f} GiB")
    return None


StepCallback = Callable[[int, int, str], None]
RowCallback = Callable[[Row], None]


def select_candidates(
    cfg: BenchConfig, q: Any, k: Any, v: Any, *, causal: bool, plat: str
) -> list[Candidate]:
    """The candidates of one (S, causal) call: with ``cfg.impls`` None, every registered
    implementation that supports the call; else the named ones (an unsupported one gets a row
    saying why); then the anchors."""
    cands = attnlab_candidates(cfg.impls, q, k, v, causal=causal, plat=plat)
    if cfg.impls is None:
        cands = [c for c in cands if c.unsupported is None and c.name not in cfg.exclude]
    if cfg.anchors:
        cands += anchor_candidates(q, causal=causal, plat=plat)
    return cands


def count_steps(cfg: BenchConfig) -> int:
    """How many (S, causal, pass, candidate) steps :func:`bench_attention` will report."""
    plat = _ops.platform()
    dt = DTYPES[cfg.dtype]
    total = 0
    for s, causal, _ in cfg.groups():
        q = jax.ShapeDtypeStruct((1, s, cfg.heads, cfg.head_dim), dt)
        kv = jax.ShapeDtypeStruct((1, s, cfg.n_kv_heads, cfg.head_dim), dt)
        total += len(select_candidates(cfg, q, kv, kv, causal=causal, plat=plat))
    return total


def bench_attention(
    cfg: BenchConfig,
    *,
    on_step: StepCallback | None = None,
    on_row: RowCallback | None = None,
    on_group: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Checks, then times, every candidate for each (S, causal, pass) of ``cfg``.

    Args:
      cfg: what to run.
      on_step: called as ``on_step(done, total, label)`` before each candidate and once at the end.
      on_row: called with each finished :class:`Row`.
      on_group: called with all rows so far after each (S, causal, pass) group (to save partial
        results: a run killed at its time limit keeps what it measured).

    Returns:
      The rows, in order, with ratios filled in per group.
    """
    plat = _ops.platform()
    dtype = DTYPES[cfg.dtype]
    tol = tolerance(dtype, plat)
    itemsize = jnp.dtype(dtype).itemsize
    total = count_steps(cfg)
    done = 0
    rows: list[Row] = []
    key = jax.random.key(cfg.seed)
    inputs: dict[int, tuple[jax.Array, ...]] = {}
    for s, causal, pass_ in cfg.groups():
        b = cfg.batch_for(s)
        if s not in inputs:
            inputs.clear()  # one shape's inputs at a time: they can be large
            key, k1, k2 = jax.random.split(key, 3)
            q, k, v = random_qkv(k1, b, s, s, cfg.heads, cfg.n_kv_heads, cfg.head_dim, dtype)
            ct = jax.random.normal(k2, q.shape, jnp.float32).astype(dtype)
            inputs[s] = (q, k, v, ct)
        q, k, v, ct = inputs[s]
        cands = select_candidates(cfg, q, k, v, causal=causal, plat=plat)

        # The check: batch 1, and S cropped when the reference at full S would not fit.
        check_s = s if cfg.heads * s * s * 4 <= cfg.max_check_bytes else min(s, cfg.check_max_s)
        qc, kc, vc = q[:1, :check_s], k[:1, :check_s], v[:1, :check_s]
        args, check_args = (q, k, v), (qc, kc, vc)
        if pass_ == "fwdbwd":
            args, check_args = (*args, ct), (*check_args, ct[:1, :check_s])
        ref_fn = functools.partial(_ops.reference, is_causal=causal)
        ref_vals: tuple[jax.Array, ...] | None = None

        group: list[Row] = []
        for c in cands:
            if on_step:
                on_step(done, total, f"S={s} {'causal' if causal else 'full'} {pass_}: {c.name}")
            done += 1
            row = Row(impl=c.name, kind=c.kind, S=s, B=b, causal=causal, pass_=pass_)
            group.append(row)
            if c.unsupported is not None:
                row.status, row.note = UNSUPPORTED, c.unsupported
                _emit(row, on_row)
                continue
            skip = _skip_reason(c, cfg, b, s, itemsize)
            if skip is not None and (c.interpreted or c.name == ANCHOR_XLA):
                row.status, row.note = SKIPPED, skip
                _emit(row, on_row)
                continue
            f = jax.jit(c.fn if pass_ == "fwd" else grad_fn(c.fn))
            try:
                if ref_vals is None:
                    rf = ref_fn if pass_ == "fwd" else grad_fn(ref_fn)
                    ref_vals = _as_tuple(jax.jit(rf)(*check_args))
                got = _as_tuple(f(*check_args))
                row.check_S = check_s
                names = ("out",) if pass_ == "fwd" else ("dq", "dk", "dv")
                errs = {n: max_abs_err(g, r) for n, g, r in zip(names, got, ref_vals, strict=True)}
                row.max_abs_err = max(errs.values())
                if pass_ == "fwdbwd":
                    row.grad_err = errs
                bad = [n for n, g in zip(names, ref_vals, strict=True)
                       if not within(errs[n], tol.get(n), g)]
                if bad:
                    row.note = "check failed on " + ", ".join(
                        f"{n} (err {errs[n]:.2e} > tol {tol.get(n):.0e})" for n in bad
                    )
                    if c.kind != "anchor":
                        row.status = FAILED
                        _emit(row, on_row)
                        continue
                    row.status = INEXACT
                if skip is not None:
                    row.status, row.note = SKIPPED, skip
                    _emit(row, on_row)
                    continue
                # When the check ran at the timed shapes, it was the first warm-up call.
                same = b == 1 and check_s == s
                warmup = max(1, cfg.warmup - 1) if same else cfg.warmup
                timing = time_call(f, *args, repeats=cfg.repeats, warmup=warmup)
            except Exception as e:  # one broken candidate must not end the run
                row.status, row.note = ERROR, short_error(e)
                _emit(row, on_row)
                continue
            finally:
                del f
            row.ms = timing.median_ms
            flops = attention_flops(b, s, cfg.heads, cfg.head_dim, causal=causal, pass_=pass_)
            row.tflops = tflops_per_s(flops, timing.median_ms)
            _emit(row, on_row)
        _fill_ratios(group)
        rows += group
        if on_group:
            on_group(rows)
    if on_step:
        on_step(total, total, "done")
    return rows


def _emit(row: Row, on_row: RowCallback | None) -> None:
    if on_row:
        on_row(row)


def _as_tuple(x: Any) -> tuple[jax.Array, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _fill_ratios(group: list[Row]) -> None:
    by_name = {r.impl: r for r in group if r.status in (OK, INEXACT) and r.tflops}
    for r in group:
        if r.tflops is None:
            continue
        if ANCHOR_CUDNN in by_name:
            r.ratio_cudnn = r.tflops / by_name[ANCHOR_CUDNN].tflops
        if ANCHOR_XLA in by_name:
            r.ratio_xla = r.tflops / by_name[ANCHOR_XLA].tflops


def environment() -> dict[str, Any]:
    """Device kind, platform and versions, for the JSON record."""
    import jaxlib

    devs = jax.devices()
    return {
        "device_kind": devs[0].device_kind if devs else "unknown",
        "device_count": len(devs),
        "platform": _ops.platform(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "python": sys.version.split()[0],
        "tokamax_version": tokamax_version(),
    }


def bench_record(cfg: BenchConfig, rows: Sequence[Row], argv: Sequence[str]) -> dict[str, Any]:
    """The JSON record of a bench run (``environment()``, date, argv, config, rows)."""
    conf = dataclasses.asdict(cfg)
    conf["kv_heads"] = cfg.n_kv_heads
    return {
        **environment(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": list(argv),
        "config": conf,
        "flops": "fwd 4*B*S*S*N*H (halved when causal); fwdbwd 3.5x fwd",
        "rows": [r.to_json() for r in rows],
    }


def write_json(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Writes ``record`` as indented, strict JSON (a non-finite float, e.g. the error of a NaN
    output, becomes the string "inf"/"nan"), creating parent folders; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    text = json.dumps(_jsonable(record), indent=2, allow_nan=False, default=str)
    tmp.write_text(text + "\n")
    tmp.replace(p)  # atomic: a run killed mid-write leaves the last complete file
    return p


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


# ----------------------------------------------------------------------------- correctness grid


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CheckCase:
    """One small attention call of the demo's correctness grid."""

    name: str
    description: str
    b: int = 1
    t: int = 128
    s: int = 128
    n: int = 4
    kh: int = 2
    h: int = 32
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    segments: int = 0  # > 0: random packed documents with this many ids


CHECK_CASES: tuple[CheckCase, ...] = (
    CheckCase(name="full", description="no mask"),
    CheckCase(name="causal", description="causal", kwargs={"is_causal": True}),
    CheckCase(name="window", description="causal sliding window of 32 keys",
              kwargs={"is_causal": True, "local_window_size": (31, 0)}),
    CheckCase(name="segments", description="3 packed documents per row (segment ids), causal",
              b=2, segments=3, kwargs={"is_causal": True}),
    CheckCase(name="offsets", description="64 queries at positions 64..127 over 128 keys",
              t=64, kwargs={"is_causal": True, "q_offset": 64}),
    CheckCase(name="gqa", description="8 query heads sharing 2 kv heads, causal",
              n=8, kh=2, kwargs={"is_causal": True}),
    CheckCase(name="softcap", description="logits soft-cap 2.0 (Gemma 2), causal",
              kwargs={"is_causal": True, "logits_soft_cap": 2.0}),
    CheckCase(name="masked_rows", description="keys start at 16: queries 0..15 see no key",
              t=32, s=64, kwargs={"is_causal": True, "kv_offset": 16}),
)

CHECKED = ("out", "lse", "dq", "dk", "dv")


@dataclasses.dataclass(slots=True, kw_only=True)
class CheckResult:
    """Errors of one implementation on one :class:`CheckCase` (None: not computed)."""

    impl: str
    case: str
    errors: dict[str, float | None]
    status: str  # "PASS", "FAIL", "n/a" (unsupported) or "error"
    note: str = ""
    seconds: float = 0.0


def case_inputs(
    case: CheckCase, key: jax.Array, dtype: Any = jnp.float32
) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, Any]]:
    """(q, k, v, kwargs) for ``case``, with random sorted segment ids where it asks."""
    k1, k2 = jax.random.split(key)
    q, k, v = random_qkv(k1, case.b, case.t, case.s, case.n, case.kh, case.h, dtype)
    kwargs = dict(case.kwargs)
    if case.segments:
        ids = jax.random.randint(k2, (case.b, case.t), 0, case.segments)
        kwargs["segment_ids"] = jnp.sort(ids, axis=-1).astype(jnp.int32)
    return q, k, v, kwargs


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

# The correctness grid is compiled, not timed: on CPU, XLA's backend optimizations only cost
# compile time there (about a third of it for the interpreted Pallas kernels).
FAST_COMPILE_CPU = {"xla_backend_optimization_level": 0}


def check_case(
    impl: str, case: CheckCase, key: jax.Array, *, dtype: Any = jnp.float32,
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
    ct_out = jax.random.normal(kc1, (case.b, case.t, case.n, case.h), jnp.float32)
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
