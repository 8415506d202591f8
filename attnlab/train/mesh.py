"""The device mesh of a run: a ``data`` axis for data parallelism and an ``sp`` axis for
sequence parallelism, and the model's sequence-parallel plan on it (:func:`model_parallel`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.common.static_args import check_int, is_int
from sharding.hybrid import HybridParallel

DATA, SEQ = "data", "sp"


def make_mesh(
    batch_size: int, *, data: int | None = None, sp: int = 1,
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """A ``("data", "sp")`` mesh over the first ``data * sp`` devices.

    Args:
      batch_size: global batch B; the data axis must divide it.
      data: data-parallel devices (None: the largest count <= the available devices that
        divides B).
      sp: sequence-parallel devices. With sp > 1 the batch is sharded ``P("data", "sp")``
        (:func:`batch_spec`) and the model attends across the ``sp`` axis with the plan of
        :func:`model_parallel`.
      devices: the devices to use (default ``jax.devices()``).

    Returns:
      A :class:`jax.sharding.Mesh` with axes ``("data", "sp")`` (Auto axis types).

    Raises:
      ValueError: more devices asked for than exist, B not divisible by ``data``, sp < 1.

    Example:
      >>> mesh = make_mesh(8, data=2, sp=4)   # 2 x 4 devices; batch 8 split in 2
    """
    devs = list(jax.devices() if devices is None else devices)
    batch_size = check_int("batch_size", batch_size)
    if not is_int(sp):
        raise ValueError(f"seq_parallel must be an int, got {sp!r} of type {type(sp).__name__}")
    if sp < 1:
        raise ValueError(f"seq_parallel={sp} must be at least 1")
    if data is not None:
        data = check_int("data_parallel", data, why="or None: as many as divide the batch")
    if data is None:  # the largest data axis that fits beside sp and divides B
        data = max(d for d in range(1, max(len(devs) // sp, 1) + 1) if batch_size % d == 0)
    if data * sp > len(devs):
        hint = ""
        if devs and devs[0].platform == "cpu":  # CPU devices can be simulated
            hint = (f", or simulate {data * sp} CPU devices by starting with XLA_FLAGS="
                    f"--xla_force_host_platform_device_count={data * sp} (set before JAX "
                    "starts)")
        raise ValueError(f"data_parallel={data} x seq_parallel={sp} needs {data * sp} devices "
                         f"but {len(devs)} are available; ask for fewer{hint}")
    if batch_size % data:
        raise ValueError(f"batch_size={batch_size} is not divisible by data_parallel={data}")
    return Mesh(np.array(devs[: data * sp]).reshape(data, sp), (DATA, SEQ))


def batch_spec(mesh: Mesh) -> P:
    """PartitionSpec of [B, T] batch arrays: B over ``data``; T over ``sp`` when it is > 1."""
    return P(DATA, SEQ) if mesh.shape[SEQ] > 1 else P(DATA)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """NamedSharding of [B, T] batch arrays on ``mesh``."""
    return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """NamedSharding that puts a full copy on every device of ``mesh`` (params, opt state)."""
    return NamedSharding(mesh, P())


def model_parallel(mesh: Mesh, strategy: str = "zigzag", impl: str = "auto"
                   ) -> HybridParallel | None:
    """The sequence-parallel plan a model is built with on a run's mesh (None when sp == 1).

    Args:
      mesh: a :func:`make_mesh` mesh.
      strategy: softmax layers' strategy (:data:`sharding.STRATEGIES`); lightning layers use
        LASP-2, and a future mechanism brings its own rule in ``sharding/``.
      impl: the per-block implementation (the model's ``attention_impl``).

    Returns:
      ``HybridParallel(mesh, seq_axis="sp", batch_axis="data", ...)``, or None when the
      ``sp`` axis has size 1 (the model then attends locally; data parallelism needs no plan).

    Example:
      >>> model = Transformer(cfg, rngs=nnx.Rngs(0), parallel=model_parallel(mesh, "ring"))
    """
    if mesh.shape[SEQ] == 1:
        return None
    return HybridParallel(mesh=mesh, seq_axis=SEQ, batch_axis=DATA, softmax_strategy=strategy,
                          impl=impl)
