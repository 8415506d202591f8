"""One test base for lightning attention: every case that every implementation must pass.

An implementation's test file subclasses :class:`LightningTestBase` in a few lines (a
``Test...`` class that sets ``IMPL`` and, for kernels, a small-chunk ``CONFIG``) and adds only
its kernel-specific tests. Everything goes through the public
``lightning_attention(..., impl=IMPL)``: values and final state against the float64 NumPy
oracle, gradients (q, k, v and the initial state) against the reference recurrence, with the
linear-attention row of the tolerance table of ``attnlab.testing``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import lightning as L
from attnlab.testing import linear_tolerance
from tests.helpers import lightning_oracle, random_segments
from tests.ops.attention_base import ImplTestBase, grid
from tests.ops.masked_garbage import (
    FILLS,
    LIGHTNING_SCENARIOS,
    check_lightning_garbage,
    garbage_grid,
    lightning_scenario,
)


@dataclasses.dataclass(frozen=True)
class LightningCase:
    """One lightning case: shapes, per-head lambdas (None: ``minimax_decay(n, 1, 4)``),
    initial state, packed documents, and the xla path's chunk length."""

    name: str
    b: int = 2
    t: int = 40
    n: int = 3
    h: int = 16
    hv: int = 16
    decays: tuple[float, ...] | None = None
    initial_state: bool = False
    segments: int = 0
    chunk: int = 16  # chunk_size of impl="xla"

    def __repr__(self) -> str:
        return self.name

    def decay(self) -> np.ndarray:
        if self.decays is None:
            return L.minimax_decay(self.n, 1, 4)
        assert len(self.decays) == self.n, self.name
        return np.asarray(self.decays, np.float32)

    def inputs(self, key, dtype=jnp.float32):
        """(q, k, v, decay, initial_state | None, segment_ids | None)."""
        kq, kk, kv, ks, kseg = jax.random.split(key, 5)
        shape = (self.b, self.t, self.n, self.h)
        q = jax.random.normal(kq, shape, jnp.float32).astype(dtype)
        k = jax.random.normal(kk, shape, jnp.float32).astype(dtype)
        v = jax.random.normal(kv, (*shape[:3], self.hv), jnp.float32).astype(dtype)
        h0 = (jax.random.normal(ks, (self.b, self.n, self.h, self.hv), jnp.float32)
              if self.initial_state else None)
        seg = random_segments(kseg, self.b, self.t, self.segments) if self.segments else None
        return q, k, v, self.decay(), h0, seg


# Head dims the kernels pad inside (Triton: to a power of two >= 16, so 40 -> 64, 80 and
# 96 -> 128, 192 -> 256; TPU: to a multiple of 8, so 5 -> 8, 13 -> 16) and 32, which both take
# as it is; padded initial states and sliced final states and gradients. Tiny (T = 20: a
# whole chunk of 16 and a ragged one): the kernels' subclasses run them all interpreted
# (dims 40, 80, 96 and 40/80 in `make test-all`).
HEAD_DIM_CASES = (
    LightningCase("dims_32", b=1, t=20, n=2, h=32, hv=32, decays=(0.9, 1.0),
                  initial_state=True),
    LightningCase("dims_40", b=1, t=20, n=2, h=40, hv=40, initial_state=True, segments=2),
    LightningCase("dims_80", b=1, t=20, n=1, h=80, hv=80, decays=(0.95,), initial_state=True),
    LightningCase("dims_96", b=1, t=20, n=1, h=96, hv=96, segments=2),
    LightningCase("dims_192_128", b=1, t=20, n=1, h=192, hv=128, decays=(0.9,),
                  initial_state=True),
    LightningCase("dims_40_80", b=1, t=20, n=2, h=40, hv=80, decays=(0.5, 1.0),
                  initial_state=True, segments=2),
    LightningCase("dims_5_13", b=1, t=20, n=2, h=5, hv=13, initial_state=True),
)

