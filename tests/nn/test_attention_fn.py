"""``attnlab.nn.attention_fn`` in Flax's attention modules: the same outputs and gradients as
their default ``attention_fn`` (nnx.MultiHeadAttention and linen.MultiHeadDotProductAttention),
by ``implementation=None`` (auto) and the two Pallas kernels (interpreted on CPU), under
``jax_numpy_rank_promotion="raise"``; plus the
Flax module tests that exercise ``attention_fn`` (``tests/nnx/nn/attention_test.py`` and
``tests/linen/linen_attention_test.py`` in google/flax), ported with ours substituted.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx
from jax.nn import initializers

from attnlab.nn import attention_fn, make_attention_fn
from tests.helpers import grad_tol, tolerance
from tests.ops.attention_base import FAST_COMPILE

IMPLS = [None, "pallas_triton", "pallas_tpu"]
KERNELS = IMPLS[1:]
ATOL = tolerance(jnp.float32).out


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _fn(impl):
    return attention_fn if impl is None else make_attention_fn(impl)


def _ids(impl):
    return "auto" if impl is None else impl


def _nnx_pair(impl, **kw):
    """(Flax's default module, ours) with identical parameters."""
    args = dict(num_heads=4, in_features=16, qkv_features=16, num_kv_heads=2, decode=False)
    args.update(kw)
    return (nnx.MultiHeadAttention(**args, rngs=nnx.Rngs(0)),
            nnx.MultiHeadAttention(**args, attention_fn=_fn(impl), rngs=nnx.Rngs(0)))


def _nnx_value_and_grads(model, x, **call):
    """Output, and the gradients of a loss for the parameters and the input."""
    graphdef, params = nnx.split(model)

    def loss(params, x):
        y = nnx.merge(graphdef, params)(x, **call)
        return jnp.sum(jnp.sin(y)), y

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                 compiler_options=FAST_COMPILE)
    (_, y), grads = fn(params, x)
    return y, grads


def _assert_tree_close(got, want, atol):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol)


def _key_mask(b, s, lengths):
    """A key-padding mask [B, 1, 1, S] (what a decode cache makes): kernels take it."""
    return (jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None])[:, None, None, :]


# ----------------------------------------------------------------------------- nnx


@pytest.mark.parametrize("impl", IMPLS, ids=_ids)
@pytest.mark.parametrize("masking", ["none", "causal", "key_mask"])
def test_nnx_matches_default_attention(impl, masking, key):
    """Output and gradients (parameters and input) equal the default attention_fn's, GQA."""
    x = jax.random.normal(key, (2, 12, 16))
    call = {"none": {}, "causal": {"is_causal": True},
            "key_mask": {"mask": _key_mask(2, 12, [12, 7])}}[masking]
    default, ours = _nnx_pair(impl)
    y_ref, g_ref = _nnx_value_and_grads(default, x, **call)
    y, g = _nnx_value_and_grads(ours, x, **call)
    np.testing.assert_allclose(y, y_ref, atol=ATOL)
    _assert_tree_close(g, g_ref, grad_tol(jnp.float32, "dq"))


def test_nnx_padding_mask_falls_back_for_auto_and_refuses_named_kernels(key):
    """A [B, 1, T, S] padding mask (make_attention_mask) is not a key mask: auto takes it (the
    xla path, -inf bias), padded query rows included; a named kernel says why not."""
    x = jax.random.normal(key, (2, 6, 16))
    valid = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
    mask = nnx.make_attention_mask(valid, valid)
    default, ours = _nnx_pair(None)
    y_ref, g_ref = _nnx_value_and_grads(default, x, mask=mask)
    y, g = _nnx_value_and_grads(ours, x, mask=mask)
    np.testing.assert_allclose(y, y_ref, atol=ATOL)
    _assert_tree_close(g, g_ref, grad_tol(jnp.float32, "dq"))
    _, kernel = _nnx_pair("pallas_triton")
    with pytest.raises(NotImplementedError, match=r"mask of shape \(2, 1, 6, 6\)"):
        kernel(x, mask=mask)


