"""A damaged newest checkpoint: the restart names it in one warning line (step, path, what is
wrong), keeps it aside as ``<step>.damaged`` and resumes from the newest intact one, bit-exactly;
with no intact checkpoint it stops with one line listing every step tried."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest

from attnlab.nn import Config
from attnlab.train import TrainConfig, load_run, read_metrics, train
from attnlab.train import checkpoint as ckpt_lib
from attnlab.train.trainer import to_numpy

MICRO = Config(d_model=32, num_layers=2, num_heads=2, max_seq_len=64)
TRAINER_LOG = "attnlab.train.trainer"


def _tc(seed: int) -> TrainConfig:
    # Checkpoints at steps 2, 4 and 6, all three kept.
    return TrainConfig(steps=6, batch_size=4, seq_len=32, warmup_steps=1, seed=seed,
                       checkpoint_every=2, keep=3, log_every=1, task="mqar",
                       task_options={"num_kv_pairs": 4}, dtype="float32", data_parallel=1,
                       eval_batches=0, fast_compile=True)


def _largest(files: list[Path]) -> Path:
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def truncate_array_data(step: Path) -> None:
    """Halves the largest array data file (OCDBT values of the largest arrays)."""
    _truncate(_largest([p for p in (step / "state").rglob("ocdbt.process_*/d/*")]))


def truncate_array_index(step: Path) -> None:
    """Halves the root OCDBT B-tree node file (the index of the arrays)."""
    _truncate(_largest(list((step / "state" / "d").iterdir())))


def zero_array_data(step: Path) -> None:
    """Overwrites the largest array data file with zeros (same size: only orbax's read sees
    it, so this exercises the fallback around orbax itself)."""
    path = _largest([p for p in (step / "state").rglob("ocdbt.process_*/d/*")])
    path.write_bytes(bytes(path.stat().st_size))


def empty_directory(step: Path) -> None:
    shutil.rmtree(step)
    step.mkdir()


def truncate_meta(step: Path) -> None:
    _truncate(step / "meta" / "metadata")


def meta_of_step_4(step: Path) -> None:
    """Step 4's meta/metadata in step 6 (a mix-up: resuming would redo steps 5 and 6 from
    step 6's parameters)."""
    shutil.copy(step.parent / "4" / "meta" / "metadata", step / "meta" / "metadata")


def delete_file(rel: str) -> Callable[[Path], None]:
    def delete(step: Path) -> None:
        (step / rel).unlink()

    delete.__name__ = f"delete {rel}"
    return delete


# (damage, what the message says is wrong: a regex).
DAMAGES = [
    (truncate_array_data,
     r"array file of (params|opt_state)\.\S+ is truncated: OUT_OF_RANGE: .*not valid for "
     r"value of size \d+( \(and \d+ more values\))?"),
    (truncate_array_index,
     r"the array index in state/ is unreadable: OUT_OF_RANGE: .*/state/d/\w+\": Requested "
     r"byte range .* is not valid for value of size \d+"),
    (delete_file("state/manifest.ocdbt"), re.escape("state/manifest.ocdbt is missing")),
    (delete_file("state/_METADATA"), re.escape("state/_METADATA is missing")),
    (delete_file("meta/metadata"), re.escape("meta/metadata is missing")),
    (empty_directory, re.escape("the step directory is empty")),
    (truncate_meta, r"meta/metadata is unreadable: .*"),
    (meta_of_step_4, re.escape("meta/metadata says step 4")),
    (zero_array_data, r"orbax cannot read it: .*ZSTD_decompressStream\(\) failed.*"),
]
DAMAGE_IDS = [d.__name__.replace("_", " ") for d, _ in DAMAGES]


@pytest.fixture(scope="module")
def seed() -> int:
    return zlib.crc32(__name__.encode()) % 2**30


