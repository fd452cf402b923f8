"""The training loop: one loop for pretraining and finetuning, single process or torchrun (DDP, or FSDP2
sharding with ``fsdp_config``; see :mod:`mptkit.train.fsdp`).

    from mptkit.train import Trainer, load_run_config
    cfg = load_run_config("configs/pretrain/quickstart.yaml", ["max_duration=20ba"])
    summary = Trainer(cfg).fit()

Pluggable parts: pass ``model=``, ``tokenizer=``, ``train_dataset=`` / ``eval_dataset=`` (map-style
datasets of dicts of LongTensors, see :mod:`mptkit.train.data`), ``collate=`` and ``loss_fn=``
(``loss_fn(model, microbatch) -> mean loss over the microbatch's targets``; targets are counted by
``count_targets(microbatch)`` so that gradient accumulation weights microbatches by their targets).
``sample_fn(model, tokenizer, cfg) -> text`` writes the end-of-run sample of a recipe with ``sample_prompt``
into the summary (rank 0, the full model in eval mode); training has no decoder of its own, so `mptkit train`
passes one (:mod:`mptkit.cli.train`) and without it the summary's ``sample`` is None.

The parts: one optimizer step in :mod:`mptkit.train.step`, the eval pass in :mod:`mptkit.train.evaluate`,
the checkpointed trainer state in :mod:`mptkit.train.state`; this module holds the loop that runs them.

Everything that can be checked is checked before the first step (data folder, tokenizer fingerprint,
vocabulary, batch arithmetic, a writable save folder, precision vs device); see :meth:`Trainer.setup`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mptkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    MPTKitError,
    TrainDiverged,
    TrainError,
    TrainPreempted,
)
from mptkit.train import checkpoint as ckpt_mod
from mptkit.train import recovery as rec_mod
from mptkit.train import state as state_mod
from mptkit.train import watchdog as _wd
from mptkit.train.callbacks import build_callbacks
from mptkit.train.config import Duration, RunConfig, parse_duration
from mptkit.train.data import BatchStream, data_fingerprint, default_collate, make_sampler
from mptkit.train.distributed import DistInfo, barrier, init_distributed, shutdown
from mptkit.train.evaluate import evaluate_loss
from mptkit.train.faults import FaultInjector
from mptkit.train.folders import RunFolders
from mptkit.train.metrics import (
    LossSpikeMonitor,
    MetricsWriter,
    Throughput,
    drop_records_after,
    memory_stats,
    nonfinite_message,
    peak_flops,
)
from mptkit.train.optim import build_optimizer
from mptkit.train.schedule import build_schedule
from mptkit.train.state import get_rng_state, seed_everything, set_rng_state
from mptkit.train.step import StepRunner, autocast, causal_lm_loss, count_targets, count_tokens
from mptkit.utils.outputs import check_output, write_errors

log = logging.getLogger(__name__)

# the loss helpers and RNG functions of train/step.py and train/state.py, importable from here as before
__all__ = ["Trainer", "causal_lm_loss", "count_targets", "count_tokens", "get_rng_state", "seed_everything",
           "set_rng_state"]


# ----------------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        *,
        model: nn.Module | None = None,
        tokenizer: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        collate: Callable[[list], dict] = default_collate,
        loss_fn: Callable[[nn.Module, dict], torch.Tensor] = causal_lm_loss,
        count_targets_fn: Callable[[dict], int] = count_targets,
        sample_fn: Callable[[nn.Module, Any, RunConfig], str] | None = None,
    ):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.collate = collate
        self.loss_fn = loss_fn
        self.count_targets = count_targets_fn
        self.sample_fn = sample_fn
        self._setup_done = False
        self.step = 0
        self.tokens = 0
        self.target_tokens = 0  # positions that carried loss (labels[:, 1:] != -100), all ranks
        self._step_targets = 0
        self._step_tokens = 0  # tokens of the last step (non-padding for finetuning data), all ranks
        self._flops_memo: dict[float, float] = {}
        self._step_width = 0.0  # positions per sample computed in the last step (after pad trimming; ranks' mean)
        self.samples = 0
        self.last_eval: dict | None = None
        self.resumed_from: Path | None = None
        self.folders = RunFolders()  # rank 0's locks on the run and save folders, the folders set-up created
        self._step_runner: StepRunner | None = None  # one optimizer step (train/step.py), built by setup
        self._microbatch = 0
        self.scaler = None
        self.faults = FaultInjector([], rank=0, run_folder=Path("."))  # MPTKIT_FAULTS (train/faults.py), set by setup
        self.watchdog = None  # the step watchdog of this rank while fit() trains (train/watchdog.py)

    # ------------------------------------------------------------------------------ set-up
    def setup(self) -> Trainer:
        """Build and validate everything; raises a clear error before any training step (and then leaves no
        lock and no folder it created empty behind)."""
        if self._setup_done:
            return self
        try:
            return self._setup()
        except BaseException as e:
            self._abandon_setup()
            if isinstance(e, MPTKitError):
                e.before_first_step = True  # a retry fails the same way: `mptkit train` exits EXIT_NOT_RETRYABLE
            raise

    def _setup(self) -> Trainer:
        cfg = self.cfg
        if cfg.python_log_level:  # llm-foundry sets composer's and llmfoundry's loggers; here mptkit's
            level = str(cfg.python_log_level).upper()
            logging.getLogger("mptkit").setLevel("WARNING" if level == "WARN" else level)
        _cuda_environment(cfg)
        self.dist: DistInfo = init_distributed(cfg.device, cfg.dist_timeout)
        self.device = self.dist.device
        if self.device.type == "cpu" and cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self._check_precision()
        self.fsdp = None  # FSDPSettings when the model is sharded
        if cfg.fsdp_config is not None:
            from mptkit.train import fsdp as fsdp_mod

            settings = fsdp_mod.parse_fsdp_config(cfg.fsdp_config)
            if not self.dist.enabled:
                log.info("fsdp_config: a single process trains unsharded (FSDP needs several ranks)")
            elif settings.sharding_strategy == "NO_SHARD":
                log.info("fsdp_config.sharding_strategy NO_SHARD: training with DistributedDataParallel "
                         "(a full replica per rank)")
            else:
                self.fsdp = settings
                if self.dist.is_main:
                    for line in fsdp_mod.notes(cfg.fsdp_config, settings):
                        log.info("fsdp_config.%s", line)
        self.run_name = cfg.run_name or os.environ.get("RUN_NAME") or "run"
        self.run_folder = Path(cfg.run_folder or Path("runs") / self.run_name)
        self.save_folder = Path(cfg.save_folder.format(run_name=self.run_name)) if cfg.save_folder else None
        self._take_folders()  # rank 0 creates and locks them before anything is written; all ranks learn the outcome
        self.faults = FaultInjector.from_env(rank=self.dist.rank, run_folder=self.run_folder)  # MPTKIT_FAULTS
        if self.dist.is_main and cfg.export_folder:  # found now, not when training has ended
            # not a file, its folder writable; an existing export is replaced at the end (atomic_dir), no flag
            check_output(Path(cfg.export_folder.format(run_name=self.run_name)), flag="export_folder",
                         replaceable=lambda _p: True, overwrite=None, error=TrainError)
        # data and tokenizer
        from mptkit.train.recipe_data import build_data

        if self.train_dataset is None:
            self.tokenizer, self.train_dataset, self.eval_dataset, self.data_info = build_data(
                cfg, self.dist, tokenizer=self.tokenizer)
        else:
            self.data_info = {}
            if self.tokenizer is None and cfg.tokenizer is not None:  # own data, the recipe's tokenizer
                from mptkit.io.tokenizer_files import load_tokenizer
                from mptkit.train.recipe_data import tokenizer_path

                self.tokenizer = load_tokenizer(tokenizer_path(cfg))
        if self.collate is default_collate and callable(getattr(self.train_dataset, "collate", None)):
            self.collate = self.train_dataset.collate  # e.g. finetuning batches cut to their longest sample
        seq_len = self._sample_len(self.train_dataset)
        self.seq_len = seq_len
        # model
        seed_everything(cfg.seed)
        if self.model is None:
            from mptkit.train.recipe_data import build_model, pretrained_folder

            if self.fsdp is not None and pretrained_folder(cfg) is None:
                # built on meta, materialised shard by shard after fully_shard: never a full replica per rank
                self.model = build_model(cfg, torch.device("meta"), seq_len=seq_len)
            elif self.fsdp is not None:
                # pretrained weights: read into CPU memory; fully_shard moves only this rank's shards to the GPU
                self.model = build_model(cfg, torch.device("cpu"), seq_len=seq_len)
            else:
                self.model = build_model(cfg, self.device, seq_len=seq_len)
        elif self.fsdp is None:
            self.model.to(self.device)  # (FSDP: fully_shard moves the shards)
        self._check_model_vs_data()
        if self.fsdp is not None:
            self._shard_model()
        ac = cfg.activation_checkpointing or (self.fsdp is not None and self.fsdp.activation_checkpointing)
        if ac and hasattr(self.model, "set_gradient_checkpointing"):
            self.model.set_gradient_checkpointing(True)
        if cfg.compile_config is not None:  # train/compile.py: each block, in place
            from mptkit.train.compile import compile_blocks

            compile_blocks(self.model, cfg.compile_config, self.device.type)
        if cfg.save_weights_only and self.fsdp is not None and self.fsdp.sharded_checkpoints:
            raise ConfigError("save_weights_only with fsdp_config.state_dict_type: sharded is not supported; use "
                              "state_dict_type: full")
        # batch arithmetic
        world = self.dist.world_size
        gb = cfg.global_train_batch_size
        if gb % world:
            raise ConfigError(f"global_train_batch_size ({gb}) is not divisible by the number of ranks ({world})")
        self.per_rank_batch = gb // world
        mb = cfg.device_train_microbatch_size
        self.auto_microbatch = mb == "auto"
        if self.auto_microbatch:
            mb = self.per_rank_batch
        elif self.per_rank_batch % mb:
            raise ConfigError(
                f"global_train_batch_size ({gb}) / ranks ({world}) = {self.per_rank_batch} per rank is not divisible "
                f"by device_train_microbatch_size ({mb}); pick a microbatch size that divides it, or 'auto'")
        self.microbatch = mb
        # data stream
        ds = cfg.train_loader.dataset if cfg.train_loader is not None else None
        shuffle = bool(ds.shuffle) if ds is not None else True
        shuffle_seed = ds.shuffle_seed if ds is not None and ds.shuffle_seed is not None else cfg.seed
        sampler = make_sampler(len(self.train_dataset), seed=int(shuffle_seed), shuffle=shuffle,
                               rank=self.dist.rank, world_size=world, drop_last=True, dataset=self.train_dataset)
        self.stream = BatchStream(self.train_dataset, sampler, self.per_rank_batch, self.collate,
                                  vocab_size=getattr(getattr(self.model, "config", None), "vocab_size", None))
        # what exact resumption depends on: stored in every checkpoint, compared on resume
        self.data_fingerprint = data_fingerprint(self.train_dataset, shuffle=shuffle,
                                                 shuffle_seed=int(shuffle_seed), global_batch_size=gb,
                                                 sample_len=seq_len)
        if self.stream.batches_per_epoch == 0:
            raise DataError(
                f"the training data has {len(self.train_dataset)} samples: fewer than one global batch "
                f"({gb}); prepare more data or lower global_train_batch_size")
        self.tokens_per_batch = gb * seq_len  # positions per global batch
        # ``tok`` durations count tokens as llm-foundry does: non-padding ones where the data has padding
        # (finetuning samples report their lengths); converted to steps with the data's mean per sample
        real = getattr(self.train_dataset, "token_count", None)
        self.duration_tokens_per_batch = (real / len(self.train_dataset) * gb if real else self.tokens_per_batch)
        self.max_steps = self._to_batches(cfg.duration)
        self.eval_every = self._interval(cfg.eval_interval, "eval_interval", int_unit="ep")
        self.save_every = self._interval(cfg.save_interval, "save_interval", int_unit="ep")
        hfc = cfg.callbacks.hf_checkpointer
        self.hf_every = (max(1, self._interval(hfc.save_interval, "callbacks.hf_checkpointer.save_interval",
                                               int_unit="ep")) if hfc is not None else 0)
        self._last_hf = -1
        self.log_every = max(1, self._interval(cfg.console_log_interval, "console_log_interval", int_unit="ba"))
        # optimizer + schedule
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.schedule = build_schedule(cfg.scheduler, max_steps=self.max_steps, to_batches=self._to_batches)
        # callbacks: the loss-spike monitor always runs (llm-foundry's defaults: log only, unless configured);
        # scheduled_gc and optimizer_monitor only when the recipe names them (train/callbacks.py)
        spike = cfg.callbacks.kill_loss_spike
        self.spike = LossSpikeMonitor(spike.patience, spike.outlier_multiplier, spike.window_size, spike.loss_cap,
                                      spike.log_only, total_steps=self.max_steps)
        # what a NaN / inf or a spike does (train/recovery.py): the skipped batches are the stream's to pass over
        self.recovery = rec_mod.RecoveryState()
        self.stream.skip = self.recovery
        self.spike_action = cfg.recovery.spike_action(spike.log_only)
        self._verdict: tuple | None = None
        self.scheduled_gc, self.optimizer_monitor = build_callbacks(cfg.callbacks)
        self._optimizer_metrics: dict = {}
        # DDP (FSDP: the sharded model is its own training module)
        self.train_model: nn.Module = self.model
        if self.dist.enabled and self.fsdp is None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._step_runner = StepRunner(
            model=self.model, train_model=self.train_model, optimizer=self.optimizer, schedule=self._lr_multiplier,
            loss_fn=self.loss_fn, count_targets_fn=self.count_targets, dist=self.dist, device=self.device,
            precision=cfg.precision, per_rank_batch=self.per_rank_batch, microbatch=self._microbatch,
            auto_microbatch=self.auto_microbatch, clip=cfg.algorithms.clip, sharded=self.fsdp is not None,
            activation_offload=self.fsdp is not None and self.fsdp.activation_cpu_offload,
            optimizer_monitor=self.optimizer_monitor)
        self.scaler = self._step_runner.scaler  # amp_fp16's loss scaler (checkpointed), else None
        if {"skip", "rollback"} & cfg.recovery.actions(spike.log_only):
            self._step_runner.guard = self._guard  # judged before the update, which a recovery drops
        # resume
        self._maybe_resume()
        # rank-specific RNG stream after init (dropout differs across ranks), unless restored
        if self.resumed_from is None and self.dist.enabled:
            torch.manual_seed(cfg.seed + self.dist.rank)
        self._setup_done = True
        return self

    # ------------------------------------------------------------------------------ folders and their locks
    def _take_folders(self) -> None:
        """Rank 0 creates the run and save folders and locks them (train/folders.py); all ranks learn the outcome."""
        self.folders.take(self.run_folder, self.save_folder, self.dist)

    @property
    def _locks(self) -> list:
        return self.folders.locks

    def _assert_lock_held(self) -> None:
        """Before writing a checkpoint: every rank raises if rank 0's lock was taken over (collective)."""
        self.folders.assert_held(self.dist)

    def _check_locks(self) -> None:
        """Rank 0, before each metrics line and the export: a TrainError if another run took a folder over."""
        self.folders.check()

    def close(self) -> None:
        """Release the folders' locks (``fit`` does it at its end, or on an error)."""
        self.folders.release()

    def _abandon_setup(self) -> None:
        self.folders.abandon()

    def _shard_model(self) -> None:
        """fully_shard every block, then the root; materialise a meta-built model shard by shard."""
        from mptkit.train import fsdp as F

        s, cfg = self.fsdp, self.cfg
        pd, rd = F.compute_dtypes(s, cfg.precision, self.device)  # refuses fp16 (no sharded grad scaler)
        if not hasattr(self.model, "config"):
            raise ConfigError(f"fsdp_config: mptkit shards MPT models; got {type(self.model).__name__}")
        if s.activation_cpu_offload and self.device.type != "cuda":
            log.warning("fsdp_config.activation_cpu_offload: activations are already in CPU memory on %s; ignored",
                        self.device.type)
        meta = any(p.is_meta for p in self.model.parameters())
        if s.sync_module_states and not meta:
            import torch.distributed as dist

            with torch.no_grad():
                for t in [*self.model.parameters(), *self.model.buffers()]:
                    buf = t.data.to(self.device)  # NCCL broadcasts device tensors only
                    dist.broadcast(buf, src=0)
                    t.data.copy_(buf)
        mesh = F.build_mesh(s, self.dist.world_size, self.device)
        units = F.shard_model(self.model, s, mesh, param_dtype=pd, reduce_dtype=rd, device=self.device)
        if meta:
            from mptkit.model.init import init_weights

            mcfg = self.model.config
            torch.manual_seed(cfg.seed)  # the stream an unsharded build starts its init from: same weights
            init_dev = torch.device("cpu") if s.cpu_offload and self.device.type == "cuda" else self.device
            F.materialize_sharded(self.model, init_dev, lambda m: init_weights(m, mcfg),
                                  sync_from_rank0=s.sync_module_states)
        if hasattr(self.model, "reset_buffers"):
            self.model.reset_buffers()
        self.model.train()
        self.fsdp_local_params, total = F.local_numel(self.model)
        msg = F.describe(units, mesh, s, pd, rd)
        if self.dist.is_main:
            log.info("%s", msg)
        (log.info if s.verbose else log.debug)("rank %d holds %s of %s parameter elements (%.1f%%)",
                                               self.dist.rank, f"{self.fsdp_local_params:,}", f"{total:,}",
                                               100.0 * self.fsdp_local_params / max(1, total))

    def _check_precision(self) -> None:
        p = self.cfg.precision
        if p == "fp32":
            return
        if self.device.type != "cuda":
            if p == "amp_fp16":
                raise ConfigError("precision amp_fp16 needs a CUDA GPU (it uses a GPU grad scaler); on CPU use "
                                  "precision=fp32")
            log.warning("precision %s on CPU: bf16 matmuls are usually far slower than fp32 on CPUs; "
                        "precision=fp32 is the CPU default", p)
        elif p == "amp_bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision amp_bf16: this GPU does not support bfloat16; use amp_fp16")

    @staticmethod
    def _sample_len(ds) -> int:
        if len(ds) == 0:
            raise DataError("the training dataset is empty")
        return int(ds[0]["input_ids"].shape[-1])

    def _check_model_vs_data(self) -> None:
        mc = getattr(self.model, "config", None)
        if mc is None:
            return
        vocab = self.data_info.get("vocab_size")
        if vocab is not None and vocab > mc.vocab_size:
            raise ConfigError(
                f"the prepared data uses a vocabulary of {vocab} tokens but the model's vocab_size is "
                f"{mc.vocab_size}; set model.vocab_size >= {vocab}")
        if self.tokenizer is not None and len(self.tokenizer) > mc.vocab_size:
            raise ConfigError(f"the tokenizer has {len(self.tokenizer)} tokens but model.vocab_size is "
                              f"{mc.vocab_size}; set model.vocab_size >= {len(self.tokenizer)}")
        if self.seq_len > mc.max_seq_len:
            if not mc.alibi:
                raise ConfigError(f"training samples have {self.seq_len} tokens, more than the model's max_seq_len "
                                  f"({mc.max_seq_len}) with learned positions")
            log.warning("training samples (%d tokens) are longer than model max_seq_len (%d); ALiBi allows it",
                        self.seq_len, mc.max_seq_len)

    def _to_batches(self, d: Duration) -> int:
        return d.to_batches(batches_per_epoch=self.stream.batches_per_epoch,
                            tokens_per_batch=self.duration_tokens_per_batch,
                            samples_per_batch=self.cfg.global_train_batch_size,
                            max_duration=self.cfg.duration)

    def _interval(self, v, key: str, int_unit: str) -> int:
        d = parse_duration(v, key, int_unit=int_unit)
        n = self._to_batches(d)
        return n  # 0 = never

    # ------------------------------------------------------------------------------ resume
    def _maybe_resume(self) -> None:
        cfg = self.cfg.checkpointing  # autoresume, load_path, save_overwrite (train/sections.py)
        ck = None
        if self.save_folder is not None and self.save_folder.exists():
            if self.dist.is_main:
                with write_errors(self.save_folder, TrainError, _SAVE):
                    ckpt_mod.restore_interrupted(self.save_folder)
            barrier(self.dist)  # the other ranks look for checkpoints after rank 0 put back what it could
            existing = ckpt_mod.list_checkpoints(self.save_folder)
            if cfg.autoresume:
                ck, bad = ckpt_mod.scan_checkpoints(self.save_folder)
                if bad and ck is None:  # starting from scratch would overwrite them under the same names
                    raise CheckpointError(ckpt_mod.no_valid_checkpoint_message(self.save_folder, bad))
                for c, why in bad:  # newer than the one resumed: out of the way of this run's saves, intact
                    if self.dist.is_main:
                        with write_errors(self.save_folder, TrainError, _SAVE):
                            aside = ckpt_mod.move_aside(c)
                        log.warning("autoresume: checkpoint %s is invalid (%s): moved aside to %s", c, why, aside.name)
            if self.dist.is_main:
                with write_errors(self.save_folder, TrainError, _SAVE):
                    ckpt_mod.clean_stale_temp(self.save_folder)
            if existing and not cfg.autoresume and not cfg.load_path:
                if cfg.save_overwrite:
                    if self.dist.is_main:
                        import shutil

                        for p in existing:
                            shutil.rmtree(p, ignore_errors=True)
                else:
                    raise TrainError(
                        f"save_folder {self.save_folder} already holds checkpoints ({existing[0].name} …) from an "
                        "earlier run: set autoresume=true to continue it, save_overwrite=true to start over, or "
                        "choose another save_folder")
        if ck is None and cfg.load_path and cfg.load_weights_only:  # a new run from these weights (train/weights.py)
            from mptkit.train.weights import load_weights

            load_weights(self.model, cfg.load_path, ignore=cfg.load_ignore_keys, strict=cfg.load_strict_model_weights,
                         sharded=self.fsdp is not None)
            self.loaded_weights_from = cfg.load_path
        elif ck is None and cfg.load_path:
            if Path(cfg.load_path).is_file():
                raise CheckpointError(f"load_path {cfg.load_path} is a file (a Composer checkpoint?): a run continues "
                                      "only from mptkit's checkpoint folders; start a new run from its weights with "
                                      "load_weights_only: true (or convert it: mptkit convert composer)")
            ck = ckpt_mod.find_latest_checkpoint(cfg.load_path)
            if ck is None:
                raise CheckpointError(f"load_path {cfg.load_path}: no valid checkpoint there")
        barrier(self.dist)
        if ck is not None:
            self.load_checkpoint(ck)
            if self.dist.is_main:  # the steps after the checkpoint are trained (and logged) again: one line each
                with write_errors(self.run_folder / "metrics.jsonl", TrainError, _METRICS):
                    n = drop_records_after(self.run_folder / "metrics.jsonl", self.step, keep=self._kept_event)
                if n:
                    log.info("metrics.jsonl: dropped %d line(s) logged after step %d by the interrupted attempt", n,
                             self.step)
        elif self.dist.is_main and self.run_folder.joinpath("metrics.jsonl").exists():
            with write_errors(self.run_folder / "metrics.jsonl", TrainError, _METRICS):
                self.run_folder.joinpath("metrics.jsonl").unlink()  # a fresh run: start the log afresh

    def load_checkpoint(self, ck: Path, st: dict | None = None) -> None:
        """Restore the run from checkpoint ``ck`` (train/state.py): weights, optimizer, scaler, counters, data
        position, RNG streams, the recovery's record and the loss monitor. ``st``: its trainer state, if read."""
        # FSDP: every rank maps the full (unsharded) optimizer state and copies out only its shards
        if st is None:
            st = ckpt_mod.load_trainer_state(ck, mmap=self.fsdp is not None)
        if st.get("weights_only"):
            raise CheckpointError(f"{ck} holds weights only (save_weights_only: true): a run cannot continue from "
                                  "it; start a new run from its weights with load_path and load_weights_only: true")
        opt_changed = self._check_resume(ck, st)  # refuses another data stream; names optimizer changes
        recipe_hp = state_mod.recipe_hparams(self.optimizer)
        state_mod.load_weights_and_optimizer(ck, st, self.model, self.optimizer, device=self.device,
                                             sharded=self.fsdp is not None)
        if opt_changed:  # load_state_dict restored the checkpoint's hyperparameters: the recipe's apply
            state_mod.apply_recipe_hparams(self.optimizer, recipe_hp)
        if self.scaler is not None and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        data = self._data_position(st)
        self.step = int(st["step"])
        self.tokens = int(st["tokens"])
        self.target_tokens = int(st.get("target_tokens", 0))
        self.samples = int(st["samples"])
        self.stream.load_state_dict(data)
        if self.auto_microbatch and st.get("microbatch"):
            self.microbatch = min(int(st["microbatch"]), self.per_rank_batch)
        state_mod.restore_rng(st, self.dist, self.device, seed=self.cfg.seed, step=self.step)
        self.recovery.load_state_dict(st.get("recovery") or {})  # the batches to pass over, the events, lr windows
        if st.get("loss_monitor"):  # written before mptkit checkpointed it: the window fills again
            self.spike.load_state_dict(st["loss_monitor"])
        self.resumed_from = ck
        log.info("resumed from %s at step %d (%d tokens)", ck, self.step, self.tokens)

    def _check_resume(self, ck: Path, st: dict) -> bool:
        return state_mod.check_resume(ck, st, data_fingerprint=self.data_fingerprint,
                                      accept_data_change=self.cfg.checkpointing.resume_accept_data_change,
                                      optimizer_now=self._optimizer_config(), is_main=self.dist.is_main)

    def _optimizer_config(self) -> dict:
        """The optimizer's name and hyperparameters as built from the recipe (a checkpoint records them)."""
        return state_mod.optimizer_config(self.optimizer, self.cfg.optimizer.name)

    def _data_position(self, st: dict) -> dict:
        """This rank's data position from a checkpoint written by any number of ranks (train/state.py)."""
        return state_mod.data_position(st, self.dist.rank, self.dist.world_size)

    def trainer_state(self, *, with_optimizer: bool = True) -> dict:
        """Counters, data positions and RNG states of every rank, the optimizer (gathered to full tensors
        under FSDP). Collective under several ranks: every rank calls it; under FSDP only rank 0's copy
        holds the optimizer."""
        opt = (state_mod.full_optimizer_state(self.optimizer, sharded=self.fsdp is not None,
                                              is_main=self.dist.is_main) if with_optimizer else None)
        return state_mod.collect_trainer_state(
            dist=self.dist, device=self.device, stream=self.stream,
            counters={"step": self.step, "tokens": self.tokens, "samples": self.samples,
                      "target_tokens": self.target_tokens},
            optimizer_state=opt, scaler=self.scaler, microbatch=self.microbatch,
            global_batch_size=self.cfg.global_train_batch_size, data_fingerprint=self.data_fingerprint,
            optimizer_settings=self._optimizer_config(),
            extra={"recovery": self.recovery.state_dict(), "loss_monitor": self.spike.state_dict()})

    def _full_model(self, adapter_only: bool = False) -> nn.Module | None:
        """The model with full weights: itself, or under FSDP an unsharded CPU copy on rank 0 (None on the
        other ranks). Collective under FSDP. ``adapter_only``: a LoRA run's copy gathers its adapter alone."""
        return state_mod.full_model(self.model, sharded=self.fsdp is not None, is_main=self.dist.is_main,
                                    adapter_only=adapter_only)

    # ------------------------------------------------------------------ preemption (SIGTERM / SIGINT)
    def _catch_stop_signals(self) -> Callable[[], None]:
        """From here to the end of the loop, SIGTERM / SIGINT ask the run to stop at the next step boundary
        (checkpoint, then :class:`TrainPreempted`); a second one ends the process at once (the signal's default
        action). Returns the function that puts the previous handlers back. Only in the main thread (Python
        delivers signals there); elsewhere signals keep their handlers."""
        import signal
        import threading

        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # the second one: no more waiting
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self._stop_signal = signum
            log.warning("%s: stopping after this step with a checkpoint (send it again to stop at once)",
                        signal.Signals(signum).name)

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)

        def restore() -> None:
            for sig, h in previous.items():
                signal.signal(sig, h)

        return restore

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal (every rank takes part when there are several, so all stop at
        the same step: a scheduler signals the ranks at slightly different times)."""
        flag = 1.0 if getattr(self, "_stop_signal", None) is not None else 0.0
        if self.dist.world_size > 1:
            from mptkit.train.distributed import all_reduce_sum

            dev = self.device if self.device.type == "cuda" else torch.device("cpu")
            flag = float(all_reduce_sum(torch.tensor([flag], device=dev), self.dist).item())
        return flag > 0

    def _stop_for_signal(self, writer) -> None:
        import signal

        name = signal.Signals(self._stop_signal).name if self._stop_signal is not None else "a peer rank's signal"
        saved = None
        if self.save_folder is not None:
            saved = self.save_checkpoint() if self._last_saved != self.step else ckpt_mod.find_latest_checkpoint(
                self.save_folder, checksums=False)
        if self.dist.is_main:
            writer.write({"event": "preempted", "step": self.step, "signal": name,
                          "checkpoint": str(saved) if saved else None, "time": time.time()})
        if saved:
            where = f"checkpoint {saved}; run the same command again to resume from it"
        elif self.save_folder is not None:  # a rank other than 0: rank 0 wrote (and names) the checkpoint
            where = f"checkpoint of step {self.step} saved by rank 0; run the same command again to resume"
        else:
            where = "nothing was saved (no save_folder): a rerun starts over"
        raise TrainPreempted(f"stopped by {name} at step {self.step}/{self.max_steps}: {where}")

    def save_hf_checkpoint(self) -> Path | None:
        """``callbacks.hf_checkpointer``: the model as an HF folder in its precision at
        ``{save_folder}/huggingface/{huggingface_folder_name}`` (llm-foundry's layout), written atomically by rank 0.
        Collective under FSDP (the weights are gathered)."""
        from mptkit.train.sections import HF_PRECISIONS
        from mptkit.utils.fs import atomic_dir

        hfc = self.cfg.callbacks.hf_checkpointer
        name = hfc.folder_name(batch=self.step, epoch=self.stream.epoch, sample=self.samples, token=self.tokens,
                               run_name=self.run_name, rank=0, local_rank=0, world_size=self.dist.world_size,
                               node_rank=0)
        dest = Path(hfc.save_folder.format(run_name=self.run_name)) / "huggingface" / name
        model = self._full_model()  # collective under FSDP
        self._last_hf = self.step
        if self.dist.is_main:
            if dest.exists() and not hfc.overwrite:
                raise TrainError(f"callbacks.hf_checkpointer: {dest} exists and overwrite is false")
            self._check_locks()
            dtype = getattr(torch, HF_PRECISIONS[str(hfc.precision)])
            with write_errors(dest, TrainError, _SAVE), atomic_dir(dest) as tmp:
                model.save_pretrained(tmp, tokenizer=self.tokenizer, dtype=dtype)
            log.info("hf_checkpointer: wrote %s (%s)", dest, hfc.precision)
        del model
        barrier(self.dist)
        return dest if self.dist.is_main else None

    # ------------------------------------------------------------------ the step watchdog (train/watchdog.py)
    def _start_watchdog(self) -> None:
        if not self.cfg.watchdog.enabled:
            return
        self.watchdog = _wd.StepWatchdog(self.cfg.watchdog, rank=self.dist.rank, run_folder=self.run_folder)
        self.watchdog.start(self.step)

    def _watchdog_phase(self, name: str, progress=None):
        import contextlib

        return self.watchdog.phase(name, progress) if self.watchdog is not None else contextlib.nullcontext()

    def _report_earlier_failures(self, writer: MetricsWriter) -> None:
        """Rank 0 at the start of an attempt: the watchdog events and injected faults of earlier attempts, as
        ``watchdog`` / ``fault`` events in metrics.jsonl (``at_step``: kept by a later resume) and warnings."""
        from mptkit.train import faults as faults_mod

        for path, rec in _wd.unreported_failures(self.run_folder):
            rec = {k: v for k, v in rec.items() if k != "step"}
            at = _wd_step(path)
            writer.write({**rec, "at_step": at, "reported_by_attempt": _wd.attempt()})
            log.warning("an earlier attempt was stopped by the step watchdog: rank %s, %s after step %s for %.1f s; "
                        "stacks in %s", rec.get("rank"), rec.get("phase"), at, rec.get("idle_s", 0), rec.get("stacks"))
            _wd.mark_reported(path)
        for rec in faults_mod.unreported_faults(self.run_folder):
            writer.write({"event": "fault", **{k: v for k, v in rec.items() if k != "step"}, "at_step": rec["step"],
                          "reported_by_attempt": _wd.attempt()})
            log.warning("an earlier attempt had an injected fault: %s", rec["fault"])
            faults_mod.mark_reported(self.run_folder, rec)

    def _recoveries(self) -> dict:
        """For summary.json: the watchdog events and injected faults this run folder has seen."""
        from mptkit.train import faults as faults_mod

        events = []
        folder = self.run_folder / _wd.FAILURES_DIR
        for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                events.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue
        return {"watchdog": sorted(events, key=lambda r: r.get("time", 0)),
                "faults": faults_mod.fired_faults(self.run_folder)}

    def save_checkpoint(self) -> Path | None:
        if self.save_folder is None:
            return None
        folder = self.save_folder
        with self._watchdog_phase("checkpoint", progress=lambda: _wd.folder_bytes(folder)):
            return self._save_checkpoint()

    def _save_checkpoint(self) -> Path | None:
        self._assert_lock_held()  # another run took the folder over: write nothing more
        if not (self.dist.is_main and not (self.fsdp is not None and self.fsdp.sharded_checkpoints)):
            self.faults.during_checkpoint(self.step)  # MPTKIT_FAULTS ckpt_* on a rank that writes no files
        if self.fsdp is not None and self.fsdp.sharded_checkpoints:
            return self._save_sharded_checkpoint()
        weights_only = self.cfg.save_weights_only
        state = self.trainer_state(with_optimizer=not weights_only)  # collective under DDP / FSDP
        if weights_only:
            state["weights_only"] = True
        model = self._full_model(adapter_only=True)  # collective under FSDP (LoRA: the adapter alone)
        path = None
        if self.dist.is_main:
            with write_errors(self.save_folder, TrainError, _SAVE):  # a full disk: one line naming save_folder
                path = ckpt_mod.save_checkpoint(
                    self.save_folder, model=model, trainer_state=state, epoch=self.stream.epoch, step=self.step,
                    tokenizer=self.tokenizer, run_config=self.cfg.to_dict(),
                    during_write=lambda: self.faults.during_checkpoint(self.step))
                ckpt_mod.prune_checkpoints(self.save_folder, self.cfg.save_num_checkpoints_to_keep)
        del model
        barrier(self.dist)
        self._last_saved = self.step
        return path

    def _save_sharded_checkpoint(self) -> Path | None:
        from mptkit.train import fsdp as F
        from mptkit.train.distributed import broadcast_object, gather_object

        state = self.trainer_state(with_optimizer=False)
        with write_errors(self.save_folder, TrainError, _SAVE):  # on every rank: each writes its shard
            path = ckpt_mod.save_sharded_checkpoint(
                self.save_folder, write_shards=lambda folder: F.dcp_save(self.model, self.optimizer, folder),
                broadcast=lambda obj: broadcast_object(obj, self.dist),
                gather=lambda obj: gather_object(obj, self.dist), rank=self.dist.rank,
                model_config=self.model.config, trainer_state=state, epoch=self.stream.epoch, step=self.step,
                tokenizer=self.tokenizer, run_config=self.cfg.to_dict())
            if self.dist.is_main:
                ckpt_mod.prune_checkpoints(self.save_folder, self.cfg.save_num_checkpoints_to_keep)
        barrier(self.dist)
        self._last_saved = self.step
        return path

    # ------------------------------------------------------------------------------ recovery (train/recovery.py)
    def _lr_multiplier(self, step: int) -> float:
        """The schedule's lr multiplier at 0-based ``step``, lowered in the windows after a recovery."""
        return self.schedule(step) * self.recovery.lr_scale(step)

    def _judge(self, loss: float, gnorm: float) -> tuple:
        """(trigger or None, action or None, event or None, what the loss monitor records) of the step being
        run (number ``self.step + 1``): a NaN / inf loss or gradient norm on any rank, else a kill_loss_spike
        event. Every rank judges alike (the loss is all-reduced, and so is the non-finite flag)."""
        step = self.step + 1
        loss = self.faults.loss(step, loss)  # MPTKIT_FAULTS nan: judged as a real NaN would be
        if rec_mod.nonfinite(loss, gnorm, check_grad=self.scaler is None, dist=self.dist, device=self.device):
            what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", gnorm)
            event = {"event": "nonfinite", "step": step, "message": nonfinite_message(what, value, step)}
            return "nonfinite", self.cfg.recovery.nonfinite, event, None
        event, judged = self.spike.check(step, loss)
        return (event["event"], self.spike_action, event, judged) if event else (None, None, None, judged)

    def _guard(self, loss: float, gnorm: float) -> bool:
        """StepRunner's guard: judge the step before its update; False drops the update (a recovery)."""
        self._verdict = self._judge(loss, gnorm)
        return self._verdict[1] not in rec_mod.ACTING

    def _event(self, verdict: tuple, loss: float, gnorm: float, batch_id, action: str) -> dict:
        ev = {k: v for k, v in verdict[2].items() if k != "message"}
        ev.update({"loss": loss, "grad_norm": gnorm, "batch": list(batch_id) if batch_id else None,
                   "action": action, "time": time.time()})
        return ev

    def _logged_event(self, verdict: tuple, loss: float, gnorm: float, batch_id) -> dict:
        """A kill_loss_spike event under log only (llm-foundry's default): a warning and an event line."""
        log.warning("%s", verdict[2]["message"])
        return self.recovery.add_event(self._event(verdict, loss, gnorm, batch_id, "log"))

    def _kept_event(self, rec: dict) -> bool:
        """Whether a metrics.jsonl record past a resume or rollback step stays: a recovery event of the history."""
        return rec.get("event") in rec_mod.TRIGGERS and rec.get("id") in self.recovery.event_ids()

    def _recover(self, writer: MetricsWriter, verdict: tuple, loss: float, gnorm: float, batch_id) -> None:
        """The recovery action of a judged step whose update was dropped: stop, skip or rollback."""
        action, msg = verdict[1], verdict[2]["message"]
        cfg = self.cfg.recovery
        why = None
        if action == "stop":
            why = "recovery action stop"
        elif self.recovery.count >= cfg.max_recoveries:
            why = f"recovery.max_recoveries ({cfg.max_recoveries}) skips and rollbacks already done"
        if why is not None:
            self._stop_diverged(writer, verdict, loss, gnorm, batch_id, why)
        if action == "skip":
            self.recovery.count += 1
            ev = self._event(verdict, loss, gnorm, batch_id, "skip")
            ev["batches_skipped"] = self.recovery.add_batches([tuple(batch_id)])
            self._lower_lr(ev, self.step)
            log.warning("%s: skipped the batch %s (no update; step %d is trained on the next batch)", msg,
                        list(batch_id), self.step + 1)
            self.recovery.add_event(ev)
        else:
            ev = self._rollback(writer, verdict, loss, gnorm, batch_id)
        writer.write(ev)

    def _stop_diverged(self, writer, verdict, loss, gnorm, batch_id, why: str) -> None:
        ev = self._event(verdict, loss, gnorm, batch_id, "stop")
        ev["reason"] = why
        writer.write(self.recovery.add_event(ev))
        raise TrainDiverged(f"{verdict[2]['message']} ({why}; exit code {TrainDiverged.exit_code}: a rerun from the "
                            "same checkpoint meets it again, so it is not retried)")

    def _lower_lr(self, ev: dict, first: int) -> None:
        """After a recovery: the lr multiplier times recovery.lr_factor for recovery.lr_steps steps from the
        0-based step ``first``."""
        cfg = self.cfg.recovery
        if cfg.lr_factor != 1 and cfg.lr_steps > 0:
            self.recovery.lr_windows.append([first, first + cfg.lr_steps, float(cfg.lr_factor)])
            ev.update({"lr_factor": cfg.lr_factor, "lr_steps": cfg.lr_steps, "lr_from_step": first + 1,
                       "lr_to_step": first + cfg.lr_steps})

    def _rollback(self, writer: MetricsWriter, verdict: tuple, loss: float, gnorm: float, batch_id) -> dict:
        """PaLM's recipe: back to the newest valid checkpoint from before the trouble, the batches since it (up to
        the bad one; the last recovery.skip_batches of them) recorded as skipped, the newer checkpoints moved
        aside, and the checkpoint saved again with that record. Returns the event."""
        from mptkit.train.distributed import broadcast_object

        trigger, _, event, _ = verdict
        step = self.step + 1
        first = rec_mod.first_bad_step(event if trigger != "nonfinite" else None, step, self.spike.window_size)
        ck = rec_mod.rollback_target(self.save_folder, first - 1) if self.dist.is_main else None
        ck = broadcast_object(str(ck) if ck else None, self.dist) if self.dist.enabled else ck
        if ck is None:
            self._stop_diverged(writer, verdict, loss, gnorm, batch_id,
                                f"recovery rollback: no valid checkpoint of step {first - 1} or earlier in "
                                f"{self.save_folder}")
        ck = Path(ck)
        st = ckpt_mod.load_trainer_state(ck, mmap=self.fsdp is not None)
        ck_step = int(st["step"])
        ids = self.stream.batch_ids(self._data_position(st), step - ck_step)  # what steps ck_step+1..step trained
        if ids and tuple(ids[-1]) != tuple(batch_id):
            log.warning("recovery rollback: the replayed data order ends at batch %s, not at the bad batch %s",
                        ids[-1], list(batch_id))
        n = self.cfg.recovery.skip_batches
        chosen = ids if n is None else ids[-n:]
        history = self.recovery.state_dict()
        resumed_from = self.resumed_from
        moved = []
        if self.dist.is_main:
            with write_errors(self.save_folder, TrainError, _SAVE):
                for c in rec_mod.newer_than(self.save_folder, ck_step):  # they hold the updates being undone
                    moved.append(ckpt_mod.move_aside(c, rec_mod.ROLLED_BACK).name)
        barrier(self.dist)
        self.load_checkpoint(ck, st)
        self.resumed_from = resumed_from
        self.recovery.load_state_dict(history)  # the history goes on; the checkpoint's is a part of it
        self.recovery.count += 1
        self.recovery.forget_logged_after(ck_step)
        ev = self._event(verdict, loss, gnorm, batch_id, "rollback")
        ev.update({"rollback_to": ck_step, "checkpoint": str(ck), "batches_skipped": self.recovery.add_batches(chosen),
                   "checkpoints_moved_aside": moved})
        self._lower_lr(ev, ck_step)
        writer.rewind(ck_step, keep=self._kept_event)  # steps ck_step+1.. are trained again: one line each
        log.warning("%s: rolled back to %s (step %d), skipping %d batch(es) %s", verdict[2]["message"], ck.name,
                    ck_step, len(chosen), ev["batches_skipped"])
        self.recovery.add_event(ev)  # in the checkpoint saved now; written to metrics.jsonl by the caller
        self.save_checkpoint()  # the same step, with the record: a restart does not meet the bad batches again
        return ev

    # ------------------------------------------------------------------------------ steps
    def _train_step(self, batch: dict) -> tuple[float, float]:
        """One optimizer step on this rank's share of a global batch (train/step.py); returns (loss, grad_norm)
        and records the step's targets, tokens and width."""
        r = self.step_runner.run(batch, self.step)
        self._step_targets, self._step_tokens, self._step_width = r.targets, r.tokens, r.width
        self._step_applied = r.applied
        if r.optimizer_metrics:
            self._optimizer_metrics = r.optimizer_metrics
        return r.loss, r.grad_norm

    @property
    def microbatch(self) -> int:
        """The current microbatch size (``auto``: lowered when a step ran out of memory)."""
        return self.step_runner.microbatch if self._step_runner is not None else self._microbatch

    @microbatch.setter
    def microbatch(self, mb: int) -> None:
        if self._step_runner is not None:
            self.step_runner.microbatch = mb
        self._microbatch = mb

    @property
    def step_runner(self) -> StepRunner:
        if self._step_runner is None:
            raise TrainError("the trainer is not set up: call setup() (or fit()) first")
        return self._step_runner

    def autocast(self):
        return autocast(self.cfg.precision, self.device)

    # ------------------------------------------------------------------------------ eval
    def evaluate(self) -> dict | None:
        """The eval pass (train/evaluate.py) at the current step; None without eval data."""
        ds = self.eval_dataset
        if ds is None or len(ds) == 0:
            return None
        r = evaluate_loss(self.model, ds, collate=self.collate, loss_fn=self.loss_fn, count_targets=self.count_targets,
                          batch_size=self.cfg.device_eval_batch_size or max(1, self.microbatch),
                          subset_num_batches=self.cfg.eval_subset_num_batches, dist=self.dist, device=self.device,
                          autocast=self.autocast, vocab_size=self.stream.vocab_size, sharded=self.fsdp is not None)
        if r is None:
            return None
        rec = {"step": self.step, **r}
        self.last_eval = rec
        return rec

    # ------------------------------------------------------------------------------ fit
    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            if getattr(self, "_sinks", None) is not None:
                self._sinks.close(ok=False)  # a failed run's mlflow / wandb runs end as failed (no-op after close)
            self.close()  # the folders' locks: released at the end, and on any error

    def _fit(self) -> dict:
        self.setup()
        cfg = self.cfg
        main = self.dist.is_main
        t_start = time.perf_counter()
        if main:
            self._check_locks()
            self._write_run_config()
        sinks = None
        if main and any(k in (cfg.loggers or {}) for k in ("mlflow", "wandb")):
            from mptkit.train.loggers import LoggerSinks

            sinks = self._sinks = LoggerSinks(cfg.loggers, run_name=self.run_name, run_folder=self.run_folder,
                                              config=json.loads(json.dumps(cfg.to_dict(), default=str))
                                              if cfg.log_config else None)
        writer = MetricsWriter(self.run_folder, enabled=main, guard=self._check_locks, sinks=sinks,
                               tensorboard=(cfg.loggers or {}).get("tensorboard", True) if cfg.loggers is not None else True)
        n_params = sum(p.numel() for p in self.model.parameters())
        gpu_flops = cfg.callbacks.speed_monitor.gpu_flops_available
        peak, peak_src = peak_flops(self.device, cfg.precision, cfg.peak_tflops or (gpu_flops and gpu_flops / 1e12))
        if main:
            log.info("run %s: %s params, %d steps of %d samples x %d tokens (%s), microbatch %s%s, %d rank(s), "
                     "device %s, precision %s", self.run_name, f"{n_params:,}", self.max_steps,
                     cfg.global_train_batch_size, self.seq_len, cfg.duration, self.microbatch,
                     " (auto)" if self.auto_microbatch else "", self.dist.world_size, self.device, cfg.precision)
            log.info("MFU is measured against the %s per device", peak_src)
            writer.write({"event": "start", "run_name": self.run_name, "params": n_params, "max_steps": self.max_steps,
                          "peak_flops": peak, "peak_source": peak_src, "world_size": self.dist.world_size,
                          "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                          "start_step": self.step, "attempt": _wd.attempt(),
                          "params_per_rank": getattr(self, "fsdp_local_params", n_params),
                          **({"metadata": cfg.metadata} if cfg.metadata else {})})
        bar = None
        if main and cfg.progress_bar and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc=self.run_name, unit="ba", dynamic_ncols=True)
        elif main and cfg.progress_bar and cfg.log_to_console:
            log.info("stderr is not a terminal: logging progress every %d steps instead of a progress bar",
                     self.log_every)
        tput = Throughput(window=int(cfg.callbacks.speed_monitor.window_size))
        self._last_saved = self.step if self.resumed_from is not None else -1
        self.model.train()
        if self.scheduled_gc is not None:
            self.scheduled_gc.fit_start()
        if (self.save_folder is not None and self.step == 0 and self.resumed_from is None
                and "rollback" in self.cfg.recovery.actions(self.cfg.callbacks.kill_loss_spike.log_only)):
            self.save_checkpoint()  # a rollback before the first periodic checkpoint goes back to the start
        restore_signals = self._catch_stop_signals()
        if main:
            self._report_earlier_failures(writer)
        self._start_watchdog()
        try:
            if cfg.eval_first and self.step == 0:
                self._log_eval(writer)
            while self.step < self.max_steps:
                if self.scheduled_gc is not None:
                    self.scheduled_gc.before_batch(self.step)
                t0 = time.perf_counter()
                batch = self.stream.next_batch()
                batch_id = self.stream.last_batch
                self._verdict = None
                self.faults.mid_step(self.step + 1)  # MPTKIT_FAULTS kill / hang / error (tests and drills)
                loss, gnorm = self._train_step(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                # judged before the update when a recovery may drop it (StepRunner.guard), else now
                verdict = self._verdict if self._verdict is not None else self._judge(loss, gnorm)
                if verdict[1] in rec_mod.ACTING:  # stop raises; skip and rollback train other batches instead
                    self._recover(writer, verdict, loss, gnorm, batch_id)
                    self._optimizer_metrics = {}
                    if self.watchdog is not None:  # a recovery is progress too
                        self.watchdog.step_done(self.step, dt)
                    if self.step < self.max_steps and self._stop_requested():
                        self._stop_for_signal(writer)
                    continue
                lr = self.optimizer.param_groups[0]["lr"]
                self.step += 1
                self.samples += self.cfg.global_train_batch_size
                self.tokens += self._step_tokens
                self.target_tokens += self._step_targets
                tput.add(dt, self._step_tokens, self._flops_per_batch(self._step_width))
                if self.watchdog is not None:
                    self.watchdog.step_done(self.step, dt)
                self.spike.update(loss, verdict[3])
                spike = self._logged_event(verdict, loss, gnorm, batch_id) if verdict[2] is not None else None
                optimizer_metrics, self._optimizer_metrics = self._optimizer_metrics, {}
                if main:
                    rec = {"step": self.step, "epoch": self.stream.epoch, "train_loss": loss, "lr": lr,
                           "grad_norm": gnorm, "tokens": self.tokens, "target_tokens": self.target_tokens,
                           "samples": self.samples,
                           "step_s": dt, "tokens_per_s": tput.tokens_per_s,
                           "mfu": tput.flops_per_s / (peak * self.dist.world_size),
                           "microbatch": self.microbatch, "time": time.time(), **memory_stats(self.device),
                           **optimizer_metrics, **self.stream.mixture_metrics()}
                    writer.write(rec)
                    if spike is not None:
                        writer.write(spike)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tput.tokens_per_s:,.0f}",
                                        mfu=f"{100 * rec['mfu']:.1f}%", refresh=False)
                        bar.update(1)
                    elif cfg.log_to_console and self.step % self.log_every == 0:
                        remaining = (self.max_steps - self.step) * tput.step_s
                        log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3f %.0f tok/s MFU %.1f%% ETA %s",
                                 self.step, self.max_steps, loss, lr, gnorm, tput.tokens_per_s, 100 * rec["mfu"],
                                 _fmt_s(remaining))
                if self.eval_every and self.step % self.eval_every == 0 and self.step < self.max_steps:
                    self._log_eval(writer, bar)
                if self.save_every and self.step % self.save_every == 0 and self.step < self.max_steps:
                    self.save_checkpoint()
                if self.hf_every and self.step % self.hf_every == 0 and self.step < self.max_steps:
                    self.save_hf_checkpoint()
                if self.step < self.max_steps and self._stop_requested():
                    self._stop_for_signal(writer)
            # the end: final eval, checkpoint, export, sample
            final_eval = (self._log_eval(writer, bar)
                          if self.eval_dataset is not None or self.cfg._icl_tasks else None)
            if self.save_folder is not None and self._last_saved != self.step:
                self.save_checkpoint()
            if self.hf_every and self._last_hf != self.step:  # llm-foundry's: also at the end of training
                self.save_hf_checkpoint()
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
                self.watchdog = None
            restore_signals()
            if bar is not None:
                bar.close()
            if self.scheduled_gc is not None:
                self.scheduled_gc.fit_end()  # the interpreter's gc setting back, also when the run failed
        wall = time.perf_counter() - t_start
        summary = {"run_name": self.run_name, "run_folder": str(self.run_folder), "steps": self.step,
                   "tokens": self.tokens, "target_tokens": self.target_tokens, "train_wall_s": wall,
                   "eval_loss": final_eval["eval_loss"] if final_eval else None,
                   "eval_perplexity": final_eval["eval_perplexity"] if final_eval else None,
                   "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                   "last_checkpoint": None, "export_folder": None, "sample": None,
                   "recovery": self.recovery.events, "batches_skipped": self.recovery.batches_skipped,
                   "recoveries": self._recoveries()}
        if self.stream.mixture_counts is not None:  # a data mixture: what each stream gave, beside what was asked
            summary["mixture"] = self.stream.mixture_report()
        if self.save_folder is not None and main:
            last = ckpt_mod.find_latest_checkpoint(self.save_folder, checksums=False)
            summary["last_checkpoint"] = str(last) if last else None
        full = self.model
        want_sample = bool(cfg.sample_prompt) and self.tokenizer is not None and self.sample_fn is not None
        if self.fsdp is not None and (cfg.export_folder or want_sample):
            # collective: every rank takes part; rank 0 gets the unsharded weights (LoRA, no sample: the adapter)
            full = self._full_model(adapter_only=not want_sample)
        if main and cfg.export_folder:
            out = Path(cfg.export_folder.format(run_name=self.run_name))
            self._check_locks()  # the run folder is another run's now: no export in its name
            self.export(out, model=full)
            summary["export_folder"] = str(out)
        if main and want_sample:
            summary["sample"] = self._sample(full)
        del full
        if main:
            writer.write({"event": "end", **summary})
            from mptkit.utils.fs import atomic_write_json

            with write_errors(self.run_folder / "summary.json", TrainError, _RUN):
                atomic_write_json(self.run_folder / "summary.json", summary)
        writer.close()
        barrier(self.dist)
        if self.dist.initialized_here and self.train_model is not self.model:
            # drop DDP's reducer (it holds the process group and gloo work objects) while the interpreter is
            # fully alive: left to interpreter teardown, gloo's threads can abort the process at exit
            import gc as _gc

            self.train_model = self.step_runner.train_model = self.model
            _gc.collect()
        shutdown(self.dist)
        return summary

    def evaluate_icl(self) -> dict | None:
        """The recipe's ``icl_tasks`` (and ``eval_gauntlet``) on the model at the current step, the records split
        over the ranks and gathered (mptkit.eval.distributed): ``{"step", "metrics/{label}/{k}-shot/{metric}":
        value, ..., "icl/metrics/eval_gauntlet/{category}": score, "icl_s"}`` (llm-foundry's names); None
        without icl_tasks."""
        tasks = self.cfg._icl_tasks
        if not tasks:
            return None
        from mptkit.eval.icl_tasks import evaluate_icl_tasks

        if self.fsdp is not None:
            raise TrainError("icl_tasks with fsdp_config: ICL evaluation of a sharded model is not supported; "
                             "run `mptkit eval icl --config` on the checkpoints instead")
        if self.tokenizer is None:
            raise TrainError("icl_tasks need the run's tokenizer (set tokenizer: in the recipe)")
        was_training = self.model.training
        self.model.eval()
        t0 = time.perf_counter()
        try:
            with self.autocast():
                results = evaluate_icl_tasks(self.model, self.tokenizer, tasks,
                                             batch_size=self.cfg.device_eval_batch_size or max(1, self.microbatch))
        finally:
            if was_training:
                self.model.train()
        rec: dict = {"step": self.step}
        for r in results:
            rec.update(r.logger_keys())
        if self.cfg._gauntlet is not None:
            from mptkit.eval.gauntlet import aggregate

            rec.update(aggregate(self.cfg._gauntlet, results).scores())
        rec["icl_s"] = time.perf_counter() - t0
        return rec

    def _log_eval(self, writer: MetricsWriter, bar=None) -> dict | None:
        if self.scheduled_gc is not None:
            self.scheduled_gc.eval_start()
        try:
            with self._watchdog_phase("eval"):
                rec = self.evaluate()
                icl = self.evaluate_icl()
        finally:
            if self.scheduled_gc is not None:
                self.scheduled_gc.eval_end()
        if icl is not None and self.dist.is_main:
            writer.write(icl)
            msg = f"ICL at step {icl['step']}: " + ", ".join(
                f"{k.removeprefix('metrics/')} {v:.4f}" for k, v in icl.items() if k not in ("step", "icl_s"))
            if bar is not None:
                bar.write(msg)
            log.info(msg)
        if rec is None or not self.dist.is_main:
            return rec
        writer.write(rec)
        msg = (f"eval at step {rec['step']}: loss {rec['eval_loss']:.4f}, perplexity {rec['eval_perplexity']:.2f} "
               f"({rec['eval_tokens']:,} tokens, {rec['eval_s']:.1f} s)")
        if bar is not None:
            bar.write(msg)
        log.info(msg)
        return rec

    def _flops_per_batch(self, width: int | None = None) -> float:
        """Training FLOPs of a global batch whose samples are ``width`` positions long (default: the data's
        sequence length; padding is computed, so it counts here, unlike in ``tokens``)."""
        width = width or self.seq_len
        got = self._flops_memo.get(width)
        if got is None:  # once per width (pad trimming gives a few): counting parameters walks the model
            m = self.model
            gb = self.cfg.global_train_batch_size
            if hasattr(m, "flops_per_batch"):
                got = float(m.flops_per_batch(gb, width))
            else:
                got = 6.0 * sum(p.numel() for p in m.parameters()) * gb * width
            self._flops_memo[width] = got
        return got

    def _write_run_config(self) -> None:
        import yaml

        from mptkit.utils.fs import atomic_write_text

        d = self.cfg.to_dict()
        d["run_name"] = self.run_name
        text = "# The validated configuration of this run (written by mptkit train).\n" + yaml.safe_dump(
            json.loads(json.dumps(d, default=str)), sort_keys=False)
        with write_errors(self.run_folder / "config.yaml", TrainError, _RUN):
            atomic_write_text(self.run_folder / "config.yaml", text)

    # ------------------------------------------------------------------------------ outputs
    def _sample(self, model: nn.Module) -> str:
        """The end-of-run sample from the recipe's ``sample_*`` keys, by ``sample_fn`` (the model in eval mode)."""
        was = model.training
        model.eval()
        try:
            return self.sample_fn(model, self.tokenizer, self.cfg)
        finally:
            model.train(was)

    def export(self, out: str | os.PathLike, model: nn.Module | None = None) -> Path:
        """Write the current model (or ``model``) as an HF folder (config.json + safetensors + tokenizer).
        Under FSDP pass the unsharded model (``_full_model()``, which every rank must call)."""
        from mptkit.utils.fs import atomic_dir

        out = Path(out)
        model = self.model if model is None else model
        with write_errors(out, TrainError, _EXPORT), atomic_dir(out) as tmp:  # a full disk: one line naming it
            from mptkit.model.lora import has_lora

            if has_lora(model):  # a LoRA run exports its adapter (peft's files); `mptkit export hf --merge` folds it in
                from mptkit.io.adapter import save_adapter

                save_adapter(model, tmp, tokenizer=self.tokenizer)
            else:
                model.save_pretrained(tmp, tokenizer=self.tokenizer)
        log.info("exported the model to %s", out)
        return out