# lambda = 1.0 (plain linear attention) is in every case but "minimax"; T = 40 and 37 with
# chunks of 16 leave a ragged last chunk (padding must leave the state alone).
LIGHTNING_CASES = (
    LightningCase("minimax"),
    # One xla chunk longer than T; Hv != H.
    LightningCase("plain_linear_hv", decays=(1.0, 1.0, 1.0), hv=32, chunk=64),
    # A chunk (7) that divides nothing; state, documents, three decays.
    LightningCase("ragged_all", t=37, segments=3, initial_state=True, decays=(0.3, 0.9, 1.0),
                  chunk=7),
    # h = 32 with the Triton kernel's 16-wide state blocks: two programs share each states
    # output block.
    LightningCase("state_segments_h32", t=40, h=32, hv=32, decays=(0.05, 0.9, 1.0),
                  initial_state=True, segments=3),
    LightningCase("state_segments", t=40, hv=32, decays=(0.05, 0.9, 1.0), initial_state=True,
                  segments=3),
    LightningCase("plain_t48", b=1, t=48, hv=32, decays=(0.05, 0.9, 1.0)),
    LightningCase("plain_t24", b=1, t=24, n=2, decays=(0.8, 1.0)),
    *HEAD_DIM_CASES,
)
# The names of HEAD_DIM_CASES, for a subclass's DTYPES.
HEAD_DIM_NAMES = tuple(c.name for c in HEAD_DIM_CASES)


def assert_close_rel(got, want, rtol: float, name: str) -> None:
    """max |got - want| <= rtol * max(1, max |want|), everything finite."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{name} has NaN/inf"
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale, f"{name}: max abs err {err:.3e} > {rtol:.0e} * {scale:.3g}"


def recurrence(decay, segment_ids, scale) -> Callable:
    """The reference recurrence on float32 copies of q, k, v (float32 gradients)."""

    def fn(q, k, v, h0):
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        return L.reference(*f32, decay=decay, initial_state=h0, segment_ids=segment_ids,
                           scale=scale, return_state=True)

    return fn


def values_and_grads(fn: Callable, q, k, v, h0, key, compiler_options=None):
    """(o, state, (dq, dk, dv, dh0)) for random cotangents of both outputs, in one jit."""

    def run(q, k, v, h0):
        (o, s), pullback = jax.vjp(fn, q, k, v, h0)
        ko, ks = jax.random.split(key)
        do = jax.random.normal(ko, o.shape, jnp.float32).astype(o.dtype)
        ds = jax.random.normal(ks, s.shape, jnp.float32)
        return o, s, pullback((do, ds))

    return jax.jit(run, compiler_options=compiler_options)(q, k, v, h0)


def check_case(impl, case: LightningCase, dtype, key, config=None, compiler_options=None,
               want_values: str = "oracle") -> None:
    """``impl`` on ``case``: o and the final state against the float64 oracle (or, with
    ``want_values="recurrence"``, against the float32 recurrence), gradients of q, k, v and
    the initial state against the recurrence's."""
    q, k, v, decay, h0, seg = case.inputs(key, dtype)
    scale = case.h ** -0.5
    tol = linear_tolerance(dtype)

    def under_test(q, k, v, h0):
        return L.lightning_attention(q, k, v, decay=decay, initial_state=h0, segment_ids=seg,
                                     scale=scale, return_state=True, impl=impl, config=config)

    if h0 is None:  # the initial state's gradient is checked in every case
        h0 = jnp.zeros((case.b, case.n, case.h, case.hv), jnp.float32)
    cot_key = jax.random.fold_in(key, 1)
    o, s, grads = values_and_grads(under_test, q, k, v, h0, cot_key, compiler_options)
    ref_o, ref_s, want_grads = values_and_grads(recurrence(decay, seg, scale), q, k, v, h0,
                                                cot_key)
    assert o.dtype == dtype and s.dtype == jnp.float32
    if want_values == "oracle":
        ref_o, ref_s = lightning_oracle(q, k, v, decay, h0, seg, scale)
    assert_close_rel(o, ref_o, tol.values, "o")
    assert_close_rel(s, ref_s, tol.values, "final_state")
    for name, got, want in zip(("dq", "dk", "dv", "dh0"), grads, want_grads, strict=True):
        assert got.dtype == (jnp.float32 if name == "dh0" else dtype), name
        assert_close_rel(got, want, tol.grads, name)


def kernel_bad_args(change: Mapping[str, Any]) -> tuple:
    """(q, k, v, log_decay, initial_state, segment_ids) for a kernel wrapper's argument
    checks: B=1, T=16, N=3, H=16, Hv=16, float32, with ``change`` applied (keys h, hv, dtype,
    dtype_k, v_len, log_decay_shape, state_shape, seg_shape)."""
    b, t, n = 1, 16, 3
    h = change.get("h", 16)
    dtype = change.get("dtype", jnp.float32)
    q = jnp.full((b, t, n, h), 0.5).astype(dtype)
    k = jnp.full((b, t, n, h), 0.25).astype(change.get("dtype_k", dtype))
    v = jnp.full((b, change.get("v_len", t), n, change.get("hv", 16)), 0.75).astype(dtype)
    ld = jnp.full(change.get("log_decay_shape", (n,)), -0.1)
    h0 = jnp.zeros(change["state_shape"]) if "state_shape" in change else None
    seg = jnp.zeros(change["seg_shape"], jnp.int32) if "seg_shape" in change else None
    return q, k, v, ld, h0, seg


