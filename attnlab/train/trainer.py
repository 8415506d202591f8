"""The training loop: data- and sequence-parallel AdamW steps, exact resume from orbax
checkpoints, a NaN/inf guard, JSONL metrics with tokens/s and MFU, validation, and loading a run
for eval/generation.

Sequence parallelism (``TrainConfig.seq_parallel`` > 1): the mesh gets an ``sp`` axis, batches
are put ``P("data", "sp")``, and the model is built with the plan of
:func:`attnlab.train.mesh.model_parallel`, so each attention layer attends across ``sp`` by its
mechanism's rule in ``sharding/``; GSPMD splits the per-token rest of the model.

Layout of a run directory::

    config.json      {"model": Config fields, "train": TrainConfig fields}
    metrics.jsonl    one record per logged step (and per evaluation)
    checkpoints/     orbax steps: params, opt_state, rng + {"step", "data_cursor", ...}

Exact resume: batch i is a pure function of (seed, i) (see :mod:`attnlab.data`), the step RNG
is ``fold_in(key(seed), i)``, and a checkpoint holds everything else, so a run killed at any
point and restarted with the same command continues the identical loss curve.
If the newest checkpoint is damaged, the restart resumes from the newest intact one (see
:func:`attnlab.train.checkpoint.restore_newest_intact`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnlab import data as data_lib
from attnlab.nn.config import Config
from attnlab.testing import FAST_COMPILE_CPU
from attnlab.train import checkpoint as ckpt_lib
from attnlab.train import mesh as mesh_lib
from attnlab.train.config import TrainConfig
from attnlab.train.metrics import MetricsWriter, mfu
from attnlab.train.optim import learning_rate, make_optimizer
from attnlab.train.presets import model_config_from_json, model_config_to_json
from pallas_kernels.common.static_args import check_int

_log = logging.getLogger(__name__)
CONFIG_FILE, METRICS_FILE, CHECKPOINTS = "config.json", "metrics.jsonl", "checkpoints"


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the update was not applied."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainResult:
    """What :func:`train` returns."""

    out_dir: Path
    steps_done: int
    resumed_from: int | None
    final_loss: float
    validation: dict[str, float]
    num_params: int
    metrics_path: Path
    checkpoint_dir: Path


def compute_config(model_cfg: Config, tc: TrainConfig) -> Config:
    """The model Config a run uses: compute dtype from ``tc.dtype``, float32 parameters."""
    return dataclasses.replace(model_cfg, dtype=jnp.dtype(tc.dtype), param_dtype=jnp.float32)


def prepare(model_cfg: Config, tc: TrainConfig) -> tuple[Config, Any, jax.sharding.Mesh]:
    """Checks a run configuration before anything is compiled; returns (config, dataset,
    mesh).

    Raises:
      ValueError: an unknown mechanism letter or attention impl, a pattern of the wrong
        length, ``seq_len`` > ``max_seq_len``, a vocabulary smaller than the data's, a bad
        task option, a batch the data axis does not divide; with ``seq_parallel`` > 1: a
        ``seq_len`` it does not divide (twice it for zigzag), heads Ulysses cannot split,
        more devices than exist.
    """
    from attnlab.nn.transformer import validate

    cfg = compute_config(model_cfg, tc)
    validate(cfg)
    if tc.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={tc.seq_len} is longer than the model's max_seq_len="
                         f"{cfg.max_seq_len}; lower --seq-len or raise max_seq_len")
    _check_seq_parallel(cfg, tc)
    if cfg.vocab_size < data_lib.VOCAB_SIZE:
        raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the data's "
                         f"{data_lib.VOCAB_SIZE} byte tokens; use vocab_size >= 256")
    try:
        dataset = data_lib.make_dataset(tc.task, seq_len=tc.seq_len, seed=tc.seed,
                                        **tc.task_options)
    except TypeError as e:
        raise ValueError(f"bad task_options {tc.task_options} for task {tc.task!r}: {e}") from e
    mesh = mesh_lib.make_mesh(tc.batch_size, data=tc.data_parallel, sp=tc.seq_parallel)
    return cfg, dataset, mesh


def _check_seq_parallel(cfg: Config, tc: TrainConfig) -> None:
    """The sequence-parallel checks that need the whole run (sharding/ repeats them at trace
    time, which is after the run directory is written and the init compiled)."""
    sp = tc.seq_parallel
    if sp == 1:
        return
    from sharding.layouts import length_multiple

    # The model's inputs are in token order: striped is laid out inside shard_map (sp²).
    layout = tc.sp_strategy if tc.sp_strategy in ("striped", "zigzag") else "contiguous"
    blocks = length_multiple(layout, sp, permute_in_shards=True)
    if tc.seq_len % blocks:
        why = {
            "zigzag": f"zigzag cuts it into 2 x seq_parallel = {blocks} chunks",
            "striped": f"striped deals each device's seq_len / {sp} tokens out over the {sp} "
                       f"devices, so it needs seq_parallel² = {blocks}",
        }.get(layout, f"each of the {sp} devices holds an equal block")
        raise ValueError(f"seq_len={tc.seq_len} is not divisible by {blocks} ({why}); use a "
                         f"seq_len that is a multiple of {blocks} or another --seq-parallel")
    if tc.sp_strategy == "ulysses":
        from sharding.ulysses import check_heads

        check_heads(cfg.num_heads, cfg.num_kv_heads, sp, mesh_lib.SEQ)


def _masked_loss(graphdef: Any, params: Any, rest: Any, batch: data_lib.Batch
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Mean cross-entropy over the target tokens the mask selects; (loss, (hits, count))."""
    model = nnx.merge(graphdef, params, rest)
    logits, _ = model(batch.inputs, positions=batch.positions, segment_ids=batch.segment_ids)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets)
    count = batch.mask.sum()
    loss = (ce * batch.mask).sum() / jnp.maximum(count, 1.0)
    hits = ((jnp.argmax(logits, -1) == batch.targets) * batch.mask).sum()
    return loss, (hits, count)


