"""The package's layers (docs/architecture.md): ``mptkit.model`` imports nothing from data/train/infer/eval/export;
``mptkit.infer`` and ``mptkit.eval`` nothing from train or export; ``mptkit.train`` nothing from infer;
``mptkit.data`` nothing from model/train/infer. Only the command package ``mptkit.cli`` may import everything.
Every ``import`` in the source is read (lazy ones inside functions too). ``KNOWN`` lists the crossings that are
still to be removed (issue: one layer for artefacts on disk): a new
crossing fails this test, and so does a known one that is gone but still listed (the list only shrinks)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mptkit"
FORBIDDEN = {
    "model": {"data", "train", "infer", "eval", "export"},
    "infer": {"train", "export"},
    "eval": {"train", "export"},
    "train": {"infer"},
    "data": {"model", "train", "infer"},
}
KNOWN = {  # (importing file, imported module): still to be removed
    ("infer/server.py", "mptkit.export.source"),
    ("eval/scoring.py", "mptkit.export.source"),
}


def crossings() -> set[tuple[str, str]]:
    out = set()
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC).as_posix()
        area = rel.split("/")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "mptkit" and len(parts) > 1 and parts[1] in FORBIDDEN.get(area, ()):
                    out.add((rel, name))
                elif parts[0] == "mptkit" and len(parts) > 1 and area in FORBIDDEN and parts[1] == "cli":
                    out.add((rel, name))  # nothing below the commands imports them
    return out


def test_no_new_layer_crossings():
    found = crossings()
    assert found - KNOWN == set(), f"imports that cross the layers: {sorted(found - KNOWN)}"
    assert KNOWN - found == set(), f"gone, remove from KNOWN: {sorted(KNOWN - found)}"


def test_the_checker_sees_lazy_imports(tmp_path, monkeypatch):
    """The check reads imports inside functions too (a crossing hidden in a function is still one)."""
    fake = tmp_path / "mptkit"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "x.py").write_text("def f():\n    from mptkit.train.trainer import Trainer\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    assert crossings() == {("model/x.py", "mptkit.train.trainer")}
