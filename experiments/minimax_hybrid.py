"""MiniMax-01 hybrid reproduction: all-softmax, all-lightning, the 7:1 lightning:softmax hybrid
and a 3:1 variant at equal parameters and equal training tokens; associative recall, passkey
retrieval beyond the training length, validation loss and throughput against length.

Setup (PAPERS.md section 7): four byte-level decoders of the same depth and width whose
``layer_pattern`` is ``"S" * L``, ``"L" * L``, the 7:1 period ``"LLLLLLLS"`` and ``"LLLS"``
repeated (each cut to L layers, the last layer made softmax). A lightning layer holds a quarter
more attention parameters than a softmax one (its output gate), so every model gets the MLP
width that brings it to the all-lightning model's parameter count (they agree to within one
MLP column per layer; the JSON lists them). All four see the same batches:

* MQAR with ``queries_with_replacement`` (``attnlab.data.MQAR``): the answers are not a
  permutation of the values, so no model scores above ``1 / n`` without recalling; a
  curriculum over the number of key-value pairs (``pairs``, equal shares of the MQAR steps);
* optionally Passkey rows (needle at a random depth) and standard-library text, as ``mix`` says.

Evaluation: MQAR answer accuracy at every ``eval_pairs`` (validation split), passkey digit
accuracy and whole-key accuracy at ``passkey_lengths`` (the training length and beyond),
validation loss on the standard-library corpus (when it is in the mix), and tokens/s of a
training step and of a prefill (forward) at ``throughput_lengths`` on this device, from the
shortest length to the first that fails (out of memory).

``python experiments/minimax_hybrid.py --preset tiny`` (CPU, under a minute: every code path,
at a size that does not learn recall), ``--preset cpu`` (about 14 minutes on 2 CPU cores: the
recall experiment at the smallest size where a model here learns it) or ``--preset full`` (one
GPU: 320 s on an H100).
Writes ``experiments/results/minimax_hybrid_<preset>.{json,png}``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnlab.data import MQAR, Batch, Passkey, make_dataset
from attnlab.nn import Config, Transformer
from attnlab.train import TrainConfig, make_optimizer
from attnlab.train.presets import attention_pattern
from attnlab.train.trainer import make_train_step
from experiments._common import Progress, device_name, run_experiment


@dataclasses.dataclass(frozen=True)
class Preset:
    d_model: int
    num_layers: int
    num_heads: int
    mlp_dim: int  # of the all-lightning model; the others get wider MLPs (equal parameters)
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    pairs: tuple[int, ...]  # MQAR curriculum: one stage per entry, equal shares of the steps
    mix: tuple[str, ...]  # the task of step i is mix[i % len(mix)]: mqar, passkey, stdlib
    eval_pairs: tuple[int, ...]
    passkey_lengths: tuple[int, ...]  # passkey evaluated at these lengths (train length first)
    eval_batches: int
    eval_batch_size: int
    throughput_lengths: tuple[int, ...]
    throughput_models: tuple[str, ...]
    throughput_repeats: int = 3
    throughput_train: bool = True  # time a training step at each length, not only a prefill
    time_budget_s: float | None = None  # no throughput length is started after this
    dtype: str = "float32"
    attention_impl: str = "auto"
    fast_compile: bool = False


PRESETS = {
    # CPU, under a minute for everything: 8 layers are the fewest that tell 7:1 from 3:1, and at
    # this width and step count no model gets past the values in context (the ``cpu`` preset
    # and experiments/README.md give what recall takes on a CPU).
    "tiny": Preset(
        d_model=32, num_layers=8, num_heads=2, mlp_dim=64, steps=20, batch_size=8,
        seq_len=128, lr=3e-3, warmup_steps=5, min_lr_ratio=1.0, pairs=(2,), mix=("mqar",),
        eval_pairs=(2, 4, 8), passkey_lengths=(128,), eval_batches=1, eval_batch_size=8,
        throughput_lengths=(128, 512), throughput_models=("softmax", "lightning", "hybrid 7:1"),
        throughput_repeats=5, throughput_train=False, attention_impl="xla", fast_compile=True),
    # About 14 minutes on 2 shared CPU cores: the smallest setting in which a model here learns
    # recall on a CPU (the all-softmax one, after about 350 steps of 32 x 64 tokens, 2 pairs).
    "cpu": Preset(
        d_model=64, num_layers=8, num_heads=4, mlp_dim=64, steps=600, batch_size=32,
        seq_len=64, lr=3e-3, warmup_steps=20, min_lr_ratio=1.0, pairs=(2,), mix=("mqar",),
        eval_pairs=(2, 4, 8, 16), passkey_lengths=(), eval_batches=4, eval_batch_size=32,
        throughput_lengths=(), throughput_models=(), attention_impl="xla"),
    # One H100, about 10 minutes (not yet run; the time is an estimate): 8 layers, d 256, 1,500
    # steps of 32 x 512 tokens (25M tokens per model), half MQAR (2 -> 4 -> 8 -> 16 -> 32
    # pairs), a quarter passkey, a quarter Python source; throughput from 2K to 64K tokens
    # until 500 s have passed (lengths left are recorded as skipped).
    "full": Preset(
        d_model=256, num_layers=8, num_heads=8, mlp_dim=640, steps=1500, batch_size=32,
        seq_len=512, lr=1e-3, warmup_steps=100, min_lr_ratio=0.1, pairs=(2, 4, 8, 16, 32),
        mix=("mqar", "passkey", "mqar", "stdlib"), eval_pairs=(4, 8, 16, 32, 64),
        passkey_lengths=(512, 1024, 2048), eval_batches=4, eval_batch_size=32,
        throughput_lengths=(2048, 16384, 65536),
        throughput_models=("softmax", "lightning", "hybrid 7:1"), dtype="bfloat16",
        time_budget_s=500.0),
}


def patterns(num_layers: int) -> dict[str, str]:
    """The four models' layer patterns, e.g. 8 layers: SSSSSSSS, LLLLLLLL, LLLLLLLS, LLLSLLLS."""
    three = ("LLLS" * (num_layers // 4 + 1))[:num_layers]
    return {"softmax": "S" * num_layers, "lightning": "L" * num_layers,
            "hybrid 7:1": attention_pattern("hybrid", num_layers),
            "hybrid 3:1": three if "S" in three else three[:-1] + "S"}


def _config(p: Preset, pattern: str, mlp_dim: int) -> Config:
    longest = max((p.seq_len, *p.passkey_lengths, *p.throughput_lengths))
    return Config(d_model=p.d_model, num_layers=p.num_layers, num_heads=p.num_heads,
                  mlp_dim=mlp_dim, layer_pattern=pattern, max_seq_len=longest,
                  attention_impl=p.attention_impl, dtype=jnp.dtype(p.dtype))


def _num_params(cfg: Config) -> int:
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))).num_params()


