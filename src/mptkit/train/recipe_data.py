"""Recipe -> tokenizer, datasets and model (the pieces `mptkit train` builds from a YAML).

``data_prep`` (an mptkit key) makes a recipe self-contained: when the tokenizer folder is missing it is
trained, and the corpus is prepared into ``train_loader.dataset.local`` (both cached: preparation is a
no-op when inputs, tokenizer and options are unchanged). Without ``data_prep`` the data must have been
prepared with `mptkit data prepare`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from mptkit.errors import CheckpointError, ConfigError, DataError
from mptkit.train.config import RunConfig
from mptkit.train.distributed import DistInfo, barrier

log = logging.getLogger(__name__)


def tokenizer_path(cfg: RunConfig) -> str | None:
    t = cfg.tokenizer
    if t is None:
        return None
    if isinstance(t, str):
        return t
    if isinstance(t, dict):
        name = t.get("name")
        if not name:
            raise ConfigError("tokenizer.name: the tokenizer folder is required")
        return str(name)
    raise ConfigError("tokenizer: expected a folder path or {name: FOLDER, kwargs: {...}}")


def _dataset_section(cfg: RunConfig, which: str):
    """The ``dataset`` of the recipe's ``train_loader`` / ``eval_loader`` (train/sections.py), None without one."""
    ld = getattr(cfg, which)
    return ld.dataset if ld is not None else None


def prepare_if_needed(cfg: RunConfig, dist: DistInfo) -> None:
    """Train the tokenizer and prepare the corpus named by ``data_prep`` (rank 0; others wait)."""
    dp = cfg.data_prep
    if not dp:
        return
    tr = _dataset_section(cfg, "train_loader")
    if tr is None:
        raise ConfigError("data_prep needs train_loader.dataset.local (where the prepared shards go)")
    tok_dir = tokenizer_path(cfg)
    if tok_dir is None:
        raise ConfigError("data_prep needs tokenizer.name (the folder to train the tokenizer into, or to read it from)")
    if dist.is_main:
        from mptkit.data.prepare import prepare_dataset
        from mptkit.data.tokenizer import train_tokenizer

        inputs = dp.get("inputs")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not (Path(tok_dir) / "tokenizer.json").exists():
            vs = dp.get("vocab_size")
            if not vs:
                raise ConfigError("data_prep.vocab_size: needed to train the tokenizer "
                                  f"({tok_dir} does not exist yet)")
            log.info("training a %d-token tokenizer into %s (first run only)", vs, tok_dir)
            train_tokenizer(inputs, int(vs), tok_dir, max_files=dp.get("max_files"), max_bytes=dp.get("max_bytes"))
        else:
            meta = Path(tok_dir) / "mptkit_tokenizer.json"
            try:
                import json

                asked = json.loads(meta.read_text()).get("requested_vocab_size") if meta.exists() else None
            except (OSError, ValueError):
                asked = None
            if asked is not None and dp.get("vocab_size") and int(asked) != int(dp["vocab_size"]):
                raise ConfigError(
                    f"data_prep.vocab_size is {dp['vocab_size']} but the cached tokenizer {tok_dir} was trained "
                    f"with {asked}: delete {tok_dir} (and the prepared data) to retrain, or point tokenizer.name "
                    "elsewhere")
        seq = tr.max_seq_len or cfg.max_seq_len
        if not seq:
            raise ConfigError("data_prep: set max_seq_len (or train_loader.dataset.max_seq_len)")
        opts = dict(dp.get("options") or {})
        for k in ("max_files", "max_bytes", "val_fraction"):
            if dp.get(k) is not None:
                opts[k] = dp[k]
        prepare_dataset(inputs, tok_dir, tr.local, int(seq), **opts)
    barrier(dist)


def _open_split(local: str, split: str, which: str):
    from mptkit.data.shards import TokenDataset

    p = Path(local)
    if not p.exists():
        raise DataError(
            f"{which}.dataset.local: {p} does not exist. Prepare it first (`mptkit data prepare INPUTS --tokenizer "
            f"TOK --out {p}`), or add a data_prep section to the recipe so `mptkit train` prepares it")
    if not (p / "manifest.json").exists():
        from mptkit.data.mds import is_mds_folder

        if is_mds_folder(p, split):
            raise DataError(
                f"{which}.dataset.local: {p} is an MDS dataset (index.json), which `mptkit train` does not read from "
                "a recipe. Either prepare the source documents with `mptkit data prepare INPUTS --tokenizer TOK "
                f"--max-seq-len N --out DIR` and set {which}.dataset.local: DIR, or train from Python on the MDS "
                f"folder: Trainer(cfg, {'train' if which == 'train_loader' else 'eval'}_dataset=mptkit.data.mds."
                f"MDSTokenDataset('{p}', split, eos_token_id=EOS, max_seq_len=N)) (docs/data.md, MDS datasets)")
        raise DataError(f"{which}.dataset.local: {p} holds no prepared data (no manifest.json); "
                        "prepare it with `mptkit data prepare`")
    try:
        return TokenDataset(p, split=split)
    except DataError:
        raise
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise DataError(f"{which}.dataset.local: {p} has no usable '{split}' split ({e})") from None


