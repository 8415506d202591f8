"""Decode attention: the reference against a float64 NumPy loop, every implementation against
the reference over one grid, prefill/decode consistency, gradients, forward-only kernels, bad
inputs, and Triton / Mosaic lowering of the kernels at realistic shapes.

On CPU the Pallas kernels run interpreted (Triton: Pallas interpreter; TPU: TPU interpret
mode) with tiles of 16 keys and splits of 32 keys, so the tiny caches below span several
splits, tiles, row blocks, a shifted last tile and empty splits. ``TestCompiledOnGpu`` runs
the Triton kernel compiled at realistic sizes (marked ``gpu``: skipped without one).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.bench import decode as bench_decode
from attnlab.ops import XlaDecodeConfig, attention, merge_n
from attnlab.ops.decode import (
    auto_choice,
    decode_attention,
    explain,
    implementations,
    reference,
)
from pallas_kernels.common.masks import MaskSpec
from pallas_kernels.gpu import decode as gpu_decode
from pallas_kernels.gpu.decode import DecodeConfig
from pallas_kernels.tpu import decode as tpu_decode
from pallas_kernels.tpu.decode import TpuDecodeConfig
from tests.helpers import fwd_tol, grad_tol, loss_with_lse, lse_tol, random_qkv

IMPLS = ("xla", "pallas_triton", "pallas_tpu")
# Small tiles and splits so that S <= 77 spans several splits, tiles and (Triton) row blocks.
SMALL = {
    "xla": XlaDecodeConfig(keys_per_split=32),
    "pallas_triton": DecodeConfig(block_kv=16, keys_per_split=32, block_rows=16),
    "pallas_tpu": TpuDecodeConfig(block_kv=16, keys_per_split=32),
}
# Interpreted kernels are big XLA programs whose compile time is mostly backend optimization,
# worthless at these sizes; numerics are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass(frozen=True)
class Case:
    """One decode case: shapes, per-sequence lengths (None: all S) and mask options."""

    name: str
    b: int
    t: int
    s: int
    n: int
    kh: int
    h: int = 128
    lengths: tuple[int, ...] | None = None
    window: int | tuple[int, int] | None = None
    soft_cap: float | None = None

    def __repr__(self) -> str:
        return self.name

    def kwargs(self) -> dict:
        kw = {}
        if self.lengths is not None:
            kw["kv_lengths"] = jnp.asarray(self.lengths, jnp.int32)
        if self.window is not None:
            kw["local_window_size"] = self.window
        if self.soft_cap is not None:
            kw["logits_soft_cap"] = self.soft_cap
        return kw


CASES = [
    # GQA G=4, T=1: 4 rows padded to a 16-row tile; lengths 0 (no key), S, 1 and mid-split.
    Case("gqa_t1_ragged", b=4, t=1, s=77, n=8, kh=2, lengths=(0, 77, 1, 40)),
    # GQA G=6, T=4: 24 rows = two Triton row blocks (the second masked); length 3 < T leaves
    # the first query of that sequence without a key; a window skips whole tiles.
    Case("gqa_t4_window", b=3, t=4, s=77, n=12, kh=2, lengths=(3, 77, 50), window=(9, 0)),
    # MQA, T=4 (16 rows: one full tile), soft-cap, all lengths S, H=32 (TPU: full-dim lanes).
    Case("mqa_t4_softcap", b=2, t=4, s=77, n=4, kh=1, h=32, soft_cap=2.0),
    # S a multiple of every tile and split; int window; MQA T=1.
    Case("mqa_t1_window", b=2, t=1, s=64, n=4, kh=1, h=32, lengths=(64, 17), window=20),
    # A cache shorter than one tile (Triton pads it to 16 keys; TPU overhangs it).
    Case("short_cache", b=2, t=4, s=12, n=8, kh=2, lengths=(12, 2)),
]
BF16_CASES = ("gqa_t1_ragged", "gqa_t4_window")


def _inputs(case: Case, key, dtype=jnp.float32):
    return random_qkv(key, case.b, case.t, case.s, case.n, case.kh, case.h, dtype)


def _run(impl, q, k, v, kwargs, config=None):
    """(out, lse) of decode_attention under one jit (lengths are traced, as in a model)."""
    lengths = kwargs.get("kv_lengths")
    static = {k_: v_ for k_, v_ in kwargs.items() if k_ != "kv_lengths"}

    def fn(q, k, v, lengths):
        return decode_attention(
            q, k, v, kv_lengths=lengths, impl=impl, config=config, return_residuals=True,
            **static,
        )

    interpreted = impl.startswith("pallas") and jax.default_backend() == "cpu"
    options = FAST_COMPILE if interpreted else None
    return jax.jit(fn, compiler_options=options)(q, k, v, lengths)


def _oracle(q, k, v, lengths, window_left, soft_cap, scale=None):
    """Float64 NumPy decode attention, written from the definition. Returns (out, lse)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = 1.0 / np.sqrt(h) if scale is None else scale
    lengths = [s] * b if lengths is None else [int(x) for x in lengths]
    out = np.zeros_like(q)
    lse = np.full((b, t, n), -np.inf)
    for bi in range(b):
        for ti in range(t):
            pos = lengths[bi] - t + ti
            keys = [
                j for j in range(s)
                if j < lengths[bi] and j <= pos and (window_left is None or j >= pos - window_left)
            ]
            if not keys:
                continue
            for ni in range(n):
                z = k[bi, keys, ni // g] @ q[bi, ti, ni] * scale
                if soft_cap is not None:
                    z = soft_cap * np.tanh(z / soft_cap)
                m = z.max()
                e = np.exp(z - m)
                lse[bi, ti, ni] = m + np.log(e.sum())
                out[bi, ti, ni] = e @ v[bi, keys, ni // g] / e.sum()
    return out, lse


def _window_left(case: Case):
    w = case.window
    return w[0] if isinstance(w, tuple) else w


def _assert_lse_close(lse, want, tol):
    lse, want = np.asarray(lse, np.float64), np.asarray(want, np.float64)
    assert not np.isnan(lse).any()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(lse[fin], want[fin], atol=tol, rtol=0)


def _assert_matches(out, lse, want_out, want_lse, dtype):
    out32 = np.asarray(out, np.float32)
    assert out.dtype == dtype
    assert lse.dtype == jnp.float32
    assert np.isfinite(out32).all()
    np.testing.assert_allclose(out32, np.asarray(want_out, np.float32), atol=fwd_tol(dtype))
    _assert_lse_close(lse, want_lse, lse_tol(dtype))
    # Rows that see no key: exactly 0 output.
    dead = np.isneginf(np.asarray(want_lse))
    assert (out32[dead] == 0).all()


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_reference_matches_numpy_oracle(case, key):
    q, k, v = _inputs(case, key)
    out, lse = _run("reference", q, k, v, case.kwargs())
    want_out, want_lse = _oracle(q, k, v, case.lengths, _window_left(case), case.soft_cap)
    np.testing.assert_allclose(out, want_out, atol=2e-5)
    _assert_lse_close(lse, want_lse, 2e-5)
    if case.lengths is not None and 0 in case.lengths:
        assert np.isneginf(np.asarray(lse)).any()


def test_reference_scale_and_no_residuals(key):
    case = CASES[0]
    q, k, v = _inputs(case, key)
    out = jax.jit(functools.partial(reference, scale=0.3))(
        q, k, v, kv_lengths=jnp.asarray(case.lengths))
    want, _ = _oracle(q, k, v, case.lengths, None, None, scale=0.3)
    np.testing.assert_allclose(out, want, atol=2e-5)


# ----------------------------------------------------------------------------- every impl


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_impl_matches_reference_f32(impl, case, key):
    q, k, v = _inputs(case, key)
    out, lse = _run(impl, q, k, v, case.kwargs(), SMALL[impl])
    want_out, want_lse = _run("reference", q, k, v, case.kwargs())
    _assert_matches(out, lse, want_out, want_lse, jnp.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [c for c in CASES if c.name in BF16_CASES], ids=repr)
def test_impl_matches_reference_bf16(impl, case, key):
    q, k, v = _inputs(case, key, jnp.bfloat16)
    out, lse = _run(impl, q, k, v, case.kwargs(), SMALL[impl])
    want_out, want_lse = _run("reference", q, k, v, case.kwargs())
    _assert_matches(out, lse, want_out, want_lse, jnp.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_default_config_and_auto(impl, key):
    """Default configs (one split, one tile at this size) agree with the reference."""
    case = CASES[1]
    q, k, v = _inputs(case, key)
    out, lse = _run(impl, q, k, v, case.kwargs())
    want_out, want_lse = _run("reference", q, k, v, case.kwargs())
    _assert_matches(out, lse, want_out, want_lse, jnp.float32)


def test_pallas_under_vmap(key):
    """A leading vmap axis (e.g. layers or beams) over the Triton kernel."""
    case = CASES[0]
    q, k, v = _inputs(case, key)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    qs, ks, vs = (jnp.stack([x, x[::-1]]) for x in (q, k, v))
    ls = jnp.stack([lengths, lengths[::-1]])

    def one(impl, config):
        def f(q, k, v, lengths):
            return decode_attention(q, k, v, kv_lengths=lengths, impl=impl, config=config)
        return f

    got = jax.jit(jax.vmap(one("pallas_triton", SMALL["pallas_triton"])),
                  compiler_options=FAST_COMPILE)(qs, ks, vs, ls)
    want = jax.jit(jax.vmap(one("reference", None)))(qs, ks, vs, ls)
    np.testing.assert_allclose(got, want, atol=fwd_tol(jnp.float32))


# ----------------------------------------------------------------------------- kernel pieces


def test_partials_are_split_and_merge_exactly(key):
    """The kernels return P > 1 partials; merge_n of them is the whole answer."""
    case = CASES[0]
    q, k, v = _inputs(case, key)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    spec = MaskSpec(causal=True)
    til = gpu_decode.tiling(SMALL["pallas_triton"], case.b, case.t, case.n, case.kh, case.s)
    assert (til.num_splits, til.block_kv, til.keys_per_split) == (3, 16, 32)
    o_parts, lse_parts = gpu_decode.decode_partials(
        q, k, v, lengths, spec=spec, scale=case.h**-0.5, config=SMALL["pallas_triton"],
        interpret=True,
    )
    assert o_parts.shape == (3, *q.shape) and lse_parts.shape == (3, *q.shape[:3])
    # Sequence 2 has length 1: splits 1 and 2 saw nothing.
    assert np.isneginf(np.asarray(lse_parts[1:, 2])).all()
    out, lse = merge_n(o_parts, lse_parts)
    want_out, want_lse = _run("reference", q, k, v, case.kwargs())
    _assert_matches(out, lse, want_out, want_lse, jnp.float32)


def test_split_size_heuristic():
    cfg = DecodeConfig()
    # B=4, K=4, S=32K, one row block: ~512 programs -> 1024 keys per split, 32 splits.
    til = gpu_decode.tiling(cfg, 4, 1, 32, 4, 32768)
    assert (til.block_rows, til.row_blocks, til.keys_per_split, til.num_splits) == (16, 1, 1024, 32)
    til = gpu_decode.tiling(cfg, 1, 1, 8, 8, 4096)  # small work: at least MIN_SPLIT keys
    assert til.keys_per_split == gpu_decode.MIN_SPLIT
    til = gpu_decode.tiling(cfg, 1, 16, 32, 4, 1000)  # 128 rows -> 2 row blocks of 64
    assert (til.block_rows, til.row_blocks) == (64, 2)


# ----------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_then_decode(impl, key):
    """Causal attention over the whole sequence, last T rows == decode of those T queries."""
    b, s, t, n, kh, h = 2, 40, 4, 8, 2, 128
    q_all, k, v = random_qkv(key, b, s, s, n, kh, h)
    for window in (None, 7):
        kw = {} if window is None else {"local_window_size": (window, 0)}
        full = jax.jit(lambda q, k, v, kw=kw: attention(
            q, k, v, is_causal=True, return_residuals=True, **kw))(q_all, k, v)
        out, lse = _run(impl, q_all[:, -t:], k, v, kw, SMALL[impl])
        np.testing.assert_allclose(out, full[0][:, -t:], atol=fwd_tol(jnp.float32))
        _assert_lse_close(lse, full[1][:, -t:], lse_tol(jnp.float32))


def test_prefill_then_decode_ragged(key):
    """With per-sequence lengths, sequence b's decode rows equal prefill over its first
    kv_lengths[b] tokens (the cache past that is garbage and must not matter)."""
    b, s, t, n, kh, h = 3, 40, 4, 8, 2, 32
    q_all, k, v = random_qkv(key, b, s, s, n, kh, h)
    lengths = (40, 23, 4)
    q_dec = jnp.stack([q_all[i, lengths[i] - t:lengths[i]] for i in range(b)])
    out = jax.jit(lambda q, k, v, lens: decode_attention(q, k, v, kv_lengths=lens))(
        q_dec, k, v, jnp.asarray(lengths, jnp.int32))
    prefill = jax.jit(functools.partial(attention, is_causal=True, impl="reference"))
    for i, length in enumerate(lengths):
        want = prefill(q_all[i:i + 1, :length], k[i:i + 1, :length], v[i:i + 1, :length])
        np.testing.assert_allclose(out[i], want[0, -t:], atol=fwd_tol(jnp.float32))


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2]], ids=repr)
def test_xla_grads_match_reference(case, key):
    q, k, v = _inputs(case, key)
    kwargs = case.kwargs()

    def grads(impl, config):
        def attn(q, k, v, **kw):
            return decode_attention(q, k, v, impl=impl, config=config, **kw)

        return jax.jit(jax.grad(
            lambda q, k, v: loss_with_lse(attn, q, k, v, kwargs), argnums=(0, 1, 2)
        ))(q, k, v)

    got, want = grads("xla", SMALL["xla"]), grads("reference", None)
    for name, a, r in zip(("dq", "dk", "dv"), got, want):
        assert np.isfinite(np.asarray(a)).all(), name
        np.testing.assert_allclose(a, r, atol=grad_tol(jnp.float32, name), err_msg=name)


