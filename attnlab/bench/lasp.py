"""LASP and LASP-2 on a mesh of 1 or 2 devices against the single-device lightning op.

``python -m attnlab.bench.lightning --lasp`` (:func:`attnlab.bench.lightning.main`) runs
:func:`bench_lasp`; ``--lasp-devices 1`` runs every algorithm on a one-device mesh, where the
collectives are no-ops, to show the per-device compute each algorithm adds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from attnlab.bench.harness import (
    ERROR,
    LAYER_IDX,
    NUM_LAYERS,
    OK,
    check_dtype,
    num,
    per_s,
    run_record,
    short_error,
    time_call,
    write_json,
)
from attnlab.ops import lightning as L
from sharding.lasp import lasp_attention
from sharding.lasp2 import lasp2_attention


def bench_lasp(
    *,
    seq_lens: Sequence[int] = (8192, 32768, 65536),
    heads: int = 16,
    head_dim: int = 128,
    dtype: str = "bfloat16",
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
    out: str | Path | None = None,
    argv: Sequence[str] = (),
    on_row: Callable[[dict[str, Any]], None] | None = None,
    devices: int = 2,
) -> list[dict[str, Any]]:
    """LASP and LASP-2 fwd+bwd on P = ``devices`` devices at length P*T vs the single-device op
    at T (B = 1), inputs placed sequence-sharded beforehand; ``data_parallel`` (P sequences of
    T, one per device, no communication) shows what P devices give in the same harness, and two
    per-block pieces are timed alone the same way: ``local_with_state`` (the local op
    continuing an incoming state) and ``summary_only`` (the generic block summary,
    :func:`attnlab.ops.lightning.chunk_summary`, forward and backward: what LASP and LASP-2
    run per block over implementations without block phases of their own).

    ``devices=1`` runs every algorithm on a one-device mesh: the collectives are then no-ops,
    so each row's ratio to ``single`` is the per-device compute the algorithm adds (the
    question the 2-device rows cannot answer alone: compute or communication?).

    The loss is sum(o) + sum(final state) (the state is what the blocks pass on, so no
    algorithm's state path can be dropped as unused, also with one device).

    Returns rows: algo, devices, T, ms, mtok_s, speedup (vs 1 device at T), status, note.
    """
    if devices not in (1, 2) or jax.device_count() < devices:
        raise ValueError(f"--lasp-devices must be 1 or 2 and at most the {jax.device_count()} "
                         f"devices found, got {devices}")
    dt = check_dtype(dtype)
    mesh = jax.make_mesh((devices,), ("sp",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:devices])
    decay = jnp.asarray(L.minimax_decay(heads, LAYER_IDX, NUM_LAYERS))
    algos, split_batch = _algorithms(decay, heads, head_dim)
    settings = dict(seq_lens=list(seq_lens), heads=heads, head_dim=head_dim, dtype=dtype,
                    mode="lasp", devices=devices)
    rows: list[dict[str, Any]] = []
    key = jax.random.key(seed)
    for t in seq_lens:
        base = None
        for name, algo in algos.items():
            length = t if algo is None else devices * t
            shape = (devices, t) if algo in split_batch else (1, length)
            key, *ks = jax.random.split(key, 4)
            q, k, v = (jax.random.normal(kk, (*shape, heads, head_dim)).astype(dt) * 0.1
                       for kk in ks)
            if algo is not None:  # placed as a sharded program would find its activations
                axis = 0 if algo in split_batch else 1
                spec = jax.sharding.PartitionSpec(*([None] * axis), "sp")
                q, k, v = jax.device_put((q, k, v), jax.sharding.NamedSharding(mesh, spec))
            row = dict(algo=name, devices=1 if algo is None else devices, T=length, ms=None,
                       mtok_s=None, speedup=None, status=OK, note="")
            try:
                row["ms"] = _time_loss(algo, decay, mesh, (q, k, v), repeats, warmup)
                row["mtok_s"] = per_s(length, row["ms"])
                if algo is None:
                    base = row["mtok_s"]
                elif base:
                    row["speedup"] = row["mtok_s"] / base
            except Exception as e:
                row["status"], row["note"] = ERROR, short_error(e)
            rows.append(row)
            if on_row:
                on_row(row)
        if out is not None:
            write_json(out, run_record(argv, settings=settings, rows=[dict(r) for r in rows]))
    return rows


def _algorithms(decay, heads: int, head_dim: int) -> tuple[dict[str, Any], tuple[Any, ...]]:
    """(name -> algorithm, None for the single-device op; the algorithms that split the batch
    rather than the sequence)."""

    def per_device(local):
        """``local(q, k, v)`` on each device's batch row, no communication (B = 2 rows)."""
        def run(q, k, v, decay, mesh, return_state):
            spec = jax.sharding.PartitionSpec("sp")
            return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                                 check_vma=False)(q, k, v)
        return run

    # P sequences of T, one per device: the harness's ideal.
    batch_split = per_device(lambda q, k, v: L.lightning_attention(
        q, k, v, decay=decay, return_state=True))
    # The same, each block continuing a (constant) incoming state: LASP-2's local op.
    with_state = per_device(lambda q, k, v: L.lightning_attention(
        q, k, v, decay=decay, return_state=True,
        initial_state=jnp.full((q.shape[0], heads, head_dim, head_dim), 0.01, jnp.float32)))
    # The generic block summary alone (q is unused).
    summary_only = per_device(lambda q, k, v: (jnp.zeros((1,), jnp.float32),
                                               L.chunk_summary(k, v, jnp.log(decay))[0]))
    algos = {"single": None, "data_parallel": batch_split, "local_with_state": with_state,
             "summary_only": summary_only, "lasp": lasp_attention, "lasp2": lasp2_attention}
    return algos, (batch_split, with_state, summary_only)


def _time_loss(algo, decay, mesh, args, repeats: int, warmup: int) -> float:
    """Median ms of the value and gradient of sum(o) + sum(final state) under ``algo``."""

    def loss(q, k, v):
        if algo is None:
            o, s = L.lightning_attention(q, k, v, decay=decay, return_state=True)
        else:
            o, s = algo(q, k, v, decay=decay, mesh=mesh, return_state=True)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    # value_and_grad: the loss needs the output, so XLA keeps the forward kernels
    # (with grad alone it may drop those whose output the backward does not use).
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return time_call(f, *args, repeats=repeats, warmup=warmup).median_ms


def format_row(row: dict[str, Any]) -> str:
    """One printed line of a :func:`bench_lasp` row."""
    return (f"{row['algo']:<8} dev={row['devices']} T={row['T']:<7} "
            f"{num(row['ms'], '.3f'):>9} ms {num(row['mtok_s'], '.2f'):>8} Mtok/s "
            f"speedup {num(row['speedup'], '.2f')} {row['status']} {row['note']}")
