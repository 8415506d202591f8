"""attnlab under ``jax_enable_x64`` (on top of the suite's strict rank promotion).

With 64-bit types enabled, ``jnp.arange`` is int64 and Python floats trace as float64, which
breaks code that mixes them with float32/int32 arrays without saying which it means (Pallas
kernels refuse 64-bit scalars outright). Each case runs the same computation with and without
x64, on float32 inputs, and asserts the outputs keep their float32 dtype and their values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.nn import Config, Transformer, generate
from attnlab.ops import attention, decode_attention, dot_product_attention, lightning_attention, mla
from sharding import attention as sp_attention
from sharding import lasp2_attention, lasp_attention, star_attention
from tests.helpers import random_qkv
from tests.lowering import h100_mesh

IMPLS = ["reference", "xla", "pallas_triton", "pallas_tpu"]


def _both(fn, *args):
    """fn(*args) without and with x64, as NumPy pytrees; asserts the leaves keep dtype."""
    without = jax.tree.map(np.asarray, fn(*args))
    with jax.enable_x64(True):
        with_x64 = jax.tree.map(np.asarray, fn(*args))
    for a, b in zip(jax.tree.leaves(without), jax.tree.leaves(with_x64), strict=True):
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
    return without, with_x64


def _close(a, b, tol=1e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def _value_and_grad(fn):
    def loss(q, k, v):
        out = fn(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
        return jnp.sum(jnp.sin(out.astype(jnp.float32)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_every_mask_kind(impl, key):
    q, k, v = random_qkv(key, 1, 40, 40, 4, 2, 32)
    seg = jnp.asarray(np.repeat([0, 1], 20)[None], jnp.int32)
    f = _value_and_grad(lambda q, k, v: attention(
        q, k, v, is_causal=True, segment_ids=seg, local_window_size=(5, 3),
        logits_soft_cap=3.0, q_offset=2, return_residuals=True, impl=impl))
    a, b = _both(f, q, k, v)
    assert a[1][0].dtype == np.float32
    _close(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_and_latent_decode(impl, key):
    q, k, v = random_qkv(key, 2, 40, 40, 4, 2, 32)
    lengths = jnp.array([30, 7], jnp.int32)

    def f(q, k, v):
        out = decode_attention(q, k, v, kv_lengths=lengths, local_window_size=9, impl=impl)
        lat = mla.latent_decode(q, k[:, :, 0], v_dim=24, kv_lengths=lengths, impl=impl)
        return out, lat
    a, b = _both(jax.jit(f), q[:, :2], k, v)
    assert a[0].dtype == a[1].dtype == np.float32
    _close(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_lightning(impl, key):
    q, k, v = random_qkv(key, 1, 64, 64, 2, 2, 32)
    seg = jnp.asarray(np.repeat([0, 1], 32)[None], jnp.int32)
    f = _value_and_grad(lambda q, k, v: lightning_attention(
        q, k, v, decay=jnp.array([0.9, 0.99], jnp.float32), segment_ids=seg, impl=impl))
    _close(*_both(f, q, k, v), tol=1e-4)


def test_dot_product_attention_drop_in(key):
    q, k, v = random_qkv(key, 2, 24, 24, 4, 2, 16)
    mask = jnp.tril(jnp.ones((24, 24), bool))[None, None]
    f = jax.jit(lambda q, k, v: dot_product_attention(
        q, k, v, mask=mask, key_value_seq_lengths=jnp.array([24, 11], jnp.int32),
        implementation="xla"))
    _close(*_both(f, q, k, v))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ring", "striped", "zigzag", "ulysses"])
def test_softmax_sequence_parallel(strategy, key):
    mesh = jax.make_mesh((4,), ("sp",), devices=jax.devices()[:4])
    q, k, v = random_qkv(key, 1, 64, 64, 4, 4, 16)
    f = _value_and_grad(lambda q, k, v: sp_attention(
        q, k, v, mesh=mesh, strategy=strategy, is_causal=True, impl="xla"))
    _close(*_both(f, q, k, v))


def test_star_and_lasp(key):
    mesh = jax.make_mesh((4,), ("sp",), devices=jax.devices()[:4])
    q, k, v = random_qkv(key, 1, 64, 64, 2, 2, 16)
    decay = jnp.array([0.9, 0.99], jnp.float32)

    def f(q, k, v):
        return (star_attention(q, k, v, mesh=mesh, impl="xla"),
                lasp_attention(q, k, v, decay=decay, mesh=mesh, impl="xla"),
                lasp2_attention(q, k, v, decay=decay, mesh=mesh, impl="xla"))
    _close(*_both(jax.jit(f), q, k, v), tol=1e-4)


@pytest.mark.slow
def test_model_train_step_and_generation():
    cfg = Config(d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, layer_pattern="SLM",
                 max_seq_len=32)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)),
                         jnp.int32)

    def run(tokens):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        def loss(params):
            logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1])
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        return value, jax.tree.leaves(grads)[0], generate(model, tokens[:, :8], 4)
    a, b = _both(run, tokens)
    assert a[0].dtype == np.float32 and a[2].dtype == np.int32
    _close(a[:2], b[:2], tol=1e-4)
    np.testing.assert_array_equal(a[2], b[2])


def test_mosaic_gpu_lowers_under_x64():
    """The Mosaic GPU kernel (16-bit inputs only) lowers for CUDA under x64 (forward Mosaic GPU,
    backward Triton) with 16-bit outputs and a float32 LSE. It is not interpreted here: JAX
    0.10.2's Mosaic GPU interpreter fails on this kernel under x64 inside its own loop state
    (a while loop whose carried scalars it types i32 in the condition, i64 in the body)."""
    q = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 128, 2, 64), jnp.bfloat16)

    def fwd(q, k, v):
        return attention(q, k, v, impl="pallas_mosaic_gpu", return_residuals=True,
                         is_causal=True)

    def loss(q, k, v):
        return jnp.sum(fwd(q, k, v)[0].astype(jnp.float32))
    with jax.enable_x64(True), jax.sharding.use_abstract_mesh(h100_mesh()):
        out, lse = jax.eval_shape(fwd, q, k, k)
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k).lower(
            lowering_platforms=("cuda",)).as_text()
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert text.count("stablehlo.custom_call @mosaic_gpu_v2(") == 1
