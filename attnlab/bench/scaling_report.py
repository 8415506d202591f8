"""What the scaling benchmark reports: the derived table, the issue's bars, a markdown table
and a figure, all computed from the JSON record (so ``--replot`` redraws an old run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attnlab.bench.scaling_plan import RING_TYPES, SINGLE, SINGLE_BEST, log

BARS = {  # issue 7: (kind, strategies, threshold)
    "ring_zigzag_fwdbwd_efficiency_8": ("softmax", ("ring", "zigzag"), 0.85),
    "lasp2_fwdbwd_efficiency_8": ("lightning", ("lasp2",), 0.90),
}
STAR_BAR = 5.0  # star prefill >= 5x faster than ring prefill at 1M tokens on 8 GPUs


# ----------------------------------------------------------------------------- derived


def derive_table(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per timed (kind, mesh, strategy, S): time, compute-only time, efficiencies
    and communication, from the record's rows (recomputed on every write)."""
    rows = data.get("rows", [])
    ok = [r for r in rows if r.get("status") == "ok" and r.get("ms")]
    full = [r for r in ok if r["mode"] == "time"]
    co = {(r["kind"], r["mesh"], r["strategy"], r["s"]): r["ms"] for r in ok
          if r["mode"] == "compute_only"}
    base = {(r["kind"], r["s"]): r["ms"] for r in full if r["strategy"] == SINGLE}
    best = {r["s"]: r["ms"] for r in full if r["strategy"] == SINGLE_BEST}
    base_status = {(r["kind"], r["s"]): r.get("status", "") for r in rows
                   if r.get("strategy") == SINGLE and r.get("mode") == "time"}
    table = []
    for r in full:
        kind, s, dev = r["kind"], r["s"], r["devices"]
        e = {k: r[k] for k in ("kind", "mesh", "devices", "data", "sp", "strategy", "s", "ms")}
        e["compute_only_ms"] = co.get((kind, r["mesh"], r["strategy"], s))
        if e["compute_only_ms"] is not None:
            e["comm_exposed_ms"] = r["ms"] - e["compute_only_ms"]
        elif dev > 1:
            e["compute_only_reason"] = (
                "no communicate=False mode" if r["strategy"] not in RING_TYPES
                else "not measured")
        t1 = base.get((kind, s))
        if t1 is not None:
            e["efficiency"] = r["data"] * t1 / (dev * r["ms"])
            if e["compute_only_ms"]:
                e["efficiency_compute_only"] = r["data"] * t1 / (dev * e["compute_only_ms"])
            if r["data"] > 1:
                e["efficiency_note"] = f"1-device time at B=1 times B={r['data']}"
        else:
            e["efficiency"] = None
            st = base_status.get((kind, s))
            e["efficiency_reason"] = (
                f"1-device row {st}" if st else "1 device not measured at this length")
            shorter = [(s1, t) for (k1, s1), t in base.items() if k1 == kind and s1 < s]
            if shorter:
                s1, t = max(shorter)
                p = 2 if kind == "softmax" else 1
                e["efficiency_extrapolated"] = r["data"] * t * (s / s1) ** p / (dev * r["ms"])
                e["extrapolated_from_s"] = s1
        if kind == "softmax" and best.get(s):
            e["efficiency_vs_best_single"] = r["data"] * best[s] / (dev * r["ms"])
        if r.get("comm"):
            e["comm_bytes"] = r["comm"]["total_bytes"]
        if r.get("comm_expected"):
            e["comm_expected_bytes"] = r["comm_expected"]["bytes"]
            if r["comm_expected"].get("bytes_if_hops_merged"):
                e["comm_expected_merged_bytes"] = r["comm_expected"]["bytes_if_hops_merged"]
            if e.get("comm_bytes") is not None and r["comm_expected"]["bytes"]:
                e["comm_ratio"] = e["comm_bytes"] / r["comm_expected"]["bytes"]
        table.append(e)
    return table


