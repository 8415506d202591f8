"""Lightning attention: decayed causal linear attention (Lightning Attention-2, MiniMax-01).

Shapes (attnlab letters): B batch, T sequence, N heads, H q/k head dim, Hv value head dim
(written ``V`` in einsum strings). Per batch row and head n, with decay lambda_n in (0, 1]:

    S_t = lambda_n S_{t-1} + k_t^T v_t          state [H, Hv], float32
    o_t = (scale q_t) S_t                        no softmax, no denominator

``lambda = 1`` is plain causal linear attention; ``lambda = 0`` (accepted traced, e.g. a
learned decay under ``jit``) keeps the current token only, exactly. With ``segment_ids``
[B, T] (packed documents) the carried state is dropped where ``seg_t != seg_{t-1}``; token 0
always continues ``initial_state``. The parallel form is O = [(Q K^T) * D] V with
D_ij = lambda^(i-j) for j <= i (same document) and 0 otherwise.

Masked tokens never influence a row, in any implementation: non-finite values in a query,
key, value or output cotangent at a token a row cannot see (a later one, another document)
never reach that row's output, nor the gradients of the tokens (and the initial and final
states) that only clean rows see. A row that sees a non-finite value gets an unspecified
result (usually NaN; an implementation may read the value as 0). Zero factors (D off the
mask, a dropped state, a row after a reset) select rather than multiply (0 * NaN is NaN);
see ``attnlab/ops/README.md``. For float16 inputs the reference and ``"xla"`` keep the
score tile and the states in float32 (q.k beyond float16's 65504 is ordinary); the Triton
kernels round them to float16 (as they round every score tile and stored state to the input
dtype), so scores that large overflow there.

Implementations: ``"reference"`` (the recurrence above, token by token: the definition),
``"xla"`` (the chunked intra/inter-block form of Lightning Attention-2 in pure JAX),
``"pallas_triton"`` / ``"pallas_tpu"`` (the Pallas kernels), each bound by its adapter in
``attnlab/ops/backends/lightning_*.py`` and listed in :data:`REGISTRY`. ``impl="auto"`` picks
the first that supports the call in :data:`AUTO_ORDER`; all compute exactly the same function.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.ops._checks import check_qkv
from attnlab.ops._registry import KERNEL_FIRST, Implementation, Registry, backends, platform
from pallas_kernels.common.lightning import decay_power, scale_state
from pallas_kernels.common.masks import finite_or_zero, weighted_sum
from pallas_kernels.common.static_args import check_bool, check_int, check_static_float

_HI = jax.lax.Precision.HIGHEST


class LightningArgs(NamedTuple):
    """Normalized, validated arguments handed to every implementation."""

    log_decay: jax.Array  # [N] float32, log(lambda) <= 0
    initial_state: jax.Array | None  # [B, N, H, Hv] float32
    segment_ids: jax.Array | None  # [B, T] int32
    scale: float
    chunk_size: int | None
    config: Any


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi / TransNormer head slopes m_h = 2^(-8 (h+1) / N), [N] float32.

    For N not a power of two, the ALiBi rule: the slopes of the next lower power of two,
    then every other slope of twice that many.

    Example:
      >>> alibi_slopes(8)[0]   # 0.5
    """
    num_heads = check_int("num_heads", num_heads)

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(p)
    if p < num_heads:
        slopes += power_of_two(2 * p)[0::2][: num_heads - p]
    return np.asarray(slopes, np.float32)


def minimax_decay(num_heads: int, layer_idx: int, num_layers: int) -> np.ndarray:
    """MiniMax-01 per-head decay lambda_h = exp(-s_h), [N] float32 in (0, 1).

    s_h = 2^(-8 (h+1) / N) * (1 - l / (L - 1) + 1e-5) for layer l of L (PAPERS.md section 7);
    deeper layers decay more slowly. A one-layer model uses l / (L - 1) = 0.

    Raises:
      ValueError: non-positive sizes, or layer_idx outside [0, num_layers).

    Example:
      >>> decay = minimax_decay(16, layer_idx=3, num_layers=8)
    """
    num_heads = check_int("num_heads", num_heads)
    num_layers = check_int("num_layers", num_layers)
    layer_idx = check_int("layer_idx", layer_idx, minimum=0)
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx={layer_idx} must lie in [0, num_layers={num_layers})")
    depth = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
    base = np.asarray([2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)])
    return np.exp(-base * (1.0 - depth + 1e-5)).astype(np.float32)


