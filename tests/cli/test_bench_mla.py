"""attnlab.bench.mla: the latent decode benchmark's record (smoke on CPU) and its sweep grid."""

from __future__ import annotations

import json
from pathlib import Path

from attnlab.bench import mla as bm
from pallas_kernels.gpu.mgpu_mla_decode import MosaicMlaDecodeConfig
from pallas_kernels.gpu.mla_decode import MlaDecodeConfig


def test_smoke_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "mla.json"
    assert bm.main(["--smoke", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["dims"] == dict(b=2, n=4, d_c=32, d_r=16, d_n=16, d_v=16)
    kinds = [(r["kind"], r["impl"]) for r in rec["rows"]]
    assert kinds == [("latent", "pallas_triton"), ("latent", "xla"),
                     ("materialized", "pallas_triton"), ("materialized", "xla")]
    for r in rec["rows"]:
        assert r["status"] == "ok" and r["ms"] > 0 and r["max_abs_err_vs_xla"] < 5e-2, r
        assert r["ms_in_program"] > 0 and r["GBps_in_program"] > 0, r
    for r in rec["rows"]:
        if r["kind"] == "latent":
            assert r["speedup_vs_materialized"] > 0 and r["ratio_copy_in_program"] > 0, r
            assert r["speedup_vs_materialized_in_program"] > 0, r
    assert rec["copy"]["GBps_in_program"] > 0


def test_sweep_grid_is_valid_configs() -> None:
    configs = [MlaDecodeConfig(block_kv=kv, block_rows=r, num_warps=w, num_stages=st,
                               keys_per_split=kps) for kv, r, w, st, kps in bm.SWEEP]
    assert len(set(configs)) == len(bm.SWEEP) >= 12
    assert MlaDecodeConfig() in configs  # the default is among those timed


def test_mosaic_sweep_grid_is_valid_configs() -> None:
    configs = [MosaicMlaDecodeConfig(num_splits=p, approx_math=a, overlap=o)
               for p, a, o in bm.MOSAIC_SWEEP]
    assert len(set(configs)) == len(bm.MOSAIC_SWEEP) >= 5
    assert MosaicMlaDecodeConfig() in configs
    assert {bm.CONFIG_IMPL[type(c)] for c in configs} == {"pallas_mosaic_gpu"}


def test_ncu_script_runs_both_calls_on_cpu() -> None:
    """``scripts/ncu_kernels.py`` (the calls Nsight Compute profiles on the GPU) runs its MLA
    decode and its causal attention through the XLA path on CPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "ncu_kernels.py"
    spec = importlib.util.spec_from_file_location("ncu_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["mla", "--seq-len", "64", "--impl", "xla"]) == 0
    assert mod.main(["attention", "--seq-len", "64", "--batch-tokens", "64",
                     "--impl", "xla"]) == 0
