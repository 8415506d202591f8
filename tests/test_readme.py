"""The READMEs point at things that exist: every relative link and every repository path they
name (in inline code) is in the repository, every ``#anchor`` is a heading, the design tree is
the tree, and the CLI list is the CLI. The top-level README also speaks to readers outside the
project: papers by title, hardware by name, commands by their text."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "experiments/README.md", "attnlab/ops/README.md")
# Top-level entries a path in inline code may start with (anything else, e.g. `runs/t` or
# `DIR/checkpoints/`, is a path of the user's, not of the repository).
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")} - {"runs"}
EXTENSIONS = (".py", ".md", ".json", ".sh", ".ipynb", ".toml", ".log", ".png", ".txt", ".rst")
DATED = re.compile(r"\d{4}-\d{2}-\d{2}")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
JARGON = [
    (re.compile(r"\bissue\s*#?\d+", re.I), "an internal issue number"),
    (re.compile(r"(?<![a-z])sessions?\d*\b", re.I), "'session' (say what was run, and when)"),
    (re.compile(r"\bseed papers?\b", re.I), "'seed paper' (name the paper by its title)"),
    (re.compile(r"\bpapers?\s+\d+\b", re.I), "a numbered paper (name it by its title)"),
    (re.compile(r"\bthe device\b", re.I), "'the device' (name the hardware)"),
    (re.compile(r"\bdevice calls?\b", re.I), "'device call' (say what ran)"),
    (re.compile(r"BENCHMARKS\.md"), "BENCHMARKS.md (not in this repository)"),
]


def _text(name: str) -> str:
    return (ROOT / name).read_text()


def _prose(text: str) -> str:
    """The text without fenced code blocks (their '#' lines are comments, not headings)."""
    return FENCE.sub("", text)


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, a repeated
    anchor numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _prose(text), re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower().replace("`", "")).replace(" ", "-")
        n = seen.get(slug, 0)
        out.add(slug if n == 0 else f"{slug}-{n}")
        seen[slug] = n + 1
    return out


def _expand(path: str) -> list[str]:
    """`a.{json,png}` -> [a.json, a.png]."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [x for alt in m.group(1).split(",")
            for x in _expand(path[:m.start()] + alt + path[m.end():])]


def _exists(path: str, base: Path) -> bool:
    path = path.split("::")[0].rstrip("/")
    return any(glob.glob(str(base / p)) if any(c in p for c in "*?[") else (base / p).exists()
               for p in _expand(path))


def _repo_paths(text: str) -> list[str]:
    """Inline-code spans that name a file or folder of the repository."""
    paths = []
    for span in CODE.findall(_prose(text)):
        span = span.strip()
        if (" " in span or any(c in span for c in "<>|$=(),") or span.startswith(("-", "."))
                or "://" in span):
            continue
        first = span.split("/")[0].split("::")[0]
        if "/" in span and first in TOP:
            paths.append(span)
        elif "/" not in span and span.endswith(EXTENSIONS) and DATED.search(span):
            paths.append(span)  # a dated result file, named without its folder
    return paths


@pytest.mark.parametrize("name", READMES)
def test_relative_links_and_anchors_resolve(name: str) -> None:
    text, base = _text(name), (ROOT / name).parent
    bad = []
    for m in LINK.finditer(_prose(text)):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        if path and not (base / path).exists():
            bad.append(f"{target}: no {path} next to {name}")
            continue
        if anchor:
            dest = (base / path) if path else ROOT / name
            if dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
                bad.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", READMES)
def test_named_paths_exist(name: str) -> None:
    text, base = _text(name), (ROOT / name).parent
    bad = []
    for path in _repo_paths(text):
        if "/" in path:
            found = _exists(path, ROOT) or _exists(path, base)
        else:
            found = any(ROOT.rglob(p) for p in _expand(path))
        if path.count("::") and found:  # tests/x.py::test_name: the test exists
            file, _, test = path.partition("::")
            found = f"def {test.split('::')[-1].split('[')[0]}(" in (ROOT / file).read_text()
        if not found:
            bad.append(path)
    assert not bad, f"{name} names paths that are not in the repository: {bad}"


def test_readme_has_no_internal_jargon() -> None:
    text = _text("README.md")
    bad = [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}: {why}"
           for pattern, why in JARGON for m in pattern.finditer(text)]
    assert not bad, "README.md speaks the project's internal language:\n" + "\n".join(bad)


def test_design_tree_is_the_tree() -> None:
    text = _text("README.md")
    design = text[text.index("\n## Design"):]
    block = design[design.index("```"):]
    block = block[:block.index("```", 3)]
    named = {m.group(1) for m in re.finditer(r"^(\S+)", block, re.M)} - {"```"}
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"the README's design tree names what does not exist: {missing}"
    tracked_dirs = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
                    and p.name not in ("runs", "build", "dist") and any(p.rglob("*.*"))
                    and not p.name.endswith(".egg-info")}
    tops = {p.split("/")[0] for p in named}
    assert tracked_dirs <= tops, f"top-level folders not in the design tree: {tracked_dirs - tops}"
    packages = {p.parent.name for p in (ROOT / "attnlab").glob("*/__init__.py")}
    assert {f"attnlab/{p}/" for p in packages} <= named, \
        f"attnlab packages not in the design tree: {packages - {p.split('/')[1] for p in named}}"


def test_cli_list_is_the_cli() -> None:
    import argparse

    from attnlab.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = _text("README.md")
    listed = re.search(r"`attnlab ((?:[a-z]+ \| )+[a-z]+)`", text)
    assert listed, "README.md has no `attnlab a | b | ...` list of the subcommands"
    assert listed.group(1).split(" | ") == list(sub.choices)
    for name in sub.choices:  # each has a line that shows it in use
        assert re.search(rf"attnlab {name}\b", text), name
