"""Every registered mechanism has its five pieces (README, "Adding a mechanism").

Walks the one mechanism registry (``attnlab.nn.registry``) and checks, per mechanism: its
ops' registries hold a ``reference`` and at least one fast implementation (1, 2); a
sequence-parallel rule or an explicit "not sequence-parallel" marker under its name (3); the
module contract (4); an experiment script, or "none yet" in the README's mechanism table (5).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import attnlab.ops
import sharding
from attnlab.nn import registry

ROOT = Path(__file__).resolve().parents[1]
MECHANISMS = sorted(registry.mechanisms().items())


def _readme_rows() -> dict[str, list[str]]:
    """Mechanism name -> cells of its row in the README's mechanism table."""
    text = (ROOT / "README.md").read_text()
    start = text.index("| mechanism (letter) |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        m = re.match(r"`?(\w+)`? \(`(\w)`\)", cells[0])
        assert m, f"README mechanism row does not start with `name` (`letter`): {line}"
        rows[m.group(1)] = [m.group(2), *cells[1:]]
    return rows


def test_there_are_mechanisms():
    assert {"softmax", "lightning"} <= {name for _, name in MECHANISMS}


@pytest.mark.parametrize("letter, name", MECHANISMS)
def test_ops_have_a_reference_and_a_fast_implementation(letter, name):
    cls = registry.get(letter)
    assert cls.mechanism_ops, f"{name} names no op"
    for op in cls.mechanism_ops:
        impls = attnlab.ops.registry(op).implementations()
        assert "reference" in impls, f"{op} has no reference"
        fast = [n for n in impls if n != "reference"]
        assert fast, f"{op} has no implementation but its reference"
        assert any(n.startswith("pallas") for n in fast), f"{op} has no Pallas kernel: {fast}"


@pytest.mark.parametrize("letter, name", MECHANISMS)
def test_sharding_rule_or_marker(letter, name):
    from sharding import hybrid

    assert sharding.attention is not None  # importing sharding registers the built-in rules
    assert name in hybrid.rules() or name in hybrid.not_parallel(), (
        f"{name} has neither a rule (sharding.hybrid.register_rule({name!r})) nor a "
        "not_sequence_parallel marker"
    )


@pytest.mark.parametrize("letter, name", MECHANISMS)
def test_module_contract(letter, name):
    cls = registry.get(letter)
    assert registry.get(name) is cls and cls.mechanism_letter == letter
    for attr in ("__call__", "init_cache", "cache_bytes_per_token"):
        assert callable(getattr(cls, attr, None)), f"{cls.__name__} has no {attr}"


@pytest.mark.parametrize("letter, name", MECHANISMS)
def test_experiment_or_none_yet_in_readme(letter, name):
    cls = registry.get(letter)
    rows = _readme_rows()
    assert name in rows, f"the README's mechanism table has no row for {name}"
    row = rows[name]
    assert row[0] == letter, f"README gives {name} the letter {row[0]}, the registry {letter}"
    experiment_cell = row[-1]
    if cls.mechanism_experiment is None:
        assert "none yet" in experiment_cell, f"README row of {name}: {row}"
    else:
        script = ROOT / "experiments" / f"{cls.mechanism_experiment}.py"
        assert script.is_file(), f"{script} is missing"
        assert f"{cls.mechanism_experiment}.py" in experiment_cell