@pytest.mark.parametrize("impl", ["pallas_triton", "pallas_tpu"])
def test_grad_through_pallas_raises(impl, key):
    case = CASES[0]
    q, k, v = _inputs(case, key)
    lengths = jnp.asarray(case.lengths, jnp.int32)

    def loss(q, k, v):
        out = decode_attention(q, k, v, kv_lengths=lengths, impl=impl, config=SMALL[impl])
        return jnp.sum(out)

    with pytest.raises(NotImplementedError, match="forward-only; use impl='xla'"):
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v)


# ----------------------------------------------------------------------------- dispatch


def test_registry_and_auto():
    assert set(implementations()) == {"reference", "xla", "pallas_triton", "pallas_tpu"}
    q = jax.ShapeDtypeStruct((4, 1, 32, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((4, 1024, 4, 128), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((4,), jnp.int32)
    assert auto_choice(q, kv, kv, kv_lengths=lengths, plat="gpu") == "pallas_triton"
    assert auto_choice(q, kv, kv, kv_lengths=lengths, plat="tpu") == "pallas_tpu"
    assert auto_choice(q, kv, kv, kv_lengths=lengths, plat="cpu") == "xla"
    why = explain(q, kv, kv, plat="gpu")
    assert why["pallas_triton"] is None and why["xla"] is None
    assert "not on gpu" in why["pallas_tpu"]
    why = explain(q, kv, kv, plat="tpu")
    assert "not on tpu" in why["pallas_triton"]
    # A config picks the implementation it belongs to, or names the mismatch.
    assert auto_choice(q, kv, kv, plat="gpu", config=XlaDecodeConfig()) == "xla"
    why = explain(q, kv, kv, plat="gpu", config=TpuDecodeConfig())
    assert "DecodeConfig" in why["pallas_triton"] and "XlaDecodeConfig" in why["xla"]


def test_pallas_maps_to_platform_kernel(key):
    case = CASES[3]
    q, k, v = _inputs(case, key)
    out, _ = _run("pallas", q, k, v, case.kwargs(), SMALL["pallas_triton"])
    want, _ = _run("reference", q, k, v, case.kwargs())
    np.testing.assert_allclose(out, want, atol=fwd_tol(jnp.float32))


# ----------------------------------------------------------------------------- bad inputs


def _shapes(b=2, t=1, s=64, n=8, kh=2, h=128, dtype=jnp.float32):
    return (jnp.zeros((b, t, n, h), dtype), jnp.zeros((b, s, kh, h), dtype),
            jnp.zeros((b, s, kh, h), dtype))


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda: (jnp.zeros((2, 8, 128)), *_shapes()[1:]), {}, r"q must have shape \[batch"),
        (lambda: _shapes(n=6, kh=4), {}, "q has 6 heads but k has 4"),
        (lambda: _shapes(t=65), {}, "T=65 queries per sequence; decode takes 1 to 64"),
        (lambda: (_shapes()[0], _shapes()[1], _shapes(s=32)[2]), {}, "same shape"),
        (lambda: (_shapes()[0], *_shapes(h=64)[1:]), {}, "head_dim 128 but k has 64"),
        (lambda: (_shapes(dtype=jnp.bfloat16)[0], *_shapes()[1:]), {}, "dtypes must match"),
        (lambda: _shapes(), {"kv_lengths": jnp.array([3, 4, 5], jnp.int32)},
         r"kv_lengths must have shape \(2,\)"),
        (lambda: _shapes(), {"kv_lengths": jnp.array([3.0, 4.0])}, "integer array"),
        (lambda: _shapes(), {"kv_lengths": jnp.array([3, 65], jnp.int32)},
         r"must lie in \[0, S=64\], got values in \[3, 65\]"),
        (lambda: _shapes(), {"local_window_size": (8, 2)}, "left-only"),
        (lambda: _shapes(), {"local_window_size": "wide"}, "int or a"),
        (lambda: _shapes(), {"logits_soft_cap": -1.0}, "logits_soft_cap must be positive"),
        (lambda: _shapes(), {"impl": "magic"}, "unknown impl 'magic'"),
    ],
)
def test_bad_inputs_raise_value_error(make, kwargs, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "shapes, kwargs, match",
    [
        (dict(h=32), dict(impl="pallas_tpu"), "H must be a multiple of 128"),
        (dict(h=96), dict(impl="pallas_triton"), "power of two in"),
        (dict(dtype=jnp.float16), dict(impl="pallas_tpu"), "float32 or bfloat16"),
        (dict(), dict(impl="xla", config=DecodeConfig()), "XlaDecodeConfig"),
        (dict(), dict(impl="reference", config=XlaDecodeConfig()), "reference takes no config"),
    ],
)
def test_unsupported_combinations_raise_not_implemented(shapes, kwargs, match):
    q, k, v = _shapes(**shapes)
    with pytest.raises(NotImplementedError, match=match):
        decode_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DecodeConfig(block_kv=24), "block_kv must be a power of two"),
        (lambda: DecodeConfig(block_kv=8), "at least 16"),
        (lambda: DecodeConfig(keys_per_split=100), "multiple of block_kv=64; try 128"),
        (lambda: DecodeConfig(num_warps=3), "num_warps"),
        (lambda: TpuDecodeConfig(block_kv=12), "multiple of 8"),
        (lambda: TpuDecodeConfig(block_kv=16, keys_per_split=40), "multiple of block_kv=16"),
        (lambda: XlaDecodeConfig(keys_per_split=0), "positive int"),
    ],
)
def test_bad_configs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ----------------------------------------------------------------------------- lowering


