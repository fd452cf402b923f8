"""The package's layers (docs/architecture.md): ``mptkit.model`` imports nothing from data/io/train/infer/eval/export;
``mptkit.io`` (artefacts on disk) nothing from train/infer/eval/export; ``mptkit.infer`` and ``mptkit.eval`` nothing
from train or export; ``mptkit.train`` nothing from infer; ``mptkit.data`` nothing from model/train/infer. Only the
command package ``mptkit.cli`` may import everything.
Every ``import`` in the source is read (lazy ones inside functions too). ``ALLOWED`` is the one documented exception
(``MPTForCausalLM.from_pretrained`` / ``save_pretrained`` call the HF-folder I/O, lazily). ``KNOWN`` lists the
crossings that are still to be removed (none left: it may only shrink): a new crossing fails this test, and so does a
known one that is gone but still listed."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "mptkit"
FORBIDDEN = {
    "model": {"data", "io", "train", "infer", "eval", "export"},
    "io": {"train", "infer", "eval", "export"},
    "infer": {"train", "export"},
    "eval": {"train", "export"},
    "train": {"infer"},
    "data": {"model", "train", "infer"},
}
ALLOWED = {  # (importing file, imported module): by design, see docs/architecture.md
    ("model/model.py", "mptkit.io.hf_folder"),
}
KNOWN: set[tuple[str, str]] = set()  # (importing file, imported module): still to be removed
# the io modules the data layer may use: they import nothing from mptkit.model
MODEL_FREE_IO = {"io/__init__.py", "io/tokenizer_files.py"}


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
    assert found - KNOWN - ALLOWED == set(), f"imports that cross the layers: {sorted(found - KNOWN - ALLOWED)}"
    assert KNOWN - found == set(), f"gone, remove from KNOWN: {sorted(KNOWN - found)}"
    assert ALLOWED <= found, f"gone, remove from ALLOWED: {sorted(ALLOWED - found)}"


def _imports(f: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_data_uses_only_the_model_free_io_modules():
    """mptkit.data reads tokenizer files through mptkit.io; those io modules import nothing but errors/utils, so
    the data layer still never loads mptkit.model."""
    for f in (SRC / "data").rglob("*.py"):
        for name in _imports(f):
            if name.startswith("mptkit.io"):
                mod = name.split(".")[2] if name.count(".") >= 2 else "__init__"
                assert f"io/{mod}.py" in MODEL_FREE_IO, f"{f.relative_to(SRC)} imports {name}"
    for rel in MODEL_FREE_IO:
        for name in _imports(SRC / rel):
            parts = name.split(".")
            assert parts[0] != "mptkit" or parts[1] in ("errors", "utils"), f"{rel} imports {name}"


def test_the_checker_sees_lazy_imports(tmp_path, monkeypatch):
    """The check reads imports inside functions too (a crossing hidden in a function is still one)."""
    fake = tmp_path / "mptkit"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "x.py").write_text("def f():\n    from mptkit.train.trainer import Trainer\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    assert crossings() == {("model/x.py", "mptkit.train.trainer")}
