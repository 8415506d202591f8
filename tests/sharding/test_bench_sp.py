"""The sequence-parallel benchmark runs end to end in smoke mode (8 simulated CPU devices)."""

from __future__ import annotations

import json

from attnlab.bench import sp as bench_sp


def test_bench_sp_smoke_writes_json(tmp_path):
    out = tmp_path / "bench_sp.json"
    data = bench_sp.main([
        "--smoke", "--strategies", "ring", "--passes", "fwd", "--maxlen-strategy", "ring",
        "--out", str(out),
    ])
    on_disk = json.loads(out.read_text())
    assert on_disk["device_count"] == 8
    # the strategy agrees with one device before it is timed
    assert [c["strategy"] for c in data["check"]] == ["ring"]
    assert data["check"][0]["max_abs_err"] < 1e-4
    assert [r["strategy"] for r in data["sp"] if r.get("ms")] == ["ring"]
    assert [r["strategy"] for r in data["compute_only"] if r.get("ms")] == ["ring"]
    assert data["ratios"][0]["vs_best_single"] > 0
    assert on_disk["maxlen"]["single_auto"]["max_s"] == 64
    assert on_disk["maxlen"]["ring"]["max_s"] == 64
