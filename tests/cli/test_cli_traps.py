"""The ``attnlab`` command where a first-time user trips: ``train`` without ``--out``,
``train --steps`` over a finished run, ``generate`` on a model not trained on text,
``--seq-parallel`` beyond the CPU's devices, and ``bench`` on a CPU without ``--out``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from attnlab.cli import main

MICRO = """
from attnlab.nn import Config
from attnlab.train import TrainConfig
MODEL = Config(d_model=32, num_layers=2, num_heads=2, max_seq_len=128)
TRAIN = TrainConfig(steps=4, batch_size=4, seq_len=64, warmup_steps=1, checkpoint_every=2,
                    log_every=1, task="calendar", dtype="float32", eval_batches=1,
                    fast_compile=True, data_parallel=1)
"""


def _config(tmp_path: Path) -> str:
    path = tmp_path / "micro.py"
    path.write_text(MICRO)
    return str(path)


def _steps(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def test_train_without_out_writes_a_new_run_dir_and_says_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", _config(tmp_path), "--no-progress", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("micro-")
    assert f"no --out given: the run goes to runs/{runs[0].name}" in out
    assert (runs[0] / "config.json").is_file() and _steps(runs[0]) == [2]


def test_more_steps_extend_a_finished_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--config", _config(tmp_path), "--out", str(run), "--no-progress"]
    assert main([*argv, "--steps", "4"]) == 0
    assert "4 steps;" in capsys.readouterr().out and _steps(run) == [2, 4]

    assert main([*argv, "--steps", "6"]) == 0  # steps is not "a different configuration"
    out = capsys.readouterr().out
    assert "6 steps (resumed from step 4)" in out
    assert _steps(run)[-1] == 6
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 6
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    logged = [r["step"] for r in records if "loss" in r]
    assert logged == [1, 2, 3, 4, 5, 6]  # one record per step, none repeated

    with pytest.raises(SystemExit) as e:  # fewer steps than the run has: refused, said why
        main([*argv, "--steps", "3"])
    assert e.value.code == 2
    assert "holds a run of 6 steps and steps=3 would end it earlier; pass --steps 6 or more" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # other settings still count as another run
        main([*argv, "--steps", "8", "--lr", "0.5"])
    assert e.value.code == 2
    assert "differs in train.lr" in capsys.readouterr().err

    # A text-trained run generates without a warning.
    assert main(["generate", "--ckpt", str(run), "--prompt", "Mon", "--max-new-tokens", "2"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_generate_warns_on_a_model_not_trained_on_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "mqar"
    assert main(["train", "--config", _config(tmp_path), "--out", str(run), "--no-progress",
                 "--task", "mqar", "--steps", "2"]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run), "--prompt", "def ", "--max-new-tokens",
                 "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def ")  # the generation itself is still printed
    err = " ".join(captured.err.split())
    assert f"warning: {run} was trained on the 'mqar' task" in err
    assert "not text" in err and "attnlab train --task stdlib" in err


def test_seq_parallel_beyond_the_cpu_devices_names_xla_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", _config(tmp_path), "--out", str(tmp_path / "run"),
              "--data-parallel", "1", "--seq-parallel", "16"])
    assert e.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "seq_parallel=16 needs 16 devices but 8 are available" in err
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=16" in err
    assert not (tmp_path / "run").exists()


def test_bench_on_cpu_uses_cpu_sizes_and_writes_under_experiments_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    # Only the sizes this test must shrink are given; dtype, B*S, repeats and warm-up default.
    assert main(["bench", "attention", "--shapes", "128", "--heads", "2", "--head-dim", "32",
                 "--causal", "true", "--passes", "fwd", "--no-anchors"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ("note: no GPU or TPU, so CPU-sized defaults: --batch-tokens 1024 --dtype float32 "
            "--repeats 3 --warmup 1") in out
    written = list((tmp_path / "experiments" / "results").glob("bench_attention_cpu_*.json"))
    assert len(written) == 1 and f"wrote experiments/results/{written[0].name}" in out
    rec = json.loads(written[0].read_text())
    assert rec["config"]["dtype"] == "float32" and rec["config"]["repeats"] == 3
    assert {r["B"] for r in rec["rows"]} == {1024 // 128}


def test_bench_defaults_on_an_accelerator_are_the_published_sizes() -> None:
    from attnlab.cli.bench import ACCELERATOR_DEFAULTS, apply_platform_defaults

    args = argparse.Namespace(shapes=None, batch_tokens=None, dtype=None, repeats=7, warmup=None)
    assert apply_platform_defaults(args, "gpu") == {}  # no CPU note on a GPU
    assert (args.shapes, args.batch_tokens, args.dtype) == ("2048,8192", 32768, "bfloat16")
    assert args.repeats == 7 and args.warmup == ACCELERATOR_DEFAULTS["warmup"]