def equal_param_configs(p: Preset) -> dict[str, Config]:
    """One Config per model, each MLP widened so the model has as many parameters as the
    all-lightning one (the most attention parameters) to within one MLP column per layer."""
    pats = patterns(p.num_layers)
    target = _num_params(_config(p, pats["lightning"], p.mlp_dim))
    out = {}
    for name, pattern in pats.items():
        if any(c.layer_pattern == pattern for c in out.values()):
            continue  # fewer than 8 layers: the 7:1 and 3:1 periods cut to the same pattern
        short = target - _num_params(_config(p, pattern, p.mlp_dim))
        # An MLP column is 3 D parameters in each of the L layers.
        out[name] = _config(p, pattern, p.mlp_dim + round(short / (3 * p.d_model * p.num_layers)))
    return out


# ----------------------------------------------------------------------------- data


def _mqar(p: Preset, pairs: int, seq_len: int | None = None) -> MQAR:
    return MQAR(seq_len=seq_len or p.seq_len, num_kv_pairs=pairs, queries_with_replacement=True)


def training_batches(p: Preset) -> Any:
    """Yields (task, batch) for steps 0 .. steps-1: the same sequence for every model."""
    sources = {name: make_dataset(name, seq_len=p.seq_len) for name in set(p.mix) - {"mqar"}}
    counters = dict.fromkeys(p.mix, 0)
    for i in range(p.steps):
        task = p.mix[i % len(p.mix)]
        j = counters[task]
        counters[task] += 1
        if task == "mqar":
            stage = min(len(p.pairs) - 1, i * len(p.pairs) // p.steps)
            yield task, _mqar(p, p.pairs[stage]).batch(j, p.batch_size)
        else:
            yield task, sources[task].batch(j, p.batch_size)


# ----------------------------------------------------------------------------- train, evaluate


def train(cfg: Config, p: Preset, log: Progress, name: str) -> tuple[Transformer, dict[str, Any]]:
    """``p.steps`` AdamW steps (warm-up, cosine) on :func:`training_batches`; returns the model
    and {task: [(step, loss, accuracy), ...]}, the seconds spent and the mean step time."""
    tc = TrainConfig(steps=p.steps, batch_size=p.batch_size, seq_len=p.seq_len, lr=p.lr,
                     warmup_steps=p.warmup_steps, min_lr_ratio=p.min_lr_ratio,
                     dtype=p.dtype, fast_compile=p.fast_compile)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(tc)
    opt_state = tx.init(params)
    step_fn = make_train_step(graphdef, rest, tx, tc)
    curves: dict[str, list[tuple[int, float, float]]] = {}
    every = max(1, p.steps // 10)
    t0 = time.perf_counter()
    t_first = None
    for i, (task, batch) in enumerate(training_batches(p)):
        params, opt_state, m = step_fn(params, opt_state, batch, jnp.asarray(i))
        if i == 0:
            jax.block_until_ready(params)
            t_first = time.perf_counter()
        if i % every == 0 or i == p.steps - 1:
            loss, acc = float(m["loss"]), float(m["accuracy"])
            curves.setdefault(task, []).append((i, loss, acc))
            log(f"{name} step {i + 1}/{p.steps} {task} loss {loss:.3f} accuracy {acc:.3f}")
    jax.block_until_ready(params)
    t1 = time.perf_counter()
    timing = dict(compile_and_first_step_s=t_first - t0,
                  step_ms=1e3 * (t1 - t_first) / max(1, p.steps - 1))
    return nnx.merge(graphdef, params, rest), dict(curves=curves, **timing)


def _eval_fn(model: Transformer) -> Any:
    """Jitted ``batch -> (loss_sum, hits, count, rows_all_right, rows_with_targets)`` over the
    masked targets (a passkey row holds one key: all its targets right = the key retrieved)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def fn(params: Any, batch: Batch) -> Any:
        logits, _ = nnx.merge(graphdef, params, rest)(
            batch.inputs, positions=batch.positions, segment_ids=batch.segment_ids)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)
        right = (jnp.argmax(logits, -1) == batch.targets) * batch.mask
        has = batch.mask.sum(-1) > 0
        all_right = (right.sum(-1) == batch.mask.sum(-1)) & has
        return ((ce * batch.mask).sum(), right.sum(), batch.mask.sum(), all_right.sum(),
                has.sum())

    return lambda batch: [float(x) for x in jax.device_get(fn(params, batch))]


def _evaluate(fn: Any, data: Any, p: Preset) -> dict[str, float]:
    tot = np.zeros(5)
    for i in range(p.eval_batches):
        tot += fn(data.batch(i, p.eval_batch_size, split="validation"))
    loss, hits, count, rows_right, rows = (float(x) for x in tot)
    return dict(loss=loss / max(count, 1), accuracy=hits / max(count, 1),
                row_accuracy=rows_right / max(rows, 1))


def evaluate(model: Transformer, p: Preset) -> dict[str, Any]:
    """MQAR accuracy per number of pairs, passkey accuracy per length, validation loss."""
    fn = _eval_fn(model)
    out: dict[str, Any] = {"mqar": [], "passkey": []}
    for n in p.eval_pairs:
        r = _evaluate(fn, _mqar(p, n, max(p.seq_len, 4 * n - 1)), p)
        out["mqar"].append(dict(pairs=n, accuracy=r["accuracy"], chance=1.0 / n))
    for t in p.passkey_lengths:
        r = _evaluate(fn, Passkey(seq_len=t), p)
        out["passkey"].append(dict(seq_len=t, times_train_length=t / p.seq_len,
                                   digit_accuracy=r["accuracy"], key_accuracy=r["row_accuracy"]))
    if "stdlib" in p.mix:
        out["val_loss"] = _evaluate(fn, make_dataset("stdlib", seq_len=p.seq_len), p)["loss"]
    return out


# ----------------------------------------------------------------------------- throughput


def _timed(fn: Any, repeats: int) -> float:
    """Median seconds of ``fn()`` (waited for) after one untimed call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _tokens_per_s(graphdef: Any, params: Any, rest: Any, t: int,
                  p: Preset) -> tuple[float | None, float]:
    """(training, prefill) tokens/s of one sequence of ``t`` random tokens (training None
    unless ``p.throughput_train``)."""
    tokens = np.random.default_rng(t).integers(0, 256, size=(1, t + 1), dtype=np.int32)
    batch = Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], mask=np.ones((1, t), np.float32),
                  segment_ids=np.ones((1, t), np.int32),
                  positions=np.arange(t, dtype=np.int32)[None])
    repeats = p.throughput_repeats
    tc = TrainConfig(steps=repeats + 2, batch_size=1, seq_len=t, warmup_steps=1, dtype=p.dtype,
                     fast_compile=p.fast_compile)
    forward = jax.jit(lambda prm, x: nnx.merge(graphdef, prm, rest)(x)[0])
    prefill = t / _timed(lambda: forward(params, batch.inputs), repeats)
    if not p.throughput_train:
        return None, prefill
    tx = make_optimizer(tc)
    step_fn = make_train_step(graphdef, rest, tx, tc)
    state = [jax.tree.map(jnp.copy, params)]  # the step donates its parameters
    state.append(tx.init(state[0]))

    def train_step() -> Any:
        state[0], state[1], m = step_fn(state[0], state[1], batch, jnp.asarray(1))
        return m["loss"]

    return t / _timed(train_step, repeats), prefill


