"""Training throughput of whole models: tokens/s and MFU of timed train steps.

    python -m attnlab.bench.model --out $OUT/bench_model.json            # H100 / H200
    python -m attnlab.bench.model --smoke --out /tmp/bench_model.json    # CPU, seconds

Configurations (``--only`` picks some by name):

* ``softmax_4k``: the ~350M softmax model (``350m`` preset) at seq 4096, bf16 compute,
  ``attention_impl`` from ``--impls`` (default ``auto``, the fastest that supports the call;
  one row per impl).
* ``softmax_32k`` and ``hybrid_32k``: the same model at seq 32768 (batch 1), all softmax vs
  MiniMax's 7:1 lightning:softmax pattern; the record's ``hybrid_vs_softmax_32k`` is the
  tokens/s ratio (the bar is >= 2x).

Each configuration: compile, ``--warmup`` untimed steps, then ``--steps`` timed steps (each
waited for), on packed standard-library batches. MFU counts
``model.flops_per_token(seq_len)`` against the device's dense bf16 peak
(:data:`attnlab.train.metrics.PEAK_FLOPS`; null on CPU). That count follows PaLM (the
softmax score and value matmuls counted over all S keys, not halved for causality);
``mfu_causal`` counts them over S / 2 keys, about what a causal query sees on average.
The JSON is rewritten after every configuration; one that fails (out of memory, say) is
recorded with its error and the next one runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

HYBRID_BAR = 2.0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelBench:
    """One timed configuration."""

    name: str
    attention: str  # softmax | hybrid
    seq_len: int
    batch_size: int
    impl: str = "auto"


def configurations(smoke: bool, impls: Sequence[str]) -> list[ModelBench]:
    """The configurations of a full (GPU) or ``smoke`` (CPU) run."""
    if smoke:
        return [ModelBench(name="softmax_4k", attention="softmax", seq_len=64, batch_size=2),
                ModelBench(name="softmax_32k", attention="softmax", seq_len=128, batch_size=1),
                ModelBench(name="hybrid_32k", attention="hybrid", seq_len=128, batch_size=1)]
    rows = [ModelBench(name="softmax_4k", attention="softmax", seq_len=4096, batch_size=8,
                       impl=impl) for impl in impls]
    return rows + [
        ModelBench(name="softmax_32k", attention="softmax", seq_len=32768, batch_size=1),
        ModelBench(name="hybrid_32k", attention="hybrid", seq_len=32768, batch_size=1),
    ]


def run_one(mb: ModelBench, *, smoke: bool, warmup: int, steps: int) -> dict[str, Any]:
    """Times ``steps`` train steps of one configuration; returns its JSON row."""
    import jax
    import jax.numpy as jnp

    from attnlab.train import load_run_config, prepare
    from attnlab.train.metrics import mfu
    from attnlab.train.optim import make_optimizer
    from attnlab.train.presets import replace_model
    from attnlab.train.trainer import init_state, make_train_step

    row: dict[str, Any] = {"name": mb.name, "attention": mb.attention, "seq_len": mb.seq_len,
                           "batch_size": mb.batch_size, "impl": mb.impl}
    try:
        model, tc = load_run_config("tiny" if smoke else "350m", attention=mb.attention)
        model = replace_model(model, max_seq_len=max(mb.seq_len, model.max_seq_len),
                              attention_impl=mb.impl)
        if smoke:
            model = replace_model(model, d_model=32, num_heads=2)
        tc = dataclasses.replace(
            tc, steps=warmup + steps + 1, warmup_steps=1, seq_len=mb.seq_len,
            batch_size=mb.batch_size, task="stdlib", task_options={},
            dtype="float32" if smoke else "bfloat16", data_parallel=1, eval_batches=0,
            fast_compile=smoke,
        )
        row["layer_pattern"] = model.layer_pattern
        cfg, dataset, mesh = prepare(model, tc)
        tx = make_optimizer(tc)
        t0 = time.perf_counter()
        abstract, graphdef, params, rest, opt_state = init_state(cfg, tc, mesh, tx)
        row["num_params"] = abstract.num_params()
        flops_per_token = abstract.flops_per_token(mb.seq_len)
        row["flops_per_token"] = flops_per_token
        # The causal view of the same step: a query sees about S / 2 keys on average, so the
        # softmax score/value term is halved. It is linear in S (no window here) and every
        # other term does not depend on S, so the halved count is the mean of the counts at S
        # and at 0. Reported beside the PaLM-convention MFU, not instead of it.
        causal_flops = (0.5 * (flops_per_token + abstract.flops_per_token(0))
                        if cfg.local_window_size is None else None)
        row["flops_per_token_causal"] = causal_flops
        step = make_train_step(graphdef, rest, tx, tc)
        batches = [jax.device_put(dataset.batch(i, mb.batch_size)) for i in range(warmup + steps)]
        params, opt_state, m = step(params, opt_state, batches[0], jnp.int32(0))
        jax.block_until_ready(m)
        row["compile_and_first_step_s"] = time.perf_counter() - t0
        for i in range(1, warmup):
            params, opt_state, m = step(params, opt_state, batches[i], jnp.int32(i))
        jax.block_until_ready((params, m))
        times, losses = [], []
        for i in range(warmup, warmup + steps):
            t = time.perf_counter()
            params, opt_state, m = step(params, opt_state, batches[i], jnp.int32(i))
            jax.block_until_ready((params, m))
            times.append(time.perf_counter() - t)
            losses.append(float(m["loss"]))
        med = statistics.median(times)
        tps = mb.batch_size * mb.seq_len / med
        dev = mesh.devices.flat[0].device_kind
        row.update(status="ok", step_ms=med * 1e3, step_ms_all=[t * 1e3 for t in times],
                   tokens_per_s=tps, mfu=mfu(flops_per_token, tps, dev, 1),
                   mfu_causal=None if causal_flops is None else mfu(causal_flops, tps, dev, 1),
                   losses=losses,
                   finite=all(map(lambda x: x == x and abs(x) != float("inf"), losses)))
    except Exception as e:  # an OOM or a missing mechanism is a finding; go on
        from attnlab.bench.harness import short_error

        row.update(status="error", error=short_error(e))
    finally:
        gc.collect()
        jax.clear_caches()
    return row


def record(rows: list[dict[str, Any]], argv: Sequence[str]) -> dict[str, Any]:
    """The JSON record: environment, rows, and the hybrid / softmax tokens/s ratio at 32k."""
    from attnlab.bench.harness import run_record

    by = {r["name"]: r for r in rows if r.get("status") == "ok"}
    ratio = None
    if "softmax_32k" in by and "hybrid_32k" in by:
        ratio = by["hybrid_32k"]["tokens_per_s"] / by["softmax_32k"]["tokens_per_s"]
    return run_record(argv, rows=rows, hybrid_vs_softmax_32k=ratio, hybrid_bar=HYBRID_BAR,
                      hybrid_bar_met=None if ratio is None else ratio >= HYBRID_BAR)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the configurations, rewriting ``--out`` after each; returns 0 (1 if none ran)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m attnlab.bench.model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON path")
    p.add_argument("--smoke", action="store_true", help="tiny CPU configurations")
    p.add_argument("--only", default=None,
                   help="comma list of softmax_4k, softmax_32k, hybrid_32k (default all)")
    p.add_argument("--impls", default="auto", help="attention impls for softmax_4k (comma list)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    args = p.parse_args(argv)
    from attnlab.bench.harness import write_json

    configs = configurations(args.smoke, [i.strip() for i in args.impls.split(",") if i.strip()])
    if args.only:
        names = {n.strip() for n in args.only.split(",")}
        unknown = names - {c.name for c in configs}
        if unknown:
            p.error(f"unknown --only {sorted(unknown)}; choose among "
                    f"{sorted({c.name for c in configs})}")
        configs = [c for c in configs if c.name in names]
    rows: list[dict[str, Any]] = []
    for mb in configs:
        print(f"{mb.name} ({mb.attention}, seq {mb.seq_len}, batch {mb.batch_size}, "
              f"impl {mb.impl}) ...", flush=True)
        row = run_one(mb, smoke=args.smoke, warmup=max(1, args.warmup), steps=args.steps)
        rows.append(row)
        write_json(args.out, record(rows, ["python", "-m", "attnlab.bench.model", *argv]))
        if row["status"] == "ok":
            mfu_s = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
            print(f"  {row['tokens_per_s']:,.0f} tokens/s, {row['step_ms']:.1f} ms/step, MFU "
                  f"{mfu_s}, {row['num_params']:,} params", flush=True)
        else:
            print(f"  error: {row['error']}", flush=True)
    rec = record(rows, argv)
    if rec["hybrid_vs_softmax_32k"] is not None:
        print(f"hybrid / softmax tokens/s at 32k: {rec['hybrid_vs_softmax_32k']:.2f}x "
              f"(bar {HYBRID_BAR}x)")
    print(f"wrote {args.out}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
