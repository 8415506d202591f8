"""The device mesh of a run: a ``data`` axis for data parallelism and an ``sp`` axis for
sequence parallelism (size 1 until ``sharding/``'s attention is wired into the model)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
      sp: sequence-parallel devices. Only 1 is supported until sequence-parallel attention
        from ``sharding/`` is connected (the hook is :func:`batch_spec`: with sp > 1 the
        batch is sharded ``P("data", "sp")`` and the model must attend across the ``sp``
        axis with a ring/LASP function instead of a local one).

    Returns:
      A :class:`jax.sharding.Mesh` with axes ``("data", "sp")``.

    Raises:
      ValueError: more devices asked for than exist, B not divisible by ``data``, sp != 1.
    """
    devs = list(jax.devices() if devices is None else devices)
    if sp != 1:
        raise ValueError(
            f"seq_parallel={sp}: sequence-parallel training is not wired into the model yet "
            "(it comes with sharding/ ring and LASP attention); use seq_parallel=1"
        )
    if data is None:
        data = max(d for d in range(1, len(devs) + 1) if batch_size % d == 0)
    if data * sp > len(devs):
        raise ValueError(f"data_parallel={data} x seq_parallel={sp} needs {data * sp} devices "
                         f"but {len(devs)} are available; ask for fewer")
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
