"""Lightning attention benchmark: Mtokens/s of each implementation, fla, and a lax.scan anchor.

* Shapes: N heads of H = Hv dims, B * T = ``tokens`` (B = max(1, tokens // T)), per T.
* Candidates: every registered implementation but "reference" that supports the call (kernels
  that would run interpreted on CPU are skipped), ``scan_anchor`` (the plain chunked
  ``lax.scan`` JAX version: one scan step per chunk doing intra, inter and the state update),
  and fla's ``chunk_lightning_attn`` (Triton, PyTorch) when importable on a CUDA device.
* Each JAX candidate is first checked against ``impl="xla"`` on a slice (one row, at most 2048
  tokens): output and final state; one that fails is reported ``FAILED`` and not timed.
* Passes: "fwd" (output) and "fwdbwd" (output, then dq, dk, dv for a random cotangent).
  JAX: jit, warm-up, median of ``repeats`` calls under ``block_until_ready``; fla: the same
  wall-clock harness (call, then ``torch.cuda.synchronize``), whose median is ``ms`` and the
  ratios' anchor; its CUDA-event time (launch and synchronisation left out) is recorded too,
  as ``ms_cuda_events``.
* Ratios per (T, pass): ``ratio_fla`` = fla ms / ms, ``ratio_scan`` = scan_anchor ms / ms; per
  implementation ``flat`` = Mtok/s at the longest T / at the shortest.
* ``--lasp``: LASP and LASP-2 on 2 devices at length 2T vs the single-device op at T
  (``speedup`` = 2-device tokens/s / 1-device tokens/s).

``python -m attnlab.bench.lightning --out bench_lightning.json`` (``--smoke``: tiny, CPU); the
``--lasp`` runs are :func:`attnlab.bench.lasp.bench_lasp`.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.bench import lasp
from attnlab.bench.harness import (
    ERROR,
    FAILED,
    LAYER_IDX,
    NUM_LAYERS,
    OK,
    PASSES,
    SKIPPED,
    UNSUPPORTED,
    add_shape_args,
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
    within,
    write_json,
)
from attnlab.ops import lightning as L
from attnlab.ops import platform
from attnlab.testing import Tolerance, tolerance

SCAN_ANCHOR = "scan_anchor"
FLA = "fla.chunk_lightning_attn"


def scan_anchor(q, k, v, log_decay, chunk: int = 64) -> tuple[jax.Array, jax.Array]:
    """The plain chunked JAX version: ``lax.scan`` over chunks, all work inside the step.

    q, k [B, T, N, H], v [B, T, N, Hv], T a multiple of ``chunk``; no segment ids. Returns
    (o, final state). This is the anchor the kernels must beat by 5x.
    """
    b, t, n, h = q.shape
    hv = v.shape[-1]
    nc = t // chunk
    i = jnp.arange(chunk, dtype=jnp.float32)
    diff = (i[:, None] - i[None, :])[None]  # [1, C, C]
    dmask = jnp.where(diff >= 0, jnp.exp(log_decay[:, None, None] * jnp.maximum(diff, 0)), 0.0)
    q_w = jnp.exp(log_decay[None, :] * (i[:, None] + 1))  # [C, N] lambda^(i+1)
    k_w = jnp.exp(log_decay[None, :] * (chunk - 1 - i[:, None]))  # [C, N] lambda^(C-1-j)
    c_w = jnp.exp(log_decay * chunk)[None, :, None, None]

    def step(s, xs):
        qc, kc, vc = xs  # [B, C, N, H]
        sc = jnp.einsum("BINH,BJNH->BNIJ", qc, kc, preferred_element_type=jnp.float32)
        p = (sc * dmask[None]).astype(qc.dtype)
        o = jnp.einsum("BNIJ,BJNV->BINV", p, vc, preferred_element_type=jnp.float32)
        qs = (qc.astype(jnp.float32) * q_w[None, :, :, None]).astype(qc.dtype)
        o = o + jnp.einsum("BINH,BNHV->BINV", qs, s.astype(qc.dtype),
                           preferred_element_type=jnp.float32)
        ks = (kc.astype(jnp.float32) * k_w[None, :, :, None]).astype(kc.dtype)
        s = c_w * s + jnp.einsum("BJNH,BJNV->BNHV", ks, vc, preferred_element_type=jnp.float32)
        return s, o.astype(qc.dtype)

    split = lambda x: jnp.moveaxis(x.reshape(b, nc, chunk, *x.shape[2:]), 1, 0)  # noqa: E731
    s, o = jax.lax.scan(step, jnp.zeros((b, n, h, hv), jnp.float32), (split(q), split(k), split(v)))
    return jnp.moveaxis(o, 0, 1).reshape(b, t, n, hv), s


@functools.lru_cache(maxsize=32)
def _jitted(name: str, pass_: str, chunk: int | None) -> Callable[..., Any]:
    def fwd(q, k, v, log_decay):
        if name == SCAN_ANCHOR:
            return scan_anchor(q, k, v, log_decay, chunk or 64)
        return L.lightning_attention(q, k, v, decay=jnp.exp(log_decay), impl=name,
                                     return_state=True, chunk_size=chunk)

    if pass_ == "fwd":
        return jax.jit(fwd)

    def fwdbwd(q, k, v, log_decay, do):
        (o, _), vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, log_decay), q, k, v)
        return o, vjp((do, jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]),
                                     jnp.float32)))

    return jax.jit(fwdbwd)


def load_fla() -> tuple[Any, Any] | None:
    """(torch, fla's chunk_lightning_attn) where both import and CUDA is there, else None."""
    try:
        import torch
        from fla.ops.lightning_attn import chunk_lightning_attn
    except Exception:  # not installed, or no usable torch
        return None
    return (torch, chunk_lightning_attn) if torch.cuda.is_available() else None


def time_fla(fla, q, k, v, do, pass_: str, repeats: int, warmup: int) -> tuple[float, float]:
    """fla's median ms per call, two ways: (wall clock around the call and a
    ``torch.cuda.synchronize``, the harness the JAX candidates get; CUDA events around the call,
    which leave out the launch and the synchronisation)."""
    torch, fn = fla

    def to_t(x):
        return torch.from_numpy(np.asarray(x, np.float32)).to("cuda", torch.bfloat16)

    tq, tk, tv, tdo = (to_t(x) for x in (q, k, v, do))
    if pass_ == "fwdbwd":
        tq, tk, tv = (x.requires_grad_(True) for x in (tq, tk, tv))

    def call():
        o, _ = fn(tq, tk, tv, LAYER_IDX, NUM_LAYERS, scale=1.0)
        if pass_ == "fwdbwd":
            o.backward(tdo)
            tq.grad = tk.grad = tv.grad = None

    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    wall, events = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        events.append(start.elapsed_time(end))
    return float(np.median(wall)), float(np.median(events))


def _check(name: str, chunk: int | None, q, k, v, log_decay, tol: Tolerance
           ) -> tuple[bool, float]:
    """Checks ``name`` against impl="xla" on a slice; (ok, max abs err over o and state)."""
    t = min(q.shape[1], 2048)
    t -= t % (chunk or 64) if name == SCAN_ANCHOR else 0
    sl = lambda x: x[:1, :t]  # noqa: E731
    got = _jitted(name, "fwd", chunk)(sl(q), sl(k), sl(v), log_decay)
    want = _jitted("xla", "fwd", None)(sl(q), sl(k), sl(v), log_decay)
    err = max(max_abs_err(got[0], want[0]), max_abs_err(got[1], want[1]))
    ok = within(err, tol.out, want[0]) and within(err, tol.out, want[1])
    return ok, err


def bench_lightning(
    *,
    seq_lens: Sequence[int] = (2048, 8192, 32768, 131072),
    tokens: int = 65536,
    heads: int = 16,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    impls: Sequence[str] | None = None,
    chunk: int | None = None,
    fla: bool = True,
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
    out: str | Path | None = None,
    argv: Sequence[str] = (),
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Checks, then times each lightning implementation, the scan anchor and fla, per T.

    Args:
      seq_lens: T values; B = max(1, tokens // T).
      tokens: B * T per measurement.
      heads, head_dim: N and H (= Hv).
      dtype: "bfloat16", "float16" or "float32".
      impls: registered names to time (default: all but "reference"); the anchor is added.
      chunk: chunk_size of the xla path and the anchor (default 64).
      fla: also time fla's chunk_lightning_attn when importable with CUDA.
      repeats, warmup, seed: timing and inputs.
      out: JSON path, rewritten after every T.
      argv: recorded in the JSON.
      on_row: called with each finished row.

    Returns:
      Rows: impl, pass, T, B, N, H, dtype, ms, mtok_s, ratio_fla, ratio_scan, max_abs_err,
      status, note.

    Example:
      >>> rows = bench_lightning(seq_lens=(2048,), out="lightning.json")
    """
    dt = check_dtype(dtype)
    if min(tokens, heads, head_dim) <= 0 or not seq_lens or min(seq_lens) <= 0:
        raise ValueError("tokens, heads, head_dim and seq_lens must be positive")
    plat = platform()
    tol = tolerance(dt, plat)
    registered = L.implementations()
    impl_names = [n for n in registered if n != "reference"] if impls is None else list(impls)
    unknown = [n for n in impl_names if n not in registered and n != SCAN_ANCHOR]
    if unknown:
        raise ValueError(f"unknown lightning implementation(s) {unknown}; registered: "
                         f"{sorted(registered)}")
    if SCAN_ANCHOR not in impl_names:
        impl_names.append(SCAN_ANCHOR)
    fla_mod = load_fla() if fla else None
    settings = dict(seq_lens=list(seq_lens), tokens=tokens, heads=heads, head_dim=head_dim,
                    dtype=dtype, impls=impl_names, chunk=chunk, repeats=repeats, warmup=warmup,
                    fla=fla_mod is not None, decay=f"minimax_decay(N, {LAYER_IDX}, {NUM_LAYERS})")
    log_decay = jnp.log(jnp.asarray(L.minimax_decay(heads, LAYER_IDX, NUM_LAYERS)))
    rows: list[dict[str, Any]] = []
    key = jax.random.key(seed)
    for t in seq_lens:
        b = max(1, tokens // t)
        key, *ks = jax.random.split(key, 5)
        q, k, v, do = (jax.random.normal(kk, (b, t, heads, head_dim), jnp.float32).astype(dt)
                       for kk in ks)
        q = q * head_dim ** -0.5  # keep outputs O(1) at scale 1 (MiniMax uses no 1/sqrt(H))
        why = L.explain(q, k, v, decay=jnp.exp(log_decay), plat=plat)
        checked: dict[str, tuple[bool, float]] = {}  # one check per implementation and T
        group: list[dict[str, Any]] = []
        for name in impl_names + ([FLA] if fla_mod is not None else []):
            for pass_ in PASSES:
                row = dict(impl=name, **{"pass": pass_}, T=t, B=b, N=heads, H=head_dim,
                           dtype="bfloat16" if name == FLA else dtype, ms=None, mtok_s=None,
                           ratio_fla=None, ratio_scan=None, max_abs_err=None, status=OK, note="")
                group.append(row)
                try:
                    if name == FLA:
                        row["ms"], row["ms_cuda_events"] = time_fla(fla_mod, q, k, v, do, pass_,
                                                                    repeats, warmup)
                    else:
                        _measure(row, why.get(name), plat, checked, (q, k, v, log_decay), do,
                                 chunk=chunk, tol=tol, repeats=repeats, warmup=warmup)
                    if row["ms"] is not None:
                        row["mtok_s"] = per_s(b * t, row["ms"])
                except Exception as e:  # one broken candidate must not end the run
                    row["status"], row["note"] = ERROR, short_error(e)
                if on_row:
                    on_row(row)
        _fill(group)
        rows.extend(group)
        del q, k, v, do
        if out is not None:
            write_json(out, _record(settings, rows, argv))
    return rows


def _measure(row, why, plat, checked, inputs, do, *, chunk, tol, repeats, warmup) -> None:
    """Fills ``row`` for one JAX candidate and pass: unsupported, interpreted (not timed), the
    check's result (run once per candidate and T, kept in ``checked``), then its time."""
    name, pass_ = row["impl"], row["pass"]
    if name != SCAN_ANCHOR and why is not None:
        row["status"], row["note"] = UNSUPPORTED, why
        return
    if runs_interpreted(name, plat):
        row["status"], row["note"] = SKIPPED, "Pallas interpret mode: not timed"
        return
    if name not in checked:
        checked[name] = _check(name, chunk, *inputs, tol)
    ok, row["max_abs_err"] = checked[name]
    if not ok:
        row["status"], row["note"] = FAILED, "check vs xla failed"
        return
    args = inputs + ((do,) if pass_ == "fwdbwd" else ())
    f = _jitted(name, pass_, chunk)
    row["ms"] = time_call(f, *args, repeats=repeats, warmup=warmup).median_ms


def _fill(group: list[dict[str, Any]]) -> None:
    by = {(r["impl"], r["pass"]): r for r in group}
    for r in group:
        if r["ms"]:
            for key, anchor in (("ratio_fla", FLA), ("ratio_scan", SCAN_ANCHOR)):
                a = by.get((anchor, r["pass"]))
                if a is not None and a["ms"]:
                    r[key] = a["ms"] / r["ms"]


def flatness(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """impl/pass -> Mtok/s at the longest T over Mtok/s at the shortest (1.0 = flat)."""
    out = {}
    for key in {(r["impl"], r["pass"]) for r in rows}:
        rs = sorted((r for r in rows if (r["impl"], r["pass"]) == key and r["mtok_s"]),
                    key=lambda r: r["T"])
        if len(rs) >= 2:
            out[f"{key[0]}/{key[1]}"] = rs[-1]["mtok_s"] / rs[0]["mtok_s"]
    return out


def _record(settings, rows, argv) -> dict[str, Any]:
    return run_record(argv, settings=dict(settings), rows=[dict(r) for r in rows],
                      flatness=flatness(rows))


def _fmt(row: dict[str, Any]) -> str:
    if "algo" in row:
        return lasp.format_row(row)
    return (f"{row['impl']:<26} {row['pass']:<6} T={row['T']:<7} B={row['B']:<3} "
            f"{num(row['ms'], '.3f'):>9} ms {num(row['mtok_s'], '.2f'):>8} Mtok/s "
            f"{row['status']:<11} {row['note']}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m attnlab.bench.lightning [options]``; returns 1 if a check FAILED/raised."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m attnlab.bench.lightning",
                                description="Time lightning attention (Mtokens/s, vs fla).")
    p.add_argument("--seq-lens", type=ints, default=None)
    p.add_argument("--tokens", type=int, default=65536, help="B * T per measurement")
    add_shape_args(p, heads=16)
    p.add_argument("--impls", default=None, help="comma-separated lightning impl names")
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--no-fla", action="store_true")
    add_timing_args(p, repeats=10)
    p.add_argument("--lasp", action="store_true", help="LASP / LASP-2 on 2 devices vs 1")
    p.add_argument("--lasp-devices", type=int, default=2,
                   help="mesh size for --lasp: 2, or 1 for the per-device compute alone")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    full_argv = ["python -m attnlab.bench.lightning", *argv]
    if a.smoke:
        a.tokens, a.heads, a.head_dim, a.dtype = 256, 2, 16, "float32"
        a.repeats, a.warmup, a.chunk = 2, 1, a.chunk or 16
    try:
        if a.lasp:
            lens = a.seq_lens or ([64] if a.smoke else [8192, 32768, 65536])
            rows = lasp.bench_lasp(
                seq_lens=lens, heads=a.heads, head_dim=a.head_dim, dtype=a.dtype,
                repeats=a.repeats, warmup=a.warmup, out=a.out, argv=full_argv,
                on_row=lambda r: print(_fmt(r), flush=True), devices=a.lasp_devices,
            )
        else:
            lens = a.seq_lens or ([64, 128] if a.smoke else [2048, 8192, 32768, 131072])
            rows = bench_lightning(
                seq_lens=lens, tokens=a.tokens, heads=a.heads, head_dim=a.head_dim,
                dtype=a.dtype, impls=names(a.impls),
                chunk=a.chunk, fla=not a.no_fla and not a.smoke, repeats=a.repeats,
                warmup=a.warmup, out=a.out, argv=full_argv,
                on_row=lambda r: print(_fmt(r), flush=True),
            )
            for k, f in sorted(flatness(rows).items()):
                print(f"flatness {k}: {f:.2f} (longest T / shortest T Mtok/s)")
    except ValueError as e:
        p.error(str(e))
    return 1 if any_failed(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
