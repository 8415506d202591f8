"""Llama-layout checkpoints: a random checkpoint loads into attnlab with the logits of an
independent NumPy forward, converts exactly to MLA with the same logits, converts compressed,
reads sharded files, and bad checkpoints fail with errors that name what is wrong."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from attnlab.convert.llama import (
    convert_llama,
    load_llama,
    read_config,
    write_random_llama,
)
from attnlab.convert.llama_reference import llama_forward


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kw", [dict(), dict(tie_word_embeddings=True, num_key_value_heads=1,
                                             head_dim=8, rope_theta=500.0)],
                         ids=["gqa-untied", "mqa-tied-head_dim"])
def test_load_and_exact_conversion_match_numpy_forward(kw, tmp_path):
    hf = write_random_llama(tmp_path, seed=1, **kw)
    assert set(load_file(tmp_path / "model.safetensors")) >= {
        "model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.mlp.down_proj.weight", "model.norm.weight"}
    tokens = np.random.default_rng(2).integers(0, hf["vocab_size"], (2, 32))
    want = llama_forward(tmp_path, tokens)
    model = load_llama(tmp_path, attention_impl="reference")
    assert model.cfg.tie_embeddings == hf["tie_word_embeddings"]
    assert _rel(model(jnp.asarray(tokens))[0], want) <= 1e-5
    mla = convert_llama(tmp_path, attention_impl="reference")
    assert mla.cfg.layer_pattern == "MM" and mla.cfg.mla_rope == "per_head"
    assert _rel(mla(jnp.asarray(tokens))[0], want) <= 1e-5


def test_compressed_conversion_of_a_checkpoint(tmp_path):
    """MQA with d_R = H and the full rank is exact (RoRoPE drops nothing); lower ranks not."""
    write_random_llama(tmp_path, num_key_value_heads=1, head_dim=16, seed=3)
    rng = np.random.default_rng(4)
    calib, tokens = rng.integers(0, 64, (4, 32)), rng.integers(0, 64, (2, 32))
    want = llama_forward(tmp_path, tokens)
    errs = {}
    for d_c in (4, 16):  # 2 K H - d_R = 16
        mla = convert_llama(tmp_path, kv_lora_rank=d_c, calibration_tokens=calib,
                            attention_impl="reference")
        errs[d_c] = _rel(mla(jnp.asarray(tokens))[0], want)
    print("relative logit error by rank:", errs)
    assert errs[16] <= 1e-5 < errs[4]


def test_sharded_checkpoint(tmp_path):
    write_random_llama(tmp_path, seed=5)
    w = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(w)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: w[k] for k in keys}, tmp_path / shard)
    index = {"weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_llama(tmp_path, attention_impl="reference")
    np.testing.assert_array_equal(model.blocks[1].attn.k_proj.kernel[...],
                                  w["model.layers.1.self_attn.k_proj.weight"].T)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="names the shard 'model-00002-of-00002.safetensors'"):
        load_llama(tmp_path)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "edit, match",
    [
        (dict(vocab_size=None), r"lacks the field\(s\) \['vocab_size'\]"),
        (dict(rope_scaling={"rope_type": "llama3"}), "rope_scaling=.* is not supported"),
        (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported; attnlab's Llama computes "
                                  "hidden_act='silu'"),
        (dict(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of "
                                      "num_key_value_heads=3"),
        (dict(head_dim=None, num_attention_heads=5, num_key_value_heads=5),
         "hidden_size=64 is not divisible by num_attention_heads=5"),
        (dict(num_hidden_layers=3), "the checkpoint has no tensor "
                                    "'model.layers.2.input_layernorm.weight'"),
        (dict(model_type="qwen2"), "model_type='qwen2' is not a Llama-layout architecture"),
    ],
)
def test_bad_checkpoints(edit, match, tmp_path):
    write_random_llama(tmp_path)
    _edit_config(tmp_path, **edit)
    with pytest.raises(ValueError, match=match):
        load_llama(tmp_path)


def test_bias_tensors_are_refused(tmp_path):
    write_random_llama(tmp_path)
    w = load_file(tmp_path / "model.safetensors")
    w["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(w, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="the checkpoint has bias tensors"):
        load_llama(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        read_config(tmp_path / "nowhere")
    write_random_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="has neither model.safetensors nor "
                                         "model.safetensors.index.json"):
        load_llama(tmp_path)


def test_rank_needs_calibration_tokens(tmp_path):
    write_random_llama(tmp_path)
    with pytest.raises(ValueError, match="kv_lora_rank=8 needs calibration_tokens"):
        convert_llama(tmp_path, kv_lora_rank=8)
