"""Decode-attention benchmark: GB/s of each implementation against the device's copy bandwidth.

Decoding is a streaming read of the K/V cache, so the figure of merit is bandwidth:

* bytes = the K and V caches read once (only each sequence's valid ``kv_lengths[b]`` entries)
  + q read + out written; GB/s = bytes / median time.
* copy bandwidth = a jit-compiled elementwise ``x + 1`` over a large buffer (a streaming
  read-and-write fusion, the best an ordinary kernel does), counting read + write bytes.
  Every row's ``ratio_copy`` is its GB/s over that, measured in the same process.
* Every implementation is checked against ``impl="xla"`` (out and lse) before it is timed; one
  that fails is reported as ``FAILED`` and not timed. Pallas kernels that run interpreted (on
  CPU) are checked at small sizes only and never timed.
* Time: jit-compiled, warm-up calls, then the median of ``repeats`` calls, each wrapped in
  ``jax.block_until_ready`` (:func:`attnlab.bench.harness.time_call`): ``ms``, ``GBps``,
  ``ratio_copy``. That counts the host's dispatch of each call too, which is a large part of
  a call this short. The ``*_in_program`` columns time 8 calls in one jitted program
  (:func:`attnlab.bench.harness.time_in_program`), as a decode loop on the device runs its
  steps, against the copy timed the same way.

Standalone: ``python -m attnlab.bench.decode --out decode.json`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.bench.harness import (
    DTYPES,
    ERROR,
    FAILED,
    OK,
    SKIPPED,
    UNSUPPORTED,
    add_timing_args,
    any_failed,
    check_dtype,
    ints,
    max_abs_err,
    names,
    num,
    per_s,
    run_record,
    runs_interpreted,
    short_error,
    time_call,
    time_in_program,
    within,
    write_json,
)
from attnlab.ops import decode as _decode
from attnlab.ops.attention import platform
from attnlab.testing import random_qkv, tolerance
from pallas_kernels.gpu.decode import DecodeConfig, tiling

BYTES_RULE = (
    "K and V caches read once (valid entries only: sum_b kv_lengths[b] * K * H * 2 * itemsize) "
    "+ q + out; copy bandwidth: jit(x + 1) over copy_bytes, counting read + write"
)
# Interpreted kernels (CPU) are checked only while B * S stays below this.
MAX_INTERPRETED_KEYS = 8192

# A small sweep of Triton configs for tuning on a GPU (``--sweep``).
TRITON_SWEEP: tuple[DecodeConfig, ...] = tuple(
    DecodeConfig(block_kv=bk, keys_per_split=kps, num_stages=st, num_warps=w)
    for bk, kps, st, w in (
        (64, None, 3, 4), (64, None, 2, 4), (128, None, 2, 4), (128, None, 3, 8),
        (32, None, 4, 4), (64, 512, 3, 4), (64, 1024, 3, 4), (64, 2048, 3, 4),
        (64, 4096, 3, 4), (128, 1024, 2, 4), (128, 2048, 2, 8), (128, 4096, 3, 8),
    )
)


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """One thing to time: a registered decode implementation, maybe with a config."""

    name: str
    impl: str
    config: Any = None


def copy_bandwidth(
    nbytes: int, *, repeats: int = 20, warmup: int = 2, seed: int = 0
) -> dict[str, float]:
    """Device copy bandwidth: jit(x + 1) over a float32 buffer of ``nbytes``, read + write;
    one call per dispatch, and 8 chained calls in one program
    (:func:`~attnlab.bench.harness.time_in_program`).

    Returns:
      {"bytes": moved bytes per call (2 * nbytes), "ms": median ms, "GBps": 1e9 bytes/s,
      "ms_in_program", "GBps_in_program": the same per call within one program}.

    Example:
      >>> copy_bandwidth(1 << 30)["GBps"]
    """
    n = max(1, nbytes // 4)
    x = jax.random.uniform(jax.random.key(seed), (n,), jnp.float32)
    t = time_call(jax.jit(lambda x: x + 1.0), x, repeats=repeats, warmup=warmup)
    t_prog = time_in_program(lambda x: x + 1.0, x, chain=True, repeats=repeats, warmup=warmup)
    moved = 2 * n * 4
    del x
    return {"bytes": moved, "ms": t.median_ms, "GBps": moved / (t.median_ms * 1e-3) / 1e9,
            "ms_in_program": t_prog.median_ms,
            "GBps_in_program": moved / (t_prog.median_ms * 1e-3) / 1e9}


def decode_bytes(
    b: int, t: int, n: int, kh: int, h: int, itemsize: int, lengths: np.ndarray
) -> int:
    """Bytes a decode call must move: valid K and V entries once, q in, out back."""
    kv = int(np.sum(lengths)) * kh * h * 2 * itemsize
    return kv + 2 * b * t * n * h * itemsize


def candidates(
    impls: Sequence[str] | None, *, sweep: bool = False
) -> list[Candidate]:
    """Registered decode implementations to time (all but "reference" when ``impls`` is None),
    plus the Triton config sweep when asked."""
    registered = _decode.implementations()
    names = [n for n in registered if n != "reference"] if impls is None else list(impls)
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise ValueError(
            f"unknown decode implementation(s) {unknown}; registered: {sorted(registered)}"
        )
    out = [Candidate(n, n) for n in names]
    if sweep and "pallas_triton" in names:
        for c in TRITON_SWEEP:
            label = (f"pallas_triton[bk={c.block_kv},kps={c.keys_per_split or 'auto'},"
                     f"st={c.num_stages},w={c.num_warps}]")
            out.append(Candidate(label, "pallas_triton", c))
    return out


@functools.lru_cache(maxsize=64)
def _jitted(impl: str, config: Any) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """One jitted ``(q, k, v, lengths) -> (out, lse)`` per (impl, config): the check's call
    and the timed calls share one compilation."""
    def fn(q, k, v, lengths):
        return _decode.decode_attention(
            q, k, v, kv_lengths=lengths, impl=impl, config=config, return_residuals=True
        )

    return jax.jit(fn)


def bench_decode(
    *,
    batch: int = 4,
    seq_lens: Sequence[int] = (32768, 65536, 131072),
    heads: int = 32,
    kv_heads: int = 4,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    queries: int = 1,
    impls: Sequence[str] | None = None,
    ragged: bool = False,
    sweep: bool = False,
    repeats: int = 20,
    warmup: int = 2,
    copy_bytes: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    argv: Sequence[str] = (),
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Checks each decode implementation against ``impl="xla"``, then times it, per S.

    Args:
      batch, heads, kv_heads, head_dim: B, N, K, H.
      seq_lens: cache lengths S to run.
      dtype: "bfloat16", "float16" or "float32".
      queries: T, queries per sequence (1 for plain decoding).
      impls: registered decode implementation names; None: all but "reference".
      ragged: random kv_lengths in [S/2, S] (bytes count only valid entries); else all S.
      sweep: also time the Triton configs of ``TRITON_SWEEP`` (GPU tuning).
      repeats, warmup: timed and untimed calls per measurement.
      copy_bytes: buffer size of the copy-bandwidth measurement (default 1 GiB, 64 MiB on CPU).
      seed: PRNG seed of the random inputs.
      out: if given, the JSON record (environment, copy bandwidth, rows) is written there after
        every S (a run killed at a time limit keeps what it measured).
      argv: recorded in the JSON.
      on_row: called with each finished row.

    Returns:
      Rows (dicts): impl, config, S, B, T, N, K, H, dtype, ms, GBps, ratio_copy, their
      ``*_in_program`` forms, max_abs_err, lse_err, status ("ok", "FAILED", "skipped",
      "unsupported", "error"), note.

    Raises:
      ValueError: bad sizes, dtype or implementation names.

    Example:
      >>> rows = bench_decode(seq_lens=(32768,), out="decode.json")
    """
    dt = check_dtype(dtype)
    if min(batch, heads, kv_heads, head_dim, queries) <= 0 or not seq_lens:
        raise ValueError("batch, heads, kv_heads, head_dim, queries and seq_lens must be positive")
    if any(s <= 0 for s in seq_lens):
        raise ValueError(f"seq_lens must be positive, got {tuple(seq_lens)}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not a multiple of kv_heads={kv_heads}")
    plat = platform()
    itemsize = jnp.dtype(dt).itemsize
    tol = tolerance(dt, plat)
    cands = candidates(impls, sweep=sweep)
    if copy_bytes is None:
        copy_bytes = (64 if plat == "cpu" else 1024) << 20
    copy = copy_bandwidth(copy_bytes, repeats=repeats, warmup=warmup, seed=seed)
    settings = dict(
        batch=batch, seq_lens=list(seq_lens), heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, dtype=dtype, queries=queries, impls=impls, ragged=ragged,
        sweep=sweep, repeats=repeats, warmup=warmup, copy_bytes=copy_bytes, seed=seed,
    )
    rows: list[dict[str, Any]] = []
    key = jax.random.key(seed)
    for s in seq_lens:
        key, k1, k2 = jax.random.split(key, 3)
        q, k, v = random_qkv(k1, batch, queries, s, heads, kv_heads, head_dim, dt)
        if ragged:
            lengths = jax.random.randint(k2, (batch,), max(1, s // 2), s + 1, jnp.int32)
        else:
            lengths = jnp.full((batch,), s, jnp.int32)
        nbytes = decode_bytes(
            batch, queries, heads, kv_heads, head_dim, itemsize, np.asarray(lengths)
        )
        why = _decode.explain(q, k, v, kv_lengths=lengths, plat=plat)
        # The check's answer: impl="xla", computed once per S whatever is timed.
        try:
            want = _jitted("xla", None)(q, k, v, lengths)
            want_note = ""
        except Exception as e:  # report it on every row rather than end the run
            want, want_note = None, f"unchecked: xla raised {short_error(e)}"
        for c in cands:
            row: dict[str, Any] = dict(
                impl=c.name, config=None if c.config is None else dataclasses.asdict(c.config),
                S=s, B=batch, T=queries, N=heads, K=kv_heads, H=head_dim, dtype=dtype,
                ragged=ragged, bytes=nbytes, ms=None, GBps=None, ratio_copy=None,
                ms_in_program=None, GBps_in_program=None, ratio_copy_in_program=None,
                max_abs_err=None, lse_err=None, copy_GBps=copy["GBps"], status=OK, note="",
            )
            rows.append(row)
            try:
                _run_one(row, c, why, plat, tol, (q, k, v, lengths), nbytes, copy,
                         repeats, warmup, want, want_note)
            except Exception as e:  # one broken candidate must not end the run
                row["status"], row["note"] = ERROR, short_error(e)
            if on_row:
                on_row(row)
        del q, k, v
        if out is not None:
            write_json(out, record(settings, copy, rows, argv))
    return rows


def _run_one(row, c: Candidate, why, plat, tol, args, nbytes, copy: Mapping[str, float],
             repeats, warmup, want, want_note: str) -> None:
    """Checks one candidate against ``want`` (the xla outputs), then times it; fills ``row``."""
    q, k, v, lengths = args
    b, s = q.shape[0], k.shape[1]
    if why.get(c.impl) is not None:
        row["status"], row["note"] = UNSUPPORTED, why[c.impl]
        return
    if c.impl == "pallas_triton":
        cfg = c.config or DecodeConfig.get_default()
        til = tiling(cfg, b, q.shape[1], q.shape[2], k.shape[2], s)
        row["note"] = f"splits={til.num_splits} keys_per_split={til.keys_per_split}"
    interpreted = runs_interpreted(c.impl, plat)
    if interpreted and b * s > MAX_INTERPRETED_KEYS:
        row["status"] = SKIPPED
        row["note"] = "runs in Pallas interpret mode on this platform: not checked or timed here"
        return
    f = _jitted(c.impl, c.config)
    got = f(q, k, v, lengths)
    if want is None:
        row["note"] = (row["note"] + "; " if row["note"] else "") + want_note
    else:
        row["max_abs_err"] = max_abs_err(got[0], want[0])
        row["lse_err"] = max_abs_err(got[1], want[1])
        bad = []
        if not within(row["max_abs_err"], tol.out, want[0]):
            bad.append(f"out (err {row['max_abs_err']:.2e} > tol {tol.out:.0e})")
        if not within(row["lse_err"], tol.lse, want[1]):
            bad.append(f"lse (err {row['lse_err']:.2e} > tol {tol.lse:.0e})")
        if bad:
            row["status"], row["note"] = FAILED, "check vs xla failed on " + ", ".join(bad)
            return
    if interpreted:
        row["status"] = SKIPPED
        row["note"] = "checked; runs in Pallas interpret mode on this platform: not timed"
        return
    # The check's call was the first warm-up.
    timing = time_call(f, q, k, v, lengths, repeats=repeats, warmup=max(1, warmup - 1))
    row["ms"] = timing.median_ms
    row["GBps"] = per_s(nbytes, timing.median_ms, 1e9)
    row["ratio_copy"] = row["GBps"] / copy["GBps"]
    # As a decode loop on the device sees it: 8 calls in one program, against the copy timed
    # the same way.
    prog = time_in_program(f, q, k, v, lengths, repeats=repeats, warmup=1)
    row["ms_in_program"] = prog.median_ms
    row["GBps_in_program"] = per_s(nbytes, prog.median_ms, 1e9)
    row["ratio_copy_in_program"] = row["GBps_in_program"] / copy["GBps_in_program"]


def record(
    settings: Mapping[str, Any], copy: Mapping[str, float], rows: Sequence[Mapping[str, Any]],
    argv: Sequence[str] = (),
) -> dict[str, Any]:
    """The JSON record of a run: environment, date, argv, settings, copy bandwidth, rows."""
    return run_record(argv, settings=dict(settings), bytes_rule=BYTES_RULE, copy=dict(copy),
                      rows=[dict(r) for r in rows])


def _format(row: Mapping[str, Any]) -> str:
    return (f"{row['impl']:<48} S={row['S']:<7} {num(row['ms'], '.4f'):>9} ms "
            f"{num(row['GBps'], '.1f'):>8} GB/s  x{num(row['ratio_copy'], '.2f'):<5} "
            f"(in one program x{num(row['ratio_copy_in_program'], '.2f'):<5}) "
            f"{row['status']:<11} {row['note']}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m attnlab.bench.decode [options]``: runs :func:`bench_decode`, prints a line
    per row, writes JSON with ``--out``. Returns 0, or 1 when a checked implementation FAILED or
    raised."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m attnlab.bench.decode",
        description="Time decode attention (GB/s, ratio to device copy bandwidth).",
    )
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-lens", type=ints, default=[32768, 65536, 131072])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--queries", type=int, default=1, help="T, queries per sequence")
    p.add_argument("--impls", default=None, help="comma-separated decode impl names")
    p.add_argument("--ragged", action="store_true", help="random kv_lengths in [S/2, S]")
    p.add_argument("--sweep", action="store_true", help="also time a sweep of Triton configs")
    add_timing_args(p, repeats=20)
    p.add_argument("--copy-mib", type=int, default=None, help="copy-bandwidth buffer (MiB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    printed: list[bool] = []

    def print_row(row: Mapping[str, Any]) -> None:
        if not printed:
            printed.append(True)
            print(f"device copy bandwidth: {row['copy_GBps']:.1f} GB/s", flush=True)
        print(_format(row), flush=True)

    try:
        rows = bench_decode(
            batch=args.batch, seq_lens=args.seq_lens, heads=args.heads, kv_heads=args.kv_heads,
            head_dim=args.head_dim, dtype=args.dtype, queries=args.queries,
            impls=names(args.impls),
            ragged=args.ragged, sweep=args.sweep, repeats=args.repeats, warmup=args.warmup,
            copy_bytes=None if args.copy_mib is None else args.copy_mib << 20, seed=args.seed,
            out=args.out, argv=["python -m attnlab.bench.decode", *argv],
            on_row=print_row,
        )
    except ValueError as e:
        p.error(str(e))
    return 1 if any_failed(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
