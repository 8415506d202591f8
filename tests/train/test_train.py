"""attnlab.train: the tiny run learns MQAR, exact resume after SIGKILL, the NaN/inf guard,
keep-K checkpoints, data parallelism, presets and configuration errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.nn import Config, Transformer
from attnlab.train import (
    NonFiniteLossError,
    TrainConfig,
    attention_pattern,
    learning_rate,
    load_run,
    load_run_config,
    make_mesh,
    mfu,
    peak_flops,
    prepare,
    read_metrics,
    train,
)

ROOT = Path(__file__).resolve().parents[2]
MICRO = Config(d_model=32, num_layers=2, num_heads=2, max_seq_len=64)


def _seed(key) -> int:
    return int(jax.random.randint(key, (), 0, 2**30))


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(path) if "loss" in r and "event" not in r}


def test_tiny_preset_learns_mqar(tmp_path: Path, key) -> None:
    # The 7:1 hybrid cut to two layers: one lightning layer, one softmax layer.
    model, tc = load_run_config("tiny", attention="hybrid", seed=_seed(key), data_parallel=1,
                                steps=150, warmup_steps=15)
    assert tc.task == "mqar" and model.layer_pattern == "LS"
    res = train(model, tc, tmp_path, progress=False)
    losses = _losses(res.metrics_path)
    first, last = losses[min(losses)], np.mean([losses[s] for s in sorted(losses)[-3:]])
    # Chance over the 128 value tokens is ln 128 = 4.85; below 3.5 the model uses the context
    # (it puts most of its mass on the values present in the example).
    assert last < 3.5 and first > 4.5, losses
    assert res.validation["val_loss"] < 3.5
    recs = read_metrics(res.metrics_path)
    assert all(r["mfu"] is None for r in recs if "mfu" in r)  # CPU: no peak FLOP/s
    assert all(r["tokens_per_s"] > 0 for r in recs[1:] if "tokens_per_s" in r)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["train"]["task"] == "mqar" and cfg["model"]["param_dtype"] == "float32"


RESUME_CONFIG = """
from attnlab.nn import Config
from attnlab.train import TrainConfig
MODEL = Config(d_model=32, num_layers=2, num_heads=2, max_seq_len=64)
TRAIN = TrainConfig(steps=80, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=8, seed={seed},
                    checkpoint_every=10, keep=2, log_every=1, task="mqar",
                    task_options={{"num_kv_pairs": 4}}, dtype="float32", data_parallel=1,
                    fast_compile=True, eval_batches=0)
