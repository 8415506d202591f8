"""Bad inputs to the kernels' configs and entry points: each is refused with a message that
names the argument, what was given and what is allowed.

No kernel runs here: configs are checked when built, and the entry points check their
arguments before tracing anything.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import XlaConfig, XlaDecodeConfig, XlaLightningConfig
from pallas_kernels.common.masks import MaskSpec
from pallas_kernels.common.static_args import check_bool, check_int, check_static_float
from pallas_kernels.gpu import decode as gpu_decode
from pallas_kernels.gpu import flash_fwd as gpu_flash
from pallas_kernels.gpu import lightning_chunk as gpu_lightning
from pallas_kernels.gpu.decode import DecodeConfig
from pallas_kernels.gpu.flash_common import FlashConfig
from pallas_kernels.gpu.lightning_common import LightningConfig
from pallas_kernels.tpu import decode as tpu_decode
from pallas_kernels.tpu import flash as tpu_flash
from pallas_kernels.tpu import lightning_chunk as tpu_lightning
from pallas_kernels.tpu.decode import TpuDecodeConfig
from pallas_kernels.tpu.flash import TpuFlashConfig
from pallas_kernels.tpu.lightning_chunk import TpuLightningConfig
from tests.helpers import bad_input_test

TRITON = r"\(Triton tiles are; 16 is the smallest its dot accepts\)"

# (config class, fields, message regex)
CONFIG_CASES = [
    # Triton flash attention
    (FlashConfig, dict(block_q=0), rf"block_q must be a power of two >= 16 {TRITON}, got 0"),
    (FlashConfig, dict(block_kv=-16), r"block_kv must be a power of two >= 16 .*, got -16$"),
    (FlashConfig, dict(block_kv=48), r"block_kv must be a power of two .* got 48; try 32 or 64"),
    (FlashConfig, dict(block_kv=64.0), r"block_kv must be a power of two .* got 64\.0 of type "
     "float"),
    (FlashConfig, dict(block_q_dq=100), r"block_q_dq must be a power of two .* try 64 or 128"),
    (FlashConfig, dict(block_kv_dkv=8), r"block_kv_dkv must be a power of two >= 16 .* got 8"),
    (FlashConfig, dict(num_warps=3), r"num_warps must be a power of two in \[1, 32\], got 3"),
    (FlashConfig, dict(num_warps=64), r"num_warps must be a power of two in \[1, 32\], got 64"),
    (FlashConfig, dict(num_stages_bwd=0), "num_stages_bwd must be a positive int, got 0"),
    (FlashConfig, dict(num_stages="3"), "num_stages must be a positive int, got '3' of type str"),
    # Triton lightning attention
    (LightningConfig, dict(chunk=48), rf"chunk must be a power of two >= 16 {TRITON}, got 48; "
     "try 32 or 64"),
    (LightningConfig, dict(chunk=8), r"chunk must be a power of two >= 16 .* got 8"),
    (LightningConfig, dict(chunk=64.0), r"chunk must be a power of two >= 16 .* got 64\.0 of "
     "type float"),
    (LightningConfig, dict(block_v=0), r"block_v must be a power of two >= 16 .* got 0"),
    (LightningConfig, dict(num_warps=3), r"num_warps must be a power of two in \[1, 32\], got 3"),
    (LightningConfig, dict(num_stages_bwd=0), "num_stages_bwd must be a positive int, got 0"),
    (LightningConfig, dict(fused_forward=1), "fused_forward must be a bool, got 1"),
    (LightningConfig, dict(segment_chunks=-1), r"segment_chunks must be an int >= 0 "
     r"\(0: automatic\), got -1"),
    (LightningConfig, dict(segment_chunks=2.5), r"segment_chunks must be an int >= 0 .* got "
     "2.5 of type float"),
    # Triton decode
    (DecodeConfig, dict(block_kv=24), r"block_kv must be a power of two >= 16 .* got 24; try 16 "
     "or 32"),
    (DecodeConfig, dict(block_kv=8), r"block_kv must be a power of two >= 16 .* got 8"),
    (DecodeConfig, dict(block_rows=True), r"block_rows must be .* got True of type bool"),
    (DecodeConfig, dict(keys_per_split=100), r"keys_per_split must be a positive multiple of 64 "
     r"\(block_kv=64; or None\), got 100; try 128"),
    (DecodeConfig, dict(keys_per_split=512.0), r"keys_per_split must be .* got 512\.0 of type "
     "float"),
    (DecodeConfig, dict(num_warps=3), r"num_warps must be a power of two in \[1, 32\], got 3"),
    # TPU flash attention
    (TpuFlashConfig, dict(block_kv=100), r"block_kv=100 is not legal on TPU: it must be a "
     r"multiple of 128 \(the lane width\); try block_kv=128"),
    (TpuFlashConfig, dict(block_q_dkv=64), r"block_q_dkv=64 .* multiple of 128 \(the lane "
     r"width\)"),
    (TpuFlashConfig, dict(block_q=12), r"block_q=12 .* multiple of 8 \(the sublane count\); "
     "try block_q=16"),
    (TpuFlashConfig, dict(block_kv_dkv=0), "block_kv_dkv must be a positive int, got 0"),
    (TpuFlashConfig, dict(block_kv=512.0), r"block_kv must be a positive int, got 512\.0 of "
     "type float"),
    # TPU decode
    (TpuDecodeConfig, dict(block_kv=12), r"block_kv=12 is not legal on TPU: it must be a "
     r"multiple of 8 \(the sublane count\); try 16"),
    (TpuDecodeConfig, dict(block_kv=16, keys_per_split=40), "keys_per_split=40 must be a "
     "multiple of block_kv=16; try 48"),
    (TpuDecodeConfig, dict(keys_per_split="4096"), "keys_per_split must be a positive int, got "
     "'4096' of type str"),
    # TPU lightning
    (TpuLightningConfig, dict(chunk=0), r"chunk must be a positive multiple of 8 \(the TPU "
     r"sublane count; 64 or 128 on a real TPU\), got 0"),
    (TpuLightningConfig, dict(chunk=12), r"chunk must be a positive multiple of 8 .* got 12; "
     "try 16"),
    (TpuLightningConfig, dict(chunk=True), r"chunk must be a positive multiple of 8 .* got True "
     "of type bool"),
    (TpuLightningConfig, dict(chunk=64.0), r"chunk must be .* got 64\.0 of type float"),
    # The ops' XLA paths
    (XlaConfig, dict(block_kv=0), "block_kv must be a positive int, got 0"),
    (XlaConfig, dict(block_kv=1.5), r"block_kv must be a positive int, got 1\.5 of type float"),
    (XlaDecodeConfig, dict(keys_per_split=-4), "keys_per_split must be a positive int, got -4"),
    (XlaDecodeConfig, dict(keys_per_split=None), "keys_per_split must be a positive int, got "
     "None of type NoneType"),
    (XlaLightningConfig, dict(chunk_size=16.0), r"chunk_size must be a positive int, got 16\.0 "
     "of type float"),
    (XlaLightningConfig, dict(chunk_size=0), "chunk_size must be a positive int, got 0"),
]


def _config_id(case) -> str:
    cls, fields, _ = case
    return f"{cls.__name__}-" + "-".join(f"{k}={v!r}" for k, v in fields.items())


@pytest.mark.parametrize("cls, fields, match", CONFIG_CASES,
                         ids=[_config_id(c) for c in CONFIG_CASES])
def test_bad_config(cls, fields, match):
    with pytest.raises(ValueError, match=match):
        cls(**fields)


@pytest.mark.parametrize(
    "cls, fields",
    [
        (FlashConfig, dict(block_kv=np.int64(32), num_warps=np.int32(4))),
        (LightningConfig, dict(chunk=np.int64(32), fused_forward=np.bool_(True))),
        (DecodeConfig, dict(keys_per_split=np.int64(128))),
        (TpuFlashConfig, dict(block_q=np.int64(16))),
        (TpuDecodeConfig, dict(block_kv=np.int16(16), keys_per_split=np.int64(64))),
        (TpuLightningConfig, dict(chunk=np.uint8(16))),
        (XlaConfig, dict(block_kv=np.int64(4))),
        (XlaDecodeConfig, dict(keys_per_split=np.int64(4))),
        (XlaLightningConfig, dict(chunk_size=np.int32(8))),
    ],
    ids=lambda x: x.__name__ if isinstance(x, type) else None,
)
def test_numpy_integers_are_accepted_as_python_ints(cls, fields):
    """A NumPy integer is a valid size; the config holds a Python int (so it hashes and
    compares like one built from Python ints: configs are jit static arguments)."""
    cfg = cls(**fields)
    plain = cls(**{k: v.item() for k, v in fields.items()})
    for name in fields:
        assert type(getattr(cfg, name)) in (int, bool), name
    assert cfg == plain and hash(cfg) == hash(plain)


# ----------------------------------------------------------------------------- shared checks

CHECK_CASES = [
    (lambda: check_int("n", 2.0), "n must be a positive int, got 2.0 of type float"),
    (lambda: check_int("n", "2"), "n must be a positive int, got '2' of type str"),
    (lambda: check_int("n", 4, minimum=0, maximum=3, why="a reason"), r"n must be an int in "
     r"\[0, 3\] \(a reason\), got 4"),
    (lambda: check_int("n", 24, multiple_of=16, minimum=32), "n must be a multiple of 16 >= 32, "
     "got 24; try 32"),
    (lambda: check_static_float("scale", "0.5"), "scale must be a float, got '0.5'"),
    (lambda: check_static_float("scale", [0.5]), r"scale must be a float, got \[0\.5\]"),
    (lambda: check_static_float("scale", float("nan")), "scale must be a finite float, got nan"),
    (lambda: check_static_float("cap", 0.0, positive=True), "cap must be positive, got 0.0"),
    (lambda: check_static_float("p", 1.5, minimum=0.0, maximum=1.0), r"p must lie in "
     r"\[0\.0, 1\.0\], got 1\.5"),
    (lambda: check_bool("flag", "yes"), "flag must be a bool, got 'yes' of type str"),
]


@pytest.mark.parametrize("call, match", CHECK_CASES,
                         ids=["float", "str", "range", "multiple", "float-str", "float-list",
                              "float-nan", "float-positive", "float-range", "bool-str"])
def test_shared_static_checks(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------------- entry points
# The kernels' public wrappers, called directly (interpreted): each refuses before tracing.

Q, K = jnp.zeros((1, 16, 4, 16)), jnp.zeros((1, 16, 2, 16))
K3 = jnp.zeros((1, 16, 3, 16))
POS = jnp.arange(16)
SEG = jnp.zeros((1, 16), jnp.int32)
Q1, CACHE = jnp.zeros((1, 1, 4, 16)), jnp.zeros((1, 32, 2, 16))
QL, NO_DECAY = jnp.zeros((1, 16, 1, 16)), jnp.zeros((1,))
FLASH = dict(spec=MaskSpec(), scale=0.25, interpret=True)

ENTRY_CASES = []
for _name, _flash in (("gpu", gpu_flash.flash_attention), ("tpu", tpu_flash.flash_attention)):
    ENTRY_CASES += [
        (f"{_name}-flash-kv_positions", lambda f=_flash: f(Q, K, K, POS, POS[:8], **FLASH),
         r"q_positions must have shape \(16,\) and kv_positions \(16,\), got \(16,\) and "
         r"\(8,\)"),
        (f"{_name}-flash-heads", lambda f=_flash: f(Q, K3, K3, POS, POS, **FLASH),
         "q has 4 heads but k has 3; the number of q heads must be a multiple"),
        (f"{_name}-flash-one-segment-array", lambda f=_flash: f(Q, K, K, POS, POS, SEG, None,
                                                                 **FLASH),
         "q_segment_ids and kv_segment_ids must be given together"),
        (f"{_name}-flash-segment-shape",
         lambda f=_flash: f(Q, K, K, POS, POS, SEG[:, :8], SEG, **FLASH),
         r"segment ids must have shapes \(1, 16\) and \(1, 16\), got \(1, 8\) and "
         r"\(1, 16\)"),
        (f"{_name}-flash-dtypes",
         lambda f=_flash: f(Q, K.astype(jnp.bfloat16), K, POS, POS, **FLASH),
         "q, k, v must share one of float32, bfloat16.*; got float32, bfloat16, float32"),
        (f"{_name}-flash-rank", lambda f=_flash: f(Q[0], K, K, POS, POS, **FLASH),
         r"q must have shape \[batch, seq, heads, head_dim\], got \(16, 4, 16\)"),
    ]
ENTRY_CASES += [
    ("gpu-flash-config-type",
     lambda: gpu_flash.flash_attention(Q, K, K, POS, POS, config=object(), **FLASH),
     "config must be a FlashConfig, got object"),
    ("tpu-flash-config-type",
     lambda: tpu_flash.flash_attention(Q, K, K, POS, POS, config=FlashConfig(), **FLASH),
     "config must be a TpuFlashConfig, got FlashConfig"),
]
for _name, _decode in (("gpu", gpu_decode.decode_partials), ("tpu", tpu_decode.decode_partials)):
    ENTRY_CASES += [
        (f"{_name}-decode-kv_lengths",
         lambda f=_decode: f(Q1, CACHE, CACHE, jnp.zeros((3,), jnp.int32), scale=0.25,
                             interpret=True),
         r"kv_lengths must have shape \(1,\), got \(3,\)"),
        (f"{_name}-decode-rank",
         lambda f=_decode: f(Q1[0], CACHE, CACHE, None, scale=0.25, interpret=True),
         r"q must have shape \[batch, seq, heads, head_dim\], got \(1, 4, 16\)"),
        (f"{_name}-decode-heads",
         lambda f=_decode: f(jnp.zeros((1, 1, 3, 16)), CACHE, CACHE, None, scale=0.25,
                             interpret=True),
         "q has 3 heads but k has 2"),
    ]
ENTRY_CASES += [
    ("gpu-decode-config-type",
     lambda: gpu_decode.decode_partials(Q1, CACHE, CACHE, None, scale=0.25, config=object(),
                                        interpret=True),
     "config must be a DecodeConfig, got object"),
    ("tpu-decode-config-type",
     lambda: tpu_decode.decode_partials(Q1, CACHE, CACHE, None, scale=0.25, config=object(),
                                        interpret=True),
     "config must be a TpuDecodeConfig, got object"),
]
for _name, _light in (("gpu", gpu_lightning.lightning_attention),
                      ("tpu", tpu_lightning.lightning_attention)):
    ENTRY_CASES += [
        (f"{_name}-lightning-log_decay",
         lambda f=_light: f(QL, QL, QL, jnp.zeros((3,)), interpret=True),
         r"log_decay must be a float array of shape \(1,\) \(log lambda per head\), got "
         r"shape \(3,\)"),
        (f"{_name}-lightning-initial_state",
         lambda f=_light: f(QL, QL, QL, NO_DECAY, initial_state=jnp.zeros((1, 1, 16, 8)),
                            interpret=True),
         r"initial_state must have shape \[B, N, H, Hv\] = \(1, 1, 16, 16\), got "
         r"\(1, 1, 16, 8\); pass None to start from zeros"),
        (f"{_name}-lightning-segment_ids",
         lambda f=_light: f(QL, QL, QL, NO_DECAY, segment_ids=SEG[:, :8], interpret=True),
         r"segment_ids must be an integer array of shape \[B, T\] = \(1, 16\), got shape "
         r"\(1, 8\)"),
        (f"{_name}-lightning-rank", lambda f=_light: f(QL[0], QL, QL, NO_DECAY, interpret=True),
         r"q must have shape \[batch, seq, heads, head_dim\], got \(16, 1, 16\)"),
    ]
ENTRY_CASES += [
    ("gpu-lightning-config-type",
     lambda: gpu_lightning.lightning_attention(QL, QL, QL, NO_DECAY, config=object(),
                                               interpret=True),
     "config must be a LightningConfig, got object"),
    ("tpu-lightning-config-type",
     lambda: tpu_lightning.lightning_attention(QL, QL, QL, NO_DECAY, config=LightningConfig(),
                                               interpret=True),
     "config must be a TpuLightningConfig, got LightningConfig"),
]


test_bad_entry_point_call = bad_input_test(ENTRY_CASES)