def _wd_step(path: Path) -> int | None:
    """The step in a failure record's name (``rank0-attempt1-step5.json``)."""
    import re

    m = re.search(r"-step(\d+)", path.name)
    return int(m.group(1)) if m else None


# How a failed write (disk full, permissions, ...) names what it was writing: "{doing} {path}: {reason}".
_SAVE = "cannot write the checkpoints (save_folder)"
_METRICS = "cannot write the metrics (run_folder)"
_RUN = "cannot write the run's files (run_folder)"
_EXPORT = "cannot write the export (export_folder)"


def _cuda_environment(cfg: RunConfig) -> None:
    """llm-foundry's CUDA keys: the caching allocator's settings (PYTORCH_CUDA_ALLOC_CONF) and lazy module
    loading (CUDA_MODULE_LOADING), which only apply before CUDA starts in this process."""
    conf = []
    if cfg.max_split_size_mb is not None:
        conf.append(f"max_split_size_mb:{int(cfg.max_split_size_mb)}")
    if cfg.expandable_segments is not None:
        conf.append(f"expandable_segments:{cfg.expandable_segments}")
    if not conf and not cfg.cuda_load_lazy:
        return
    if torch.cuda.is_initialized():
        log.warning("max_split_size_mb / expandable_segments / cuda_load_lazy: CUDA already started in this process; "
                    "they apply to the next run (set them before anything uses the GPU)")
        return
    if conf:
        old = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(([old] if old else []) + conf)
    if cfg.cuda_load_lazy:
        os.environ["CUDA_MODULE_LOADING"] = "LAZY"


def _fmt_s(s: float) -> str:
    s = int(s)
    h, r = divmod(s, 3600)
    m, sec = divmod(r, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
