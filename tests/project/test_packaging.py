"""A non-editable install works: a wheel of the checkout, installed into a fresh venv, carries everything the
package reads at run time (model recipes, the web page, the C kernels' source), so from a folder outside the
checkout `mptkit info mpt-tiny --no-time` builds the bundled recipe and `mptkit train` runs a tiny recipe on
`model.recipe: mpt-tiny`; the `mptkit` imported there is the wheel's, not the checkout's.

Offline: the wheel is built without build isolation (setuptools from this environment) from a copy of the
packaging inputs (so the checkout gets no build/ or egg-info writes), and the venv reuses this environment's
packages (torch, tokenizers, ...) through --system-site-packages; its own site-packages, where the wheel goes,
comes first on sys.path, ahead of the editable install's entry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # wheel build, venv, `mptkit info`, a 4-step train: ~30 s of CPU


def _run(cmd, cwd, env, timeout=300):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       check=False)
    assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    return r.stdout


def _corpus(folder: Path) -> None:
    import argparse
    import inspect
    import json

    folder.mkdir(parents=True)
    lines = "".join(inspect.getsource(m) for m in (json, argparse)).splitlines(keepends=True)[:1200]
    for i in range(0, len(lines), 60):
        (folder / f"m{i:05d}.py").write_text("".join(lines[i:i + 60]))


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    src = tmp_path / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PIP_NO_INDEX="1", PYTHONNOUSERSITE="1")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src],
         tmp_path, env)
    (wheel,) = dist.glob("mptkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {Path(n).stem for n in names if n.startswith("mptkit/recipes/model/") and n.endswith(".yaml")}
    assert {p.stem for p in (ROOT / "src" / "mptkit" / "recipes" / "model").glob("*.yaml")} == recipes
    assert {"mptkit/infer/static/index.html", "mptkit/infer/csrc/cpu_kernels.c",
            "mptkit/infer/csrc/quant_kernels.c"} <= names
    shipped = {n for n in names if n.startswith(("mptkit/recipes/pretrain/", "mptkit/recipes/finetune/"))}
    assert {f"mptkit/recipes/{p.parent.name}/{p.name}" for d in ("pretrain", "finetune")
            for p in (ROOT / "configs" / d).glob("*.yaml")} == shipped
    examples = ROOT / "src" / "mptkit" / "recipes" / "eval"  # the example ICL tasks (eval icl --config)
    assert {f"mptkit/recipes/eval/{p.relative_to(examples).as_posix()}" for p in examples.rglob("*")
            if p.suffix in (".yaml", ".jsonl")} <= names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp_path, env)
    py, exe = venv / "bin" / "python", venv / "bin" / "mptkit"
    # this environment's pip, run by the venv's interpreter, installs into the venv; --ignore-installed: the
    # editable mptkit of the outer environment is left alone (never uninstalled)
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel], tmp_path, env)

    work = tmp_path / "elsewhere"  # cwd outside the checkout: no configs/, no src/
    work.mkdir()
    # the package (so every submodule, recipes_dir() included) is the wheel's (no torch import: quick)
    pkg = Path(_run([py, "-c", "import mptkit; print(mptkit.__file__)"], work, env).strip()).resolve().parent
    assert pkg.is_relative_to(venv.resolve() / "lib") and (pkg / "recipes" / "model" / "mpt-tiny.yaml").is_file(), pkg
    # the console script runs the venv's interpreter (a long path gets pip's /bin/sh exec form: not line 1)
    assert str(py) in "\n".join(exe.read_text().splitlines()[:3])

    info = _run([exe, "info", "mpt-tiny", "--no-time"], work, env)
    assert "mpt-tiny" in info and "d_model=256" in info and "parameters" in info, info

    # a bundled training recipe by name, from a folder without configs/: parsed and validated
    shown = yaml.safe_load(_run([exe, "train", "quickstart", "--print-config"], work, env))
    assert shown["run_name"] == "quickstart" and shown["model"]["recipe"] == "mpt-tiny", shown

    _corpus(work / "corpus")
    recipe = {
        "max_seq_len": 32,
        "model": {"name": "mpt_causal_lm", "recipe": "mpt-tiny", "vocab_size": 320, "max_seq_len": "${max_seq_len}"},
        "tokenizer": {"name": "cache/tok"},
        "data_prep": {"inputs": ["corpus"], "vocab_size": 320, "val_fraction": 0.2},
        "train_loader": {"name": "text", "dataset": {"local": "cache/data", "split": "train", "shuffle": True,
                                                     "max_seq_len": "${max_seq_len}"}},
        "max_duration": "4ba", "global_train_batch_size": 4, "device_train_microbatch_size": 4,
        "eval_interval": "0ba", "save_interval": "4ba", "save_folder": "runs/tiny/ck", "run_folder": "runs/tiny",
        "export_folder": "runs/tiny/hf", "progress_bar": False, "peak_tflops": 1.0, "torch_threads": 1,
    }
    (work / "tiny.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    _run([exe, "train", "tiny.yaml"], work, env)
    assert (work / "runs" / "tiny" / "hf" / "config.json").exists()
    assert (work / "runs" / "tiny" / "summary.json").exists()
