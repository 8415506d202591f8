"""The tuned block-size table: lookup by device kind, fallback when absent, legal entries."""

from __future__ import annotations

import json

from pallas_kernels.gpu import tuned
from pallas_kernels.gpu.flash_common import FlashConfig


def test_shipped_table_entries_are_legal_configs():
    table = tuned.load_table()
    for kind, entries in table.items():
        for key, fields in entries.items():
            part, head, mask = key.split("/")
            assert part in ("fwd", "bwd") and head.startswith("h") and mask in ("causal", "full")
            cfg = FlashConfig.get_default(head_dim=int(head[1:]), causal=mask == "causal",
                                          device_kind=kind)
            for name, val in fields.items():
                assert getattr(cfg, name) == val, (kind, key, name)


def test_lookup_uses_device_kind_and_falls_back(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"Fake GPU": {
        "fwd/h128/causal": {"block_q": 64, "block_kv": 32, "num_warps": 4, "num_stages": 4},
        "bwd/h128/causal": {"block_q_dkv": 32, "block_kv_dkv": 128},
    }}))
    monkeypatch.setattr(tuned, "TABLE_PATH", path)
    tuned.load_table.cache_clear()
    try:
        cfg = FlashConfig.get_default(head_dim=128, causal=True, device_kind="Fake GPU")
        assert (cfg.block_q, cfg.block_kv, cfg.num_warps, cfg.num_stages) == (64, 32, 4, 4)
        assert (cfg.block_q_dkv, cfg.block_kv_dkv) == (32, 128)
        hand = FlashConfig.get_default(head_dim=128)
        assert FlashConfig.get_default(head_dim=128, causal=False, device_kind="Fake GPU") == hand
        assert FlashConfig.get_default(head_dim=128, causal=True, device_kind="Other") == hand
    finally:
        tuned.load_table.cache_clear()


def test_no_gpu_means_hand_picked_defaults():
    if tuned.current_device_kind() is None:
        assert tuned.tuned_fields(128, True) == {}


def test_tuned_sizes_apply_to_16_bit_inputs_only():
    import jax.numpy as jnp

    for kind, entries in tuned.load_table().items():
        for key in entries:
            part, head, mask = key.split("/")
            h, causal = int(head[1:]), mask == "causal"
            hand = FlashConfig.get_default(head_dim=h)
            assert FlashConfig.get_default(head_dim=h, causal=causal, device_kind=kind,
                                           dtype=jnp.float32) == hand
            tuned_cfg = FlashConfig.get_default(head_dim=h, causal=causal, device_kind=kind,
                                                dtype=jnp.bfloat16)
            for name, val in entries[key].items():
                assert getattr(tuned_cfg, name) == val
