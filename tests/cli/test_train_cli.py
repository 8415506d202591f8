"""``attnlab train / eval / generate``: configuration errors exit 2 before any compile, a
NaN/inf stop exits 1 and leaves a checkpoint that eval and generate read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnlab.cli import main

MICRO = """
from attnlab.nn import Config
from attnlab.train import TrainConfig
MODEL = Config({model})
TRAIN = TrainConfig(steps=6, batch_size=4, seq_len=64, warmup_steps=1, checkpoint_every=2,
                    log_every=1, task="calendar", dtype="float32", eval_batches=0,
                    fast_compile=True, data_parallel=1)
"""
GOOD = "d_model=32, num_layers=2, num_heads=2, max_seq_len=128"


def _config(tmp_path: Path, model: str = GOOD) -> str:
    path = tmp_path / "micro.py"
    path.write_text(MICRO.format(model=model))
    return str(path)


@pytest.mark.parametrize(
    ("model", "argv", "match"),
    [
        (GOOD, ["--seq-len", "200"],
         "seq_len=200 is longer than the model's max_seq_len=128; lower --seq-len"),
        ("d_model=64, num_layers=2, num_heads=3", [],
         "d_model=64 is not divisible by num_heads=3"),
        ("d_model=32, num_layers=3, num_heads=2, layer_pattern='SSX'", [],
         "uses unknown mechanism letter(s) 'X'; known: "),
        ("d_model=32, num_layers=3, num_heads=2, layer_pattern='SS'", [],
         "layer_pattern 'SS' has 2 letters but num_layers=3"),
        ("d_model=32, num_layers=2, num_heads=4, num_kv_heads=3", [],
         "num_heads=4 is not a multiple of num_kv_heads=3"),
        (GOOD, ["--task", "passkey"], "too short for a passkey example"),
        (GOOD, ["--batch-size", "6", "--data-parallel", "4"],
         "batch_size=6 is not divisible by data_parallel=4"),
        (GOOD, ["--config", "medium"], "is neither a preset (tiny, small, 350m) nor a file"),
        (GOOD, ["--seq-parallel", "4", "--seq-len", "36"],
         "seq_len=36 is not divisible by 8 (zigzag cuts it into 2 x seq_parallel = 8 chunks)"),
        (GOOD, ["--seq-parallel", "4", "--sp-strategy", "star"],
         "sp_strategy='star' is not a sequence-parallel strategy; choose one of ring, striped"),
        (GOOD, ["--seq-parallel", "4", "--sp-strategy", "ulysses"],
         "Ulysses splits heads over the 'sp' axis of size 4, but q has 2 heads"),
    ],
)
def test_bad_config_exits_2_before_compiling(
    model: str, argv: list[str], match: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", _config(tmp_path, model), "--out", str(out), *argv])
    assert e.value.code == 2
    assert match in capsys.readouterr().err
    assert not out.exists()  # nothing was written, let alone compiled


def test_nan_stop_exits_1_then_eval_and_generate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--config", _config(tmp_path), "--out", str(out), "--no-progress",
               "--debug-nan-step", "4"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "loss became inf" in text or "loss became nan" in text
    assert "the last good checkpoint is step 4" in text

    assert main(["eval", "--ckpt", str(out / "checkpoints"), "--json", "--batches", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 4 and res["task"] == "calendar"
    assert 0.0 < res["val_loss"] < 10.0 and 0.0 <= res["val_accuracy"] <= 1.0

    prompt = "What day is 3 days after Monday? "
    assert main(["generate", "--ckpt", str(out), "--prompt", prompt, "--max-new-tokens",
                 "8"]) == 0
    assert capsys.readouterr().out.startswith(prompt)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--ckpt", str(out), "--prompt", prompt, "--max-new-tokens", "100"])
    assert e.value.code == 2
    assert "exceeds max_seq_len=128" in capsys.readouterr().err
    # Resuming into a run directory of another configuration is refused up front.
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", _config(tmp_path), "--out", str(out), "--seq-len", "100",
              "--debug-nan-step", "4"])
    assert e.value.code == 2
    assert "differs in train.seq_len" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--ckpt", str(tmp_path)])
    assert e.value.code == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_seq_parallel_flags_reach_the_run(tmp_path: Path) -> None:
    from attnlab.cli import build_parser
    from attnlab.cli.train import run_config_from_args

    parser = build_parser()
    args = parser.parse_args(["train", "--config", _config(tmp_path), "--out",
                              str(tmp_path / "run"), "--data-parallel", "2", "--seq-parallel",
                              "4", "--sp-strategy", "ring"])
    _, tc, _, mesh = run_config_from_args(args, parser)
    assert (tc.seq_parallel, tc.sp_strategy) == (4, "ring")
    assert dict(mesh.shape) == {"data": 2, "sp": 4}


def test_generate_with_star_attention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``attnlab generate --star``: a softmax run continues its prompt with a blockwise
    context; a block size that does not divide the context exits 2 naming both."""
    out = tmp_path / "run"
    assert main(["train", "--config", _config(tmp_path), "--out", str(out), "--no-progress",
                 "--steps", "2"]) == 0
    capsys.readouterr()
    prompt = "What day is 3 days after Monday? "  # 33 bytes: a 32-byte context, 1 query
    assert main(["generate", "--ckpt", str(out), "--prompt", prompt, "--max-new-tokens", "4",
                 "--star", "--block-size", "8", "--anchor", "previous"]) == 0
    assert capsys.readouterr().out.startswith(prompt)
    with pytest.raises(SystemExit) as e:
        main(["generate", "--ckpt", str(out), "--prompt", prompt, "--star", "--block-size", "8",
              "--context-length", "20"])
    assert e.value.code == 2
    assert "block_size=8 must divide the context length 20" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--ckpt", str(out), "--prompt", prompt, "--star", "--block-size", "8",
              "--max-new-tokens", "100"])
    assert e.value.code == 2
    assert "exceeds max_seq_len=128" in capsys.readouterr().err
