"""``attnlab.ops.platform()``: the default backend, or the platform of the active abstract mesh's
device (how a program is lowered for a TPU from CPU); the kernels' interpret arguments and
``impl="auto"`` follow it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from attnlab.ops import auto_choice, platform
from attnlab.ops.backends import tpu_interpret, triton_interpret
from tests.lowering import TPU_KINDS, tpu_mesh


def test_platform_is_the_default_backend_without_an_abstract_device():
    assert platform() == jax.default_backend() == "cpu"
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",))):  # no device named
        assert platform() == "cpu"
    # A concrete mesh names its own (CPU) devices.
    with jax.set_mesh(jax.make_mesh((2,), ("x",))):
        assert platform() == "cpu"
    assert tpu_interpret() and triton_interpret()


@pytest.mark.parametrize("kind", TPU_KINDS.values())
def test_abstract_tpu_mesh_reads_tpu_and_turns_interpret_off(kind):
    with jax.sharding.use_abstract_mesh(tpu_mesh(kind)):
        assert platform() == "tpu"
        assert tpu_interpret() is False
        x = jax.ShapeDtypeStruct((1, 1024, 8, 128), jnp.bfloat16)
        assert auto_choice(x, x, x, is_causal=True) == "pallas_tpu"
    assert platform() == "cpu"  # restored on exit


# ids spelled out: a bare "gpu" id would read as the gpu marker and skip the case on CPU.
@pytest.mark.parametrize("device_platform", ["gpu", "cuda", "rocm"], ids=lambda p: f"as-{p}")
def test_abstract_gpu_mesh_reads_gpu(device_platform):
    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                            platform=device_platform)
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device)):
        assert platform() == "gpu"
        assert triton_interpret() is False
