"""``attnlab eval / generate / train`` on a run whose newest checkpoint is damaged: eval and
generate print one line on stderr naming the step, its path and what is wrong, and exit 1 with
no traceback; train resumes from the newest intact checkpoint (after which eval works again),
or, with none intact, prints one line listing every step tried and exits 1."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest

from attnlab.cli import main
from tests.train.test_checkpoint_damage import delete_file, truncate_array_data

CONFIG = """
from attnlab.nn import Config
from attnlab.train import TrainConfig
MODEL = Config(d_model=32, num_layers=2, num_heads=2, max_seq_len=128)
TRAIN = TrainConfig(steps=6, batch_size=4, seq_len=64, warmup_steps=1, checkpoint_every=2,
                    keep=3, log_every=1, task="calendar", dtype="float32", eval_batches=0,
                    fast_compile=True, data_parallel=1)
"""
DAMAGES = [
    (delete_file("state/_METADATA"), re.escape("state/_METADATA is missing")),
    (truncate_array_data, r"array file of \S+ is truncated: OUT_OF_RANGE: .*"),
]
IDS = ["missing metadata", "truncated array"]


@pytest.fixture(scope="module")
def intact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(run directory with checkpoints 2, 4 and 6, its config file), copied per test."""
    root = tmp_path_factory.mktemp("cli_damage")
    config = root / "micro.py"
    config.write_text(CONFIG)
    assert main(["train", "--config", str(config), "--out", str(root / "run"),
                 "--no-progress"]) == 0
    return root / "run", str(config)


def _damaged(intact: tuple[Path, str], tmp_path: Path, damage) -> Path:
    run = tmp_path / "run"
    shutil.copytree(intact[0], run)
    damage(run / "checkpoints" / "6")
    return run


@pytest.mark.parametrize(("damage", "reason"), DAMAGES, ids=IDS)
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_eval_and_generate_on_a_damaged_checkpoint_exit_1_with_one_line(
    command: str, damage, reason: str, intact: tuple[Path, str], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = _damaged(intact, tmp_path, damage)
    argv = {"eval": ["eval", "--ckpt", str(run)],
            "generate": ["generate", "--ckpt", str(run), "--prompt", "Mon"]}[command]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    prefix = (f"attnlab {command}: error: checkpoint step 6 at {run / 'checkpoints' / '6'} is "
              "damaged (")
    suffix = (f"); `attnlab train --out {run}` with the run's settings resumes from the newest "
              "intact checkpoint\n")
    assert err.startswith(prefix) and err.endswith(suffix), err
    assert re.fullmatch(reason, err[len(prefix):-len(suffix)]), err


def test_train_resumes_past_the_damaged_checkpoint_then_eval_reads_it(
    intact: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = _damaged(intact, tmp_path, delete_file("state/_METADATA"))
    with caplog.at_level(logging.WARNING, logger="attnlab.train.trainer"):
        assert main(["train", "--config", intact[1], "--out", str(run), "--no-progress"]) == 0
    assert "6 steps (resumed from step 4)" in capsys.readouterr().out
    (line,) = [r.getMessage() for r in caplog.records if r.name == "attnlab.train.trainer"]
    assert line == (f"checkpoint step 6 at {run / 'checkpoints' / '6'} is damaged "
                    "(state/_METADATA is missing); resuming from step 4 (kept as "
                    f"{run / 'checkpoints' / '6.damaged'})")
    assert main(["eval", "--ckpt", str(run), "--json", "--batches", "1"]) == 0
    assert '"step": 6' in capsys.readouterr().out


def test_train_with_no_intact_checkpoint_exits_1_with_one_line(
    intact: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    run = _damaged(intact, tmp_path, delete_file("state/_METADATA"))
    for step in ("2", "4"):
        delete_file("meta/metadata")(run / "checkpoints" / step)
    assert main(["train", "--config", intact[1], "--out", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err == (f"attnlab train: error: no intact checkpoint in {run / 'checkpoints'}, every "
                   "step is damaged (step 6: state/_METADATA is missing; step 4: meta/metadata "
                   "is missing; step 2: meta/metadata is missing); move them aside to start the "
                   "run afresh, or restore a copy\n")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4", "6"]
