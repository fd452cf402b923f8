"""The training loop: one loop for pretraining and finetuning, single process or torchrun (DDP, or FSDP2
sharding with ``fsdp_config``; see :mod:`mptkit.train.fsdp`).

    from mptkit.train import Trainer, load_run_config
    cfg = load_run_config("configs/pretrain/quickstart.yaml", ["max_duration=20ba"])
    summary = Trainer(cfg).fit()

Pluggable parts: pass ``model=``, ``tokenizer=``, ``train_dataset=`` / ``eval_dataset=`` (map-style
datasets of dicts of LongTensors, see :mod:`mptkit.train.data`), ``collate=`` and ``loss_fn=``
(``loss_fn(model, microbatch) -> mean loss over the microbatch's targets``; targets are counted by
``count_targets(microbatch)`` so that gradient accumulation weights microbatches by their targets).

Everything that can be checked is checked before the first step (data folder, tokenizer fingerprint,
vocabulary, batch arithmetic, a writable save folder, precision vs device); see :meth:`Trainer.setup`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mptkit.errors import CheckpointError, ConfigError, DataError, TrainError
from mptkit.train import checkpoint as ckpt_mod
from mptkit.train.callbacks import build_callbacks
from mptkit.train.config import Duration, RunConfig, parse_duration
from mptkit.train.data import (
    BatchStream,
    check_token_ids,
    data_fingerprint,
    default_collate,
    fingerprint_changes,
    make_sampler,
)
from mptkit.train.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from mptkit.train.metrics import (
    LossSpikeMonitor,
    MetricsWriter,
    Throughput,
    drop_records_after,
    memory_stats,
    peak_flops,
)
from mptkit.train.optim import build_optimizer, set_lr
from mptkit.train.schedule import build_schedule
from mptkit.utils.outputs import check_output, check_writable, write_errors

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- loss


def count_targets(mb: dict) -> int:
    """Positions that carry a next-token loss: labels[:, 1:] != -100 (labels default to input_ids)."""
    labels = mb.get("labels")
    if labels is None:
        ids = mb["input_ids"]
        return ids.shape[0] * (ids.shape[1] - 1)
    return int((labels[:, 1:] != -100).sum())


def count_tokens(mb: dict) -> int:
    """Tokens a microbatch holds, as llm-foundry counts them for ``tok`` durations and tokens/s: the samples'
    real (non-padding) lengths when the batch says (``num_tokens``, finetuning data), else every position."""
    n = mb.get("num_tokens")
    if n is not None:
        return int(n.sum())
    ids = mb["input_ids"]
    return ids.shape[0] * ids.shape[1]


def causal_lm_loss(model: nn.Module, mb: dict) -> torch.Tensor:
    """Mean next-token cross-entropy of a microbatch (labels = input_ids unless the batch has labels)."""
    labels = mb.get("labels", mb["input_ids"])
    kw = {}
    if mb.get("sequence_id") is not None:
        kw["sequence_id"] = mb["sequence_id"]
    if mb.get("attention_mask") is not None:
        kw["attention_mask"] = mb["attention_mask"]
    if _accepts_return_logits(model):
        kw["return_logits"] = False  # fused, chunked LM-head loss: the (B, T, V) logits are never held
    return model(mb["input_ids"], labels=labels, **kw).loss


_RL_CACHE: dict[type, bool] = {}


def _accepts_return_logits(model: nn.Module) -> bool:
    m = model.module if hasattr(model, "module") else model
    t = type(m)
    if t not in _RL_CACHE:
        try:
            _RL_CACHE[t] = "return_logits" in inspect.signature(m.forward).parameters
        except (TypeError, ValueError):
            _RL_CACHE[t] = False
    return _RL_CACHE[t]


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


# ----------------------------------------------------------------------------------- RNG


def get_rng_state(device: torch.device) -> dict:
    import numpy as np

    st = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"name": st[0], "keys": torch.from_numpy(st[1].astype("int64")), "pos": int(st[2]),
                  "has_gauss": int(st[3]), "cached_gaussian": float(st[4])},
        "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
    }


def set_rng_state(st: dict, device: torch.device) -> None:
    import numpy as np

    torch.set_rng_state(st["torch"])
    if st.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], device)
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    ):
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.collate = collate
        self.loss_fn = loss_fn
        self.count_targets = count_targets_fn
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
        self._locks: list = []  # RunLocks on the run and save folders (rank 0)
        self._created_dirs: list[Path] = []  # folders set-up created (removed again, if empty, when it fails)

    # ------------------------------------------------------------------------------ set-up
    def setup(self) -> Trainer:
        """Build and validate everything; raises a clear error before any training step (and then leaves no
        lock and no folder it created empty behind)."""
        if self._setup_done:
            return self
        try:
            return self._setup()
        except BaseException:
            self._abandon_setup()
            raise

    def _setup(self) -> Trainer:
        cfg = self.cfg
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
        ld = (cfg.train_loader or {}).get("dataset", {}) if cfg.train_loader else {}
        shuffle_seed = ld.get("shuffle_seed", cfg.seed)
        sampler = make_sampler(len(self.train_dataset), seed=int(shuffle_seed), shuffle=bool(ld.get("shuffle", True)),
                               rank=self.dist.rank, world_size=world, drop_last=True)
        self.stream = BatchStream(self.train_dataset, sampler, self.per_rank_batch, self.collate,
                                  vocab_size=getattr(getattr(self.model, "config", None), "vocab_size", None))
        # what exact resumption depends on: stored in every checkpoint, compared on resume
        self.data_fingerprint = data_fingerprint(self.train_dataset, shuffle=bool(ld.get("shuffle", True)),
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
        self.log_every = max(1, self._interval(cfg.console_log_interval, "console_log_interval", int_unit="ba"))
        # optimizer + schedule
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.schedule = build_schedule(cfg.scheduler, max_steps=self.max_steps, to_batches=self._to_batches)
        gc = cfg.algorithms.get("gradient_clipping") if cfg.algorithms else None
        self.clip = float(gc.get("clipping_threshold", 1.0)) if gc else None
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "amp_fp16" else None
        # callbacks: the loss-spike monitor always runs (llm-foundry's defaults: log only, unless configured);
        # scheduled_gc and optimizer_monitor only when the recipe names them (train/callbacks.py)
        spike_cfg = (cfg.callbacks or {}).get("kill_loss_spike")
        self.spike = LossSpikeMonitor(**(spike_cfg if isinstance(spike_cfg, dict) else {}), total_steps=self.max_steps)
        self.scheduled_gc, self.optimizer_monitor = build_callbacks(cfg.callbacks)
        self._optimizer_metrics: dict = {}
        # DDP (FSDP: the sharded model is its own training module)
        self.train_model: nn.Module = self.model
        if self.dist.enabled and self.fsdp is None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # resume
        self._maybe_resume()
        # rank-specific RNG stream after init (dropout differs across ranks), unless restored
        if self.resumed_from is None and self.dist.enabled:
            torch.manual_seed(cfg.seed + self.dist.rank)
        self._setup_done = True
        return self

    # ------------------------------------------------------------------------------ folders and their locks
    def _take_folders(self) -> None:
        """Rank 0 creates the run and save folders and takes each one's lock (:class:`mptkit.train.lock.RunLock`)
        before anything is written there; a folder another run holds is a TrainError naming the holder. The
        other ranks of this job wait for the outcome and raise the same error."""
        from mptkit.train.distributed import broadcast_object
        from mptkit.train.lock import RunLock

        err: BaseException | None = None
        if self.dist.is_main:
            folders = [self.run_folder] + ([self.save_folder] if self.save_folder is not None else [])
            for f in folders:
                self._created_dirs += _missing_dirs(f)
            try:
                for f, key in zip(folders, ("run_folder", "save_folder")):
                    try:  # made here (RunLock would), so that a file in the way is named as such
                        f.mkdir(parents=True, exist_ok=True)
                    except OSError as e:
                        raise TrainError(f"{key} {f} is not writable ({e.strerror or e}); choose another {key}") from None
                    check_writable(f, key, TrainError)
                for f in dict.fromkeys(p.resolve() for p in folders):
                    self._locks.append(RunLock(f).acquire())
            except Exception as e:  # noqa: BLE001 - any failure is broadcast first, or the other ranks would wait
                err = e
        msg = broadcast_object(None if err is None else str(err), self.dist)
        if err is not None:
            raise err
        if msg is not None:
            raise TrainError(f"rank 0 could not take the run's folders: {msg}")

    def _assert_lock_held(self) -> None:
        """Before writing a checkpoint: every rank raises if rank 0's lock was taken over (collective)."""
        from mptkit.train.distributed import broadcast_object

        lost = next((lk for lk in self._locks if lk.lost), None)
        msg = broadcast_object(lost.lost if lost is not None else None, self.dist)
        if lost is not None:
            lost.check()
        if msg is not None:
            raise TrainError(f"rank 0 lost the lock on the run's folder ({msg}); stopping without writing")

    def _check_locks(self) -> None:
        """Rank 0, before each metrics line and the export: raise :class:`TrainError` naming the lock and its
        new holder if another run took one of the folders over (``lost`` is set by the heartbeat thread: a
        plain attribute read, free). The other ranks stop when rank 0 exits (torchrun ends the job)."""
        for lk in self._locks:
            lk.check()

    def close(self) -> None:
        """Release the folders' locks (``fit`` does it at its end, or on an error)."""
        for lk in self._locks:
            lk.release()
        self._locks = []

    def _abandon_setup(self) -> None:
        self.close()
        for d in reversed(self._created_dirs):  # deepest first; only what is still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        self._created_dirs = []

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

    def _activation_offload(self):
        """fsdp_config.activation_cpu_offload: keep the activations saved for backward in pinned CPU memory."""
        if self.fsdp is None or not self.fsdp.activation_cpu_offload or self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=True)

    def autocast(self):
        p = self.cfg.precision
        if p == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if p == "amp_bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

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
                            samples_per_batch=self.cfg.global_train_batch_size)

    def _interval(self, v, key: str, int_unit: str) -> int:
        d = parse_duration(v, key, int_unit=int_unit)
        n = self._to_batches(d)
        return n  # 0 = never

    # ------------------------------------------------------------------------------ resume
    def _maybe_resume(self) -> None:
        cfg = self.cfg
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
        if ck is None and cfg.load_path:
            ck = ckpt_mod.find_latest_checkpoint(cfg.load_path)
            if ck is None:
                raise CheckpointError(f"load_path {cfg.load_path}: no valid checkpoint there")
        barrier(self.dist)
        if ck is not None:
            self.load_checkpoint(ck)
            if self.dist.is_main:  # the steps after the checkpoint are trained (and logged) again: one line each
                with write_errors(self.run_folder / "metrics.jsonl", TrainError, _METRICS):
                    n = drop_records_after(self.run_folder / "metrics.jsonl", self.step)
                if n:
                    log.info("metrics.jsonl: dropped %d line(s) logged after step %d by the interrupted attempt", n,
                             self.step)
        elif self.dist.is_main and self.run_folder.joinpath("metrics.jsonl").exists():
            with write_errors(self.run_folder / "metrics.jsonl", TrainError, _METRICS):
                self.run_folder.joinpath("metrics.jsonl").unlink()  # a fresh run: start the log afresh

    def load_checkpoint(self, ck: Path) -> None:
        from safetensors.torch import load_file

        # FSDP: every rank maps the full (unsharded) optimizer state and copies out only its shards
        st = ckpt_mod.load_trainer_state(ck, mmap=self.fsdp is not None)
        opt_changed = self._check_resume(ck, st)  # refuses another data stream; names optimizer changes
        recipe_hp = [{k: g[k] for k in _OPT_HPARAMS if k in g} for g in self.optimizer.param_groups]
        if ckpt_mod.is_sharded(ck):
            # torch.distributed.checkpoint: loads into a sharded or an unsharded model, any world size
            from mptkit.train import fsdp as F

            try:
                F.dcp_load(self.model, self.optimizer, ck / ckpt_mod.SHARDED_DIR)
            except CheckpointError:
                raise  # already names the file and the reason (e.g. a refused metadata pickle)
            except Exception as e:  # noqa: BLE001 - DCP raises many types (CheckpointException, RuntimeError...)
                raise CheckpointError(f"{ck}: the sharded checkpoint does not load into the recipe's model and "
                                      f"optimizer ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
        elif self.fsdp is not None:
            self._load_full_into_shards(ck, st)
        else:
            wfile = ck / ckpt_mod.MODEL_DIR / "model.safetensors"
            if wfile.exists():
                sd = load_file(str(wfile), device=str(self.device))
            else:
                from mptkit.io.hf_folder import iter_checkpoint_tensors

                sd = dict(iter_checkpoint_tensors(ck / ckpt_mod.MODEL_DIR))
            try:
                self.model.load_state_dict(sd, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"{ck}: weights do not match the recipe's model ({str(e).splitlines()[0]}); "
                                      "the recipe's model changed since the checkpoint was written") from None
            try:
                self.optimizer.load_state_dict(st["optimizer"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{ck}: optimizer state does not match ({e}); did optimizer.name change?") \
                    from None
        if opt_changed:  # load_state_dict restored the checkpoint's hyperparameters: the recipe's apply
            for g, hp in zip(self.optimizer.param_groups, recipe_hp):
                g.update(hp)
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
        rngs = st.get("rng")
        if isinstance(rngs, list):
            rngs = rngs[self.dist.rank] if self.dist.rank < len(rngs) else None
        elif self.dist.rank > 0 and int(st.get("world_size", 1)) == 1:
            rngs = None  # a one-process checkpoint: its stream is rank 0's; the new ranks seed their own
        if rngs:
            set_rng_state(rngs, self.device)
        elif self.dist.enabled:
            torch.manual_seed(self.cfg.seed + self.dist.rank + self.step)  # a rank the checkpoint did not have
        self.resumed_from = ck
        log.info("resumed from %s at step %d (%d tokens)", ck, self.step, self.tokens)

    def _check_resume(self, ck: Path, st: dict) -> bool:
        """Before loading ``ck``: refuse (TrainError) a data stream other than the checkpoint's unless
        ``resume_accept_data_change``; warn when the optimizer's settings changed (returns whether they did)."""
        old = st.get("data_fingerprint")
        if not isinstance(old, dict):  # written before fingerprints: only the batch size is known
            old = {"global_train_batch_size": st.get("global_train_batch_size")}
        changes = fingerprint_changes(old, self.data_fingerprint)
        if changes and self.cfg.resume_accept_data_change:
            if self.dist.is_main:
                log.warning("resuming from %s on changed data (%s): resume_accept_data_change=true, so the run "
                            "continues from step %s at the checkpoint's data position, but not as the original run "
                            "would have", ck, "; ".join(changes), st.get("step"))
        elif changes:
            raise TrainError(
                f"resuming from {ck}: the training data stream differs from the checkpoint's ({'; '.join(changes)}), "
                "so the run would not continue the original one exactly. Restore the data (and settings) the run "
                f"was trained with, or set resume_accept_data_change=true to continue on this data from step "
                f"{st.get('step')}, or start a new run (another save_folder, or autoresume=false)")
        was, now = st.get("optimizer_config"), self._optimizer_config()
        if not isinstance(was, dict):
            return False
        diff = [f"{k} {was.get(k)} -> {now.get(k)}" for k in now if was.get(k) != now.get(k)]
        if diff and self.dist.is_main:
            log.warning("the optimizer changed since %s: %s; the recipe's settings apply from step %s (the "
                        "optimizer's moments are the checkpoint's)", ck.name, ", ".join(diff), st.get("step"))
        return bool(diff)

    def _optimizer_config(self) -> dict:
        """The optimizer's name and hyperparameters as built from the recipe (a checkpoint records them)."""
        g = self.optimizer.param_groups[0]
        name = (self.cfg.optimizer or {}).get("name") or "decoupled_adamw"  # build_optimizer's default, resolved
        return {"name": name, "lr": float(g.get("initial_lr", g["lr"])),
                "betas": [float(b) for b in g["betas"]] if "betas" in g else None,
                "eps": float(g["eps"]) if "eps" in g else None,
                "weight_decay": float(g.get("weight_decay", 0.0))}

    def _data_position(self, st: dict) -> dict:
        """This rank's data position from a checkpoint written by any number of ranks: rescaled when the
        world size changed (exact when possible), else the saved position of the same rank, else (a rank
        the checkpoint did not have) the start of the checkpoint's epoch."""
        saved = st["data"]
        old_world = int(st.get("world_size", 1))
        if old_world != self.dist.world_size:
            data = _rescale_data_position(saved, old_world, self.dist.world_size)  # warns when not exact
            if data is not None:
                return data
        if not isinstance(saved, list):
            return saved
        if self.dist.rank < len(saved):
            return saved[self.dist.rank]
        return {"epoch": int(st.get("epoch", saved[0]["epoch"] if saved else 0)), "offset": 0}

    def _load_full_into_shards(self, ck: Path, st: dict) -> None:
        """A full checkpoint (written by any run) into the sharded model: each rank reads one tensor at a time
        and keeps its shard."""
        from mptkit.io.hf_folder import checkpoint_files, iter_checkpoint_tensors
        from mptkit.train import fsdp as F

        folder = ck / ckpt_mod.MODEL_DIR
        files, kind = checkpoint_files(folder)
        if kind == "safe":  # random access, one tensor at a time
            from safetensors import safe_open

            with contextlib.ExitStack() as stack:
                where = {}
                for p in files:
                    f = stack.enter_context(safe_open(str(p), framework="pt", device="cpu"))
                    where.update(dict.fromkeys(f.keys(), f))
                F.load_full_state_dict(self.model, lambda k: where[k].get_tensor(k) if k in where else None,
                                       str(ck))
        else:
            sd = dict(iter_checkpoint_tensors(folder))  # .bin weights: memory-mapped by torch.load
            F.load_full_state_dict(self.model, sd.get, str(ck))
            del sd
        full = st.pop("optimizer")  # memory-mapped (load_trainer_state(mmap=True)): sharded tensor by tensor
        try:
            self.optimizer.load_state_dict(F.shard_optimizer_state(self.optimizer, full))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{ck}: optimizer state does not match ({e}); did optimizer.name change?") from None

    def trainer_state(self, *, with_optimizer: bool = True) -> dict:
        """Counters, data positions and RNG states of every rank, the optimizer (gathered to full tensors
        under FSDP). Collective under several ranks: every rank calls it; under FSDP only rank 0's copy
        holds the optimizer."""
        rng = get_rng_state(self.device)
        data = self.stream.state_dict()
        if self.dist.enabled:
            import torch.distributed as dist

            rngs: list = [None] * self.dist.world_size
            datas: list = [None] * self.dist.world_size
            dist.all_gather_object(rngs, rng)
            dist.all_gather_object(datas, data)
            rng, data = rngs, datas
        return {
            "format": "mptkit-trainer-state", "version": 1,
            "step": self.step, "epoch": self.stream.epoch, "tokens": self.tokens, "samples": self.samples,
            "target_tokens": self.target_tokens,
            "optimizer": self._optimizer_state() if with_optimizer else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": data, "rng": rng, "microbatch": self.microbatch,
            "world_size": self.dist.world_size, "global_train_batch_size": self.cfg.global_train_batch_size,
            "data_fingerprint": self.data_fingerprint, "optimizer_config": self._optimizer_config(),
        }

    def _optimizer_state(self) -> dict | None:
        if self.fsdp is None:
            return self.optimizer.state_dict()
        from mptkit.train import fsdp as F

        return F.gather_full_optimizer_state(self.optimizer, self.dist.is_main)  # collective

    def _full_model(self) -> nn.Module | None:
        """The model with full weights: itself, or under FSDP an unsharded CPU copy on rank 0 (None on the
        other ranks). Collective under FSDP."""
        if self.fsdp is None:
            return self.model
        from mptkit.train import fsdp as F

        sd = F.gather_full_state_dict(self.model, self.dist.is_main)
        return F.plain_model_from_state(self.model, sd) if sd is not None else None

    def save_checkpoint(self) -> Path | None:
        if self.save_folder is None:
            return None
        self._assert_lock_held()  # another run took the folder over: write nothing more
        if self.fsdp is not None and self.fsdp.sharded_checkpoints:
            return self._save_sharded_checkpoint()
        state = self.trainer_state()  # collective under DDP / FSDP: every rank takes part
        model = self._full_model()  # collective under FSDP
        path = None
        if self.dist.is_main:
            with write_errors(self.save_folder, TrainError, _SAVE):  # a full disk: one line naming save_folder
                path = ckpt_mod.save_checkpoint(
                    self.save_folder, model=model, trainer_state=state, epoch=self.stream.epoch, step=self.step,
                    tokenizer=self.tokenizer, run_config=self.cfg.to_dict())
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

    # ------------------------------------------------------------------------------ steps
    def _split(self, batch: dict, mb: int) -> list[dict]:
        n = batch["input_ids"].shape[0]
        out = []
        for s in range(0, n, mb):
            out.append({k: (v[s:s + mb].to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v[s:s + mb])
                        for k, v in batch.items()})
        return out

    def _train_step(self, batch: dict) -> tuple[float, float]:
        """One optimizer step on this rank's share of a global batch; returns (loss, grad_norm)."""
        while True:
            try:
                return self._train_step_once(batch, self.microbatch)
            except Exception as e:
                if not _is_oom(e):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.auto_microbatch and self.microbatch > 1 and not self.dist.enabled:
                    new = self.microbatch // 2
                    while self.per_rank_batch % new:
                        new -= 1
                    log.warning("out of memory with microbatch %d: retrying the step with %d", self.microbatch, new)
                    self.microbatch = new
                    continue
                hint = ("lower device_train_microbatch_size, or set it to 'auto'" if not self.auto_microbatch else
                        "even a microbatch of 1 does not fit: use a smaller model, a shorter max_seq_len, "
                        "activation_checkpointing=true or more GPUs" if self.microbatch == 1 else
                        "with several ranks set device_train_microbatch_size explicitly")
                raise TrainError(f"out of memory at step {self.step} with device_train_microbatch_size="
                                 f"{self.microbatch}: {hint}") from None

    def _train_step_once(self, batch: dict, mb: int) -> tuple[float, float]:
        lr_mult = self.schedule(self.step)
        set_lr(self.optimizer, lr_mult)
        mbs = self._split(batch, mb)
        counts = [self.count_targets(m) for m in mbs]
        # targets, tokens and this rank's sample width (after pad trimming), summed over the ranks in one call
        both = torch.tensor([float(sum(counts)), float(count_tokens(batch)),  # the CPU batch: no device sync
                             float(batch["input_ids"].shape[1])], dtype=torch.float64)
        both = all_reduce_sum(both.to(self.device) if self.dist.enabled and self.device.type == "cuda" else both,
                              self.dist)
        total, self._step_tokens = float(both[0]), int(both[1])
        self._step_width = float(both[2]) / self.dist.world_size  # the ranks' mean width: MFU counts every rank
        if total <= 0:
            raise DataError(f"step {self.step}: the batch has no target tokens (all labels are -100)")
        self._step_targets = int(total)
        world = self.dist.world_size
        loss_acc = torch.zeros((), dtype=torch.float32, device=self.device)
        ddp = self.dist.enabled and self.fsdp is None
        for i, m in enumerate(mbs):
            last = i == len(mbs) - 1
            # DDP all-reduces once per step; FSDP reduce-scatters every microbatch into the sharded grads
            sync = self.train_model.no_sync() if (ddp and not last) else contextlib.nullcontext()
            with sync:
                with self.autocast(), self._activation_offload():
                    loss = self.loss_fn(self.train_model, m)
                w = counts[i] / total
                scaled = loss * (w * world)  # DDP and FSDP average gradients over ranks
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            loss_acc += loss.detach().float() * w
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.clip is not None:
            gnorm = torch.nn.utils.clip_grad_norm_(params, self.clip)  # FSDP: the global norm over all shards
        else:
            gnorm = _total_norm(params)
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.optimizer_monitor is not None and self.optimizer_monitor.due(self.step + 1):
            # the gradients as the optimizer used them (unscaled, clipped) and its state after the step
            self._optimizer_metrics = self.optimizer_monitor.collect(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        loss_acc = all_reduce_sum(loss_acc, self.dist)
        return float(loss_acc), float(gnorm)

    # ------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        ds = self.eval_dataset
        if ds is None or len(ds) == 0:
            return None
        cfg = self.cfg
        bs = cfg.device_eval_batch_size or max(1, self.microbatch)
        was_training = self.model.training
        self.model.eval()
        t0 = time.perf_counter()
        idx = list(range(self.dist.rank, len(ds), self.dist.world_size))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n_batches = -(-len(idx) // bs)
        if cfg.eval_subset_num_batches > 0:
            n_batches = min(n_batches, cfg.eval_subset_num_batches)
        if self.fsdp is not None:  # every rank runs every forward (its all-gathers): pad to the longest rank
            import torch.distributed as dist

            nb = torch.tensor(n_batches, device=self.device)
            dist.all_reduce(nb, op=dist.ReduceOp.MAX)
            n_batches = int(nb)
        for b in range(n_batches):
            chunk = idx[b * bs:(b + 1) * bs]
            pad = not chunk  # FSDP only: a forward with weight 0 to keep this rank in step
            batch = self.collate([ds[i] for i in (chunk or [0])])
            check_token_ids(batch, chunk or [0], ds, self.stream.vocab_size, what="evaluation")
            batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            n = 0 if pad else self.count_targets(batch)
            if n == 0 and self.fsdp is None:
                continue
            with self.autocast():
                loss = self.loss_fn(self.model, batch)
            if n:
                loss_sum += loss.double() * n
                n_sum += n
        all_reduce_sum(loss_sum, self.dist)
        all_reduce_sum(n_sum, self.dist)
        if was_training:
            self.model.train()
        if float(n_sum) == 0:
            return None
        import math

        val = float(loss_sum / n_sum)
        rec = {"step": self.step, "eval_loss": val, "eval_perplexity": math.exp(min(val, 50.0)),
               "eval_tokens": int(n_sum), "eval_s": time.perf_counter() - t0}
        self.last_eval = rec
        return rec

    # ------------------------------------------------------------------------------ fit
    def fit(self) -> dict:
        try:
            return self._fit()
        finally:
            self.close()  # the folders' locks: released at the end, and on any error

    def _fit(self) -> dict:
        self.setup()
        cfg = self.cfg
        main = self.dist.is_main
        t_start = time.perf_counter()
        if main:
            self._check_locks()
            self._write_run_config()
        writer = MetricsWriter(self.run_folder, enabled=main, guard=self._check_locks,
                               tensorboard=(cfg.loggers or {}).get("tensorboard", True) if cfg.loggers is not None else True)
        n_params = sum(p.numel() for p in self.model.parameters())
        gpu_flops = ((cfg.callbacks or {}).get("speed_monitor") or {}).get("gpu_flops_available")
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
                          "start_step": self.step,
                          "params_per_rank": getattr(self, "fsdp_local_params", n_params)})
        bar = None
        if main and cfg.progress_bar and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc=self.run_name, unit="ba", dynamic_ncols=True)
        elif main and cfg.progress_bar and cfg.log_to_console:
            log.info("stderr is not a terminal: logging progress every %d steps instead of a progress bar",
                     self.log_every)
        tput = Throughput(window=int(((cfg.callbacks or {}).get("speed_monitor") or {}).get("window_size", 10)))
        self._last_saved = self.step if self.resumed_from is not None else -1
        self.model.train()
        if self.scheduled_gc is not None:
            self.scheduled_gc.fit_start()
        try:
            if cfg.eval_first and self.step == 0:
                self._log_eval(writer)
            while self.step < self.max_steps:
                if self.scheduled_gc is not None:
                    self.scheduled_gc.before_batch(self.step)
                t0 = time.perf_counter()
                batch = self.stream.next_batch()
                loss, gnorm = self._train_step(batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                lr = self.optimizer.param_groups[0]["lr"]
                self.step += 1
                self.samples += self.cfg.global_train_batch_size
                self.tokens += self._step_tokens
                self.target_tokens += self._step_targets
                tput.add(dt, self._step_tokens, self._flops_per_batch(self._step_width))
                spike = self.spike(self.step, loss)
                optimizer_metrics, self._optimizer_metrics = self._optimizer_metrics, {}
                if main:
                    rec = {"step": self.step, "epoch": self.stream.epoch, "train_loss": loss, "lr": lr,
                           "grad_norm": gnorm, "tokens": self.tokens, "target_tokens": self.target_tokens,
                           "samples": self.samples,
                           "step_s": dt, "tokens_per_s": tput.tokens_per_s,
                           "mfu": tput.flops_per_s / (peak * self.dist.world_size),
                           "microbatch": self.microbatch, "time": time.time(), **memory_stats(self.device),
                           **optimizer_metrics}
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
            # the end: final eval, checkpoint, export, sample
            final_eval = self._log_eval(writer, bar) if self.eval_dataset is not None else None
            if self.save_folder is not None and self._last_saved != self.step:
                self.save_checkpoint()
        finally:
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
                   "last_checkpoint": None, "export_folder": None, "sample": None}
        if self.save_folder is not None and main:
            last = ckpt_mod.find_latest_checkpoint(self.save_folder, checksums=False)
            summary["last_checkpoint"] = str(last) if last else None
        full = self.model
        if self.fsdp is not None and (cfg.export_folder or (cfg.sample_prompt and self.tokenizer is not None)):
            full = self._full_model()  # collective: every rank takes part; rank 0 gets the unsharded weights
        if main and cfg.export_folder:
            out = Path(cfg.export_folder.format(run_name=self.run_name))
            self._check_locks()  # the run folder is another run's now: no export in its name
            self.export(out, model=full)
            summary["export_folder"] = str(out)
        if main and cfg.sample_prompt and self.tokenizer is not None:
            summary["sample"] = self.sample(cfg.sample_prompt, cfg.sample_max_new_tokens, model=full)
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

            self.train_model = self.model
            _gc.collect()
        shutdown(self.dist)
        return summary

    def _log_eval(self, writer: MetricsWriter, bar=None) -> dict | None:
        if self.scheduled_gc is not None:
            self.scheduled_gc.eval_start()
        try:
            rec = self.evaluate()
        finally:
            if self.scheduled_gc is not None:
                self.scheduled_gc.eval_end()
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
    def export(self, out: str | os.PathLike, model: nn.Module | None = None) -> Path:
        """Write the current model (or ``model``) as an HF folder (config.json + safetensors + tokenizer).
        Under FSDP pass the unsharded model (``_full_model()``, which every rank must call)."""
        from mptkit.utils.fs import atomic_dir

        out = Path(out)
        model = self.model if model is None else model
        with write_errors(out, TrainError, _EXPORT), atomic_dir(out) as tmp:  # a full disk: one line naming it
            model.save_pretrained(tmp, tokenizer=self.tokenizer)
        log.info("exported the model to %s", out)
        return out

    def sample(self, prompt: str, max_new_tokens: int = 64, model: nn.Module | None = None) -> str:
        from mptkit.infer import generate_text

        model = self.model if model is None else model
        was = model.training
        model.eval()
        try:
            kw = {"top_k": self.cfg.sample_top_k} if self.cfg.sample_top_k else {}
            text = generate_text(model, self.tokenizer, prompt, max_new_tokens=max_new_tokens,
                                 temperature=float(self.cfg.sample_temperature), seed=self.cfg.seed, **kw)
        finally:
            model.train(was)
        return prompt + text


def _rescale_data_position(data: Any, old_world: int, world: int) -> dict | None:
    """A checkpoint's per-rank data positions, written by ``old_world`` ranks, as this rank's position under
    ``world`` ranks. Rank r of W takes global positions r, r+W, ... of the epoch's order, so after k samples
    per rank exactly the first k*W positions are consumed whatever W is: the same global batches follow, only
    their split over ranks changes. None (with a warning) when that cannot be exact."""
    states = data if isinstance(data, list) else [data]
    keys = {(int(d["epoch"]), int(d["offset"])) for d in states if isinstance(d, dict) and "offset" in d}
    if len(keys) == 1 and len(states) == old_world:
        epoch, offset = keys.pop()
        consumed = offset * old_world
        if consumed % world == 0:
            log.info("resuming a %d-rank checkpoint on %d ranks at global sample %d of epoch %d (the same global "
                     "batches follow)", old_world, world, consumed, epoch)
            return {"epoch": epoch, "offset": consumed // world}
    log.warning("resuming a %d-rank checkpoint on %d ranks: data order will differ from the original run",
                old_world, world)
    return None


def _total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    if not params:
        return torch.zeros(())
    if hasattr(params[0].grad, "full_tensor"):  # FSDP's DTensor shards: the norm over all of them
        return torch.nn.utils.get_total_norm([p.grad for p in params])
    norms = [torch.linalg.vector_norm(p.grad.detach(), 2.0) for p in params]
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


# How a failed write (disk full, permissions, ...) names what it was writing: "{doing} {path}: {reason}".
_SAVE = "cannot write the checkpoints (save_folder)"
_METRICS = "cannot write the metrics (run_folder)"
_RUN = "cannot write the run's files (run_folder)"
_EXPORT = "cannot write the export (export_folder)"

_OPT_HPARAMS = ("lr", "initial_lr", "betas", "eps", "weight_decay")


def _missing_dirs(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, outermost first."""
    out: list[Path] = []
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out[::-1]


def _fmt_s(s: float) -> str:
    s = int(s)
    h, r = divmod(s, 3600)
    m, sec = divmod(r, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"
