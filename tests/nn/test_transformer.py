"""Transformer LM: prefill + decode equals the full forward, segment isolation, generation,
gradients, bf16 compute, parameter/FLOP counts, and early errors for bad configs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from attnlab.nn import Config, Transformer, decode_step, generate, init_caches, mechanisms, prefill
from attnlab.nn.attention import SoftmaxAttention

VOCAB = 64


def _cfg(pattern: str = "SS", **kw) -> Config:
    base = dict(vocab_size=VOCAB, d_model=32, num_layers=len(pattern), layer_pattern=pattern,
                num_heads=4, num_kv_heads=2, max_seq_len=64, local_window_size=6,
                attention_impl="xla")
    return Config(**{**base, **kw})


@functools.cache
def _model(pattern: str) -> Transformer:
    return Transformer(_cfg(pattern), rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, tokens, segment_ids=None):
    logits, caches = model(tokens, segment_ids=segment_ids)
    assert caches is None
    return logits


# Tests share one model and one input shape [B, T] = [2, 20], so they share compilations.
B, T = 2, 20


def _tokens(key, b, t):
    """Random tokens from the test's key, drawn by NumPy (no compilation per shape)."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    return jnp.asarray(rng.integers(0, VOCAB, (b, t)), jnp.int32)


def _needs(pattern: str):
    missing = sorted(set(pattern) - set(mechanisms()))
    return pytest.mark.skipif(
        bool(missing), reason=f"mechanism(s) {missing} not registered (module not present)"
    )


@pytest.mark.parametrize(
    "pattern", [pytest.param("SS", marks=_needs("SS")), pytest.param("LS", marks=_needs("LS")),
                pytest.param("MSM", marks=_needs("MSM"))]
)
def test_prefill_then_decode_equals_full_forward(key, pattern):
    model = _model(pattern)
    b, t0, total = B, 12, T
    tokens = _tokens(key, b, total)
    full = _forward(model, tokens)
    assert full.shape == (b, total, VOCAB) and full.dtype == jnp.float32
    caches = init_caches(model, b, 32)
    logits, caches = prefill(model, tokens[:, :t0], caches)
    steps = [logits]
    for p in range(t0, total):
        step_logits, caches = decode_step(model, tokens[:, p], caches, jnp.full((b,), p))
        steps.append(step_logits[:, None])
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-4, rtol=2e-4)


def test_generate_greedy_and_sampled(key):
    model = _model("SS")
    kt, ks = jax.random.split(key)
    prompt = _tokens(kt, B, 5)
    out = generate(model, prompt, T - 5)
    assert out.shape == (B, T) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :5], prompt)
    logits = _forward(model, out)
    np.testing.assert_array_equal(out[:, 5:], jnp.argmax(logits[:, 4:-1], -1))

    sampled = generate(model, prompt, T - 5, temperature=1.5, top_k=3, rng=ks)
    again = generate(model, prompt, T - 5, temperature=1.5, top_k=3, rng=ks)
    np.testing.assert_array_equal(sampled, again)
    logits = _forward(model, sampled)[:, 4:-1]
    top3 = jax.lax.top_k(logits, 3)[1]
    assert bool(jnp.all(jnp.any(top3 == sampled[:, 5:, None], axis=-1)))
    # top_k=1 is greedy whatever the temperature (same compilation: both are traced).
    np.testing.assert_array_equal(generate(model, prompt, T - 5, temperature=0.7, top_k=1), out)
    assert generate(model, prompt, 0).shape == (B, 5)


def test_segment_ids_isolate_documents(key):
    model = _model("SS")
    k1, k2 = jax.random.split(key)
    tokens = _tokens(k1, B, T)
    seg = jnp.array([[0] * 9 + [1] * 11] * B, jnp.int32)
    other = tokens.at[:, :9].set(_tokens(k2, B, 9))
    a, b = _forward(model, tokens, seg), _forward(model, other, seg)
    np.testing.assert_allclose(a[:, 9:], b[:, 9:], atol=1e-6)
    assert float(jnp.abs(a[:, :9] - b[:, :9]).max()) > 1e-3  # doc 1 itself did change