def pretrained_folder(cfg: RunConfig) -> Path | None:
    """The local model folder (with a config.json) whose weights the recipe starts from, else None.

    ``model: FOLDER`` names one when FOLDER holds a config.json (otherwise it is a recipe name or YAML);
    ``model: {pretrained_model_name_or_path: FOLDER}`` names one unless ``pretrained: false``, and then FOLDER
    must be a model folder (a :class:`ConfigError` otherwise). The single place that decides whether a run
    loads weights (and so is not built on ``meta`` under FSDP) and whose tokenizer is the finetuning default."""
    spec = cfg.model
    if isinstance(spec, (str, Path)):
        p = Path(str(spec))
        return p if p.is_dir() and (p / "config.json").is_file() else None
    if isinstance(spec, dict):
        src = spec.get("pretrained_model_name_or_path")
        if not src or not spec.get("pretrained", True):
            return None
        p = Path(str(src))
        if not (p / "config.json").is_file():
            raise ConfigError(f"model.pretrained_model_name_or_path: {src} is not a local model folder with a "
                              "config.json")
        return p
    return None


def _finetune_options(ds, cfg: RunConfig, which: str):
    from mptkit.data.finetune import FinetuneOptions

    seq = ds.max_seq_len or cfg.max_seq_len
    if not seq:
        raise ConfigError(f"{which}.dataset.max_seq_len: set it (or max_seq_len) for the finetuning samples")
    keys = {f.name for f in dataclasses.fields(FinetuneOptions)} - {"max_seq_len"}
    return FinetuneOptions(max_seq_len=int(seq), **{k: v for k, v in ds.options.items() if k in keys})


_HF_BUILDERS = ("json", "csv", "parquet", "arrow", "text")


def finetune_source(ds, which: str, split: str):
    """Where a finetuning loader's examples are: ``hf_name`` (or ``path``) as a local file or folder, or
    llm-foundry's ``hf_name: json`` + ``hf_kwargs: {data_files: ..., data_dir: ...}`` form. ``ds``: the loader's
    dataset section (a ``FinetuneDatasetConfig``, or the YAML mapping of one)."""
    if isinstance(ds, dict):
        from mptkit.train.sections import FinetuneDatasetConfig

        ds = FinetuneDatasetConfig(**{k: ds.get(k) for k in ("hf_name", "hf_kwargs", "path") if k in ds})
    name = ds.hf_name or ds.path
    kw = ds.hf_kwargs or {}
    if not isinstance(kw, dict):
        raise ConfigError(f"{which}.dataset.hf_kwargs: expected a mapping (data_files, data_dir)")
    bad = sorted(set(kw) - {"data_files", "data_dir"})
    if bad:
        raise ConfigError(f"{which}.dataset.hf_kwargs.{bad[0]}: only data_files and data_dir are understood")
    if name in _HF_BUILDERS:
        if kw.get("data_files") is not None:
            files = kw["data_files"]
            if isinstance(files, dict):
                if split not in files:
                    raise ConfigError(f"{which}.dataset.hf_kwargs.data_files has no '{split}' entry "
                                      f"(it has {', '.join(map(str, files))})")
                files = files[split]
            return files if isinstance(files, (list, str)) else [str(f) for f in files]
        if kw.get("data_dir"):
            return kw["data_dir"]
        raise ConfigError(f"{which}.dataset: hf_name '{name}' needs hf_kwargs.data_files or hf_kwargs.data_dir "
                          "(the local files to read)")
    return name


