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
from tests.helpers import fwd_tol

CASES = {
    "gqa_window_softcap_half_rope": dict(num_heads=4, num_kv_heads=2, local_window_size=5,
                                         logits_soft_cap=2.0, rope_fraction=0.5),
    "mqa": dict(num_heads=4, num_kv_heads=1),
}


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


@pytest.mark.parametrize("name", list(CASES))
def test_module_matches_reference(key, name):
    cfg = _cfg(**CASES[name])
    kx, kp, ks = jax.random.split(key, 3)
    attn = SoftmaxAttention(cfg, layer_idx=0, rngs=nnx.Rngs(kp))
    x = jax.random.normal(kx, (2, 24, 32))
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24)) + 3
    seg = jnp.sort(jax.random.randint(ks, (2, 24), 0, 3), axis=-1)
    y, cache = nnx.jit(lambda m, x, p, s: m(x, positions=p, segment_ids=s))(
        attn, x, positions, seg
    )
    assert cache is None and y.shape == x.shape
    want = nnx.jit(_direct, static_argnums=1)(attn, cfg, x, positions, seg)
    np.testing.assert_allclose(y, want, atol=10 * fwd_tol(jnp.float32), rtol=1e-5)


@pytest.mark.parametrize("name", ["gqa_window_softcap_half_rope"])
def test_cache_chunks_match_full_forward(key, name):
    """Prefill 5 tokens, a long chunk of 66 (> 64: per-row attention), then 3 decode steps of
    1 token (decode_attention): every output equals the full forward over the 74 tokens."""
    cfg = _cfg(**CASES[name])
    kx, kp = jax.random.split(key)
    attn = SoftmaxAttention(cfg, layer_idx=0, rngs=nnx.Rngs(kp))
    b, total = 2, 74
    x = jax.random.normal(kx, (b, total, 32))
    pos = jnp.broadcast_to(jnp.arange(total), (b, total))

    @nnx.jit
    def step(attn, x, pos, cache):
        return attn(x, positions=pos, cache=cache)

    full, _ = step(attn, x, pos, None)
    cache = attn.init_cache(b, 80, jnp.float32)
    outs = []
    for lo, hi in ((0, 5), (5, 71), (71, 72), (72, 73), (73, 74)):
        y, cache = step(attn, x[:, lo:hi], pos[:, lo:hi], cache)
        outs.append(y)
    np.testing.assert_array_equal(cache["length"], [total, total])
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4, rtol=1e-4)


def test_cache_bytes_and_errors(key):
    cfg = _cfg(num_heads=4, num_kv_heads=2)  # head_dim 8
    assert SoftmaxAttention.cache_bytes_per_token(cfg) == 2 * 2 * 8 * 2
    assert SoftmaxAttention.cache_bytes_per_token(cfg, dtype_bytes=4) == 2 * 2 * 8 * 4
    attn = SoftmaxAttention(cfg, layer_idx=0, rngs=nnx.Rngs(0))
    x = jax.random.normal(key, (1, 6, 32))
    pos = jnp.arange(6)[None]
    with pytest.raises(ValueError, match="6 new tokens do not fit a cache of max_len=4"):
        attn(x, positions=pos, cache=attn.init_cache(1, 4, jnp.float32))
    with pytest.raises(ValueError, match="pass segment_ids=None when decoding"):
        attn(x, positions=pos, segment_ids=jnp.zeros((1, 6), jnp.int32),
             cache=attn.init_cache(1, 8, jnp.float32))
    with pytest.raises(ValueError, match="positions must have shape \\(1, 6\\)"):
        attn(x, positions=jnp.arange(6))
    with pytest.raises(ValueError, match="attention_impl='flash9' is not an attention impl"):
        SoftmaxAttention(Config(d_model=32, num_layers=1, attention_impl="flash9"),
                         layer_idx=0, rngs=nnx.Rngs(0))