@pytest.mark.parametrize("impl", IMPLS, ids=_ids)
def test_nnx_autoregressive_decode_matches_full_forward(impl, key):
    """decode=True: tokens one at a time through the cache (a key mask [B, 1, 1, L], which
    every kernel takes) equal the causal forward of the whole sequence."""
    x = jax.random.normal(key, (2, 5, 16))
    _, ours = _nnx_pair(impl)
    want = ours(x, is_causal=True)
    ours.init_cache(x.shape)

    @nnx.jit
    def step(model, token):
        return model(token, decode=True)

    got = jnp.concatenate([step(ours, x[:, i:i + 1]) for i in range(x.shape[1])], axis=1)
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_nnx_dropout_falls_back_to_flax_with_the_same_bits(key):
    """Active dropout is Flax's own (on the weights, same random bits as the default): equal
    outputs; deterministic calls run attnlab; a named kernel refuses active dropout."""
    x = jax.random.normal(key, (2, 6, 16))
    default, ours = _nnx_pair(None, dropout_rate=0.5)
    np.testing.assert_array_equal(ours(x, deterministic=False, rngs=nnx.Rngs(dropout=1)),
                                  default(x, deterministic=False, rngs=nnx.Rngs(dropout=1)))
    np.testing.assert_allclose(ours(x, deterministic=True), default(x, deterministic=True),
                               atol=ATOL)
    _, kernel = _nnx_pair("pallas_triton", dropout_rate=0.5)
    with pytest.raises(NotImplementedError, match="attention dropout"):
        kernel(x, deterministic=False, rngs=nnx.Rngs(dropout=1))


@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
def test_nnx_basic_and_sow_attention_weights():
    """Flax's test_basic and test_multihead_sow_attention_weights with our attention_fn:
    sown weights come from Flax's function (attnlab never materializes them)."""
    module = nnx.MultiHeadAttention(num_heads=2, in_features=3, qkv_features=6,
                                    out_features=6, attention_fn=attention_fn, rngs=nnx.Rngs(0))
    assert module(jnp.ones((1, 7, 3)), decode=False).shape == (1, 7, 6)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([
                nnx.MultiHeadAttention(in_features=8, num_heads=8, attention_fn=attention_fn,
                                       kernel_init=nnx.initializers.ones_init(),
                                       bias_init=nnx.initializers.zeros_init(),
                                       deterministic=False, decode=False, rngs=rngs)
                for _ in range(3)])

        def __call__(self, x, sow_weights=False):
            x = self.layers[0](x, sow_weights=sow_weights)
            x = self.layers[1](x)
            return self.layers[2](x, sow_weights=sow_weights)

    model = Model(nnx.Rngs(0))
    model(jnp.ones((4, 6, 8)), True)
    weights = nnx.pop(model, nnx.Intermediate)
    assert [w.shape for w in jax.tree.leaves(weights["layers"][0])] == [(4, 8, 6, 6)]
    assert 1 not in weights["layers"]
    model(jnp.ones((4, 6, 8)))
    assert not nnx.pop(model, nnx.Intermediate)


@pytest.mark.parametrize("decode", [False, True])
def test_nnx_linen_equivalence_with_ours(decode):
    """Flax's test_nnx_attention_equivalence with attnlab's attention_fn in both modules."""
    x = jnp.ones((1, 3))
    kw = dict(num_heads=2, qkv_features=6, out_features=6, decode=decode,
              attention_fn=attention_fn)
    model_nnx = nnx.MultiHeadAttention(in_features=3, rngs=nnx.Rngs(42), **kw)
    model = linen.MultiHeadDotProductAttention(**kw)
    variables = model.init(jax.random.key(42), x)
    for name in ("query", "key", "value", "out"):
        getattr(model_nnx, name).kernel[...] = variables["params"][name]["kernel"]
        getattr(model_nnx, name).bias[...] = variables["params"][name]["bias"]
    if decode:
        model_nnx.init_cache(x.shape)
    out, _ = model.apply(variables, x, mutable=["cache"])
    np.testing.assert_allclose(model_nnx(x), out, atol=ATOL)


# ----------------------------------------------------------------------------- linen


@pytest.mark.parametrize("impl", IMPLS, ids=_ids)
def test_linen_matches_default_attention(impl, key):
    """linen: output and gradients equal the default's; two batch dims (Flax's
    encoder-decoder test shape) and a key mask."""
    x = jax.random.normal(key, (2, 3, 8, 16))
    mask = _key_mask(6, 8, [8, 3, 5, 8, 1, 6]).reshape(2, 3, 1, 1, 8)
    default = linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=16)
    ours = default.clone(attention_fn=_fn(impl))
    params = default.init(jax.random.key(0), x)

    def run(module):
        def loss(params, x):
            y = module.apply(params, x, mask=mask)
            return jnp.sum(jnp.sin(y)), y
        fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        return jax.jit(fn, compiler_options=FAST_COMPILE)(params, x)

    (_, y_ref), g_ref = run(default)
    (_, y), g = run(ours)
    np.testing.assert_allclose(y, y_ref, atol=ATOL)
    _assert_tree_close(g, g_ref, grad_tol(jnp.float32, "dq"))


