"""The Triton lightning-attention kernels against the float64 oracle and a jnp recurrence.

CPU runs use the Pallas interpreter at tiny shapes (it is slow: one jit per case computes
values and gradients together); ``gpu``-marked tests compile the kernels at realistic sizes.
The helpers above the tests (case grid, jnp recurrence, checks) are shared with
``test_lightning_tpu.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops.lightning import reference as lightning_reference
from pallas_kernels.gpu.lightning_chunk import lightning_attention
from pallas_kernels.gpu.lightning_common import LightningConfig
from tests.helpers import lightning_oracle, random_segments

# Lightning outputs and states are unnormalized sums over up to T tokens (no softmax), so
# their magnitude grows with T and H; errors are measured relative to the largest reference
# entry of each array instead of with the absolute table of tests/helpers.py.
# bf16: inputs, chunk states and the per-chunk [C, C] score tile are rounded to 8 bits.
LIGHTNING_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}
# Gradients pass through two more rounded matmuls (dA, dS) than the values.
LIGHTNING_GRAD_TOL = {jnp.float32: 5e-5, jnp.bfloat16: 3e-2, jnp.float16: 6e-3}


def tol(dtype, grad: bool = False) -> float:
    table = LIGHTNING_GRAD_TOL if grad else LIGHTNING_TOL
    return table[jnp.dtype(dtype).type]


def assert_close_rel(got, want, rtol: float, name: str) -> None:
    """max |got - want| <= rtol * max |want| (and everything finite)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{name} has NaN/inf"
    ref = max(np.abs(want).max(), 1e-6)
    err = np.abs(got - want).max()
    assert err <= rtol * ref, f"{name}: max error {err:.3g} > {rtol:g} * {ref:.3g}"


@dataclasses.dataclass(frozen=True)
class LightningCase:
    """One case of the shared grid; ``decays`` gives N (one lambda per head)."""

    name: str
    t: int = 40
    decays: tuple[float, ...] = (0.05, 0.9, 1.0)
    h: int = 16
    hv: int = 32
    b: int = 1
    initial_state: bool = False
    segments: int = 0
    dtype: type = jnp.float32

    def __repr__(self) -> str:
        return self.name


# lambda in {0.05, 0.9, 1.0} (1.0: plain linear attention) runs in every case, one per head;
# t = 40 with chunk 16 has a ragged last chunk (padding must leave the state alone). The
# interpreter spends ~20 s per case on this machine, hence two cases that cover the grid
# between them: initial state present / absent, segments / none, float32 / bfloat16.
LIGHTNING_CASES = [
    # h = 32 with 16-wide state blocks: two programs share each states output block.
    LightningCase("f32_state_segments_ragged", t=40, b=2, h=32, initial_state=True,
                  segments=3),
    LightningCase("bf16_plain", t=48, dtype=jnp.bfloat16),
]


def case_inputs(case: LightningCase, key):
    """(q, k, v, log_decay, initial_state | None, segment_ids | None, scale)."""
    kq, kk, kv, ks, kseg = jax.random.split(key, 5)
    n = len(case.decays)
    shape = (case.b, case.t, n, case.h)
    q = jax.random.normal(kq, shape, jnp.float32).astype(case.dtype)
    k = jax.random.normal(kk, shape, jnp.float32).astype(case.dtype)
    v = jax.random.normal(kv, (*shape[:3], case.hv), jnp.float32).astype(case.dtype)
    h0 = (
        jax.random.normal(ks, (case.b, n, case.h, case.hv), jnp.float32)
        if case.initial_state else None
    )
    seg = random_segments(kseg, case.b, case.t, case.segments) if case.segments else None
    return q, k, v, jnp.log(jnp.asarray(case.decays, jnp.float32)), h0, seg, case.h ** -0.5


