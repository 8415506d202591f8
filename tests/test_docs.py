"""The API reference builds from the docstrings with no warning: nitpicky (every
cross-reference must resolve), warnings as errors, as ``make docs`` builds it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_builds_without_warnings(tmp_path: Path) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-j", "1", "-q",
         "-b", "html", "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"),
         str(tmp_path / "html")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )
    assert res.returncode == 0, (
        "sphinx-build -W -n reported warnings (broken references or docstring markup; fix "
        f"the docstring it names):\n{res.stderr[-8000:]}"
    )
    html = tmp_path / "html"
    for page in ("ops", "nn", "train", "data", "convert", "sharding", "pallas_kernels"):
        assert (html / f"{page}.html").is_file(), page
    ops = (html / "ops.html").read_text()
    # The public functions are there, with their Google-style sections rendered.
    for name in ("attnlab.ops.attention", "attnlab.ops.decode_attention",
                 "attnlab.ops.lightning_attention", "attnlab.ops.merge"):
        assert f'id="{name}"' in ops, name
    assert "Raises" in ops and "Returns" in ops
