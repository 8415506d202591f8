"""TransMLA reproduction: convert a trained GQA model to MLA exactly, compress its KV cache by
RoRoPE + BKV-PCA at several latent ranks, fine-tune briefly, and plot validation loss against
the KV cache per token.

Setup: a byte-level GQA Transformer trained on the Python standard library's source
(``attnlab.data.StdlibCorpus``), then

1. the exact conversion (:func:`attnlab.convert.gqa_to_mla`): the validation loss must not
   change (the MLA form holds the same 2 K H values per token);
2. for each rank d_c: :func:`attnlab.convert.transmla` (calibrated on training batches), the
   validation loss right after conversion, then after ``finetune_steps`` steps of training
   at ``finetune_lr`` (below the pre-training peak: re-warming to it costs the trained
   model more than the short run gives back);
3. the GQA model trained the same extra steps, so the comparison spends equal compute.

``python experiments/transmla.py --preset tiny`` (CPU, under a minute) or ``--preset full``
(one GPU, under 10 minutes). Writes ``experiments/results/transmla_<preset>.{json,png}``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
from flax import nnx

from attnlab.convert import gqa_to_mla, transmla
from attnlab.data import make_dataset
from attnlab.nn import Config, Transformer
from attnlab.nn.mla import MultiHeadLatentAttention
from attnlab.train import TrainConfig, make_optimizer
from attnlab.train.trainer import make_eval_step, make_train_step
from experiments._common import Progress, run_experiment


@dataclasses.dataclass(frozen=True)
class Preset:
    model: Config
    train_steps: int
    finetune_steps: int
    batch_size: int
    seq_len: int
    lr: float
    finetune_lr: float
    ranks: tuple[int, ...]
    eval_batches: int
    calib_batches: int


PRESETS = {
    "tiny": Preset(
        model=Config(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     max_seq_len=64, attention_impl="xla"),
        train_steps=60, finetune_steps=15, batch_size=8, seq_len=64, lr=3e-3,
        finetune_lr=1e-3, ranks=(16, 32, 48), eval_batches=4, calib_batches=2),
    "full": Preset(
        model=Config(d_model=512, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64,
                     max_seq_len=512, dtype=jnp.bfloat16),
        train_steps=6000, finetune_steps=1000, batch_size=32, seq_len=512, lr=1e-3,
        finetune_lr=2e-4, ranks=(32, 64, 128, 192), eval_batches=64, calib_batches=4),
}


def _train(model: Transformer, steps: int, start: int, lr: float, p: Preset, data: Any,
           log: Progress, what: str) -> Transformer:
    """``steps`` AdamW steps (warmup, cosine, peak ``lr``) on training batches ``start ..``;
    returns the trained model."""
    if steps == 0:
        return model
    tc = TrainConfig(steps=steps, batch_size=p.batch_size, seq_len=p.seq_len, lr=lr,
                     warmup_steps=max(1, steps // 10), log_every=max(1, steps // 5))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(tc)
    opt_state = tx.init(params)
    step_fn = make_train_step(graphdef, rest, tx, tc)
    for i in range(steps):
        batch = data.batch(start + i, p.batch_size, split="train")
        params, opt_state, m = step_fn(params, opt_state, batch, jnp.asarray(i))
        if (i + 1) % tc.log_every == 0 or i == 0:
            log(f"{what} step {i + 1}/{steps} loss {float(m['loss']):.3f}")
    return nnx.merge(graphdef, params, rest)


def _val_loss(model: Transformer, p: Preset, data: Any) -> float:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tc = TrainConfig(steps=1, batch_size=p.batch_size, seq_len=p.seq_len, warmup_steps=0)
    step = make_eval_step(graphdef, rest, tc)
    total = count = 0.0
    for i in range(p.eval_batches):
        ls, _, c = jax.device_get(step(params, data.batch(i, p.batch_size, split="validation")))
        total, count = total + float(ls), count + float(c)
    return total / max(count, 1.0)


def _kv_values_per_token(cfg: Config) -> int:
    """Cache values per token per layer: 2 K H (GQA, and its exact MLA form) or d_c + d_R."""
    if cfg.layer_pattern[0] == "M" and cfg.mla_rope == "decoupled":
        return int(MultiHeadLatentAttention.cache_bytes_per_token(cfg, dtype_bytes=1))
    return 2 * cfg.num_kv_heads * cfg.head_dim


def run(p: Preset, log: Progress) -> dict[str, Any]:
    data = make_dataset("stdlib", seq_len=p.seq_len, seed=0)
    gqa = Transformer(p.model, rngs=nnx.Rngs(0))
    gqa = _train(gqa, p.train_steps, 0, p.lr, p, data, log, "GQA")
    base = _val_loss(gqa, p, data)
    log(f"GQA validation loss {base:.4f}")
    exact = gqa_to_mla(gqa)
    exact_loss = _val_loss(exact, p, data)
    log(f"exact MLA form: validation loss {exact_loss:.4f} (GQA {base:.4f})")
    calib = jnp.concatenate([data.batch(10_000 + i, p.batch_size, split="train").inputs
                             for i in range(p.calib_batches)])
    rows = [dict(model="GQA", kv_values_per_token=_kv_values_per_token(gqa.cfg),
                 val_loss=base, val_loss_finetuned=None)]
    for d_c in p.ranks:
        mla = transmla(gqa, calib, kv_lora_rank=d_c)
        before = _val_loss(mla, p, data)
        tuned = _train(mla, p.finetune_steps, p.train_steps, p.finetune_lr, p, data, log,
                       f"MLA d_c={d_c}")
        after = _val_loss(tuned, p, data)
        log(f"MLA d_c={d_c}: validation loss {before:.4f} -> {after:.4f} after fine-tuning")
        rows.append(dict(model=f"MLA d_c={d_c}", kv_lora_rank=d_c,
                         qk_rope_head_dim=mla.cfg.qk_rope_head_dim,
                         kv_values_per_token=_kv_values_per_token(mla.cfg), val_loss=before,
                         val_loss_finetuned=after))
    gqa_more = _train(gqa, p.finetune_steps, p.train_steps, p.finetune_lr, p, data, log,
                      "GQA (equal compute)")
    rows[0]["val_loss_finetuned"] = _val_loss(gqa_more, p, data)
    return dict(exact_conversion=dict(val_loss_gqa=base, val_loss_exact_mla=exact_loss,
                                      abs_diff=abs(exact_loss - base)), rows=rows)


def plot(result: dict[str, Any], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = result["rows"]
    gqa, mla = rows[0], rows[1:]
    x = [r["kv_values_per_token"] for r in mla]
    ax.plot(x, [r["val_loss"] for r in mla], "o--", label="MLA after conversion")
    ax.plot(x, [r["val_loss_finetuned"] for r in mla], "o-", label="MLA after fine-tuning")
    ax.plot([gqa["kv_values_per_token"]], [gqa["val_loss"]], "ks", label="GQA")
    ax.plot([gqa["kv_values_per_token"]], [gqa["val_loss_finetuned"]], "k^",
            label="GQA, same extra steps")
    for r in mla:
        ax.annotate(f"d_c={r['kv_lora_rank']}", (r["kv_values_per_token"], r["val_loss"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("KV cache values per token per layer")
    ax.set_ylabel("validation loss (nats / byte)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def _setup(p: Preset) -> dict[str, Any]:
    model = dataclasses.asdict(p.model) | {"dtype": str(p.model.dtype),
                                           "param_dtype": str(p.model.param_dtype)}
    return dict(model=model, **{k: v for k, v in dataclasses.asdict(p).items() if k != "model"})


def main(argv=None) -> int:
    return run_experiment("transmla", __doc__, PRESETS, argv, run, plot,
                          "TransMLA on the stdlib corpus", _setup)


if __name__ == "__main__":
    raise SystemExit(main())