def transnormer_decay(num_heads: int, layer_idx: int = 0, num_layers: int = 1) -> np.ndarray:
    """TransNormerLLM-style decay lambda_h = exp(-m_h (1 - l / L)) with ALiBi slopes m_h, [N].

    With the default ``layer_idx=0`` it is exp(-m_h), the per-head decay of Lightning
    Attention-2's experiments.

    Example:
      >>> decay = transnormer_decay(8)
    """
    num_layers = check_int("num_layers", num_layers)
    layer_idx = check_int("layer_idx", layer_idx, minimum=0)
    if not 0 <= layer_idx < num_layers:
        raise ValueError(f"layer_idx={layer_idx} must lie in [0, num_layers={num_layers})")
    m = alibi_slopes(num_heads).astype(np.float64)
    return np.exp(-m * (1.0 - layer_idx / num_layers)).astype(np.float32)


# ----------------------------------------------------------------------------- checks


def _normalize(
    q, k, v, decay, initial_state, segment_ids, scale, chunk_size, config, *,
    state_name: str = "initial_state",
) -> LightningArgs:
    check_qkv(q, k, v)
    b, t, n, h = q.shape
    if h < 1 or v.shape[-1] < 1:  # as attention's check_heads says it
        raise ValueError(
            f"head dims must be at least 1, got q/k head_dim {h} and v head_dim {v.shape[-1]}"
        )
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {q.shape} [B, T, N, H], got {k.shape}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must agree with q in [batch, seq, heads] = {q.shape[:3]}, got {v.shape}"
        )
    log_decay = log_decay_of(decay, n)
    hv = v.shape[-1]
    if initial_state is not None:
        if jnp.shape(initial_state) != (b, n, h, hv):
            raise ValueError(
                f"{state_name} must have shape [B, N, H, Hv] = {(b, n, h, hv)}, got "
                f"{jnp.shape(initial_state)}"
            )
        if not jnp.issubdtype(jnp.result_type(initial_state), jnp.floating):
            raise ValueError(f"{state_name} must be a float array (float32), got dtype "
                             f"{jnp.result_type(initial_state)}")
        initial_state = jnp.asarray(initial_state, jnp.float32)
    if segment_ids is not None:
        if jnp.shape(segment_ids) != (b, t):
            raise ValueError(
                f"segment_ids must have shape [B, T] = {(b, t)}, got {jnp.shape(segment_ids)}"
            )
        if not jnp.issubdtype(jnp.asarray(segment_ids).dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integers, got {jnp.asarray(segment_ids).dtype}")
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, why="or None")
    scale = 1.0 if scale is None else check_static_float("scale", scale)
    return LightningArgs(log_decay, initial_state, segment_ids, scale, chunk_size, config)


def log_decay_of(decay: Any, num_heads: int) -> jax.Array:
    """Checks a per-head decay lambda ([N] or a scalar, values in (0, 1]) -> log lambda [N] f32.

    Raises:
      ValueError: wrong shape, or (for concrete values) lambda outside (0, 1].
    """
    if decay is None:
        raise ValueError("decay is required: per-head lambda in (0, 1], shape [N] (1.0 = none)")
    if isinstance(decay, (list, tuple)):
        decay = np.asarray(decay, np.float32)
    if jnp.ndim(decay) == 0:
        decay = jnp.full((num_heads,), decay, jnp.float32)
    if jnp.shape(decay) != (num_heads,):
        raise ValueError(
            f"decay must have shape [N] = ({num_heads},) (one lambda per head), got "
            f"{jnp.shape(decay)}"
        )
    if not isinstance(decay, jax.core.Tracer):
        d = np.asarray(decay, np.float64)
        if not np.all((d > 0) & (d <= 1)):
            raise ValueError(
                f"decay values must lie in (0, 1] (lambda, not log lambda), got min {d.min()} "
                f"max {d.max()}"
            )
    return jnp.log(jnp.asarray(decay, jnp.float32))


