"""Lowering for a TPU from this CPU: abstract TPU meshes and what the lowered module holds.

Under ``jax.sharding.use_abstract_mesh`` of a mesh whose abstract device is a TPU,
``attnlab.ops.platform()`` reads "tpu", so the ops dispatch to the Mosaic kernels with
interpret mode off, and ``jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))`` runs
what interpret mode skips: Pallas's Mosaic lowering of every kernel (block shapes against the
(8, 128) tiling, every primitive in the kernel body, scalar prefetch, memory spaces) for the
generation the device kind names. Lowering does not compile: Mosaic's own passes (vector
layouts, VMEM allocation) run in libtpu when a TPU compiles the module, so a kernel that
lowers here can still be refused there.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

# Generation -> the device_kind a chip of it reports (jax.Device.device_kind), which Pallas
# maps to its chip version (jax._src.pallas.mosaic.tpu_info.chip_version_from_device_kind).
TPU_KINDS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}

COLLECTIVES = ("collective_permute", "all_to_all", "all_gather", "all_reduce", "reduce_scatter")


def tpu_mesh(device_kind: str, shape: tuple[int, ...] = (1,),
             names: tuple[str, ...] = ("x",)) -> AbstractMesh:
    """An abstract mesh of ``shape`` (Auto axes ``names``) of one-core TPUs of ``device_kind``."""
    device = AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    return AbstractMesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                        abstract_device=device)


def h100_mesh(device_kind: str = "NVIDIA H100 80GB HBM3") -> AbstractMesh:
    """A one-device abstract mesh of a Hopper GPU (``device_kind`` as an H100 reports it):
    under it the ops dispatch for a GPU with interpret mode off, for lowering for CUDA."""
    return AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind=device_kind, num_cores=132, platform="gpu"))


def lower_for_tpu(fn: Callable[..., Any], *args: Any, mesh: AbstractMesh) -> str:
    """The StableHLO text of ``jit(fn)(*args)`` traced under ``mesh`` and lowered for TPU."""
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


def kernels(text: str) -> collections.Counter[str]:
    """name= of each Mosaic kernel (``tpu_custom_call``) in a lowered module -> its count.

    Raises AssertionError if some ``tpu_custom_call`` has no kernel name.
    """
    names = collections.Counter(re.findall(r'kernel_name = "([^"]*)"', text))
    calls = text.count("stablehlo.custom_call @tpu_custom_call(")
    assert calls == sum(names.values()), f"{calls} tpu_custom_calls, named: {dict(names)}"
    return names


def custom_calls(text: str) -> collections.Counter[str]:
    """Target of each custom call in a lowered module -> its count."""
    return collections.Counter(re.findall(r"stablehlo\.custom_call @(\w+)\(", text))


def collectives(text: str) -> collections.Counter[str]:
    """StableHLO collective (``COLLECTIVES``) -> its count in a lowered module."""
    return collections.Counter(
        re.findall(r"stablehlo\.(" + "|".join(COLLECTIVES) + r")\b", text)
    )
