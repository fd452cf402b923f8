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
    if tr is None or not tr.local:
        raise ConfigError("data_prep needs train_loader.dataset.local (where the prepared shards go); it prepares "
                          "one folder, not the streams of a mixture: prepare each with `mptkit data prepare`")
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


def _open_split(local: str, split: str, which: str, *, key: str | None = None, separators=None,
                root_ok: bool = True):
    """The ``split`` of the folder ``local``: a prepared folder (``manifest.json``: :class:`TokenDataset`) or an
    MDS folder (``index.json`` in ``local/<split>/`` or in ``local`` itself: :class:`MDSTokenDataset`, its
    ``sequence_id`` from ``separators()``, the (eos, bos) ids). ``key`` names the recipe key in messages;
    ``root_ok``: an MDS folder without a ``split`` subfolder may be read whole."""
    from mptkit.data.shards import SPLIT_ALIASES, TokenDataset

    key = key or f"{which}.dataset.local"
    p = Path(local)
    if not p.exists():
        raise DataError(
            f"{key}: {p} does not exist. Prepare it first (`mptkit data prepare INPUTS --tokenizer "
            f"TOK --out {p}`), or add a data_prep section to the recipe so `mptkit train` prepares it")
    if not (p / "manifest.json").exists():
        from mptkit.data.mds import MDSTokenDataset, mds_split_folder

        split = SPLIT_ALIASES.get(split, split)
        sub = mds_split_folder(p, split)
        if sub is not None or ((p / "index.json").is_file() and root_ok):
            eos, bos = separators() if separators is not None else (None, None)
            return MDSTokenDataset(p, sub, eos_token_id=eos, bos_token_id=bos)
        if (p / "index.json").is_file():
            raise DataError(f"{key}: {p} is an MDS folder without a '{split}' subfolder")
        raise DataError(f"{key}: {p} holds no prepared data (no manifest.json) and no MDS dataset (no index.json); "
                        "prepare it with `mptkit data prepare`")
    try:
        return TokenDataset(p, split=split)
    except DataError:
        raise
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise DataError(f"{key}: {p} has no usable '{split}' split ({e})") from None


def _separators(es, tokenizer) -> tuple[int | None, int | None]:
    """sequence_id separators for MDS folders (they do not record them): the dataset's ``eos_token_id`` /
    ``bos_token_id`` (llm-foundry's keys), else the EOS of the tokenizer (``tokenizer()``: loaded when needed)."""
    if es.eos_token_id is not None:
        return es.eos_token_id, es.bos_token_id
    return getattr(tokenizer(), "eos_token_id", None), es.bos_token_id


def _check_stream_pair(a, b, na: str, nb: str) -> None:
    """Streams of one mixture must hold tokens of one tokenizer and one sample length."""
    ma, mb = getattr(a, "manifest", {}) or {}, getattr(b, "manifest", {}) or {}
    fa, fb = ma.get("tokenizer_fingerprint"), mb.get("tokenizer_fingerprint")
    if fa and fb and fa != fb:
        raise DataError(f"{nb}: {mb.get('tokenizer', {}).get('path') or 'its tokenizer'} (fingerprint {fb}) is not "
                        f"the tokenizer of {na} ({ma.get('tokenizer', {}).get('path') or ''} {fa}): the streams of a "
                        "mixture must be prepared with one tokenizer; prepare them again with the same --tokenizer")
    la, lb = int(a[0]["input_ids"].shape[-1]), int(b[0]["input_ids"].shape[-1])
    if la != lb:
        raise DataError(f"{nb}: samples of {lb} tokens, but {na} has samples of {la}: the streams of a mixture "
                        "must have one sample length (prepare them with the same --max-seq-len)")
    va, vb = ma.get("vocab_size"), mb.get("vocab_size")
    if va and vb and va != vb:
        raise DataError(f"{nb}: vocabulary of {vb} tokens, but {na} has {va}: the streams of a mixture must be "
                        "prepared with one tokenizer")


