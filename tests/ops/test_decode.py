"""Decode attention: the reference against a float64 NumPy loop; ``impl="xla"`` through the
shared base (``decode_base.py``); prefill/decode consistency with ragged lengths; dispatch;
the benchmark. The kernels' subclasses and their own tests (tiling, split-K partials,
lowering, block-size rules) live in ``tests/pallas_kernels/test_decode_{triton,tpu}.py``.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.bench import decode as bench_decode
from attnlab.ops import XlaDecodeConfig, attention
from attnlab.ops.decode import (
    auto_choice,
    decode_attention,
    explain,
    implementations,
    reference,
)
from pallas_kernels.gpu.decode import DecodeConfig
from pallas_kernels.tpu.decode import TpuDecodeConfig
from tests.helpers import fwd_tol, random_qkv
from tests.ops.attention_base import assert_lse_close
from tests.ops.decode_base import DECODE_CASES, DecodeTestBase, run, zeros_qkv

CASES = DECODE_CASES


class TestXla(DecodeTestBase):
    IMPL = "xla"
    CONFIG = XlaDecodeConfig(keys_per_split=32)  # S <= 77 spans several splits
    DIFFERENTIABLE = True
    GRAD_CASES = ("gqa_t1_ragged", "gqa_t4_window", "mqa_t4_softcap")


def _oracle(q, k, v, lengths, window_left, soft_cap, scale=None):
    """Float64 NumPy decode attention, written from the definition. Returns (out, lse)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s = k.shape[1]
    gk, gv = n // k.shape[2], n // v.shape[2]  # query head i reads k head i // gk, v i // gv
    scale = 1.0 / np.sqrt(h) if scale is None else scale
    lengths = [s] * b if lengths is None else [int(x) for x in lengths]
    out = np.zeros((b, t, n, v.shape[-1]))
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
                z = k[bi, keys, ni // gk] @ q[bi, ti, ni] * scale
                if soft_cap is not None:
                    z = soft_cap * np.tanh(z / soft_cap)
                m = z.max()
                e = np.exp(z - m)
                lse[bi, ti, ni] = m + np.log(e.sum())
                out[bi, ti, ni] = e @ v[bi, keys, ni // gv] / e.sum()
    return out, lse


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_reference_matches_numpy_oracle(case, key):
    q, k, v = case.inputs(key)
    out, lse = run("reference", q, k, v, case.kwargs())
    want_out, want_lse = _oracle(q, k, v, case.lengths, case.window_left(), case.soft_cap)
    np.testing.assert_allclose(out, want_out, atol=2e-5)
    assert_lse_close(lse, want_lse, 2e-5)
    if case.lengths is not None and 0 in case.lengths:
        assert np.isneginf(np.asarray(lse)).any()


def test_reference_scale_and_no_residuals(key):
    case = CASES[0]
    q, k, v = case.inputs(key)
    out = jax.jit(functools.partial(reference, scale=0.3))(
        q, k, v, kv_lengths=jnp.asarray(case.lengths))
    want, _ = _oracle(q, k, v, case.lengths, None, None, scale=0.3)
    np.testing.assert_allclose(out, want, atol=2e-5)


# ----------------------------------------------------------------------------- consistency


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


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(impl="xla", config=DecodeConfig()), "XlaDecodeConfig"),
        (dict(impl="reference", config=XlaDecodeConfig()), "reference takes no config"),
    ],
)
def test_config_of_another_impl_raises_not_implemented(kwargs, match):
    with pytest.raises(NotImplementedError, match=match):
        decode_attention(*zeros_qkv(), **kwargs)


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
