"""Garbage where a row cannot see: scenarios, planting and checks for every implementation.

The contract (``attnlab/ops/README.md``): non-finite values in a query, key, value, cache slot
or output cotangent at a position a row cannot see never reach that row's output, LSE or
entropy, nor the gradients of visible positions. Each check runs an implementation twice,
once with NaN (or +inf) planted in such positions and once with zeros there, and asserts that
the clean rows and positions get finite results equal to per-dtype tolerance.

Which rows and positions are clean is decided here, in NumPy, from the mask alone: a row is
dirty if it holds garbage itself (its query or its cotangent) or sees a position that does;
a key's gradient is checked if it holds no garbage and no dirty row sees it (a dirty row's
own gradient contributions are unspecified, as in any autodiff of 0 * NaN). The test bases
(``attention_base``, ``attention_grad_base``, ``decode_base``, ``lightning_base``) call the
``check_*`` functions with their implementation; ``test_masked_garbage.py`` calls them for
the references and the sequence-parallel strategies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.testing import linear_tolerance, random_qkv, tolerance

FILLS = {"nan": float("nan"), "inf": float("inf")}


def fill_marks(fill: str) -> tuple:
    """NaN runs in `make test`; +inf, its twin, in `make test-all`."""
    return (pytest.mark.slow,) if fill == "inf" else ()


# The fills as a parameter.
FILL_PARAMS = [pytest.param(f, id=f, marks=fill_marks(f)) for f in sorted(FILLS)]


def garbage_grid(scenarios, bf16: str) -> list:
    """pytest params (scenario, fill, dtype): every scenario with NaN and with +inf in float32,
    and the scenario ``bf16`` with NaN in bfloat16 (16-bit operands read finite)."""
    grid = [pytest.param(s, f, jnp.float32, id=f"{s}-{f}", marks=fill_marks(f))
            for s in scenarios for f in FILLS]
    return grid + [pytest.param(bf16, "nan", jnp.bfloat16, id=f"{bf16}-nan-bf16")]


class Planted(NamedTuple):
    """Clean inputs, the call's keyword arguments and where garbage goes.

    bad_q [B, T]: query rows whose q and output cotangents are garbage; bad_kv [B, S]: keys
    whose k and v are garbage; visible [B, T, S]: the mask (True: the row sees the key).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    kwargs: dict[str, Any]
    bad_q: np.ndarray
    bad_kv: np.ndarray
    visible: np.ndarray


def plant(x: jax.Array, bad: np.ndarray, fill: float) -> jax.Array:
    """x with ``fill`` at the [B, L] positions ``bad`` (the trailing axes broadcast)."""
    where = jnp.asarray(bad).reshape(bad.shape + (1,) * (x.ndim - bad.ndim))
    return jnp.where(where, jnp.asarray(fill, x.dtype), x)


def dirty_rows(p: Planted) -> np.ndarray:
    """[B, T]: rows holding garbage or seeing a key that does."""
    return p.bad_q | (p.visible & p.bad_kv[:, None, :]).any(-1)


def checked_keys(p: Planted) -> np.ndarray:
    """[B, S]: keys holding no garbage that no dirty row sees (their gradients are checked)."""
    return ~p.bad_kv & ~(p.visible & dirty_rows(p)[:, :, None]).any(1)


def _close(got, want, atol, rtol=0.0, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got[np.isfinite(want)]).all(), f"{what}: non-finite where it is clean"
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=what)
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], atol=atol, rtol=rtol, err_msg=what)


# ----------------------------------------------------------------------------- softmax masks


def softmax_visible(kwargs: dict[str, Any], b: int, t: int, s: int) -> np.ndarray:
    """[B, T, S] visibility of ``attention(**kwargs)``, written independently in NumPy."""
    qp = np.asarray(kwargs.get("q_positions", kwargs.get("q_offset", 0) + np.arange(t)))
    kp = np.asarray(kwargs.get("kv_positions", kwargs.get("kv_offset", 0) + np.arange(s)))
    qp, kp = qp[None, :, None], kp[None, None, :]
    vis = np.ones((b, t, s), bool)
    if kwargs.get("is_causal"):
        vis &= kp <= qp
    window = kwargs.get("local_window_size")
    if window is not None:
        left, right = (window, window) if isinstance(window, int) else window
        if left is not None:
            vis &= kp >= qp - left
        if right is not None:
            vis &= kp <= qp + right
    seg = kwargs.get("segment_ids")
    if seg is not None:
        qs, ks = seg if isinstance(seg, tuple) else (seg, seg)
        vis &= np.asarray(qs)[:, :, None] == np.asarray(ks)[:, None, :]
    bias = kwargs.get("bias")
    if bias is not None:  # [B|1, 1, T|1, S|1]: one mask for every head here
        vis &= np.broadcast_to(np.asarray(bias)[:, 0] > -np.inf, (b, t, s))
    return vis


