"""Orbax checkpoints of a run: params, optimizer state, RNG, step and data cursor.

A step directory ``<dir>/<step>/`` holds two orbax items: ``state/`` (the arrays, an OCDBT
database with ``_METADATA`` and ``manifest.ocdbt``) and ``meta/metadata`` (JSON). Before orbax
reads a step, :func:`restore` checks that these files exist and parse and that every array's
bytes are on disk (the last byte of each stored value is read), so a damaged step is reported
in one line, :class:`DamagedCheckpointError`, instead of orbax's tensorstore traceback (whose
background reads also keep printing to stderr after it fails). Files that are complete but
corrupt (zeroed, bit flips) pass the check and fail inside orbax: that is caught and reported
the same way, though tensorstore may then still print "Event loop is closed" tracebacks.
Catching those too would mean decoding every array twice on each restore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A run's checkpoints cannot be restored (e.g. every one of them is damaged)."""


class DamagedCheckpointError(CheckpointError):
    """Checkpoint ``step`` at ``path`` cannot be restored; ``reason`` says what is wrong."""

    def __init__(self, step: int, path: Path, reason: str, advice: str = "") -> None:
        self.step, self.path, self.reason = step, path, reason
        super().__init__(f"checkpoint step {step} at {path} is damaged ({reason})"
                         + (f"; {advice}" if advice else ""))


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Restored:
    """What :func:`restore_newest_intact` returns: the newest intact checkpoint and the newer,
    damaged ones it skipped (newest first)."""

    state: Any
    meta: dict[str, Any]
    step: int
    damaged: tuple[DamagedCheckpointError, ...]


def manager(directory: str | Path, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the newest ``keep`` steps; saves run in the background
    (``async_save``) and a step becomes visible only once fully written, so a run killed
    mid-save restarts from the previous complete checkpoint."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
    )
    with _no_step_metadata_warning():
        return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves ``state`` (params, opt_state, rng: a pytree of arrays) and ``meta`` (JSON:
    step, data cursor, ...) as checkpoint ``step`` (steps completed)."""
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def step_path(mngr: ocp.CheckpointManager, step: int) -> Path:
    """The directory of checkpoint ``step`` (the manager names steps by their number)."""
    return Path(mngr.directory) / str(step)


def restore(
    mngr: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
) -> tuple[Any, dict[str, Any]] | None:
    """(state, meta) of checkpoint ``step`` (default: the latest), or None if there is none.

    ``abstract_state`` gives structure, shapes, dtypes and shardings
    (``jax.ShapeDtypeStruct`` leaves with ``sharding``). Nothing falls back to an older step
    here; :func:`restore_newest_intact` does.

    Raises:
      ValueError: ``step`` is not one of the manager's steps.
      DamagedCheckpointError: the step's files are missing, empty, truncated or unreadable,
        orbax fails to read it, or what it holds does not match ``abstract_state``.
    """
    step = mngr.latest_step() if step is None else step
    if step is None:
        return None
    if step not in mngr.all_steps():
        raise ValueError(f"no checkpoint step {step} in {mngr.directory}; it holds steps "
                         f"{sorted(mngr.all_steps())}")
    path = step_path(mngr, step)
    reason = _file_damage(path)
    if reason is None:
        try:
            out = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax and tensorstore raise many types; all mean unreadable
            reason = f"orbax cannot read it: {_one_line(e)}"
        else:
            reason = _mismatch(out["state"], out["meta"], abstract_state, step)
    if reason is not None:
        raise DamagedCheckpointError(step, path, reason)
    return out["state"], out["meta"]


def restore_newest_intact(mngr: ocp.CheckpointManager, abstract_state: Any) -> Restored | None:
    """The newest checkpoint that :func:`restore` reads without error, trying the steps from
    the newest down; None if there is no checkpoint at all.

    Raises:
      CheckpointError: there are checkpoints but every one is damaged (the message lists
        each step tried and what is wrong with it).

    Example:
      >>> restored = restore_newest_intact(manager("runs/t/checkpoints", keep=3), abstract)
    """
    damaged: list[DamagedCheckpointError] = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            state, meta = restore(mngr, abstract_state, step)
        except DamagedCheckpointError as e:
            damaged.append(e)
            continue
        return Restored(state=state, meta=meta, step=step, damaged=tuple(damaged))
    if damaged:
        tried = "; ".join(f"step {e.step}: {e.reason}" for e in damaged)
        raise CheckpointError(
            f"no intact checkpoint in {mngr.directory}, every step is damaged ({tried}); "
            "move them aside to start the run afresh, or restore a copy")
    return None


def set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> list[Path]:
    """Renames the directories of ``steps`` to ``<step>.damaged`` (``.damaged-1``, ... if
    taken), out of the manager's sight, so a resumed run can save those steps again; the
    files stay for inspection. Returns the new paths.

    Example:
      >>> set_aside(mngr, [e.step for e in restored.damaged])
    """
    moved = []
    for step in steps:
        src = step_path(mngr, step)
        dst, n = src.with_name(f"{step}.damaged"), 0
        while dst.exists():
            n += 1
            dst = src.with_name(f"{step}.damaged-{n}")
        src.rename(dst)
        moved.append(dst)
    with _no_step_metadata_warning():
        mngr.reload()
    return moved


@contextlib.contextmanager
def _no_step_metadata_warning() -> Iterator[None]:
    """Silences orbax's "Metadata file does not exist" warning while the manager lists the
    steps: an empty step directory triggers it, and :func:`restore` reports that step
    itself, in one line; a step missing only that file restores fine."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Metadata file does not exist")

    log = logging.getLogger("absl")
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


