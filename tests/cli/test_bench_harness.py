"""attnlab.bench.harness: timing many calls inside one program keeps them separate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from attnlab.bench import harness


def _computations(fn, *args) -> list[str]:
    """The computations of the optimized HLO module (fusions, loop body, entry), as text."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    assert " while(" in text, "the calls are not in a loop"
    return text.split("\n\n")


@pytest.mark.parametrize("chain", [False, True])
def test_repeated_program_runs_every_call(chain: bool) -> None:
    x, zeros = jnp.arange(8.0), jnp.zeros(5)
    prog = harness.repeated_program(lambda x: jnp.sin(x) + 1.0, 5, chain=chain)
    out = jax.jit(prog)(zeros, x)
    want = jnp.sin(x) + 1.0
    if chain:  # five applications in a row
        want = x
        for _ in range(5):
            want = jnp.sin(want) + 1.0
    assert jnp.allclose(out, want)
    # Every computation of sin reads the loop's per-call perturbation (zeros[i]), so none was
    # hoisted out of the loop as loop-invariant.
    with_sin = [c for c in _computations(prog, zeros, x) if "sine(" in c]
    assert with_sin and all("dynamic-slice(" in c for c in with_sin)


def test_time_in_program_is_per_call() -> None:
    t = harness.time_in_program(lambda x: x * 2.0, jnp.ones(16), calls=4, repeats=3)
    assert t.median_ms > 0 and len(t.times_ms) == 3
    with pytest.raises(ValueError, match="calls must be >= 1, got 0"):
        harness.repeated_program(lambda x: x, 0)


def test_matmul_ceiling_counts_2n3_flops():
    c = harness.matmul_ceiling(64, "float32", repeats=2, warmup=1)
    assert c["n"] == 64 and c["dtype"] == "float32"
    assert c["tflops"] == pytest.approx(2 * 64**3 / (c["ms"] * 1e-3) / 1e12)
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        harness.matmul_ceiling(0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        harness.matmul_ceiling(8, "int8")


def test_check_then_time_times_only_a_right_output():
    x = jnp.arange(4.0)
    ok = harness.check_then_time(lambda x: x * 2, (x,), x * 2, 1e-6, flops=8, repeats=2,
                                 warmup=1)
    assert ok["status"] == "ok" and ok["max_abs_err"] == 0.0 and ok["ms"] > 0
    assert ok["tflops"] == pytest.approx(8 / (ok["ms"] * 1e-3) / 1e12)
    wrong = harness.check_then_time(lambda x: x + 1, (x,), x, 0.5, flops=8, repeats=2)
    assert wrong == {"max_abs_err": 1.0, "status": "wrong: max abs err 1"}
    err = harness.check_then_time(lambda x: x @ x[:3], (x,), x, 0.5, flops=8, repeats=2)
    assert err["status"].startswith("error: ")
