"""Block phases (attnlab.ops.lightning.BlockPhases): the four steps LASP-2 runs per block
compose to the single-device op and its VJP, for the generic phases (the xla path) and the
Triton kernels' own (fused forward; interpreted on CPU, compiled on a GPU).

For a block entered by s_in with output cotangent do and outgoing-state cotangent ds_out:
summarize = the block's state from zero; forward = o of the op with initial_state s_in;
state_grad = the cotangent of s_in given (do, 0); backward = dq, dk, dv given (do, ds_out).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from attnlab.ops import lightning as L
from attnlab.testing import linear_tolerance
from pallas_kernels.gpu.lightning_common import LightningConfig
from tests.ops.lightning_base import LightningCase, assert_close_rel, recurrence
from tests.pallas_kernels.test_lightning_triton import FUSED_CPU_CONFIG


def check_phases(case: LightningCase, key, impl: str, config, *, own: bool,
                 dtype=jnp.float32) -> None:
    """Runs the phases of ``impl`` on one block and compares every output with the
    recurrence; ``own``: the implementation's own phases are expected (not the generic)."""
    q, k, v, decay, _, seg = case.inputs(key, dtype)
    ld, scale = jnp.log(jnp.asarray(decay)), case.h ** -0.5
    b, _, n, h = q.shape
    hv = v.shape[-1]
    ks = jax.random.split(jax.random.fold_in(key, 1), 3)
    s_in = jax.random.normal(ks[0], (b, n, h, hv), jnp.float32)
    do = jax.random.normal(ks[1], (*q.shape[:3], hv), jnp.float32).astype(q.dtype)
    ds_out = jax.random.normal(ks[2], (b, n, h, hv), jnp.float32)
    a = L.LightningArgs(ld, s_in, seg, scale, None, config)
    phases = L.block_phases(q, k, v, a, impl)

    @jax.jit
    def run(q, k, v, s_in, do, ds_out):
        state, aux = phases.summarize(k, v)
        o, res = phases.forward(q, k, v, s_in, aux)
        ds_in, res = phases.state_grad(res, do)
        return state, aux is not None, o, ds_in, phases.backward(res, ds_out)

    want = recurrence(decay, seg, scale)

    state, has_aux, o, ds_in, grads = run(q, k, v, s_in, do, ds_out)
    assert bool(has_aux) == own, "expected the kernel's own phases" if own else "generic"
    _, want_state = want(q, k, v, jnp.zeros_like(s_in))
    (want_o, _), vjp = jax.vjp(want, q, k, v, s_in)
    *want_grads, _ = vjp((do.astype(jnp.float32), ds_out))
    want_ds_in = vjp((do.astype(jnp.float32), jnp.zeros_like(ds_out)))[3]
    tol = linear_tolerance(dtype)
    assert_close_rel(state, want_state, tol.values, "summary state")
    assert_close_rel(o, want_o, tol.values, "o")
    assert_close_rel(ds_in, want_ds_in, tol.grads, "ds_in")
    for name, got, w in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
        assert got.dtype == q.dtype, name
        assert_close_rel(got, w, tol.grads, name)


# t = 40 with 16-token chunks: three chunks, the last ragged; three documents; N = 3 heads
# with lambda in {0.05, 0.9, 1.0}.
CASE = LightningCase("f32_segments_ragged", t=40, h=16, hv=32, b=2, segments=3,
                     decays=(0.05, 0.9, 1.0))


@pytest.mark.parametrize("segment_chunks", [1, 2, 0], ids=["3segments", "2+short", "1segment"])
def test_triton_phases_interpreted(segment_chunks, key):
    """The kernel's own phases: segment states for the summary, the final-state cotangent
    added inside the dq/dk/dv kernel (one segment per chunk; a whole segment and a short
    last one; one segment for the whole block)."""
    config = dataclasses.replace(FUSED_CPU_CONFIG, segment_chunks=segment_chunks)
    check_phases(CASE, key, "pallas_triton", config, own=True)


def test_triton_phases_interpreted_padded_head_dims(key):
    """H = 20, Hv = 40 (the kernels run at 32 and 64): every phase takes and returns the
    caller's head dims (summary state, o, the incoming state's cotangent, dq/dk/dv), the
    incoming state and the outgoing state's cotangent zero-padded inside."""
    config = dataclasses.replace(FUSED_CPU_CONFIG, segment_chunks=1)
    check_phases(dataclasses.replace(CASE, h=20, hv=40), key, "pallas_triton", config, own=True)


def test_generic_phases_xla(key):
    check_phases(CASE, key, "xla", None, own=False)


def test_two_phase_kernel_config_takes_generic_phases(key):
    """Without the fused forward the Triton kernel has no phases of its own."""
    case = dataclasses.replace(CASE, t=32, segments=0)
    check_phases(case, key, "pallas_triton", dataclasses.replace(FUSED_CPU_CONFIG,
                                                                 fused_forward=False),
                 own=False)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [2048, 4000], ids=["2K", "4000ragged"])
def test_triton_phases_gpu(t, key):
    """Compiled, default config (bf16, H = 128: fused forward, several segments)."""
    case = LightningCase("gpu_h128", t=t, decays=(0.3, 0.999, 1.0), h=128, hv=128, b=1,
                         segments=4 if t == 2048 else 0)
    check_phases(case, key, "pallas_triton", LightningConfig.get_default(128, jnp.bfloat16),
                 own=True, dtype=jnp.bfloat16)
