"""``attnlab convert``: a tiny Llama-layout checkpoint to MLA files, exact and compressed."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.cli import main
from attnlab.convert import llama_forward, load_model, write_random_llama


def test_exact_then_compressed(tmp_path, capsys):
    src, out = tmp_path / "llama", tmp_path / "mla"
    write_random_llama(src, seed=7, max_position_embeddings=32)
    tokens = np.random.default_rng(0).integers(0, 64, (2, 16))
    assert main(["convert", "--from", str(src), "--out", str(out), "--impl", "reference"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mla_rope"] == "per_head"
    assert summary["cache_values_per_token_per_layer"] == {"gqa": 64, "mla": 64}
    mla = load_model(out)
    want = llama_forward(src, tokens)
    got = np.asarray(mla(jnp.asarray(tokens))[0], np.float64)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5

    np.save(tmp_path / "calib.npy", np.random.default_rng(1).integers(0, 64, (4, 32)))
    assert main(["convert", "--from", str(src), "--out", str(out), "--rank", "24",
                 "--rope-dim", "8", "--calibration", str(tmp_path / "calib.npy"), "--check",
                 "--impl", "reference"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cache_values_per_token_per_layer"] == {"gqa": 64, "mla": 32}
    assert 0 < summary["check"]["relative_logit_error"] < 2
    assert load_model(out).cfg.kv_lora_rank == 24


def test_bad_rank_is_a_usage_error(tmp_path, capsys):
    write_random_llama(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["convert", "--from", str(tmp_path), "--out", str(tmp_path / "o"), "--rank", "0"])
    assert e.value.code == 2
    assert "kv_lora_rank=0 must be an int in [1, 48]" in capsys.readouterr().err
