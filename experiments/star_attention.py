"""Star Attention reproduction: long-context retrieval with global attention against Star
Attention's blockwise context phase with the first block, no block or the previous block as
the anchor (the paper's anchor ablation, arXiv 2411.17116).

Setup (PAPERS.md section 1): one RoPE softmax decoder trained with ordinary causal attention
on token-level retrieval rows ``BOS <context> QUERY name <answer>`` (``attnlab.data``): a
needle in a haystack (RULER's NIAH), four needles of which one is asked (multi-key) and
variable tracking (chains of ``hops`` assignments: multi-hop), in turn, one task per step.
Star Attention is inference only: the same trained model is evaluated by

* ``global``: :func:`attnlab.nn.generate` (full causal attention);
* ``star, 1 block``: :func:`attnlab.nn.star_generate` with the whole context as one block,
  which is global attention (the record says whether its answers equal ``global``'s);
* ``star, first`` / ``star, none`` / ``star, previous``: the context in ``num_blocks`` blocks
  (the paper's 4 hosts, a quarter of the context each), each block anchored by the first
  block (the paper's method), by nothing, or by the block before it; the query and the
  answer are decoded with exact attention over the whole cache.

Accuracy is the share of examples whose whole answer (``value_len`` tokens, greedy) is right,
at the training context length and longer ones, on validation examples.

``python experiments/star_attention.py --preset tiny`` (CPU, under a minute: every code path,
at a size that learns little), ``--preset cpu`` (a few minutes on 2 CPU cores: whether the
anchor ordering holds at small scale) or ``--preset full`` (one GPU: 110 s on an H100).
Writes ``experiments/results/star_attention_<preset>.{json,png}``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.data import NeedleInHaystack, VariableTracking
from attnlab.nn import Config, StarConfig, Transformer, generate, star_generate
from attnlab.train import TrainConfig, make_optimizer
from attnlab.train.trainer import make_train_step
from experiments._common import Progress, run_experiment

VALUE_LEN = 2
# The anchors of the paper's ablation, in the order the plot shows them.
ANCHORS = ("first", "none", "previous")
METHODS = ("global", "star, 1 block", *(f"star, {a}" for a in ANCHORS))


@dataclasses.dataclass(frozen=True)
class Preset:
    d_model: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    steps: int
    batch_size: int
    context_len: int  # training context (BOS + haystack), a multiple of num_blocks
    lr: float
    warmup_steps: int
    tasks: tuple[str, ...]  # names in TASKS; trained in turn, each evaluated
    num_blocks: int  # Star Attention's context blocks (hosts)
    eval_lengths: tuple[int, ...]  # context lengths evaluated, the training one first
    eval_batches: int
    eval_batch_size: int
    dtype: str = "float32"
    attention_impl: str = "auto"
    fast_compile: bool = False
    train_budget_s: float | None = None  # training stops after this many seconds (recorded)
    # Shorter training contexts first: the steps are split equally over these lengths and
    # context_len (a model trained from scratch on 2K-token haystacks does not find the
    # needle; one that learned retrieval on short ones extends it).
    curriculum: tuple[int, ...] = ()


# name -> (task class, options): what the JSON and the plot call each task.
TASKS: dict[str, tuple[type, dict[str, int]]] = {
    "niah": (NeedleInHaystack, dict(num_needles=1)),
    "multikey": (NeedleInHaystack, dict(num_needles=4)),
    "vt 2 hops": (VariableTracking, dict(hops=2, num_chains=2)),
    "vt 3 hops": (VariableTracking, dict(hops=3, num_chains=2)),
}

PRESETS = {
    # CPU, under a minute: every code path (training, the five evaluations) at a size that
    # does not learn retrieval yet.
    "tiny": Preset(
        d_model=32, num_layers=2, num_heads=2, mlp_dim=64, steps=30, batch_size=8,
        context_len=64, lr=3e-3, warmup_steps=5, tasks=("niah", "multikey", "vt 2 hops"),
        num_blocks=4, eval_lengths=(64,), eval_batches=1, eval_batch_size=8,
        attention_impl="xla", fast_compile=True),
    # About 8 minutes on 2 shared CPU cores: a 4-layer model on a 128-token context (4
    # blocks of 32), evaluated at 128 and 256 tokens, 128 examples per task and length.
    "cpu": Preset(
        d_model=64, num_layers=4, num_heads=4, mlp_dim=192, steps=1500, batch_size=32,
        context_len=128, lr=3e-3, warmup_steps=50, tasks=("niah", "multikey", "vt 2 hops"),
        num_blocks=4, eval_lengths=(128, 256), eval_batches=4, eval_batch_size=32,
        attention_impl="reference"),
    # One H100, a few minutes: PAPERS.md's small reproduction, a 4-layer d 256 RoPE decoder
    # trained through contexts of 128, 256, 512, 1K and 2K tokens (2,000 steps of 16 rows at
    # each), evaluated at 2K (4 blocks of 512) and 4K.
    "full": Preset(
        d_model=256, num_layers=4, num_heads=4, mlp_dim=1024, steps=10000, batch_size=16,
        context_len=2048, lr=1e-3, warmup_steps=200, curriculum=(128, 256, 512, 1024),
        tasks=("niah", "multikey", "vt 2 hops", "vt 3 hops"), num_blocks=4,
        eval_lengths=(2048, 4096), eval_batches=8, eval_batch_size=32, dtype="bfloat16",
        train_budget_s=330.0),
}


def make_task(name: str, context_len: int, seed: int = 0) -> Any:
    """Task ``name`` whose rows hold ``context_len`` context tokens, the query and answer."""
    cls, options = TASKS[name]
    return cls(seq_len=context_len + 2 + VALUE_LEN - 1, seed=seed, value_len=VALUE_LEN,
               **options)


def model_config(p: Preset) -> Config:
    longest = max(p.context_len, *p.eval_lengths) + 2 + VALUE_LEN
    return Config(d_model=p.d_model, num_layers=p.num_layers, num_heads=p.num_heads,
                  mlp_dim=p.mlp_dim, layer_pattern="S" * p.num_layers, max_seq_len=longest,
                  attention_impl=p.attention_impl, dtype=jnp.dtype(p.dtype))


def train(p: Preset, log: Progress) -> tuple[Transformer, dict[str, Any]]:
    """``p.steps`` AdamW steps on the tasks in turn (through the curriculum's lengths, then
    ``context_len``); returns the model and the loss curves."""
    lengths = (*p.curriculum, p.context_len)
    if list(lengths) != sorted(set(lengths)) or lengths[0] < 1:
        raise ValueError(f"curriculum must be increasing positive lengths shorter than "
                         f"context_len={p.context_len}, got {p.curriculum}")
    stages = [[make_task(name, c) for name in p.tasks] for c in lengths]
    tasks = stages[-1]
    tc = TrainConfig(steps=p.steps, batch_size=p.batch_size, seq_len=tasks[0].seq_len, lr=p.lr,
                     warmup_steps=p.warmup_steps, min_lr_ratio=0.1, dtype=p.dtype,
                     fast_compile=p.fast_compile)
    model = Transformer(model_config(p), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(tc)
    opt_state = tx.init(params)
    step_fn = make_train_step(graphdef, rest, tx, tc)
    curves: dict[str, list[tuple[int, float, float]]] = {name: [] for name in p.tasks}
    rounds = p.steps // len(tasks)
    every = max(1, rounds // 20)  # record one step of each task every `every` rounds
    t0 = time.perf_counter()
    steps_done = p.steps
    for i in range(p.steps):
        if p.train_budget_s is not None and time.perf_counter() - t0 > p.train_budget_s:
            steps_done = i
            log(f"training stopped at step {i} of {p.steps}: time budget {p.train_budget_s} s")
            break
        k, r = i % len(tasks), i // len(tasks)
        stage = min(i * len(stages) // p.steps, len(stages) - 1)
        batch = stages[stage][k].batch(r, p.batch_size)
        params, opt_state, m = step_fn(params, opt_state, batch, jnp.asarray(i))
        if r % every == 0 or r >= rounds - 1:
            loss, acc = float(m["loss"]), float(m["accuracy"])
            curves[p.tasks[k]].append((i, loss, acc))
            if k == 0:
                log(f"step {i + 1}/{p.steps} {p.tasks[k]} at {lengths[stage]} tokens: loss "
                    f"{loss:.3f} accuracy {acc:.3f}")
    jax.block_until_ready(params)
    return nnx.merge(graphdef, params, rest), dict(curves=curves, steps_done=steps_done,
                                                   curriculum=list(lengths),
                                                   train_s=time.perf_counter() - t0)


def _answers(model: Transformer, prompts: np.ndarray, method: str, c: int,
             num_blocks: int) -> np.ndarray:
    """[B, VALUE_LEN] greedy answers of ``method`` to prompts whose first c tokens are the
    context."""
    if method == "global":
        out = generate(model, prompts, VALUE_LEN)
    else:
        anchor = method.removeprefix("star, ")
        star = (StarConfig(block_size=c) if anchor == "1 block"
                else StarConfig(block_size=c // num_blocks, anchor=anchor))
        out = star_generate(model, prompts, VALUE_LEN, star=star, context_length=c)
    return np.asarray(out)[:, prompts.shape[1]:]


def evaluate(model: Transformer, p: Preset, log: Progress) -> list[dict[str, Any]]:
    """One row per (task, context length): every method's whole-answer and token accuracy,
    and whether the one-block Star answers equal the global ones (in float32 they do; in
    bfloat16 a near tie may round the other way, so the share of equal tokens is kept too)."""
    rows = []
    for c in p.eval_lengths:
        for name in p.tasks:
            task = make_task(name, c)
            got: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
            answers = []
            for i in range(p.eval_batches):
                prompts, ans = task.prompts(i, p.eval_batch_size)
                answers.append(ans)
                for m in METHODS:
                    got[m].append(_answers(model, prompts, m, c, p.num_blocks))
            want = np.concatenate(answers)
            out = {m: np.concatenate(v) for m, v in got.items()}
            row = dict(task=name, context_len=c, times_train_length=c / p.context_len,
                       block_size=c // p.num_blocks, examples=len(want),
                       single_block_equals_global=bool(
                           np.array_equal(out["star, 1 block"], out["global"])),
                       single_block_agreement=float(
                           (out["star, 1 block"] == out["global"]).mean()),
                       accuracy={m: float((o == want).all(-1).mean()) for m, o in out.items()},
                       token_accuracy={m: float((o == want).mean()) for m, o in out.items()})
            g = row["accuracy"]["global"]
            row["relative_to_global"] = {m: (a / g if g > 0 else None)
                                         for m, a in row["accuracy"].items()}
            rows.append(row)
            acc = ", ".join(f"{m}: {a:.2f}" for m, a in row["accuracy"].items())
            log(f"{name} at {c} tokens: {acc}")
    return rows


def run(p: Preset, log: Progress) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, training = train(p, log)
    rows = evaluate(model, p, log)
    return dict(num_params=model.num_params(), training=training, evaluation=rows,
                methods=list(METHODS), wall_s=time.perf_counter() - t0)


def plot(result: dict[str, Any], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["evaluation"]
    lengths = sorted({r["context_len"] for r in rows})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(lengths) + 1, figsize=(5 * (len(lengths) + 1), 4.2),
                             squeeze=False, layout="constrained")
    width = 0.8 / len(METHODS)
    for ax, c in zip(axes[0], lengths):
        by_task = {r["task"]: r for r in rows if r["context_len"] == c}
        for j, m in enumerate(METHODS):
            acc = [by_task[t]["accuracy"][m] for t in tasks]
            ax.bar(np.arange(len(tasks)) + (j - (len(METHODS) - 1) / 2) * width, acc, width,
                   label=m)
        block = next(iter(by_task.values()))["block_size"]
        ax.set(ylim=(0, 1.05), ylabel="whole-answer accuracy",
               title=f"context {c} tokens (blocks of {block})")
        ax.set_xticks(np.arange(len(tasks)), tasks)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for name, pts in result["training"]["curves"].items():
        if pts:
            ax.plot([s for s, _, _ in pts], [loss for _, loss, _ in pts], label=name)
    ax.set(xlabel="step", ylabel="training loss (answer tokens)", yscale="log",
           title="training (global attention)")
    ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def main(argv=None) -> int:
    return run_experiment(
        "star_attention", __doc__, PRESETS, argv, run, plot,
        "Star Attention anchors vs global attention",
        lambda p: dataclasses.asdict(p) | dict(
            value_len=VALUE_LEN, task_options={t: TASKS[t][1] for t in p.tasks}))


if __name__ == "__main__":
    raise SystemExit(main())
