"""Bad inputs to the model (``attnlab.nn``): configs, the Transformer's call, caches,
``generate`` and the layers. Each is refused with a ValueError whose message names the
argument, what was given and what is allowed, before anything is compiled.

The model here is abstract (``nnx.eval_shape``): every check comes before any computation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.nn import (
    Config,
    Embed,
    LightningAttention,
    RMSNorm,
    SoftmaxAttention,
    SwiGLU,
    Transformer,
    generate,
    get_mechanism,
)
from attnlab.nn import init_caches as make_caches
from attnlab.nn.layers import Linear
from tests.helpers import bad_input_test

CFG = Config(vocab_size=64, d_model=32, num_layers=2, num_heads=2, max_seq_len=16)
MODEL = nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0)))
TOKENS = np.zeros((1, 8), np.int32)
SOFTMAX = nnx.eval_shape(lambda: SoftmaxAttention(CFG, layer_idx=0, rngs=nnx.Rngs(0)))
LIGHTNING = nnx.eval_shape(lambda: LightningAttention(CFG, layer_idx=0, rngs=nnx.Rngs(0)))
MLA = nnx.eval_shape(lambda: get_mechanism("M")(CFG, layer_idx=0, rngs=nnx.Rngs(0)))
X = np.zeros((1, 8, 32), np.float32)
POS = np.zeros((1, 8), np.int32)


def _config(**fields):
    return lambda: Config(**{"d_model": 32, "num_layers": 2, "num_heads": 2, **fields})


CASES = [
    # ---- Config: sizes
    ("Config-num_heads-0", _config(num_heads=0), "num_heads must be a positive int, got 0"),
    ("Config-num_heads-float", _config(num_heads=4.0),
     "num_heads must be a positive int, got 4.0 of type float"),
    ("Config-d_model-str", _config(d_model="64"),
     "d_model must be a positive int, got '64' of type str"),
    ("Config-vocab_size-0", _config(vocab_size=0), "vocab_size must be a positive int, got 0"),
    ("Config-num_layers-negative", _config(num_layers=-1),
     "num_layers must be a positive int, got -1"),
    ("Config-max_seq_len-0", _config(max_seq_len=0), "max_seq_len must be a positive int, got 0"),
    ("Config-num_kv_heads-0", _config(num_kv_heads=0),
     r"num_kv_heads must be a positive int \(or None: derived\), got 0"),
    ("Config-head_dim-negative", _config(head_dim=-1),
     r"head_dim must be a positive int \(or None: derived\), got -1"),
    ("Config-mlp_dim-float", _config(mlp_dim=100.5),
     r"mlp_dim must be a positive int \(or None: derived\), got 100\.5 of type float"),
    ("Config-heads-do-not-divide-d_model", _config(d_model=30, num_heads=4),
     "d_model=30 is not divisible by num_heads=4; change one of them or give head_dim"),
    ("Config-kv-heads-do-not-divide", _config(num_heads=4, num_kv_heads=3),
     "num_heads=4 is not a multiple of num_kv_heads=3"),
    ("Config-pattern-length", _config(layer_pattern="S"),
     "layer_pattern 'S' has 1 letters but num_layers=2; give one letter per layer"),
    ("Config-pattern-list", _config(layer_pattern=["S", "S"]),
     r"layer_pattern must be a string of mechanism letters such as 'LLLS', or None, got "
     r"\['S', 'S'\]"),
    # ---- Config: floats, flags, dtypes
    ("Config-rope_theta-negative", _config(rope_theta=-1.0),
     "rope_theta must be positive, got -1.0"),
    ("Config-rope_theta-nan", _config(rope_theta=float("nan")),
     "rope_theta must be a finite float, got nan"),
    ("Config-rope_fraction-above-1", _config(rope_fraction=1.5),
     r"rope_fraction must lie in \[0\.0, 1\.0\], got 1\.5"),
    ("Config-rope_fraction-odd-dims", _config(rope_fraction=0.2),
     "rope_fraction=0.2 of head_dim=16 rotates 3 dims; it must be an even number"),
    ("Config-local_window_size-float", _config(local_window_size=2.5),
     r"local_window_size must be an int >= 0 \(or None: full causal\), got 2\.5 of type "
     "float"),
    ("Config-local_window_size-negative", _config(local_window_size=-1),
     "local_window_size must be an int >= 0 .* got -1"),
    ("Config-logits_soft_cap-negative", _config(logits_soft_cap=-1.0),
     "logits_soft_cap must be positive, got -1.0"),
    ("Config-norm_eps-negative", _config(norm_eps=-1e-6),
     "norm_eps must be >= 0.0, got -1e-06"),
    ("Config-attention_impl-int", _config(attention_impl=3),
     "attention_impl must be an implementation name such as 'auto', got 3"),
    ("Config-dtype-int", _config(dtype=jnp.int32),
     r"dtype must be a float dtype \(float32, bfloat16, float16\), got .*int32"),
    ("Config-param_dtype-str", _config(param_dtype="bogus"),
     "param_dtype must be a float dtype .* got 'bogus'"),
    ("Config-tie_embeddings-str", _config(tie_embeddings="no"),
     "tie_embeddings must be a bool, got 'no'"),
    # ---- the model
    ("Transformer-cfg-not-Config", lambda: Transformer("tiny", rngs=nnx.Rngs(0)),
     "cfg must be an attnlab.nn.Config, got str"),
    ("Transformer-unknown-letter",
     lambda: Transformer(Config(d_model=32, num_layers=2, num_heads=2, layer_pattern="SX"),
                         rngs=nnx.Rngs(0)),
     r"layer_pattern 'SX' uses unknown mechanism letter\(s\) 'X'; known: .*S=softmax"),
    ("Transformer-unknown-impl",
     lambda: Transformer(Config(d_model=32, num_layers=2, num_heads=2,
                                attention_impl="flash9"), rngs=nnx.Rngs(0)),
     "attention_impl='flash9' is not an attention implementation"),
    ("call-float-tokens", lambda: MODEL(TOKENS.astype(np.float32)),
     r"tokens must be an integer array \(int32\), got dtype float32"),
    ("call-tokens-rank-1", lambda: MODEL(TOKENS[0]),
     r"tokens must have shape \[batch, seq\], got \(8,\)"),
    ("call-float-positions", lambda: MODEL(TOKENS, positions=np.zeros((1, 8), np.float32)),
     r"positions must be an integer array \(int32\), got dtype float32"),
    ("call-float-segment_ids", lambda: MODEL(TOKENS, segment_ids=np.ones((1, 8), np.float32)),
     r"segment_ids must be an integer array \(int32\), got dtype float32"),
    ("call-positions-shape", lambda: MODEL(TOKENS, positions=np.arange(8)),
     r"positions must have shape \(1, 8\) like tokens, got \(8,\)"),
    ("call-too-long", lambda: MODEL(np.zeros((1, 17), np.int32)),
     "sequence of 17 tokens is longer than max_seq_len=16; raise Config.max_seq_len"),
    ("call-caches-length", lambda: MODEL(TOKENS, caches=[None]),
     "caches has 1 entries but the model has 2 layers"),
    # ---- caches and generation
    ("init_caches-batch-float", lambda: make_caches(MODEL, 1.5, 8),
     "batch_size must be an int, got 1.5 of type float"),
    ("init_caches-batch-0", lambda: make_caches(MODEL, 0, 8), "batch_size=0 must be positive"),
    ("init_caches-max_len", lambda: make_caches(MODEL, 1, 17),
     r"max_len=17 must lie in \[1, max_seq_len=16\]"),
    ("generate-max_new_tokens-float", lambda: generate(MODEL, TOKENS, 2.5),
     "max_new_tokens must be an int, got 2.5 of type float"),
    ("generate-max_new_tokens-negative", lambda: generate(MODEL, TOKENS, -1),
     "max_new_tokens=-1 must be >= 0"),
    ("generate-top_k-float", lambda: generate(MODEL, TOKENS, 2, temperature=1.0, top_k=2.5),
     "top_k must be an int or None, got 2.5 of type float"),
    ("generate-top_k-range", lambda: generate(MODEL, TOKENS, 2, temperature=1.0, top_k=65),
     r"top_k=65 must lie in \[1, vocab_size=64\] or be None"),
    ("generate-temperature-nan", lambda: generate(MODEL, TOKENS, 2, temperature=float("nan")),
     "temperature must be a finite float, got nan"),
    ("generate-temperature-str", lambda: generate(MODEL, TOKENS, 2, temperature="hot"),
     "temperature must be a float, got 'hot'"),
    ("generate-prompt-float", lambda: generate(MODEL, TOKENS.astype(np.float32), 2),
     "prompt must hold integer token ids, got dtype float32"),
    ("generate-prompt-out-of-vocab", lambda: generate(MODEL, TOKENS + 64, 2),
     r"prompt token ids must lie in \[0, vocab_size=64\), got values in \[64, 64\]"),
    ("generate-prompt-empty", lambda: generate(MODEL, TOKENS[:, :0], 2),
     r"prompt must have shape \[batch, T0\] with T0 >= 1, got \(1, 0\)"),
    # ---- layers and mechanisms
    ("Embed-vocab-0", lambda: Embed(0, 8, rngs=nnx.Rngs(0)),
     "vocab_size must be a positive int, got 0"),
    ("RMSNorm-float-features", lambda: RMSNorm(8.0),
     "num_features must be a positive int, got 8.0 of type float"),
    ("RMSNorm-eps-negative", lambda: RMSNorm(8, eps=-1.0), "eps must be >= 0.0, got -1.0"),
    ("SwiGLU-d_model-0", lambda: SwiGLU(0, 8, rngs=nnx.Rngs(0)),
     "d_model must be a positive int, got 0"),
    ("Linear-float-features", lambda: Linear(8, 2.5, rngs=nnx.Rngs(0)),
     "out_features must be a positive int, got 2.5 of type float"),
    ("SoftmaxAttention-x-width", lambda: SOFTMAX(X[..., :16], positions=POS),
     r"x must have shape \[batch, seq, 32\], got \(1, 8, 16\)"),
    ("SoftmaxAttention-float-positions", lambda: SOFTMAX(X, positions=POS.astype(np.float32)),
     r"positions must be an integer array \(int32\), got dtype float32"),
    ("SoftmaxAttention-no-positions", lambda: SOFTMAX(X, positions=None),
     r"positions are required: \[B, T\] int32 global token positions"),
    ("SoftmaxAttention-init_cache-0", lambda: SOFTMAX.init_cache(0, 8),
     "batch_size must be a positive int, got 0"),
    ("LightningAttention-x-rank", lambda: LIGHTNING(X[0]),
     r"x must have shape \[batch, seq, 32\], got \(8, 32\)"),
    ("LightningAttention-float-segment_ids",
     lambda: LIGHTNING(X, segment_ids=POS.astype(np.float32)),
     r"segment_ids must be an integer array \(int32\), got dtype float32"),
    ("LightningAttention-init_cache-negative", lambda: LIGHTNING.init_cache(-1),
     "batch_size must be a positive int, got -1"),
    ("MLA-x-width", lambda: MLA(X[..., :16], positions=POS),
     r"x must have shape \[batch, seq, 32\], got \(1, 8, 16\)"),
    ("MLA-init_cache-0", lambda: MLA.init_cache(1, 0), "max_len must be a positive int, got 0"),
    ("Config-kv_lora_rank-0", _config(kv_lora_rank=0),
     r"kv_lora_rank must be a positive int \(or None: derived\), got 0"),
    ("Config-q_lora_rank-float", _config(q_lora_rank=2.5),
     r"q_lora_rank must be a positive int \(or None: a full-rank query\), got 2\.5"),
    ("Config-qk_rope_head_dim-odd", _config(qk_rope_head_dim=3),
     r"qk_rope_head_dim=3 must be even \(RoPE rotates pairs\)"),
    ("Config-qk_rope_head_dim-0-decoupled", _config(qk_rope_head_dim=0),
     "qk_rope_head_dim=0 needs mla_rope='per_head'; with mla_rope='decoupled' the shared"),
    ("Config-qk_rope_head_dim-float", _config(qk_rope_head_dim=8.0),
     r"qk_rope_head_dim must be an int >= 0 \(or None: derived\), got 8\.0 of type float"),
    ("get_mechanism-unknown", lambda: get_mechanism("Q"),
     "unknown attention mechanism 'Q'; known: .*S=softmax"),
]


test_bad_input = bad_input_test(CASES)


def test_numpy_integers_are_sizes():
    cfg = Config(d_model=np.int64(32), num_layers=np.int32(2), num_heads=np.int64(2),
                 local_window_size=np.int64(4))
    assert cfg == Config(d_model=32, num_layers=2, num_heads=2, local_window_size=4)
    assert all(type(getattr(cfg, f)) is int
               for f in ("d_model", "num_layers", "num_heads", "head_dim", "local_window_size"))
