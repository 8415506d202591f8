"""``attnlab.ops.dot_product_attention`` against ``jax.nn.dot_product_attention(implementation=
"xla")``: JAX's own tests of it (``tests/nn_test.py``: ``testDotProductAttention``,
``testDotProductAttentionMask``, ``testDotProductAttentionBiasGradient``) ported to pytest at
small shapes, with the drop-in substituted and run by ``"xla"`` and the two Pallas kernels
(interpreted on CPU), plus its own cases: 3-D inputs, the residual, windows that leave rows
without keys, key and query masks as segment ids, bad inputs.

Everything runs under ``jax_numpy_rank_promotion="raise"``; values and gradients use the one
tolerance table (``attnlab.testing``).
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import dot_product_attention, explain_dot_product_attention
from attnlab.ops.dot_product_attention import MASKED_LSE
from tests.helpers import random_qkv, tolerance
from tests.ops.attention_base import FAST_COMPILE

IMPLS = ["xla", "pallas_triton", "pallas_tpu"]
KERNELS = IMPLS[1:]


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _vjp(fn, args, dout):
    """(out, cotangents of every arg) of ``fn(*args)`` for output cotangent ``dout``, jitted
    without backend optimization (compile time is most of a test here; numerics are equal)."""

    def run(args, dout):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(dout)

    return jax.jit(run, compiler_options=FAST_COMPILE)(args, dout)


_REFERENCES: dict[str, tuple] = {}


def _case_id(request) -> str:
    """The test case's id without the implementation: the same case for every implementation."""
    name = request.node.name
    for impl in IMPLS:
        name = name.replace(f"-{impl}]", "]").replace(f"[{impl}-", "[").replace(f"[{impl}]", "")
    return name


def _case_key(request) -> jax.Array:
    """A fresh key per case, shared by its implementations (so jax.nn runs once per case)."""
    return jax.random.key(zlib.crc32(_case_id(request).encode()))


def _reference(request, fn, args, dout, part: str = ""):
    """``_vjp`` of the jax.nn reference, computed once per case (and ``part`` of it)."""
    name = _case_id(request) + part
    if name not in _REFERENCES:
        _REFERENCES[name] = _vjp(fn, args, dout)
    return _REFERENCES[name]


def _close(got, want, dtype, name="out"):
    """Element-wise within the table's bound for ``name`` (+ its relative part for grads)."""
    tol = tolerance(dtype)
    rtol = 0.0 if name == "out" else tol.grad_rtol
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, name
    np.testing.assert_allclose(got, want, atol=tol.get(name), rtol=rtol, err_msg=name)


def _jax_nn(*args, **kwargs):
    return jax.nn.dot_product_attention(*args, implementation="xla", **kwargs)


def _f32(tree):
    """Floating arrays upcast: the reference runs in float32 (the table's bounds are against a
    float32 reference, and jax.nn's float16 path does not compile on CPU)."""
    def up(x):
        return x.astype(jnp.float32) if x is not None and jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(up, tree)


