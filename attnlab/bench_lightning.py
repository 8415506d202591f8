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

``python -m attnlab.bench_lightning --out bench_lightning.json`` (``--smoke``: tiny, CPU).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab import bench as _bench
from attnlab.ops import lightning as L
from attnlab.ops._registry import platform

SCAN_ANCHOR = "scan_anchor"
FLA = "fla.chunk_lightning_attn"
OK, FAILED, SKIPPED, UNSUPPORTED, ERROR = "ok", "FAILED", "skipped", "unsupported", "error"
LAYER_IDX, NUM_LAYERS = 1, 4  # decay = minimax_decay(N, 1, 4), as fla's (layer_idx, num_layers)


def scan_anchor(q, k, v, log_decay, chunk: int = 64) -> tuple[jax.Array, jax.Array]:
    """The plain chunked JAX version: ``lax.scan`` over chunks, all work inside the step.

    q, k [B, T, N, H], v [B, T, N, Hv], T a multiple of ``chunk``; no segment ids. Returns
    (o, final state). This is the anchor the kernels must beat by 5x.
    """
    b, t, n, h = q.shape
    hv = v.shape[-1]
    nc = t // chunk
    i = jnp.arange(chunk, dtype=jnp.float32)
    diff = i[:, None] - i[None, :]
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


def _fla():
    try:
        import torch
        from fla.ops.lightning_attn import chunk_lightning_attn
    except Exception:  # not installed, or no usable torch
        return None
    return (torch, chunk_lightning_attn) if torch.cuda.is_available() else None


def _time_fla(fla, q, k, v, do, pass_: str, repeats: int, warmup: int) -> tuple[float, float]:
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