def _rows(b: int, length: int, ranges: list[list[tuple[int, int]]]) -> np.ndarray:
    """[B, length] bool, True on the half-open ranges given per batch row."""
    out = np.zeros((b, length), bool)
    for bi, rs in enumerate(ranges):
        for lo, hi in rs:
            out[bi, lo:hi] = True
    return out


# Every kind of mask, each with garbage where some rows cannot see (B = 2, N = 2, K = 1).
SOFTMAX_SCENARIOS = (
    "causal_future",  # causal self-attention, the last tokens garbage (q, k, v, dO)
    "window_both_sides",  # a (5, 3) window and soft-cap; garbage at both ends, or mid-row
    "segments_padding",  # packed documents, a padding document (right in b0, left in b1)
    "offsets_no_key_rows",  # kv_offset: rows 0-7 see no key; keys past every query garbage
    "positions_permuted",  # permuted q/kv positions; keys after every query garbage
    "bias_minus_inf",  # a -inf bias on garbage keys (implementations that take a bias)
)


def softmax_scenario(name: str, key: jax.Array, h: int = 16, dtype=jnp.float32) -> Planted:
    """The inputs of one of :data:`SOFTMAX_SCENARIOS`."""
    k1, k2, k3 = jax.random.split(key, 3)
    b, n, kh = 2, 2, 1
    t = s = 40
    kw: dict[str, Any] = {}
    bad_q = bad_kv = None
    if name == "causal_future":
        kw = {"is_causal": True}
        bad_q = bad_kv = _rows(b, t, [[(30, 40)], [(21, 40)]])
    elif name == "window_both_sides":
        kw = {"local_window_size": (5, 3), "logits_soft_cap": 3.0}
        bad_q = bad_kv = _rows(b, t, [[(0, 4), (36, 40)], [(18, 21)]])
    elif name == "segments_padding":
        seg = np.array([[0] * 14 + [1] * 16 + [7] * 10, [7] * 6 + [2] * 20 + [3] * 14], np.int32)
        kw = {"segment_ids": jnp.asarray(seg)}
        bad_q = bad_kv = seg == 7
    elif name == "offsets_no_key_rows":
        t = 24
        kw = {"is_causal": True, "kv_offset": 8}
        bad_q, bad_kv = np.zeros((b, t), bool), _rows(b, s, [[(16, 40)], [(30, 40)]])
    elif name == "positions_permuted":
        t = 24
        q_pos = np.asarray(8 + jax.random.permutation(k2, t), np.int32)
        kv_pos = np.asarray(jax.random.permutation(k3, s), np.int32)
        kw = {"is_causal": True, "q_positions": jnp.asarray(q_pos),
              "kv_positions": jnp.asarray(kv_pos)}
        bad_q = np.zeros((b, t), bool)
        bad_kv = np.broadcast_to(kv_pos > q_pos.max(), (b, s)).copy()
        bad_kv[1] &= np.arange(s) % 2 == 0  # b1: every other one of them
    elif name == "bias_minus_inf":
        t = s = 24
        bad_q, bad_kv = np.zeros((b, t), bool), _rows(b, s, [[(5, 8)], [(20, 24)]])
        bias = np.where(bad_kv[:, None, None, :], -np.inf, 0.0).astype(np.float32)
        kw = {"bias": jnp.asarray(np.broadcast_to(bias, (b, 1, t, s)))}
    else:
        raise ValueError(f"no softmax scenario {name!r}; expected one of {SOFTMAX_SCENARIOS}")
    q, k, v = random_qkv(k1, b, t, s, n, kh, h, dtype)
    return Planted(q, k, v, kw, bad_q, bad_kv, softmax_visible(kw, b, t, s))


