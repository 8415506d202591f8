"""Sequence-parallel training (mesh data=2 x sp=4): the same losses as without the ``sp`` axis
for softmax, lightning and hybrid patterns and several strategies; the model with ``parallel``
computes the same logits and gradients as without; the compiled step keeps each layer's own
collectives (no all-gather of the sequence); bad input fails early with a clear message."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnlab.nn import Config, Transformer
from attnlab.train import TrainConfig, make_mesh, prepare, read_metrics, train
from attnlab.train.mesh import batch_sharding, model_parallel, replicated
from attnlab.train.optim import make_optimizer
from attnlab.train.trainer import (
    FAST_COMPILE_CPU,
    check_run_dir,
    compute_config,
    evaluate,
    make_eval_step,
    make_train_step,
    run_record,
    to_numpy,
)
from tests.helpers import check_sp_collectives, random_segments

T = 64
# GQA (2 kv heads for 4 query heads), a sliding window and a soft-cap, so the sharded softmax
# layers get every mask option of the local path.
MODEL = Config(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=T,
               local_window_size=40, logits_soft_cap=30.0)


def _model(pattern: str) -> Config:
    return dataclasses.replace(MODEL, num_layers=len(pattern), layer_pattern=pattern)


def _tc(seed: int, sp: int, strategy: str = "zigzag", eval_batches: int = 0) -> TrainConfig:
    return TrainConfig(steps=3, batch_size=4, seq_len=T, warmup_steps=1, seed=seed, log_every=1,
                       task="mqar", task_options={"num_kv_pairs": 4}, dtype="float32",
                       data_parallel=2, seq_parallel=sp, sp_strategy=strategy, checkpoint_every=0,
                       eval_batches=eval_batches, fast_compile=True)


def _seed(key) -> int:
    return int(jax.random.randint(key, (), 0, 2**30))


def _init_params(cfg: Config, seed: int) -> dict:
    """Host copies of the parameters ``train`` starts from (one compiled init, as it does)."""
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)),
                                                      nnx.Param, ...)[1]),
                   compiler_options=FAST_COMPILE_CPU)
    return to_numpy(init())


def _steps(model: Config, tc: TrainConfig) -> tuple[list[float], str, dict[str, float]]:
    """Losses of ``tc.steps`` train steps on the run's mesh, the compiled step's HLO, and the
    validation of the final parameters ({} unless ``tc.eval_batches``): the trainer's own step
    functions without its checkpoints and metrics (cheaper than ``train``)."""
    cfg, dataset, mesh = prepare(model, tc)
    parallel = model_parallel(mesh, tc.sp_strategy, cfg.attention_impl)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), parallel=parallel))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    rest = nnx.to_pure_dict(rest)
    tx = make_optimizer(tc)
    params = jax.device_put(_init_params(cfg, tc.seed), replicated(mesh))
    opt_state = jax.jit(tx.init, out_shardings=replicated(mesh))(params)
    batches = [jax.device_put(dataset.batch(i, tc.batch_size), batch_sharding(mesh))
               for i in range(tc.steps)]
    step = make_train_step(graphdef, rest, tx, tc)
    step = step.lower(params, opt_state, batches[0], jnp.int32(0)).compile()
    losses = []
    for i, batch in enumerate(batches):
        params, opt_state, m = step(params, opt_state, batch, jnp.int32(i))
        losses.append(float(m["loss"]))
    val = {}
    if tc.eval_batches:
        val = evaluate(make_eval_step(graphdef, rest, tc), params, dataset, tc,
                       batch_sharding(mesh))
    return losses, step.as_text(), val


def test_train_with_sp_matches_the_steps_without(tmp_path, key):
    """End to end (``train``: init, sharded batches, train and eval steps, checkpoint) with the
    default zigzag strategy on the hybrid pattern, against the same steps without ``sp``."""
    tc = _tc(_seed(key), 4)
    want, _, _ = _steps(_model("LS"), dataclasses.replace(tc, seq_parallel=1))
    res = train(_model("LS"), tc, tmp_path, progress=False, async_checkpoints=False)
    got = [r["loss"] for r in read_metrics(res.metrics_path) if "loss" in r]
    assert len(got) == len(want) == 3 and want[0] != want[-1]
    np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize(
    ("pattern", "strategy"),
    # Plain ring is zigzag's loop without the layout permutation and has its own tests in
    # tests/sharding; three cases keep every layer kind and collective kind (permute for
    # zigzag, state all-gather for LASP-2, all-to-all for Ulysses) inside make test's budget.
    [("S", "zigzag"), ("L", "zigzag"), ("LS", "ulysses")],
)
def test_sp_steps_match_and_keep_their_collectives(pattern, strategy, key):
    """Each pattern and strategy gives the losses of the run without ``sp``, and the whole
    compiled step (embedding, MLPs, loss and optimizer around the shard_map'd attention) moves
    only what its layers' rules move: K/V by collective-permute (ring, zigzag) or all-to-all
    (Ulysses), LASP-2 states by all-gather, never the sequence (GSPMD keeps the rest split)."""
    seed = _seed(key)
    want, _, _ = _steps(_model(pattern), _tc(seed, 1, strategy))
    got, hlo, _ = _steps(_model(pattern), _tc(seed, 4, strategy))
    assert want[0] != want[-1]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    if "L" not in pattern:
        check_sp_collectives(hlo, strategy)
        return
    assert "all-gather" in hlo
    if "S" in pattern:
        assert ("all-to-all" if strategy == "ulysses" else "collective-permute") in hlo
    # LASP-2 gathers [P, B, N, H*Hv + 3] / [P, B, N, H, Hv] states (and Ulysses int32 segment
    # ids); no float array with a sequence dimension (T or T / sp) is gathered.
    for line in hlo.splitlines():
        if "all-gather(" in line and line.split("=")[1].lstrip().startswith("f32["):
            shape = line.split("=")[1].lstrip()
            dims = {int(d) for d in shape[len("f32["):shape.index("]")].split(",")}
            assert not dims & {T, T // 4}, f"sequence gathered: {line.strip()[:200]}"


def _loss_fn(graphdef, rest, tokens, positions, segment_ids, w):
    def loss(params):
        logits, _ = nnx.merge(graphdef, params, rest)(tokens, positions, segment_ids)
        return jnp.sum(logits * w), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE_CPU)


@pytest.mark.parametrize(("pattern", "strategy"),
                         [("SS", "ulysses"), ("LS", "striped"), ("MS", "zigzag")])
def test_model_with_parallel_equals_model_without(pattern, strategy, key):
    """Logits and parameter gradients, with packed documents crossing the shard boundaries."""
    cfg = _model(pattern)
    mesh = make_mesh(2, data=2, sp=4)
    k_tok, k_seg, k_w = jax.random.split(key, 3)
    tokens = jax.random.randint(k_tok, (2, T), 0, cfg.vocab_size)
    segment_ids = random_segments(k_seg, 2, T, 3)
    starts = jnp.concatenate([jnp.ones((2, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
    idx = jnp.arange(T)
    positions = idx[None, :] - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)  # restart per document
    w = jax.random.normal(k_w, (2, T, cfg.vocab_size))
    params = _init_params(cfg, 0)

    def split(parallel):
        model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), parallel=parallel))
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        return graphdef, rest

    (want, want_logits), want_grads = _loss_fn(
        *split(None), tokens, positions, segment_ids, w)(params)
    put = lambda x: jax.device_put(x, batch_sharding(mesh))  # noqa: E731
    (got, got_logits), got_grads = _loss_fn(
        *split(model_parallel(mesh, strategy)), put(tokens), put(positions), put(segment_ids), w,
    )(jax.device_put(params, replicated(mesh)))
    # float32 in another summation order: errors relative to each array's scale.
    np.testing.assert_allclose(got_logits, want_logits, atol=2e-6 * np.abs(want_logits).max())
    np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.abs(want_logits * w).sum()))
    for g, wg in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, wg, atol=1e-5 * np.abs(wg).max())


def test_bad_sp_runs_fail_before_compiling():
    with pytest.raises(ValueError, match="sp_strategy='star' is not a sequence-parallel "
                                         "strategy; choose one of ring, striped, zigzag, ulysses"):
        _tc(0, 4, "star")
    with pytest.raises(ValueError, match=r"seq_len=36 is not divisible by 8 \(zigzag cuts it "
                                         r"into 2 x seq_parallel = 8 chunks\)"):
        prepare(_model("SS"), dataclasses.replace(_tc(0, 4), seq_len=36))
    with pytest.raises(ValueError, match="seq_len=42 is not divisible by 4 .* a multiple of 4"):
        prepare(_model("SS"), dataclasses.replace(_tc(0, 4, "ring"), seq_len=42))
    with pytest.raises(ValueError, match=r"seq_len=40 is not divisible by 16 \(striped deals each "
                                         r"device's seq_len / 4 tokens out over the 4 devices"):
        prepare(_model("SS"), dataclasses.replace(_tc(0, 4, "striped"), seq_len=40))
    with pytest.raises(ValueError, match="Ulysses splits heads over the 'sp' axis of size 8, "
                                         "but q has 4 heads"):
        prepare(_model("SS"), dataclasses.replace(_tc(0, 8, "ulysses"), data_parallel=1))
    with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
        prepare(_model("SS"), _tc(0, 8))
    with pytest.raises(ValueError, match="seq_parallel must be a positive int, got 0"):
        _tc(0, 0)


def test_cache_under_parallel_is_refused():
    """Generation is single-device: the model and each module refuse a cache (nothing runs:
    the check comes first, so abstract modules suffice)."""
    parallel = model_parallel(make_mesh(2, data=2, sp=4))
    cfg = compute_config(_model("SL"), _tc(0, 4))
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), parallel=parallel))
    tokens = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="this model's attention was built with parallel= "
                                         r"\(sequence parallelism over mesh axis 'sp'\) but was "
                                         "given a cache; generation is single-device"):
        model(tokens, caches=[{}, {}])
    x, positions = jnp.zeros((2, 4, cfg.d_model)), jnp.zeros((2, 4), jnp.int32)
    for block, name in zip(model.blocks, ("softmax", "lightning"), strict=True):
        with pytest.raises(ValueError, match=f"{name} attention was built with parallel="):
            block.attn(x, positions=positions, cache={})


def test_mesh_and_plan_with_sp():
    mesh = make_mesh(4, sp=4)
    assert dict(mesh.shape) == {"data": 2, "sp": 4}  # the data axis fits beside sp
    assert model_parallel(make_mesh(4, data=2)) is None
    hp = model_parallel(mesh, "ring", "xla")
    assert (hp.seq_axis, hp.batch_axis, hp.softmax_strategy, hp.impl) == ("sp", "data", "ring",
                                                                          "xla")
    with pytest.raises(ValueError, match="seq_parallel=0 must be at least 1"):
        make_mesh(4, sp=0)


def test_run_dir_from_before_sp_strategy_still_resumes(tmp_path):
    """A config.json written before ``sp_strategy`` existed is the same configuration."""
    cfg, tc = compute_config(_model("SS"), _tc(0, 1)), _tc(0, 1)
    record = run_record(cfg, tc)
    del record["train"]["sp_strategy"]
    (tmp_path / "config.json").write_text(json.dumps(record))
    check_run_dir(tmp_path, cfg, tc)  # no error
    with pytest.raises(ValueError, match=r"differs in train.sp_strategy"):
        check_run_dir(tmp_path, cfg, dataclasses.replace(tc, sp_strategy="ring"))
