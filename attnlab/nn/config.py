"""Model configuration shared by every attention module and the decoder LM.

Every attention mechanism in ``attnlab.nn`` is an NNX module built as
``Mechanism(cfg, layer_idx=i, rngs=rngs)`` and called as
``y, cache = module(x, positions=positions, segment_ids=segment_ids, cache=cache)``
(see :mod:`attnlab.nn.registry`). The fields below are all a mechanism may read; a mechanism
that needs more adds a field here with a default, so one ``Config`` describes a whole model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from pallas_kernels.common.static_args import check_int, check_static_float, check_type


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Decoder LM configuration.

    Attributes:
      vocab_size: token vocabulary (256 for the byte-level tokenizer).
      d_model: residual width D.
      num_layers: number of decoder blocks; ``len(layer_pattern)`` when a pattern is given.
      num_heads: query heads N.
      num_kv_heads: key/value heads K (GQA/MQA); N must be a multiple of K.
      head_dim: per-head width H (default d_model // num_heads).
      mlp_dim: SwiGLU hidden width (default 8/3 d_model rounded up to a multiple of 64).
      layer_pattern: one letter per layer naming its mechanism (``"S"`` softmax, ``"L"``
        lightning, ...; see ``attnlab.nn.registry``), e.g. ``"LLLLLLLS"`` for MiniMax 7:1.
        Default: every layer softmax.
      max_seq_len: longest sequence (positions and caches are sized by it).
      rope_theta: RoPE base.
      rope_fraction: fraction of head_dim that is rotated (1.0 full, 0.5 as MiniMax softmax).
      local_window_size: sliding window (left) of softmax layers, or None for full causal.
      logits_soft_cap: softmax logit soft-cap, or None.
      norm_eps: RMSNorm epsilon.
      attention_impl: ``impl=`` passed to the ops (``"auto"`` picks per platform).
      dtype: compute dtype (activations); params are kept in ``param_dtype``.
      param_dtype: parameter dtype.
      tie_embeddings: share the input embedding with the output projection.
      kv_lora_rank: MLA (``"M"`` layers) latent rank d_c (default 4 * head_dim).
      qk_rope_head_dim: MLA decoupled RoPE dim d_R, even (default head_dim // 2).
      qk_nope_head_dim: MLA per-head no-RoPE query/key dim d_n (default head_dim).
      v_head_dim: MLA per-head value dim d_v (default head_dim).
      q_lora_rank: MLA low-rank query rank, or None for a full-rank query projection.
      mla_rope: where MLA applies RoPE. ``"decoupled"`` (DeepSeek): a shared rotated key k_R
        of qk_rope_head_dim dims beside the latent, absorbable at decode. ``"per_head"``
        (TransMLA's exact GQA form): RoPE on the first ``rope_dim`` dims of each head's
        up-projected query and key, so qk_rope_head_dim is 0 (its default in this mode) and
        decoding materializes K/V from the latent cache (correct, not absorbed).

    Raises:
      ValueError: a size that is not a positive int (NumPy integers are accepted), heads
        that do not divide, a pattern of the wrong length, an odd number of rotated dims,
        a non-finite or out-of-range float, a dtype that is not a float type. Mechanism
        letters and ``attention_impl`` are checked by the model (``transformer.validate``).
    """

    vocab_size: int = 256
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int | None = None
    layer_pattern: str | None = None
    max_seq_len: int = 1024
    rope_theta: float = 10_000.0
    rope_fraction: float = 1.0
    local_window_size: int | None = None
    logits_soft_cap: float | None = None
    norm_eps: float = 1e-6
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    tie_embeddings: bool = True
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    q_lora_rank: int | None = None
    mla_rope: str = "decoupled"

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        # Types first (NumPy integers become Python ints), so the derivations below and the
        # messages are about values, never a ZeroDivisionError or a TypeError.
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "max_seq_len"):
            set_(name, check_int(name, getattr(self, name)))
        for name in ("num_kv_heads", "head_dim", "mlp_dim", "kv_lora_rank", "qk_nope_head_dim",
                     "v_head_dim"):
            if getattr(self, name) is not None:
                set_(name, check_int(name, getattr(self, name), why="or None: derived"))
        if self.qk_rope_head_dim is not None:  # 0 with mla_rope="per_head", checked below
            set_("qk_rope_head_dim", check_int("qk_rope_head_dim", self.qk_rope_head_dim,
                                               minimum=0, why="or None: derived"))
        if self.q_lora_rank is not None:
            set_("q_lora_rank", check_int("q_lora_rank", self.q_lora_rank,
                                          why="or None: a full-rank query"))
        if self.local_window_size is not None:
            set_("local_window_size", check_int("local_window_size", self.local_window_size,
                                                minimum=0, why="or None: full causal"))
        set_("rope_theta", check_static_float("rope_theta", self.rope_theta, positive=True))
        set_("rope_fraction", check_static_float("rope_fraction", self.rope_fraction,
                                                 minimum=0.0, maximum=1.0))
        if self.logits_soft_cap is not None:
            set_("logits_soft_cap", check_static_float("logits_soft_cap", self.logits_soft_cap,
                                                       positive=True))
        set_("norm_eps", check_static_float("norm_eps", self.norm_eps, minimum=0.0))
        check_type("attention_impl", self.attention_impl, str,
                   "an implementation name such as 'auto'")
        check_type("layer_pattern", self.layer_pattern, str,
                   "a string of mechanism letters such as 'LLLS', or None", allow_none=True)
        check_type("tie_embeddings", self.tie_embeddings, (bool, np.bool_), "a bool")
        for name in ("dtype", "param_dtype"):
            _check_float_dtype(name, getattr(self, name))
        if self.num_kv_heads is None:
            set_("num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                    "change one of them or give head_dim explicitly"
                )
            set_("head_dim", self.d_model // self.num_heads)
        if self.mlp_dim is None:
            set_("mlp_dim", -(-(8 * self.d_model // 3) // 64) * 64)
        if self.layer_pattern is None:
            set_("layer_pattern", "S" * self.num_layers)
        if self.mla_rope not in ("decoupled", "per_head"):
            raise ValueError(
                f"mla_rope={self.mla_rope!r} is not an MLA RoPE placement; choose 'decoupled' "
                "(shared k_R, absorbed decode) or 'per_head' (RoPE on each head's up-projected "
                "key, TransMLA's exact form of GQA)"
            )
        per_head = self.mla_rope == "per_head"
        if per_head and self.qk_rope_head_dim is None:
            set_("qk_rope_head_dim", 0)
        if per_head and self.qk_rope_head_dim != 0:
            raise ValueError(
                f"qk_rope_head_dim={self.qk_rope_head_dim} must be 0 with mla_rope='per_head' "
                "(RoPE sits on each head's first rope_dim dims, there is no decoupled k_R); "
                "leave it unset or use mla_rope='decoupled'"
            )
        for name, default in (("kv_lora_rank", 4 * self.head_dim),
                              ("qk_rope_head_dim", 2 * max(1, self.head_dim // 4)),
                              ("qk_nope_head_dim", self.head_dim), ("v_head_dim", self.head_dim)):
            if getattr(self, name) is None:
                set_(name, default)
        if not per_head and self.qk_rope_head_dim == 0:
            raise ValueError(
                "qk_rope_head_dim=0 needs mla_rope='per_head'; with mla_rope='decoupled' the "
                "shared rotated key k_R has qk_rope_head_dim >= 2 dims (even)"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
                f"{self.num_kv_heads}; choose num_kv_heads among the divisors of num_heads"
            )
        if len(self.layer_pattern) != self.num_layers:
            raise ValueError(
                f"layer_pattern {self.layer_pattern!r} has {len(self.layer_pattern)} letters but "
                f"num_layers={self.num_layers}; give one letter per layer"
            )
        rotated = int(round(self.head_dim * self.rope_fraction))
        if rotated % 2:
            raise ValueError(
                f"rope_fraction={self.rope_fraction} of head_dim={self.head_dim} rotates "
                f"{rotated} dims; it must be an even number"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)"
            )

    @property
    def rope_dim(self) -> int:
        """Number of leading head dims that RoPE rotates (even)."""
        return int(round(self.head_dim * self.rope_fraction))


def _check_float_dtype(name: str, dtype: Any) -> None:
    try:
        ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(
            f"{name} must be a float dtype (float32, bfloat16, float16), got {dtype!r}"
        )
