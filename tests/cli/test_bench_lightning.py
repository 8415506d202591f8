"""bench_lightning smoke mode (tiny CPU shapes): JSON rows, checks pass, ratios vs the anchor."""

from __future__ import annotations

import json
from pathlib import Path

from attnlab import bench_lightning as bl


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


def test_lasp_smoke(tmp_path: Path) -> None:
    out = tmp_path / "lasp.json"
    assert bl.main(["--lasp", "--smoke", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["algo"], r["devices"], r["T"]) for r in rows] == [
        ("single", 1, 64), ("data_parallel", 2, 128), ("local_with_state", 2, 128),
        ("summary_only", 2, 128), ("lasp", 2, 128), ("lasp2", 2, 128),
    ]
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows)
    assert all(r["speedup"] is not None for r in rows[1:])
