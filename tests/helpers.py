"""Test-only helpers: the float64 NumPy oracles, loss functions, collective checks, worker
processes.

The tolerance table, the attention case grid and the random inputs are those of
``attnlab.testing`` (shared with the benchmarks' correctness checks); they are re-exported here.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from attnlab.testing import (  # noqa: F401  (re-exported: tests import them from here)
    ATTENTION_CASES,
    Case,
    case_inputs,
    random_qkv,
    random_segments,
    tolerance,
)

HAS_CUDA = any(d.platform == "gpu" for d in jax.devices()) if jax.default_backend() != "cpu" else False


# The tolerance table lives in attnlab.testing (shared with the benchmarks); these read it.
def fwd_tol(dtype) -> float:
    return tolerance(dtype).out


def lse_tol(dtype) -> float:
    return tolerance(dtype).lse


def grad_tol(dtype, name: str) -> float:
    return tolerance(dtype).get(name)


def grad_rtol(dtype) -> float:
    return tolerance(dtype).grad_rtol


def assert_bf16_value_and_grads_close(got, want) -> None:
    """(out, (dq, dk, dv)) of a bfloat16 run against the same from a reference: the value
    table's absolute tolerance for out, absolute plus relative (to the largest reference
    entry) for each gradient."""
    def f32(x):
        return np.asarray(x, np.float32)

    np.testing.assert_allclose(f32(got[0]), f32(want[0]), atol=fwd_tol(jnp.bfloat16))
    for name, g, wg in zip(("dq", "dk", "dv"), got[1], want[1], strict=True):
        tol = grad_tol(jnp.bfloat16, name) + grad_rtol(jnp.bfloat16) * np.abs(f32(wg)).max()
        np.testing.assert_allclose(f32(g), f32(wg), atol=tol, err_msg=name)


def numpy_oracle(
    q, k, v, *, causal=False, window=(None, None), q_pos=None, kv_pos=None, q_seg=None,
    kv_seg=None, bias=None, soft_cap=None, scale=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 NumPy attention, written independently of attnlab. Returns (out, lse)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s = k.shape[1]
    gk, gv = n // k.shape[2], n // v.shape[2]  # query head i reads k head i // gk, v i // gv
    scale = 1.0 / np.sqrt(h) if scale is None else scale
    q_pos = np.arange(t) if q_pos is None else np.asarray(q_pos)
    kv_pos = np.arange(s) if kv_pos is None else np.asarray(kv_pos)
    out = np.zeros((b, t, n, v.shape[-1]))
    lse = np.full((b, t, n), -np.inf)
    for bi in range(b):
        for ni in range(n):
            z = q[bi, :, ni] @ k[bi, :, ni // gk].T * scale
            if soft_cap is not None:
                z = soft_cap * np.tanh(z / soft_cap)
            if bias is not None:
                bb = np.asarray(bias, np.float64)
                z = z + np.broadcast_to(bb[min(bi, bb.shape[0] - 1), min(ni, bb.shape[1] - 1)], z.shape)
            ok = np.ones((t, s), bool)
            qp, kp = q_pos[:, None], kv_pos[None, :]
            if causal:
                ok &= kp <= qp
            if window[0] is not None:
                ok &= kp >= qp - window[0]
            if window[1] is not None:
                ok &= kp <= qp + window[1]
            if q_seg is not None:
                ok &= np.asarray(q_seg)[bi][:, None] == np.asarray(kv_seg)[bi][None, :]
            for ti in range(t):
                if not ok[ti].any():
                    continue
                zi = z[ti][ok[ti]]
                m = zi.max()
                e = np.exp(zi - m)
                lse[bi, ti, ni] = m + np.log(e.sum())
                out[bi, ti, ni] = (e / e.sum()) @ v[bi, ok[ti], ni // gv]
    return out, lse


def loss_with_lse(attn_fn, q, k, v, kwargs):
    """A scalar that depends on out and lse with non-trivial weights (for gradient checks)."""
    out, lse = attn_fn(q, k, v, return_residuals=True, **kwargs)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
    lse_part = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * 0.25)
    return jnp.sum(out.astype(jnp.float32) * w) + lse_part


def lightning_oracle(
    q, k, v, decay, initial_state=None, segment_ids=None, scale=1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 NumPy lightning attention (decayed causal linear attention), token by token.

    q, k [B, T, N, H]; v [B, T, N, Hv]; decay [N] = lambda (not log); initial_state
    [B, N, H, Hv] or None (zeros); segment_ids [B, T] or None. Recurrence per (b, n):
    S_t = g_t * lambda * S_{t-1} + k_t^T v_t with g_t = 0 where seg_t != seg_{t-1} (t > 0) else 1;
    o_t = (scale * q_t) S_t. Token 0 always continues ``initial_state``.
    Returns (o [B, T, N, Hv], final_state [B, N, H, Hv]), both float64.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    lam = np.asarray(decay, np.float64)
    b, t, n, h = q.shape
    hv = v.shape[-1]
    s = (
        np.zeros((b, n, h, hv))
        if initial_state is None
        else np.array(initial_state, np.float64, copy=True)
    )
    seg = None if segment_ids is None else np.asarray(segment_ids)
    o = np.zeros((b, t, n, hv))
    for ti in range(t):
        keep = np.ones((b,))
        if seg is not None and ti > 0:
            keep = (seg[:, ti] == seg[:, ti - 1]).astype(np.float64)
        s = s * keep[:, None, None, None] * lam[None, :, None, None]
        s = s + np.einsum("bnh,bnv->bnhv", k[:, ti], v[:, ti])
        o[:, ti] = np.einsum("bnh,bnhv->bnv", q[:, ti] * scale, s)
    return o, s


FLOATS = ("f32[", "bf16[", "f16[", "f64[")


def check_sp_collectives(hlo: str, strategy: str) -> None:
    """No silent degradation of compiled sequence-parallel softmax attention (HLO text).

    The sharded path never all-gathers a float array (q, k, v, activations or their
    gradients); Ulysses shows its all-to-all, the ring strategies their collective-permute,
    and plain ring gathers nothing at all.
    """
    gathers = [
        line for line in hlo.splitlines()
        if "all-gather" in line and "=" in line and not line.lstrip().startswith("//")
    ]
    float_gathers = [g for g in gathers if any(t in g.split("=")[1][:80] for t in FLOATS)]
    assert not float_gathers, "the sharded path all-gathers activations:\n" + "\n".join(
        float_gathers[:3]
    )
    if strategy == "ulysses":
        assert "all-to-all" in hlo
    else:
        assert "collective-permute" in hlo
        if strategy == "ring":
            assert not gathers, "ring gathers something:\n" + "\n".join(gathers[:3])


def primitives_around_kernels(fn, *args) -> set[str]:
    """Names of the primitives ``fn(*args)`` traces to around its Pallas kernels: nested
    jaxprs (jit, custom VJPs) included, kernel bodies (``pallas_call``'s) not. For checks
    such as "no pad or slice where the head dims are the kernels' own"."""

    def walk(jaxpr) -> set[str]:
        names = set()
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            if eqn.primitive.name != "pallas_call":
                for sub in jaxprs_in_params(eqn.params):
                    names |= walk(sub)
        return names

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def assert_cache_chunks_match_full(attn, x, pos, cache,
                                   chunks=((0, 5), (5, 71), (71, 72), (72, 74))):
    """Feeds ``x`` [B, T, D] through an attention module's cache chunk by chunk (a prefill,
    a long chunk, single tokens): the outputs equal the full forward, the cache holds T.
    Returns the cache."""
    from flax import nnx

    @nnx.jit
    def step(attn, x, pos, cache):
        return attn(x, positions=pos, cache=cache)

    full, _ = step(attn, x, pos, None)
    outs = []
    for lo, hi in chunks:
        y, cache = step(attn, x[:, lo:hi], pos[:, lo:hi], cache)
        outs.append(y)
    np.testing.assert_array_equal(cache["length"], [x.shape[1]] * x.shape[0])
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4, rtol=1e-4)
    return cache


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a coordinator address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(commands: Sequence[Sequence[str]], *, cwd: Path, env: Mapping[str, str],
                  timeout: float) -> list[tuple[int, str]]:
    """Runs ``commands`` side by side (e.g. the processes of one multi-process program);
    returns each one's (return code, stdout and stderr together).

    Raises ``subprocess.TimeoutExpired`` when one runs past ``timeout`` seconds; a process
    still running then is killed, never left behind."""
    procs = [subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd in commands]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out) for p, out in zip(procs, outs, strict=True)]


def bad_input_test(cases: Sequence[tuple[str, Callable[[], Any], str]]) -> Callable[..., None]:
    """A ``test(call, match)`` over ``cases``, rows (id, call, match): each ``call()`` must raise
    ``ValueError`` whose message matches the regex ``match``. A test module assigns it to a
    ``test_`` name."""

    @pytest.mark.parametrize("call, match", [c[1:] for c in cases], ids=[c[0] for c in cases])
    def test_bad_input(call: Callable[[], Any], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            call()

    return test_bad_input
