"""Bad inputs to training (``attnlab.train``): the run configuration, config files, the mesh
and evaluation. Each is refused with a ValueError whose message names the field or argument,
what was given and what is allowed, before anything is compiled.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from attnlab.nn import Config
from attnlab.train import TrainConfig, evaluate_run, load_run_config, make_mesh, prepare

MICRO = Config(d_model=32, num_layers=2, num_heads=2, max_seq_len=64)

TRAIN_CONFIG_CASES = [
    # counts
    ("steps-0", dict(steps=0), "steps must be a positive int, got 0"),
    ("steps-float", dict(steps=2.5), "steps must be a positive int, got 2.5 of type float"),
    ("batch_size-str", dict(batch_size="8"), "batch_size must be a positive int, got '8'"),
    ("seq_len-negative", dict(seq_len=-4), "seq_len must be a positive int, got -4"),
    ("keep-0", dict(keep=0), "keep must be a positive int, got 0"),
    ("eval_batches-bool", dict(eval_batches=True),
     "eval_batches must be an int >= 0, got True of type bool"),
    ("eval_batches-negative", dict(eval_batches=-1), "eval_batches must be an int >= 0, got -1"),
    ("warmup_steps-exceeds-steps", dict(warmup_steps=50, steps=10),
     "warmup_steps=50 exceeds steps=10; lower warmup_steps"),
    ("seed-negative", dict(seed=-1), "seed must be an int >= 0, got -1"),
    ("data_parallel-float", dict(data_parallel=1.5),
     r"data_parallel must be a positive int \(or None: as many as divide the batch\), got 1\.5"),
    ("data_parallel-does-not-divide", dict(batch_size=6, data_parallel=4),
     "batch_size=6 is not divisible by data_parallel=4; make the batch a multiple of it"),
    ("seq_parallel-0", dict(seq_parallel=0), "seq_parallel must be a positive int, got 0"),
    ("debug_nan_step-negative", dict(debug_nan_step=-1),
     r"debug_nan_step must be an int >= 0 \(or None\), got -1"),
    # hyperparameters
    ("lr-0", dict(lr=0.0), "lr must be positive, got 0.0"),
    ("lr-nan", dict(lr=float("nan")), "lr must be a finite float, got nan"),
    ("lr-str", dict(lr="3e-3"), "lr must be a float, got '3e-3'"),
    ("weight_decay-nan", dict(weight_decay=float("nan")),
     "weight_decay must be a finite float, got nan"),
    ("clip_norm-negative", dict(clip_norm=-1.0), "clip_norm must be >= 0.0, got -1.0"),
    ("min_lr_ratio-above-1", dict(min_lr_ratio=2.0),
     r"min_lr_ratio must lie in \[0\.0, 1\.0\], got 2\.0"),
    ("b1-1", dict(b1=1.0), r"b1 must lie in \[0, 1\) \(an Adam moment decay\), got 1\.0"),
    ("b2-negative", dict(b2=-0.1), "b2 must be >= 0.0, got -0.1"),
    # names and flags
    ("dtype-float16", dict(dtype="float16"), "dtype='float16'; choose one of bfloat16, float32"),
    ("task-unknown", dict(task="wikitext"),
     "task='wikitext' is not a dataset; choose one of mqar, induction"),
    ("task_options-list", dict(task_options=[1]),
     r"task_options must be a mapping of option names to values, got \[1\]"),
    ("sp_strategy-unknown", dict(sp_strategy="star"),
     "sp_strategy='star' is not a sequence-parallel strategy; choose one of ring"),
    ("fast_compile-str", dict(fast_compile="yes"), "fast_compile must be a bool, got 'yes'"),
    ("checkpoint_dir-int", dict(checkpoint_dir=3),
     "checkpoint_dir must be a path string or None, got 3"),
]


@pytest.mark.parametrize("fields, match", [c[1:] for c in TRAIN_CONFIG_CASES],
                         ids=[c[0] for c in TRAIN_CONFIG_CASES])
def test_bad_train_config(fields, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**fields)


def _file(tmp_path: Path, text: str, name: str = "run.py") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


CALL_CASES = [
    ("load-unknown-train-field",
     lambda tmp: load_run_config(_file(tmp, "TRAIN = {'stepz': 3}\n")),
     r"unknown train field\(s\) \['stepz'\] in .*run\.py; TrainConfig has steps, batch_size"),
    ("load-unknown-model-field",
     lambda tmp: load_run_config(_file(tmp, "MODEL = {'d_modle': 3}\n")),
     r"unknown model field\(s\) \['d_modle'\] in .*run\.py; Config has vocab_size, d_model"),
    ("load-bad-train-value",
     lambda tmp: load_run_config(_file(tmp, "TRAIN = {'lr': 'fast'}\n")),
     "lr must be a float, got 'fast'"),
    ("load-bad-base", lambda tmp: load_run_config(_file(tmp, "BASE = 'huge'\n")),
     "BASE/base 'huge' in .* is not a preset; choose one of tiny, small, 350m"),
    ("load-bad-suffix", lambda tmp: load_run_config(_file(tmp, "{}", "run.json")),
     r"config file .*run\.json must end in \.py, \.yaml or \.yml"),
    ("load-no-such-preset", lambda tmp: load_run_config("huge"),
     r"--config 'huge' is neither a preset \(tiny, small, 350m\) nor a file"),
    ("load-unknown-override", lambda tmp: load_run_config("tiny", stepz=3),
     r"unknown train override\(s\) \['stepz'\]; TrainConfig has steps"),
    ("load-unknown-attention", lambda tmp: load_run_config("tiny", attention="linear"),
     "unknown attention 'linear'; choose one of softmax, lightning, hybrid"),
    ("prepare-seq_len-too-long", lambda tmp: prepare(MICRO, TrainConfig(seq_len=128)),
     "seq_len=128 is longer than the model's max_seq_len=64"),
    ("prepare-small-vocab",
     lambda tmp: prepare(Config(vocab_size=100, d_model=32, num_layers=2, num_heads=2),
                         TrainConfig()),
     "vocab_size=100 is smaller than the data's 256 byte tokens"),
    ("prepare-unknown-task-option",
     lambda tmp: prepare(MICRO, TrainConfig(seq_len=64, task_options={"pairs": 3})),
     r"unknown option\(s\) \['pairs'\] for task 'mqar'; its options are num_kv_pairs"),
    ("make_mesh-batch-0", lambda tmp: make_mesh(0), "batch_size must be a positive int, got 0"),
    ("make_mesh-data-float", lambda tmp: make_mesh(4, data=1.5),
     "data_parallel must be a positive int .* got 1.5 of type float"),
    ("make_mesh-sp-float", lambda tmp: make_mesh(4, sp=2.0),
     "seq_parallel must be an int, got 2.0 of type float"),
    ("make_mesh-too-many-devices", lambda tmp: make_mesh(16, data=16),
     "needs 16 devices but 8 are available"),
    ("evaluate_run-batches-negative",
     lambda tmp: evaluate_run(types.SimpleNamespace(train_config=TrainConfig()), batches=-1),
     "batches must be a positive int, got -1"),
]


@pytest.mark.parametrize("call, match", [c[1:] for c in CALL_CASES],
                         ids=[c[0] for c in CALL_CASES])
def test_bad_call(call, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        call(tmp_path)


def test_numpy_integers_are_counts():
    tc = TrainConfig(steps=np.int64(10), warmup_steps=np.int32(1), data_parallel=np.int64(2))
    assert tc == TrainConfig(steps=10, warmup_steps=1, data_parallel=2)
    assert all(type(getattr(tc, f)) is int for f in ("steps", "warmup_steps", "data_parallel"))