@pytest.fixture(scope="module")
def intact_run(tmp_path_factory: pytest.TempPathFactory, seed: int) -> Path:
    """An uninterrupted run of 6 steps with checkpoints 2, 4 and 6 (copied per test)."""
    out = tmp_path_factory.mktemp("intact")
    train(MICRO, _tc(seed), out, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4", "6"]
    return out


def _copy(intact_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(intact_run, run)
    return run


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def _params(run: Path, step: int | None = None) -> dict:
    from flax import nnx

    return to_numpy(nnx.to_pure_dict(nnx.state(load_run(run, step=step).model, nnx.Param)))


def _assert_trees_equal(a: object, b: object) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize(("damage", "reason"), DAMAGES, ids=DAMAGE_IDS)
def test_damaged_newest_checkpoint_falls_back_to_previous(
    damage: Callable[[Path], None], reason: str, intact_run: Path, seed: int, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = _copy(intact_run, tmp_path)
    ckpts = run / "checkpoints"
    damage(ckpts / "6")

    # Catch the state the trainer resumes with, and read checkpoint 4 of the intact run with
    # the same abstract state, to compare the two.
    seen = {}
    real = ckpt_lib.restore_newest_intact

    def spy(mngr: object, abstract_state: object) -> ckpt_lib.Restored | None:
        restored = real(mngr, abstract_state)
        ref = ckpt_lib.manager(intact_run / "checkpoints", keep=3, async_save=False)
        with contextlib.closing(ref):
            want = ckpt_lib.restore(ref, abstract_state, 4)
        # Copies now: the train step donates the restored buffers.
        seen.update(step=restored.step, meta=restored.meta, state=to_numpy(restored.state),
                    want=to_numpy(want[0]), want_meta=want[1])
        return restored

    monkeypatch.setattr(ckpt_lib, "restore_newest_intact", spy)
    with caplog.at_level(logging.WARNING, logger=TRAINER_LOG):
        res = train(MICRO, _tc(seed), run, progress=False)

    # One warning line: the damaged step, its path, what is wrong, the step resumed from.
    lines = [r.getMessage() for r in caplog.records if r.name == TRAINER_LOG]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    prefix = f"checkpoint step 6 at {ckpts / '6'} is damaged ("
    suffix = f"); resuming from step 4 (kept as {ckpts / '6.damaged'})"
    assert lines[0].startswith(prefix) and lines[0].endswith(suffix), lines[0]
    assert re.fullmatch(reason, lines[0][len(prefix):-len(suffix)]), lines[0]

    # It resumed from the intact checkpoint 4, with exactly its state ...
    assert res.resumed_from == 4 and seen["step"] == 4
    assert seen["meta"] == seen["want_meta"] and seen["meta"]["data_cursor"] == 4
    _assert_trees_equal(seen["state"], seen["want"])
    # ... and redid steps 5 and 6 exactly as the uninterrupted run did.
    assert _losses(run) == _losses(intact_run)
    _assert_trees_equal(_params(run), _params(intact_run))
    # The damaged files are kept aside; step 6 was saved again and is what load_run reads.
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4", "6", "6.damaged"]
    assert load_run(run).step == 6


def test_no_intact_checkpoint_is_an_error_naming_every_step(
    intact_run: Path, seed: int, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    run = _copy(intact_run, tmp_path)
    ckpts = run / "checkpoints"
    empty_directory(ckpts / "6")
    delete_file("state/manifest.ocdbt")(ckpts / "4")
    truncate_array_data(ckpts / "2")
    losses = _losses(run)
    with caplog.at_level(logging.WARNING, logger=TRAINER_LOG), pytest.raises(
        ckpt_lib.CheckpointError,
        match=rf"^no intact checkpoint in {re.escape(str(ckpts))}, every step is damaged "
              r"\(step 6: the step directory is empty; step 4: state/manifest\.ocdbt is "
              r"missing; step 2: array file of \S+ is truncated: [^;]*\); move them aside to "
              r"start the run afresh, or restore a copy$"):
        train(MICRO, _tc(seed), run, progress=False)
    # Nothing was moved, overwritten or logged: the progress on disk is as it was.
    assert not [r for r in caplog.records if r.name == TRAINER_LOG]
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4", "6"]
    assert _losses(run) == losses


def test_load_run_reports_the_damaged_step_without_falling_back(
    intact_run: Path, tmp_path: Path
) -> None:
    run = _copy(intact_run, tmp_path)
    delete_file("meta/metadata")(run / "checkpoints" / "6")
    with pytest.raises(
        ckpt_lib.DamagedCheckpointError,
        match=rf"^checkpoint step 6 at {re.escape(str(run / 'checkpoints' / '6'))} is damaged "
              rf"\(meta/metadata is missing\); `attnlab train --out {re.escape(str(run))}` "
              "with the run's settings resumes from the newest intact checkpoint$",
    ) as e:
        load_run(run)
    assert (e.value.step, e.value.reason) == (6, "meta/metadata is missing")
    # An older step still loads, and equals the intact run's; a step that is not there is a
    # ValueError naming the steps there are.
    _assert_trees_equal(_params(run, step=4), _params(intact_run, step=4))
    with pytest.raises(ValueError, match=r"no checkpoint step 5 in .*; it holds steps "
                                         r"\[2, 4, 6\]"):
        load_run(run, step=5)


def test_restore_rejects_a_state_of_another_shape(intact_run: Path) -> None:
    # Intact files holding another tree than the one asked for are not restored from.
    import orbax.checkpoint as ocp

    mngr = ckpt_lib.manager(intact_run / "checkpoints", keep=3, async_save=False)
    with contextlib.closing(mngr):
        saved = mngr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            saved["state"])
        emb = abstract["params"]["embed"]["embedding"]
        abstract["params"]["embed"]["embedding"] = jax.ShapeDtypeStruct(
            (emb.shape[0] + 1, *emb.shape[1:]), emb.dtype, sharding=emb.sharding)
        with pytest.raises(ckpt_lib.DamagedCheckpointError,
                           match=r"checkpoint step 4 at .* is damaged \(orbax cannot read it: "
                                 r"Requested shape: \(257, 32\) is not compatible with the "
                                 r"stored shape: \(256, 32\)"):
            ckpt_lib.restore(mngr, abstract, 4)