def jnp_recurrence(q, k, v, log_decay, h0, segment_ids, scale):
    """The op's reference recurrence on float32 copies of the inputs (differentiable by JAX,
    float32 outputs even for 16-bit inputs): (o, final_state)."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return lightning_reference(*f32, decay=jnp.exp(log_decay), initial_state=h0,
                               segment_ids=segment_ids, scale=scale, return_state=True)


def values_and_grads(fn: Callable, q, k, v, h0, key):
    """(o, state, (dq, dk, dv, dh0)) for random cotangents of both outputs, in one jit."""
    h0 = jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3])) if h0 is None else h0

    @jax.jit
    def run(q, k, v, h0):
        (o, s), pullback = jax.vjp(fn, q, k, v, h0)
        ko, ks = jax.random.split(key)
        do = jax.random.normal(ko, o.shape, jnp.float32).astype(o.dtype)
        ds = jax.random.normal(ks, s.shape, jnp.float32)
        return o, s, pullback((do, ds))

    return run(q, k, v, h0)


def check_case(kernel: Callable, case: LightningCase, key, config) -> None:
    """Kernel vs the float64 oracle (values, final state) and vs the jnp recurrence's
    gradients (q, k, v, initial_state)."""
    q, k, v, ld, h0, seg, scale = case_inputs(case, key)

    def under_test(q, k, v, h0):
        return kernel(q, k, v, ld, initial_state=h0, segment_ids=seg, scale=scale,
                      config=config)

    def reference(q, k, v, h0):
        return jnp_recurrence(q, k, v, ld, h0, seg, scale)

    cot_key = jax.random.fold_in(key, 1)
    o, s, grads = values_and_grads(under_test, q, k, v, h0, cot_key)
    _, _, want_grads = values_and_grads(reference, q, k, v, h0, cot_key)
    assert o.dtype == q.dtype and s.dtype == jnp.float32
    want_o, want_s = lightning_oracle(q, k, v, np.exp(np.asarray(ld)), h0, seg, scale)
    assert_close_rel(o, want_o, tol(case.dtype), "o")
    assert_close_rel(s, want_s, tol(case.dtype), "final_state")
    for name, got, want in zip(("dq", "dk", "dv", "dh0"), grads, want_grads, strict=True):
        assert got.dtype == (jnp.float32 if name == "dh0" else q.dtype), name
        assert_close_rel(got, want, tol(case.dtype, grad=True), name)


# ----------------------------------------------------------------------------- CPU (interpret)

CPU_CONFIG = LightningConfig(chunk=16, block_v=16, block_k_state=16, block_v_state=16)


def _interpreted(q, k, v, ld, **kw):
    return lightning_attention(q, k, v, ld, interpret=True, **kw)


@pytest.mark.parametrize("case", LIGHTNING_CASES, ids=repr)
def test_matches_oracle(case, key):
    check_case(_interpreted, case, key, CPU_CONFIG)


FUSED_CPU_CONFIG = dataclasses.replace(CPU_CONFIG, fused_forward=True)


def test_fused_forward_matches_oracle(key):
    """The one-kernel forward over segments of two chunks (t = 40 is three chunks: a whole
    segment and a short last one), two value blocks, segment ids, initial state, ragged last
    chunk: values and gradients (the backward is the two-phase one) against the reference."""
    config = dataclasses.replace(FUSED_CPU_CONFIG, segment_chunks=2)
    check_case(_interpreted, LIGHTNING_CASES[0], key, config)


@pytest.mark.parametrize("segment_chunks", [0, 1])
def test_fused_forward_equals_two_phase(segment_chunks, key):
    """bf16: the fused forward rounds the carried state as the two-phase kernels store it, so
    the two agree far inside the reference tolerance; one segment (automatic at this size)
    and one segment per chunk (a reset inside a segment drops its entering state)."""
    case = LightningCase("bf16_fused", t=48, b=2, initial_state=True, segments=2,
                         dtype=jnp.bfloat16)
    q, k, v, ld, h0, seg, scale = case_inputs(case, key)
    kw = dict(initial_state=h0, segment_ids=seg, scale=scale, interpret=True)
    o2, s2 = lightning_attention(q, k, v, ld, config=CPU_CONFIG, **kw)
    config = dataclasses.replace(FUSED_CPU_CONFIG, segment_chunks=segment_chunks)
    o1, s1 = lightning_attention(q, k, v, ld, config=config, **kw)
    assert_close_rel(o1, o2, 1e-2, "o fused vs two-phase")
    assert_close_rel(s1, s2, 1e-5, "state fused vs two-phase")


def test_short_sequence_default_config(key):
    """T shorter than the default chunk (64 -> 32): chunk shrinks, padding, default config."""
    case = LightningCase("short", t=20, decays=(0.7, 1.0), h=32, hv=16, b=1,
                         initial_state=True)
    q, k, v, ld, h0, seg, scale = case_inputs(case, key)
    o, s = lightning_attention(q, k, v, ld, initial_state=h0, scale=scale, interpret=True)
    want_o, want_s = lightning_oracle(q, k, v, np.exp(np.asarray(ld)), h0, seg, scale)
    assert_close_rel(o, want_o, tol(jnp.float32), "o")
    assert_close_rel(s, want_s, tol(jnp.float32), "final_state")


def test_padding_does_not_change_state(key):
    """Split a sequence at a ragged point and continue from the first part's final state:
    same outputs and state as one call, so the kernel's internal padding never decays it."""
    case = LightningCase("split", t=40, decays=(0.8, 0.95), h=16, hv=16, b=1)
    q, k, v, ld, _, _, scale = case_inputs(case, key)
    kw = dict(scale=scale, config=CPU_CONFIG, interpret=True)
    o_all, s_all = lightning_attention(q, k, v, ld, **kw)
    # 40 = 25 + 15: both halves are ragged; the second continues the first's final state.
    o1, s1 = lightning_attention(q[:, :25], k[:, :25], v[:, :25], ld, **kw)
    o2, s2 = lightning_attention(q[:, 25:], k[:, 25:], v[:, 25:], ld, initial_state=s1, **kw)
    assert_close_rel(jnp.concatenate([o1, o2], axis=1), o_all, 1e-5, "o split")
    assert_close_rel(s2, s_all, 1e-5, "state split")


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(h=24), "head_dim H is 24"),
        (dict(h=8), "head_dim H is 8"),
        (dict(dtype_k=jnp.bfloat16), "must share one dtype"),
        (dict(dtype=jnp.int32), "must share one dtype"),
        (dict(log_decay_shape=(2,)), r"log_decay must be a float array of shape \(3,\)"),
        (dict(state_shape=(1, 3, 16, 8)), r"initial_state must have shape"),
        (dict(seg_shape=(1, 7)), r"segment_ids must be an integer array of shape"),
        (dict(v_len=5), "k must have q's shape"),
    ],
)
def test_bad_inputs(change, match):
    b, t, n = 1, 16, 3
    h = change.get("h", 16)
    dtype = change.get("dtype", jnp.float32)
    q = jnp.full((b, t, n, h), 0.5).astype(dtype)
    k = jnp.full((b, t, n, h), 0.25).astype(change.get("dtype_k", dtype))
    v = jnp.full((b, change.get("v_len", t), n, 16), 0.75).astype(dtype)
    ld = jnp.full(change.get("log_decay_shape", (n,)), -0.1)
    h0 = jnp.zeros(change["state_shape"]) if "state_shape" in change else None
    seg = jnp.zeros(change["seg_shape"], jnp.int32) if "seg_shape" in change else None
    with pytest.raises(ValueError, match=match):
        lightning_attention(q, k, v, ld, initial_state=h0, segment_ids=seg, interpret=True)


