"""MLA module: the training forward equals the op on its projections, cache chunks (prefill,
a long materialized chunk, absorbed decode steps) equal the full forward, the cache is compact,
low-rank queries, sequence-parallel training on 8 simulated devices, bad configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.nn import Config, MultiHeadLatentAttention, SoftmaxAttention
from attnlab.ops import mla, rope
from tests.helpers import assert_cache_chunks_match_full

BASE = dict(vocab_size=64, d_model=32, num_layers=1, layer_pattern="M", num_heads=4,
            kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
            max_seq_len=128, attention_impl="xla")
PER_HEAD = dict(BASE, mla_rope="per_head", kv_lora_rank=32, qk_rope_head_dim=None,
                qk_nope_head_dim=8, v_head_dim=8, head_dim=8, rope_fraction=0.5,
                attention_impl="reference")


def _rng(key):
    return np.random.default_rng(np.asarray(jax.random.key_data(key)))


@pytest.mark.parametrize("q_lora_rank", [None, 20])
def test_forward_is_the_op_on_its_projections(q_lora_rank, key):
    cfg = Config(**BASE, q_lora_rank=q_lora_rank)
    attn = MultiHeadLatentAttention(cfg, layer_idx=0, rngs=nnx.Rngs(1))
    rng = _rng(key)
    b, t = 2, 19
    x = jnp.asarray(rng.normal(size=(b, t, 32)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    y, cache = attn(x, positions=pos)
    assert cache is None and y.shape == (b, t, 32)
    q = attn.q_proj(x) if q_lora_rank is None else attn.q_up(attn.q_down(x))
    q = q.reshape(b, t, 4, 24)
    lat = attn.kv_down(x)
    k_r = rope(lat[:, :, None, 24:], pos)[:, :, 0]
    out = mla.reference(q[..., :16], rope(q[..., 16:], pos), lat[..., :24], k_r,
                        attn.w_uk[...], attn.w_uv[...], is_causal=True)
    np.testing.assert_allclose(y, attn.o_proj(out.reshape(b, t, 48)), atol=1e-5)


@pytest.mark.parametrize("rope_kind", ["decoupled", "per_head"])
def test_cache_chunks_match_full_forward(rope_kind, key):
    """Prefill 5, a chunk of 66 (> 64: materialized per row), then decode steps of 1 and 2
    tokens (absorbed with decoupled RoPE, materialized per head otherwise); with a window."""
    fields, width = (BASE, 24 + 8) if rope_kind == "decoupled" else (PER_HEAD, 32)
    cfg = Config(**fields, local_window_size=30)
    attn = MultiHeadLatentAttention(cfg, layer_idx=0, rngs=nnx.Rngs(2))
    rng = _rng(key)
    b, total = 2, 74
    x = jnp.asarray(rng.normal(size=(b, total, 32)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(total), (b, total))

    cache = attn.init_cache(b, 80, jnp.float32)
    assert cache["latent"].shape == (b, 80, width)
    cache = assert_cache_chunks_match_full(attn, x, pos, cache)


def test_cache_is_compact():
    cfg = Config(**{**BASE, "num_kv_heads": 4})
    assert MultiHeadLatentAttention.cache_bytes_per_token(cfg) == (24 + 8) * 2
    # a GQA layer of the same heads caches 2 K H per token
    assert SoftmaxAttention.cache_bytes_per_token(cfg) == 2 * 4 * 8 * 2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7 must be even"),
        (dict(kv_lora_rank=0), "kv_lora_rank must be a positive int .* got 0"),
        (dict(v_head_dim=-1), "v_head_dim must be a positive int .* got -1"),
        (dict(q_lora_rank=0), r"q_lora_rank must be a positive int \(or None: a full-rank "
         r"query\), got 0"),
    ],
)
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        Config(**{**BASE, **kw})


# ----------------------------------------------------------- per-head RoPE (TransMLA's exact form)


def test_per_head_forward_is_rope_after_the_up_projection(key):
    cfg = Config(**PER_HEAD)
    assert cfg.qk_rope_head_dim == 0 and cfg.rope_dim == 4
    attn = MultiHeadLatentAttention(cfg, layer_idx=0, rngs=nnx.Rngs(3))
    rng = _rng(key)
    b, t = 2, 13
    x = jnp.asarray(rng.normal(size=(b, t, 32)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, 50, size=(b, t)))  # RoPE angles only: any positions
    y, _ = attn(x, positions=pos)
    q = rope(attn.q_proj(x).reshape(b, t, 4, 8), pos, rope_dim=4)
    c = attn.kv_down(x)
    k = rope(jnp.einsum("btc,cnd->btnd", c, attn.w_uk[...]), pos, rope_dim=4)
    v = jnp.einsum("btc,cnd->btnd", c, attn.w_uv[...])
    from attnlab.ops.attention import reference
    out = reference(q, k, v, is_causal=True)
    np.testing.assert_allclose(y, attn.o_proj(out.reshape(b, t, 32)), atol=1e-5)
    assert MultiHeadLatentAttention.cache_bytes_per_token(cfg) == 32 * 2


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mla_rope="rotary"), "mla_rope='rotary' is not an MLA RoPE placement"),
        (dict(mla_rope="per_head", qk_rope_head_dim=8),
         "qk_rope_head_dim=8 must be 0 with mla_rope='per_head'"),
        (dict(mla_rope="decoupled", qk_rope_head_dim=0),
         "qk_rope_head_dim=0 needs mla_rope='per_head'"),
    ],
)
def test_bad_rope_placement(kw, match):
    with pytest.raises(ValueError, match=match):
        Config(**{**BASE, **kw})


def test_per_head_rope_wider_than_the_head_is_refused():
    cfg = Config(**{**PER_HEAD, "qk_nope_head_dim": 2})
    with pytest.raises(ValueError, match="rotates rope_dim=4 dims of each head but "
                                         "qk_nope_head_dim=2"):
        MultiHeadLatentAttention(cfg, layer_idx=0, rngs=nnx.Rngs(0))


def test_per_head_sequence_parallel_equals_local(key):
    """The per-head mode under a ring over 4 simulated devices: the local forward's output."""
    from attnlab.train.mesh import batch_sharding, make_mesh, model_parallel

    cfg = Config(**PER_HEAD)
    mesh = make_mesh(2, data=1, sp=4)
    local = MultiHeadLatentAttention(cfg, layer_idx=0, rngs=nnx.Rngs(5))
    sharded = MultiHeadLatentAttention(cfg, layer_idx=0, rngs=nnx.Rngs(5),
                                       parallel=model_parallel(mesh, "ring", impl="xla"))
    rng = _rng(key)
    x = jnp.asarray(rng.normal(size=(2, 32, 32)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(32), (2, 32))
    put = lambda a: jax.device_put(a, batch_sharding(mesh))  # noqa: E731
    got = nnx.jit(lambda m, x, p: m(x, positions=p)[0])(sharded, put(x), put(pos))
    np.testing.assert_allclose(got, local(x, positions=pos)[0], atol=1e-5)
