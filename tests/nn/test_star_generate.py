"""Generation with Star Attention (attnlab.nn.star_generate) on simulated CPU devices.

Against full-attention generation (one block), against the definition (a teacher-forced
forward of the decoder under the Star mask: context rows by :func:`attnlab.ops.star.
context_mask`, query and generated rows causal over everything), across anchors, and sharded
over 4 devices against one device."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.nn import Config, StarConfig, Transformer, generate, star_generate
from attnlab.ops import reference as attention_reference
from attnlab.ops import rope
from attnlab.ops.star import context_mask

TOL = 2e-5  # float32; only the order of sums differs
CFG = Config(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8, mlp_dim=64, max_seq_len=64)
C, T0, NEW = 16, 19, 5  # context, prompt (context + 3 query tokens), new tokens


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(CFG, rngs=nnx.Rngs(0))


def _prompt(key, b=2, t=T0):
    return jax.random.randint(key, (b, t), 0, CFG.vocab_size)


def _close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.abs(got - want).max())
    assert err <= TOL * max(1.0, float(np.abs(want).max())), f"{what}: max abs err {err:.3e}"


def _star_mask(t: int, star: StarConfig) -> np.ndarray:
    """[t, t]: the context rows see their Star window, every later row all earlier tokens."""
    mask = np.tril(np.ones((t, t), bool))
    mask[:C, :C] = context_mask(C, star.block_size, star.anchor_tokens or None,
                                anchor=star.anchor)
    return mask


def _masked_logits(model: Transformer, tokens: jax.Array, mask: np.ndarray) -> jax.Array:
    """The decoder written out with an explicit [T, T] attention mask (the definition)."""
    b, t = tokens.shape
    n, k, h = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    bias = jnp.where(jnp.asarray(mask), 0.0, -jnp.inf)[None, None]
    x = model.embed(tokens)
    for blk in model.blocks:
        a = blk.attn
        y = blk.attn_norm(x)
        q = rope(a.q_proj(y).reshape(b, t, n, h), pos, theta=CFG.rope_theta)
        kk = rope(a.k_proj(y).reshape(b, t, k, h), pos, theta=CFG.rope_theta)
        v = a.v_proj(y).reshape(b, t, k, h)
        x = x + a.o_proj(attention_reference(q, kk, v, bias=bias).reshape(b, t, n * h))
        x = x + blk.mlp(blk.mlp_norm(x))
    return model.embed.attend(model.final_norm(x))


def test_one_block_is_full_attention(model, key):
    """C = block_size: any anchor is plain causal attention; tokens equal generate's."""
    prompt = _prompt(key)
    full = generate(model, prompt, NEW)
    tokens, logits = star_generate(model, prompt, NEW, star=StarConfig(block_size=C),
                                   context_length=C, return_logits=True)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(full))
    want = model(full[:, :-1])[0][:, T0 - 1:]
    _close(logits, want, "logits")


def test_anchors_follow_their_masks_and_differ(model, key):
    """4 blocks: each anchor's logits equal the decoder under its Star mask (teacher-forced
    on the generated tokens): the context phase is the mask, the query phase exact
    attention over the whole cache. "first" with a whole-block anchor is the paper's
    window [c_1; c_i]. The three anchors give different logits."""
    prompt = _prompt(key)
    got = {}
    for anchor in ("first", "previous", "none"):
        star = StarConfig(block_size=4, anchor=anchor)
        tokens, logits = star_generate(model, prompt, NEW, star=star, context_length=C,
                                       return_logits=True)
        want = _masked_logits(model, tokens[:, :-1], _star_mask(T0 + NEW - 1, star))
        _close(logits, want[:, T0 - 1:], f"{anchor} logits")
        got[anchor] = np.asarray(logits)
    paper = np.zeros((C, C), bool)
    for i in range(C):
        blk = i // 4
        paper[i, blk * 4: i + 1] = True
        if blk:
            paper[i, :4] = True  # block 1 prepended to block i
    assert (_star_mask(C, StarConfig(block_size=4))[:C, :C] == paper).all()
    for a, b in (("first", "previous"), ("first", "none"), ("previous", "none")):
        assert np.abs(got[a] - got[b]).max() > 1e-3, f"{a} and {b} give the same logits"


@pytest.mark.parametrize("anchor, anchor_size", [("first", None), ("previous", 2),
                                                  ("none", None)])
def test_sharded_equals_one_device(anchor, anchor_size, model, key):
    """4 simulated devices, one block each, cache kept where it was encoded: the same tokens
    and logits as one device."""
    mesh = jax.make_mesh((4,), ("sp",), devices=jax.devices()[:4])
    prompt = _prompt(key)
    star = StarConfig(block_size=4, anchor=anchor, anchor_size=anchor_size)
    one = star_generate(model, prompt, NEW, star=star, context_length=C, return_logits=True)
    sharded = star_generate(model, prompt, NEW, star=star, context_length=C, mesh=mesh,
                            return_logits=True)
    np.testing.assert_array_equal(np.asarray(sharded[0]), np.asarray(one[0]))
    _close(sharded[1], one[1], "logits")