def build_finetune_data(cfg: RunConfig, *, tokenizer: Any = None):
    """(tokenizer, train, eval or None, info) for ``train_loader.name: finetuning``: examples read from local
    files and tokenized by every rank alike (deterministic; no shards are written)."""
    from mptkit.data.finetune import build_finetune_dataset
    from mptkit.io.tokenizer_files import load_tokenizer

    if tokenizer is None:
        src = tokenizer_path(cfg) or pretrained_folder(cfg)
        if src is None:
            raise ConfigError("finetuning needs a tokenizer: set tokenizer.name, or start from a model folder that "
                              "holds one (model.pretrained_model_name_or_path)")
        tokenizer = load_tokenizer(src)
    tr = _dataset_section(cfg, "train_loader")
    split = tr.split
    train = build_finetune_dataset(finetune_source(tr, "train_loader", split), tokenizer,
                                   _finetune_options(tr, cfg, "train_loader"), split=split, where="train_loader.dataset")
    ev = None
    if cfg.eval_loader:
        es = _dataset_section(cfg, "eval_loader")
        if not cfg.eval_loader.finetuning:
            raise ConfigError("eval_loader.name: a finetuning run evaluates on finetuning examples; set "
                              "eval_loader.name: finetuning (with its own hf_name and split)")
        opts = _finetune_options(es, cfg, "eval_loader")
        if opts.max_seq_len != train.opts.max_seq_len:
            raise ConfigError(f"eval_loader.dataset.max_seq_len ({opts.max_seq_len}) differs from the training "
                              f"samples' ({train.opts.max_seq_len})")
        split = es.split
        ev = build_finetune_dataset(finetune_source(es, "eval_loader", split), tokenizer, opts, split=split,
                                    where="eval_loader.dataset")
    info = {"vocab_size": None, "max_seq_len": train.opts.max_seq_len,
            "eos_token_id": getattr(tokenizer, "eos_token_id", None), "finetune": train.stats.as_dict()}
    return tokenizer, train, ev, info


def build_data(cfg: RunConfig, dist: DistInfo, *, tokenizer: Any = None):
    """(tokenizer, train dataset, eval dataset or None, info) from the recipe; validated."""
    if cfg.train_loader is not None and cfg.train_loader.finetuning:
        return build_finetune_data(cfg, tokenizer=tokenizer)
    prepare_if_needed(cfg, dist)
    tr = _dataset_section(cfg, "train_loader")
    if tr is None:
        raise ConfigError("train_loader: the recipe names no training data (train_loader.dataset.local)")
    train = _open_split(tr.local, tr.split, "train_loader")
    man = dict(getattr(train, "manifest", {}) or {})
    tok_dir = tokenizer_path(cfg)
    if tokenizer is None and tok_dir is not None:
        from mptkit.io.tokenizer_files import load_tokenizer

        tokenizer = load_tokenizer(tok_dir)
    if tokenizer is not None and man.get("tokenizer_fingerprint"):
        from mptkit.data.tokenizer import tokenizer_fingerprint

        fp = tokenizer_fingerprint(tokenizer)
        if fp != man["tokenizer_fingerprint"]:
            raise DataError(
                f"tokenizer mismatch: {tok_dir} (fingerprint {fp}) is not the tokenizer the data in {tr.local} "
                f"was prepared with ({man['tokenizer_fingerprint']}); use that tokenizer or re-prepare the data")
    want = tr.max_seq_len or cfg.max_seq_len
    have = man.get("max_seq_len")
    if want and have and int(want) != int(have):
        raise ConfigError(f"max_seq_len {want} does not match the prepared data in {tr.local} "
                          f"(samples of {have} tokens); set max_seq_len={have} or re-prepare the data")
    ev = None
    es = _dataset_section(cfg, "eval_loader")
    if es is not None:
        split = es.split
        if split == "validation":
            split = "val"
        try:
            ev = _open_split(es.local, split, "eval_loader")
        except DataError as e:
            if Path(es.local).resolve() == Path(tr.local).resolve():
                log.warning("no evaluation data: %s", e)
                ev = None
            else:
                raise
        if ev is not None and len(ev) == 0:
            log.warning("eval_loader: the '%s' split is empty; no evaluation", split)
            ev = None
        if ev is not None and tokenizer is not None:
            m2 = getattr(ev, "manifest", {}) or {}
            if m2.get("tokenizer_fingerprint") and m2["tokenizer_fingerprint"] != man.get("tokenizer_fingerprint"):
                raise DataError("eval_loader: the evaluation data was prepared with a different tokenizer "
                                "than the training data")
    info = {"vocab_size": man.get("vocab_size"), "max_seq_len": have, "eos_token_id": man.get("eos_token_id")}
    return tokenizer, train, ev, info


# ----------------------------------------------------------------------------------- the model

_MODEL_META_KEYS = {"name", "pretrained_model_name_or_path", "pretrained", "recipe", "init_device", "loss_fn",
                    "config_overrides", "fast_paths", "peft_config"}