def check_softmax_garbage(
    fn: Callable[..., tuple[jax.Array, ...]], p: Planted, fill: float, *, entropy: bool = False,
    grads: bool = True, compiler_options=None, plat: str = "cpu",
) -> None:
    """``fn(q, k, v, **kwargs)`` -> (out, lse[, entropy]) with garbage and with zeros planted
    (inputs and output cotangents): clean rows' values and dq, checked keys' dk and dv agree.
    ``grads=False``: values only (forward-only implementations)."""
    out_shape = (*p.q.shape[:3], p.v.shape[-1])
    kd, kl, ke = jax.random.split(jax.random.key(7), 3)
    unseen = ~p.visible.any(-1)[:, :, None]  # no cotangent on a -inf LSE
    dout = jax.random.normal(kd, out_shape, jnp.float32)
    dlse = jnp.where(unseen, 0.0, jax.random.normal(kl, p.q.shape[:3]))
    dent = jnp.where(unseen, 0.0, jax.random.normal(ke, p.q.shape[:3]))
    cts = (dout.astype(p.q.dtype), dlse, *((dent,) if entropy else ()))

    def run(q, k, v, cts):
        if not grads:
            return fn(q, k, v, **p.kwargs), ()
        res, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **p.kwargs), q, k, v)
        return res, vjp(cts[:len(res)])

    run = jax.jit(run, compiler_options=compiler_options)

    def planted(fill):
        q = plant(p.q, p.bad_q, fill)
        k, v = plant(p.k, p.bad_kv, fill), plant(p.v, p.bad_kv, fill)
        return run(q, k, v, tuple(plant(c, p.bad_q, fill) for c in cts))

    (got, got_grads), (want, want_grads) = planted(fill), planted(0.0)
    tol = tolerance(p.q.dtype, plat)
    clean, keys = ~dirty_rows(p), checked_keys(p)
    assert clean.any()
    for name, g, w, t in zip(("out", "lse", "entropy"), got, want, (tol.out, tol.lse, tol.lse)):
        _close(g[clean], w[clean], t, what=name)
    for name, g, w, rows in zip(("dq", "dk", "dv"), got_grads, want_grads, (clean, keys, keys)):
        _close(g[rows], w[rows], tol.get(name), tol.grad_rtol, what=name)


def check_block_share_garbage(
    grads_fn: Callable[..., tuple[jax.Array, jax.Array, jax.Array]], p: Planted, fill: float,
    *, compiler_options=None, plat: str = "cpu",
) -> None:
    """``grads_fn(q, k, v, dout, dlse)`` -> (dq, dk, dv) (a backward given the cotangents,
    such as the sum of ``attention_bwd`` block shares) with garbage and with zeros planted in
    the inputs and the cotangents: clean rows' dq and checked keys' dk, dv agree."""
    kd, kl = jax.random.split(jax.random.key(5))
    unseen = ~p.visible.any(-1)[:, :, None]
    dout = jax.random.normal(kd, (*p.q.shape[:3], p.v.shape[-1]), jnp.float32)
    dlse = jnp.where(unseen, 0.0, jax.random.normal(kl, p.q.shape[:3]))
    run = jax.jit(grads_fn, compiler_options=compiler_options)

    def planted(fill):
        return run(plant(p.q, p.bad_q, fill), plant(p.k, p.bad_kv, fill),
                   plant(p.v, p.bad_kv, fill), plant(dout, p.bad_q, fill),
                   plant(dlse, p.bad_q, fill))

    got, want = planted(fill), planted(0.0)
    tol = tolerance(p.q.dtype, plat)
    clean, keys = ~dirty_rows(p), checked_keys(p)
    for name, g, w, rows in zip(("dq", "dk", "dv"), got, want, (clean, keys, keys)):
        _close(g[rows], w[rows], tol.get(name), tol.grad_rtol, what=name)


# ----------------------------------------------------------------------------- decode


# (name, kv_lengths, window): garbage in every cache slot no query sees (B = 3, T = 4, S = 40).
DECODE_SCENARIOS = {
    "past_length": ((0, 40, 13), None),  # uninitialized slots past each length
    "window": ((40, 30, 9), 5),  # and slots before every query's window
}


def decode_scenario(name: str, key: jax.Array, h: int = 128) -> Planted:
    lengths, window = DECODE_SCENARIOS[name]
    b, t, s, n, kh = 3, 4, 40, 4, 2
    q, k, v = random_qkv(key, b, t, s, n, kh, h)
    length = np.asarray(lengths)[:, None]
    slot = np.arange(s)[None, :]
    q_pos = length - t + np.arange(t)[None, :]  # [B, T]
    vis = (slot[:, None, :] <= q_pos[:, :, None]) & (slot[:, None, :] < length[:, :, None])
    bad_kv = slot >= length
    if window is not None:
        vis &= slot[:, None, :] >= q_pos[:, :, None] - window
        bad_kv |= slot < length - t - window
    kw: dict[str, Any] = {"kv_lengths": jnp.asarray(lengths, jnp.int32)}
    if window is not None:
        kw["local_window_size"] = window
    return Planted(q, k, v, kw, np.zeros((b, t), bool), bad_kv, vis)


# ----------------------------------------------------------------------------- lightning


