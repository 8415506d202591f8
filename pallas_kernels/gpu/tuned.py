"""Tuned block sizes as data: ``tuned_configs.json`` keyed by device kind.

The table is written by ``python -m attnlab.bench.autotune`` on the device it describes and shipped
with the package. Keys inside a device entry are ``"fwd/h{head_dim}/{causal|full}"`` (forward
fields) and ``"bwd/h{head_dim}/{causal|full}"`` (backward fields); each maps to a dict of
:class:`~pallas_kernels.gpu.flash_common.FlashConfig` fields. A missing entry means "use the
hand-picked defaults". Entries are measured with 16-bit inputs (bf16) and are used only for
16-bit inputs; float32 calls keep the hand-picked sizes.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax

TABLE_PATH = Path(__file__).with_name("tuned_configs.json")


@functools.cache
def load_table(path: str | None = None) -> dict[str, dict[str, dict[str, int]]]:
    """The tuned table ({device_kind: {key: fields}}); empty if the file is absent."""
    p = Path(path) if path else TABLE_PATH
    if not p.exists():
        return {}
    return json.loads(p.read_text())


def table_key(kind: str, head_dim: int, causal: bool) -> str:
    return f"{kind}/h{head_dim}/{'causal' if causal else 'full'}"


def current_device_kind() -> str | None:
    """``device_kind`` of the first GPU, or None when there is none."""
    try:
        devs = jax.devices("gpu")
    except RuntimeError:
        return None
    return devs[0].device_kind if devs else None


def tuned_fields(
    head_dim: int, causal: bool, device_kind: str | None = None
) -> dict[str, Any]:
    """Forward and backward fields tuned for (device, head_dim, mask), merged; {} if none."""
    kind = device_kind or current_device_kind()
    if kind is None:
        return {}
    entry = load_table().get(kind, {})
    out: dict[str, Any] = {}
    for part in ("fwd", "bwd"):
        out.update(entry.get(table_key(part, head_dim, causal), {}))
    return out