@pytest.mark.parametrize("impl", [None, "pallas_triton"], ids=_ids)
def test_linen_decoding(impl):
    """Flax's test_decoding (1-D): the decode cache, token by token, equals the full forward
    with a causal mask."""
    bs, num_heads, num_features = 2, 3, 4
    key1, key2 = jax.random.split(jax.random.key(0))
    inputs = jax.random.normal(key1, (bs, 5, num_heads * num_features))
    module = linen.MultiHeadDotProductAttention(
        num_heads=num_heads, qkv_features=num_heads * num_features,
        precision=jax.lax.Precision.HIGHEST, deterministic=False, decode=False,
        attention_fn=_fn(impl))
    decode_module = module.clone(decode=True)
    initial_vars = decode_module.init(key2, inputs)
    state, params = flax.core.pop(initial_vars, "params")
    causal_mask = linen.make_causal_mask(jnp.ones((bs, 5)))
    # The causal mask is [B, 1, T, T]: auto computes it with the xla path, kernels refuse it.
    full = module.clone(attention_fn=attention_fn)
    y_ref = jax.jit(lambda x, m: full.apply(initial_vars, x, mask=m))(inputs, causal_mask)

    @jax.jit
    def step(state, x):
        y, state = decode_module.apply({"params": params, **state}, x, mutable=["cache"])
        return state, y

    ys = []
    for i in range(inputs.shape[1]):
        state, y = step(state, inputs[:, i:i + 1])
        ys.append(y)
    np.testing.assert_allclose(jnp.concatenate(ys, axis=1), y_ref, atol=1e-5)


def test_linen_autoregressive_receptive_field_1d():
    """Flax's test_autoregresive_receptive_field_1d with our attention_fn."""
    rng1, rng2 = jax.random.split(jax.random.key(0))
    length, input_shape = 10, (1, 10, 1)
    inputs = jax.random.normal(rng2, input_shape)
    module = linen.MultiHeadDotProductAttention(
        num_heads=1, kernel_init=initializers.ones, deterministic=False,
        attention_fn=attention_fn)
    initial_vars = module.init(rng1, inputs)
    causal_mask = linen.make_causal_mask(jnp.ones(input_shape[:-1]))

    def model_loss(inputs, pos):
        return module.apply(initial_vars, inputs, mask=causal_mask)[0, pos, :].sum()

    grads = jax.jit(jax.vmap(jax.grad(model_loss), in_axes=(None, 0)))(
        inputs, jnp.arange(length))
    deps = np.asarray(jnp.any(jnp.abs(grads[:, 0]) > 1e-5, axis=-1))  # [pos, position]
    np.testing.assert_array_equal(deps, np.tril(np.ones((length, length), bool)))


def test_linen_explicit_dropout_and_sow():
    """Flax's test_multihead_self_attention_explicit_dropout and
    test_multihead_sow_attention_weights with our attention_fn (both Flax's own path)."""

    class Foo(linen.Module):
        @linen.compact
        def __call__(self, x, dropout_rng=None):
            kw = dict(num_heads=8, qkv_features=16, kernel_init=initializers.ones,
                      bias_init=initializers.zeros, dropout_rate=0.5, deterministic=False,
                      attention_fn=attention_fn)
            a = linen.MultiHeadDotProductAttention(**kw)(x, x, dropout_rng=dropout_rng)
            b = linen.MultiHeadDotProductAttention(**kw)(x, x, dropout_rng=dropout_rng)
            return a, b

    module = Foo()
    rng1, rng2, rng3, rng4 = jax.random.split(jax.random.key(0), 4)
    x = jnp.ones((4, 2, 3, 5))
    rngs = {"params": rng1, "dropout": rng2}
    v = module.init(rngs, x)
    a, b = module.apply(v, x, rngs=rngs)
    c, d = module.apply(v, x, rngs={"dropout": rng2})
    e, _ = module.apply(v, x, rngs={"dropout": rng3})
    assert not (a == b).all() and (a == c).all() and (b == d).all() and not (a == e).all()
    a, b = module.apply(v, x, rngs=rngs, dropout_rng=rng4)
    assert (a == b).all()

    sa = linen.MultiHeadDotProductAttention(num_heads=8, qkv_features=16,
                                            attention_fn=attention_fn)
    x = jnp.ones((4, 6, 5))
    params = sa.init(jax.random.key(0), x)
    _, inter = sa.apply(params, x, mutable=["intermediates"], sow_weights=True)
    assert inter["intermediates"]["attention_weights"][0].shape == (4, 8, 6, 6)


# ----------------------------------------------------------------------------- factory


def test_make_attention_fn_checks_its_arguments():
    fn = make_attention_fn("xla", local_window_size=(2, 0))
    assert fn.keywords == {"implementation": "xla", "local_window_size": (2, 0)}
    with pytest.raises(ValueError, match=r"got unknown keywords \['dropout'\]"):
        make_attention_fn(dropout=0.1)
    with pytest.raises(ValueError, match="implementation must be None"):
        make_attention_fn("flash")
    with pytest.raises(NotImplementedError, match="sow the attention weights"):
        make_attention_fn("xla")(*(jnp.ones((1, 4, 2, 8)),) * 3, module=object())
