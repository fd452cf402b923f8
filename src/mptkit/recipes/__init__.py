"""The recipes shipped inside the package (so a wheel install has them; in a checkout ``configs/`` links here):
``model/*.yaml`` (MPT model configs: mpt-tiny … mpt-30b), ``pretrain/*.yaml`` and ``finetune/*.yaml``
(training recipes: quickstart, mpt-125m …, instruct, chat, storywriter), ``eval/`` (example ICL tasks in
llm-foundry's ``icl_tasks`` / ``eval_gauntlet`` YAML over small made-up JSONL files)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent


def eval_recipes_dir() -> Path:
    """The example ICL task configs: ``icl_tasks.yaml``, ``eval_gauntlet.yaml`` and their ``data/``."""
    return ROOT / "eval"


def model_recipes_dir() -> Path:
    return ROOT / "model"


def training_recipes() -> dict[str, Path]:
    """The bundled training recipes by name (``quickstart`` → ``pretrain/quickstart.yaml``)."""
    return {f.stem: f for sub in ("pretrain", "finetune") for f in sorted((ROOT / sub).glob("*.yaml"))}


def training_recipe(name: str) -> Path | None:
    """The bundled training recipe a bare name (no folder, no suffix) means, else None."""
    if Path(name).name != name or Path(name).suffix:
        return None
    return training_recipes().get(name)