def _check(name: str, chunk: int | None, q, k, v, log_decay, tol) -> tuple[bool, float]:
    """Checks ``name`` against impl="xla" on a slice; (ok, max abs err over o and state)."""
    t = min(q.shape[1], 2048)
    t -= t % (chunk or 64) if name == SCAN_ANCHOR else 0
    sl = lambda x: x[:1, :t]  # noqa: E731
    got = _jitted(name, "fwd", chunk)(sl(q), sl(k), sl(v), log_decay)
    want = _jitted("xla", "fwd", None)(sl(q), sl(k), sl(v), log_decay)
    err = max(_bench.max_abs_err(got[0], want[0]), _bench.max_abs_err(got[1], want[1]))
    ok = _bench.within(err, tol.out, want[0]) and _bench.within(err, tol.out, want[1])
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
    if dtype not in _bench.DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_bench.DTYPES)}, got {dtype!r}")
    if min(tokens, heads, head_dim) <= 0 or not seq_lens or min(seq_lens) <= 0:
        raise ValueError("tokens, heads, head_dim and seq_lens must be positive")
    plat = platform()
    dt = _bench.DTYPES[dtype]
    tol = _bench.tolerance(dt, plat)
    registered = L.implementations()
    names = [n for n in registered if n != "reference"] if impls is None else list(impls)
    unknown = [n for n in names if n not in registered and n != SCAN_ANCHOR]
    if unknown:
        raise ValueError(f"unknown lightning implementation(s) {unknown}; registered: "
                         f"{sorted(registered)}")
    if SCAN_ANCHOR not in names:
        names.append(SCAN_ANCHOR)
    fla_mod = _fla() if fla else None
    settings = dict(seq_lens=list(seq_lens), tokens=tokens, heads=heads, head_dim=head_dim,
                    dtype=dtype, impls=names, chunk=chunk, repeats=repeats, warmup=warmup,
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
        group: list[dict[str, Any]] = []
        why = L.explain(q, k, v, decay=jnp.exp(log_decay), plat=plat)
        for name in names:
            checked: tuple[bool, float] | None = None
            for pass_ in _bench.PASSES:
                row = dict(impl=name, **{"pass": pass_}, T=t, B=b, N=heads, H=head_dim,
                           dtype=dtype, ms=None, mtok_s=None, ratio_fla=None, ratio_scan=None,
                           max_abs_err=None, status=OK, note="")
                group.append(row)
                try:
                    if name != SCAN_ANCHOR and why.get(name) is not None:
                        row["status"], row["note"] = UNSUPPORTED, why[name]
                    elif plat == "cpu" and name.startswith("pallas"):
                        row["status"], row["note"] = SKIPPED, "Pallas interpret mode: not timed"
                    else:
                        if checked is None:
                            checked = _check(name, chunk, q, k, v, log_decay, tol)
                        row["max_abs_err"] = checked[1]
                        if not checked[0]:
                            row["status"], row["note"] = FAILED, "check vs xla failed"
                        else:
                            f = _jitted(name, pass_, chunk)
                            args = (q, k, v, log_decay) + ((do,) if pass_ == "fwdbwd" else ())
                            row["ms"] = _bench.time_call(f, *args, repeats=repeats,
                                                         warmup=warmup).median_ms
                            row["mtok_s"] = b * t / (row["ms"] * 1e-3) / 1e6
                except Exception as e:  # one broken candidate must not end the run
                    row["status"], row["note"] = ERROR, _bench.short_error(e)
                if on_row:
                    on_row(row)
        if fla_mod is not None:
            for pass_ in _bench.PASSES:
                row = dict(impl=FLA, **{"pass": pass_}, T=t, B=b, N=heads, H=head_dim,
                           dtype="bfloat16", ms=None, mtok_s=None, ratio_fla=None,
                           ratio_scan=None, max_abs_err=None, status=OK, note="")
                group.append(row)
                try:
                    row["ms"], row["ms_cuda_events"] = _time_fla(fla_mod, q, k, v, do, pass_,
                                                                 repeats, warmup)
                    row["mtok_s"] = b * t / (row["ms"] * 1e-3) / 1e6
                except Exception as e:
                    row["status"], row["note"] = ERROR, _bench.short_error(e)
                if on_row:
                    on_row(row)
        _fill(group)
        rows.extend(group)
        del q, k, v, do
        if out is not None:
            _bench.write_json(out, _record(settings, rows, argv))
    return rows


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


def bench_lasp(
    *,
    seq_lens: Sequence[int] = (8192, 32768, 65536),
    heads: int = 16,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
    out: str | Path | None = None,
    argv: Sequence[str] = (),
    on_row: Callable[[dict[str, Any]], None] | None = None,
    devices: int = 2,
) -> list[dict[str, Any]]:
    """LASP and LASP-2 fwd+bwd on P = ``devices`` devices at length P*T vs the single-device op
    at T (B = 1), inputs placed sequence-sharded beforehand; ``data_parallel`` (P sequences of
    T, one per device, no communication) shows what P devices give in the same harness, and two
    per-block pieces are timed alone the same way: ``local_with_state`` (the local op
    continuing an incoming state) and ``summary_only`` (the generic block summary,
    :func:`attnlab.ops.lightning.chunk_summary`, forward and backward: what LASP and LASP-2
    run per block over implementations without block phases of their own).

    ``devices=1`` runs every algorithm on a one-device mesh: the collectives are then no-ops,
    so each row's ratio to ``single`` is the per-device compute the algorithm adds (the
    question the 2-device rows cannot answer alone: compute or communication?).

    The loss is sum(o) + sum(final state) (the state is what the blocks pass on, so no
    algorithm's state path can be dropped as unused, also with one device).

    Returns rows: algo, devices, T, ms, mtok_s, speedup (vs 1 device at T), status, note.
    """
    from sharding.lasp import lasp_attention
    from sharding.lasp2 import lasp2_attention

    if devices not in (1, 2) or jax.device_count() < devices:
        raise ValueError(f"--lasp-devices must be 1 or 2 and at most the {jax.device_count()} "
                         f"devices found, got {devices}")
    dt = _bench.DTYPES[dtype]
    mesh = jax.make_mesh((devices,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:devices])
    decay = jnp.asarray(L.minimax_decay(heads, LAYER_IDX, NUM_LAYERS))
    def per_device(local):
        """``local(q, k, v)`` on each device's batch row, no communication (B = 2 rows)."""
        def run(q, k, v, decay, mesh, return_state):
            spec = jax.sharding.PartitionSpec("sp")
            return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                                 check_vma=False)(q, k, v)
        return run

    # P sequences of T, one per device: the harness's ideal.
    batch_split = per_device(lambda q, k, v: L.lightning_attention(
        q, k, v, decay=decay, return_state=True))
    # The same, each block continuing a (constant) incoming state: LASP-2's local op.
    with_state = per_device(lambda q, k, v: L.lightning_attention(
        q, k, v, decay=decay, return_state=True,
        initial_state=jnp.full((q.shape[0], heads, head_dim, head_dim), 0.01, jnp.float32)))
    # The generic block summary alone (q is unused).
    summary_only = per_device(lambda q, k, v: (jnp.zeros((1,), jnp.float32),
                                               L.chunk_summary(k, v, jnp.log(decay))[0]))

    algos = {"single": None, "data_parallel": batch_split, "local_with_state": with_state,
             "summary_only": summary_only, "lasp": lasp_attention, "lasp2": lasp2_attention}
    split_batch = (batch_split, with_state, summary_only)
    rows: list[dict[str, Any]] = []
    key = jax.random.key(seed)
    for t in seq_lens:
        base = None
        for name, algo in algos.items():
            length = t if algo is None else devices * t
            shape = (devices, t) if algo in split_batch else (1, length)
            key, *ks = jax.random.split(key, 4)
            q, k, v = (jax.random.normal(kk, (*shape, heads, head_dim)).astype(dt) * 0.1
                       for kk in ks)
            if algo is not None:  # placed as a sharded program would find its activations
                axis = 0 if algo in split_batch else 1
                spec = jax.sharding.PartitionSpec(*([None] * axis), "sp")
                q, k, v = jax.device_put((q, k, v), jax.sharding.NamedSharding(mesh, spec))

            def loss(q, k, v, algo=algo):
                if algo is None:
                    o, s = L.lightning_attention(q, k, v, decay=decay, return_state=True)
                else:
                    o, s = algo(q, k, v, decay=decay, mesh=mesh, return_state=True)
                return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

            row = dict(algo=name, devices=1 if algo is None else devices, T=length, ms=None,
                       mtok_s=None, speedup=None, status=OK, note="")
            try:
                # value_and_grad: the loss needs the output, so XLA keeps the forward kernels
                # (with grad alone it may drop those whose output the backward does not use).
                f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
                row["ms"] = _bench.time_call(f, q, k, v, repeats=repeats, warmup=warmup).median_ms
                row["mtok_s"] = length / (row["ms"] * 1e-3) / 1e6
                if algo is None:
                    base = row["mtok_s"]
                elif base:
                    row["speedup"] = row["mtok_s"] / base
            except Exception as e:
                row["status"], row["note"] = ERROR, _bench.short_error(e)
            rows.append(row)
            if on_row:
                on_row(row)
        if out is not None:
            _bench.write_json(out, _record(dict(seq_lens=list(seq_lens), heads=heads,
                                                head_dim=head_dim, dtype=dtype, mode="lasp",
                                                devices=devices),
                                           rows, argv))
    return rows