def test_compiled_head_dims_are_64_or_128():
    q = jnp.full((1, 16, 1, 32), 0.5, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"head_dim H is 32; the compiled lightning kernels"):
        lightning_attention(q, q, q, jnp.zeros((1,)), interpret=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk=48), "chunk must be a power of two of at least 16"),
        (dict(chunk=8), "chunk must be a power of two of at least 16"),
        (dict(block_v=0), "block_v must be a power of two"),
        (dict(num_warps=3), r"num_warps must be a power of two in \[1, 32\]"),
        (dict(num_stages_bwd=0), "num_stages_bwd must be a positive int"),
        (dict(fused_forward=1), "fused_forward must be a bool"),
        (dict(segment_chunks=-1), "segment_chunks must be an int >= 0"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LightningConfig(**kwargs)


def test_config_defaults():
    assert LightningConfig.get_default(128, jnp.bfloat16).block_v == 128
    assert LightningConfig.get_default(64, jnp.bfloat16).block_v == 64
    assert LightningConfig.get_default(128, jnp.float32).block_v == 64
    assert LightningConfig.get_default(128, jnp.bfloat16).fused_forward
    assert LightningConfig.get_default(64, jnp.float16).fused_forward
    assert not LightningConfig.get_default(128, jnp.float32).fused_forward


# ----------------------------------------------------------------------------- GPU (compiled)


def _compiled(q, k, v, ld, **kw):
    return lightning_attention(q, k, v, ld, **kw)


GPU_CASES = [
    LightningCase("gpu_bf16_h128", t=2048, decays=(0.3, 0.9, 0.999, 1.0), h=128, hv=128,
                  initial_state=True, segments=4, dtype=jnp.bfloat16),
    LightningCase("gpu_bf16_h64_ragged", t=4000, decays=(0.5, 0.99), h=64, hv=64, b=2,
                  initial_state=True, dtype=jnp.bfloat16),
    LightningCase("gpu_f16_h64", t=2048, decays=(0.9, 1.0), h=64, hv=128, b=1,
                  segments=3, dtype=jnp.float16),
    LightningCase("gpu_f32_h128", t=2048, decays=(0.95, 1.0), h=128, hv=128, b=1,
                  initial_state=True, dtype=jnp.float32),
]


def check_gpu_case(case: LightningCase, key, config: LightningConfig | None = None) -> None:
    """Compiled kernels against the float32 recurrence: values, final state and gradients."""
    q, k, v, ld, h0, seg, scale = case_inputs(case, key)

    def under_test(q, k, v, h0):
        return _compiled(q, k, v, ld, initial_state=h0, segment_ids=seg, scale=scale,
                         config=config)

    def reference(q, k, v, h0):
        return jnp_recurrence(q, k, v, ld, h0, seg, scale)

    cot_key = jax.random.fold_in(key, 1)
    o, s, grads = values_and_grads(under_test, q, k, v, h0, cot_key)
    want_o, want_s, want_grads = values_and_grads(reference, q, k, v, h0, cot_key)
    assert_close_rel(o, want_o, tol(case.dtype), "o")
    assert_close_rel(s, want_s, tol(case.dtype), "final_state")
    for name, got, want in zip(("dq", "dk", "dv", "dh0"), grads, want_grads, strict=True):
        assert_close_rel(got, want, tol(case.dtype, grad=True), name)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=repr)
