"""LASP (state ring) and LASP-2 (one all-gather) on 8 simulated CPU devices: values and
gradients equal the single-device op; LASP-2's HLO has one all-gather forward and one
backward, of a size that does not depend on the sequence length; two local processes."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from attnlab.ops import lightning as L
from sharding.lasp import lasp_attention
from sharding.lasp2 import lasp2_attention
from tests.helpers import free_port, run_processes
from tests.pallas_kernels.test_lightning_triton import FUSED_CPU_CONFIG

ALGOS = {"lasp": lasp_attention, "lasp2": lasp2_attention}
# Sharded and single-device runs use the same xla path in float32; only the order of the
# state sums differs.
REL_TOL = 2e-5
ROOT = Path(__file__).resolve().parents[2]


def _close(got, want, rtol, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:.0e} * {scale:.3g}"


def _inputs(key, b=2, t=64, n=2, h=16, p=8):
    ks = jax.random.split(key, 5)
    q, k, v = (jax.random.normal(kk, (b, t, n, h)) for kk in ks[:3])
    s0 = jax.random.normal(ks[3], (b, n, h, h))
    seg = jnp.sort(jax.random.randint(ks[4], (b, t), 0, 5), axis=1)
    # Row 0: a document starts exactly at a shard boundary; row 1: one spans several shards.
    tl = t // p
    seg = seg.at[0].set(jnp.where(jnp.arange(t) >= 3 * tl, 7, 2))
    return q, k, v, s0, seg.astype(jnp.int32), L.minimax_decay(n, 1, 4)


def _loss_fn(fn):
    def loss(q, k, v, s0):
        o, s = fn(q, k, v, s0)
        wo = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape))
        ws = jnp.sin(jnp.arange(s.size, dtype=jnp.float32).reshape(s.shape))
        return jnp.sum(o * wo) + jnp.sum(s * ws), (o, s)

    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)


@pytest.mark.parametrize("mesh_shape", [(8,), (2, 4)], ids=["sp8", "dp2xsp4"])
@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_sharded_equals_single_device(algo, mesh_shape, key):
    if len(mesh_shape) == 1:
        mesh = jax.make_mesh(mesh_shape, ("sp",), axis_types=(AxisType.Explicit,))
        extra = {}
    else:
        mesh = jax.make_mesh(mesh_shape, ("dp", "sp"), axis_types=(AxisType.Auto,) * 2)
        extra = {"batch_axis": "dp"}
    q, k, v, s0, seg, decay = _inputs(key, p=mesh.shape["sp"])
    kw = dict(decay=decay, segment_ids=seg, return_state=True)

    def single(q, k, v, s0):
        return L.lightning_attention(q, k, v, initial_state=s0, impl="xla", chunk_size=4, **kw)

    def sharded(q, k, v, s0):
        return ALGOS[algo](q, k, v, mesh=mesh, initial_state=s0, chunk_size=4, **kw, **extra)

    (_, (wo, ws)), wg = jax.jit(_loss_fn(single))(q, k, v, s0)
    with jax.set_mesh(mesh):
        (_, (o, s)), g = jax.jit(_loss_fn(sharded))(q, k, v, s0)
    _close(o, wo, REL_TOL, "o")
    _close(s, ws, REL_TOL, "final state")
    for name, a, b in zip(("dq", "dk", "dv", "dstate"), g, wg):
        _close(a, b, REL_TOL, name)


@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_data_axis_without_initial_state(algo, key):
    """(dp=2, sp=4) with no initial state: the zero start must vary over the data axis too
    (shard_map's varying-axes check refused LASP's ring carry before)."""
    mesh = jax.make_mesh((2, 4), ("dp", "sp"), axis_types=(AxisType.Auto,) * 2)
    q, k, v, s0, seg, decay = _inputs(key, p=4)
    kw = dict(decay=decay, segment_ids=seg, return_state=True, chunk_size=4)

    def single(q, k, v, s0):
        return L.lightning_attention(q, k, v, impl="xla", **kw)

    def sharded(q, k, v, s0):
        return ALGOS[algo](q, k, v, mesh=mesh, batch_axis="dp", **kw)

    (_, (wo, ws)), wg = jax.jit(_loss_fn(single))(q, k, v, s0)
    with jax.set_mesh(mesh):
        (_, (o, s)), g = jax.jit(_loss_fn(sharded))(q, k, v, s0)
    _close(o, wo, REL_TOL, "o")
    _close(s, ws, REL_TOL, "final state")
    for name, a, b in zip(("dq", "dk", "dv"), g[:3], wg[:3]):
        _close(a, b, REL_TOL, name)


@pytest.mark.parametrize("algo, h", [("lasp", 16), ("lasp2", 16), ("lasp2", 20)],
                         ids=["lasp", "lasp2", "lasp2-h20"])
def test_over_the_triton_kernels(algo, h, key):
    """LASP and LASP-2 over the Triton kernels (interpreted; shard_map without check_vma, as
    on a GPU) with the fused forward, where LASP-2 runs the kernel's own block phases (the
    summaries from its segment states, the outgoing states' cotangents added in its dq/dk/dv
    kernel): values and gradients, including the initial and final states' (whose
    cotangents shard_map splits and sums over the devices without check_vma), equal the
    single-device xla op; segment ids, 32-token blocks of two segments each. H = Hv = 20:
    the kernels run at 32, the phases pad and slice, the exchanged states stay [.., 20, 20]."""
    config = dataclasses.replace(FUSED_CPU_CONFIG, segment_chunks=1)
    mesh = jax.make_mesh((4,), ("sp",), axis_types=(AxisType.Explicit,))
    q, k, v, s0, seg, decay = _inputs(key, b=2, t=128, n=2, h=h, p=4)
    kw = dict(decay=decay, segment_ids=seg, return_state=True)
    block = L.LightningArgs(jnp.log(decay), s0, seg[:, :32], 1.0, None, config)
    _, aux = L.block_phases(q[:, :32], k, v, block, "pallas_triton").summarize(k[:, :32],
                                                                              v[:, :32])
    assert aux is not None  # the kernel's own phases (the generic summary has no aux)

    def single(q, k, v, s0):
        return L.lightning_attention(q, k, v, initial_state=s0, impl="xla", chunk_size=4, **kw)

    def sharded(q, k, v, s0):
        return ALGOS[algo](q, k, v, mesh=mesh, initial_state=s0, impl="pallas_triton",
                           config=config, **kw)

    (_, (wo, ws)), wg = jax.jit(_loss_fn(single))(q, k, v, s0)
    with jax.set_mesh(mesh):
        (_, (o, s)), g = jax.jit(_loss_fn(sharded))(q, k, v, s0)
    _close(o, wo, 5e-5, "o")
    _close(s, ws, 5e-5, "final state")
    for name, a, b in zip(("dq", "dk", "dv", "dstate"), g, wg):
        _close(a, b, 5e-5, name)


def _all_gathers(hlo: str) -> list[str]:
    """Shapes of the all-gather ops (sync or async start) in compiled HLO text."""
    return re.findall(r"= (\w+\[[\d,]*\])\S* all-gather(?:-start)?\(", hlo)


@pytest.mark.parametrize("segments", [False, True], ids=["plain", "segments"])
def test_lasp2_one_all_gather_each_way_of_constant_size(segments, key):
    mesh = jax.make_mesh((8,), ("sp",), axis_types=(AxisType.Auto,))
    found = {}
    for t in (64, 128):
        q, k, v, _, seg, decay = _inputs(key, b=1, t=t, n=2, h=16)
        kw = dict(decay=decay, mesh=mesh, segment_ids=seg if segments else None)
        fwd = jax.jit(lambda q, k, v: lasp2_attention(q, k, v, **kw))  # noqa: B023
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(lasp2_attention(q, k, v, **kw) ** 2),  # noqa: B023
                                argnums=(0, 1, 2)))
        f = _all_gathers(fwd.lower(q, k, v).compile().as_text()) if t == 64 else None
        found[t] = (f, _all_gathers(grad.lower(q, k, v).compile().as_text()))
    assert len(found[64][0]) == 1, found  # forward: the memory states
    for t, (_, g) in found.items():
        assert len(g) == 2, (t, g)  # forward + backward (the state gradients)
    assert found[64][1] == found[128][1]  # gathered sizes do not depend on the sequence length
    state_shape = "f32[8,1,2,16,16]"  # [P, B, N, H, Hv]
    if segments:  # carry and first/last document ids ride along: [P, B, N, H*Hv + 3]
        assert found[64][0][0] == "f32[8,1,2,259]" and state_shape in found[64][1]
    else:
        assert found[64][0] == [state_shape] and found[64][1] == [state_shape] * 2


def test_lasp2_over_the_kernels_one_all_gather_each_way(key):
    """The GPU path (Triton kernels, interpreted here; shard_map without check_vma): still one
    all-gather forward and one backward, the final state's cotangent shares riding in the
    backward one beside the incoming-state cotangents."""
    config = FUSED_CPU_CONFIG
    mesh = jax.make_mesh((4,), ("sp",), axis_types=(AxisType.Auto,))
    q, k, v, _, _, decay = _inputs(key, b=1, t=64, n=2, h=16, p=4)
    kw = dict(decay=decay, mesh=mesh, impl="pallas_triton", config=config, return_state=True)

    def loss(q, k, v):
        o, s = lasp2_attention(q, k, v, **kw)
        return jnp.sum(o ** 2) + jnp.sum(s)

    fwd = _all_gathers(jax.jit(lambda q, k, v: lasp2_attention(q, k, v, **kw)).lower(
        q, k, v).compile().as_text())
    both = _all_gathers(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
        q, k, v).compile().as_text())
    assert fwd == ["f32[4,1,2,16,16]"], fwd
    assert sorted(both) == ["f32[4,1,2,16,16]", "f32[4,2,1,2,16,16]"], both


def test_lasp_is_a_ring_of_permutes(key):
    mesh = jax.make_mesh((8,), ("sp",), axis_types=(AxisType.Auto,))
    q, k, v, _, _, decay = _inputs(key, b=1, t=64)
    hlo = jax.jit(lambda q, k, v: lasp_attention(q, k, v, decay=decay, mesh=mesh)).lower(
        q, k, v).compile().as_text()
    assert not _all_gathers(hlo)
    assert re.search(r"collective-permute", hlo)


def test_bad_inputs(key):
    mesh = jax.make_mesh((8,), ("sp",), axis_types=(AxisType.Auto,))
    q, k, v, _, _, decay = _inputs(key, b=1, t=64)
    with pytest.raises(ValueError, match="sequence length T=60 is not divisible by the 'sp'"):
        lasp2_attention(q[:, :60], k[:, :60], v[:, :60], decay=decay, mesh=mesh)
    with pytest.raises(ValueError, match="seq_axis='cp' is not an axis of the mesh"):
        lasp_attention(q, k, v, decay=decay, mesh=mesh, seq_axis="cp")
    with pytest.raises(ValueError, match=r"decay must have shape \[N\]"):
        lasp2_attention(q, k, v, decay=[0.5], mesh=mesh)


_TWO_PROCESS = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from attnlab.ops import lightning as L
from sharding.lasp import lasp_attention
from sharding.lasp2 import lasp2_attention

assert jax.device_count() == 8 and jax.local_device_count() == 4
rng = np.random.default_rng(0)  # the same host arrays in both processes
b, t, n, h = 2, 64, 2, 16
q, k, v = (rng.standard_normal((b, t, n, h)).astype(np.float32) for _ in range(3))
seg = np.sort(rng.integers(0, 5, (b, t)), axis=1).astype(np.int32)
decay = L.minimax_decay(n, 1, 4)
want, want_s = L.reference(q, k, v, decay=decay, segment_ids=seg, return_state=True)
mesh = jax.make_mesh((8,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,))

def put(x, spec):
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

args = [put(x, P(None, "sp")) for x in (q, k, v)]
seg_g = put(seg, P(None, "sp"))


def check(got, want):  # float32, errors relative to the largest value
    want = np.asarray(want)
    tol = 5e-5 * max(1.0, float(np.abs(want).max()))
    for shard in got.addressable_shards:
        np.testing.assert_allclose(shard.data, want[shard.index], atol=tol, rtol=0)


def loss(fn, q, k, v, seg):
    o, s = fn(q, k, v, seg)
    return jnp.sum(o * jnp.cos(o)) + jnp.sum(s * jnp.sin(s))


ref = lambda q, k, v, seg: L.reference(q, k, v, decay=decay, segment_ids=seg, return_state=True)
want_g = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v, seg)
for algo in (lasp_attention, lasp2_attention):
    fn = lambda q, k, v, seg: algo(q, k, v, decay=decay, mesh=mesh, return_state=True,
                                   segment_ids=seg)
    o, s = jax.jit(fn)(*args, seg_g)
    check(o, want)
    check(s, want_s)
    grads = jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(*args, seg_g)
    for g, w in zip(grads, want_g):
        check(g, w)
print("OK", jax.process_index())
"""


@pytest.mark.slow
def test_two_local_processes(tmp_path):
    script = tmp_path / "lasp_two_process.py"
    script.write_text(textwrap.dedent(_TWO_PROCESS))
    addr = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    results = run_processes([[sys.executable, str(script), addr, str(i)] for i in range(2)],
                            cwd=ROOT, env=env, timeout=300)
    for i, (returncode, out) in enumerate(results):
        assert returncode == 0, out[-3000:]
        assert f"OK {i}" in out, out[-3000:]