def build_model(cfg: RunConfig, device: torch.device, *, seq_len: int | None = None):
    """The model the recipe names: a recipe name / YAML / folder, or a mapping of MPT keys.

    Mapping form (llm-foundry style): ``{name: mpt_causal_lm, d_model: ..., ...}``; ``recipe: mpt-tiny``
    starts from a bundled recipe and overrides keys; ``pretrained_model_name_or_path: FOLDER`` with
    ``pretrained: true`` loads weights to start from."""
    from mptkit.model import MPTForCausalLM, load_model_config
    from mptkit.model.config import MPTConfig
    from mptkit.model.fastpath import FastPathOptions

    spec = cfg.model
    overrides: dict = {}
    # model.fast_paths: the CPU fast paths' options (model/fastpath.py), recorded with the recipe in config.yaml
    fast = FastPathOptions.from_dict(spec.get("fast_paths")) if isinstance(spec, dict) else FastPathOptions()
    if isinstance(spec, dict):  # the name is checked before the folder: a wrong model type is named first
        name = spec.get("name", "mpt_causal_lm")
        if name not in ("mpt_causal_lm", "mpt"):
            raise ConfigError(f"model.name: '{name}' is not supported; mptkit trains MPT models (mpt_causal_lm)")
    pretrained = pretrained_folder(cfg)
    if isinstance(spec, (str, Path)):
        mcfg = load_model_config(pretrained if pretrained is not None else str(spec))
    elif isinstance(spec, dict):
        spec = copy.deepcopy(spec)
        base = spec.get("recipe")
        overrides = {k: v for k, v in spec.items() if k not in _MODEL_META_KEYS}
        overrides.update(spec.get("config_overrides") or {})
        if pretrained is not None:
            mcfg = load_model_config(pretrained)
        elif base is not None:
            mcfg = load_model_config(str(base))
        else:
            mcfg = None
        if mcfg is None:
            if cfg.max_seq_len and "max_seq_len" not in overrides:
                overrides["max_seq_len"] = cfg.max_seq_len
            mcfg = MPTConfig.from_dict(overrides, where="model", strict=True)
        elif overrides:
            bad = [k for k in overrides if k not in MPTConfig._FIELDS]
            if bad:
                from mptkit.utils.keys import did_you_mean

                raise ConfigError(f"model: unknown key '{bad[0]}'" + did_you_mean(bad[0], MPTConfig._FIELDS))
            mcfg = mcfg.replace(**overrides)
    else:
        raise ConfigError("model: expected a recipe name, a model folder, or a mapping of MPT config keys")
    if pretrained is not None:
        # the overrides are applied to the folder's config before the model is built, so every module reads them
        try:
            model = MPTForCausalLM.from_pretrained(pretrained, device=device, **overrides)
            model.set_fast_paths(fast)
        except CheckpointError as e:
            if not overrides:
                raise
            raise ConfigError(f"model: the settings the recipe overrides ({', '.join(sorted(overrides))}) do not fit "
                              f"the pretrained weights: {e}. Starting from a model folder, only settings that keep "
                              "every tensor's shape can be overridden (model.* keys and model.config_overrides)"
                              ) from None
        model.train()
        log.info("starting from the weights in %s%s", pretrained,
                 f" (overriding {', '.join(sorted(overrides))})" if overrides else "")
        return _with_lora(model, spec, pretrained)
    model = MPTForCausalLM(mcfg, init=False, device="meta", fast_paths=fast)
    model.materialize(device)
    model.train()
    return _with_lora(model, spec, None)


def _with_lora(model, spec, base_folder: Path | None):
    """``model.peft_config``: wrap the recipe's target Linears in LoRA adapters (model/lora.py), the base frozen;
    the base's folder and fingerprint go with every checkpoint of the adapter."""
    if not isinstance(spec, dict) or spec.get("peft_config") is None:
        return model
    from mptkit.model.lora import LoraSettings, apply_lora, base_fingerprint, param_counts

    settings = LoraSettings.from_dict(spec["peft_config"])
    if model.is_meta:
        raise ConfigError("model.peft_config: LoRA trains an adapter on a pretrained model; name its folder in "
                          "model.pretrained_model_name_or_path (a model built on the meta device has no weights)")
    fp = base_fingerprint(model)  # before base_dtype casts the base
    wrapped = apply_lora(model, settings)
    model._lora_base = {"base_folder": str(base_folder.resolve()) if base_folder is not None else None,
                        "base_fingerprint": fp}
    n, total = param_counts(model)
    log.info("LoRA (r=%d, alpha=%g%s): %d Linears wrapped (%s); %s trainable of %s parameters (%.2f%%)",
             settings.r, settings.lora_alpha, ", rsLoRA" if settings.use_rslora else "", len(wrapped),
             ", ".join(sorted({w.rsplit(".", 1)[-1] for w in wrapped})), f"{n:,}", f"{total:,}", 100 * n / total)
    return model
