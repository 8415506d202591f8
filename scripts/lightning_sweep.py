"""Block-size sweep of the Triton lightning kernels (GPU only): which ``LightningConfig`` is
fastest at one T, forward and forward+backward, each checked against the ``xla`` path first.

    python scripts/lightning_sweep.py --seq-len 2048 --out $OUT/lightning_sweep.json

Stage 1 times the forward of every candidate; stage 2 times forward+backward for the
``--top`` fastest forwards crossed with the backward-kernel launch options. fla's
``chunk_lightning_attn`` is timed on the same shapes when importable (the issue's anchor).
The JSON lists every row (config, ms, Mtok/s, max error) and the best config per pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.bench.harness import LAYER_IDX, NUM_LAYERS, time_call
from attnlab.bench.lightning import load_fla, time_fla
from attnlab.ops import lightning as L
from pallas_kernels.gpu.lightning_common import LightningConfig


def _median_ms(fn, args, repeats: int) -> float:
    return time_call(fn, *args, repeats=repeats, warmup=1).median_ms


def measure(cfg: LightningConfig, pass_: str, q, k, v, do, decay, ref, tol: float,
            repeats: int) -> dict[str, Any]:
    """Times one config's forward (after checking it against ``ref``, the xla output) or
    forward+backward (the output and its pullback of ``do``): status, ms, mtok_s,
    max_abs_err."""
    def fwd(q, k, v):
        return L.lightning_attention(q, k, v, decay=decay, impl="pallas_triton", config=cfg)

    row: dict[str, Any] = {}
    try:
        if pass_ == "fwd":
            fn = jax.jit(fwd)
            err = float(jnp.max(jnp.abs(fn(q, k, v).astype(jnp.float32)
                                        - ref.astype(jnp.float32))))
            row["max_abs_err"] = err
            if not err <= tol:
                row["status"] = f"wrong: max abs err {err:.3g} > {tol:.3g}"
                return row
        else:
            # The output is returned: a pass that only took gradients would let XLA drop the
            # forward kernels (their output is not needed by the backward), timing the
            # backward alone.
            def fn(q, k, v):
                o, pullback = jax.vjp(fwd, q, k, v)
                return o, pullback(do)

            fn = jax.jit(fn)
        ms = _median_ms(fn, (q, k, v), repeats)
        b, t = q.shape[:2]
        row.update(status="ok", ms=ms, mtok_s=b * t / ms / 1e3)
    except Exception as e:  # a config that does not compile (shared memory, say)
        row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
    return row


def forward_candidates() -> list[LightningConfig]:
    """Chunk x state tile x output-kernel launch options (legal on an H100 at H = 128)."""
    out = []
    for chunk, bv, (bks, bvs), (w, s), ws in itertools.product(
        (64, 128), (64, 128), ((64, 64), (128, 64), (64, 128), (128, 32)),
        ((4, 2), (8, 2), (4, 3)), (4, 8),
    ):
        if chunk == 128 and bv == 128 and w == 4:
            continue  # a [128, 128] f32 accumulator with 4 warps spills
        out.append(LightningConfig(chunk=chunk, block_v=bv, block_k_state=bks,
                                   block_v_state=bvs, num_warps=w, num_stages=s,
                                   num_warps_state=ws))
    return out


_C128 = dict(chunk=128, block_v=128, block_k_state=128, block_v_state=64, num_warps=8,
             num_warps_state=8, num_stages_bwd=2)
GRID = {
    "c64": LightningConfig(),
    "c128": LightningConfig(**_C128),
    # Fused forward (the output kernel's tile and warps, automatic segments unless named);
    # the backward is the two-phase one.
    "f128": LightningConfig(**_C128, fused_forward=True),
    "f128_v64": LightningConfig(**{**_C128, "block_v": 64}, fused_forward=True),
    "f128_w16": LightningConfig(**{**_C128, "num_warps": 16}, fused_forward=True),
    "f128_g16": LightningConfig(**_C128, fused_forward=True, segment_chunks=16),
    "f128_g64": LightningConfig(**_C128, fused_forward=True, segment_chunks=64),
    "f64_w8": LightningConfig(block_v=128, num_warps=8, fused_forward=True),
    "f64_v64": LightningConfig(block_v=64, num_warps=4, fused_forward=True),
    # H = 64: the two-phase forward against the fused one (the default since this grid).
    "h64": LightningConfig(block_v=64, num_warps=4, num_warps_bwd=4),
    "h64_fused": LightningConfig(block_v=64, num_warps=4, num_warps_bwd=4, fused_forward=True),
    "h64_c128_fused": LightningConfig(chunk=128, block_v=64, block_k_state=64, num_warps=8,
                                      num_warps_state=8, num_warps_bwd=4, fused_forward=True),
    "c64_s64x128": LightningConfig(block_k_state=64, block_v_state=128, num_warps_state=8,
                                   num_warps_bwd=4),
    "c128_s64x32": LightningConfig(chunk=128, block_v=128, block_k_state=64, block_v_state=32,
                                   num_warps=8, num_stages_bwd=2),
}


def grid(a: argparse.Namespace) -> int:
    """The chosen GRID configs at every T (--passes), plus fla, in one JSON."""
    t_start = time.perf_counter()
    n, h = a.heads, a.head_dim
    names = [x for x in a.configs.split(",") if x] if a.configs else list(GRID)
    unknown = sorted(set(names) - set(GRID))
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; known: {sorted(GRID)}")
    passes = a.passes.split(",")
    rows: list[dict[str, Any]] = []
    record = {"device_kind": jax.devices()[0].device_kind, "jax_version": jax.__version__,
              "N": n, "H": h, "tokens": a.tokens, "dtype": "bfloat16", "argv": sys.argv,
              "grid": {name: dataclasses.asdict(GRID[name]) for name in names}, "rows": rows}
    decay = jnp.asarray(L.minimax_decay(n, LAYER_IDX, NUM_LAYERS))
    fla = load_fla()
    for t in (int(x) for x in a.seq_lens.split(",")):
        b = max(1, a.tokens // t)
        ks = jax.random.split(jax.random.key(t), 4)
        q, k, v, do = (jax.random.normal(kk, (b, t, n, h), jnp.bfloat16) for kk in ks)
        q = q * h ** -0.5
        ref = jax.jit(lambda q, k, v: L.lightning_attention(q, k, v, decay=decay,
                                                            impl="xla"))(q, k, v)
        tol = 2e-2 * float(jnp.max(jnp.abs(ref.astype(jnp.float32)))) + 2e-2
        if fla is not None:
            for pass_ in passes:
                ms, ms_ev = time_fla(fla, q, k, v, do, pass_, a.repeats, 2)
                rows.append({"T": t, "B": b, "config": "fla", "pass": pass_, "status": "ok",
                             "ms": ms, "ms_cuda_events": ms_ev, "mtok_s": b * t / ms / 1e3})
                print(f"T={t} fla          {pass_:6s} {rows[-1]['mtok_s']:6.1f}", flush=True)
        for name in names:
            for pass_ in passes:
                if time.perf_counter() - t_start > a.budget_s:
                    record["stopped"] = "budget"
                    break
                row = {"T": t, "B": b, "config": name, "pass": pass_}
                row.update(measure(GRID[name], pass_, q, k, v, do, decay, ref, tol,
                                   a.repeats))
                rows.append(row)
                print(f"T={t} {name:12s} {pass_:6s} {row.get('mtok_s', 0):6.1f} {row['status']}",
                      flush=True)
            with open(a.out, "w") as f:
                json.dump(record, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/lightning_sweep.py")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--top", type=int, default=4)
    p.add_argument("--budget-s", type=float, default=400.0)
    p.add_argument("--grid", action="store_true",
                   help="time the named GRID configs at every --seq-lens T (fwd and fwdbwd)")
    p.add_argument("--seq-lens", default="2048,8192,32768,131072")
    p.add_argument("--configs", default="", help="comma-separated GRID names (default: all)")
    p.add_argument("--passes", default="fwd,fwdbwd")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.grid:
        return grid(a)
    t_start = time.perf_counter()
    t, n, h = a.seq_len, a.heads, a.head_dim
    b = max(1, a.tokens // t)
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(kk, (b, t, n, h), jnp.bfloat16) for kk in ks)
    decay = jnp.asarray(L.minimax_decay(n, LAYER_IDX, NUM_LAYERS))
    ref = jax.jit(lambda q, k, v: L.lightning_attention(q, k, v, decay=decay,
                                                        impl="xla"))(q, k, v)
    tol = 2e-2 * float(jnp.max(jnp.abs(ref.astype(jnp.float32)))) + 2e-2
    rows: list[dict[str, Any]] = []
    record: dict[str, Any] = {"device_kind": jax.devices()[0].device_kind,
                              "jax_version": jax.__version__, "T": t, "B": b, "N": n, "H": h,
                              "dtype": "bfloat16", "argv": sys.argv, "rows": rows}

    def flush() -> None:
        with open(a.out, "w") as f:
            json.dump(record, f, indent=1)

    def measure_row(cfg, pass_):
        return {"pass": pass_, "config": dataclasses.asdict(cfg),
                **measure(cfg, pass_, q, k, v, do, decay, ref, tol, a.repeats)}

    def over_budget() -> bool:
        return time.perf_counter() - t_start > a.budget_s

    default = LightningConfig.get_default(h, jnp.bfloat16)
    for pass_ in ("fwd", "fwdbwd"):
        r = measure_row(default, pass_)
        r["default"] = True
        rows.append(r)
        print(f"default {pass_}: {r.get('mtok_s', r['status'])}", flush=True)
    fla = load_fla()
    if fla is not None:
        for pass_ in ("fwd", "fwdbwd"):
            ms, ms_events = time_fla(fla, q, k, v, do, pass_, a.repeats, 2)
            record[f"fla_{pass_}_mtok_s"] = b * t / ms / 1e3
            record[f"fla_{pass_}_mtok_s_cuda_events"] = b * t / ms_events / 1e3
            print(f"fla {pass_}: {record[f'fla_{pass_}_mtok_s']:.1f} Mtok/s", flush=True)
    flush()

    for cfg in forward_candidates():
        if over_budget():
            record["stopped"] = "budget"
            break
        r = measure_row(cfg, "fwd")
        rows.append(r)
        print(f"fwd {r.get('mtok_s', 0):7.1f} {r['status'][:60]} {cfg}", flush=True)
        flush()
    fwd_ok = sorted((r for r in rows if r["pass"] == "fwd" and r["status"] == "ok"),
                    key=lambda r: -r["mtok_s"])
    tops = [LightningConfig(**r["config"]) for r in fwd_ok[: a.top]]
    for base, (wb, sb) in itertools.product(tops, ((8, 1), (4, 1), (8, 2))):
        if over_budget():
            record["stopped"] = "budget"
            break
        cfg = dataclasses.replace(base, num_warps_bwd=wb, num_stages_bwd=sb)
        r = measure_row(cfg, "fwdbwd")
        rows.append(r)
        print(f"fwdbwd {r.get('mtok_s', 0):7.1f} {r['status'][:60]} {cfg}", flush=True)
        flush()
    for pass_ in ("fwd", "fwdbwd"):
        ok = [r for r in rows if r["pass"] == pass_ and r["status"] == "ok"]
        if ok:
            record[f"best_{pass_}"] = max(ok, key=lambda r: r["mtok_s"])
    flush()
    print(json.dumps({key: record.get(key) for key in ("best_fwd", "best_fwdbwd")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
