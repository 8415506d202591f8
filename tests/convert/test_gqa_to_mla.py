"""TransMLA's exact step: a GQA model converted to per-head-RoPE MLA has the same logits, the
same prefill/decode logits and the same greedy generations, and a cache of the same size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.convert import exact_config, gqa_to_mla, repeat_matrices
from attnlab.nn import (
    Config,
    MultiHeadLatentAttention,
    SoftmaxAttention,
    Transformer,
    decode_step,
    generate,
    init_caches,
    prefill,
)

BASE = dict(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
            max_seq_len=64, attention_impl="reference")


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("kw", [dict(tie_embeddings=False), dict(num_kv_heads=1, rope_fraction=0.5),
                                dict(num_kv_heads=4, local_window_size=7)],
                         ids=["gqa-untied", "mqa-partial-rope", "mha-window"])
def test_converted_logits_equal(kw, key):
    model = Transformer(Config(**{**BASE, **kw}), rngs=nnx.Rngs(0))
    mla = gqa_to_mla(model)
    assert mla.cfg.layer_pattern == "MM" and mla.cfg.mla_rope == "per_head"
    tokens = jax.random.randint(key, (2, 32), 0, 64)
    assert _rel(mla(tokens)[0], model(tokens)[0]) <= 1e-5
    # the latent cache is GQA's K/V cache, size for size
    assert (MultiHeadLatentAttention.cache_bytes_per_token(mla.cfg)
            == SoftmaxAttention.cache_bytes_per_token(model.cfg))


def test_prefill_decode_and_generation_equal(key):
    model = Transformer(Config(**BASE, tie_embeddings=False), rngs=nnx.Rngs(1))
    mla = gqa_to_mla(model)
    b, t0, t = 2, 9, 16
    tokens = jax.random.randint(key, (b, t), 0, 64)
    full, _ = model(tokens)
    logits, caches = prefill(mla, tokens[:, :t0], init_caches(mla, b, t))
    steps = [logits]
    for p in range(t0, t):
        step, caches = decode_step(mla, tokens[:, p], caches, jnp.full((b,), p))
        steps.append(step[:, None])
    assert _rel(jnp.concatenate(steps, 1), full) <= 1e-5
    # greedy generation of the MLA model: each new token is the GQA model's argmax
    out = generate(mla, tokens[:, :5], 11)
    np.testing.assert_array_equal(out[:, 5:], jnp.argmax(model(out)[0][:, 4:-1], -1))


def test_repeat_matrices_pick_each_heads_group():
    w_uk, w_uv = repeat_matrices(6, 3, 4)  # G = 2
    kflat = np.arange(12.0)  # K H = 12 key values, then 12 value values
    c = np.concatenate([kflat, 100 + kflat])
    k_heads = np.einsum("c,cnd->nd", c, w_uk)
    v_heads = np.einsum("c,cnd->nd", c, w_uv)
    np.testing.assert_array_equal(k_heads, kflat.reshape(3, 4).repeat(2, axis=0))
    np.testing.assert_array_equal(v_heads, 100 + kflat.reshape(3, 4).repeat(2, axis=0))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(layer_pattern="SM"), r"layer 1 of layer_pattern='SM' is 'M' \(mla\); TransMLA "
                                   r"converts GQA softmax layers \('S'\) only"),
        (dict(logits_soft_cap=30.0), "logits_soft_cap=30.0 has no MLA counterpart"),
    ],
)
def test_not_convertible(kw, match):
    with pytest.raises(ValueError, match=match):
        exact_config(Config(**{**BASE, **kw}))
