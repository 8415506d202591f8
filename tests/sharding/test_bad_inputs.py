"""Bad inputs to the sequence-parallel front doors (``sharding``): each is refused before
``shard_map`` runs, with a ValueError that names the argument, what was given (the caller's
global shapes, not a shard's) and what is allowed.

8 simulated CPU devices (``tests/conftest.py``); tiny shapes; nothing but the one
``ring_attention`` case runs inside ``shard_map``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import sharding
from sharding.hybrid import HybridParallel
from tests.helpers import bad_input_test


@functools.cache
def mesh() -> jax.sharding.Mesh:
    """(data 2, sp 4): made at first use, so that collecting this file on a machine with
    fewer devices (one GPU, running only the gpu-marked tests) does not fail."""
    return jax.make_mesh((2, 4), ("data", "sp"), axis_types=(AxisType.Auto,) * 2)


@functools.cache
def mesh_tp() -> jax.sharding.Mesh:
    return jax.make_mesh((4, 2), ("sp", "tp"), axis_types=(AxisType.Auto,) * 2)


def _x(*shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(sum(shape)).standard_normal(shape), dtype)


X = _x(2, 16, 2, 8)  # [B, T, N, H]: B divisible by "data", T by "sp"
X3 = _x(3, 16, 2, 8)  # a batch of 3
SEG = jnp.zeros((2, 16), jnp.int32)


def _attention(**kwargs):
    args = kwargs.pop("args", (X, X, X))
    return lambda: sharding.attention(*args, **{"mesh": mesh(), **kwargs})


def _star_query(*args, **kwargs):
    return lambda: sharding.star_query(*args, **{"mesh": mesh(), **kwargs})


def _star(*args, **kwargs):
    return lambda: sharding.star_attention(*args, **{"mesh": mesh(), **kwargs})


def _lasp(fn=sharding.lasp_attention, args=(X, X, X), **kwargs):
    return lambda: fn(*args, **{"decay": 0.5, "mesh": mesh(), **kwargs})


def _ring_in_shard_map(segment_ids):
    def f(q, k, v, seg):
        return sharding.ring_attention(q, k, v, segment_ids=seg, axis_name="sp")

    spec = P(None, "sp")
    return lambda: jax.shard_map(f, mesh=mesh(), in_specs=(spec,) * 4, out_specs=spec)(
        X, X, X, segment_ids)


CASES = [
    # ---- sharding.attention: the call is checked on the global arrays first
    ("attention-segments-length", _attention(segment_ids=jnp.zeros((2, 12), jnp.int32)),
     r"segment ids must have shapes \(2, 16\) and \(2, 16\), got \(2, 12\) and \(2, 12\)"),
    ("attention-segments-batch", _attention(segment_ids=SEG[:1]),
     r"segment ids must have shapes \(2, 16\) and \(2, 16\), got \(1, 16\) and \(1, 16\)"),
    ("attention-segments-pair-kv-length",
     _attention(segment_ids=(SEG, SEG[:, :8]), strategy="ring"),
     r"segment ids must have shapes \(2, 16\) and \(2, 16\), got \(2, 16\) and \(2, 8\)"),
    ("attention-segments-float", _attention(segment_ids=SEG.astype(jnp.float32)),
     "q segment ids must be integers .* got dtype float32; casting would merge documents"),
    ("ulysses-segments-length",
     _attention(segment_ids=jnp.zeros((2, 12), jnp.int32), strategy="ulysses"),
     r"segment ids must have shapes \(2, 16\) and \(2, 16\), got \(2, 12\)"),
    ("attention-batch-not-divisible", _attention(args=(X3, X3, X3), batch_axis="data"),
     "batch B=3 is not divisible by the 'data' mesh axis of size 2; pad it to a multiple of 2"),
    ("attention-batch-axes-tuple", _attention(args=(X3, X3, X3), batch_axis=("data",)),
     "batch B=3 is not divisible by the 'data' mesh axis of size 2"),
    ("attention-heads-not-divisible",
     lambda: sharding.attention(_x(1, 8, 3, 8), _x(1, 8, 1, 8), _x(1, 8, 1, 8), mesh=mesh_tp(),
                                head_axis="tp"),
     "heads N=3 is not divisible by the 'tp' mesh axis of size 2; use a multiple of 2"),
    ("attention-kv-heads-not-divisible",
     lambda: sharding.attention(_x(1, 8, 2, 8), _x(1, 8, 1, 8), _x(1, 8, 1, 8), mesh=mesh_tp(),
                                head_axis="tp"),
     "kv heads K=1 is not divisible by the 'tp' mesh axis of size 2"),
    ("attention-traced-scale",
     lambda: jax.jit(lambda q, s: sharding.attention(q, q, q, mesh=mesh(), scale=s))(X, 0.5),
     "scale must be a static Python float, got a traced float32 array"),
    ("attention-head_dim-0", _attention(args=(X[..., :0],) * 3),
     "head dims must be at least 1, got q/k head_dim 0 and v head_dim 0"),
    ("attention-q-rank-3", _attention(args=(X[0], X, X)),
     r"q must be \[batch, seq, heads, head_dim\], got shape \(16, 2, 8\)"),
    ("attention-window", _attention(local_window_size="wide"),
     "local_window_size must be None, a non-negative int .* got 'wide'"),
    ("attention-mesh-not-a-mesh", _attention(mesh="sp"),
     r"mesh must be a jax.sharding.Mesh \(e.g. jax.make_mesh\(\(4,\), \('sp',\)\)\), got 'sp' "
     "of type str"),
    ("attention-seq_axis-int", _attention(seq_axis=0),
     r"seq_axis must be the name of a mesh axis \(one of \('data', 'sp'\)\), got 0"),
    ("attention-batch_axis-list-of-int", _attention(batch_axis=["data", 1]),
     r"batch_axis must be the name of a mesh axis .*, a tuple of them or None, got "
     r"\['data', 1\]"),
    ("attention-head_axis-unknown", _attention(head_axis="tp"),
     r"head_axis='tp' is not an axis of the mesh, whose axes are \('data', 'sp'\)"),
    ("attention-axes-repeated", _attention(batch_axis="sp"),
     r"the mesh axes of \['seq_axis', 'batch_axis', 'head_axis'\] must be distinct, got "
     r"\['sp', 'sp'\]"),
    ("attention-strategy-None", _attention(strategy=None),
     r"unknown strategy None; expected one of \('ring', 'striped', 'zigzag', 'ulysses'\)"),
    ("attention-impl-unknown", _attention(impl="flashy"),
     "unknown impl 'flashy'; expected 'auto', 'pallas' or one of"),
    # ---- inside the user's own shard_map
    ("ring_attention-segments-float", _ring_in_shard_map(SEG.astype(jnp.float32)),
     "segment ids must be integers .* got dtype float32"),
    # ---- Star Attention
    ("star_query-q-rank-3", _star_query(X[0, :2], X, X),
     r"q must be \[batch, seq, heads, head_dim\], got shape \(2, 2, 8\)"),
    ("star_query-k-rank-3", _star_query(X[:, :2], X[0], X),
     r"k must be \[batch, seq, heads, head_dim\], got shape \(16, 2, 8\)"),
    ("star_query-batch", _star_query(X3[:, :2], X3, X3, batch_axis="data"),
     "batch B=3 is not divisible by the 'data' mesh axis of size 2"),
    ("star_query-cache-length", _star_query(X[:, :2], X[:, :14], X[:, :14]),
     "cache length S=14 is not divisible by the 'sp' mesh axis of size 4"),
    ("star_query-q_offset-float", _star_query(X[:, :2], X, X, q_offset=2.5),
     r"q_offset must hold integers \(token positions\), got 2\.5"),
    ("star_query-v-batch", _star_query(X[:, :2], X, X3),
     "batch sizes differ"),
    ("star_attention-v-rank-3", _star(X, X, X[0]),
     r"v must be \[batch, seq, heads, head_dim\], got shape \(16, 2, 8\)"),
    ("star_attention-batch", _star(X3, X3, X3, batch_axis="data"),
     "batch B=3 is not divisible by the 'data' mesh axis of size 2"),
    ("star_attention-not-self-attention", _star(X, X[:, :8], X[:, :8]),
     "Star Attention's context phase is self-attention: q has 16 tokens, k 8"),
    ("star_attention-anchor", _star(X, X, X, anchor_size=5),
     r"anchor_size must be in \[1, block_size = 4\]"),
    # ---- LASP / LASP-2
    ("lasp-batch", _lasp(args=(X3, X3, X3), batch_axis="data"),
     "batch B=3 is not divisible by the 'data' mesh axis of size 2"),
    ("lasp-segments-length", _lasp(segment_ids=jnp.zeros((2, 12), jnp.int32)),
     r"segment_ids must have shape \[B, T\] = \(2, 16\), got \(2, 12\)"),
    ("lasp2-segments-float", _lasp(sharding.lasp2_attention, segment_ids=SEG + 0.5),
     "segment_ids must be integers, got float32"),
    ("lasp2-initial_state", _lasp(sharding.lasp2_attention, initial_state=jnp.zeros((2, 2, 8))),
     r"initial_state must have shape \[B, N, H, Hv\] = \(2, 2, 8, 8\), got \(2, 2, 8\)"),
    ("lasp-traced-scale",
     lambda: jax.jit(lambda q, s: sharding.lasp_attention(q, q, q, decay=0.5, mesh=mesh(),
                                                          scale=s))(X, 0.5),
     "scale must be a static Python float, got a traced"),
    # ---- HybridParallel (a model's plan)
    ("HybridParallel-batch_axis", lambda: HybridParallel(mesh=mesh(), batch_axis="dp"),
     r"batch_axis='dp' is not an axis of the mesh, whose axes are \('data', 'sp'\)"),
    ("HybridParallel-mesh", lambda: HybridParallel(mesh=None),
     "mesh must be a jax.sharding.Mesh .* got None of type NoneType"),
    ("HybridParallel-impl", lambda: HybridParallel(mesh=mesh(), impl=None),
     "impl must be an implementation name such as 'auto', got None"),
    ("HybridParallel-strategy", lambda: HybridParallel(mesh=mesh(), softmax_strategy="star"),
     r"softmax_strategy 'star' is not one of \('ring', 'striped', 'zigzag', 'ulysses'\)"),
]


test_bad_input = bad_input_test(CASES)
