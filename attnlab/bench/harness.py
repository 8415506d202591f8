"""The benchmark harness: the pieces every benchmark of :mod:`attnlab.bench` shares.

The rules follow ``BENCHMARKS.md``:

* FLOPs (:func:`attention_flops`): the forward counts ``4 * B * S * S * N * H`` (two matmuls
  of 2 FLOPs per multiply-add), halved when causal (T == S assumed); a forward+backward
  ("fwdbwd") counts 3.5x the forward.
* Time (:func:`time_call`): jit-compiled, warm-up calls, then the median of ``repeats`` calls,
  each wrapped in ``jax.block_until_ready``; inputs are random normal, never zeros.
* Correctness before timing: every fast path is compared with a reference first, within the
  error measures (:func:`max_abs_err`, :func:`within`; the tolerance table is
  :mod:`attnlab.testing`'s);
  one that fails is reported ``FAILED`` and not timed.
* Anchors: jax.nn's XLA and cuDNN attention (:data:`ANCHOR_XLA`, :data:`ANCHOR_CUDNN`) and
  tokamax where it imports (:func:`tokamax_version`).
* Records: :func:`run_record` (device, versions, date, argv, then the benchmark's fields) and
  :func:`write_json` (strict JSON, written atomically).

Nothing here (nor in any benchmark module) changes the environment at import: a benchmark that
needs ``XLA_FLAGS`` or another variable sets it in its ``main()``.

Shapes use the attnlab letters: B batch, T queries, S keys, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import statistics
import sys
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

# Anchor names (the only implementation names the harness knows).
ANCHOR_XLA = "jax.nn[xla]"
ANCHOR_CUDNN = "jax.nn[cudnn]"
TOKAMAX_IMPLS = ("mosaic", "triton")

# Row statuses written to the JSON. INEXACT is for anchors only: an anchor outside our
# tolerance is still timed (the ratios need it), with the error in its note.
OK, FAILED, SKIPPED, UNSUPPORTED, ERROR = "ok", "FAILED", "skipped", "unsupported", "error"
INEXACT = "inexact"

# The lightning benchmarks' decay: minimax_decay(N, LAYER_IDX, NUM_LAYERS), as fla's
# (layer_idx, num_layers), so that its chunk_lightning_attn computes the same function.
LAYER_IDX, NUM_LAYERS = 1, 4


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


def check_dtype(dtype: str) -> Any:
    """The jnp dtype named ``dtype`` (a key of :data:`DTYPES`).

    Raises:
      ValueError: an unknown name, listing the known ones.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


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


def per_s(amount: float, ms: float, unit: float = 1e6) -> float:
    """``amount`` per second in multiples of ``unit``, for ``amount`` done in ``ms`` ms
    (``unit`` 1e6: million tokens/s; 1e9: GB/s)."""
    return amount / (ms * 1e-3) / unit


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


