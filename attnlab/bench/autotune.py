"""Block-size search for the Triton flash-attention kernels, run on the GPU it tunes for.

    python -m attnlab.bench.autotune --table pallas_kernels/gpu/tuned_configs.json --out sweep.json

For each head dim and mask (causal / full) it times the forward pass over a grid of
(block_q, block_kv, num_warps, num_stages), then the forward+backward pass over the backward
tiles by coordinate descent (dK/dV tile first, then dQ tile), and writes the winners into the
tuned table (keyed by device kind; see ``pallas_kernels/gpu/tuned.py``). Every candidate's
output is compared with the first candidate's before it is timed; a candidate that fails to
compile or disagrees is recorded and skipped. ``--budget-s`` stops the search early, keeping
the best found so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.bench.harness import attention_flops, short_error, tflops_per_s, time_call
from attnlab.ops import attention
from pallas_kernels.gpu.flash_common import FlashConfig
from pallas_kernels.gpu.tuned import table_key

FWD_GRID = {
    "block_q": (64, 128),
    "block_kv": (32, 64, 128),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4),
}
DKV_TILES = ((64, 64), (64, 128), (32, 128), (128, 64))  # (block_q_dkv, block_kv_dkv)
DQ_TILES = ((64, 64), (128, 64), (128, 32))  # (block_q_dq, block_kv_dq)
BWD_LAUNCH = ((4, 2), (8, 2), (8, 3))  # (num_warps_bwd, num_stages_bwd)
FWD_FIELDS = ("block_q", "block_kv", "num_warps", "num_stages")
BWD_FIELDS = (
    "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq", "num_warps_bwd", "num_stages_bwd"
)


@dataclasses.dataclass
class Trial:
    part: str
    head_dim: int
    causal: bool
    config: dict[str, int]
    ms: float | None
    tflops: float | None
    status: str


def _inputs(seq: int, batch: int, heads: int, head_dim: int, dtype: Any, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 4)
    shape = (batch, seq, heads, head_dim)
    q, k, v, ct = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in ks)
    return q, k, v, ct


def _fwd(cfg: FlashConfig, causal: bool):
    return jax.jit(lambda q, k, v: attention(q, k, v, is_causal=causal, impl="pallas_triton",
                                             config=cfg))


def _fwdbwd(cfg: FlashConfig, causal: bool):
    def loss(q, k, v, ct):
        out = attention(q, k, v, is_causal=causal, impl="pallas_triton", config=cfg)
        return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _run(part, fn, args, want, cfg, head_dim, causal, flops, repeats, tol) -> Trial:
    fields = FWD_FIELDS if part == "fwd" else BWD_FIELDS
    conf = {f: getattr(cfg, f) for f in fields}
    try:
        got = jax.block_until_ready(fn(*args))
    except Exception as e:  # compile failure (shared memory, registers) is a result here
        return Trial(part, head_dim, causal, conf, None, None, f"error: {short_error(e)}")
    if want is not None:
        err = max(
            float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))
        )
        if not np.isfinite(err) or err > tol:
            return Trial(part, head_dim, causal, conf, None, None, f"mismatch {err:.3g}")
    ms = time_call(fn, *args, repeats=repeats, warmup=2).median_ms
    return Trial(part, head_dim, causal, conf, ms, tflops_per_s(flops, ms), "ok")


def tune(
    *, head_dims: Sequence[int], seq: int, batch_tokens: int, heads: int, dtype: Any,
    repeats: int, budget_s: float, log=print,
) -> tuple[dict[str, dict[str, int]], list[Trial]]:
    """Runs the search; returns (table entries for this device, every trial)."""
    t_end = time.monotonic() + budget_s
    batch = max(1, batch_tokens // seq)
    entries: dict[str, dict[str, int]] = {}
    trials: list[Trial] = []
    tol = 2e-2 if jnp.dtype(dtype).itemsize == 2 else 2e-3
    for h in head_dims:
        q, k, v, ct = _inputs(seq, batch, heads, h, dtype)
        base = FlashConfig.get_default(head_dim=h)
        for causal in (True, False):
            flops = attention_flops(batch, seq, heads, h, causal=causal, pass_="fwd")
            want, best = None, None
            for values in itertools.product(*FWD_GRID.values()):
                if time.monotonic() > t_end:
                    log("autotune: budget spent; keeping the best so far")
                    break
                cfg = dataclasses.replace(base, **dict(zip(FWD_GRID, values)))
                tr = _run("fwd", _fwd(cfg, causal), (q, k, v), want, cfg, h, causal, flops,
                          repeats, tol)
                trials.append(tr)
                log(f"fwd h{h} causal={causal} {tr.config} -> {tr.status} "
                    f"{'' if tr.ms is None else f'{tr.ms:.3f} ms {tr.tflops:.0f} TFLOP/s'}")
                if tr.status == "ok" and want is None:
                    want = _fwd(cfg, causal)(q, k, v)
                if tr.ms is not None and (best is None or tr.ms < best.ms):
                    best = tr
            if best is not None:
                entries[table_key("fwd", h, causal)] = best.config
        # Backward: causal only (the training case), reused for full attention.
        fwd_best = entries.get(table_key("fwd", h, True), {})
        bwd = _tune_bwd(dataclasses.replace(base, **fwd_best), (q, k, v, ct), h, batch, seq,
                        heads, repeats, tol, t_end, trials, log)
        if bwd is not None:
            entries[table_key("bwd", h, True)] = bwd
            entries[table_key("bwd", h, False)] = bwd
    return entries, trials


def _tune_bwd(cfg, args, h, batch, seq, heads, repeats, tol, t_end, trials, log):
    """Coordinate descent over the backward tiles: dK/dV tile and launch, then dQ tile."""
    flops = attention_flops(batch, seq, heads, h, causal=True, pass_="fwdbwd")
    want, best = None, None

    def consider(c: FlashConfig) -> None:
        nonlocal want, best
        tr = _run("bwd", _fwdbwd(c, True), args, want, c, h, True, flops, repeats, tol)
        trials.append(tr)
        log(f"bwd h{h} {tr.config} -> {tr.status} "
            f"{'' if tr.ms is None else f'{tr.ms:.3f} ms {tr.tflops:.0f} TFLOP/s'}")
        if tr.status == "ok" and want is None:
            want = _fwdbwd(c, True)(*args)
        if tr.ms is not None and (best is None or tr.ms < best[0].ms):
            best = (tr, c)

    for (bq, bk), (w, st) in itertools.product(DKV_TILES, BWD_LAUNCH):
        if time.monotonic() > t_end:
            break
        consider(dataclasses.replace(cfg, block_q_dkv=bq, block_kv_dkv=bk, num_warps_bwd=w,
                                     num_stages_bwd=st))
    if best is None:
        return None
    for bq, bk in DQ_TILES[1:]:
        if time.monotonic() > t_end:
            break
        consider(dataclasses.replace(best[1], block_q_dq=bq, block_kv_dq=bk))
    return best[0].config


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m attnlab.bench.autotune", description=__doc__.split("\n")[0]
    )
    p.add_argument("--head-dims", default="128")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch-tokens", type=int, default=32768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument("--table", default=None, help="tuned table to update (JSON)")
    p.add_argument("--out", default=None, help="where to write every trial (JSON)")
    a = p.parse_args(argv)
    if jax.default_backend() not in ("gpu", "cuda"):
        p.error(f"autotune times compiled Triton kernels and needs a CUDA GPU, "
                f"not {jax.default_backend()}")
    kind = jax.devices()[0].device_kind
    entries, trials = tune(
        head_dims=[int(x) for x in a.head_dims.split(",")], seq=a.seq,
        batch_tokens=a.batch_tokens, heads=a.heads, dtype=jnp.dtype(a.dtype),
        repeats=a.repeats, budget_s=a.budget_s,
    )
    if a.table:
        path = Path(a.table)
        table = json.loads(path.read_text()) if path.exists() else {}
        table.setdefault(kind, {}).update(entries)
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(entries)} entries for {kind!r} to {path}")
    if a.out:
        rec = {
            "device_kind": kind, "jax_version": jax.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": vars(a),
            "chosen": entries, "trials": [dataclasses.asdict(t) for t in trials],
        }
        Path(a.out).write_text(json.dumps(rec, indent=1) + "\n")
    for key, val in entries.items():
        print(key, val)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
