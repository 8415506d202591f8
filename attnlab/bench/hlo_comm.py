"""Communication volume of a compiled XLA program, read from its HLO text.

:func:`comm_volume` takes ``jax.jit(f).lower(*args).compile().as_text()`` (one device's
program of an SPMD computation) and sums the bytes of the operands of every collective:

* ``collective-permute`` (``lax.ppermute``): the array sent to the peer;
* ``all-gather``: this device's piece (the result divided by the replica-group size);
* ``all-to-all``, ``all-reduce``, ``collective-broadcast``: the array handed in;
* ``reduce-scatter``: the full array handed in (the result times the group size).

A collective inside a ``while`` loop counts once per iteration (XLA's ``known_trip_count``;
a loop without one counts once and is named in ``notes``); of a ``conditional``'s branches
the one that moves the most bytes counts (an upper bound, named in ``notes``). Asynchronous
pairs count once (the ``-start`` op, or the computation an ``async-start`` calls).

Operand bytes are what the program hands to the collectives, per device, not what travels on
a wire: an all-gather of an ``x``-byte piece receives ``(G - 1) x`` bytes, a ring all-reduce
sends about ``2 (G - 1) / G x``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

# Bytes per element of the HLO primitive types (sub-byte types round up to a byte each).
_ITEMSIZE = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
    "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8,
    "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e3m4": 1,
    "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f4e2m1fn": 1, "f8e8m0fnu": 1,
    "token": 0,
}
COLLECTIVES = (
    "collective-permute", "all-gather", "all-to-all", "all-reduce", "reduce-scatter",
    "collective-broadcast",
)
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\](?:\{[^}]*\})?")
_COMMENT = re.compile(r"/\*.*?\*/")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


@dataclasses.dataclass(slots=True)
class _Op:
    """One collective kind's share: how many ops run and the bytes of their operands."""

    count: int = 0
    bytes: int = 0


@dataclasses.dataclass(slots=True)
class _Total:
    ops: dict[str, _Op] = dataclasses.field(default_factory=dict)

    def add(self, kind: str, count: int, nbytes: int) -> None:
        op = self.ops.setdefault(kind, _Op())
        op.count += count
        op.bytes += nbytes

    def merge(self, other: _Total, times: int = 1) -> None:
        for kind, op in other.ops.items():
            self.add(kind, op.count * times, op.bytes * times)

    @property
    def bytes(self) -> int:
        return sum(op.bytes for op in self.ops.values())


def _parse_shape(text: str, i: int = 0) -> tuple[Any, int]:
    """Parses one HLO shape at ``text[i:]``: an array -> its bytes, a tuple -> a list."""
    while i < len(text) and text[i] == " ":
        i += 1
    if text.startswith("(", i):
        items, i = [], i + 1
        while i < len(text) and text[i] != ")":
            item, i = _parse_shape(text, i)
            items.append(item)
            while i < len(text) and text[i] in ", ":
                i += 1
        return items, i + 1
    m = _ARRAY.match(text, i)
    if m is None:
        raise ValueError(f"cannot read an HLO shape at {text[i:i + 60]!r}")
    dtype, dims = m.group(1), m.group(2)
    if dtype not in _ITEMSIZE:
        raise ValueError(f"unknown HLO element type {dtype!r} in {m.group(0)!r}")
    sizes = [int(d.replace("<=", "")) for d in dims.split(",") if d.strip()]
    return _ITEMSIZE[dtype] * math.prod(sizes), m.end()


def _nbytes(shape: Any) -> int:
    return shape if isinstance(shape, int) else sum(_nbytes(s) for s in shape)


def _group_size(line: str, num_devices: int | None) -> int:
    """Replica-group size of a collective: ``{{0,1},{2,3}}`` -> 2, iota ``[2,4]<=[8]`` -> 4."""
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([\d,\s]*)\}", line)
    if m:
        return len([x for x in m.group(1).split(",") if x.strip()])
    if num_devices is None:
        raise ValueError(
            "an all-gather/reduce-scatter over all devices (replica_groups={}) needs "
            f"num_devices to size its piece: {line.strip()[:160]}"
        )
    return num_devices


