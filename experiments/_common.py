"""What every paper reproduction under ``experiments/`` shares: presets, the run record, the
JSON and PNG it writes under ``experiments/results/``.

A reproduction is ``experiments/<name>.py --preset tiny|full [--out DIR]``: ``tiny`` runs on a
CPU in under a minute (the test suite runs it), ``full`` fits one 10-minute GPU run. Each writes
``<name>_<preset>.json`` (the numbers, the setup, the device and versions) and
``<name>_<preset>.png`` (the plot people would rather look at than read).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from attnlab.bench.harness import run_record, write_json

RESULTS = Path(__file__).resolve().parent / "results"


def parse(description: str, presets: Mapping[str, Any], argv: Sequence[str] | None = None
          ) -> tuple[argparse.Namespace, Any]:
    """(args, the chosen preset) from ``--preset NAME [--out DIR] [--quiet]``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=sorted(presets), default="tiny")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON and PNG")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    return args, presets[args.preset]


class Progress:
    """One line per step to stderr (``quiet`` silences it), with the elapsed time."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def save(name: str, preset: str, out: str | Path, fields: Mapping[str, Any], fig: Any,
         argv: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Writes ``<name>_<preset>.json`` (the run record: device, versions, date, ``fields``) and
    the figure as ``<name>_<preset>.png``; returns both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{name}_{preset}"
    record = run_record(list(sys.argv[1:] if argv is None else argv), preset=preset,
                        backend=jax.default_backend(), **fields)
    json_path = write_json(stem.with_suffix(".json"), record)
    png_path = stem.with_suffix(".png")
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    return json_path, png_path


def device_name() -> str:
    """"CPU", or the accelerator's kind ("NVIDIA H100 80GB HBM3", ...), for titles."""
    return "CPU" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind


def run_experiment(name: str, doc: str, presets: Mapping[str, Any], argv: Sequence[str] | None,
                   run: Callable[[Any, Progress], dict[str, Any]],
                   plot: Callable[[dict[str, Any], str], Any], title: str,
                   setup: Callable[[Any], dict[str, Any]]) -> int:
    """An experiment's ``main``: parse ``--preset``, ``run(preset, progress)``, plot the result
    titled ``"<title> (<preset>, <device>)"``, save the record (``setup(preset)`` and the
    result) as JSON and the figure as PNG; returns the exit status 0."""
    args, p = parse(doc.splitlines()[0], presets, argv)
    log = Progress(args.quiet)
    result = run(p, log)
    fig = plot(result, f"{title} ({args.preset}, {device_name()})")
    paths = save(name, args.preset, args.out, dict(setup=setup(p), **result), fig, argv)
    wall = f" ({result['wall_s']:.0f} s)" if "wall_s" in result else ""
    log(f"wrote {paths[0]} and {paths[1]}{wall}")
    return 0