_LOWER_SHAPES = [
    # (B, T, N, K, H, S, dtype): the H100 target; GQA 8 with T=16 (two row blocks); odd S.
    (4, 1, 32, 4, 128, 32768, jnp.bfloat16),
    (2, 16, 32, 4, 64, 1000, jnp.float32),
    (2, 3, 6, 1, 256, 777, jnp.float16),
]


@pytest.mark.parametrize("shape", _LOWER_SHAPES, ids=lambda s: f"B{s[0]}T{s[1]}N{s[2]}K{s[3]}H{s[4]}S{s[5]}")
def test_triton_kernel_lowers_for_cuda(shape):
    """The kernel lowers to Triton IR for CUDA (no GPU needed), plain and under vmap."""
    b, t, n, kh, h, s, dtype = shape
    q = jax.ShapeDtypeStruct((b, t, n, h), dtype)
    kv = jax.ShapeDtypeStruct((b, s, kh, h), dtype)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
    f = functools.partial(
        gpu_decode.decode_partials, spec=MaskSpec(causal=True, window_left=100), scale=0.1,
        soft_cap=30.0, interpret=False,
    )
    args = (q, kv, kv, lengths)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert 'name = "decode_attention_splitk"' in text
    vargs = [jax.ShapeDtypeStruct((2, *a.shape), a.dtype) for a in args]
    jax.jit(jax.vmap(f)).trace(*vargs).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("shape", [s for s in _LOWER_SHAPES if s[6] != jnp.float16],
                         ids=lambda s: f"B{s[0]}T{s[1]}N{s[2]}K{s[3]}H{s[4]}S{s[5]}")