def throughput(model: Transformer, p: Preset, log: Progress, name: str,
               deadline: float = math.inf) -> list[dict[str, Any]]:
    """Tokens/s of one training step and one prefill (forward to the logits) of a single
    sequence at each ``throughput_lengths``; stops at the first length that fails, and skips
    the lengths left once ``time.perf_counter()`` passes ``deadline``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rows = []
    for t in p.throughput_lengths:
        if time.perf_counter() > deadline:
            rows.append(dict(seq_len=t, skipped="time budget"))
            log(f"{name} T={t}: skipped (time budget)")
            continue
        try:
            train_tps, prefill_tps = _tokens_per_s(graphdef, params, rest, t, p)
        except Exception as e:  # noqa: BLE001 - out of memory ends the sweep; record it
            rows.append(dict(seq_len=t, error=str(e).splitlines()[0][:300]))
            log(f"{name} T={t}: {rows[-1]['error']}")
            break
        rows.append(dict(seq_len=t, train_tokens_per_s=train_tps,
                         prefill_tokens_per_s=prefill_tps))
        train = "" if train_tps is None else f"train {train_tps:,.0f} tokens/s, "
        log(f"{name} T={t}: {train}prefill {prefill_tps:,.0f} tokens/s")
    return rows


# ----------------------------------------------------------------------------- run, plot


def run(p: Preset, log: Progress) -> dict[str, Any]:
    t_start = time.perf_counter()
    models = []
    for name, cfg in equal_param_configs(p).items():
        model, training = train(cfg, p, log, name)
        row = dict(model=name, layer_pattern=cfg.layer_pattern, mlp_dim=cfg.mlp_dim,
                   num_params=model.num_params(), training=training, **evaluate(model, p))
        mq = ", ".join(f"{r['pairs']}: {r['accuracy']:.2f}" for r in row["mqar"])
        pk = ", ".join(f"{r['seq_len']}: {r['key_accuracy']:.2f}" for r in row["passkey"])
        log(f"{name}: MQAR accuracy by pairs {{{mq}}}; passkey by length {{{pk}}}")
        if name in p.throughput_models:
            budget = math.inf if p.time_budget_s is None else p.time_budget_s
            row["throughput"] = throughput(model, p, log, name, t_start + budget)
        models.append(row)
    counts = [m["num_params"] for m in models]
    return dict(models=models, params_spread=(max(counts) - min(counts)) / max(counts),
                tokens_per_model=p.steps * p.batch_size * p.seq_len,
                wall_s=time.perf_counter() - t_start)


def plot(result: dict[str, Any], title: str, device: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    panels = ["mqar"] + [k for k in ("passkey", "throughput") if any(m.get(k) for m in models)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False,
                             layout="constrained")
    axes = dict(zip(panels, axes[0]))
    ax1 = axes["mqar"]
    pairs = [r["pairs"] for r in models[0]["mqar"]]
    for m in models:
        ax1.plot(pairs, [r["accuracy"] for r in m["mqar"]], "o-", label=m["model"])
    ax1.plot(pairs, [1 / n for n in pairs], "k:", label="chance (1 / pairs)")
    ax1.set(xscale="log", xlabel="key-value pairs in context", ylabel="MQAR answer accuracy",
            title="associative recall", ylim=(0, 1.02))
    ax1.minorticks_off()
    ax1.set_xticks(pairs, [str(n) for n in pairs])
    if "passkey" in axes:
        ax2 = axes["passkey"]
        lengths = [r["seq_len"] for r in models[0]["passkey"]]
        for m in models:
            line, = ax2.plot(lengths, [r["key_accuracy"] for r in m["passkey"]], "o-",
                             label=f"{m['model']}: whole key")
            ax2.plot(lengths, [r["digit_accuracy"] for r in m["passkey"]], "x--",
                     color=line.get_color(), label=f"{m['model']}: digits")
        ax2.axhline(0.1, color="k", ls=":", label="digit chance")
        ax2.set(xscale="log", xlabel="sequence length (train length first)", ylim=(-0.02, 1.02),
                ylabel="passkey accuracy", title="needle retrieval")
        ax2.minorticks_off()
        ax2.set_xticks(lengths, [str(n) for n in lengths])
    if "throughput" in axes:
        ax3 = axes["throughput"]
        for m in models:
            tp = [r for r in m.get("throughput", []) if "prefill_tokens_per_s" in r]
            if tp:
                x = [r["seq_len"] for r in tp]
                line, = ax3.plot(x, [r["prefill_tokens_per_s"] for r in tp], "s--",
                                 label=f"{m['model']} prefill")
                if tp[0]["train_tokens_per_s"] is not None:
                    ax3.plot(x, [r["train_tokens_per_s"] for r in tp], "o-",
                             color=line.get_color(), label=f"{m['model']} train")
        ax3.set(xscale="log", yscale="log", xlabel="sequence length (batch 1)",
                ylabel="tokens / s", title=f"throughput ({device})")
        lengths = sorted({r["seq_len"] for m in models for r in m.get("throughput", [])})
        ax3.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax3.set_xticks(lengths, [str(n) for n in lengths])
    for ax in axes.values():
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def main(argv=None) -> int:
    return run_experiment(
        "minimax_hybrid", __doc__, PRESETS, argv, run,
        lambda result, title: plot(result, title, device_name()),
        "MiniMax-01 hybrid vs softmax vs lightning",
        lambda p: dataclasses.asdict(p) | dict(patterns=patterns(p.num_layers)))


if __name__ == "__main__":
    raise SystemExit(main())
