"""Section 5 of ``attnlab demo``: a tiny model trained on MQAR, its loss plot, and answers
generated from its checkpoint."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from attnlab.cli.common import progress

if TYPE_CHECKING:
    from rich.console import Console


def training_section(console: Console, args: argparse.Namespace, report: dict[str, Any]) -> int:
    """Section 5 of the demo: trains the ``tiny`` preset (7:1 hybrid when lightning is
    registered) on MQAR, plots the loss, and answers fresh MQAR queries with ``generate``.
    Returns the number of failed checks (the loss must fall)."""
    import tempfile
    from pathlib import Path

    import jax.numpy as jnp
    import numpy as np
    from rich.rule import Rule
    from rich.table import Table

    from attnlab.data import MQAR
    from attnlab.nn import generate, mechanisms
    from attnlab.train import load_run, load_run_config, plot_losses, read_metrics, train

    attention = "hybrid" if "L" in mechanisms() else "softmax"
    model, tc = load_run_config("tiny", attention=attention, seed=args.seed)
    console.print(Rule(f"[bold]5. training a tiny {attention} model on MQAR"))
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="attnlab-demo-"))
    note = "" if attention == "hybrid" else " (lightning is not registered: all softmax)"
    console.print(
        f"layer pattern {model.layer_pattern}{note}, d_model {model.d_model}, {tc.steps} steps "
        f"of {tc.batch_size} x {tc.seq_len} tokens; multi-query associative recall with "
        f"{tc.task_options['num_kv_pairs']} key-value pairs per example (chance over the 128 "
        f"values: loss {np.log(128):.2f}); run directory {run_dir}", highlight=False)
    with progress(console) as prog:
        task = prog.add_task("training", total=tc.steps)

        def on_log(rec: dict[str, Any]) -> None:
            if "loss" in rec and rec.get("loss") is not None:
                prog.update(task, completed=rec["step"],
                            description=f"training: loss {rec['loss']:.3f}")

        res = train(model, tc, run_dir, progress=False, on_log=on_log)
    pairs = tc.task_options["num_kv_pairs"]
    png = plot_losses(res.metrics_path, run_dir / "loss.png",
                      title=f"MQAR, pattern {model.layer_pattern}",
                      references={"chance over the 128 values": float(np.log(128)),
                                  f"uniform over the {pairs} values in context":
                                  float(np.log(pairs))})
    losses = [r for r in read_metrics(res.metrics_path) if r.get("accuracy") is not None]
    first, last = losses[0], losses[-1]
    tps = [r["tokens_per_s"] for r in losses if r.get("tokens_per_s")]
    console.print(
        f"loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step "
        f"{last['step']}; validation loss {res.validation['val_loss']:.3f}, answer accuracy "
        f"{res.validation['val_accuracy']:.1%}; {np.median(tps):,.0f} tokens/s; "
        f"{res.num_params:,} parameters", highlight=False)
    console.print(
        f"[dim]A model that picks one of the {pairs} values in its context at random scores "
        f"loss {np.log(pairs):.2f} and {1 / pairs:.0%}; recalling the right one (the induction "
        "circuit) takes this model far more steps than a demo minute.[/]")
    console.print(f"loss plot: {png}", markup=False, highlight=False)

    # Sample generations: fresh examples, the prompt ends with the first query key.
    run = load_run(run_dir)
    mqar = MQAR(seq_len=tc.seq_len, **tc.task_options)
    rng = np.random.default_rng([args.seed, 12345])
    examples = [mqar.example(rng)[0] for _ in range(6)]
    n = mqar.num_kv_pairs
    prompts = jnp.asarray(np.stack([e[: 2 * n + 1] for e in examples]))
    out = np.asarray(generate(run.model, prompts, 1))
    table = Table(title=f"generate() from checkpoint step {run.step}: the answer to the first "
                  "query of fresh examples", title_justify="left")
    for col in ("key:value pairs in context", "query", "generated", "true", ""):
        table.add_column(col)
    right = 0
    for e, o in zip(examples, out):
        pairs = " ".join(f"{k}:{v}" for k, v in zip(e[: 2 * n : 2], e[1 : 2 * n : 2]))
        ok = int(o[-1]) == int(e[2 * n + 1])
        right += ok
        table.add_row(pairs, str(e[2 * n]), str(o[-1]), str(e[2 * n + 1]),
                      "[green]right[/]" if ok else "[red]wrong[/]")
    console.print(table)
    report["train"] = {"run_dir": str(run_dir), "loss_png": str(png),
                       "layer_pattern": model.layer_pattern, "first": first, "last": last,
                       "validation": res.validation, "generated_right": right,
                       "generated_total": len(examples)}
    fell = last["loss"] < first["loss"] - 0.5
    if not fell:
        console.print("[bold red]FAIL[/] the training loss did not fall by 0.5 nats")
    return 0 if fell else 1