def _open_text(es, which: str, tokenizer, seed: int, *, root_ok: bool = True, epoch_counts: bool = True):
    """A loader's text data: one folder, or the mixture of ``streams`` (data/mixture.py). ``tokenizer()``
    gives the recipe's tokenizer (for an MDS folder's EOS). ``epoch_counts`` False (evaluation): every stream's
    samples once."""
    from mptkit.data.mixture import MixtureDataset, StreamWeight, resolve_counts

    def seps():
        return _separators(es, tokenizer)

    if not es.streams:
        ds = _open_split(es.local, es.split, which, separators=seps, root_ok=root_ok)
        if es.epoch_size is None or not epoch_counts:
            return ds
        streams = {"local": {"local": es.local}}
        opened = [ds]
    else:
        streams = es.streams
        opened = [_open_split(st["local"], st.get("split") or es.split, which, key=f"{which}.dataset.streams.{n}.local",
                              separators=seps) for n, st in streams.items()]
    names = list(streams)
    keys = [f"{which}.dataset.streams.{n}" for n in names]
    sizes = [len(d) for d in opened]
    for k, n, st in zip(keys, sizes, streams.values()):
        if n == 0 and epoch_counts:
            raise DataError(f"{k}: {st['local']} has no samples in its '{st.get('split') or es.split}' split")
        if n == 0:
            log.warning("%s: %s has no samples in its '%s' split: not evaluated", k, st["local"],
                        st.get("split") or es.split)
    if not epoch_counts:  # evaluation: the streams that have samples
        keep = [i for i, n in enumerate(sizes) if n] or [0]
        opened, sizes = [opened[i] for i in keep], [sizes[i] for i in keep]
        names, keys = [names[i] for i in keep], [keys[i] for i in keep]
        streams = {n: streams[n] for n in names}
        if not sizes[0]:
            return opened[0]
    for i in range(1, len(opened)):
        _check_stream_pair(opened[0], opened[i], f"{keys[0]} ({streams[names[0]]['local']})",
                           f"{keys[i]} ({streams[names[i]]['local']})")
    if epoch_counts:
        weights = [StreamWeight(n, st.get("proportion"), st.get("repeat"), st.get("choose"), where=k)
                   for n, st, k in zip(names, streams.values(), keys)]
        counts = resolve_counts(weights, sizes, epoch_size=es.epoch_size, seed=seed)
    else:
        counts = sizes
    first = dict(getattr(opened[0], "manifest", {}) or {})
    man = {k: first.get(k) for k in ("tokenizer_fingerprint", "tokenizer", "vocab_size", "tokenizer_vocab_size",
                                     "max_seq_len", "eos_token_id", "bos_token_id", "dtype")}
    vocabs = [(getattr(d, "manifest", {}) or {}).get("vocab_size") for d in opened]
    man["vocab_size"] = max((v for v in vocabs if v), default=None)
    man["max_seq_len"] = int(opened[0][0]["input_ids"].shape[-1])
    mix = MixtureDataset(opened, names, counts, seed=seed, sampling_method=es.sampling_method or "balanced",
                         folders=[str(st["local"]) for st in streams.values()], manifest=man)
    if epoch_counts:
        log.info("data mixture: %s per epoch (%d samples)", ", ".join(
            f"{d['name']} {d['samples_per_epoch']} of {d['samples']} ({100 * d['proportion']:.1f}%)"
            for d in mix.describe()), mix.epoch_size)
    return mix


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
    for which in ("train_loader", "eval_loader"):
        ds = _dataset_section(cfg, which)
        named = getattr(ds, "tokenizer_name", None) if ds is not None else None
        run_tok = (tokenizer_path(cfg) or pretrained_folder(cfg)) if named else None
        if named and (run_tok is None or Path(str(named)).resolve() != Path(str(run_tok)).resolve()):
            raise ConfigError(f"{which}.dataset.tokenizer_name: {named} is not the run's tokenizer ({run_tok}); the "
                              "examples are tokenized with the run's tokenizer (tokenizer.name): make them the same "
                              "or remove dataset.tokenizer_name")
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
    tok_dir = tokenizer_path(cfg)
    loaded = {"tok": tokenizer}

    def get_tokenizer():  # loaded once, when first needed: a missing data folder is named before the tokenizer
        if loaded["tok"] is None and tok_dir is not None:
            from mptkit.io.tokenizer_files import load_tokenizer

            loaded["tok"] = load_tokenizer(tok_dir)
        return loaded["tok"]

    seed = int(tr.shuffle_seed if tr.shuffle_seed is not None else cfg.seed)
    train = _open_text(tr, "train_loader", get_tokenizer, seed)
    tokenizer = get_tokenizer()
    where = tr.local or "the streams' folders"
    man = dict(getattr(train, "manifest", {}) or {})
    if tokenizer is not None:
        from mptkit.data.tokenizer import tokenizer_fingerprint

        fp = tokenizer_fingerprint(tokenizer)
        parts = getattr(train, "datasets", None) or [train]
        for d, folder in zip(parts, getattr(train, "folders", None) or [tr.local]):
            have_fp = (getattr(d, "manifest", {}) or {}).get("tokenizer_fingerprint")
            if have_fp and fp != have_fp:
                raise DataError(
                    f"tokenizer mismatch: {tok_dir} (fingerprint {fp}) is not the tokenizer the data in {folder} "
                    f"was prepared with ({have_fp}); use that tokenizer or re-prepare the data")
    want = tr.max_seq_len or cfg.max_seq_len
    have = man.get("max_seq_len")
    if have is None and len(train):  # an MDS folder: its samples' length
        have = int(train[0]["input_ids"].shape[-1])
    if want and have and int(want) != int(have):
        raise ConfigError(f"max_seq_len {want} does not match the prepared data in {where} "
                          f"(samples of {have} tokens); set max_seq_len={have} or re-prepare the data")
    ev = None
    es = _dataset_section(cfg, "eval_loader")
    if es is not None:
        split = es.split
        if split == "validation":
            split = "val"
        es = dataclasses.replace(es, split=split)
        same = (not es.streams and not tr.streams and es.local and tr.local
                and Path(es.local).resolve() == Path(tr.local).resolve())
        try:
            ev = _open_text(es, "eval_loader", get_tokenizer, seed, root_ok=not same, epoch_counts=False)
        except DataError as e:
            if same:
                log.warning("no evaluation data: %s", e)
                ev = None
            else:
                raise
        if ev is not None and len(ev) == 0:
            log.warning("eval_loader: the '%s' split is empty; no evaluation", split)
            ev = None
        if ev is not None and tokenizer is not None:
            m2 = getattr(ev, "manifest", {}) or {}
            if m2.get("tokenizer_fingerprint") and man.get("tokenizer_fingerprint") and \
                    m2["tokenizer_fingerprint"] != man.get("tokenizer_fingerprint"):
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
        if name == "hf_causal_lm" and not spec.get("pretrained_model_name_or_path"):
            raise ConfigError("model.name: hf_causal_lm starts from a model folder: set "
                              "model.pretrained_model_name_or_path to a local MPT folder (or use mpt_causal_lm)")
        if name not in ("mpt_causal_lm", "mpt", "hf_causal_lm"):
            raise ConfigError(f"model.name: '{name}' is not supported; mptkit trains MPT models (mpt_causal_lm, or "
                              "hf_causal_lm from a local MPT folder)")
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