def kernel_bad_inputs_test(
    fn: Callable[..., Any], *, kernels: str, padding: str, bad_dtype: tuple[Any, str]
) -> Callable[[dict[str, Any], str], None]:
    """A ``test_bad_inputs(change, match)`` for a lightning kernel wrapper ``fn(q, k, v,
    log_decay, initial_state=, segment_ids=)``, parametrized over the cases every wrapper
    refuses alike (inputs from :func:`kernel_bad_args`): head dims over 256, whose message
    names ``kernels`` and ``padding`` (the family and how it pads head dims inside), the
    checks of ``pallas_kernels.common.lightning.check_lightning_inputs``, and ``bad_dtype``,
    (a dtype the family refuses, the message's start)."""
    dtype, dtype_match = bad_dtype
    cases = [
        (dict(h=264), rf"head_dim H is 264; the {kernels} take head dims from 1 to 256 "
                      rf"\({re.escape(padding)}\); use impl='xla'"),
        (dict(hv=257), f"value head_dim Hv is 257; the {kernels} take head dims from 1"),
        (dict(hv=300), f"value head_dim Hv is 300; the {kernels} take head dims"),
        (dict(dtype=dtype), dtype_match),
        (dict(dtype_k=jnp.bfloat16), "must share one dtype"),
        (dict(log_decay_shape=(2,)), r"log_decay must be a float array of shape \(3,\)"),
        (dict(log_decay_shape=(3, 1)), r"log_decay must be a float array of shape \(3,\)"),
        (dict(state_shape=(1, 3, 8, 8)), r"initial_state must have shape"),
        (dict(state_shape=(1, 3, 16, 8)), r"initial_state must have shape"),
        (dict(seg_shape=(1, 7)), r"segment_ids must be an integer array of shape"),
        (dict(seg_shape=(2, 16)), r"segment_ids must be an integer array of shape"),
        (dict(v_len=5), "k must have q's shape"),
    ]

    @pytest.mark.parametrize("change, match", cases)
    def test_bad_inputs(change: dict[str, Any], match: str) -> None:
        q, k, v, ld, h0, seg = kernel_bad_args(change)
        with pytest.raises(ValueError, match=match):
            fn(q, k, v, ld, initial_state=h0, segment_ids=seg)

    return test_bad_inputs