# ----------------------------------------------------------------------------- JAX's tests


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "dtype, group_num, use_vmap",
    [(jnp.bfloat16, 1, False), (jnp.float16, 2, True), (jnp.float32, 4, False)],
    ids=["bf16-mha", "f16-gqa2-vmap", "f32-mqa"],
)
def test_dot_product_attention(impl, dtype, group_num, use_vmap, request):
    """testDotProductAttention: GQA against jax.nn on repeated K/V heads, under vmap too."""
    b, s, t, n, h, g = 2, 24, 24, 4, 16, group_num
    k1, k2 = jax.random.split(_case_key(request))
    q, k, v = random_qkv(k1, b, t, s, n, n // g, h, dtype)
    dout = jax.random.normal(k2, q.shape, jnp.float32).astype(dtype)
    ans = functools.partial(dot_product_attention, implementation=impl)
    if impl == "pallas_tpu" and dtype == jnp.float16:
        with pytest.raises(NotImplementedError, match="float32 or bfloat16"):
            ans(q, k, v)
        return
    if use_vmap:
        ans = jax.vmap(ans, in_axes=(0, 0, 0, None, None), out_axes=0)
    k_ref, v_ref = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    want, (dq_ref, dk_ref, dv_ref, *_) = _reference(
        request, _jax_nn, _f32((q, k_ref, v_ref, None, None)), _f32(dout))
    out, (dq, dk, dv, *_) = _vjp(ans, (q, k, v, None, None), dout)
    dk_ref = dk_ref.astype(jnp.float32).reshape(b, s, n // g, g, h).sum(axis=3)
    dv_ref = dv_ref.astype(jnp.float32).reshape(b, s, n // g, g, h).sum(axis=3)
    assert out.dtype == dtype and dq.dtype == dtype
    _close(out, want, dtype)
    for name, got, ref in (("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)):
        _close(got, ref, dtype, name)


MASK_MODES = ["bias", "causal", "padding", "custom", ("causal", "padding"),
              ("custom", "padding"), ("bias", "causal"), ("causal", "sliding_window")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_mode", MASK_MODES, ids=lambda m: "+".join(np.atleast_1d(m)))
def test_dot_product_attention_mask(impl, mask_mode, request):
    """testDotProductAttentionMask: bias, causal, sequence lengths, a custom boolean mask, a
    window, and their combinations; values and the gradients of q, k, v and the bias.

    A general [1, 1, T, S] mask and a bias are what the kernels cannot take: named, they
    raise NotImplementedError."""
    mask_mode = (mask_mode,) if isinstance(mask_mode, str) else mask_mode
    dtype = jnp.bfloat16
    b, s, t, n, h = 2, 32, 32, 4, 16
    k1, k2, k3 = jax.random.split(_case_key(request), 3)
    q, k, v = random_qkv(k1, b, t, s, n, n, h, dtype)
    dout = jax.random.normal(k2, q.shape, jnp.float32).astype(dtype)
    bias = mask = q_seqlen = kv_seqlen = window = None
    is_causal = "causal" in mask_mode
    if "padding" in mask_mode:
        q_seqlen = jnp.array([t // 2, t // 4], jnp.int32)
        kv_seqlen = jnp.array([s // 4, s // 2], jnp.int32)
    if "custom" in mask_mode:  # a generated causal mask as the custom mask
        mask = jnp.tril(jnp.ones((t, s), jnp.bool_))[None, None]
    if "bias" in mask_mode:
        bias = jax.random.normal(k3, (1, n, t, s), jnp.float32).astype(dtype)
    if "sliding_window" in mask_mode:
        window = (3, 2) if is_causal else (3, 0)

    def call(sdpa, **extra):
        return lambda q, k, v, b, m, qs, kvs: sdpa(
            q, k, v, b, m, is_causal=is_causal, query_seq_lengths=qs,
            key_value_seq_lengths=kvs, local_window_size=window, **extra)

    args = (q, k, v, bias, mask, q_seqlen, kv_seqlen)
    if impl in KERNELS and (bias is not None or mask is not None):
        with pytest.raises(NotImplementedError, match="bias"):
            call(dot_product_attention, implementation=impl)(*args)
        return
    want, grads_ref = _reference(request, call(_jax_nn), _f32(args), _f32(dout))
    out, grads = _vjp(call(dot_product_attention, implementation=impl), args, dout)
    _close(out, want, dtype)
    for name, got, ref in zip(("dq", "dk", "dv", "dq"), grads[:4], grads_ref[:4]):
        if ref is not None:  # the bias gradient is held to dq's bound
            _close(got, ref, dtype, name)


@pytest.mark.parametrize("batch_size, use_vmap", [(1, False), (2, True)])
def test_dot_product_attention_bias_gradient(batch_size, use_vmap, key):
    """testDotProductAttentionBiasGradient: a [B, N, S, S] bias and an all-True [1, 1, S]
    mask, under vmap too; values and the bias gradient (xla: the kernels take no bias)."""
    dtype = jnp.bfloat16
    b, s, n, h = batch_size, 32, 4, 16
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (b, s, n, h), jnp.float32).astype(dtype)
    bias = jax.random.normal(k2, (b, n, s, s), jnp.float32).astype(dtype)
    mask = jnp.ones((1, 1, s), jnp.bool_)

    def attention(sdpa, x, bias, mask):
        return sdpa(query=x, key=x, value=x, bias=bias, mask=mask, is_causal=False)

    ref = functools.partial(attention, _jax_nn)
    ans = functools.partial(attention, functools.partial(dot_product_attention,
                                                         implementation="xla"))
    if use_vmap:
        ref, ans = (jax.vmap(f, in_axes=(0, 0, None)) for f in (ref, ans))
    want, (_, dbias_ref, _) = _vjp(ref, _f32((x, bias, mask)), _f32(x))
    out, (_, dbias, _) = _vjp(ans, (x, bias, mask), x)
    _close(out, want, dtype)
    _close(dbias, dbias_ref, dtype, "dq")
    with pytest.raises(NotImplementedError, match="pallas_triton takes no bias"):
        dot_product_attention(x, x, x, bias, mask, implementation="pallas_triton")


# ----------------------------------------------------------------------------- our own cases


def _check_against_jax_nn(request, impl, q, k, v, dout, kwargs, dtype=jnp.float32, part=""):
    """out, residual and dq/dk/dv against jax.nn; the residual exactly where a row sees no
    key (jax.nn's masked logit)."""

    def with_residual(sdpa, **extra):
        def fn(q, k, v):
            out, res = sdpa(q, k, v, return_residual=True, **kwargs, **extra)
            return out, res
        return fn

    dres = jnp.zeros(q.shape[:-1], dtype)
    (want, res_ref), grads_ref = _reference(request, with_residual(_jax_nn), (q, k, v),
                                            (dout, dres), part)
    (out, res), grads = _vjp(with_residual(dot_product_attention, implementation=impl),
                             (q, k, v), (dout, dres))
    assert out.shape == q.shape and res.shape == q.shape[:-1] and res.dtype == res_ref.dtype
    _close(out, want, dtype)
    dead = np.asarray(res_ref, np.float32) <= MASKED_LSE / 2
    np.testing.assert_array_equal(np.asarray(res)[dead], np.asarray(res_ref)[dead])
    _close(np.asarray(res, np.float32)[~dead], np.asarray(res_ref, np.float32)[~dead], dtype,
           "lse")
    for name, got, ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        _close(got, ref, dtype, name)
    return dead


@pytest.mark.parametrize("impl", IMPLS)
def test_windows_that_leave_rows_without_keys(impl, request):
    """T > S + left: the last rows see no key; jax.nn gives them the mean value and its masked
    logit as residual, and so does the drop-in (out, residual, gradients)."""
    k1, k2 = jax.random.split(_case_key(request))
    q, k, v = random_qkv(k1, 2, 24, 8, 4, 2, 16)
    dout = jax.random.normal(k2, q.shape)
    dead = _check_against_jax_nn(request, impl, q, k, v, dout, dict(local_window_size=(2, 1)))
    assert dead[:, 11:].all() and not dead[:, :10].any()


@pytest.mark.parametrize("impl", IMPLS)
def test_unbatched_inputs_key_and_query_masks(impl, request):
    """[T, N, H] inputs (jax.nn's 3-D form) with a key mask [1, S] and, batched, a query mask
    [B, 1, T, 1] with key lengths (one of them 0): these reach every kernel as segment ids."""
    k1, k2, k3, k4 = jax.random.split(_case_key(request), 4)
    q, k, v = random_qkv(k1, 2, 16, 24, 4, 1, 16)
    dout = jax.random.normal(k2, q.shape)
    key_mask = jax.random.bernoulli(k3, 0.6, (1, 24))
    _check_against_jax_nn(request, impl, q[0], k[0], v[0], dout[0],
                          dict(mask=key_mask, is_causal=True), part="unbatched")
    q_mask = jax.random.bernoulli(k4, 0.7, (2, 1, 16, 1))
    kwargs = dict(mask=q_mask, key_value_seq_lengths=jnp.array([0, 19], jnp.int32),
                  query_seq_lengths=jnp.array([16, 9], jnp.int32))
    dead = _check_against_jax_nn(request, impl, q, k, v, dout, kwargs, part="batched")
    assert dead[0].all()


def test_residual_dtype_and_masked_value_as_jax_nn(key):
    """The residual is in the key dtype with jax.nn's value for a row without keys: its masked
    logit in bfloat16, -inf in float16 (the float32 logit overflows there, in jax.nn too)."""
    lengths = jnp.array([0, 5], jnp.int32)

    def residual(sdpa, q, k, v):
        return sdpa(q, k, v, key_value_seq_lengths=lengths, return_residual=True)[1]

    q, k, v = random_qkv(key, 2, 8, 8, 2, 2, 16, jnp.bfloat16)
    res = jax.jit(functools.partial(residual, dot_product_attention))(q, k, v)
    res_ref = jax.jit(functools.partial(residual, _jax_nn))(q, k, v)
    assert res.dtype == res_ref.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(res[0]), np.asarray(res_ref[0]))
    _close(res[1], res_ref[1], jnp.bfloat16, "lse")
    # float16: jax.nn's float16 path does not compile on CPU; its value is the cast logit.
    q, k, v = (x.astype(jnp.float16) for x in (q, k, v))
    res = jax.jit(functools.partial(residual, dot_product_attention))(q, k, v)
    assert res.dtype == jnp.float16 and np.isneginf(np.asarray(res[0])).all()
    with np.errstate(over="ignore"):
        assert np.float16(MASKED_LSE) == -np.inf
    assert np.isfinite(np.asarray(res[1])).all()


def test_traced_scale_and_jit(key):
    """A traced scale (jax.nn takes one) is folded into the query."""
    q, k, v = random_qkv(key, 1, 8, 8, 2, 2, 16)
    f = jax.jit(lambda q, k, v, sc: dot_product_attention(q, k, v, scale=sc, is_causal=True))
    _close(f(q, k, v, 0.3), _jax_nn(q, k, v, scale=0.3, is_causal=True), jnp.float32)


def test_default_implementation_falls_back_and_explains(key):
    """implementation=None takes a general mask on any platform (auto skips the kernels,
    which take no bias), and explain_dot_product_attention says why; a key mask does not need
    the fallback."""
    q, k, v = random_qkv(key, 2, 8, 8, 2, 2, 16)
    mask = jax.random.bernoulli(key, 0.7, (2, 1, 8, 8)).at[:, :, :, 0].set(True)
    got, want = (jax.jit(lambda q, k, v, m, f=f: f(q, k, v, mask=m))(q, k, v, mask)
                 for f in (dot_product_attention, _jax_nn))
    _close(got, want, jnp.float32)
    sds = jax.ShapeDtypeStruct(q.shape, q.dtype)
    why = explain_dot_product_attention(sds, sds, sds, mask=mask, plat="gpu")
    assert "no bias" in why["pallas_triton"] and why["xla"] is None
    why = explain_dot_product_attention(sds, sds, sds, mask=mask[:, :, :1], plat="gpu")
    assert why["pallas_triton"] is None
    why = explain_dot_product_attention(
        sds, sds, sds, plat="tpu", key_value_seq_lengths=jnp.array([3, 8], jnp.int32))
    assert why["pallas_tpu"] is None


# ----------------------------------------------------------------------------- bad input

X4 = (2, 8, 4, 16)
BAD_INPUTS = [
    (dict(query=(2, 2, 8, 4, 16)), ValueError, r"query must have shape \[B, T, N, H\] or"),
    (dict(key=(8, 2, 16)), ValueError, r"key must have query's rank 4 \(\[B, S, K, H\]\)"),
    (dict(key=(2, 8, 3, 16), value=(2, 8, 3, 16)), ValueError,
     "query has 4 heads but key has 3 and value 3; the number of query heads must be a multiple"),
    (dict(key=(2, 8, 4, 8)), ValueError, "query head dim 16 and key head dim 8 must be equal"),
    (dict(value=(2, 7, 4, 16)), ValueError, "must share B, and key and value S"),
    (dict(mask=np.ones((2, 4, 8, 3), bool)), ValueError,
     r"mask of shape \(2, 4, 8, 3\) is not broadcastable to \[B, N, T, S\] = \(2, 4, 8, 8\)"),
    (dict(mask=np.ones((2, 8, 8), np.float32)), ValueError, "mask must be boolean"),
    (dict(bias=np.ones((3, 1, 8, 8), np.float32)), ValueError,
     r"bias of shape \(3, 1, 8, 8\) is not broadcastable"),
    (dict(bias=np.ones((1, 2, 1, 8, 8), np.float32)), ValueError, "bias must have at most 4"),
    (dict(query_seq_lengths=np.array([3, 4, 5], np.int32)), ValueError,
     r"query_seq_lengths must have shape \(B,\) = \(2,\)"),
    (dict(key_value_seq_lengths=np.array([3.0, 4.0])), ValueError,
     "key_value_seq_lengths must be integers"),
    (dict(local_window_size=(-1, 2)), ValueError, "local_window_size must be"),
    (dict(implementation="flash"), ValueError,
     r"implementation must be None, 'xla' or 'cudnn' \(jax.nn's names\) or one of attnlab's"),
    (dict(implementation="cudnn"), NotImplementedError, "needs a CUDA GPU"),
    (dict(mask=np.ones((1, 4, 8, 8), bool), implementation="pallas_tpu"), NotImplementedError,
     r"the boolean mask of shape \(1, 4, 8, 8\) is passed as a -inf bias: only a key mask"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_INPUTS,
                         ids=lambda x: None if isinstance(x, dict) else "")
def test_bad_inputs_name_the_argument(kwargs, error, message):
    kwargs = dict(kwargs)
    qkv = [jnp.ones(kwargs.pop(name, X4), jnp.float32) for name in ("query", "key", "value")]
    if jax.default_backend() != "cpu" and kwargs.get("implementation") == "cudnn":
        pytest.skip("cudnn runs on a GPU")
    with pytest.raises(error, match=message):
        dot_product_attention(*qkv, **kwargs)