def segment_starts(segment_ids: jax.Array | None, b: int, t: int) -> jax.Array:
    """[B, T] bool: token t > 0 starts a new document (its state does not carry over)."""
    if segment_ids is None:
        return jnp.zeros((b, t), bool)
    first = jnp.zeros((b, 1), bool)
    return jnp.concatenate([first, segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)


# ----------------------------------------------------------------------------- reference


def reference(q: jax.Array, k: jax.Array, v: jax.Array, **kwargs: Any
              ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The definition: the recurrence S_t = lambda S_{t-1} + k_t^T v_t, o_t = scale q_t S_t.

    ``lightning_attention(q, k, v, impl="reference", **kwargs)``: the same arguments (but
    ``impl``, ``config`` and ``chunk_size``) and return values as :func:`lightning_attention`
    (float32 state, HIGHEST precision, one token per scan step).
    """
    for name in ("impl", "config", "chunk_size"):
        if name in kwargs:
            raise ValueError(f"reference takes no {name}")
    return lightning_attention(q, k, v, impl="reference", **kwargs)


def _reference(q, k, v, a: LightningArgs) -> tuple[jax.Array, jax.Array]:
    b, t, n, h = q.shape
    lam = jnp.exp(a.log_decay)[None, :, None, None]  # [1, N, 1, 1]; decay 0: lam = 0
    s0 = a.initial_state
    if s0 is None:
        s0 = jnp.zeros((b, n, h, v.shape[-1]), jnp.float32)
    keep = 1.0 - segment_starts(a.segment_ids, b, t).astype(jnp.float32)  # [B, T]

    def step(s, xs):
        q_t, k_t, v_t, keep_t = xs  # [B, N, H], [B, N, H], [B, N, Hv], [B]
        # Select, don't multiply: a state dropped at a document start (or by decay 0) brings
        # nothing along, not even NaN (0 * NaN is NaN).
        s = scale_state(keep_t[:, None, None, None] * lam, s) + jnp.einsum(
            "BNH,BNV->BNHV", k_t, v_t, precision=_HI
        )
        return s, jnp.einsum("BNH,BNHV->BNV", a.scale * q_t, s, precision=_HI)

    xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, keep))
    s, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), s


# ----------------------------------------------------------------------------- block phases


def chunk_summary(
    k: jax.Array, v: jax.Array, log_decay: jax.Array, segment_ids: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """What a block of tokens does to the state: S_out = carry * S_in + state.

    The state-passing piece of LASP / LASP-2: each sequence shard summarizes its block, the
    summaries are combined across devices, and each block then runs with its incoming state.

    Args:
      k: [B, T, N, H]; v: [B, T, N, Hv]; log_decay: [N] float32 (log lambda);
      segment_ids: [B, T] ints or None (the carry is 0 when a document starts inside the
        block at t > 0; a boundary at t = 0 is the caller's, who knows the previous block).

    Returns:
      (state [B, N, H, Hv] float32: the block's final state from a zero initial state,
       carry [B, N] float32: lambda^T, or 0 if a document starts inside the block).

    Raises:
      ValueError: k, v, log_decay or segment_ids of shapes that do not fit together.

    Example:
      >>> state, carry = chunk_summary(k, v, jnp.log(decay))
    """
    if jnp.ndim(k) != 4 or jnp.ndim(v) != 4 or jnp.shape(k)[:3] != jnp.shape(v)[:3]:
        raise ValueError(
            f"k must be [B, T, N, H] and v [B, T, N, Hv] with the same B, T, N; got k "
            f"{jnp.shape(k)} and v {jnp.shape(v)}"
        )
    b, t, n = k.shape[:3]
    if jnp.shape(log_decay) != (n,):
        raise ValueError(f"log_decay must have shape [N] = ({n},), got {jnp.shape(log_decay)}")
    if segment_ids is not None and jnp.shape(segment_ids) != (b, t):
        raise ValueError(
            f"segment_ids must have shape [B, T] = ({b}, {t}), got {jnp.shape(segment_ids)}"
        )
    starts = segment_starts(segment_ids, b, t)
    r = jnp.cumsum(starts.astype(jnp.int32), axis=1)  # [B, T]
    age = (t - 1 - jnp.arange(t, dtype=jnp.float32))  # tokens after j in the block
    w = decay_power(log_decay[None, :], age[:, None])[None]  # [1, T, N]
    last = (r == r[:, -1:])[..., None, None]  # only the last document; selected, as earlier
    dt = matmul_dtype(k.dtype)  # documents' k and v may hold garbage (0 * NaN is NaN)
    wk = jnp.where(last, finite_or_zero(k).astype(jnp.float32) * w[..., None], 0.0).astype(dt)
    state = weighted_sum("BTNH,BTNV->BNHV", wk, finite_or_zero(v).astype(dt), None,
                         jnp.float32)
    return state, block_carry(log_decay, segment_ids, b, t)


def block_carry(log_decay: jax.Array, segment_ids: jax.Array | None, b: int, t: int
                ) -> jax.Array:
    """[B, N] float32: the factor a block of t tokens puts on the state entering it,
    lambda^t, or 0 where a document starts inside the block (at a token after the first)."""
    unbroken = jnp.ones((b, 1), jnp.float32)
    if segment_ids is not None:
        unbroken = (jnp.sum(segment_starts(segment_ids, b, t), axis=1, keepdims=True) == 0
                    ).astype(jnp.float32)
    return decay_power(log_decay, t)[None, :] * unbroken


class BlockPhases(NamedTuple):
    """One block of a longer sequence in four phases, for sequence parallelism (LASP, LASP-2).

    The caller exchanges states between the phases: ``summarize(k, v) -> (state, aux)`` (the
    state the block leaves from zero; with :func:`block_carry` it says what the block does to
    any incoming state); ``forward(q, k, v, s_in, aux) -> (o, res)``;
    ``state_grad(res, do) -> (ds_in, res2)`` (the incoming state's cotangent, given none on
    the outgoing state); ``backward(res2, ds_out) -> (dq, dk, dv)`` with the outgoing
    state's cotangent. Kernels that compute a phase from another's by-products provide their
    own (:func:`block_phases`); any implementation has the generic ones.
    """

    summarize: Any
    forward: Any
    state_grad: Any
    backward: Any


def _generic_phases(impl: Implementation, a: LightningArgs) -> BlockPhases:
    """Any implementation: :func:`chunk_summary` and the op's own VJP (the summary reads k
    and v once more forward and backward)."""

    def summary(k, v):
        return chunk_summary(k, v, a.log_decay, a.segment_ids)[0]

    def forward(q, k, v, s_in, aux):
        o, vjp = jax.vjp(lambda q, k, v, s: impl.fn(q, k, v, a._replace(initial_state=s))[0],
                         q, k, v, s_in)
        return o, (vjp, k, v)

    def state_grad(res, do):
        vjp, k, v = res
        dq, dk, dv, ds_in = vjp(do)
        return ds_in, (dq, dk, dv, k, v)

    def backward(res, ds_out):
        dq, dk, dv, k, v = res
        dk2, dv2 = jax.vjp(summary, k, v)[1](ds_out)
        return dq, dk + dk2.astype(dk.dtype), dv + dv2.astype(dv.dtype)

    return BlockPhases(lambda k, v: (summary(k, v), None), forward, state_grad, backward)


def block_phases(q: jax.Array, k: jax.Array, v: jax.Array, a: LightningArgs, impl: str = "auto"
                 ) -> BlockPhases:
    """The :class:`BlockPhases` of the implementation ``impl`` resolves to for this block:
    the kernel's own where it has them (the Triton kernels with the fused forward: no
    phase reads the block twice), else the generic ones."""
    chosen = REGISTRY.choose(q, k, v, a, impl)
    phases = chosen.phases(q, k, v, a) if chosen.phases is not None else None
    return phases if phases is not None else _generic_phases(chosen, a)


def matmul_dtype(dt) -> Any:
    # XLA:CPU has no bf16 x bf16 -> f32 kernel for some dot layouts: f32 operands there.
    return jnp.float32 if platform() == "cpu" else dt


# ----------------------------------------------------------------------------- registry


def args_from_kwargs(q, k, v, *, decay: Any, **kwargs: Any) -> LightningArgs:
    """The validated, normalized arguments of ``lightning_attention(q, k, v, **kwargs)`` (this op's
    registry normalizer); ValueError on bad or unknown arguments."""
    a = _normalize(
        q, k, v, decay, kwargs.pop("initial_state", None), kwargs.pop("segment_ids", None),
        kwargs.pop("scale", None), kwargs.pop("chunk_size", None), kwargs.pop("config", None),
    )
    if kwargs:
        raise ValueError(f"unknown arguments {sorted(kwargs)}")
    return a


AUTO_ORDER = KERNEL_FIRST
REGISTRY = Registry(
    "lightning_attention", normalize=args_from_kwargs,
    adapters=backends("lightning", "xla", "pallas_triton", "pallas_tpu"),
    reference=Implementation(name="reference", fn=_reference, returns_lse=False,
                             description="the recurrence, one token per scan step (definition)"))
implementations, explain = REGISTRY.implementations, REGISTRY.explain


# ----------------------------------------------------------------------------- public ops


def lightning_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    decay: Any,
    initial_state: jax.Array | None = None,
    return_state: bool = False,
    segment_ids: jax.Array | None = None,
    chunk_size: int | None = None,
    scale: float | None = None,
    impl: str = "auto",
    config: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Lightning attention: decayed causal linear attention with a float32 recurrent state.

    Args:
      q, k: [B, T, N, H].
      v: [B, T, N, Hv].
      decay: per-head lambda in (0, 1], shape [N] (array or sequence) or a scalar; 1.0 is plain
        linear attention. See :func:`minimax_decay`, :func:`transnormer_decay`.
      initial_state: [B, N, H, Hv] state that token 0 continues (e.g. from a previous chunk,
        another device, or a decode cache); None is zeros.
      return_state: also return the state after the last token, [B, N, H, Hv] float32.
      segment_ids: [B, T] int document ids; the state resets where the id changes.
      chunk_size: block length C of the ``"xla"`` path (default 64); kernels take ``config``.
      scale: q is multiplied by it; default 1.0 (MiniMax-01 uses no 1/sqrt(H)). A static
        Python float (not a traced value under ``jax.jit``), as ``chunk_size`` is an int.
        Traced ``decay`` values and segment ids are fine but unchecked (concrete decays must
        lie in (0, 1]).
      impl: "auto", "reference", "xla", "pallas", "pallas_triton", "pallas_tpu".
      config: block config of the chosen implementation (``XlaLightningConfig`` or a kernel's).

    Returns:
      o [B, T, N, Hv] in q's dtype, or (o, final_state) with ``return_state``. T = 0 gives an
      empty o and the initial state (zeros when None) as the final state.
      A token a row cannot see (later, or in another document; even NaN or inf) never
      influences it (module docstring).

    Raises:
      ValueError: bad shapes (H = 0 included), dtypes, decay values, scale, chunk_size or impl
        name.
      NotImplementedError: the named impl cannot compute this call (the message says why).

    Example:
      >>> o, s = lightning_attention(q, k, v, decay=minimax_decay(8, 0, 4), return_state=True)
    """
    return_state = check_bool("return_state", return_state)
    a = _normalize(q, k, v, decay, initial_state, segment_ids, scale, chunk_size, config)
    chosen = REGISTRY.choose(q, k, v, a, impl)
    if q.shape[1] == 0:  # no tokens: an empty output, and the state passes through unchanged
        b, _, n, h = q.shape
        o = jnp.zeros((b, 0, n, v.shape[-1]), q.dtype)
        s = a.initial_state
        if s is None:
            s = jnp.zeros((b, n, h, v.shape[-1]), jnp.float32)
        return (o, s) if return_state else o
    o, s = chosen.fn(q, k, v, a)
    return (o, s) if return_state else o


def lightning_decode(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    state: jax.Array,
    decay: Any,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Decode steps: continues ``state`` by one or a few tokens with the recurrence.

    Args:
      q, k: [B, T, N, H] (T new tokens, typically 1); v: [B, T, N, Hv].
      state: [B, N, H, Hv] float32 state after the previous tokens.
      decay: per-head lambda [N] (as in :func:`lightning_attention`).
      scale: q multiplier, default 1.0.

    Returns:
      (o [B, T, N, Hv] in q's dtype, new_state [B, N, H, Hv] float32).

    Raises:
      ValueError: bad shapes, dtypes or decay values.

    Example:
      >>> o, state = lightning_decode(q1, k1, v1, state, decay)
    """
    if state is None:
        raise ValueError("state is required: [B, N, H, Hv] float32 (zeros for an empty cache)")
    a = _normalize(q, k, v, decay, state, None, scale, None, None, state_name="state")
    return _reference(q, k, v, a)


__all__ = [
    "AUTO_ORDER", "BlockPhases", "LightningArgs", "alibi_slopes",
    "block_carry", "block_phases", "chunk_summary",
    "explain",
    "implementations", "lightning_attention", "lightning_decode",
    "log_decay_of", "minimax_decay", "reference", "transnormer_decay",
]