class LightningTestBase(ImplTestBase):
    """Every shared lightning case, for the implementation named by ``IMPL``.

    Class attributes: those of ``ImplTestBase``; CASES and DTYPES (dtype name -> names of the
    cases run in that dtype, None: all of ``CASES``); MAX_HEAD_DIM (the largest H and Hv the
    implementation takes, refused above with ``NotImplementedError``; None: any).
    """

    CASES: ClassVar[tuple[LightningCase, ...]] = LIGHTNING_CASES
    DTYPES: ClassVar[Mapping[str, tuple[str, ...] | None]] = {"float32": None}
    MAX_HEAD_DIM: ClassVar[int | None] = None
    SLOW_CASES: ClassVar[tuple[str, ...]] = ("dims_40", "dims_80", "dims_96", "dims_40_80")

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if {"case", "dtype"} <= set(metafunc.fixturenames):
            metafunc.parametrize("case, dtype",
                                 grid(self.CASES, self.DTYPES, slow_cases=self.SLOW_CASES))

    def config_for(self, case: LightningCase) -> Any:
        """The config a grid case runs with (the xla subclass takes the case's chunk)."""
        return self.CONFIG

    def call(self, q, k, v, decay, **kwargs):
        return L.lightning_attention(q, k, v, decay=decay, impl=self.IMPL, config=self.CONFIG,
                                     **kwargs)

    def test_matches_reference(self, case, dtype, key):
        check_case(self.IMPL, case, dtype, key, self.config_for(case), self.options)

    def test_default_config(self, key):
        """No config: the default chunk shrinks to the short, ragged sequence."""
        case = next(c for c in LIGHTNING_CASES if c.name == "ragged_all")
        check_case(self.IMPL, case, jnp.float32, key, None, self.options)

    def test_two_halves_with_state_equal_one_call(self, key):
        """The property LASP rests on: a block continues the previous block's final state
        exactly (both halves ragged, so padding must never decay the state), including a
        document boundary exactly at the split (handled by the caller zeroing the state)."""
        q, k, v, decay, _, seg = LightningCase("halves", t=48, segments=3).inputs(key)
        seg = seg.at[:, 25:].add(1)  # a document starts at the split
        want, want_s = L.reference(q, k, v, decay=decay, segment_ids=seg, return_state=True)

        def run(q, k, v, seg):
            o1, s1 = self.call(q[:, :25], k[:, :25], v[:, :25], decay, segment_ids=seg[:, :25],
                               return_state=True)
            keep = (seg[:, 25] == seg[:, 24]).astype(jnp.float32)[:, None, None, None]
            o2, s2 = self.call(q[:, 25:], k[:, 25:], v[:, 25:], decay,
                               segment_ids=seg[:, 25:], initial_state=s1 * keep,
                               return_state=True)
            return jnp.concatenate([o1, o2], 1), s2

        o, s = jax.jit(run, compiler_options=self.options)(q, k, v, seg)
        tol = linear_tolerance(jnp.float32).values
        assert_close_rel(o, want, tol, "o")
        assert_close_rel(s, want_s, tol, "state")

    def test_prefill_then_decode_continues_exactly(self, key):
        """Prefill a non-multiple of the chunk, then decode one token, two, one and the rest
        with ``lightning_decode`` from the prefill's final state."""
        q, k, v, decay, _, _ = LightningCase("pd", t=24, n=2, decays=(0.6, 0.95)).inputs(key)
        want, want_s = L.reference(q, k, v, decay=decay, return_state=True)
        p = 19

        def run(q, k, v):
            o_pre, state = self.call(q[:, :p], k[:, :p], v[:, :p], decay, return_state=True)
            outs = [o_pre]
            for lo, hi in ((p, p + 1), (p + 1, p + 3), (p + 3, p + 4), (p + 4, 24)):
                o, state = L.lightning_decode(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], state,
                                              decay)
                outs.append(o)
            return jnp.concatenate(outs, axis=1), state

        got, state = jax.jit(run, compiler_options=self.options)(q, k, v)
        tol = linear_tolerance(jnp.float32).values
        assert_close_rel(got, want, tol, "prefill+decode")
        assert_close_rel(state, want_s, tol, "state")

    def test_state_round_trip_at_padded_head_dims(self, key):
        """H = 20, Hv = 13 (padded inside the kernels, Triton and TPU alike): prefill, decode
        two tokens with ``lightning_decode`` from the prefill's [B, N, 20, 13] state, then the
        rest with that state as ``initial_state``; outputs and the final state as one call."""
        case = LightningCase("rt", t=30, n=2, h=20, hv=13, decays=(0.6, 0.95))
        q, k, v, decay, _, _ = case.inputs(key)
        want, want_s = L.reference(q, k, v, decay=decay, return_state=True)

        def run(q, k, v):
            o1, state = self.call(q[:, :17], k[:, :17], v[:, :17], decay, return_state=True)
            o2, state = L.lightning_decode(q[:, 17:19], k[:, 17:19], v[:, 17:19], state, decay)
            o3, state = self.call(q[:, 19:], k[:, 19:], v[:, 19:], decay, initial_state=state,
                                  return_state=True)
            return jnp.concatenate([o1, o2, o3], axis=1), state

        got, state = jax.jit(run, compiler_options=self.options)(q, k, v)
        assert got.shape == want.shape and state.shape == (2, 2, 20, 13)
        tol = linear_tolerance(jnp.float32).values
        assert_close_rel(got, want, tol, "o")
        assert_close_rel(state, want_s, tol, "state")

    def test_head_dims_above_the_limit(self, key):
        """Above ``MAX_HEAD_DIM`` (a kernel's 256) the implementation refuses by name;
        without one (xla) it computes H = 264 and Hv = 300 like the reference."""
        case = LightningCase("big", b=1, t=8, n=1, h=264, hv=300, decays=(0.9,))
        q, k, v, decay, _, _ = case.inputs(key)
        if self.MAX_HEAD_DIM is not None:
            with pytest.raises(NotImplementedError, match=(
                    rf"{self.IMPL} takes head dims up to {self.MAX_HEAD_DIM}, got q/k 264 "
                    r"and v 300; use impl='xla'")):
                self.call(q, k, v, decay)
            assert "takes head dims up to" in L.explain(q, k, v, decay=decay)[self.IMPL]
            return
        o, s = jax.jit(lambda q, k, v: self.call(q, k, v, decay, return_state=True))(q, k, v)
        want, want_s = L.reference(q, k, v, decay=decay, return_state=True)
        tol = linear_tolerance(jnp.float32).values
        assert_close_rel(o, want, tol, "o")
        assert_close_rel(s, want_s, tol, "state")

    def test_traced_decay_and_vmap(self, key):
        """vmap over the batch with the decay a traced argument (as in a model's parameters)."""
        q, k, v, decay, _, _ = LightningCase("v", t=16).inputs(key)
        want = L.reference(q, k, v, decay=decay)
        vm = jax.jit(jax.vmap(
            lambda q, k, v, d: self.call(q[None], k[None], v[None], d),
            in_axes=(0, 0, 0, None),
        ), compiler_options=self.options)
        assert_close_rel(vm(q, k, v, jnp.asarray(decay))[:, 0], want,
                         linear_tolerance(jnp.float32).values, "vmap, traced decay")

    @pytest.mark.parametrize("scenario, fill, dtype",
                             garbage_grid(LIGHTNING_SCENARIOS, "documents"))
    def test_masked_garbage_never_reaches_a_row(self, scenario, fill, dtype, key):
        """NaN or +inf in later tokens and in other documents (q, k, v and dO): the rows that
        cannot see them get finite o and gradients equal to those with zeros there, and so
        do the final state and the initial state's gradient where no garbage reaches them
        (tests/ops/masked_garbage.py)."""

        def fn(q, k, v, **kw):
            return self.call(q, k, v, return_state=True, **kw)

        check_lightning_garbage(fn, lightning_scenario(scenario, key, dtype=dtype), FILLS[fill],
                                compiler_options=self.options)

    def test_decay_zero_keeps_the_current_token(self, key):
        """A traced decay of 0 (log 0 = -inf) is exact: o_t = scale q_t k_t^T v_t, as the
        reference's recurrence (S_t = 0 * S_{t-1} + k_t^T v_t) defines it; no NaN."""
        q, k, v, _, _, seg = LightningCase("d0", t=24, n=2, segments=2).inputs(key)
        decay = jnp.asarray([0.0, 0.7])

        def run(impl, config):
            return jax.jit(lambda q, k, v, d: L.lightning_attention(
                q, k, v, decay=d, impl=impl, config=config, segment_ids=seg,
                return_state=True), compiler_options=self.options)(q, k, v, decay)

        (o, s), (want, want_s) = run(self.IMPL, self.CONFIG), run("reference", None)
        tol = linear_tolerance(jnp.float32).values
        assert_close_rel(o, want, tol, "o")
        assert_close_rel(s, want_s, tol, "state")
        only_own = jnp.einsum("btnh,btnh,btnv->btnv", q, k, v)[:, :, 0]
        assert_close_rel(o[:, :, 0], only_own, tol, "decay 0: the current token only")

    def test_bad_inputs(self, key):
        q, k, v, decay, _, _ = LightningCase("x", b=1, t=8, n=2, h=8, hv=8).inputs(key)
        f = self.call
        with pytest.raises(ValueError, match=r"q must have shape \[batch, seq, heads, head_dim\]"):
            f(q[0], k, v, decay)
        with pytest.raises(ValueError, match="k must have q's shape"):
            f(q, k[:, :4], v, decay)
        with pytest.raises(ValueError, match=r"v must agree with q in \[batch, seq, heads\]"):
            f(q, k, v[:, :, :1], decay)
        with pytest.raises(ValueError, match="dtypes must match"):
            f(q, k.astype(jnp.bfloat16), v, decay)
        with pytest.raises(ValueError, match=r"decay must have shape \[N\] = \(2,\)"):
            f(q, k, v, [0.5, 0.5, 0.5])
        for bad in ([0.5, -0.1], [0.5, 1.5]):
            with pytest.raises(ValueError, match=r"decay values must lie in \(0, 1\]"):
                f(q, k, v, bad)
        with pytest.raises(ValueError, match="decay is required"):
            f(q, k, v, None)
        with pytest.raises(ValueError, match=r"initial_state must have shape \[B, N, H, Hv\]"):
            f(q, k, v, decay, initial_state=jnp.zeros((1, 2, 8, 4)))
        with pytest.raises(ValueError, match=r"segment_ids must have shape \[B, T\]"):
            f(q, k, v, decay, segment_ids=jnp.zeros((1, 7), jnp.int32))
        with pytest.raises(ValueError, match="segment_ids must be integers"):
            f(q, k, v, decay, segment_ids=jnp.zeros((1, 8), jnp.float32))
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            f(q, k, v, decay, chunk_size=0)
        with pytest.raises(ValueError, match="unknown impl 'fast'"):
            L.lightning_attention(q, k, v, decay=decay, impl="fast")