def test_query_phase_is_exact_attention_over_the_cache(key):
    """Phase 2 on a mesh (StarQueryCache): star_query over the sharded context merged with
    the local tokens equals attention over the whole cache."""
    from attnlab.nn.star_cache import StarQueryCache

    mesh = jax.make_mesh((4,), ("sp",), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,))
    ks = jax.random.split(key, 7)
    ctx_k, ctx_v = (jax.random.normal(k, (2, 16, 2, 8)) for k in ks[:2])
    loc_k, loc_v = (jax.random.normal(k, (2, 6, 2, 8)) for k in ks[2:4])
    q, nk, nv = (jax.random.normal(ks[4 + i], (2, 2, h, 8)) for i, h in enumerate((4, 2, 2)))
    cache = StarQueryCache(context_k=ctx_k, context_v=ctx_v, k=loc_k, v=loc_v,
                           length=jnp.full((2,), 3, jnp.int32), mesh=mesh)
    out, new = jax.jit(lambda c, q, k, v: c.attend(q, k, v, logits_soft_cap=None,
                                                   impl="xla"))(cache, q, nk, nv)
    keys = jnp.concatenate([ctx_k, loc_k[:, :3], nk], axis=1)
    vals = jnp.concatenate([ctx_v, loc_v[:, :3], nv], axis=1)
    _close(out, attention_reference(q, keys, vals, is_causal=True, q_offset=19), "out")
    assert np.asarray(new.length).tolist() == [5, 5]


@pytest.mark.parametrize("kwargs, match", [
    (dict(star=StarConfig(block_size=5), context_length=16),
     "block_size=5 must divide the context length 16"),
    (dict(star=StarConfig(block_size=4), context_length=19),
     r"context_length must be an int in \[1, 18\]"),
    (dict(star=StarConfig(block_size=32)), "holds no whole block of block_size=32"),
    (dict(star=StarConfig(block_size=4), max_new_tokens=50),
     "exceeds max_seq_len=64"),
    (dict(star="first"), "star must be an attnlab.ops.star.StarConfig"),
    (dict(star=StarConfig(block_size=8), context_length=16, mesh="sp"),
     "mesh must be a jax.sharding.Mesh with an axis 'sp'"),
    (dict(star=StarConfig(block_size=8), context_length=16, mesh=4),
     "mesh must be a jax.sharding.Mesh"),
])
def test_bad_requests(kwargs, match, model, key):
    kwargs = {"max_new_tokens": NEW, **kwargs}
    n = kwargs.pop("max_new_tokens")
    with pytest.raises(ValueError, match=match):
        star_generate(model, _prompt(key), n, **kwargs)


def test_mesh_needs_one_block_per_device(model, key):
    mesh = jax.make_mesh((4,), ("sp",), devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="has 2 blocks of 8 but mesh axis 'sp' has 4 devices; "
                                         "use block_size = 4"):
        star_generate(model, _prompt(key), NEW, star=StarConfig(block_size=8),
                      context_length=16, mesh=mesh)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=4, anchor_size=8), r"anchor_size must be in \[1, block_size = 4\]"),
    (dict(block_size=4, anchor="last"), "anchor must be one of"),
    (dict(block_size=0), "block_size must be a positive int"),
    (dict(block_size=4, anchor="none", anchor_size=2), "anchor='none' takes no anchor_size"),
])
def test_bad_star_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StarConfig(**kwargs)


@pytest.mark.parametrize("pattern, match", [
    ("SL", "layer 1 of layer_pattern 'SL' is lightning ('L'); Star Attention generation "
           "supports softmax attention ('S') layers only"),
    ("MS", "layer 0 of layer_pattern 'MS' is mla ('M')"),
])
def test_other_mechanisms_are_named(pattern, match, key):
    pytest.importorskip("attnlab.nn.lightning")
    cfg = Config(vocab_size=64, d_model=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64,
                 max_seq_len=64, layer_pattern=pattern, kv_lora_rank=16, qk_rope_head_dim=4)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=re.escape(match)):
        star_generate(m, _prompt(key), NEW, star=StarConfig(block_size=4), context_length=16)


def test_sliding_window_is_refused(key):
    cfg = Config(vocab_size=64, d_model=32, num_layers=1, num_heads=4, head_dim=8, mlp_dim=64,
                 max_seq_len=64, local_window_size=8)
    m = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="local_window_size=8: Star Attention generation needs"):
        star_generate(m, _prompt(key), NEW, star=StarConfig(block_size=4), context_length=16)