class PlantedLinear(NamedTuple):
    """Lightning inputs and garbage tokens: bad [B, T] (q, k, v and dO garbage there)."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    kwargs: dict[str, Any]
    bad: np.ndarray


LIGHTNING_SCENARIOS = (
    "future",  # no documents: the last tokens garbage (only earlier rows' o and dq checked)
    "documents",  # a garbage document mid-row (b0) and a leading padding one (b1)
    "padding_tail",  # a trailing garbage padding document (the final state sees it)
)


def lightning_scenario(name: str, key: jax.Array, h: int = 16, dtype=jnp.float32
                       ) -> PlantedLinear:
    b, t, n = 2, 40, 2
    k1, k2 = jax.random.split(key)
    q, k, v = random_qkv(k1, b, t, t, n, n, h, dtype)
    kw: dict[str, Any] = {
        "decay": np.array([0.9, 0.6], np.float32), "scale": 0.5,
        "initial_state": jax.random.normal(k2, (b, n, h, h), jnp.float32),
    }
    if name == "future":
        bad = _rows(b, t, [[(30, 40)], [(17, 40)]])
    elif name == "documents":
        seg = np.array([[0] * 12 + [5] * 10 + [1] * 18, [5] * 7 + [2] * 20 + [3] * 13])
        kw["segment_ids"] = jnp.asarray(seg, jnp.int32)
        bad = seg == 5
    elif name == "padding_tail":
        seg = np.array([[0] * 20 + [1] * 9 + [5] * 11, [0] * 33 + [5] * 7])
        kw["segment_ids"] = jnp.asarray(seg, jnp.int32)
        bad = seg == 5
    else:
        raise ValueError(f"no lightning scenario {name!r}; expected one of {LIGHTNING_SCENARIOS}")
    return PlantedLinear(q, k, v, kw, bad)


def lightning_visible(p: PlantedLinear) -> tuple[np.ndarray, np.ndarray]:
    """([B, T, T] row i sees token j: j <= i in one document; [B, T] row i sees the initial
    state: no document starts in (0, i])."""
    b, t = p.bad.shape
    seg = p.kwargs.get("segment_ids")
    seg = np.zeros((b, t), int) if seg is None else np.asarray(seg)
    starts = np.concatenate([np.zeros((b, 1), int), (seg[:, 1:] != seg[:, :-1])], axis=1)
    run = np.cumsum(starts, axis=1)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    vis = (j <= i)[None] & (run[:, :, None] == run[:, None, :])
    return vis, run == 0


def check_lightning_garbage(
    fn: Callable[..., tuple[jax.Array, jax.Array]], p: PlantedLinear, fill: float, *,
    compiler_options=None,
) -> None:
    """``fn(q, k, v, **kwargs)`` -> (o, final_state) with garbage and with zeros planted: the
    clean rows' o and dq, the checked tokens' dk and dv, and the final state and the initial
    state's gradient where no garbage reaches them, agree."""
    vis, sees_init = lightning_visible(p)
    dirty = p.bad | (vis & p.bad[:, None, :]).any(-1)
    keys = ~p.bad & ~(vis & dirty[:, :, None]).any(1)
    # The final state is a row after the last token; the initial state is seen by the
    # rows before the first document start.
    final_clean = ~(vis[:, -1] & p.bad).any(-1) & ~p.bad[:, -1]
    init_clean = ~(sees_init & dirty).any(-1)
    kd, ks = jax.random.split(jax.random.key(11))
    do = jax.random.normal(kd, p.v.shape, jnp.float32).astype(p.q.dtype)
    ds = jax.random.normal(ks, p.kwargs["initial_state"].shape, jnp.float32)
    kw = {key: val for key, val in p.kwargs.items() if key != "initial_state"}

    def run(q, k, v, s0, do):
        res, vjp = jax.vjp(lambda q, k, v, s0: fn(q, k, v, initial_state=s0, **kw), q, k, v, s0)
        return res, vjp((do, ds))

    run = jax.jit(run, compiler_options=compiler_options)

    def planted(fill):
        q, k, v, do_ = (plant(x, p.bad, fill) for x in (p.q, p.k, p.v, do))
        return run(q, k, v, p.kwargs["initial_state"], do_)

    ((o, st), grads), ((o0, st0), grads0) = planted(fill), planted(0.0)
    tol = linear_tolerance(p.q.dtype)
    clean = ~dirty

    def close(got, want, bound, what):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.isfinite(got).all(), f"{what}: non-finite where it is clean"
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(got, want, atol=bound * scale, rtol=0, err_msg=what)

    assert clean.any()
    close(o[clean], o0[clean], tol.values, "o")
    close(st[final_clean], st0[final_clean], tol.values, "final state")
    dq, dk, dv, dh0 = grads
    close(dq[clean], grads0[0][clean], tol.grads, "dq")
    close(dk[keys], grads0[1][keys], tol.grads, "dk")
    close(dv[keys], grads0[2][keys], tol.grads, "dv")
    close(dh0[init_clean], grads0[3][init_clean], tol.grads, "d initial_state")
