"""Lightning attention: reference vs float64 oracle, every implementation vs the reference
(values, final state, gradients), chunked prefill then decode, decay helpers, bad inputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import XlaLightningConfig
from attnlab.ops import lightning as L
from tests.helpers import lightning_oracle, random_segments

# Lightning outputs are not O(1): with lambda near 1 the state sums up to T outer products,
# so errors are measured relative to the largest reference value (max(1, max|ref|)).
# bf16: the xla path and kernels feed bf16 operands (scores, decayed k, q, the state) to the
# matmuls with float32 accumulation, about 2^-8 relative per product.
REL_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 4e-2}
GRAD_REL_TOL = {jnp.float32: 5e-5, jnp.bfloat16: 6e-2}

# Kernels (another engineer's pallas_kernels/*/lightning_chunk.py) run interpreted on CPU:
# they take the same cases, but few of them.
KERNELS = [n for n in ("pallas_triton", "pallas_tpu") if n in L.implementations()]


def _close(got, want, rtol, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:.0e} * {scale:.3g}"


@dataclasses.dataclass(frozen=True)
class LCase:
    name: str
    b: int = 2
    t: int = 40
    n: int = 3
    h: int = 16
    hv: int = 16
    decay: tuple[float, ...] | None = None  # None: minimax_decay(n, 1, 4)
    segments: int = 0
    init: bool = False
    chunk: int = 16  # xla chunk length

    def __repr__(self) -> str:
        return self.name


CASES = [
    LCase("minimax"),
    LCase("plain_linear_hv", decay=(1.0, 1.0, 1.0), hv=32, chunk=64),  # one chunk > T
    LCase("ragged_all", t=37, segments=3, init=True, decay=(0.3, 0.9, 1.0), chunk=7),
]


def _inputs(case: LCase, key, dtype=jnp.float32):
    ks = jax.random.split(key, 5)
    q = jax.random.normal(ks[0], (case.b, case.t, case.n, case.h)).astype(dtype)
    k = jax.random.normal(ks[1], (case.b, case.t, case.n, case.h)).astype(dtype)
    v = jax.random.normal(ks[2], (case.b, case.t, case.n, case.hv)).astype(dtype)
    decay = (np.asarray(case.decay, np.float32) if case.decay is not None
             else L.minimax_decay(case.n, 1, 4))
    kw = {}
    if case.init:
        kw["initial_state"] = jax.random.normal(ks[3], (case.b, case.n, case.h, case.hv))
    if case.segments:
        kw["segment_ids"] = random_segments(ks[4], case.b, case.t, case.segments)
    return q, k, v, decay, kw


@pytest.mark.parametrize("case", [CASES[0], CASES[-1]], ids=repr)
def test_reference_matches_float64_oracle(case, key):
    q, k, v, decay, kw = _inputs(case, key)
    o, s = L.reference(q, k, v, decay=decay, return_state=True, scale=0.5, **kw)
    want_o, want_s = lightning_oracle(
        q, k, v, decay, kw.get("initial_state"), kw.get("segment_ids"), 0.5
    )
    _close(o, want_o, 2e-6, "o")
    _close(s, want_s, 2e-6, "state")


def _values_and_grads(impl, q, k, v, s0, decay, kw, chunk=None):
    """((o, state), (dq, dk, dv, dstate)) of a loss weighting o and the state, one jit."""

    def loss(q, k, v, s0):
        o, s = L.lightning_attention(
            q, k, v, decay=decay, initial_state=s0, return_state=True, impl=impl,
            chunk_size=chunk, **kw,
        )
        wo = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape))
        ws = jnp.sin(jnp.arange(s.size, dtype=jnp.float32).reshape(s.shape))
        return jnp.sum(o.astype(jnp.float32) * wo) + jnp.sum(s * ws), (o, s)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    (_, out), grads = jax.jit(grad)(q, k, v, s0)
    return out, grads


def _check_impl(impl, case, dtype, key, chunk=None):
    q, k, v, decay, kw = _inputs(case, key, dtype)
    s0 = kw.pop("initial_state", None)
    if s0 is None:  # gradient w.r.t. the initial state is checked in every case
        s0 = jnp.zeros((case.b, case.n, case.h, case.hv), jnp.float32)
    (o, s), grads = _values_and_grads(impl, q, k, v, s0, decay, kw, chunk)
    (wo, ws), wgrads = _values_and_grads("reference", q, k, v, s0, decay, kw)
    assert o.dtype == dtype and s.dtype == jnp.float32
    rt, gt = REL_TOL[dtype], GRAD_REL_TOL[dtype]
    _close(o, wo, rt, "o")
    _close(s, ws, rt, "state")
    for name, g, w in zip(("dq", "dk", "dv", "dstate"), grads, wgrads):
        _close(g, w, gt, name)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_xla_matches_reference(case, key):
    # Chunk lengths that divide T, do not divide it, and exceed it.
    _check_impl("xla", case, jnp.float32, key, chunk=case.chunk)


def test_xla_matches_reference_bf16(key):
    case = CASES[-1]
    _check_impl("xla", case, jnp.bfloat16, key, chunk=case.chunk)


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_matches_reference(impl, key):
    _check_impl(impl, CASES[-1], jnp.float32, key)


def test_auto_on_cpu_is_xla_and_kernels_report_why(key):
    q, k, v, decay, _ = _inputs(CASES[0], key)
    assert L.REGISTRY.auto_choice(q, k, v, decay=decay, plat="cpu") == "xla"
    why = L.explain(q, k, v, decay=decay, plat="cpu")
    assert why["xla"] is None and why["reference"] is None
    for name in ("pallas_triton", "pallas_tpu"):  # either registered (None) or a reason
        assert name in why


def test_prefill_then_decode_continues_exactly(key):
    b, t, n, h = 2, 24, 2, 16
    ks = jax.random.split(key, 4)
    q, k, v = (jax.random.normal(kk, (b, t, n, h)) for kk in ks[:3])
    decay = L.minimax_decay(n, 0, 2)
    want, want_s = L.reference(q, k, v, decay=decay, return_state=True)
    p = 19  # prefill a non-multiple of the chunk, then decode one token, then two at once

    @jax.jit
    def run(q, k, v):
        o_pre, state = L.lightning_attention(
            q[:, :p], k[:, :p], v[:, :p], decay=decay, return_state=True, impl="xla",
            chunk_size=8,
        )
        outs = [o_pre]
        for lo, hi in ((p, p + 1), (p + 1, p + 3), (p + 3, p + 4), (p + 4, t)):
            o, state = L.lightning_decode(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], state, decay)
            outs.append(o)
        return jnp.concatenate(outs, axis=1), state

    got, state = run(q, k, v)
    _close(got, want, 2e-5, "prefill+decode")
    _close(state, want_s, 2e-5, "state")


def test_two_halves_with_state_equal_one_call(key):
    # The property LASP rests on: a block continues the previous block's state exactly,
    # including a document boundary exactly at the split (handled by the caller zeroing).
    case = LCase("s", t=48, segments=3)
    q, k, v, decay, kw = _inputs(case, key)
    seg = kw["segment_ids"].at[:, 20:].add(1)  # a document starts at the split
    want, want_s = L.reference(q, k, v, decay=decay, segment_ids=seg, return_state=True)

    @jax.jit
    def run(q, k, v, seg):
        o1, s1 = L.lightning_attention(
            q[:, :20], k[:, :20], v[:, :20], decay=decay, segment_ids=seg[:, :20],
            return_state=True,
        )
        keep = (seg[:, 20] == seg[:, 19]).astype(jnp.float32)[:, None, None, None]
        o2, s2 = L.lightning_attention(
            q[:, 20:], k[:, 20:], v[:, 20:], decay=decay, segment_ids=seg[:, 20:],
            initial_state=s1 * keep, return_state=True,
        )
        return jnp.concatenate([o1, o2], 1), s2

    o, s = run(q, k, v, seg)
    _close(o, want, 2e-5, "o")
    _close(s, want_s, 2e-5, "state")


def test_traced_decay_and_vmap(key):
    q, k, v, decay, _ = _inputs(LCase("v", t=16), key)
    want = L.reference(q, k, v, decay=decay)
    vm = jax.jit(jax.vmap(
        lambda q, k, v, d: L.lightning_attention(q[None], k[None], v[None], decay=d),
        in_axes=(0, 0, 0, None),
    ))
    _close(vm(q, k, v, jnp.asarray(decay))[:, 0], want, 2e-5, "vmap, traced decay")


def test_decay_helpers():
    np.testing.assert_allclose(L.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
    # Non-power-of-two: the 4-head slopes, then every other 8-head slope.
    np.testing.assert_allclose(
        L.alibi_slopes(6), [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    )
    n, layers = 16, 8
    for layer in (0, 3, 7):
        s = np.asarray([2.0 ** (-8 * (h + 1) / n) for h in range(n)])
        want = np.exp(-s * (1 - layer / (layers - 1) + 1e-5))
        np.testing.assert_allclose(L.minimax_decay(n, layer, layers), want, rtol=1e-6)
    d = L.minimax_decay(n, 7, layers)
    assert np.all(d > 0.99999) and np.all(d < 1)  # last layer: almost no decay
    assert np.all(np.diff(L.minimax_decay(n, 0, layers)) > 0)  # later heads decay slower
    np.testing.assert_allclose(L.transnormer_decay(8), np.exp(-L.alibi_slopes(8)), rtol=1e-6)
    assert L.minimax_decay(4, 0, 1).shape == (4,)
    with pytest.raises(ValueError, match="layer_idx=4 must lie in"):
        L.minimax_decay(4, 4, 4)
    with pytest.raises(ValueError, match="num_heads must be positive"):
        L.alibi_slopes(0)


def test_bad_inputs(key):
    q, k, v, decay, _ = _inputs(LCase("x", b=1, t=8, n=2, h=8, hv=8), key)
    f = L.lightning_attention
    with pytest.raises(ValueError, match=r"q must have shape \[batch, seq, heads, head_dim\]"):
        f(q[0], k, v, decay=decay)
    with pytest.raises(ValueError, match="k must have q's shape"):
        f(q, k[:, :4], v, decay=decay)
    with pytest.raises(ValueError, match=r"v must agree with q in \[batch, seq, heads\]"):
        f(q, k, v[:, :, :1], decay=decay)
    with pytest.raises(ValueError, match="dtypes must match"):
        f(q, k.astype(jnp.bfloat16), v, decay=decay)
    with pytest.raises(ValueError, match=r"decay must have shape \[N\] = \(2,\)"):
        f(q, k, v, decay=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"decay values must lie in \(0, 1\]"):
        f(q, k, v, decay=[0.5, -0.1])
    with pytest.raises(ValueError, match=r"decay values must lie in \(0, 1\]"):
        f(q, k, v, decay=[0.5, 1.5])
    with pytest.raises(ValueError, match="decay is required"):
        f(q, k, v, decay=None)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, N, H, Hv\]"):
        f(q, k, v, decay=decay, initial_state=jnp.zeros((1, 2, 8, 4)))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[B, T\]"):
        f(q, k, v, decay=decay, segment_ids=jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        f(q, k, v, decay=decay, segment_ids=jnp.zeros((1, 8), jnp.float32))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        f(q, k, v, decay=decay, chunk_size=0)
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        f(q, k, v, decay=decay, impl="fast")
    with pytest.raises(ValueError, match="state is required"):
        L.lightning_decode(q, k, v, None, decay)
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        XlaLightningConfig(chunk_size=-1)
