"""Backend adapters: one module per (op, backend), each defining ``IMPLEMENTATION``.

``<op>_<backend>.py`` binds one backend (pure-JAX XLA code, cuDNN through ``jax.nn``, a
Pallas kernel from ``pallas_kernels``) to one op of :mod:`attnlab.ops`: its forward, its
optional backward and block phases, what it cannot compute (``unsupported``) and its config
class. The op's module lists its adapters in its one ``Registry(...)`` statement; see
``attnlab/ops/README.md``.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental.pallas import tpu as pltpu

from attnlab.ops._registry import platform


def triton_interpret() -> bool:
    """The Triton-lowered kernels' ``interpret`` argument: Pallas interpret mode on CPU."""
    return platform() == "cpu"


def tpu_interpret() -> Any:
    """The Mosaic TPU kernels' ``interpret`` argument: TPU interpret mode on CPU; False (Mosaic)
    on a TPU and under an abstract TPU mesh, where the program is lowered for a TPU from any
    machine (see :func:`attnlab.ops.platform`)."""
    return pltpu.InterpretParams() if platform() == "cpu" else False


def mosaic_gpu_interpret() -> Any:
    """The Mosaic GPU kernels' ``interpret`` argument: JAX's Mosaic GPU interpreter on CPU;
    None (compiled by Mosaic GPU) on a GPU and under an abstract GPU mesh, where the program
    is lowered for a GPU from any machine (see :func:`attnlab.ops.platform`)."""
    from pallas_kernels.gpu.mgpu_common import interpret_params

    return interpret_params() if platform() == "cpu" else None


def head_dims_over(name: str, q: Any, v: Any, limit: int) -> str | None:
    """The refusal of a kernel ``name`` that takes head dims up to ``limit``, or None."""
    h, hv = q.shape[-1], v.shape[-1]
    if max(h, hv) > limit:
        return f"{name} takes head dims up to {limit}, got q/k {h} and v {hv}; use impl='xla'"
    return None


# Device kinds (jax.Device.device_kind) of sm_90 chips, for abstract meshes that name no
# compute capability.
_HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")


def not_hopper(name: str, plat: str) -> str | None:
    """None if the GPU the program is for is a Hopper (sm_90: wgmma, TMA), else why the Mosaic
    GPU kernel ``name`` cannot run there."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is not None:
        kind = device.device_kind
        ok = any(h in kind for h in _HOPPER_KINDS)
    else:
        try:
            dev = jax.devices(plat)[0]
        except RuntimeError:  # explain(..., plat="gpu") on a machine without one: no device
            return None  # to judge; the kind is checked where the program is traced for it
        kind = dev.device_kind
        ok = str(getattr(dev, "compute_capability", "")).startswith("9")
    if not ok:
        return (f"{name} needs a Hopper GPU (sm_90: wgmma, TMA), got {kind}; use "
                "impl='pallas_triton'")
    return None
