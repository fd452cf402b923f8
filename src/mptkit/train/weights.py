"""``load_path`` with ``load_weights_only: true`` (llm-foundry / composer semantics): the run starts at step 0
with a fresh optimizer from the weights of ``load_path`` — an mptkit checkpoint, run or save folder (its newest
valid checkpoint; a sharded one is consolidated), an HF model folder, or a Composer ``.pt`` checkpoint (read
through :mod:`mptkit.io.composer`'s allow-list).

``load_ignore_keys``: glob patterns of tensors left as the recipe's model has them (its init, or the pretrained
folder's). Patterns are matched as composer matches them, against ``state/model/model.<name>`` (llm-foundry's
path of a tensor in its checkpoint, e.g. ``state/model/model.transformer.wte.weight``), and also against the
plain name (``transformer.wte.weight``). Patterns for other parts of a Composer state (``state/optimizers``,
``rng``...) change nothing: a weights-only load reads nothing else.

``load_strict_model_weights`` (default true): every model tensor not ignored must be in ``load_path`` and
``load_path`` must hold no other tensor; false loads the tensors both have (and logs the rest). A tensor whose
shape differs is always an error.
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

import torch
from torch import nn

from mptkit.errors import CheckpointError

log = logging.getLogger(__name__)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors under MPT's names, a description of where they came from) of ``path``."""
    from mptkit.io.hf_folder import iter_checkpoint_tensors, normalise_key

    p = Path(path)
    if p.is_file():
        from mptkit.io.composer import composer_model_tensors, load_composer_checkpoint

        return composer_model_tensors(load_composer_checkpoint(p), str(p)), f"Composer checkpoint {p}"
    from mptkit.io.source import open_model_source

    with open_model_source(p) as src:
        return {normalise_key(k): t for k, t in iter_checkpoint_tensors(src.folder)}, str(src.folder)


def _ignored(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(f"state/model/model.{name}", pat) or fnmatch.fnmatchcase(name, pat)
               for pat in patterns)


def load_weights(model: nn.Module, path: str | Path, *, ignore: tuple[str, ...] = (), strict: bool = True,
                 sharded: bool = False) -> dict:
    """Load ``path``'s weights into ``model`` (module docstring); returns what happened: loaded / ignored /
    missing / unexpected tensor names."""
    tensors, source = read_weights(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if tied:
        tensors.pop("lm_head.weight", None)  # the tied head is wte
        expected.pop("lm_head.weight", None)
    ignored = sorted(k for k in set(expected) | set(tensors) if _ignored(k, ignore))
    for pat in ignore:
        if not any(_ignored(k, (pat,)) for k in ignored):
            (log.info if not pat.startswith("state/model") else log.warning)(
                "load_ignore_keys: %r matches no model tensor (a weights-only load reads nothing else)", pat)
    use = {k: v for k, v in tensors.items() if k not in ignored}
    unexpected = sorted(k for k in use if k not in expected)
    missing = sorted(k for k in expected if k not in use and k not in ignored)
    bad = [f"{k}: {tuple(v.shape)} in {source} vs {expected[k]} in the model" for k, v in use.items()
           if k in expected and tuple(v.shape) != expected[k]]
    if bad:
        raise CheckpointError(f"load_path {path}: tensors of another shape than the recipe's model: "
                              + "; ".join(bad[:6]))
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {', '.join(missing[:6])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:6])}")
        raise CheckpointError(f"load_path {path}: the weights do not match the recipe's model ({'; '.join(parts)}); "
                              "set load_strict_model_weights: false to load the tensors both have, or name the "
                              "others in load_ignore_keys")
    loadable = {k: v for k, v in use.items() if k in expected}
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, loadable, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        own = model.state_dict()
        with torch.no_grad():
            for k, v in loadable.items():
                own[k].copy_(v.to(dtype=own[k].dtype))
    if missing or unexpected:
        log.warning("load_path %s: %d model tensor(s) kept as built (not in load_path): %s; %d tensor(s) of "
                    "load_path unused: %s", path, len(missing), ", ".join(missing[:6]), len(unexpected),
                    ", ".join(unexpected[:6]))
    log.info("loaded the weights of %s (%d tensors; %d ignored by load_ignore_keys): a new run from step 0",
             source, len(loadable), len(ignored))
    return {"loaded": sorted(loadable), "ignored": ignored, "missing": missing, "unexpected": unexpected}
