"""Ring attention on a mesh that spans two processes (4 CPU devices each, gloo collectives)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.ops import reference, star
from tests.helpers import free_port, fwd_tol, grad_tol, run_processes

ROOT = Path(__file__).resolve().parents[2]


def _expected():
    from tests.sharding.mp_worker import inputs

    q, k, v, w = (jnp.asarray(x) for x in inputs())

    def loss(q, k, v):
        return jnp.sum(reference(q, k, v, is_causal=True) * w)

    out = reference(q, k, v, is_causal=True)
    return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    results = run_processes(
        [[sys.executable, "-m", "tests.sharding.mp_worker", str(port), str(i),
          str(tmp_path / f"p{i}.npz")] for i in range(2)],
        cwd=ROOT, env=env, timeout=240,
    )
    for i, (returncode, log) in enumerate(results):
        assert returncode == 0, f"process {i} failed:\n{log[-3000:]}"
    out, (dq, dk, dv) = _expected()
    for i in range(2):
        got = np.load(tmp_path / f"p{i}.npz")
        np.testing.assert_allclose(got["out"], out, atol=fwd_tol(jnp.float32))
        for name, want in (("dq", dq), ("dk", dk), ("dv", dv)):
            np.testing.assert_allclose(got[name], want, atol=grad_tol(jnp.float32, name) * 2)
        from tests.sharding.mp_worker import inputs

        q, k, v, _ = inputs()
        np.testing.assert_allclose(got["star"], star.reference(q, k, v, block_size=8),
                                   atol=fwd_tol(jnp.float32))
        np.testing.assert_allclose(got["star_query"],
                                   reference(q[:, :4], k, v, is_causal=True, q_offset=64),
                                   atol=fwd_tol(jnp.float32))
