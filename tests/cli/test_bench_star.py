"""attnlab.bench.star: Star Attention prefill against full causal attention (smoke on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import pytest

from attnlab.bench import star as bs


def test_smoke_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "star.json"
    assert bs.main(["--smoke", "--impls", "xla", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["platform"] == "cpu" and rec["dims"]["heads"] == 2
    rows = rec["rows"]
    assert [(r["kind"], r["block"]) for r in rows] == [("full", None), ("star", 64)]
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0, r
    star_row = rows[1]
    assert star_row["speedup"] == pytest.approx(rows[0]["ms"] / star_row["ms"])


def test_flops_one_block_is_full_causal() -> None:
    assert bs.star_flops(2, 1024, 4, 64, 1024) == bs.full_flops(2, 1024, 4, 64)
    # 4 blocks of 256: 4 causal triangles and 3 full anchor squares.
    assert bs.star_flops(1, 1024, 1, 1, 256) == 4.0 * (4 * 256 * 256 / 2 + 3 * 256 * 256)


@pytest.mark.parametrize("kind", ["full", "star"])
def test_check_passes_and_catches_a_wrong_result(kind: str, monkeypatch) -> None:
    assert bs.check(kind, "xla", t_check=64, n=2, h=16, dtype=jnp.float32) is None
    wrong = bs._fn  # a fast path whose output is off is caught by the check
    monkeypatch.setattr(bs, "_fn", lambda k, i, b: (lambda q, kk, v: wrong(k, i, b)(q, kk, v)
                                                     * 1.5))
    assert bs.check(kind, "xla", t_check=64, n=2, h=16, dtype=jnp.float32) > 0
