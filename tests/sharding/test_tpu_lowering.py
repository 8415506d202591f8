"""Sequence parallelism lowered for a slice of 8 TPUs from this CPU, with the Mosaic kernels
per block: ``sharding.attention`` (ring, striped, zigzag, Ulysses), Star Attention (context
and query phases), LASP and LASP-2, forward and gradient.

The programs are traced under an abstract mesh of 8 TPUs (see ``tests/lowering.py``) and
lowered for TPU: each module must hold the per-block kernels (``tpu_custom_call``) and the
strategy's collectives. The CPU tests (``test_sp_attention.py`` etc.) check the values with
the XLA blocks; here nothing runs. Kernel counts are not pinned: the ring loops and their
branches decide how often a kernel appears in the text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest

import sharding
from attnlab import ops
from tests.lowering import TPU_KINDS, collectives, kernels, lower_for_tpu, tpu_mesh

FLASH_FWD = {"attnlab_tpu_flash_fwd"}
FLASH_GRAD = FLASH_FWD | {"attnlab_tpu_flash_dq", "attnlab_tpu_flash_dkv"}
LIGHTNING_FWD = {"lightning_tpu_fwd"}
LIGHTNING_GRAD = LIGHTNING_FWD | {"lightning_tpu_bwd"}

# What each strategy communicates: K/V around the ring (collective-permute); striped also
# re-lays out tokens (all-to-all), zigzag by half-block permutes; Ulysses swaps sequence for
# heads (all-to-all); Star's context phase broadcasts the anchor block (a psum: all-reduce),
# its query phase gathers the partial outputs; LASP passes states around the ring, LASP-2
# gathers them once.
SOFTMAX_COLLECTIVES = {
    "ring": {"collective_permute"},
    "striped": {"collective_permute", "all_to_all"},
    "zigzag": {"collective_permute"},
    "ulysses": {"all_to_all"},
}

# (kind, mesh shape, axis names, batch axis): every generation on an 8-way sequence axis,
# and one data x sequence mesh.
MESHES = [
    *(pytest.param(kind, (8,), ("sp",), None, id=f"{gen}-sp8") for gen, kind in TPU_KINDS.items()),
    pytest.param(TPU_KINDS["v6e"], (2, 4), ("data", "sp"), "data", id="v6e-data2-sp4"),
]
# 8K tokens (1K per device on the 8-way axis), GQA 16 over 4 kv heads, H = 128, bfloat16.
B, T, N, K, H = 2, 8192, 16, 4, 128


def sds(*shape: int, dtype: Any = jnp.bfloat16) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype)


def grad_program(fwd: Callable[..., Any]) -> Callable[..., Any]:
    def loss(q, k, v):
        return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(fwd(q, k, v)))

    return jax.grad(loss, argnums=(0, 1, 2))


def assert_lowers(fn: Callable[..., Any], args: tuple[Any, ...], mesh: Any,
                  expected_kernels: set[str], expected_collectives: set[str],
                  xla_matmuls: bool = False) -> None:
    """``fn(*args)`` lowers for ``mesh``'s TPUs with exactly the ``expected_kernels`` (by name)
    and at least the ``expected_collectives``; no XLA matmul unless ``xla_matmuls``."""
    text = lower_for_tpu(fn, *args, mesh=mesh)
    assert set(kernels(text)) == expected_kernels
    assert expected_collectives <= set(collectives(text)), dict(collectives(text))
    if not xla_matmuls:
        assert "stablehlo.dot_general" not in text, "an XLA matmul: some block fell back"


@pytest.mark.parametrize("kind, shape, names, batch_axis", MESHES)
@pytest.mark.parametrize("strategy", sharding.STRATEGIES)
def test_softmax_strategies(strategy, kind, shape, names, batch_axis):
    """Causal attention by each strategy, pallas_tpu blocks, forward and gradient."""
    mesh = tpu_mesh(kind, shape, names)

    def fwd(q, k, v):
        return sharding.attention(q, k, v, mesh=mesh, strategy=strategy, batch_axis=batch_axis,
                                  is_causal=True, impl="pallas_tpu")

    args = (sds(B, T, N, H), sds(B, T, K, H), sds(B, T, K, H))
    expected = SOFTMAX_COLLECTIVES[strategy]
    assert_lowers(fwd, args, mesh, FLASH_FWD, expected)
    assert_lowers(grad_program(fwd), args, mesh, FLASH_GRAD, expected)


@pytest.mark.parametrize("kind, shape, names, batch_axis", MESHES)
def test_star_attention(kind, shape, names, batch_axis):
    """Star Attention: the context phase (anchor broadcast) with its gradient, and a query
    block over the sharded cache."""
    mesh = tpu_mesh(kind, shape, names)
    q, kv = sds(B, T, N, H), sds(B, T, K, H)

    def context(q, k, v):
        return sharding.star_attention(q, k, v, mesh=mesh, batch_axis=batch_axis,
                                       impl="pallas_tpu")

    def query(q, k, v):
        return sharding.star_query(q, k, v, mesh=mesh, batch_axis=batch_axis,
                                   impl="pallas_tpu")

    assert_lowers(context, (q, kv, kv), mesh, FLASH_FWD, {"all_reduce"})
    assert_lowers(grad_program(context), (q, kv, kv), mesh, FLASH_GRAD, {"all_reduce"})
    assert_lowers(query, (sds(B, 256, N, H), kv, kv), mesh, FLASH_FWD, {"all_gather"})


@pytest.mark.parametrize("kind, shape, names, batch_axis", MESHES)
@pytest.mark.parametrize("name, collective", [("lasp", "collective_permute"),
                                              ("lasp2", "all_gather")])
def test_lasp(name, collective, kind, shape, names, batch_axis):
    """LASP (state ring) and LASP-2 (one all-gather) over the TPU lightning kernels. Each
    block's state summary K^T V is an XLA matmul (the generic block phases), so XLA matmuls
    are expected here."""
    mesh = tpu_mesh(kind, shape, names)
    fn = {"lasp": sharding.lasp_attention, "lasp2": sharding.lasp2_attention}[name]

    def fwd(q, k, v):
        return fn(q, k, v, decay=ops.minimax_decay(N, 0, 4), mesh=mesh, batch_axis=batch_axis,
                  impl="pallas_tpu")

    args = (sds(B, T, N, H),) * 3
    assert_lowers(fwd, args, mesh, LIGHTNING_FWD, {collective}, xla_matmuls=True)
    assert_lowers(grad_program(fwd), args, mesh, LIGHTNING_GRAD, {collective}, xla_matmuls=True)


def test_auto_blocks_are_the_kernels_on_tpu():
    """impl="auto" (the default) on a TPU mesh runs the Mosaic kernels per ring block, and
    shard_map's vma check is off for them (``default_check_vma``)."""
    mesh = tpu_mesh(TPU_KINDS["v5e"], (8,), ("sp",))
    with jax.sharding.use_abstract_mesh(mesh):
        assert not sharding.default_check_vma("auto")

    def fwd(q, k, v):
        return sharding.attention(q, k, v, mesh=mesh, strategy="zigzag", is_causal=True)

    args = (sds(B, T, N, H), sds(B, T, K, H), sds(B, T, K, H))
    assert_lowers(grad_program(fwd), args, mesh, FLASH_GRAD, {"collective_permute"})
