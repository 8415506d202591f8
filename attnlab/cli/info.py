"""``attnlab info``: versions, devices, every attention implementation and what ``auto`` picks."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from attnlab.cli.common import make_console

if TYPE_CHECKING:
    from rich.console import Console

# The typical call `info` reports availability for (B=1, T=S=1024, N=K=8, H=128).
_TYPICAL = {"b": 1, "s": 1024, "n": 8, "kh": 8, "h": 128}


def collect_info() -> dict[str, Any]:
    """Versions, devices, every registered attention implementation and what ``auto`` picks.

    Availability is for the typical call: bf16 on GPU/TPU, f32 on CPU, B=1, T=S=1024, N=K=8,
    H=128, causal. Returns a JSON-ready dict (what ``attnlab info --json`` prints).
    """
    import jax
    import jax.numpy as jnp

    import attnlab
    from attnlab import ops
    from attnlab.bench import harness

    env = harness.environment()
    plat = ops.platform()
    kinds: dict[str, int] = {}
    for d in jax.devices():
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    dtype = jnp.float32 if plat == "cpu" else jnp.bfloat16
    t = _TYPICAL
    q = jax.ShapeDtypeStruct((t["b"], t["s"], t["n"], t["h"]), dtype)
    kv = jax.ShapeDtypeStruct((t["b"], t["s"], t["kh"], t["h"]), dtype)
    impls = ops.implementations()
    why = ops.explain(q, kv, kv, is_causal=True)
    rows = [
        {
            "name": name,
            "available": why.get(name) is None,
            "reason": why.get(name),
            "interpreted": harness.runs_interpreted(impl, plat),
            "returns_lse": impl.returns_lse,
            "description": impl.description,
        }
        for name, impl in impls.items()
    ]

    def auto(**kw: Any) -> str:
        try:
            return ops.auto_choice(q, kv, kv, **kw)
        except ValueError as e:
            return f"none ({e})"

    return {
        "attnlab_version": attnlab.__version__,
        **env,
        "backend": jax.default_backend(),
        "devices": [{"kind": k, "count": c} for k, c in kinds.items()],
        "typical_call": {
            "q": list(q.shape), "k": list(kv.shape), "v": list(kv.shape),
            "dtype": jnp.dtype(dtype).name, "is_causal": True,
        },
        "implementations": rows,
        "auto_order": _auto_order(plat),
        "auto": {
            "causal": auto(is_causal=True),
            "non_causal": auto(is_causal=False),
            "causal_return_residuals": auto(is_causal=True, return_residuals=True),
        },
        "anchors": {
            harness.ANCHOR_XLA: "yes",
            harness.ANCHOR_CUDNN: "yes" if plat == "gpu" else f"no (platform is {plat})",
            "tokamax": env["tokamax_version"] or "not importable",
        },
    }


def _auto_order(plat: str) -> list[str]:
    from attnlab.ops import AUTO_ORDER

    return list(AUTO_ORDER.get(plat, ()))


def print_info(info: dict[str, Any], console: Console, *, short: bool = False) -> None:
    """Prints ``info`` (:func:`collect_info`) as tables; ``short`` leaves out the descriptions
    and the anchors (the demo's first section)."""
    from rich.markup import escape
    from rich.table import Table

    devs = ", ".join(f"{d['count']} x {d['kind']}" for d in info["devices"])
    console.print(
        f"[bold]attnlab[/] {info['attnlab_version']}  JAX {info['jax_version']}  "
        f"jaxlib {info['jaxlib_version']}  Python {info['python']}"
    )
    console.print(f"platform [bold]{info['platform']}[/]  devices: {devs}")
    tc = info["typical_call"]
    table = Table(
        title=f"attention implementations for a typical call: q {tc['q']} k/v {tc['k']} "
        f"{tc['dtype']}, causal",
        title_justify="left",
    )
    table.add_column("impl", style="bold")
    table.add_column("available")
    table.add_column("description" if not short else "note", overflow="fold")
    for r in info["implementations"]:
        if r["available"]:
            avail = "[green]yes[/]" + (" (interpret mode)" if r["interpreted"] else "")
            note = r["description"]
        else:
            avail, note = "[red]no[/]", r["reason"]
        table.add_row(escape(r["name"]), avail, escape(note or ""))
    console.print(table)
    a = {k: escape(v) for k, v in info["auto"].items()}
    console.print(
        f"impl='auto' (order {', '.join(info['auto_order'])}) chooses: causal -> [bold]"
        f"{a['causal']}[/], non-causal -> [bold]{a['non_causal']}[/], causal + "
        f"return_residuals -> [bold]{a['causal_return_residuals']}[/]"
    )
    if not short:
        anchors = ", ".join(f"{k}: {v}" for k, v in info["anchors"].items())
        console.print(f"anchors: {anchors}", markup=False)


def cmd_info(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``attnlab info``: prints :func:`collect_info` as tables, or as JSON with ``--json``."""
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print_info(info, make_console())
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds ``info`` to the ``attnlab`` subparsers ``sub``."""
    p = sub.add_parser("info", help="versions, devices, attention implementations, auto choice")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(run=cmd_info, subparser=p)
    return p
