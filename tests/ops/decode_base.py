"""One test base for decode attention: every case that every implementation must pass.

An implementation's test file subclasses :class:`DecodeTestBase` in a few lines (a ``Test...``
class that sets ``IMPL`` and, for kernels, a small-tile ``CONFIG``) and adds only its own
kernel-specific tests. Everything goes through the public ``decode_attention(..., impl=IMPL)``
and is compared with ``impl="reference"``, with the tolerance table of ``attnlab.testing``.

The grid's caches are tiny (S <= 77); kernels get tiles of 16 keys and splits of 32 keys, so
they span several splits, tiles, row blocks, a shifted last tile and empty splits.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import MaskSpec, attention, decode_attention, platform
from attnlab.testing import Tolerance, tolerance
from tests.helpers import loss_with_lse, random_qkv
from tests.ops.attention_base import (
    FAST_COMPILE,
    GRADS,
    ImplTestBase,
    assert_lse_close,
    grid,
)
from tests.ops.masked_garbage import (
    DECODE_SCENARIOS,
    FILL_PARAMS,
    FILLS,
    check_softmax_garbage,
    decode_scenario,
)


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    """One decode case: shapes, per-sequence lengths (None: all S) and mask options."""

    name: str
    b: int
    t: int
    s: int
    n: int
    kh: int
    h: int = 128
    hv: int | None = None  # value head dim (default h)
    vh: int | None = None  # value head count (default kh)
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

    def window_left(self) -> int | None:
        return self.window[0] if isinstance(self.window, tuple) else self.window

    def inputs(self, key, dtype=jnp.float32):
        return random_qkv(key, self.b, self.t, self.s, self.n, self.kh, self.h, dtype,
                          hv=self.hv, vh=self.vh)


DECODE_CASES = (
    # GQA G=4, T=1: 4 rows padded to a 16-row tile; lengths 0 (no key), S, 1 and mid-split.
    DecodeCase("gqa_t1_ragged", b=4, t=1, s=77, n=8, kh=2, lengths=(0, 77, 1, 40)),
    # GQA G=6, T=4: 24 rows = two Triton row blocks (the second masked); length 3 < T leaves
    # the first query of that sequence without a key; a window skips whole tiles.
    DecodeCase("gqa_t4_window", b=3, t=4, s=77, n=12, kh=2, lengths=(3, 77, 50), window=(9, 0)),
    # MQA, T=4 (16 rows: one full tile), soft-cap, all lengths S, H=32 (TPU: full-dim lanes).
    DecodeCase("mqa_t4_softcap", b=2, t=4, s=77, n=4, kh=1, h=32, soft_cap=2.0),
    # S a multiple of every tile and split; int window; MQA T=1.
    DecodeCase("mqa_t1_window", b=2, t=1, s=64, n=4, kh=1, h=32, lengths=(64, 17), window=20),
    # A cache shorter than one tile (Triton pads it to 16 keys; TPU overhangs it).
    DecodeCase("short_cache", b=2, t=4, s=12, n=8, kh=2, lengths=(12, 2)),
    # Head dims the kernels pad (40 for q/k, 80 for v), 1 key head and 2 value heads.
    DecodeCase("kv_heads_differ_h40", b=2, t=2, s=50, n=4, kh=1, vh=2, h=40, hv=80,
               lengths=(50, 23)),
    # MLA-like dims: q/k 192, v 128.
    DecodeCase("mla_dims", b=1, t=1, s=40, n=4, kh=4, h=192, hv=128, lengths=(33,)),
)


def run(impl, q, k, v, kwargs, config=None):
    """(out, lse) of decode_attention under one jit (lengths are traced, as in a model)."""
    lengths = kwargs.get("kv_lengths")
    static = {k_: v_ for k_, v_ in kwargs.items() if k_ != "kv_lengths"}

    def fn(q, k, v, lengths):
        return decode_attention(
            q, k, v, kv_lengths=lengths, impl=impl, config=config, return_residuals=True,
            **static,
        )

    interpreted = impl.startswith("pallas") and platform() == "cpu"
    options = FAST_COMPILE if interpreted else None
    return jax.jit(fn, compiler_options=options)(q, k, v, lengths)


def assert_matches(out, lse, want_out, want_lse, dtype, tol: Tolerance) -> None:
    """dtypes, finite output within ``tol``, LSE, exactly 0 output on rows that see no key."""
    out32 = np.asarray(out, np.float32)
    assert out.dtype == dtype
    assert lse.dtype == jnp.float32
    assert np.isfinite(out32).all()
    np.testing.assert_allclose(out32, np.asarray(want_out, np.float32), atol=tol.out)
    assert_lse_close(lse, want_lse, tol.lse)
    dead = np.isneginf(np.asarray(want_lse))
    assert (out32[dead] == 0).all()


def check_against_reference(impl, q, k, v, kwargs, config=None, plat="cpu") -> None:
    out, lse = run(impl, q, k, v, kwargs, config)
    want_out, want_lse = run("reference", q, k, v, kwargs)
    assert_matches(out, lse, want_out, want_lse, q.dtype, tolerance(q.dtype, plat))


def zeros_qkv(b=2, t=1, s=64, n=8, kh=2, h=128, dtype=jnp.float32):
    """q, k, v of zeros (for argument checks, which never compute)."""
    return (jnp.zeros((b, t, n, h), dtype), jnp.zeros((b, s, kh, h), dtype),
            jnp.zeros((b, s, kh, h), dtype))


# Argument checks every implementation inherits (they run before the implementation does).
BAD_INPUTS = [
    (lambda: (jnp.zeros((2, 8, 128)), *zeros_qkv()[1:]), {}, r"q must have shape \[batch"),
    (lambda: zeros_qkv(n=6, kh=4), {}, "q has 6 heads but k has 4"),
    (lambda: zeros_qkv(t=65), {}, "T=65 queries per sequence; decode takes 1 to 64"),
    (lambda: (zeros_qkv()[0], zeros_qkv()[1], zeros_qkv(s=32)[2]), {},
     "same number of keys"),
    (lambda: (zeros_qkv()[0], *zeros_qkv(h=64)[1:]), {}, "head_dim 128 but k has 64"),
    (lambda: (zeros_qkv(dtype=jnp.bfloat16)[0], *zeros_qkv()[1:]), {}, "dtypes must match"),
    (lambda: zeros_qkv(), {"kv_lengths": jnp.array([3, 4, 5], jnp.int32)},
     r"kv_lengths must have shape \(2,\)"),
    (lambda: zeros_qkv(), {"kv_lengths": jnp.array([3.0, 4.0])}, "integer array"),
    (lambda: zeros_qkv(), {"kv_lengths": jnp.array([3, 65], jnp.int32)},
     r"must lie in \[0, S=64\], got values in \[3, 65\]"),
    (lambda: zeros_qkv(), {"local_window_size": (8, 2)}, "left-only"),
    (lambda: zeros_qkv(), {"local_window_size": "wide"}, "a non-negative int w or a"),
    (lambda: zeros_qkv(), {"logits_soft_cap": -1.0}, "logits_soft_cap must be positive"),
    (lambda: zeros_qkv(), {"impl": "magic"}, "unknown impl 'magic'"),
]


class DecodeTestBase(ImplTestBase):
    """Every shared decode case, for the implementation named by ``IMPL``.

    Class attributes: those of ``ImplTestBase``; CASES (the decode grid) and DTYPES (dtype name -> case names, None: all); GRAD_CASES, the cases whose
    gradients are checked (or, where ``DIFFERENTIABLE`` is False, must raise).
    """

    CASES: ClassVar[tuple[DecodeCase, ...]] = DECODE_CASES
    DTYPES: ClassVar[Mapping[str, tuple[str, ...] | None]] = {
        "float32": None, "bfloat16": ("gqa_t1_ragged", "gqa_t4_window"),
    }
    DIFFERENTIABLE: ClassVar[bool] = False
    GRAD_CASES: ClassVar[tuple[str, ...]] = ("gqa_t1_ragged", "kv_heads_differ_h40")

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if {"case", "dtype"} <= set(metafunc.fixturenames):
            metafunc.parametrize("case, dtype", grid(self.CASES, self.DTYPES))
        elif "case" in metafunc.fixturenames:
            metafunc.parametrize(
                "case", [c for c in self.CASES if c.name in self.GRAD_CASES], ids=repr
            )

    def test_matches_reference(self, case, dtype, key):
        q, k, v = case.inputs(key, dtype)
        check_against_reference(self.IMPL, q, k, v, case.kwargs(), self.CONFIG, self.plat)

    def test_default_config(self, key):
        """The default config (one split, one tile at this size) agrees with the reference."""
        case = DECODE_CASES[1]
        q, k, v = case.inputs(key)
        check_against_reference(self.IMPL, q, k, v, case.kwargs(), None, self.plat)

    def test_under_vmap(self, key):
        """A leading vmap axis (e.g. layers or beams), lengths traced."""
        case = DECODE_CASES[0]
        q, k, v = case.inputs(key)
        lengths = jnp.asarray(case.lengths, jnp.int32)
        qs, ks, vs = (jnp.stack([x, x[::-1]]) for x in (q, k, v))
        ls = jnp.stack([lengths, lengths[::-1]])

        def one(impl, config):
            def f(q, k, v, lengths):
                return decode_attention(q, k, v, kv_lengths=lengths, impl=impl, config=config)
            return f

        got = jax.jit(jax.vmap(one(self.IMPL, self.CONFIG)), compiler_options=self.options)(
            qs, ks, vs, ls)
        want = jax.jit(jax.vmap(one("reference", None)))(qs, ks, vs, ls)
        np.testing.assert_allclose(got, want, atol=self.tol().out)

    def test_prefill_then_decode(self, key):
        """Causal attention over the whole sequence, last T rows == decode of those T queries."""
        b, s, t, n, kh, h = 2, 40, 4, 8, 2, 128
        q_all, k, v = random_qkv(key, b, s, s, n, kh, h)
        tol = self.tol()
        for window in (None, 7):
            kw = {} if window is None else {"local_window_size": (window, 0)}
            full = jax.jit(lambda q, k, v, kw=kw: attention(
                q, k, v, is_causal=True, return_residuals=True, **kw))(q_all, k, v)
            out, lse = run(self.IMPL, q_all[:, -t:], k, v, kw, self.CONFIG)
            np.testing.assert_allclose(out, full[0][:, -t:], atol=tol.out)
            assert_lse_close(lse, full[1][:, -t:], tol.lse)

    def test_gradients(self, case, key):
        """Gradients of ``loss_with_lse`` match the reference's; a forward-only kernel says
        so and names the implementation that differentiates."""
        q, k, v = case.inputs(key)
        kwargs = case.kwargs()

        def grads(impl, config):
            def attn(q, k, v, **kw):
                return decode_attention(q, k, v, impl=impl, config=config, **kw)

            return jax.jit(jax.grad(
                lambda q, k, v: loss_with_lse(attn, q, k, v, kwargs), argnums=(0, 1, 2)
            ))

        if not self.DIFFERENTIABLE:
            with pytest.raises(NotImplementedError, match="forward-only; use impl='xla'"):
                grads(self.IMPL, self.CONFIG).trace(q, k, v)
            return
        got, want = grads(self.IMPL, self.CONFIG)(q, k, v), grads("reference", None)(q, k, v)
        for name, a, r in zip(GRADS, got, want, strict=True):
            assert np.isfinite(np.asarray(a)).all(), name
            np.testing.assert_allclose(a, r, atol=self.tol().get(name), err_msg=name)

    @pytest.mark.parametrize("fill", FILL_PARAMS)
    @pytest.mark.parametrize("scenario", sorted(DECODE_SCENARIOS))
    def test_masked_garbage_in_cache_slots(self, scenario, fill, key):
        """NaN or +inf in every cache slot no query sees (past kv_lengths, before the window;
        an uninitialized cache): out, LSE and (differentiable implementations) gradients
        equal those with zeros there (tests/ops/masked_garbage.py)."""

        def fn(q, k, v, **kw):
            return decode_attention(q, k, v, impl=self.IMPL, config=self.CONFIG,
                                    return_residuals=True, **kw)

        check_softmax_garbage(fn, decode_scenario(scenario, key), FILLS[fill],
                              grads=self.DIFFERENTIABLE, compiler_options=self.options,
                              plat=self.plat)

    @pytest.mark.parametrize("make, kwargs, match", BAD_INPUTS)
    def test_bad_inputs_raise_value_error(self, make, kwargs, match):
        q, k, v = make()
        with pytest.raises(ValueError, match=match):
            decode_attention(q, k, v, **{"impl": self.IMPL, **kwargs})


def lowering_call(decode_partials, shape, h=None):
    """(f, args) to lower a kernel module's ``decode_partials`` (causal window of 100, soft-cap)
    at ``shape`` of ``LOWERING_SHAPES`` (head dim ``h`` if given), with abstract inputs."""
    b, t, n, kh, h_, s, dtype = shape
    h = h or h_
    kv = jax.ShapeDtypeStruct((b, s, kh, h), dtype)
    args = (jax.ShapeDtypeStruct((b, t, n, h), dtype), kv, kv,
            jax.ShapeDtypeStruct((b,), jnp.int32))
    f = functools.partial(decode_partials, spec=MaskSpec(causal=True, window_left=100),
                          scale=0.1, soft_cap=30.0, interpret=False)
    return f, args


# Realistic shapes for the kernels' lowering tests (no device needed):
# (B, T, N, K, H, S, dtype): the H100 target; GQA 8 with T=16 (two row blocks); odd S.
LOWERING_SHAPES = [
    pytest.param((4, 1, 32, 4, 128, 32768, jnp.bfloat16), id="B4T1N32K4H128S32768"),
    pytest.param((2, 16, 32, 4, 64, 1000, jnp.float32), id="B2T16N32K4H64S1000"),
    pytest.param((2, 3, 6, 1, 256, 777, jnp.float16), id="B2T3N6K1H256S777"),
]