def test_grads_finite(key):
    # One layer, reference attention (the XLA flash backward is checked in tests/ops), and
    # the untied head.
    model = Transformer(_cfg("S", local_window_size=None, logits_soft_cap=5.0,
                             tie_embeddings=False, attention_impl="reference"),
                        rngs=nnx.Rngs(1))
    tokens = _tokens(key, B, T)
    seg = jnp.array([[0] * T, [0] * 7 + [1] * (T - 7)], jnp.int32)

    @nnx.jit
    def loss_and_grads(model, tokens, seg):
        def loss_fn(model):
            logits = model(tokens[:, :-1], segment_ids=seg[:, :-1])[0]
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        # Per-parameter summaries inside the jit (eager checks compile once per shape).
        stats = jax.tree.map(lambda g: (jnp.all(jnp.isfinite(g)), jnp.abs(g).max()),
                             nnx.state(grads, nnx.Param))
        return loss, stats

    loss, stats = loss_and_grads(model, tokens, seg)
    assert np.isfinite(float(loss)) and 2.0 < float(loss) < 10.0
    for path, (finite, largest) in jax.tree.leaves_with_path(
        stats, is_leaf=lambda x: isinstance(x, tuple)
    ):
        assert bool(finite), path
        assert float(largest) > 0, f"zero gradient at {path}"


def test_bf16_compute_with_fp32_params(key):
    tokens = _tokens(key, B, T)
    m32 = Transformer(_cfg("SS"), rngs=nnx.Rngs(2))
    m16 = Transformer(_cfg("SS", dtype=jnp.bfloat16), rngs=nnx.Rngs(2))
    for p in jax.tree.leaves(nnx.state(m16, nnx.Param)):
        assert p.dtype == jnp.float32
    l32, l16 = _forward(m32, tokens), _forward(m16, tokens)
    assert l16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(l16)))
    scale = float(jnp.abs(l32).max())
    assert float(jnp.abs(l16 - l32).max()) < 0.1 * scale


def test_num_params_and_flops():
    cfg = _cfg("SS")
    model = _model("SS")
    d, v, h, n, k, f = 32, VOCAB, cfg.head_dim, 4, 2, cfg.mlp_dim
    per_layer = d * (n * h) * 2 + d * (k * h) * 2 + 3 * d * f + 2 * d
    assert model.num_params() == v * d + 2 * per_layer + d
    attn = 2 * 12 * n * h * min(40, cfg.local_window_size + 1)
    assert model.flops_per_token(40) == 6 * model.num_params() + attn


def test_bad_configs_fail_before_compile(key):
    with pytest.raises(ValueError, match=r"unknown mechanism letter\(s\) 'X'; known: .*S=softmax"):
        Transformer(_cfg("SX"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="has 2 letters but num_layers=3"):
        Config(d_model=32, num_layers=3, layer_pattern="SS")
    with pytest.raises(ValueError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        _cfg("SS", num_kv_heads=3)
    with pytest.raises(ValueError, match="attention_impl='nope' is not an attention implementation"):
        Transformer(_cfg("SS", attention_impl="nope"), rngs=nnx.Rngs(0))
    model = _model("SS")
    # NumPy inputs: nothing below may compile (each error is raised before tracing).
    tokens = np.asarray(_tokens(key, 1, 65))
    with pytest.raises(ValueError, match="longer than max_seq_len=64"):
        model(tokens)
    with pytest.raises(ValueError, match="positions must have shape \\(1, 8\\)"):
        model(tokens[:, :8], positions=np.arange(8))
    with pytest.raises(ValueError, match="caches has 1 entries but the model has 2 layers"):
        model(tokens[:, :8], caches=[None])
    with pytest.raises(ValueError, match="max_len=65 must lie in \\[1, max_seq_len=64\\]"):
        init_caches(model, 1, 65)
    prompt = tokens[:, :60]
    with pytest.raises(ValueError, match="= 65 exceeds max_seq_len=64"):
        generate(model, prompt, 5)
    with pytest.raises(ValueError, match="top_k=0 must lie in \\[1, vocab_size=64\\]"):
        generate(model, prompt[:, :4], 2, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="temperature=-1.0 must be >= 0"):
        generate(model, prompt[:, :4], 2, temperature=-1.0)
    with pytest.raises(ValueError, match="prompt must have shape \\[batch, T0\\]"):
        generate(model, prompt[0], 2)
    # -1 would read the last embedding row, vocab_size a NaN row
    for bad, seen in ((-1, r"\[-1, \d+\]"), (64, r"\[\d+, 64\]")):
        match = r"prompt token ids must lie in \[0, vocab_size=64\), got values in " + seen
        with pytest.raises(ValueError, match=match):
            generate(model, jnp.asarray(prompt[:, :4]).at[0, 1].set(bad), 2)
    assert SoftmaxAttention.cache_bytes_per_token(model.cfg) == 2 * 2 * 8 * 2
