"""Orbax checkpoints of a run: params, optimizer state, RNG, step and data cursor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


def manager(directory: str | Path, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the newest ``keep`` steps; saves run in the background
    (``async_save``) and a step becomes visible only once fully written, so a run killed
    mid-save restarts from the previous complete checkpoint."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves ``state`` (params, opt_state, rng: a pytree of arrays) and ``meta`` (JSON:
    step, data cursor, ...) as checkpoint ``step`` (steps completed)."""
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(
    mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
) -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of checkpoint ``step`` (default: the latest), or None if there is none.

    ``abstract_state`` gives structure, shapes, dtypes and shardings
    (``jax.ShapeDtypeStruct`` leaves with ``sharding``).
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]