def _file_damage(path: Path) -> str | None:
    """What is wrong with the files of step directory ``path``, or None if nothing is found.

    Reads the two JSON files and, through tensorstore without orbax, the OCDBT index and the
    last byte of every stored value: cheap, and it catches missing, empty and truncated files.
    """
    if not path.is_dir() or not any(path.iterdir()):
        return "the step directory is empty"
    for item in ("state", "meta"):
        if not (path / item).is_dir():
            return f"{item}/ is missing"
    meta, why = _read_json(path / "meta" / "metadata")
    if why is not None:
        return why
    if not isinstance(meta, dict) or not isinstance(meta.get("data_cursor"), int):
        return "meta/metadata has no integer data_cursor"
    tree, why = _read_json(path / "state" / "_METADATA")
    if why is not None:
        return why
    if not isinstance(tree, dict) or not isinstance(tree.get("tree_metadata"), dict):
        return "state/_METADATA has no tree_metadata"
    if not tree.get("use_ocdbt", False):
        return None  # another layout: orbax's own read is the check
    return _ocdbt_damage(path / "state", tree)


def _read_json(path: Path) -> tuple[Any, str | None]:
    rel = f"{path.parent.name}/{path.name}"
    if not path.is_file():
        return None, f"{rel} is missing"
    try:
        return json.loads(path.read_text()), None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{rel} is unreadable: {_one_line(e)}"


def _ocdbt_damage(state_dir: Path, tree: dict[str, Any]) -> str | None:
    import tensorstore as ts

    if not (state_dir / "manifest.ocdbt").is_file():
        return "state/manifest.ocdbt is missing"
    try:
        kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state_dir}/"}).result()
        keys = sorted(k.decode() for k in kv.list().result())
    except Exception as e:  # tensorstore raises ValueError and others for a bad index
        return f"the array index in state/ is unreadable: {_one_line(e)}"
    suffix = "zarr.json" if tree.get("use_zarr3") else ".zarray"
    arrays = {k.rsplit("/", 1)[0] for k in keys if k.endswith("/" + suffix)}
    expected = sorted(".".join(str(part["key"]) for part in v["key_metadata"])
                      for v in tree["tree_metadata"].values()
                      if not v.get("value_metadata", {}).get("skip_deserialize", False))
    missing = [name for name in expected if name not in arrays]
    if missing:
        return f"array {missing[0]} is missing from state/{_more(len(missing), 'arrays')}"
    # Reading only the last byte of each value is enough to see a truncated data file. Every
    # future is waited for, so no read is left running after this returns.
    reads = [(k, kv.read(k, byte_range=slice(-1, None))) for k in keys]
    bad = []
    for k, fut in reads:
        try:
            res = fut.result()
            if res.state != "value":
                bad.append((k, f"its data is {res.state}"))
        except Exception as e:
            bad.append((k, _one_line(e)))
    if not bad:
        return None
    key, msg = bad[0]
    what = "truncated" if msg.startswith("OUT_OF_RANGE") else "unreadable"
    return (f"array file of {key.rsplit('/', 1)[0]} is {what}: {msg}"
            f"{_more(len(bad), 'values')}")


def _mismatch(state: Any, meta: Any, abstract_state: Any, step: int) -> str | None:
    """What a restored checkpoint gets wrong against the expected state, or None."""
    if not isinstance(meta, dict) or meta.get("step", step) != step:
        got = meta.get("step") if isinstance(meta, dict) else meta
        return f"meta/metadata says step {got}"
    want = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    got = jax.tree_util.tree_flatten_with_path(state)[0]
    if [p for p, _ in want] != [p for p, _ in got]:
        return (f"its state has {len(got)} arrays where the run has {len(want)} "
                "(a different tree)")
    for (p, w), (_, g) in zip(want, got, strict=True):
        if (tuple(g.shape), g.dtype) != (tuple(w.shape), w.dtype):
            return (f"array {jax.tree_util.keystr(p)} is {g.dtype}{list(g.shape)} where the "
                    f"run has {w.dtype}{list(w.shape)}")
    return None


def _more(n: int, what: str) -> str:
    return f" (and {n - 1} more {what})" if n > 1 else ""


def _one_line(e: BaseException) -> str:
    """The innermost cause of ``e`` on one line, without tensorstore's spec dump."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = " ".join(str(e).split()) or type(e).__name__
    return text.split(" [tensorstore_spec=")[0].split(" See full TensorStore")[0][:300]
