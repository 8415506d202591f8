"""SoftmaxAttention: equals a direct attnlab.ops reference computation; its cache paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.nn import Config, SoftmaxAttention
from attnlab.ops import reference
from attnlab.ops.rope import rope
from tests.helpers import assert_cache_chunks_match_full, fwd_tol

GQA = dict(num_heads=4, num_kv_heads=2, local_window_size=5, logits_soft_cap=2.0,
           rope_fraction=0.5)
MQA = dict(num_heads=4, num_kv_heads=1, local_window_size=7, logits_soft_cap=3.0)


def _rng(key) -> np.random.Generator:
    """NumPy generator seeded by the test's key (inputs without a compilation per shape)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def _cfg(**kw) -> Config:
    return Config(d_model=32, num_layers=1, max_seq_len=128, attention_impl="xla", **kw)


def _direct(attn: SoftmaxAttention, cfg: Config, x, positions, segment_ids=None):
    """The module's function written out: projections, RoPE, reference attention, output."""
    b, t, _ = x.shape
    n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = (x @ attn.q_proj.kernel[...]).reshape(b, t, n, h)
    kk = (x @ attn.k_proj.kernel[...]).reshape(b, t, k, h)
    v = (x @ attn.v_proj.kernel[...]).reshape(b, t, k, h)
    q = rope(q, positions, theta=cfg.rope_theta, rope_dim=cfg.rope_dim)
    kk = rope(kk, positions, theta=cfg.rope_theta, rope_dim=cfg.rope_dim)
    w = cfg.local_window_size
    out = reference(q, kk, v, is_causal=True, segment_ids=segment_ids,
                    local_window_size=None if w is None else (w, 0),
                    logits_soft_cap=cfg.logits_soft_cap)
    return out.reshape(b, t, n * h) @ attn.o_proj.kernel[...]


def test_module_matches_reference(key):
    """GQA + sliding window + soft-cap + half RoPE + packed segments, against the reference."""
    cfg = _cfg(**GQA)
    rng = _rng(key)
    attn = SoftmaxAttention(cfg, layer_idx=0, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    x = jnp.asarray(rng.normal(size=(2, 24, 32)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24)) + 3
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (2, 24)), axis=-1), jnp.int32)
    y, cache = nnx.jit(lambda m, x, p, s: m(x, positions=p, segment_ids=s))(
        attn, x, positions, seg
    )
    assert cache is None and y.shape == x.shape
    want = nnx.jit(_direct, static_argnums=1)(attn, cfg, x, positions, seg)
    np.testing.assert_allclose(y, want, atol=10 * fwd_tol(jnp.float32), rtol=1e-5)


def test_cache_chunks_match_full_forward(key):
    """MQA + window + soft-cap. Prefill 5 tokens, a long chunk of 66 (> 64: per-row
    attention), then decode chunks of 1 and 2 tokens (decode_attention): every output equals
    the full forward over the 74 tokens."""
    cfg = _cfg(**MQA)
    rng = _rng(key)
    attn = SoftmaxAttention(cfg, layer_idx=0, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
    b, total = 2, 74
    x = jnp.asarray(rng.normal(size=(b, total, 32)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(total), (b, total))

    cache = attn.init_cache(b, 80, jnp.float32)
    cache = assert_cache_chunks_match_full(attn, x, pos, cache)

    @nnx.jit
    def step(attn, x, pos, cache):
        return attn(x, positions=pos, cache=cache)

    # Ragged rows: row 0 holds 74 tokens, row 1 only its first 40 (later slots are stale and
    # must be ignored); each row's next-token output equals that of a batch at its length.
    x_new = jnp.asarray(rng.normal(size=(b, 1, 32)), jnp.float32)
    ragged, uniform = {}, {}
    for n_seen in (74, 40):
        c = {**cache, "length": jnp.full((b,), n_seen, jnp.int32)}
        uniform[n_seen] = step(attn, x_new, jnp.full((b, 1), n_seen), c)[0]
    c = {**cache, "length": jnp.array([74, 40], jnp.int32)}
    y, ragged = step(attn, x_new, jnp.array([[74], [40]]), c)
    np.testing.assert_allclose(y[0], uniform[74][0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(y[1], uniform[40][1], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(ragged["length"], [75, 41])
    assert float(jnp.abs(uniform[74][1] - uniform[40][1]).max()) > 1e-3  # lengths matter


def test_cache_bytes_and_errors():
    cfg = _cfg(**GQA)  # head_dim 8
    assert SoftmaxAttention.cache_bytes_per_token(cfg) == 2 * 2 * 8 * 2
    assert SoftmaxAttention.cache_bytes_per_token(cfg, dtype_bytes=4) == 2 * 2 * 8 * 4
    attn = SoftmaxAttention(cfg, layer_idx=0, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(1, 6, 32)).astype(np.float32)
    pos = np.arange(6)[None]
    with pytest.raises(ValueError, match="6 new tokens do not fit a cache of max_len=4"):
        attn(x, positions=pos, cache=attn.init_cache(1, 4, jnp.float32))
    with pytest.raises(ValueError, match="pass segment_ids=None when decoding"):
        attn(x, positions=pos, segment_ids=np.zeros((1, 6), np.int32),
             cache=attn.init_cache(1, 8, jnp.float32))
    with pytest.raises(ValueError, match="positions must have shape \\(1, 6\\)"):
        attn(x, positions=np.arange(6))
    with pytest.raises(ValueError, match="attention_impl='flash9' is not an attention impl"):
        SoftmaxAttention(Config(d_model=32, num_layers=1, attention_impl="flash9"),
                         layer_idx=0, rngs=nnx.Rngs(0))