def make_train_step(graphdef: Any, rest: Any, tx: optax.GradientTransformation,
                    tc: TrainConfig) -> Callable[..., Any]:
    """The jitted step ``(params, opt_state, batch, step) -> (params, opt_state, metrics)``.

    A step whose loss or gradient norm is not finite returns the old params and optimizer
    state unchanged (``metrics["ok"]`` False), so nothing bad reaches a checkpoint.
    """

    def step_fn(params: Any, opt_state: Any, batch: data_lib.Batch, step: jax.Array) -> Any:
        def loss_fn(p: Any) -> Any:
            loss, aux = _masked_loss(graphdef, p, rest, batch)
            if tc.debug_nan_step is not None:
                loss = loss * jnp.where(step == tc.debug_nan_step, jnp.inf, 1.0)
            return loss, aux

        (loss, (hits, count)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        metrics = {"loss": loss, "accuracy": hits / jnp.maximum(count, 1.0),
                   "grad_norm": grad_norm, "ok": ok}
        return pick(new_params, params), pick(new_opt, opt_state), metrics

    return jax.jit(step_fn, donate_argnums=(0, 1), compiler_options=_compile_options(tc))


def make_eval_step(graphdef: Any, rest: Any, tc: TrainConfig) -> Callable[..., Any]:
    """Jitted ``(params, batch) -> (loss_sum, hits, count)`` over the masked targets."""

    def eval_fn(params: Any, batch: data_lib.Batch) -> Any:
        loss, (hits, count) = _masked_loss(graphdef, params, rest, batch)
        return loss * count, hits, count

    return jax.jit(eval_fn, compiler_options=_compile_options(tc))


def evaluate(eval_step: Callable[..., Any], params: Any, dataset: Any, tc: TrainConfig,
             sharding: jax.sharding.Sharding) -> dict[str, float]:
    """Validation loss and accuracy over ``tc.eval_batches`` batches of the validation split
    (the same batches every time)."""
    loss_sum = hits = count = 0.0
    for i in range(tc.eval_batches):
        batch = jax.device_put(dataset.batch(i, tc.batch_size, split="validation"), sharding)
        ls, h, c = jax.device_get(eval_step(params, batch))
        loss_sum, hits, count = loss_sum + float(ls), hits + float(h), count + float(c)
    return {"val_loss": loss_sum / max(count, 1.0), "val_accuracy": hits / max(count, 1.0)}


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def init_state(cfg: Config, tc: TrainConfig, mesh: jax.sharding.Mesh,
                tx: optax.GradientTransformation, parallel: Any = None) -> Any:
    """(abstract model, graphdef, params, rest, opt_state), initialised in one compiled call
    (eager initialisation compiles one small program per parameter). ``parallel`` (the
    sequence-parallel plan, or None) becomes part of the graph definition."""
    from attnlab.nn import Transformer

    make = lambda seed: Transformer(cfg, rngs=nnx.Rngs(seed), parallel=parallel)  # noqa: E731
    abstract = nnx.eval_shape(lambda: make(tc.seed))
    graphdef = nnx.split(abstract, nnx.Param, ...)[0]

    def init(seed: jax.Array) -> Any:
        _, params, rest = nnx.split(make(seed), nnx.Param, ...)
        params = nnx.to_pure_dict(params)
        return params, nnx.to_pure_dict(rest), tx.init(params)

    # The seed is an argument, not a constant: with a constant seed XLA's GPU compiler tries
    # to constant-fold the whole random initialisation (minutes for a 350M model on an H100).
    params, rest, opt_state = jax.jit(
        init, out_shardings=mesh_lib.replicated(mesh), compiler_options=_compile_options(tc)
    )(jax.random.key(tc.seed))
    return abstract, graphdef, params, rest, opt_state


def _abstract_state(cfg: Config, tc: TrainConfig, mesh: jax.sharding.Mesh,
                    tx: optax.GradientTransformation) -> Any:
    """(graphdef, abstract params, rest, abstract opt_state) without compiling anything, unless
    the model holds non-parameter state (then it is initialised for real)."""
    from attnlab.nn import Transformer

    rep = mesh_lib.replicated(mesh)
    graphdef, params, rest = nnx.split(
        nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(tc.seed))), nnx.Param, ...)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          nnx.to_pure_dict(params))
    opt_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                             jax.eval_shape(tx.init, params))
    # Non-parameter state (buffers) is not checkpointed; it is rebuilt from the config.
    has_rest = bool(jax.tree.leaves(rest))
    rest = init_state(cfg, tc, mesh, tx)[3] if has_rest else nnx.to_pure_dict(rest)
    return graphdef, params, rest, opt_state


