"""Prints the README's performance table (markdown) from an `attnlab bench attention` JSON.

    python3 scripts/perf_table.py experiments/results/bench_attention_h100_*.json
"""

from __future__ import annotations

import json
import sys

COLUMNS = ["pallas_triton", "cudnn", "xla", "jax.nn[xla]", "tokamax[mosaic]", "tokamax[triton]"]


def table(path: str) -> str:
    with open(path) as f:
        d = json.load(f)
    rows: dict[tuple, dict[str, dict]] = {}
    for r in d["rows"]:
        rows.setdefault((r["S"], r["causal"], r["pass"]), {})[r["impl"]] = r
    head = f"{d['device_kind']}, JAX {d['jax_version']}, {d['date'][:10]}, " + (
        f"bf16, H={d['config']['heads']}, D={d['config']['head_dim']}, "
        f"B*S={d['config']['batch_tokens']}: TFLOP/s (ratio to cuDNN via jax.nn in the same run)"
    )
    out = [head, "", "| S | causal | pass | " + " | ".join(COLUMNS) + " |",
           "|---|---|---|" + "---|" * len(COLUMNS)]
    order = sorted(rows.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0]))
    for (s, causal, pas), impls in order:
        cells = []
        for c in COLUMNS:
            r = impls.get(c)
            if r is None or r.get("tflops") is None:
                cells.append("-" if r is None else r["status"].split()[0])
            else:
                ratio = r.get("ratio_cudnn")
                cells.append(f"{r['tflops']:.0f}" + (f" ({ratio:.2f})" if ratio else ""))
        out.append(f"| {s} | {'yes' if causal else 'no'} | {pas} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(table(p))
        print()