def matmul_ceiling(n: int = 8192, dtype: str = "bfloat16", *, repeats: int = 20,
                   warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """The device's dense matmul rate, the roof an attention kernel's TFLOP/s is read
    against: ``jit(a @ b)`` of two [n, n] ``dtype`` matrices (float32 accumulation inside,
    output in ``dtype``), 2 n^3 FLOPs per call, timed by :func:`time_call`.

    Returns:
      {"n", "dtype", "ms": median ms, "tflops": TFLOP/s}.

    Example:
      >>> matmul_ceiling()["tflops"]  # about 800 on an H100 SXM in bfloat16
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ka, kb = jax.random.split(jax.random.key(seed))
    a = jax.random.normal(ka, (n, n), check_dtype(dtype))
    b = jax.random.normal(kb, (n, n), check_dtype(dtype))
    t = time_call(jax.jit(jnp.matmul), a, b, repeats=repeats, warmup=warmup)
    del a, b
    return {"n": n, "dtype": dtype, "ms": t.median_ms,
            "tflops": tflops_per_s(2.0 * n**3, t.median_ms)}


def repeated_program(fn: Callable[..., Any], calls: int, *, chain: bool = False
                     ) -> Callable[..., Any]:
    """``(zeros, *args) -> out``: ``fn(*args)`` run ``calls`` times in a ``lax.fori_loop``,
    for jit.

    ``zeros`` is a [calls] float32 array of zeros passed at run time: call i's first argument
    is ``args[0] + zeros[i] * s`` with ``s`` one element of call i - 1's output, so every call
    depends on the one before and XLA can neither hoist ``fn`` out of the loop nor fold the
    perturbation away (it cannot know ``zeros`` is zero). ``chain=True`` feeds each output
    back as the next call's first argument instead (``fn`` maps x to an x of the same shape,
    like the copy ``x + 1``). The first argument must be floating point. Returns the last
    output.
    """
    if calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")

    def program(zeros: jax.Array, first: Any, *rest: Any) -> Any:
        if chain:
            return jax.lax.fori_loop(
                0, calls, lambda i, x: fn(x + zeros[i].astype(x.dtype), *rest), first)

        def body(i: Any, carry: tuple[jax.Array, Any]) -> tuple[jax.Array, Any]:
            s, _ = carry
            out = fn(first + (zeros[i] * s).astype(first.dtype), *rest)
            return jax.tree.leaves(out)[0].ravel()[0].astype(jnp.float32), out

        like = jax.eval_shape(fn, first, *rest)
        init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), like)
        return jax.lax.fori_loop(0, calls, body, (jnp.float32(0), init))[1]

    return program


def time_in_program(fn: Callable[..., Any], *args: Any, calls: int = 8, repeats: int = 10,
                    warmup: int = 2, chain: bool = False) -> Timing:
    """Device time per call of ``fn``: :func:`repeated_program` of ``calls`` calls jitted and
    timed as one (:func:`time_call`), divided by ``calls``.

    One call per dispatch (:func:`time_call`) also counts the host's dispatch and the gap
    before the next launch, which dominate calls of a few hundred microseconds (decoding
    one token, say). A generation loop on the device runs its steps back to back; this
    measures that (the loop's own cost per step, a few microseconds, is counted).

    Returns:
      A :class:`Timing` whose times are per call.
    """
    zeros = jnp.zeros((calls,), jnp.float32)
    t = time_call(jax.jit(repeated_program(fn, calls, chain=chain)), zeros, *args,
                  repeats=repeats, warmup=warmup)
    return Timing(t.median_ms / calls, tuple(x / calls for x in t.times_ms), t.first_call_s)


def check_then_time(fn: Callable[..., Any], args: Sequence[Any], want: Any, atol: float, *,
                    flops: float, repeats: int, warmup: int = 2) -> dict[str, Any]:
    """``jit(fn)(*args)`` checked against ``want`` (max abs error <= ``atol``), then timed:
    ``{"max_abs_err", "status": "ok", "ms", "tflops"}`` (``flops`` per call). A wrong output
    is not timed (``status`` "wrong: ..."); an exception (a config that does not compile, out
    of memory) is recorded as ``status`` "error: ..." instead of raised."""
    row: dict[str, Any] = {}
    try:
        f = jax.jit(fn)
        row["max_abs_err"] = err = max_abs_err(f(*args), want)
        if not err <= atol:
            row["status"] = f"wrong: max abs err {err:.3g}"
            return row
        ms = time_call(f, *args, repeats=repeats, warmup=warmup).median_ms
        row.update(status="ok", ms=ms, tflops=tflops_per_s(flops, ms))
    except Exception as e:  # noqa: BLE001 - record it and go on
        row["status"] = f"error: {short_error(e)}"
    return row


def time_or_error(
    fn: Callable[..., Any], args: Sequence[Any], repeats: int, *, warmup: int = 2
) -> dict[str, Any]:
    """Median ms of ``fn(*args)`` (jit-compiled here unless already a ``Compiled``) as
    ``{"ms", "first_call_s"}``; an error (out of memory at large S, say) is returned as
    ``{"ms": None, "error": ...}`` instead of raised."""
    try:
        f = fn if isinstance(fn, jax.stages.Compiled) else jax.jit(fn)
        t = time_call(f, *args, repeats=repeats, warmup=warmup)
        return {"ms": t.median_ms, "first_call_s": t.first_call_s}
    except Exception as e:  # noqa: BLE001 - record and go on (OOM at large S, say)
        return {"ms": None, "error": str(e).splitlines()[0][:300]}


# ----------------------------------------------------------------------------- inputs, passes


AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def grad_fn(fn: AttentionFn) -> Callable[..., tuple[jax.Array, jax.Array, jax.Array]]:
    """``(q, k, v, ct) -> (dq, dk, dv)`` of ``sum(fn(q, k, v) * ct)``: the timed forward+backward.

    The cotangent is an argument, not a closure, so a large one is not baked into the program.
    """

    def loss(q: jax.Array, k: jax.Array, v: jax.Array, ct: jax.Array) -> jax.Array:
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def pass_fn(fn: AttentionFn, pass_: str) -> Callable[..., Any]:
    """``(q, k, v, ct) -> ...`` of one pass: ``fn(q, k, v)`` for "fwd" (``ct`` unused, so both
    passes take the same arguments), :func:`grad_fn` for "fwdbwd"."""
    if pass_ == "fwd":
        return lambda q, k, v, ct: fn(q, k, v)
    return grad_fn(fn)


# ----------------------------------------------------------------------------- implementations


def runs_interpreted(impl: Any, plat: str) -> bool:
    """True when ``impl`` (an implementation object or a name) would run through the Pallas
    interpreter on ``plat`` (far too slow to time; it is checked for correctness only).

    An implementation may say so itself with an ``interpreted(plat) -> bool`` attribute;
    otherwise Pallas kernels (names starting with "pallas") are interpreted on CPU.
    """
    flag = getattr(impl, "interpreted", None)
    if callable(flag):
        return bool(flag(plat))
    name = impl if isinstance(impl, str) else impl.name
    return plat == "cpu" and name.startswith("pallas")


def tokamax_version() -> str | None:
    """tokamax's version if ``import tokamax`` works here, else None."""
    try:
        mod = importlib.import_module("tokamax")
    except Exception:  # any import failure means not available
        return None
    return str(getattr(mod, "__version__", "unknown"))


def short_error(e: BaseException) -> str:
    """The exception's type, its message's first line and, for a multi-line message (a
    traceback from a callback, say), its last line, where the cause usually is."""
    msg = [m for m in str(e).strip().splitlines() if m.strip()]
    if not msg:
        return type(e).__name__
    text = msg[0][:200] + (f" ... {msg[-1].strip()[:200]}" if len(msg) > 1 else "")
    return f"{type(e).__name__}: {text}"


def any_failed(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a row's status is ``FAILED`` (a check) or ``ERROR`` (it raised)."""
    return any(r["status"] in (FAILED, ERROR) for r in rows)


# ----------------------------------------------------------------------------- records


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


def now() -> str:
    """The UTC date and time, ISO 8601 to the second (the records' ``date``)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def run_record(argv: Sequence[str], **fields: Any) -> dict[str, Any]:
    """A benchmark's JSON record: :func:`environment`, ``date``, ``argv``, then ``fields`` in
    the order given."""
    return {**environment(), "date": now(), "argv": list(argv), **fields}


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


# ----------------------------------------------------------------------------- command lines


def simulate_cpu_devices(count: int = 8) -> None:
    """Asks XLA for ``count`` simulated CPU devices (``XLA_FLAGS``), unless ``XLA_FLAGS`` is
    already set. For a benchmark's ``main()`` (smoke runs on CPU): it takes effect only before
    JAX's first backend use, and it changes this process's environment."""
    if "XLA_FLAGS" not in os.environ:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"


def ints(text: str) -> list[int]:
    """argparse type: ``"2048,8192"`` (commas or spaces) -> ``[2048, 8192]``."""
    try:
        return [int(x) for x in text.replace(" ", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def names(text: str | None) -> list[str] | None:
    """``"xla,pallas_triton"`` -> ``["xla", "pallas_triton"]``; None stays None."""
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def num(x: float | None, spec: str, none: str = "-") -> str:
    """``format(x, spec)``, or ``none`` for a missing number."""
    return none if x is None else format(x, spec)


def add_shape_args(
    p: argparse.ArgumentParser, *, heads: int, head_dim: int = 128, dtype_choices: bool = True
) -> None:
    """``--heads``, ``--head-dim`` and ``--dtype`` (bfloat16 by default) of a benchmark."""
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--head-dim", type=int, default=head_dim)
    if dtype_choices:
        p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    else:
        p.add_argument("--dtype", default="bfloat16")


def add_timing_args(p: argparse.ArgumentParser, *, repeats: int, warmup: int = 2) -> None:
    """``--repeats`` (timed calls, median) and ``--warmup`` (untimed calls first)."""
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--warmup", type=int, default=warmup)