def _record(settings, rows, argv) -> dict[str, Any]:
    rec = {
        **_bench.environment(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "argv": list(argv), "settings": dict(settings), "rows": [dict(r) for r in rows],
    }
    if rows and "impl" in rows[0]:
        rec["flatness"] = flatness(rows)
    return rec


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _fmt(row: dict[str, Any]) -> str:
    num = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    if "algo" in row:
        return (f"{row['algo']:<8} dev={row['devices']} T={row['T']:<7} "
                f"{num(row['ms'], '.3f'):>9} ms {num(row['mtok_s'], '.2f'):>8} Mtok/s "
                f"speedup {num(row['speedup'], '.2f')} {row['status']} {row['note']}")
    return (f"{row['impl']:<26} {row['pass']:<6} T={row['T']:<7} B={row['B']:<3} "
            f"{num(row['ms'], '.3f'):>9} ms {num(row['mtok_s'], '.2f'):>8} Mtok/s "
            f"{row['status']:<11} {row['note']}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m attnlab.bench_lightning [options]``; returns 1 if a check FAILED/raised."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m attnlab.bench_lightning",
                                description="Time lightning attention (Mtokens/s, vs fla).")
    p.add_argument("--seq-lens", type=_ints, default=None)
    p.add_argument("--tokens", type=int, default=65536, help="B * T per measurement")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_bench.DTYPES))
    p.add_argument("--impls", default=None, help="comma-separated lightning impl names")
    p.add_argument("--chunk", type=int, default=None)
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lasp", action="store_true", help="LASP / LASP-2 on 2 devices vs 1")
    p.add_argument("--lasp-devices", type=int, default=2,
                   help="mesh size for --lasp: 2, or 1 for the per-device compute alone")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    full_argv = ["python -m attnlab.bench_lightning", *argv]
    if a.smoke:
        a.tokens, a.heads, a.head_dim, a.dtype = 256, 2, 16, "float32"
        a.repeats, a.warmup, a.chunk = 2, 1, a.chunk or 16
    try:
        if a.lasp:
            lens = a.seq_lens or ([64] if a.smoke else [8192, 32768, 65536])
            rows = bench_lasp(seq_lens=lens, heads=a.heads, head_dim=a.head_dim, dtype=a.dtype,
                              repeats=a.repeats, warmup=a.warmup, out=a.out, argv=full_argv,
                              on_row=lambda r: print(_fmt(r), flush=True),
                              devices=a.lasp_devices)
        else:
            lens = a.seq_lens or ([64, 128] if a.smoke else [2048, 8192, 32768, 131072])
            rows = bench_lightning(
                seq_lens=lens, tokens=a.tokens, heads=a.heads, head_dim=a.head_dim,
                dtype=a.dtype, impls=None if a.impls is None else a.impls.split(","),
                chunk=a.chunk, fla=not a.no_fla and not a.smoke, repeats=a.repeats,
                warmup=a.warmup, out=a.out, argv=full_argv,
                on_row=lambda r: print(_fmt(r), flush=True),
            )
            for k, f in sorted(flatness(rows).items()):
                print(f"flatness {k}: {f:.2f} (longest T / shortest T Mtok/s)")
    except ValueError as e:
        p.error(str(e))
    return 1 if any(r["status"] in (FAILED, ERROR) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
