"""llm-foundry's top-level training keys (``llmfoundry.utils.config_utils.TrainConfig``) and what mptkit does
with the ones it does not implement: each is refused naming the key and why, unless it is unset (null, empty,
false) — then it asks for nothing. docs/training.md's key table lists every key of both kinds
(tests/train/test_foundry_keys.py keeps the table, this module and :class:`mptkit.train.config.RunConfig`
in step)."""

from __future__ import annotations

# the fields of llm-foundry's TrainConfig dataclass (scripts/train/train.py refuses any other top-level key)
LLM_FOUNDRY_TRAIN_KEYS = (
    "model", "tokenizer", "optimizer", "scheduler", "train_loader", "device_train_batch_size",
    "device_eval_batch_size", "max_duration", "eval_interval", "max_seq_len", "seed", "precision", "code_paths",
    "max_split_size_mb", "expandable_segments", "cuda_load_lazy", "dist_timeout", "fsdp_config", "eval_loader",
    "eval_loaders", "icl_tasks", "icl_tasks_str", "eval_gauntlet", "eval_gauntlet_str", "icl_subset_num_batches",
    "icl_seq_len", "loggers", "progress_bar", "log_to_console", "python_log_level", "console_log_interval",
    "log_config", "callbacks", "algorithms", "save_folder", "save_latest_filename", "save_overwrite",
    "save_weights_only", "save_filename", "save_interval", "save_num_checkpoints_to_keep", "load_path",
    "load_weights_only", "load_strict_model_weights", "load_ignore_keys", "save_ignore_keys",
    "device_train_microbatch_size", "global_train_batch_size", "eval_subset_num_batches", "eval_first",
    "compile_config", "metadata", "run_name", "autoresume", "profiler", "variables", "n_gpus",
    "device_train_grad_accum",
)

_ICL_STR = ("llm-foundry's serialised copy of the ICL settings: give icl_tasks / eval_gauntlet themselves (a list or "
            "mapping, or a YAML file's path)")
_ICL_SUBSET = ("mptkit's ICL evaluation during training scores every record of each task (split over the ranks); "
               "shorten the task files to evaluate fewer")
_DERIVED = ("llm-foundry derives it from global_train_batch_size and the number of ranks (a recipe does not set "
            "it); set global_train_batch_size and device_train_microbatch_size")

# keys accepted only when unset, with the reason a set value is refused
REFUSED: dict[str, str] = {
    "device_train_batch_size": _DERIVED,
    "n_gpus": _DERIVED,
    "device_train_grad_accum": _DERIVED,
    "code_paths": "mptkit imports no code named by a recipe (a finetuning preprocessing_fn is its one import)",
    "eval_loaders": "mptkit evaluates one eval_loader",
    "icl_tasks_str": _ICL_STR,
    "eval_gauntlet_str": _ICL_STR,
    "icl_subset_num_batches": _ICL_SUBSET,
    "save_latest_filename": "mptkit writes no 'latest' link: autoresume and load_path find the newest checkpoint "
                            "whose manifest verifies",
    "save_filename": "mptkit names each checkpoint folder ep{E}-ba{B} (model/, trainer_state.pt, manifest.json)",
    "save_ignore_keys": "an mptkit checkpoint is complete (its manifest checks every file); save_weights_only "
                        "writes the weights alone",
    "profiler": "the torch profiler is not wired into mptkit's loop",
}


def unset(v) -> bool:
    """A value that asks for nothing: null, false, an empty string, list or mapping."""
    return v is None or v is False or v == "" or v == [] or v == {}


__all__ = ["LLM_FOUNDRY_TRAIN_KEYS", "REFUSED", "unset"]
