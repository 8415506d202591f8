"""Bad command lines of ``attnlab``: each exits with status 2 and one ``error:`` line that
names the argument, what was given and what is allowed; never a traceback.

``main()`` runs in-process; every case fails while its arguments are read or its run is
configured, before any model is built or compiled (``train``'s run directory is never made).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from attnlab.cli import main

# Config files the ``--config`` cases read: name -> text.
FILES = {
    "unknown_field.py": "TRAIN = {'stepz': 3}\n",
    "unknown_model_field.py": "MODEL = {'d_modle': 3}\n",
    "syntax_error.py": "MODEL = {'d_model': 32\n",
    "model_not_dict.py": "MODEL = 3\n",
    "lr_string.py": "TRAIN = {'lr': 'fast'}\n",
    "bad.yaml": "train: [1, 2\n",
    "bad.json": "{}\n",
}

TRAIN = ["train", "--out", "{tmp}/run"]
GEN = ["generate", "--ckpt", "{tmp}", "--prompt", "x"]
BENCH = ["bench", "attention"]

CASES = [
    # ---- train: counts and amounts
    ("train-steps-0", [*TRAIN, "--steps", "0"],
     "argument --steps: must be a positive integer, got 0"),
    ("train-steps-float", [*TRAIN, "--steps", "2.5"],
     "argument --steps: must be a positive integer, got '2.5'"),
    ("train-batch-size-negative", [*TRAIN, "--batch-size", "-1"],
     "argument --batch-size: must be a positive integer, got -1"),
    ("train-seq-len-word", [*TRAIN, "--seq-len", "long"],
     "argument --seq-len: must be a positive integer, got 'long'"),
    ("train-lr-nan", [*TRAIN, "--lr", "nan"],
     "argument --lr: must be a positive number, got nan"),
    ("train-lr-negative", [*TRAIN, "--lr", "-0.1"],
     "argument --lr: must be a positive number, got -0.1"),
    ("train-seed-negative", [*TRAIN, "--seed", "-1"],
     "argument --seed: must be an integer >= 0, got -1"),
    ("train-checkpoint-every-negative", [*TRAIN, "--checkpoint-every", "-5"],
     "argument --checkpoint-every: must be an integer >= 0, got -5"),
    ("train-keep-0", [*TRAIN, "--keep", "0"], "argument --keep: must be a positive integer"),
    ("train-log-every-0", [*TRAIN, "--log-every", "0"],
     "argument --log-every: must be a positive integer, got 0"),
    ("train-data-parallel-0", [*TRAIN, "--data-parallel", "0"],
     "argument --data-parallel: must be a positive integer, got 0"),
    ("train-seq-parallel-0", [*TRAIN, "--seq-parallel", "0"],
     "argument --seq-parallel: must be a positive integer, got 0"),
    ("train-attention-unknown", [*TRAIN, "--attention", "linear"],
     "argument --attention: invalid choice: 'linear'"),
    ("train-sp-strategy-unknown", [*TRAIN, "--sp-strategy", "star"],
     "sp_strategy='star' is not a sequence-parallel strategy; choose one of ring"),
    ("train-batch-not-divisible", [*TRAIN, "--batch-size", "6", "--data-parallel", "4"],
     "batch_size=6 is not divisible by data_parallel=4"),
    # ---- train: config files
    ("config-unknown-train-field", [*TRAIN, "--config", "{tmp}/unknown_field.py"],
     "unknown train field(s) ['stepz'] in {tmp}/unknown_field.py; TrainConfig has steps, "),
    ("config-unknown-model-field", [*TRAIN, "--config", "{tmp}/unknown_model_field.py"],
     "unknown model field(s) ['d_modle'] in {tmp}/unknown_model_field.py; Config has "),
    ("config-syntax-error", [*TRAIN, "--config", "{tmp}/syntax_error.py"],
     "config file {tmp}/syntax_error.py failed to run: SyntaxError: '{' was never closed"),
    ("config-model-not-a-dict", [*TRAIN, "--config", "{tmp}/model_not_dict.py"],
     "MODEL/model in {tmp}/model_not_dict.py must be a Config or a dict of its fields, got 3"),
    ("config-lr-string", [*TRAIN, "--config", "{tmp}/lr_string.py"],
     "lr must be a float, got 'fast'"),
    ("config-bad-yaml", [*TRAIN, "--config", "{tmp}/bad.yaml"],
     "config file {tmp}/bad.yaml is not valid YAML: while parsing a flow sequence"),
    ("config-bad-suffix", [*TRAIN, "--config", "{tmp}/bad.json"],
     "config file {tmp}/bad.json must end in .py, .yaml or .yml"),
    ("config-no-such-preset", [*TRAIN, "--config", "medium"],
     "--config 'medium' is neither a preset (tiny, small, 350m) nor a file"),
    # ---- eval
    ("eval-batches-negative", ["eval", "--ckpt", "{tmp}", "--batches", "-1"],
     "argument --batches: must be a positive integer, got -1"),
    ("eval-batches-0", ["eval", "--ckpt", "{tmp}", "--batches", "0"],
     "argument --batches: must be a positive integer, got 0"),
    ("eval-batches-word", ["eval", "--ckpt", "{tmp}", "--batches", "all"],
     "argument --batches: must be a positive integer, got 'all'"),
    ("eval-not-a-run", ["eval", "--ckpt", "{tmp}"],
     "{tmp} is not a run directory (no config.json in it or its parent)"),
    # ---- generate
    ("generate-max-new-tokens-negative", [*GEN, "--max-new-tokens", "-1"],
     "argument --max-new-tokens: must be an integer >= 0, got -1"),
    ("generate-temperature-negative", [*GEN, "--temperature", "-1"],
     "argument --temperature: must be a number >= 0, got -1"),
    ("generate-temperature-inf", [*GEN, "--temperature", "inf"],
     "argument --temperature: must be a number >= 0, got inf"),
    ("generate-top-k-0", [*GEN, "--top-k", "0"],
     "argument --top-k: must be a positive integer, got 0"),
    ("generate-seed-negative", [*GEN, "--seed", "-3"],
     "argument --seed: must be an integer >= 0, got -3"),
    ("generate-not-a-run", GEN, "{tmp} is not a run directory"),
    ("generate-star-without-block-size", [*GEN, "--star"],
     "--star needs --block-size (tokens per context block)"),
    ("generate-block-size-without-star", [*GEN, "--block-size", "4", "--anchor", "none"],
     "--block-size, --anchor only apply with --star (Star Attention)"),
    ("generate-star-anchor-larger-than-block",
     [*GEN, "--star", "--block-size", "4", "--anchor-size", "8"],
     "anchor_size must be in [1, block_size = 4] (the anchor is taken from one block), got 8"),
    ("generate-star-anchor-unknown", [*GEN, "--star", "--block-size", "4", "--anchor", "last"],
     "argument --anchor: invalid choice: 'last'"),
    ("generate-star-none-with-size",
     [*GEN, "--star", "--block-size", "4", "--anchor", "none", "--anchor-size", "2"],
     "anchor='none' takes no anchor_size, got anchor_size=2"),
    # ---- bench
    ("bench-kv-heads-negative", [*BENCH, "--kv-heads", "-2"],
     "argument --kv-heads: must be a positive integer, got -2"),
    ("bench-kv-heads-0", [*BENCH, "--kv-heads", "0"],
     "argument --kv-heads: must be a positive integer, got 0"),
    ("bench-heads-0", [*BENCH, "--heads", "0"],
     "argument --heads: must be a positive integer, got 0"),
    ("bench-head-dim-negative", [*BENCH, "--head-dim", "-8"],
     "argument --head-dim: must be a positive integer, got -8"),
    ("bench-batch-tokens-0", [*BENCH, "--batch-tokens", "0"],
     "argument --batch-tokens: must be a positive integer, got 0"),
    ("bench-batch-negative", [*BENCH, "--batch", "-1"],
     "argument --batch: must be a positive integer, got -1"),
    ("bench-repeats-0", [*BENCH, "--repeats", "0"],
     "argument --repeats: must be a positive integer, got 0"),
    ("bench-warmup-0", [*BENCH, "--warmup", "0"],
     "argument --warmup: must be a positive integer, got 0"),
    ("bench-max-ref-gib-negative", [*BENCH, "--max-ref-gib", "-1"],
     "argument --max-ref-gib: must be a number >= 0, got -1"),
    ("bench-max-logits-gib-nan", [*BENCH, "--max-logits-gib", "nan"],
     "argument --max-logits-gib: must be a number >= 0, got nan"),
    ("bench-impls-empty", [*BENCH, "--impls", ","],
     "--impls ',' names no implementation; give a comma list or 'auto'"),
    ("bench-shapes-0", [*BENCH, "--shapes", "0"],
     "shapes must be positive sequence lengths, got (0,)"),
    ("bench-shapes-word", [*BENCH, "--shapes", "12a"],
     "--shapes must be comma-separated integers, got '12a'"),
    ("bench-passes-unknown", [*BENCH, "--passes", "fwd,bwd"],
     "passes must be a non-empty subset of ('fwd', 'fwdbwd'), got ('fwd', 'bwd')"),
    ("bench-heads-not-multiple", [*BENCH, "--heads", "6", "--kv-heads", "4"],
     "heads=6 is not a multiple of kv_heads=4"),
    ("bench-op-unknown", ["bench", "decode"], "argument op: invalid choice: 'decode'"),
    # ---- demo and the command itself
    ("demo-repeats-0", ["demo", "--repeats", "0"],
     "argument --repeats: must be a positive integer, got 0"),
    ("demo-jobs-0", ["demo", "--jobs", "0"], "argument --jobs: must be a positive integer, got 0"),
    ("demo-seed-negative", ["demo", "--seed", "-1"],
     "argument --seed: must be an integer >= 0, got -1"),
    ("unknown-subcommand", ["serve"], "invalid choice: 'serve' (choose from 'info', 'bench'"),
    ("info-unknown-flag", ["info", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_command_line(argv: list[str], message: str, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    if any(a.endswith(".yaml") for a in argv):
        pytest.importorskip("yaml")
    tmp = str(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([a.replace("{tmp}", tmp) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("attnlab") and ": error: " in last, err
    assert message.replace("{tmp}", tmp) in last
    assert not (tmp_path / "run").exists()  # train made no run directory