def test_tpu_kernel_lowers_for_mosaic(shape):
    """Mosaic lowering accepts the block shapes (the (8, 128) rule is checked there)."""
    b, t, n, kh, h, s, dtype = shape
    if tpu_decode.unsupported_shape((b, s, kh, h)) is not None:
        h = 128
    q = jax.ShapeDtypeStruct((b, t, n, h), dtype)
    kv = jax.ShapeDtypeStruct((b, s, kh, h), dtype)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)
    f = functools.partial(
        tpu_decode.decode_partials, spec=MaskSpec(causal=True, window_left=100), scale=0.1,
        soft_cap=30.0, interpret=False,
    )
    jax.jit(f).trace(q, kv, kv, lengths).lower(lowering_platforms=("tpu",))


# ----------------------------------------------------------------------------- benchmark


def test_bench_decode_smoke(tmp_path):
    out = tmp_path / "decode.json"
    code = bench_decode.main([
        "--batch", "2", "--seq-lens", "48", "--heads", "4", "--kv-heads", "2", "--head-dim",
        "128", "--dtype", "float32", "--repeats", "2", "--warmup", "1", "--copy-mib", "4",
        "--ragged", "--out", str(out),
    ])
    assert code == 0
    rec = json.loads(out.read_text())
    rows = {r["impl"]: r for r in rec["rows"]}
    assert rec["copy"]["GBps"] > 0
    assert rows["xla"]["status"] == "ok" and rows["xla"]["ratio_copy"] > 0
    # Interpreted kernels are checked against xla, not timed.
    for name in ("pallas_triton", "pallas_tpu"):
        assert rows[name]["status"] == "skipped" and rows[name]["max_abs_err"] < 1e-4


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
class TestCompiledOnGpu:
    """The Triton kernel compiled (interpret=False) at realistic decode sizes."""

    def _check(self, key, b, t, s, n, kh, h, dtype, lengths, **kwargs):
        q, k, v = random_qkv(key, b, t, s, n, kh, h, dtype)
        kw = dict(kwargs, kv_lengths=jnp.asarray(lengths, jnp.int32))
        out, lse = _run("pallas_triton", q, k, v, kw)
        want_out, want_lse = _run("reference", q, k, v, kw)
        tol = 3e-3 if dtype == jnp.float32 else fwd_tol(dtype)  # TF32-free, but long sums
        out32 = np.asarray(out, np.float32)
        assert np.isfinite(out32).all()
        np.testing.assert_allclose(out32, np.asarray(want_out, np.float32), atol=tol)
        _assert_lse_close(lse, want_lse, max(tol, lse_tol(dtype)))

    def test_h100_target_shape_ragged(self, key):
        self._check(key, 4, 1, 32768, 32, 4, 128, jnp.bfloat16, (32768, 1, 20001, 0))

    def test_speculative_window_softcap(self, key):
        self._check(key, 4, 4, 8192, 32, 4, 128, jnp.bfloat16, (8192, 4000, 3, 5000),
                    local_window_size=1000, logits_soft_cap=30.0)

    def test_float32_many_rows(self, key):
        self._check(key, 2, 16, 4099, 32, 4, 64, jnp.float32, (4099, 2048))

    def test_auto_picks_triton(self):
        q = jax.ShapeDtypeStruct((4, 1, 32, 128), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((4, 32768, 4, 128), jnp.bfloat16)
        assert auto_choice(q, kv, kv) == "pallas_triton"