def _callees(line: str) -> list[tuple[str, str]]:
    """(attribute, computation) pairs a line calls."""
    out = []
    for attr in ("body", "condition", "to_apply", "calls", "true_computation",
                 "false_computation"):
        for m in re.finditer(rf"\b{attr}=%?([\w.\-]+)", line):
            out.append((attr, m.group(1)))
    for attr in ("branch_computations", "calls"):
        for m in re.finditer(rf"\b{attr}=\{{([^}}]*)\}}", line):
            out += [(attr, c.strip().lstrip("%")) for c in m.group(1).split(",") if c.strip()]
    return out


def _collective(opcode: str, shape: Any, line: str, num_devices: int | None) -> int:
    """Operand bytes of one collective op (sync, or the ``-start`` of an async pair)."""
    if opcode.endswith("-start"):  # result: (operand(s), result(s), [contexts])
        return _nbytes(shape[0]) if isinstance(shape, list) else _nbytes(shape)
    total = _nbytes(shape)
    if opcode == "all-gather":
        return total // _group_size(line, num_devices)
    if opcode == "reduce-scatter":
        return total * _group_size(line, num_devices)
    return total


def comm_volume(hlo_text: str, num_devices: int | None = None) -> dict[str, Any]:
    """Bytes handed to collectives per device by one run of a compiled program.

    Args:
      hlo_text: ``compiled.as_text()`` of a ``jax.stages.Compiled`` (post-optimization HLO).
      num_devices: the program's device count, needed only to size all-gathers whose replica
        groups are written as ``{}`` (all devices).

    Returns:
      ``{"total_bytes": int, "by_op": {"collective-permute": {"count", "bytes"}, ...},
      "notes": [str]}``, counts and bytes per run (loops unrolled by their trip counts).

    Raises:
      ValueError: text with no ENTRY computation, or a shape this parser cannot read.

    Example:
      >>> comm_volume(jax.jit(f).lower(x).compile().as_text())["total_bytes"]
    """
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for raw in hlo_text.splitlines():
        line = _COMMENT.sub("", raw)
        m = _HEADER.match(line)
        if m:
            current = m.group(1)
            comps[current] = []
            if line.lstrip().startswith("ENTRY"):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text; pass compiled.as_text()")
    notes: set[str] = set()
    memo: dict[str, _Total] = {}

    def visit(name: str, stack: tuple[str, ...] = ()) -> _Total:
        if name in memo:
            return memo[name]
        total = _Total()
        if name in stack or name not in comps:
            return total
        for line in comps[name]:
            m = _INSTR.match(line)
            if m is None:
                continue
            rest = m.group(1)
            shape, end = _parse_shape(rest)
            om = re.match(r"\s*([\w\-]+)\(", rest[end:])
            opcode = om.group(1) if om else ""
            base = opcode.removesuffix("-start")
            if base in COLLECTIVES and not opcode.endswith("-done"):
                total.add(base, 1, _collective(opcode, shape, line, num_devices))
            if opcode in ("async-done", "async-update") or opcode.endswith("-done"):
                continue
            calls = _callees(line)
            if opcode == "while":
                trip = _TRIP.search(line)
                times = int(trip.group(1)) if trip else 1
                if not trip:
                    notes.add("a while loop without known_trip_count counted once")
                for attr, callee in calls:
                    if attr == "body":
                        total.merge(visit(callee, stack + (name,)), times)
            elif opcode == "conditional":
                branches = [visit(c, stack + (name,)) for _, c in calls]
                if branches:
                    if len({b.bytes for b in branches}) > 1:
                        notes.add("conditional: the branch moving the most bytes counted")
                    total.merge(max(branches, key=lambda b: b.bytes))
            else:
                for _, callee in calls:
                    total.merge(visit(callee, stack + (name,)))
        memo[name] = total
        return total

    total = visit(entry)
    by_op = {k: {"count": v.count, "bytes": v.bytes} for k, v in sorted(total.ops.items())}
    return {"total_bytes": total.bytes, "by_op": by_op, "notes": sorted(notes)}


def describe(volume: Mapping[str, Any]) -> str:
    """One line: ``collective-permute 30 x = 1.2 MiB, ... (total 1.5 MiB)``."""
    parts = [f"{k} {v['count']} x = {_mib(v['bytes'])}" for k, v in volume["by_op"].items()]
    return ", ".join(parts + [f"total {_mib(volume['total_bytes'])}"]) if parts else "none"


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB"
