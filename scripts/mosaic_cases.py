"""The Mosaic GPU forward on the calls beyond plain causal/full attention, against cuDNN (where it
takes the call) and ``pallas_triton``, timed in one run: GQA, a sliding window, packed documents
(segment ids) and soft-capped logits.

    python scripts/mosaic_cases.py --out $OUT/mosaic_cases.json

Cases (bf16, H = 128, B * S = 32K by default):

* ``gqa``: N = 32 query heads over K = 8 KV heads, causal, S = 32K;
* ``window``: 16 heads, causal with a 4K-token window (``local_window_size=(4096, 0)``), S = 32K;
* ``segments``: 16 heads, causal, S = 8K, four packed documents per row (segment ids);
* ``soft_cap``: 16 heads, causal, S = 8K, ``logits_soft_cap=30``.

Each implementation is checked against ``impl="xla"`` (blockwise, memory-linear) on the same
inputs before it is timed; an implementation that does not take the call (cuDNN has no segment
ids or soft-cap here) gets a row saying why. TFLOP/s count the (query, key) pairs the mask
keeps, 4 * H per pair and head. ``--smoke`` runs tiny shapes interpreted on CPU (the code path,
not the speed).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.bench import harness
from attnlab.ops import attention, explain
from attnlab.testing import random_qkv, tolerance

IMPLS = ("cudnn", "pallas_mosaic_gpu", "pallas_triton")


def cases(long: int, heads: int) -> list[dict[str, Any]]:
    """The four calls: name, S (None: the short length), N, K and the attention keywords
    (``segments``: documents per row, turned into segment ids)."""
    window = max(1, long // 8)
    return [
        dict(name="gqa", s=long, n=2 * heads, k=heads // 2, kw=dict(is_causal=True)),
        dict(name="window", s=long, n=heads, k=heads,
             kw=dict(is_causal=True, local_window_size=(window, 0))),
        dict(name="segments", s=None, n=heads, k=heads, kw=dict(is_causal=True), segments=4),
        dict(name="soft_cap", s=None, n=heads, k=heads,
             kw=dict(is_causal=True, logits_soft_cap=30.0)),
    ]


def kept_pairs(s: int, window: int | None, segments: int) -> int:
    """(query, key) pairs a causal row keeps: within its document and its window."""
    i = np.arange(s)
    start = (i // (s // segments)) * (s // segments)  # first key of the query's document
    lo = start if window is None else np.maximum(start, i - window)
    return int((i - lo + 1).sum())


def _call(q, k, v, seg, *, impl: str, kw: dict[str, Any]):
    return attention(q, k, v, segment_ids=seg, impl=impl, **kw)


def run(batch_tokens: int, long: int, short: int, heads: int, head_dim: int, *, repeats: int,
        warmup: int, out: str | None, argv) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    record = harness.run_record(argv, dims=dict(batch_tokens=batch_tokens, head_dim=head_dim),
                                dtype="bfloat16", rows=rows)
    tol = tolerance(jnp.bfloat16, "gpu").out
    for case in cases(long, heads):
        s, n, kh, kw = case["s"] or short, case["n"], case["k"], dict(case["kw"])
        b = max(1, batch_tokens // s)
        q, k, v = random_qkv(jax.random.key(s + n), b, s, s, n, kh, head_dim, jnp.bfloat16)
        segments = case.get("segments", 1)
        seg = (None if segments == 1
               else jnp.broadcast_to(jnp.arange(s) // (s // segments), (b, s)).astype(jnp.int32))
        window = kw.get("local_window_size", (None,))[0]
        flops = 4 * head_dim * n * b * kept_pairs(s, window, segments)
        args = (q, k, v, seg)
        want = jax.jit(functools.partial(_call, impl="xla", kw=kw))(*args)
        for impl in IMPLS:
            row: dict[str, Any] = dict(case=case["name"], S=s, B=b, N=n, K=kh, impl=impl)
            why = explain(q, k, v, segment_ids=seg, **kw).get(impl)
            if why:
                row["status"] = f"unsupported: {why}"
            else:  # bf16 outputs of O(1) values against xla's bf16: 4 output tolerances
                row.update(harness.check_then_time(
                    functools.partial(_call, impl=impl, kw=kw), args, want, tol * 4,
                    flops=flops, repeats=repeats, warmup=warmup))
            rows.append(row)
            print({k_: (round(x, 3) if isinstance(x, float) else x) for k_, x in row.items()},
                  flush=True)
        timed = {r["impl"]: r["ms"] for r in rows if r["case"] == case["name"] and r.get("ms")}
        for r in rows:
            if r["case"] == case["name"] and r.get("ms"):
                for anchor in ("cudnn", "pallas_triton"):
                    if anchor in timed:
                        r[f"ratio_{anchor}"] = timed[anchor] / r["ms"]
        if out:
            harness.write_json(out, record)
    return record


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python scripts/mosaic_cases.py",
                                description=__doc__.splitlines()[0])
    p.add_argument("--batch-tokens", type=int, default=32768)
    p.add_argument("--long", type=int, default=32768, help="S of the GQA and window cases")
    p.add_argument("--short", type=int, default=8192, help="S of the segments, soft-cap cases")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    harness.add_timing_args(p, repeats=10)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted on CPU")
    a = p.parse_args(argv)
    if a.smoke:
        a.batch_tokens, a.long, a.short, a.heads, a.head_dim = 128, 128, 128, 2, 64
        a.repeats = 1
    run(a.batch_tokens, a.long, a.short, a.heads, a.head_dim, repeats=a.repeats, warmup=a.warmup,
        out=a.out, argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
