"""Bad inputs to the public ops (``attnlab.ops``): each is refused with a ValueError whose
message names the argument, what was given and what is allowed.

The per-implementation bad-input tables (``BAD_INPUTS`` in ``attention_base.py`` and
``decode_base.py``, ``test_bad_inputs`` in ``lightning_base.py``) run against every
implementation; this module holds the op-level mistakes (static arguments, merges, masks, the
decay and RoPE helpers), checked once. Shapes are tiny; nothing is compiled but the few
``jax.jit`` traces that show what a traced argument gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab import ops
from attnlab.ops import mla, star
from tests.helpers import bad_input_test

B, T, N, H = 1, 4, 2, 8


def _x(*shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(sum(shape)).standard_normal(shape), dtype)


Q = _x(B, T, N, H)
Q1 = Q[:, :1]
NO_HEAD_DIM = _x(B, T, N, 0)


def _jit(fn, *args):
    """``fn(*args)`` under ``jax.jit`` (so that its arguments are traced)."""
    return lambda: jax.jit(fn)(*args)


CASES = [
    # ---- q, k, v themselves (the shared checks in ops/_checks and pallas_kernels/common)
    ("attention-k-rank-3", lambda: ops.attention(Q, Q[0], Q),
     r"k must have shape \[batch, seq, heads, head_dim\], got shape \(4, 2, 8\)"),
    ("attention-batch-sizes", lambda: ops.attention(_x(2, T, N, H), Q, Q),
     r"batch sizes differ: q \(2, 4, 2, 8\), k \(1, 4, 2, 8\), v \(1, 4, 2, 8\)"),
    ("attention-k-v-lengths", lambda: ops.attention(Q, Q, Q[:, :3]),
     r"k and v must have the same number of keys \(axis 1\), got k \(1, 4, 2, 8\) and v "
     r"\(1, 3, 2, 8\)"),
    ("attention-q-k-head_dim", lambda: ops.attention(Q, Q[..., :4], Q),
     "q has head_dim 8 but k has 4; they must be equal"),
    ("attention-k-heads", lambda: ops.attention(_x(B, T, 4, H), _x(B, T, 3, H), _x(B, T, 4, H)),
     r"q has 4 heads but k has 3; the number of q heads must be a multiple of the number of k "
     r"heads \(GQA/MQA\)"),
    ("attention-v-heads", lambda: ops.attention(_x(B, T, 4, H), _x(B, T, 4, H), _x(B, T, 3, H)),
     "q has 4 heads but v has 3; the number of q heads must be a multiple of the number of v"),
    ("attention-dtypes", lambda: ops.attention(Q, Q.astype(jnp.bfloat16), Q),
     "q, k, v dtypes must match, got float32, bfloat16, float32"),
    ("attention-int-dtype", lambda: ops.attention(*(Q.astype(jnp.int32),) * 3),
     "unsupported dtype int32; use float32, bfloat16 or float16"),
    ("decode-too-many-queries", lambda: ops.decode_attention(_x(B, 65, N, H), Q, Q),
     r"q has T=65 queries per sequence; decode takes 1 to 64 \(use attnlab.ops.attention for "
     "prefill\\)"),
    ("decode-empty-cache", lambda: ops.decode_attention(Q1, Q[:, :0], Q[:, :0]),
     r"the cache is empty \(k has shape \(1, 0, 2, 8\)\); S must be at least 1"),
    ("lightning-k-shape", lambda: ops.lightning_attention(Q, Q[..., :4], Q, decay=0.5),
     r"k must have q's shape \(1, 4, 2, 8\) \[B, T, N, H\], got \(1, 4, 2, 4\)"),
    ("lightning-v-heads", lambda: ops.lightning_attention(Q, Q, Q[:, :, :1], decay=0.5),
     r"v must agree with q in \[batch, seq, heads\] = \(1, 4, 2\), got \(1, 4, 1, 8\)"),
    ("lightning-dtypes", lambda: ops.lightning_attention(Q, Q, Q.astype(jnp.bfloat16), decay=0.5),
     "q, k, v dtypes must match, got float32, float32, bfloat16"),
    # ---- attention: shapes the kernels cannot take
    ("attention-head_dim-0", lambda: ops.attention(NO_HEAD_DIM, NO_HEAD_DIM, NO_HEAD_DIM),
     "head dims must be at least 1, got q/k head_dim 0 and v head_dim 0"),
    ("attention-no-keys", lambda: ops.attention(Q, Q[:, :0], Q[:, :0]),
     r"k and v hold no keys \(S=0: k \(1, 0, 2, 8\)\); attention needs at least one key"),
    # ---- attention: static arguments
    ("attention-traced-scale", _jit(lambda q, s: ops.attention(q, q, q, scale=s), Q, 0.5),
     r"scale must be a static Python float, got a traced float32 array of shape \(\); under "
     "jax.jit pass it as a static argument"),
    ("attention-traced-soft-cap",
     _jit(lambda q, c: ops.attention(q, q, q, logits_soft_cap=c), Q, 5.0),
     "logits_soft_cap must be a static Python float, got a traced float32 array"),
    ("attention-scale-str", lambda: ops.attention(Q, Q, Q, scale="0.1"),
     "scale must be a float, got '0.1'"),
    ("attention-scale-nan", lambda: ops.attention(Q, Q, Q, scale=float("nan")),
     "scale must be a finite float, got nan"),
    ("attention-soft-cap-0", lambda: ops.attention(Q, Q, Q, logits_soft_cap=0.0),
     "logits_soft_cap must be positive, got 0.0"),
    ("attention-traced-is_causal",
     _jit(lambda q, c: ops.attention(q, q, q, is_causal=c), Q, True),
     r"causal \(is_causal\) must be a bool, got .*Tracer.*a traced value cannot choose the mask"),
    ("attention-is_causal-str", lambda: ops.attention(Q, Q, Q, is_causal="yes"),
     r"causal \(is_causal\) must be a bool, got 'yes' of type str"),
    ("attention-window-str", lambda: ops.attention(Q, Q, Q, local_window_size="ab"),
     "local_window_size must be None, a non-negative int or a \\(left, right\\) pair of "
     "non-negative ints or None, got 'ab'"),
    ("attention-window-float", lambda: ops.attention(Q, Q, Q, local_window_size=2.5),
     "local_window_size must be None, a non-negative int .* got 2.5"),
    ("attention-window-negative", lambda: ops.attention(Q, Q, Q, local_window_size=-1),
     "local_window_size must be None, a non-negative int .* got -1"),
    ("attention-window-float-side",
     lambda: ops.attention(Q, Q, Q, local_window_size=(2, 1.5)),
     r"local_window_size must be .* got \(2, 1\.5\)"),
    ("attention-q_offset-float", lambda: ops.attention(Q, Q, Q, q_offset=1.5),
     r"q_offset must hold integers \(token positions\), got 1\.5 of dtype float32"),
    ("attention-kv_offset-bool", lambda: ops.attention(Q, Q, Q, kv_offset=True),
     r"kv_offset must hold integers \(token positions\), got True of dtype bool"),
    ("attention-positions-float",
     lambda: ops.attention(Q, Q, Q, q_positions=jnp.arange(4.0), kv_positions=jnp.arange(4)),
     r"q_positions must hold integers \(token positions\), got dtype float32"),
    ("attention-impl-list", lambda: ops.attention(Q, Q, Q, impl=["xla"]),
     r"impl must be a name, 'auto' or 'pallas', got \['xla'\] of type list; registered: "),
    ("attention-impl-None", lambda: ops.attention(Q, Q, Q, impl=None),
     "impl must be a name, 'auto' or 'pallas', got None of type NoneType"),
    ("attention-return_residuals-str", lambda: ops.attention(Q, Q, Q, return_residuals="no"),
     "return_residuals must be a bool, got 'no' of type str"),
    ("attention-traced-return_entropy",
     _jit(lambda q, e: ops.attention(q, q, q, return_entropy=e), Q, True),
     "return_entropy must be a bool, got .*Tracer"),
    ("decode-return_residuals-int",
     lambda: ops.decode_attention(Q1, Q, Q, return_residuals=1),
     "return_residuals must be a bool, got 1 of type int"),
    ("lightning-return_state-str",
     lambda: ops.lightning_attention(Q, Q, Q, decay=0.5, return_state="yes"),
     "return_state must be a bool, got 'yes' of type str"),
    ("attention-unknown-kwarg", lambda: ops.reference(Q, Q, Q, impl="xla"),
     "reference takes no impl"),
    ("explain-unknown-impl", lambda: ops.explain(Q, Q, Q, impl_names=("flashy",)),
     r"unknown impl name\(s\) \['flashy'\] in impl_names; registered: \[.*'xla'\]"),
    ("attention_bwd-dout-shape",
     lambda: ops.attention_bwd(Q, Q, Q, Q, jnp.zeros((B, T, N)), Q[:, :2]),
     r"dout must have shape \(1, 4, 2, 8\), got \(1, 2, 2, 8\)"),
    # ---- decode
    ("decode-head_dim-0", lambda: ops.decode_attention(NO_HEAD_DIM[:, :1], NO_HEAD_DIM,
                                                        NO_HEAD_DIM),
     "head dims must be at least 1, got q/k head_dim 0 and v head_dim 0"),
    ("decode-traced-scale",
     _jit(lambda q, s: ops.decode_attention(q[:, :1], q, q, scale=s), Q, 0.5),
     "scale must be a static Python float, got a traced float32 array"),
    ("decode-traced-soft-cap",
     _jit(lambda q, c: ops.decode_attention(q[:, :1], q, q, logits_soft_cap=c), Q, 5.0),
     "logits_soft_cap must be a static Python float, got a traced"),
    ("decode-window-right-side",
     lambda: ops.decode_attention(Q1, Q, Q, local_window_size=(3, 2)),
     r"local_window_size=\(3, 2\) has a right side of 2; decode is causal, so the window is "
     r"left-only: pass an int w or \(w, 0\)"),
    ("decode-window-str", lambda: ops.decode_attention(Q1, Q, Q, local_window_size="3"),
     r"local_window_size must be None, a non-negative int w or a \(w, 0\) pair, got '3'"),
    ("decode-window-negative", lambda: ops.decode_attention(Q1, Q, Q, local_window_size=-3),
     "local_window_size=-3: the left window must be a non-negative int or None, got -3"),
    ("decode-window-float-left",
     lambda: ops.decode_attention(Q1, Q, Q, local_window_size=(2.5, 0)),
     "the left window must be a non-negative int or None, got 2.5"),
    # ---- lightning
    ("lightning-head_dim-0",
     lambda: ops.lightning_attention(NO_HEAD_DIM, NO_HEAD_DIM, Q, decay=0.5),
     "head dims must be at least 1, got q/k head_dim 0 and v head_dim 8"),
    ("lightning-value_head_dim-0",
     lambda: ops.lightning_attention(Q, Q, NO_HEAD_DIM, decay=0.5),
     "head dims must be at least 1, got q/k head_dim 8 and v head_dim 0"),
    ("lightning-traced-scale",
     _jit(lambda q, s: ops.lightning_attention(q, q, q, decay=0.5, scale=s), Q, 0.5),
     "scale must be a static Python float, got a traced float32 array"),
    ("lightning-chunk_size-float",
     lambda: ops.lightning_attention(Q, Q, Q, decay=0.5, chunk_size=2.0),
     r"chunk_size must be a positive int \(or None\), got 2\.0 of type float"),
    ("lightning-initial_state-int",
     lambda: ops.lightning_attention(Q, Q, Q, decay=0.5,
                                     initial_state=jnp.zeros((B, N, H, H), jnp.int32)),
     r"initial_state must be a float array \(float32\), got dtype int32"),
    ("lightning-decay-nan", lambda: ops.lightning_attention(Q, Q, Q, decay=float("nan")),
     r"decay values must lie in \(0, 1\] .* got min nan"),
    ("lightning_decode-state-shape",
     lambda: ops.lightning_decode(Q1, Q1, Q1[..., :4], jnp.zeros((B, N, H, H)), 0.5),
     r"state must have shape \[B, N, H, Hv\] = \(1, 2, 8, 4\), got \(1, 2, 8, 8\)"),
    ("lightning_decode-state-None", lambda: ops.lightning_decode(Q1, Q1, Q1, None, 0.5),
     r"state is required: \[B, N, H, Hv\] float32"),
    ("chunk_summary-log_decay-shape", lambda: ops.chunk_summary(Q, Q, jnp.zeros(3)),
     r"log_decay must have shape \[N\] = \(2,\), got \(3,\)"),
    ("chunk_summary-k-v-mismatch", lambda: ops.chunk_summary(Q, Q[:, :2], jnp.zeros(2)),
     r"k must be \[B, T, N, H\] and v \[B, T, N, Hv\] with the same B, T, N; got k "
     r"\(1, 4, 2, 8\) and v \(1, 2, 2, 8\)"),
    ("chunk_summary-segments-shape",
     lambda: ops.chunk_summary(Q, Q, jnp.zeros(2), jnp.zeros((1, 3), jnp.int32)),
     r"segment_ids must have shape \[B, T\] = \(1, 4\), got \(1, 3\)"),
    ("alibi_slopes-0", lambda: ops.alibi_slopes(0), "num_heads must be a positive int, got 0"),
    ("alibi_slopes-float", lambda: ops.alibi_slopes(4.5),
     "num_heads must be a positive int, got 4.5 of type float"),
    ("minimax_decay-layer-float", lambda: ops.minimax_decay(4, 1.5, 4),
     "layer_idx must be an int >= 0, got 1.5 of type float"),
    ("minimax_decay-layer-range", lambda: ops.minimax_decay(4, 4, 4),
     r"layer_idx=4 must lie in \[0, num_layers=4\)"),
    ("transnormer_decay-no-layers", lambda: ops.transnormer_decay(4, 0, 0),
     "num_layers must be a positive int, got 0"),
    # ---- MLA's latent decode
    ("latent_decode-v_dim-float",
     lambda: mla.latent_decode(_x(B, 1, N, 12), _x(B, 4, 12), v_dim=8.0),
     r"v_dim must be an int in \[1, 12\] \(the cache's width\), got 8\.0"),
    ("latent_decode-cache-rank", lambda: mla.latent_decode(_x(B, 1, N, 12), Q, v_dim=4),
     r"cache must have shape \[batch, seq, d_c \+ d_R\], got \(1, 4, 2, 8\)"),
    # ---- merge
    ("merge_n-part-count", lambda: ops.merge_n(_x(3, 1, 4, 2, 8), _x(2, 1, 4, 2)),
     "outs has 3 parts but lses has 2; give one lse per partial output"),
    ("merge_n-lse-shape", lambda: ops.merge_n(_x(3, 1, 4, 2, 8), _x(3, 1, 4, 3)),
     r"each lse must be its output's shape without the head_dim axis: outs \(3, 1, 4, 2, 8\) "
     r"\(parts of \(1, 4, 2, 8\)\) need lses \(3, 1, 4, 2\), got lses \(3, 1, 4, 3\)"),
    ("merge_n-mismatched-parts",
     lambda: ops.merge_n([_x(1, 4, 2, 8), _x(1, 5, 2, 8)], [_x(1, 4, 2), _x(1, 5, 2)]),
     r"outs parts must share one shape, but part 0 has shape \(1, 4, 2, 8\) and part 1 has "
     r"\(1, 5, 2, 8\)"),
    ("merge_n-mismatched-lse-parts",
     lambda: ops.merge_n([_x(1, 4, 2, 8)] * 2, [_x(1, 4, 2), _x(1, 4, 3)]),
     r"lses parts must share one shape, but part 0 has shape \(1, 4, 2\) and part 1 has "
     r"\(1, 4, 3\)"),
    ("merge_n-no-parts", lambda: ops.merge_n([], []),
     "outs is empty; merge_n needs at least one partial result"),
    ("merge_n-rank", lambda: ops.merge_n(_x(3), _x(3)),
     r"outs must be \[P, \.\.\., H\] and lses \[P, \.\.\.\], got outs \(3,\) and lses \(3,\)"),
    ("merge-outputs", lambda: ops.merge(Q, Q[..., 0], Q[..., :4], Q[..., 0]),
     r"o_a and o_b must have one shape, got \(1, 4, 2, 8\) and \(1, 4, 2, 4\)"),
    ("merge-lses", lambda: ops.merge(Q, Q[..., 0], Q, Q[:, :2, :, 0]),
     r"lse_a and lse_b must have one shape, got \(1, 4, 2\) and \(1, 2, 2\)"),
    # ---- masks
    ("MaskSpec.from_jax_nn-str", lambda: ops.MaskSpec.from_jax_nn(local_window_size="ab"),
     "local_window_size must be None, a non-negative int or a .* got 'ab'"),
    ("MaskSpec.from_jax_nn-triple",
     lambda: ops.MaskSpec.from_jax_nn(local_window_size=(1, 2, 3)),
     r"local_window_size must be .* got \(1, 2, 3\)"),
    ("MaskSpec-window-float", lambda: ops.MaskSpec(window_left=1.5),
     "window_left must be a non-negative int or None, got 1.5"),
    ("MaskSpec-window-negative", lambda: ops.MaskSpec(window_right=-2),
     "window_right must be a non-negative int or None, got -2"),
    ("MaskSpec-causal-int", lambda: ops.MaskSpec(causal=1),
     r"causal \(is_causal\) must be a bool, got 1 of type int"),
    # ---- RoPE
    ("rope-rope_dim-float", lambda: ops.rope(Q, jnp.zeros((B, T), jnp.int32), rope_dim=4.0),
     "rope_dim must be an int >= 0, got 4.0 of type float"),
    ("rope-rope_dim-odd", lambda: ops.rope(Q, jnp.zeros((B, T), jnp.int32), rope_dim=3),
     r"rope_dim=3 must be an even number in \[0, head_dim=8\]"),
    ("rope-traced-theta",
     _jit(lambda x, th: ops.rope(x, jnp.zeros((B, T), jnp.int32), theta=th), Q, 1e4),
     "theta must be a static Python float, got a traced float32 array"),
    ("rope-positions-shape", lambda: ops.rope(Q, jnp.arange(T)),
     r"positions must have shape \[batch, seq\] = \(1, 4\) to match x \(1, 4, 2, 8\), got "
     r"\(4,\)"),
    # ---- star attention's definition
    ("star.reference-rank-3", lambda: star.reference(Q[0], Q, Q, block_size=2),
     r"q must have shape \[batch, seq, heads, head_dim\], got \(4, 2, 8\)"),
    ("star.reference-block_size", lambda: star.reference(Q, Q, Q, block_size=3),
     "block_size must be a positive divisor of the context length 4, got 3"),
    ("star.reference-anchor", lambda: star.reference(Q, Q, Q, block_size=2, anchor_size=3),
     r"anchor_size must be in \[1, block_size = 2\] .* got 3"),
    ("star.context_mask-float-block", lambda: star.context_mask(4, 2.0),
     "block_size must be a positive divisor of the context length 4, got 2.0"),
]


test_bad_input = bad_input_test(CASES)


# ----------------------------------------------------------------------------- good inputs
# Inputs that look unusual but are valid: they must keep working.


def test_numpy_integer_windows_are_ints():
    w = np.int64(3)
    assert ops.MaskSpec.from_jax_nn(local_window_size=w) == ops.MaskSpec(
        window_left=3, window_right=3)
    assert type(ops.MaskSpec.from_jax_nn(local_window_size=(w, None)).window_left) is int
    np.testing.assert_allclose(ops.attention(Q, Q, Q, local_window_size=w),
                               ops.attention(Q, Q, Q, local_window_size=3))
    np.testing.assert_allclose(ops.decode_attention(Q1, Q, Q, local_window_size=(w, 0)),
                               ops.decode_attention(Q1, Q, Q, local_window_size=3))


def test_numpy_scalars_as_static_arguments():
    want = ops.attention(Q, Q, Q, scale=0.25, logits_soft_cap=5.0)
    got = ops.attention(Q, Q, Q, scale=np.float32(0.25), logits_soft_cap=np.float64(5.0))
    np.testing.assert_allclose(got, want)
    o = ops.lightning_attention(Q, Q, Q, decay=0.5, chunk_size=np.int64(2), impl="xla")
    np.testing.assert_allclose(o, ops.lightning_attention(Q, Q, Q, decay=0.5, chunk_size=2,
                                                          impl="xla"))


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_lightning_of_no_tokens_is_empty_and_keeps_the_state(impl):
    """T = 0 (as attention allows): an empty output, and the state passes through."""
    empty = Q[:, :0]
    state = _x(B, N, H, 4)
    o, s = ops.lightning_attention(empty, empty, empty[..., :4], decay=0.5, impl=impl,
                                   initial_state=state, return_state=True)
    assert o.shape == (B, 0, N, 4) and o.dtype == Q.dtype
    np.testing.assert_array_equal(s, state)
    _, s0 = ops.lightning_attention(empty, empty, empty, decay=0.5, impl=impl,
                                    return_state=True)
    np.testing.assert_array_equal(s0, jnp.zeros((B, N, H, H)))