def evaluate_bars(data: dict[str, Any]) -> dict[str, Any]:
    """The issue's bars from the table: value, met / missed / not measured, and why."""
    cpu = data.get("platform") == "cpu"
    out: dict[str, Any] = {}
    table = data.get("table", [])
    for name, (kind, strategies, threshold) in BARS.items():
        per = {}
        for st in strategies:
            es = [e for e in table if e["kind"] == kind and e["strategy"] == st
                  and e["sp"] == 8 and e["data"] == 1]
            measured = [e for e in es if e.get("efficiency") is not None]
            if not measured:
                per[st] = {"status": "not measured", "longest_s_timed":
                           max((e["s"] for e in es), default=None)}
                continue
            e = max(measured, key=lambda e: e["s"])
            per[st] = {"s": e["s"], "efficiency": e["efficiency"],
                       "status": "met" if e["efficiency"] >= threshold else "missed",
                       "longest_s_timed": max(x["s"] for x in es)}
        statuses = {v["status"] for v in per.values()}
        status = ("met" if statuses == {"met"} else "missed" if "missed" in statuses
                  else "not measured")
        out[name] = {"threshold": threshold, "status": status, "per_strategy": per}
    star = data.get("star", {})
    if star.get("speedup_star_vs_ring") is not None:
        sp = star["speedup_star_vs_ring"]
        first = (star.get("rows") or [{}])[0]
        out["star_prefill_speedup_8"] = {"threshold": STAR_BAR, "value": sp,
                                         "s": first.get("s"), "devices": first.get("devices"),
                                         "status": "met" if sp >= STAR_BAR else "missed"}
    else:
        out["star_prefill_speedup_8"] = {"threshold": STAR_BAR, "status": "not measured",
                                         "why": f"star: {star.get('status', 'unknown')}"}
    if cpu:
        for v in out.values():
            v["status"] = f"not applicable on CPU (was: {v['status']})"
    return out


# ----------------------------------------------------------------------------- report


