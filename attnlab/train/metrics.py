"""Metrics of a run: JSONL records, optional TensorBoard, MFU, and a loss plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# Dense bf16 peak FLOP/s per device, by a substring of ``device.device_kind``. CPU has no
# entry: its MFU is reported as null.
PEAK_FLOPS: dict[str, float] = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device of this kind, or None when unknown (CPU)."""
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float | None, device_kind: str,
        num_devices: int) -> float | None:
    """Model FLOP utilisation: achieved training FLOP/s over the devices' peak; None on CPU."""
    peak = peak_flops(device_kind)
    if peak is None or tokens_per_s is None:
        return None
    return flops_per_token * tokens_per_s / (peak * num_devices)


class MetricsWriter:
    """Appends one JSON record per line to ``path`` (and to TensorBoard when ``tensorboardX``
    is importable and ``tensorboard_dir`` is given)."""

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._tb = SummaryWriter(str(tensorboard_dir))

    def truncate_after(self, step: int) -> None:
        """Drops records of steps after ``step`` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        """Appends ``record`` (non-finite floats become null, so the file stays JSON)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        """Flushes TensorBoard."""
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_path: str | Path, png_path: str | Path, title: str = "",
                references: dict[str, float] | None = None) -> Path:
    """Training (and validation, where recorded) loss against step, saved as a PNG, with
    optional horizontal reference levels (label -> loss), e.g. chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    for i, (label, level) in enumerate((references or {}).items()):
        ax.axhline(level, ls="--", lw=1, color=f"C{i + 2}", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png_path)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