"""


def _finished_steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def test_exact_resume_after_sigkill_and_keep_k(tmp_path: Path, key) -> None:
    cfg_file = tmp_path / "micro.py"
    cfg_file.write_text(RESUME_CONFIG.format(seed=_seed(key)))
    model, tc = load_run_config(str(cfg_file))
    # The uninterrupted run (in this process).
    full = train(model, tc, tmp_path / "full", progress=False)
    assert _finished_steps(full.checkpoint_dir) == [70, 80]  # keep=2

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "attnlab.cli", "train", "--config", str(cfg_file), "--out",
           str(run), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            # Kill as soon as one checkpoint is complete: the run still has >= 50 steps to go.
            if _finished_steps(run / "checkpoints"):
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    partial = _losses(run / "metrics.jsonl")
    assert max(partial) < 80
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from step" in res.stdout
    resumed, reference = _losses(run / "metrics.jsonl"), _losses(full.metrics_path)
    assert sorted(resumed) == list(range(1, 81)) == sorted(reference)
    for step in reference:
        assert abs(resumed[step] - reference[step]) <= 1e-6, (step, resumed[step], reference[step])
    # The final parameters agree too.
    a, b = load_run(run), load_run(tmp_path / "full")
    pa, pb = nnx.state(a.model, nnx.Param), nnx.state(b.model, nnx.Param)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), pa, pb)


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path: Path, key) -> None:
    # data_parallel=None: the batch is split over every (simulated) device; bf16 compute with
    # float32 parameters.
    tc = TrainConfig(steps=30, batch_size=8, seq_len=32, warmup_steps=2, seed=_seed(key),
                     checkpoint_every=5, log_every=1, task="induction",
                     task_options={"prefix_len": 8}, dtype="bfloat16", debug_nan_step=12,
                     fast_compile=True)
    with pytest.raises(NonFiniteLossError,
                       match=r"at step 13; training stopped without applying that update and "
                             r"the last good checkpoint is step 10 in .*lower learning rate"):
        train(MICRO, tc, tmp_path, progress=False)
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert recs[-1]["event"] == "non_finite" and recs[-1]["step"] == 13
    assert recs[-1]["loss"] is None  # inf is written as null
    assert all(np.isfinite(r["loss"]) for r in recs[:-1])
    run = load_run(tmp_path)
    assert run.step == 10 and run.model_config.dtype == jnp.bfloat16
    leaves = jax.tree.leaves(nnx.state(run.model, nnx.Param))
    assert all(x.dtype == jnp.float32 and np.isfinite(np.asarray(x)).all() for x in leaves)


def test_data_parallel_matches_one_device(tmp_path: Path, key) -> None:
    seed = _seed(key)
    runs = {}
    for dp in (1, 4):
        tc = TrainConfig(steps=3, batch_size=8, seq_len=32, warmup_steps=1, seed=seed,
                         log_every=1, task="mqar", task_options={"num_kv_pairs": 4},
                         dtype="float32", data_parallel=dp, eval_batches=0,
                         fast_compile=True)
        runs[dp] = _losses(train(MICRO, tc, tmp_path / str(dp), progress=False).metrics_path)
    for step in (1, 2, 3):
        assert runs[4][step] == pytest.approx(runs[1][step], abs=2e-5)
    assert runs[1][1] != runs[1][3]


def test_attention_patterns() -> None:
    assert attention_pattern("softmax", 3) == "SSS"
    assert attention_pattern("lightning", 2) == "LL"
    assert attention_pattern("hybrid", 8) == "LLLLLLLS"
    assert attention_pattern("hybrid", 12) == "LLLLLLLSLLLL"[:-1] + "L"
    assert attention_pattern("hybrid", 3) == "LLS"
    assert attention_pattern("hybrid", 1) == "S"
    assert "S" in attention_pattern("hybrid", 20)
    with pytest.raises(ValueError, match="unknown attention 'linear'; choose one of softmax"):
        attention_pattern("linear", 4)


def test_presets_and_350m_size() -> None:
    model, tc = load_run_config("350m")
    assert model.d_model == 1024 and model.num_layers == 24 and tc.seq_len == 4096
    abstract = nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert 330e6 < n < 370e6, n
    tiny, _ = load_run_config("tiny", attention="softmax")
    assert tiny.layer_pattern == "SS"


def test_config_files_py_and_yaml(tmp_path: Path) -> None:
    py = tmp_path / "c.py"
    py.write_text("BASE = 'tiny'\nMODEL = {'d_model': 96, 'num_heads': 3}\n"
                  "TRAIN = {'steps': 25, 'lr': 1e-3}\n")
    model, tc = load_run_config(str(py), attention="softmax")
    assert model.d_model == 96 and model.head_dim == 32 and tc.steps == 25 and tc.lr == 1e-3
    assert tc.task == "mqar"  # from the tiny base
    pytest.importorskip("yaml")
    yml = tmp_path / "c.yaml"
    yml.write_text("base: tiny\nmodel:\n  num_layers: 3\ntrain:\n  steps: 29\n  task: calendar\n")
    model, tc = load_run_config(str(yml))
    assert model.layer_pattern == "SSS" and tc.steps == 29 and tc.task == "calendar"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 3\n")
    with pytest.raises(ValueError, match=r"unknown model field\(s\) \['d_modle'\]"):
        load_run_config(str(bad))


def test_prepare_rejects_bad_runs_before_compiling() -> None:
    tc = TrainConfig(seq_len=128)
    with pytest.raises(ValueError, match="seq_len=128 is longer than the model's max_seq_len=64"):
        prepare(MICRO, tc)
    with pytest.raises(ValueError, match="unknown mechanism letter"):
        prepare(Config(d_model=32, num_layers=2, num_heads=2, layer_pattern="SQ"), tc)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['pairs'\] for task 'mqar'"):
        prepare(Config(d_model=32, num_layers=2, num_heads=2),
                TrainConfig(task="mqar", task_options={"pairs": 3}))
    with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
        make_mesh(8, data=4, sp=4)
    with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
        make_mesh(16, data=16)


def test_schedule_and_mfu() -> None:
    tc = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lr = learning_rate(tc)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(100)) == pytest.approx(1e-4, rel=1e-4)
    # Warm-up over every step (attnlab train --steps 20 with the tiny preset's 20): no decay.
    whole = learning_rate(TrainConfig(steps=20, lr=1e-3, warmup_steps=20))
    assert float(whole(0)) == 0.0 and float(whole(10)) == pytest.approx(5e-4)
    assert float(whole(20)) == pytest.approx(1e-3)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 == peak_flops("NVIDIA H200")
    assert peak_flops("cpu") is None and mfu(1e9, 1e4, "cpu", 1) is None
    assert mfu(6e9, 1e4, "NVIDIA H100 80GB HBM3", 2) == pytest.approx(6e13 / (2 * 989e12))