def test_gpu_matches_recurrence(case, key):
    """Compiled kernels (default config) against the float32 recurrence, values and grads."""
    check_gpu_case(case, key)


def chunked_reference(q, k, v, log_decay, scale, chunk: int = 64):
    """Float32 chunked jnp lightning attention (no segments, no initial state, T % chunk == 0),
    written from the tiled equations: (o, final_state)."""
    b, t, n, h = q.shape
    nc = t // chunk
    q, k, v = (x.astype(jnp.float32).reshape(b, nc, chunk, n, -1) for x in (q, k, v))
    lam = jnp.exp(log_decay)[:, None]  # [N, 1]
    i = jnp.arange(chunk)
    pw = lam ** (i[None, :] + 1.0)  # [N, C] lambda^(i+1)
    tail = lam ** (chunk - 1.0 - i[None, :])  # [N, C] lambda^(C-1-j)
    diff = jnp.maximum(i[:, None] - i[None, :], 0).astype(jnp.float32)
    d = jnp.where(i[:, None] >= i[None, :], lam[:, :, None] ** diff[None], 0.0)  # [N, C, C]

    def step(s, x):
        qc, kc, vc = x  # [B, C, N, *]
        a = jnp.einsum("bink,bjnk->bnij", qc * scale, kc, precision="highest") * d
        o = jnp.einsum("bnij,bjnv->binv", a, vc, precision="highest")
        o = o + jnp.einsum("binh,bnhv->binv", qc * scale * pw.T[None, :, :, None], s,
                           precision="highest")
        s = s * (lam[:, 0] ** chunk)[None, :, None, None] + jnp.einsum(
            "bjnh,bjnv->bnhv", kc * tail.T[None, :, :, None], vc, precision="highest")
        return s, o

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v))
    s, o = jax.lax.scan(step, jnp.zeros((b, n, h, v.shape[-1]), jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1).reshape(b, t, n, -1), s


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES[:2], ids=repr)
def test_gpu_other_forward_matches_recurrence(case, key):
    """The forward the default config does not take (two-phase for 16-bit inputs), values
    and gradients; the default (fused, automatic segments: at T = 4000, H = 64, 8 segments
    with a short last one) runs in ``test_gpu_matches_recurrence``."""
    default = LightningConfig.get_default(case.h, case.dtype)
    check_gpu_case(case, key, dataclasses.replace(default,
                                                  fused_forward=not default.fused_forward))


@pytest.mark.gpu
def test_gpu_long_sequence_vs_chunked_jnp(key):
    """T = 8192, bf16, H = 128: output and final state against a float32 chunked jnp pass."""
    kq, kk, kv = jax.random.split(key, 3)
    b, t, n, h = 1, 8192, 4, 128
    q = jax.random.normal(kq, (b, t, n, h), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(kk, (b, t, n, h), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (b, t, n, h), jnp.float32).astype(jnp.bfloat16)
    ld = jnp.log(jnp.asarray([0.9, 0.99, 0.9999, 1.0], jnp.float32))
    o, s = jax.jit(lambda q, k, v: _compiled(q, k, v, ld, scale=h ** -0.5))(q, k, v)
    want_o, want_s = jax.jit(lambda q, k, v: chunked_reference(q, k, v, ld, h ** -0.5))(q, k, v)
    assert_close_rel(o, want_o, tol(jnp.bfloat16), "o")
    assert_close_rel(s, want_s, tol(jnp.bfloat16), "final_state")