def _compile_options(tc: TrainConfig) -> dict[str, Any] | None:
    # Tiny CPU models spend more time compiling than running; level 0 halves compile time.
    return FAST_COMPILE_CPU if tc.fast_compile and jax.default_backend() == "cpu" else None


def _rng_data(seed: int) -> np.ndarray:
    # key_data(jax.random.key(seed)) of the default threefry key, without a device call.
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)


def run_record(cfg: Config, tc: TrainConfig) -> dict[str, Any]:
    """What a run directory's ``config.json`` holds for this configuration."""
    return {"model": model_config_to_json(cfg), "train": tc.to_json()}


def check_run_dir(out_dir: str | Path, cfg: Config, tc: TrainConfig) -> None:
    """ValueError if ``out_dir`` holds a run of a different configuration (resuming it with
    this one would not continue the same run), or a run longer than ``tc.steps``. A larger
    ``steps`` is not a different configuration: it extends the run. ``cfg`` as returned by
    :func:`prepare`."""
    _check_same_config(Path(out_dir) / CONFIG_FILE, run_record(cfg, tc))


def recorded_train_config(out_dir: str | Path) -> TrainConfig | None:
    """The TrainConfig recorded in run directory ``out_dir`` (None when there is no run)."""
    path = Path(out_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    return TrainConfig(**json.loads(path.read_text())["train"])


def _check_same_config(path: Path, record: dict[str, Any]) -> None:
    if not path.exists():
        return
    old = json.loads(path.read_text())
    # A run written before a TrainConfig field existed (e.g. sp_strategy) ran with its default.
    for k, v in json.loads(json.dumps(TrainConfig().to_json())).items():
        old.setdefault("train", {}).setdefault(k, v)
    new = json.loads(json.dumps(record))
    # steps is how far the run goes, not what it is: more steps extend it from its newest
    # checkpoint (the cosine schedule then runs to the new end from there).
    old_steps, new_steps = old["train"].pop("steps", None), new["train"].pop("steps")
    if old_steps is not None and new_steps < old_steps:
        raise ValueError(f"{path.parent} holds a run of {old_steps} steps and steps="
                         f"{new_steps} would end it earlier; pass --steps {old_steps} or more "
                         "to resume or extend it, or choose a new --out directory")
    if old != new:
        diff = sorted(f"{part}.{k}" for part in ("model", "train")
                      for k in set(old.get(part, {})) | set(new[part])
                      if old.get(part, {}).get(k) != new[part].get(k))
        raise ValueError(f"{path.parent} holds a run with a different configuration "
                         f"(differs in {', '.join(diff)}); resume with the same settings or "
                         "choose a new --out directory")


def train(
    model_cfg: Config, tc: TrainConfig, out_dir: str | Path, *, progress: bool = True,
    async_checkpoints: bool = True, on_log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Trains (or resumes) a run in ``out_dir``.

    Args:
      model_cfg: the model (its dtype fields are replaced by ``tc.dtype`` / float32).
      tc: the training configuration.
      out_dir: run directory; if it holds checkpoints of the same configuration, the run
        resumes from the latest intact one (with a larger ``tc.steps`` than it was run with,
        it continues to the new step count). Newer damaged ones (missing, empty, truncated or
        unreadable files) are renamed ``<step>.damaged`` and named in one warning line.
      progress: show a tqdm bar with loss, tokens/s and MFU.
      async_checkpoints: write checkpoints in the background.
      on_log: called with every metrics record.

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError: a bad configuration (before anything is compiled), or a run directory
        holding a different configuration or more steps than ``tc.steps``.
      NonFiniteLossError: the loss or gradient norm became NaN/inf; the latest checkpoint
        on disk is the last good state.
      CheckpointError: the run directory has checkpoints but every one is damaged.

    Example:
      >>> train(*load_run_config("tiny"), "runs/tiny")
    """
    cfg, dataset, mesh = prepare(model_cfg, tc)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = run_record(cfg, tc)
    _check_same_config(out / CONFIG_FILE, record)
    (out / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    ckpt_dir = Path(tc.checkpoint_dir) if tc.checkpoint_dir else out / CHECKPOINTS

    tx = make_optimizer(tc)
    parallel = mesh_lib.model_parallel(mesh, tc.sp_strategy, cfg.attention_impl)
    abstract, graphdef, params, rest, opt_state = init_state(cfg, tc, mesh, tx, parallel)
    num_params = abstract.num_params()
    flops_per_token = abstract.flops_per_token(tc.seq_len)
    rng = _rng_data(tc.seed)
    mngr = ckpt_lib.manager(ckpt_dir, keep=tc.keep, async_save=async_checkpoints)
    try:
        restored = ckpt_lib.restore_newest_intact(
            mngr, _abstract({"params": params, "opt_state": opt_state, "rng": rng}))
    except ckpt_lib.CheckpointError:
        mngr.close()
        raise
    start, resumed_from = 0, None
    if restored is not None:
        state, meta = restored.state, restored.meta
        params, opt_state, rng = state["params"], state["opt_state"], state["rng"]
        start = resumed_from = int(meta["data_cursor"])
        if restored.damaged:
            _set_aside_damaged(mngr, restored)
    writer = MetricsWriter(out / METRICS_FILE, tensorboard_dir=out / "tensorboard")
    writer.truncate_after(start)

    train_step = make_train_step(graphdef, rest, tx, tc)
    eval_step = make_eval_step(graphdef, rest, tc)
    bsharding = mesh_lib.batch_sharding(mesh)
    lr = learning_rate(tc)
    device_kind = mesh.devices.flat[0].device_kind
    tokens_per_step = tc.batch_size * tc.seq_len

    def log(rec: dict[str, Any]) -> None:
        writer.write(rec)
        if on_log is not None:
            on_log(rec)

    def save(done: int) -> None:
        meta = {"step": done, "data_cursor": done, "seed": tc.seed, "task": tc.task}
        ckpt_lib.save(mngr, done, {"params": params, "opt_state": opt_state, "rng": rng}, meta)

    from tqdm.auto import tqdm

    bar = tqdm(total=tc.steps, initial=start, disable=not progress, unit="step",
               dynamic_ncols=True, desc=f"train {tc.task}")
    last_loss, val = math.nan, {}
    if start >= tc.steps:  # already complete: report what the log says
        done_recs = [r for r in writer_records(out) if r.get("loss") is not None]
        last_loss = done_recs[-1]["loss"] if done_recs else math.nan
        val = next(({k: r[k] for k in ("val_loss", "val_accuracy")}
                    for r in reversed(writer_records(out)) if "val_loss" in r), {})
    t_mark, steps_mark = None, 0
    try:
        for step in range(start, tc.steps):
            batch = jax.device_put(dataset.batch(step, tc.batch_size), bsharding)
            params, opt_state, m = train_step(params, opt_state, batch, jnp.int32(step))
            m = jax.device_get(m)
            done = step + 1
            last_loss = float(m["loss"])
            if not bool(m["ok"]):
                mngr.wait_until_finished()
                good = mngr.latest_step()
                log({"step": done, "event": "non_finite", "loss": last_loss,
                     "grad_norm": float(m["grad_norm"])})
                where = (f"the last good checkpoint is step {good} in {ckpt_dir}" if good
                         is not None else "no checkpoint was written yet")
                raise NonFiniteLossError(
                    f"loss became {last_loss} (grad norm {float(m['grad_norm'])}) at step "
                    f"{done}; training stopped without applying that update and {where}. "
                    "Start a new run directory with a lower learning rate (--lr) or more "
                    "warm-up, or check the data."
                )
            now = time.perf_counter()
            if t_mark is None:  # the first step of this process includes compilation
                t_mark, steps_mark = now, done
            bar.update(1)
            if done % tc.log_every == 0 or done == tc.steps:
                tps = (None if done == steps_mark
                       else (done - steps_mark) * tokens_per_step / (now - t_mark))
                rec = {"step": done, "loss": last_loss, "accuracy": float(m["accuracy"]),
                       "lr": float(lr(step)), "grad_norm": float(m["grad_norm"]),
                       "tokens_per_s": tps,
                       "mfu": mfu(flops_per_token, tps, device_kind, mesh.size)}
                log(rec)
                if tps is not None:
                    t_mark, steps_mark = time.perf_counter(), done
                post = {"loss": f"{last_loss:.3f}"}
                if tps is not None:
                    post["tok/s"] = f"{tps:,.0f}"
                if rec["mfu"] is not None:
                    post["MFU"] = f"{rec['mfu']:.1%}"
                bar.set_postfix(post, refresh=False)
            if (tc.eval_batches and tc.eval_every and done % tc.eval_every == 0
                    and done != tc.steps):
                log({"step": done, **evaluate(eval_step, params, dataset, tc, bsharding)})
            if (tc.checkpoint_every and done % tc.checkpoint_every == 0) or done == tc.steps:
                save(done)
        if tc.eval_batches and (start < tc.steps or restored is None):
            val = evaluate(eval_step, params, dataset, tc, bsharding)
            log({"step": tc.steps, **val})
    finally:
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
    return TrainResult(out_dir=out, steps_done=tc.steps, resumed_from=resumed_from,
                       final_loss=last_loss, validation=val, num_params=num_params,
                       metrics_path=out / METRICS_FILE, checkpoint_dir=ckpt_dir)


def _set_aside_damaged(mngr: Any, restored: ckpt_lib.Restored) -> None:
    """Moves the damaged checkpoints newer than the one resumed from out of the way (the run
    saves those steps again) and says so in one warning line."""
    moved = ckpt_lib.set_aside(mngr, [e.step for e in restored.damaged])
    what = "; ".join(str(e) for e in restored.damaged)
    kept = ", ".join(str(p) for p in moved)
    _log.warning(f"{what}; resuming from step {restored.step} (kept as {kept})")


def writer_records(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics records of a run directory ([] when there are none)."""
    from attnlab.train.metrics import read_metrics

    path = Path(run_dir) / METRICS_FILE
    return read_metrics(path) if path.exists() else []


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LoadedRun:
    """A trained model read back from a run directory."""

    model: Any
    model_config: Config
    train_config: TrainConfig
    step: int
    run_dir: Path


def find_run_dir(path: str | Path) -> Path:
    """The run directory of ``path`` (the run directory itself or its checkpoints folder)."""
    p = Path(path)
    for cand in (p, p.parent):
        if (cand / CONFIG_FILE).is_file():
            return cand
    raise ValueError(f"{path} is not a run directory (no {CONFIG_FILE} in it or its parent); "
                     "pass the --out directory of `attnlab train`")


def load_run(path: str | Path, *, step: int | None = None) -> LoadedRun:
    """The model of a run directory at checkpoint ``step`` (default the latest).

    The model is single-device (no sequence-parallel plan, whatever the run trained with),
    so it can decode with caches.

    Raises:
      ValueError: not a run directory, or no checkpoint (or no checkpoint ``step``) in it.
      DamagedCheckpointError: the checkpoint is damaged (nothing falls back to an older one
        here; resuming the run with ``attnlab train`` does).
    """
    run_dir = find_run_dir(path)
    rec = json.loads((run_dir / CONFIG_FILE).read_text())
    cfg = model_config_from_json(rec["model"])
    tc = TrainConfig(**rec["train"])
    mesh = mesh_lib.make_mesh(1, data=1)
    graphdef, params, rest, opt_state = _abstract_state(cfg, tc, mesh, make_optimizer(tc))
    abstract = {"params": params, "opt_state": opt_state, "rng": _abstract(_rng_data(0))}
    ckpt_dir = Path(tc.checkpoint_dir) if tc.checkpoint_dir else run_dir / CHECKPOINTS
    mngr = ckpt_lib.manager(ckpt_dir, keep=tc.keep, async_save=False)
    try:
        restored = ckpt_lib.restore(mngr, abstract, step)
    except ckpt_lib.DamagedCheckpointError as e:
        raise ckpt_lib.DamagedCheckpointError(
            e.step, e.path, e.reason, advice=f"`attnlab train --out {run_dir}` with the run's "
            "settings resumes from the newest intact checkpoint") from None
    finally:
        mngr.close()
    if restored is None:
        raise ValueError(f"no checkpoint in {ckpt_dir}; train first (attnlab train --out "
                         f"{run_dir})")
    state, meta = restored
    model = nnx.merge(graphdef, state["params"], rest)
    return LoadedRun(model=model, model_config=cfg, train_config=tc, step=int(meta["step"]),
                     run_dir=run_dir)


def evaluate_run(run: LoadedRun, *, batches: int | None = None) -> dict[str, float]:
    """Validation loss and task accuracy of a loaded run (``batches`` defaults to the run's
    ``eval_batches``, or 4 when that is 0).

    Raises:
      ValueError: ``batches`` not a positive int or None.
    """
    tc = run.train_config
    if batches is not None:
        batches = check_int("batches", batches)
    tc = dataclasses.replace(tc, eval_batches=batches or tc.eval_batches or 4)
    dataset = data_lib.make_dataset(tc.task, seq_len=tc.seq_len, seed=tc.seed, **tc.task_options)
    graphdef, params, rest = nnx.split(run.model, nnx.Param, ...)
    mesh = mesh_lib.make_mesh(tc.batch_size, data=1)
    return evaluate(make_eval_step(graphdef, rest, tc), params, dataset, tc,
                    mesh_lib.batch_sharding(mesh))


def to_numpy(tree: Any) -> Any:
    """Host copy of a pytree (for tests and reports)."""
    return jax.tree.map(np.asarray, jax.device_get(tree))
