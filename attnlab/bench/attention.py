"""``attnlab bench attention``: softmax attention, every implementation against the anchors.

Every implementation registered in :func:`attnlab.ops.implementations`, and the anchors (cuDNN
and XLA through ``jax.nn.dot_product_attention``, tokamax where it imports), is checked against
:func:`attnlab.ops.reference` before it is timed; one that fails is reported as ``FAILED`` and
not timed (an anchor outside tolerance is timed anyway, as ``inexact``). Ratios are to the
anchors timed in the same process on the same inputs. FLOPs and timing follow the harness
(:mod:`attnlab.bench.harness`).

Implementations are discovered through :func:`attnlab.ops.implementations`; only the anchors are
named here. Run it with ``attnlab bench attention`` (:mod:`attnlab.cli.bench`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from attnlab import ops as _ops
from attnlab.bench.candidates import Candidate, anchor_candidates, attnlab_candidates
from attnlab.bench.harness import (
    ANCHOR_CUDNN,
    ANCHOR_XLA,
    DTYPES,
    ERROR,
    FAILED,
    INEXACT,
    OK,
    PASSES,
    SKIPPED,
    UNSUPPORTED,
    GiB,
    attention_flops,
    grad_fn,
    max_abs_err,
    run_record,
    short_error,
    tflops_per_s,
    time_call,
    within,
)
from attnlab.testing import Tolerance, random_qkv, tolerance

FLOPS_RULE = "fwd 4*B*S*S*N*H (halved when causal); fwdbwd 3.5x fwd"


# ----------------------------------------------------------------------------- config and rows


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
        if self.kv_heads is not None and self.kv_heads <= 0:
            raise ValueError(f"kv_heads must be positive (or None: K = N), got {self.kv_heads}")
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


StepCallback = Callable[[int, int, str], None]
RowCallback = Callable[[Row], None]


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


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Group:
    """One (S, causal, pass): the timed inputs, the cropped check inputs and the reference."""

    s: int
    b: int
    causal: bool
    pass_: str
    args: tuple[jax.Array, ...]
    check_args: tuple[jax.Array, ...]
    check_s: int
    reference: Callable[[], tuple[jax.Array, ...]]  # computed once, on first use
    tol: Tolerance
    itemsize: int


def _make_group(cfg: BenchConfig, s: int, causal: bool, pass_: str, inputs: tuple[jax.Array, ...],
                tol: Tolerance, itemsize: int) -> _Group:
    q, k, v, ct = inputs
    # The check: batch 1, and S cropped when the reference at full S would not fit.
    check_s = s if cfg.heads * s * s * 4 <= cfg.max_check_bytes else min(s, cfg.check_max_s)
    qc, kc, vc = q[:1, :check_s], k[:1, :check_s], v[:1, :check_s]
    args, check_args = (q, k, v), (qc, kc, vc)
    if pass_ == "fwdbwd":
        args, check_args = (*args, ct), (*check_args, ct[:1, :check_s])
    ref_fn = functools.partial(_ops.reference, is_causal=causal)
    rf = ref_fn if pass_ == "fwd" else grad_fn(ref_fn)

    @functools.cache
    def reference() -> tuple[jax.Array, ...]:
        return _as_tuple(jax.jit(rf)(*check_args))

    return _Group(s=s, b=cfg.batch_for(s), causal=causal, pass_=pass_, args=args,
                  check_args=check_args, check_s=check_s, reference=reference, tol=tol,
                  itemsize=itemsize)


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
        if s not in inputs:
            inputs.clear()  # one shape's inputs at a time: they can be large
            key, k1, k2 = jax.random.split(key, 3)
            q, k, v = random_qkv(k1, cfg.batch_for(s), s, s, cfg.heads, cfg.n_kv_heads,
                                 cfg.head_dim, dtype)
            ct = jax.random.normal(k2, q.shape, jnp.float32).astype(dtype)
            inputs[s] = (q, k, v, ct)
        g = _make_group(cfg, s, causal, pass_, inputs[s], tol, itemsize)
        q, k, v, _ = inputs[s]
        group: list[Row] = []
        for c in select_candidates(cfg, q, k, v, causal=causal, plat=plat):
            if on_step:
                on_step(done, total, f"S={s} {'causal' if causal else 'full'} {pass_}: {c.name}")
            done += 1
            row = Row(impl=c.name, kind=c.kind, S=s, B=g.b, causal=causal, pass_=pass_)
            group.append(row)
            _measure(row, c, cfg, g)
            if on_row:
                on_row(row)
        fill_ratios(group)
        rows += group
        if on_group:
            on_group(rows)
    if on_step:
        on_step(total, total, "done")
    return rows


def _measure(row: Row, c: Candidate, cfg: BenchConfig, g: _Group) -> None:
    """Checks ``c`` against the reference, then times it; fills ``row`` (status, note, errors,
    time, TFLOP/s). One broken candidate must not end the run: an exception is the row's
    ``error``."""
    if c.unsupported is not None:
        row.status, row.note = UNSUPPORTED, c.unsupported
        return
    skip = _skip_reason(c, cfg, g.b, g.s, g.itemsize)
    if skip is not None and (c.interpreted or c.name == ANCHOR_XLA):
        row.status, row.note = SKIPPED, skip
        return
    f = jax.jit(c.fn if g.pass_ == "fwd" else grad_fn(c.fn))
    try:
        if not _check(row, c, f, g):
            return
        if skip is not None:
            row.status, row.note = SKIPPED, skip
            return
        # When the check ran at the timed shapes, it was the first warm-up call.
        same = g.b == 1 and g.check_s == g.s
        warmup = max(1, cfg.warmup - 1) if same else cfg.warmup
        timing = time_call(f, *g.args, repeats=cfg.repeats, warmup=warmup)
    except Exception as e:  # one broken candidate must not end the run
        row.status, row.note = ERROR, short_error(e)
        return
    finally:
        del f
    row.ms = timing.median_ms
    flops = attention_flops(g.b, g.s, cfg.heads, cfg.head_dim, causal=g.causal, pass_=g.pass_)
    row.tflops = tflops_per_s(flops, timing.median_ms)


def _check(row: Row, c: Candidate, f: Callable[..., Any], g: _Group) -> bool:
    """Compares ``f`` with the reference at the check shapes; False (the row FAILED) when an
    attnlab implementation is outside tolerance (an anchor is only marked ``inexact``)."""
    ref_vals = g.reference()
    got = _as_tuple(f(*g.check_args))
    row.check_S = g.check_s
    names = ("out",) if g.pass_ == "fwd" else ("dq", "dk", "dv")
    errs = {n: max_abs_err(x, r) for n, x, r in zip(names, got, ref_vals, strict=True)}
    row.max_abs_err = max(errs.values())
    if g.pass_ == "fwdbwd":
        row.grad_err = errs
    bad = [n for n, r in zip(names, ref_vals, strict=True)
           if not within(errs[n], g.tol.get(n), r)]
    if bad:
        row.note = "check failed on " + ", ".join(
            f"{n} (err {errs[n]:.2e} > tol {g.tol.get(n):.0e})" for n in bad
        )
        if c.kind != "anchor":
            row.status = FAILED
            return False
        row.status = INEXACT
    return True


def _as_tuple(x: Any) -> tuple[jax.Array, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def fill_ratios(group: list[Row]) -> None:
    """Sets each timed row's ratios to the anchors of its (S, causal, pass) ``group``."""
    by_name = {r.impl: r for r in group if r.status in (OK, INEXACT) and r.tflops}
    for r in group:
        if r.tflops is None:
            continue
        if ANCHOR_CUDNN in by_name:
            r.ratio_cudnn = r.tflops / by_name[ANCHOR_CUDNN].tflops
        if ANCHOR_XLA in by_name:
            r.ratio_xla = r.tflops / by_name[ANCHOR_XLA].tflops


def bench_record(cfg: BenchConfig, rows: Sequence[Row], argv: Sequence[str],
                 ceiling: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON record of a bench run (the harness's environment, date, argv; config, rows).

    With ``ceiling`` (:func:`attnlab.bench.harness.matmul_ceiling`, measured in the same run)
    the record keeps it as ``matmul_ceiling`` and each timed row gets ``fraction_of_matmul``,
    its TFLOP/s over the ceiling's.
    """
    conf = dataclasses.asdict(cfg)
    conf["kv_heads"] = cfg.n_kv_heads
    out = [r.to_json() for r in rows]
    if ceiling is None:
        return run_record(argv, config=conf, flops=FLOPS_RULE, rows=out)
    for r in out:
        r["fraction_of_matmul"] = None if r["tflops"] is None else r["tflops"] / ceiling["tflops"]
    return run_record(argv, config=conf, flops=FLOPS_RULE, matmul_ceiling=dict(ceiling),
                      rows=out)