def markdown(data: dict[str, Any]) -> str:
    """The README table: per timed row, time, compute-only time, efficiency, communication."""
    head = ("| kind | strategy | mesh | S | ms | compute-only ms | efficiency | "
            "comm / device (measured / analytic) |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]

    def num(x, f):
        return "–" if x is None else format(x, f)

    for e in sorted(data.get("table", []), key=lambda e: (e["kind"], e["strategy"],
                                                           e["devices"], e["mesh"], e["s"])):
        eff = num(e.get("efficiency"), ".2f")
        if e.get("efficiency") is None and e.get("efficiency_extrapolated") is not None:
            eff = f"~{e['efficiency_extrapolated']:.2f} (extrapolated)"
        comm = "–"
        if e.get("comm_bytes") is not None:
            exp = e.get("comm_expected_bytes")
            comm = f"{_mib(e['comm_bytes'])} / {_mib(exp) if exp else '–'}"
            if exp and e["comm_bytes"] != exp and e.get("comm_expected_merged_bytes") == e[
                    "comm_bytes"]:
                comm += " (= with the backward's K/V hops merged into the forward's)"
        lines.append(f"| {e['kind']} | {e['strategy']} | {e['mesh']} | {e['s']} | "
                     f"{num(e['ms'], '.2f')} | {num(e.get('compute_only_ms'), '.2f')} | {eff} | "
                     f"{comm} |")
    ml = [m for m in data.get("maxlen", []) if m.get("max_s")]
    if ml:
        lines += ["", "| kind | strategy | mesh | max length (fwd+bwd fits) |", "|---|---|---|---|"]
        lines += [f"| {m['kind']} | {m['strategy']} | {m['mesh']} | {m['max_s']}"
                  f"{'' if m.get('complete', True) else ' (partial)'} |" for m in ml]
    return "\n".join(lines)


def _mib(n: float) -> str:
    return f"{n / 2**20:.3g} MiB"


def _fmt_len(s: int) -> str:
    """131072 -> "128K", 1048576 -> "1M", 96 -> "96"."""
    for shift, unit in ((20, "M"), (10, "K")):
        if s >= 1 << shift and s % (1 << shift) == 0:
            return f"{s >> shift}{unit}"
    return str(s)


def plot(data: dict[str, Any], path: str) -> bool:
    """Efficiency vs devices, time vs length, communication vs length, max lengths (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        log(f"no plot: matplotlib is not importable ({e}); the JSON has every number "
            "(`--replot JSON --plot PNG` draws it where matplotlib is installed)")
        return False
    from matplotlib.ticker import FuncFormatter

    lengths = FuncFormatter(lambda x, _: _fmt_len(int(round(x))))
    table = data.get("table", [])
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    top_dev = max((e["devices"] for e in table if e["data"] == 1), default=1)
    _efficiency_panel(axes[0][0], table)
    _time_panel(axes[0][1], table, top_dev, lengths)
    _comm_panel(axes[1][0], table, top_dev, lengths)
    _maxlen_panel(axes[1][1], data, lengths)
    where = f"{data.get('device_count')} x {data.get('device_kind')}"
    title = f"attnlab sequence-parallel scaling, {where}, {data.get('date', '')[:10]}"
    if data.get("platform") == "cpu":
        title += ("\nCPU SMOKE on simulated devices: correctness and communication volume only; "
                  "timings, efficiencies and max lengths are meaningless")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"wrote {path}")
    return True


def _efficiency_panel(ax: Any, table: list[dict[str, Any]]) -> None:
    """Scaling efficiency vs devices at the length most meshes ran (``DxP`` meshes as points)."""
    with_eff = [e for e in table if e.get("efficiency") is not None]
    if with_eff:
        s_plot = max({e["s"] for e in with_eff}, key=lambda s: (
            len({e["mesh"] for e in with_eff if e["s"] == s}), s))
        for (kind, st) in sorted({(e["kind"], e["strategy"]) for e in with_eff}):
            es = sorted((e for e in with_eff if e["kind"] == kind and e["strategy"] == st
                         and e["s"] == s_plot), key=lambda e: e["devices"])
            line = [e for e in es if e["data"] == 1]
            if line and st != SINGLE:
                line = [e for e in with_eff if e["kind"] == kind and e["strategy"] == SINGLE
                        and e["s"] == s_plot] + line
                ax.plot([e["devices"] for e in line], [e["efficiency"] for e in line], "o-",
                        label=f"{kind}/{st}")
            for e in (e for e in es if e["data"] > 1):
                ax.plot([e["devices"]], [e["efficiency"]], "x", ms=9,
                        label=f"{kind}/{st} {e['mesh']}")
        ax.set_title(f"scaling efficiency vs devices at S={s_plot}")
    for y, lab in ((0.85, "ring/zigzag bar"), (0.90, "LASP-2 bar")):
        ax.axhline(y, ls=":", lw=1, color="gray")
        ax.text(1, y, lab, fontsize=7, va="bottom", color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.set_xlabel("devices")
    ax.set_ylabel("B t(1) / (devices t(mesh))")
    ax.legend(fontsize=7)


def _time_panel(ax: Any, table: list[dict[str, Any]], top_dev: int, lengths: Any) -> None:
    """fwd+bwd time vs length on one device and the largest mesh (dashed: compute only)."""
    for (kind, st, mesh) in sorted({(e["kind"], e["strategy"], e["mesh"]) for e in table
                                    if e["mesh"] in ("1", str(top_dev))}):
        es = sorted((e for e in table if (e["kind"], e["strategy"], e["mesh"]) ==
                     (kind, st, mesh)), key=lambda e: e["s"])
        (ln,) = ax.plot([e["s"] for e in es], [e["ms"] for e in es], "o-",
                        label=f"{kind}/{st} ({mesh} dev)")
        co = [e for e in es if e.get("compute_only_ms")]
        if co:
            ax.plot([e["s"] for e in co], [e["compute_only_ms"] for e in co], "--",
                    color=ln.get_color(), label=f"{kind}/{st} compute only")
    _log_axes(ax, lengths, "fwd+bwd ms", f"time vs length: 1 device and {top_dev} devices "
              "(dashed: no communication)", legend_size=6)


def _comm_panel(ax: Any, table: list[dict[str, Any]], top_dev: int, lengths: Any) -> None:
    """Communication per device vs length on the largest mesh: HLO (o) vs analytic (+)."""
    for (kind, st) in sorted({(e["kind"], e["strategy"]) for e in table
                              if e.get("comm_bytes") and e["mesh"] == str(top_dev)}):
        es = sorted((e for e in table if (e["kind"], e["strategy"], e["mesh"]) ==
                     (kind, st, str(top_dev)) and e.get("comm_bytes")), key=lambda e: e["s"])
        (ln,) = ax.plot([e["s"] for e in es], [e["comm_bytes"] / 2**20 for e in es], "o-",
                        label=f"{st} (HLO)")
        ex = [e for e in es if e.get("comm_expected_bytes")]
        ax.plot([e["s"] for e in ex], [e["comm_expected_bytes"] / 2**20 for e in ex], "+",
                ms=12, color=ln.get_color())
    _log_axes(ax, lengths, "MiB per device, one fwd+bwd", f"communication on {top_dev} devices: "
              "HLO operands (o) vs analytic (+)", legend_size=7)


def _log_axes(ax: Any, lengths: Any, ylabel: str, title: str, *, legend_size: int) -> None:
    """Log-log axes over the total length S (x ticks as 128K, 1M), labels, title, legend."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(lengths)
    ax.set_yscale("log")
    ax.set_xlabel("total length S")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)


def _maxlen_panel(ax: Any, data: dict[str, Any], lengths: Any) -> None:
    """The longest length whose fwd+bwd fits, per configuration (horizontal bars)."""
    ml = [m for m in data.get("maxlen", []) if m.get("max_s")]
    if ml:
        labels = [f"{m['kind'][:4]}/{m['strategy']} {m['mesh']}" for m in ml]
        ax.barh(range(len(ml)), [m["max_s"] for m in ml], color="tab:blue")
        ax.set_yticks(range(len(ml)), labels, fontsize=7)
        for i, m in enumerate(ml):
            ax.text(m["max_s"], i, f" {_fmt_len(m['max_s'])}", va="center", fontsize=7)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(lengths)
    ax.set_xlabel("longest total length whose fwd+bwd fits (compiled memory)")
    limits = {m.get("memory_limit_bytes") for m in ml}
    ax.set_title("max length per configuration" + (
        f" (memory limit {_mib(limits.pop())} per device)" if len(limits) == 1 and None
        not in limits else ""))

