"""attnlab.bench.lightning smoke mode (tiny CPU shapes): JSON rows, checks pass, ratios vs the anchor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnlab.bench import lightning as bl


def test_smoke_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bl.json"
    argv = ["--smoke", "--seq-lens", "64", "--impls", "xla", "--out", str(out)]
    assert bl.main(argv) == 0
    rec = json.loads(out.read_text())
    assert rec["platform"] == "cpu" and rec["argv"][1:] == argv
    rows = rec["rows"]
    assert {(r["impl"], r["pass"]) for r in rows} == {
        (n, p) for n in ("xla", bl.SCAN_ANCHOR) for p in ("fwd", "fwdbwd")
    }
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0 and r["mtok_s"] > 0, r
        assert r["max_abs_err"] < 1e-4 and r["ratio_scan"] > 0, r
        assert r["T"] == 64 and r["B"] == 4


@pytest.mark.parametrize("devices", [2, 1])
def test_lasp_smoke(devices: int, tmp_path: Path) -> None:
    """2 devices at 2T vs 1 at T; a one-device mesh (per-device compute) at T."""
    out = tmp_path / "lasp.json"
    assert bl.main(["--lasp", "--smoke", "--lasp-devices", str(devices), "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["settings"]["devices"] == devices
    rows, t = rec["rows"], 64 * devices
    assert [(r["algo"], r["devices"], r["T"]) for r in rows] == [
        ("single", 1, 64), ("data_parallel", devices, t), ("local_with_state", devices, t),
        ("summary_only", devices, t), ("lasp", devices, t), ("lasp2", devices, t),
    ]
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows)
    assert all(r["speedup"] is not None for r in rows[1:])
