"""Test harness: 8 simulated CPU devices, markers, tolerances, random inputs.

XLA_FLAGS must be set before JAX is imported anywhere, so this file does it first.
"""

from __future__ import annotations

import os
import shutil

# On CPU the suite compiles thousands of small programs and runs each a few times: without
# LLVM's optimisation passes XLA compiles them about twice as fast, and the suite takes about
# half the time (the numerics are the same: neither setting uses fast-math). Machines with a
# GPU keep the default: the `gpu` tests compile kernels as users get them.
_FAST_CPU_COMPILE = (
    "" if shutil.which("nvidia-smi")
    else " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    + _FAST_CPU_COMPILE
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# The whole suite runs in JAX's strict mode, as JAX's own tests and many research codebases
# do: an implicit rank promotion anywhere in attnlab is an error, not a silent broadcast.
jax.config.update("jax_numpy_rank_promotion", "raise")

from tests.helpers import HAS_CUDA  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line(
        "markers", "slow: takes more than a few seconds and repeats what faster tests cover; "
        "`make test` leaves them out, `make test-all` (CI) runs them")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run scripts/gpu_check.sh on the device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def key(request: pytest.FixtureRequest) -> jax.Array:
    """A fresh PRNG key per test case, derived from the test's id (reproducible, distinct)."""
    import zlib

    return jax.random.key(zlib.crc32(request.node.nodeid.encode()))
