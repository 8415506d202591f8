"""``python -m attnlab.bench.model --smoke``: rows with tokens/s, errors recorded, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnlab.bench import model as bench_model


@pytest.mark.slow
def test_smoke_writes_rows_and_records_errors(tmp_path: Path) -> None:
    out = tmp_path / "bench_model.json"
    rc = bench_model.main(["--smoke", "--out", str(out), "--only", "softmax_4k,hybrid_32k",
                           "--warmup", "1", "--steps", "2"])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["platform"] == "cpu" and rec["hybrid_bar"] == 2.0
    rows = {r["name"]: r for r in rec["rows"]}
    assert set(rows) == {"softmax_4k", "hybrid_32k"}
    soft = rows["softmax_4k"]
    assert soft["status"] == "ok", soft
    assert soft["tokens_per_s"] > 0 and soft["mfu"] is None and soft["finite"]
    assert soft["layer_pattern"] == "SS" and len(soft["step_ms_all"]) == 2
    assert soft["flops_per_token"] > 6 * soft["num_params"] * 0.5
    # The causal count halves only the softmax score/value term (12 * N * H * S per layer).
    assert soft["flops_per_token"] / 2 < soft["flops_per_token_causal"] < soft["flops_per_token"]
    hyb = rows["hybrid_32k"]
    assert hyb["layer_pattern"] == "LS"
    if hyb["status"] == "ok":  # lightning registered
        assert hyb["tokens_per_s"] > 0
    else:  # the error is recorded, and the run went on
        assert "unknown mechanism letter(s) 'L'" in hyb["error"]
    # No softmax_32k row: no ratio.
    assert rec["hybrid_vs_softmax_32k"] is None


def test_unknown_config_name(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        bench_model.main(["--smoke", "--out", str(tmp_path / "x.json"), "--only", "gpt4"])
    assert e.value.code == 2
    assert "unknown --only ['gpt4']" in capsys.readouterr().err
