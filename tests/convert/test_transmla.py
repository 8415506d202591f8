"""TransMLA's compression (RoRoPE + FreqFold + BKV-PCA + absorption): exact where it should be,
error falling with the latent rank, RoRoPE's PCA better than keeping one head's RoPE, the
result decoding through the absorbed latent cache, and clear errors for bad ranks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.convert import (
    build_model,
    conversion_error,
    model_params,
    rorope_basis,
    transmla,
)
from attnlab.nn import Config, Transformer, decode_step, init_caches, prefill, rope

BASE = dict(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
            max_seq_len=64, attention_impl="reference", tie_embeddings=False)
H = 16  # head_dim of BASE


def _tokens(key, b=4, t=32):
    return jax.random.randint(key, (b, t), 0, 64)


def _shared_rope_model(seed: int, noise: float, rope_fraction: float = 1.0) -> Transformer:
    """K = 2 heads whose RoPE pairs are head 0's times a per-frequency factor (+ noise): the
    keys' RoPE part has rank one across heads, as RoRoPE hopes of a trained model."""
    model = Transformer(Config(**BASE, rope_fraction=rope_fraction), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    params = model_params(model)
    r = model.cfg.rope_dim
    for i in range(2):
        w = params[f"blocks.{i}.attn.k_proj.kernel"].reshape(64, 2, H).copy()
        a = rng.normal(size=r // 2)
        w[:, 1, :r] = np.tile(a, 2) * w[:, 0, :r] + noise * rng.normal(size=(64, r)) / 8
        params[f"blocks.{i}.attn.k_proj.kernel"] = w.reshape(64, 2 * H)
    return build_model(model.cfg, params)


@pytest.mark.parametrize("case", ["mqa", "gqa-rank-one-rope", "gqa-partial-rope"])
def test_full_rank_is_exact_when_rorope_loses_nothing(case, key):
    k1, k2 = jax.random.split(key)
    if case == "mqa":  # one KV head: every RoPE component is kept
        model = Transformer(Config(**{**BASE, "num_kv_heads": 1}), rngs=nnx.Rngs(0))
    else:
        model = _shared_rope_model(1, noise=0.0, rope_fraction=0.5 if "partial" in case else 1.0)
    cfg = model.cfg
    d_r = cfg.rope_dim
    mla = transmla(model, _tokens(k1), kv_lora_rank=2 * cfg.num_kv_heads * H - d_r)
    assert mla.cfg.layer_pattern == "MM" and mla.cfg.qk_rope_head_dim == d_r
    err = conversion_error(model, mla, _tokens(k2, 2))
    assert err.relative_logit_error <= 1e-5, err


def test_error_falls_with_rank(key):
    """Random GQA weights (K = 2, H = 16, d_R = 16: the latent holds up to 48 values)."""
    k1, k2 = jax.random.split(key)
    model = Transformer(Config(**BASE), rngs=nnx.Rngs(2))
    calib, heldout = _tokens(k1), _tokens(k2, 2)
    errs = {d_c: conversion_error(model, transmla(model, calib, kv_lora_rank=d_c), heldout)
            for d_c in (8, 16, 32, 48)}
    for d_c, e in errs.items():
        print(f"d_c={d_c:2d}: rel logit err {e.relative_logit_error:.3f}, KL {e.kl:.4f}, "
              f"loss {e.loss_original:.4f} -> {e.loss_converted:.4f}")
    rel = [e.relative_logit_error for e in errs.values()]
    kl = [e.kl for e in errs.values()]
    assert rel == sorted(rel, reverse=True) and kl == sorted(kl, reverse=True), errs


def test_rorope_pca_beats_keeping_one_heads_rope(key):
    k1, k2 = jax.random.split(key)
    model = _shared_rope_model(3, noise=0.3)
    calib, heldout = _tokens(k1), _tokens(k2, 2)
    pca = conversion_error(model, transmla(model, calib, kv_lora_rank=48), heldout)
    first = conversion_error(model, transmla(model, calib, kv_lora_rank=48, rorope=False),
                             heldout)
    print(f"RoRoPE PCA {pca.relative_logit_error:.4f}, first head {first.relative_logit_error:.4f}")
    assert pca.relative_logit_error < 0.5 * first.relative_logit_error


def test_converted_model_decodes_through_the_latent_cache(key):
    """FreqFold 2 (d_R = 8 of R = 16): k_R's pairs turn at every other original frequency."""
    k1, k2 = jax.random.split(key)
    d_r = 8
    model = Transformer(Config(**BASE), rngs=nnx.Rngs(4))
    mla = transmla(model, _tokens(k1), kv_lora_rank=24, qk_rope_head_dim=d_r)
    b, t0, t = 2, 7, 12
    tokens = _tokens(k2, b, t)
    full, _ = mla(tokens)
    caches = init_caches(mla, b, t)
    assert caches[0]["latent"].shape == (b, t, 24 + d_r)
    logits, caches = prefill(mla, tokens[:, :t0], caches)
    steps = [logits]
    for p in range(t0, t):  # absorbed latent decode (mla_decode), one token at a time
        step, caches = decode_step(mla, tokens[:, p], caches, jnp.full((b,), p))
        steps.append(step[:, None])
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-4, rtol=2e-4)


def test_rorope_basis_is_orthogonal_and_commutes_with_rope(key):
    """k_R = k Q[:, :d_R] rotated by attnlab's d_R-dim RoPE equals the per-head-rotated keys
    projected the same way (d_R = R: no folding), for any keys."""
    rng = np.random.default_rng(0)
    k_heads, r = 3, 8
    a = rng.normal(size=(40, k_heads * H))
    q_rot = rorope_basis(a.T @ a, num_kv_heads=k_heads, head_dim=H, rope_dim=r,
                         qk_rope_head_dim=r)
    np.testing.assert_allclose(q_rot.T @ q_rot, np.eye(k_heads * H), atol=1e-12)
    keys = jax.random.normal(key, (1, 5, k_heads, H))
    pos = jnp.asarray([[0, 3, 7, 20, 41]])
    rotated = rope(keys, pos, rope_dim=r).reshape(1, 5, -1)
    k_r = keys.reshape(1, 5, -1) @ q_rot[:, :r].astype(np.float32)
    np.testing.assert_allclose(rope(k_r[:, :, None], pos)[:, :, 0],
                               rotated @ q_rot[:, :r].astype(np.float32), atol=1e-5)


@pytest.mark.parametrize(
    "cfg_kw, kw, match",
    [
        ({}, dict(kv_lora_rank=0), r"kv_lora_rank=0 must be an int in \[1, 48\]: the GQA "
                                   r"latent holds 2\*K\*H = 2\*2\*16 = 64 values"),
        ({}, dict(kv_lora_rank=49), r"kv_lora_rank=49 must be an int in \[1, 48\]"),
        ({}, dict(kv_lora_rank=8, qk_rope_head_dim=3), "qk_rope_head_dim=3 must be an even"),
        ({}, dict(kv_lora_rank=8, qk_rope_head_dim=32),
         r"qk_rope_head_dim=32 .* rope_dim=16 \(head_dim=16\) evenly: one of \[16, 8, 4, 2\]"),
        ({}, dict(kv_lora_rank=8, qk_rope_head_dim=12), "qk_rope_head_dim=12 must be"),
        (dict(rope_fraction=0.0), dict(kv_lora_rank=8), "the model rotates no dims"),
        (dict(layer_pattern="MS"), dict(kv_lora_rank=8), "layer 0 of layer_pattern='MS' is 'M'"),
    ],
)
def test_bad_conversions(cfg_kw, kw, match):
    cfg = Config(**{**BASE, **cfg_kw})
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # checked before use
    with pytest.raises(ValueError, match=match):
        transmla(model, jnp.zeros((1, 4), jnp.int32), **kw)


@pytest.mark.parametrize("tokens, match", [(np.arange(4), r"shape \[batch, seq\]"),
                                           (np.full((1, 4), 64), r"ids must lie in \[0, "
                                                                 r"vocab_size=64\)")])
def test_bad_calibration_tokens(tokens, match):
    model = Transformer(Config(**BASE), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        transmla(model, tokens, kv_lora_rank=8)
