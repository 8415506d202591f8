"""The ``attnlab`` command: info, bench (tiny CPU shape), FLOP counting, input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab.bench import attention, candidates, harness
from attnlab.cli import main

ROW_KEYS = {"impl", "S", "B", "causal", "pass", "ms", "tflops", "ratio_cudnn", "max_abs_err",
            "status"}
TOP_KEYS = {"device_kind", "platform", "jax_version", "jaxlib_version", "date", "argv", "config",
            "rows"}


def test_info_lists_builtin_implementations(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "xla" in text and "reference" in text
    assert "impl='auto'" in text


def test_info_json_runs_as_module() -> None:
    # `python -m attnlab.cli` is how the GPU machine runs it (the package is not installed).
    res = subprocess.run(
        [sys.executable, "-m", "attnlab.cli", "info", "--json"],
        capture_output=True, text=True, check=True, timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    info = json.loads(res.stdout)
    names = {r["name"]: r for r in info["implementations"]}
    assert {"xla", "reference"} <= set(names)
    assert names["xla"]["available"] and names["reference"]["available"]
    assert not names["cudnn"]["available"] and "GPU" in names["cudnn"]["reason"]
    assert set(info["auto"]) == {"causal", "non_causal", "causal_return_residuals"}
    assert info["auto"]["causal"] in names


def test_bench_tiny_cpu_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "r" / "bench.json"
    argv = ["bench", "attention", "--shapes", "128", "--batch-tokens", "256", "--heads", "2",
            "--head-dim", "32", "--dtype", "float32", "--causal", "true",
            "--passes", "fwd,fwdbwd", "--repeats", "2", "--out", str(out)]
    assert main(argv) == 0
    rec = json.loads(out.read_text())
    assert set(rec) >= TOP_KEYS
    assert rec["platform"] == "cpu" and rec["argv"][1:] == argv
    assert rec["config"]["shapes"] == [128] and rec["config"]["dtype"] == "float32"
    rows = rec["rows"]
    impls = {r["impl"] for r in rows}
    assert {"xla", "reference", harness.ANCHOR_XLA} <= impls
    assert {r["pass"] for r in rows} == {"fwd", "fwdbwd"}
    for r in rows:
        assert set(r) >= ROW_KEYS, r
        assert r["S"] == 128 and r["B"] == 2 and r["causal"] is True
        if r["status"] == "skipped":  # interpret-mode kernels are not timed on CPU
            assert "interpret" in r["note"]
            continue
        assert r["status"] == "ok", r
        assert r["max_abs_err"] < 1e-4, r
        assert r["ms"] > 0 and r["tflops"] > 0
        assert r["ratio_cudnn"] is None  # no cuDNN on CPU
        # Each rate read against the matmul ceiling measured in the same run.
        assert r["fraction_of_matmul"] == pytest.approx(
            r["tflops"] / rec["matmul_ceiling"]["tflops"])
    assert rec["matmul_ceiling"]["n"] == 512 and rec["matmul_ceiling"]["dtype"] == "float32"
    assert rec["matmul_ceiling"]["tflops"] > 0
    (xla_anchor,) = [r for r in rows if r["impl"] == harness.ANCHOR_XLA and r["pass"] == "fwd"]
    assert xla_anchor["ratio_xla"] == pytest.approx(1.0)


def test_flop_formula() -> None:
    b, s, n, h = 2, 1024, 16, 128
    full = 4 * b * s * s * n * h
    assert harness.attention_flops(b, s, n, h, causal=False) == full
    assert harness.attention_flops(b, s, n, h, causal=True) == full / 2
    assert harness.attention_flops(b, s, n, h, causal=True, pass_="fwdbwd") == 3.5 * full / 2
    # BENCHMARKS.md's setting (B*S = 32768, S = 8192, N=16, H=128), causal fwd: 2**40 FLOPs,
    # so 10 ms is 110.0 TFLOP/s.
    f = harness.attention_flops(4, 8192, 16, 128, causal=True)
    assert f == 2.0**40
    assert harness.tflops_per_s(f, 10.0) == pytest.approx(109.95116, rel=1e-6)
    with pytest.raises(ValueError, match="pass_"):
        harness.attention_flops(b, s, n, h, causal=False, pass_="bwd")


def _bench_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(["bench", "attention", *argv])
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bench_rejects_unknown_impl(capsys: pytest.CaptureFixture[str]) -> None:
    err = _bench_error(["--impls", "xla,flashy"], capsys)
    assert "unknown implementation 'flashy'" in err
    assert "xla" in err and "reference" in err  # it lists what is registered


def test_bench_rejects_shapes_not_dividing_batch_tokens(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = _bench_error(["--shapes", "128,3000", "--batch-tokens", "32768"], capsys)
    assert "not a multiple of S=[3000]" in err and "--batch-tokens 32768" in err


def test_ratios_are_to_anchors_of_the_same_group() -> None:
    def row(impl: str, tflops: float | None, status: str = "ok") -> attention.Row:
        return attention.Row(impl=impl, kind="x", S=2048, B=16, causal=True, pass_="fwd",
                         tflops=tflops, status=status)

    group = [row("pallas_triton", 300.0), row(harness.ANCHOR_CUDNN, 400.0),
             row(harness.ANCHOR_XLA, 100.0, status="inexact"), row("reference", None, "skipped")]
    attention.fill_ratios(group)
    assert group[0].ratio_cudnn == pytest.approx(0.75) and group[0].ratio_xla == pytest.approx(3.0)
    assert group[1].ratio_cudnn == pytest.approx(1.0)
    assert group[3].ratio_cudnn is None


def test_gpu_anchor_list_without_a_gpu() -> None:
    # The GPU machine's anchors, built (not run) here: cuDNN refuses float32 with a reason.
    import jax
    import jax.numpy as jnp

    q = jax.ShapeDtypeStruct((1, 128, 2, 32), jnp.float32)
    names = {c.name: c for c in candidates.anchor_candidates(q, causal=True, plat="gpu")}
    assert names[harness.ANCHOR_XLA].unsupported is None
    assert "bfloat16" in names[harness.ANCHOR_CUDNN].unsupported
    qb = jax.ShapeDtypeStruct((1, 128, 2, 32), jnp.bfloat16)
    assert candidates.anchor_candidates(qb, causal=True, plat="gpu")[1].unsupported is None
