"""A run's trainer state, saved with every checkpoint and restored on resume: counters, each rank's data
position and RNG streams, the optimizer (and fp16 grad scaler), what the data stream and the optimizer were
(compared on resume). The learning-rate schedule is a pure function of the step (train/schedule.py): the
step restores it. Finding and reading checkpoint folders is :mod:`mptkit.train.checkpoint`'s; this module
writes them through it and loads what it reads into the model and optimizer."""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mptkit.errors import CheckpointError, ConfigError, TrainError
from mptkit.train import checkpoint as ckpt_mod
from mptkit.train.data import fingerprint_changes
from mptkit.train.distributed import DistInfo

log = logging.getLogger(__name__)

FORMAT = "mptkit-trainer-state"
VERSION = 1
# the optimizer's settings a recipe sets: the recipe's apply after a resume that changed them
OPT_HPARAMS = ("lr", "initial_lr", "betas", "eps", "weight_decay")


# ----------------------------------------------------------------------------------- RNG


def get_rng_state(device: torch.device) -> dict:
    import numpy as np

    st = np.random.get_state()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {
            "name": st[0],
            "keys": torch.from_numpy(st[1].astype("int64")),
            "pos": int(st[2]),
            "has_gauss": int(st[3]),
            "cached_gaussian": float(st[4]),
        },
        "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
    }


def set_rng_state(st: dict, device: torch.device) -> None:
    import numpy as np

    torch.set_rng_state(st["torch"])
    if st.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], device)
    n = st["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore_rng(st: dict, dist: DistInfo, device: torch.device, *, seed: int, step: int) -> None:
    """This rank's RNG streams from a checkpoint's state: its own when the checkpoint has it; a rank the
    checkpoint did not have (or a new rank of a one-process checkpoint) seeds a stream of its own."""
    rngs = st.get("rng")
    if isinstance(rngs, list):
        rngs = rngs[dist.rank] if dist.rank < len(rngs) else None
    elif dist.rank > 0 and int(st.get("world_size", 1)) == 1:
        rngs = None  # a one-process checkpoint: its stream is rank 0's; the new ranks seed their own
    if rngs:
        set_rng_state(rngs, device)
    elif dist.enabled:
        torch.manual_seed(seed + dist.rank + step)


# ----------------------------------------------------------------------------------- data position


def rescale_data_position(data: Any, old_world: int, world: int) -> dict | None:
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
            log.info(
                "resuming a %d-rank checkpoint on %d ranks at global sample %d of epoch %d (the same global "
                "batches follow)",
                old_world,
                world,
                consumed,
                epoch,
            )
            return {"epoch": epoch, "offset": consumed // world}
    log.warning(
        "resuming a %d-rank checkpoint on %d ranks: data order will differ from the original run",
        old_world,
        world,
    )
    return None


def data_position(st: dict, rank: int, world_size: int) -> dict:
    """This rank's data position from a checkpoint written by any number of ranks: rescaled when the
    world size changed (exact when possible), else the saved position of the same rank, else (a rank
    the checkpoint did not have) the start of the checkpoint's epoch."""
    saved = st["data"]
    old_world = int(st.get("world_size", 1))
    if old_world != world_size:
        data = rescale_data_position(saved, old_world, world_size)  # warns when not exact
        if data is not None:
            return data
    if not isinstance(saved, list):
        return saved
    if rank < len(saved):
        return saved[rank]
    return {"epoch": int(st.get("epoch", saved[0]["epoch"] if saved else 0)), "offset": 0}


# ----------------------------------------------------------------------------------- what a resume compares


def optimizer_config(optimizer: torch.optim.Optimizer, name: str) -> dict:
    """The optimizer's name and hyperparameters as built from the recipe (a checkpoint records them)."""
    g = optimizer.param_groups[0]
    return {
        "name": name,
        "lr": float(g.get("initial_lr", g["lr"])),
        "betas": [float(b) for b in g["betas"]] if "betas" in g else None,
        "eps": float(g["eps"]) if "eps" in g else None,
        "weight_decay": float(g.get("weight_decay", 0.0)),
    }


def check_resume(
    ck: Path,
    st: dict,
    *,
    data_fingerprint: dict,
    accept_data_change: bool,
    optimizer_now: dict,
    is_main: bool,
) -> bool:
    """Before loading ``ck``: refuse (TrainError) a data stream other than the checkpoint's unless
    ``accept_data_change``; warn when the optimizer's settings changed (returns whether they did)."""
    old = st.get("data_fingerprint")
    if not isinstance(old, dict):  # written before fingerprints: only the batch size is known
        old = {"global_train_batch_size": st.get("global_train_batch_size")}
    changes = fingerprint_changes(old, data_fingerprint)
    if changes and accept_data_change:
        if is_main:
            log.warning(
                "resuming from %s on changed data (%s): resume_accept_data_change=true, so the run "
                "continues from step %s at the checkpoint's data position, but not as the original run "
                "would have",
                ck,
                "; ".join(changes),
                st.get("step"),
            )
    elif changes:
        raise TrainError(
            f"resuming from {ck}: the training data stream differs from the checkpoint's ({'; '.join(changes)}), "
            "so the run would not continue the original one exactly. Restore the data (and settings) the run "
            f"was trained with, or set resume_accept_data_change=true to continue on this data from step "
            f"{st.get('step')}, or start a new run (another save_folder, or autoresume=false)"
        )
    was = st.get("optimizer_config")
    if not isinstance(was, dict):
        return False
    diff = [
        f"{k} {was.get(k)} -> {optimizer_now.get(k)}"
        for k in optimizer_now
        if was.get(k) != optimizer_now.get(k)
    ]
    if diff and is_main:
        log.warning(
            "the optimizer changed since %s: %s; the recipe's settings apply from step %s (the "
            "optimizer's moments are the checkpoint's)",
            ck.name,
            ", ".join(diff),
            st.get("step"),
        )
    return bool(diff)


# ----------------------------------------------------------------------------------- save


def collect_trainer_state(
    *,
    dist: DistInfo,
    device: torch.device,
    stream,
    counters: dict,
    optimizer_state: dict | None,
    scaler,
    microbatch: int,
    global_batch_size: int,
    data_fingerprint: dict,
    optimizer_settings: dict,
    extra: dict | None = None,
) -> dict:
    """The trainer state of a checkpoint: ``counters`` (step, tokens, samples, target_tokens), every rank's
    data position and RNG streams (gathered: collective under several ranks), the optimizer state given."""
    rng = get_rng_state(device)
    data = stream.state_dict()
    if dist.enabled:
        import torch.distributed as tdist

        rngs: list = [None] * dist.world_size
        datas: list = [None] * dist.world_size
        tdist.all_gather_object(rngs, rng)
        tdist.all_gather_object(datas, data)
        rng, data = rngs, datas
    return {
        "format": FORMAT,
        "version": VERSION,
        "step": counters["step"],
        "epoch": stream.epoch,
        "tokens": counters["tokens"],
        "samples": counters["samples"],
        "target_tokens": counters["target_tokens"],
        "optimizer": optimizer_state,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "data": data,
        "rng": rng,
        "microbatch": microbatch,
        "world_size": dist.world_size,
        "global_train_batch_size": global_batch_size,
        "data_fingerprint": data_fingerprint,
        "optimizer_config": optimizer_settings,
        **(extra or {}),  # the recovery's record and the loss monitor's window (train/recovery.py)
    }


def full_optimizer_state(optimizer: torch.optim.Optimizer, *, sharded: bool, is_main: bool) -> dict | None:
    """The optimizer's state dict; under FSDP gathered to full tensors on rank 0 (collective)."""
    if not sharded:
        return optimizer.state_dict()
    from mptkit.train import fsdp as F

    return F.gather_full_optimizer_state(optimizer, is_main)


def full_model(model: nn.Module, *, sharded: bool, is_main: bool, adapter_only: bool = False) -> nn.Module | None:
    """The model with full weights: itself, or under FSDP an unsharded CPU copy on rank 0 (None on the
    other ranks). Collective under FSDP. ``adapter_only`` (a LoRA model): under FSDP only the adapter is
    gathered, the copy's frozen base left on the meta device (for checkpoints and adapter exports)."""
    if not sharded:
        return model
    from mptkit.model.lora import has_lora
    from mptkit.train import fsdp as F

    if adapter_only and has_lora(model):
        return F.gather_adapter_model(model, is_main)
    sd = F.gather_full_state_dict(model, is_main)
    return F.plain_model_from_state(model, sd) if sd is not None else None


# ----------------------------------------------------------------------------------- restore


def load_weights_and_optimizer(
    ck: Path,
    st: dict,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    sharded: bool,
) -> None:
    """The checkpoint's weights into ``model`` and its optimizer state (``st["optimizer"]``) into
    ``optimizer``: a sharded (DCP) checkpoint into any model; a full one into a sharded model shard by
    shard, or into a plain one. A mismatch is a CheckpointError saying what changed."""
    if ckpt_mod.is_sharded(ck):
        # torch.distributed.checkpoint: loads into a sharded or an unsharded model, any world size
        from mptkit.train import fsdp as F

        try:
            F.dcp_load(model, optimizer, ck / ckpt_mod.SHARDED_DIR)
        except CheckpointError:
            raise  # already names the file and the reason (e.g. a refused metadata pickle)
        except Exception as e:  # noqa: BLE001 - DCP raises many types (CheckpointException, RuntimeError...)
            raise CheckpointError(
                f"{ck}: the sharded checkpoint does not load into the recipe's model and "
                f"optimizer ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
            ) from None
    elif _load_adapter_checkpoint(ck, model, sharded=sharded):
        if sharded:  # every rank maps the full (adapter-only) optimizer state and keeps its shards
            _load_sharded_optimizer(ck, st, optimizer)
        else:
            _load_optimizer(ck, st, optimizer)
        return
    elif sharded:
        _load_full_into_shards(ck, st, model, optimizer)
    else:
        from safetensors.torch import load_file

        wfile = ck / ckpt_mod.MODEL_DIR / "model.safetensors"
        if wfile.exists():
            sd = load_file(str(wfile), device=str(device))
        else:
            from mptkit.io.hf_folder import iter_checkpoint_tensors

            sd = dict(iter_checkpoint_tensors(ck / ckpt_mod.MODEL_DIR))
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(
                f"{ck}: weights do not match the recipe's model ({str(e).splitlines()[0]}); "
                "the recipe's model changed since the checkpoint was written"
            ) from None
        _load_optimizer(ck, st, optimizer)


def _load_optimizer(ck: Path, st: dict, optimizer: torch.optim.Optimizer) -> None:
    try:
        optimizer.load_state_dict(st["optimizer"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(
            f"{ck}: optimizer state does not match ({e}); did optimizer.name change?"
        ) from None


def _load_adapter_checkpoint(ck: Path, model: nn.Module, *, sharded: bool = False) -> bool:
    """A LoRA run's checkpoint (its ``model/`` an adapter folder) into the recipe's LoRA model: the base must be
    the one the adapter was trained on (fingerprint), the adapter's layers the recipe's. False: not one.
    ``sharded`` (FSDP): each rank keeps its shard of every adapter tensor."""
    from mptkit.io.adapter import check_base, is_adapter_folder, read_adapter_tensors
    from mptkit.model.lora import has_lora, load_adapter_state_dict

    folder = ck / ckpt_mod.MODEL_DIR
    lora_model = has_lora(model)
    if not is_adapter_folder(folder):
        if lora_model:
            raise CheckpointError(f"{ck}: a checkpoint of full weights, but the recipe trains a LoRA adapter "
                                  "(model.peft_config): resume it without peft_config, or use another save_folder")
        return False
    if not lora_model:
        raise CheckpointError(f"{ck}: the checkpoint holds a LoRA adapter, but the recipe has no model.peft_config: "
                              "put the run's peft_config back, or use another save_folder")
    try:
        check_base(folder, model, fingerprint=(getattr(model, "_lora_base", None) or {}).get("base_fingerprint"))
    except CheckpointError as e:
        raise CheckpointError(f"{e}; the recipe's model.pretrained_model_name_or_path changed since the checkpoint "
                              "was written (resume with that base, or use another save_folder)") from None
    try:
        convert = None
        if sharded:
            from mptkit.train import fsdp as F

            convert = F._shard_like
        load_adapter_state_dict(model, read_adapter_tensors(folder), where=str(folder), convert=convert)
    except ConfigError as e:
        raise CheckpointError(f"{e}; the recipe's model.peft_config changed since the checkpoint was written") from None
    return True


def _load_sharded_optimizer(ck: Path, st: dict, optimizer: torch.optim.Optimizer) -> None:
    from mptkit.train import fsdp as F

    full = st.pop("optimizer")
    try:
        optimizer.load_state_dict(F.shard_optimizer_state(optimizer, full))
    except (ValueError, KeyError, CheckpointError) as e:
        raise CheckpointError(f"{ck}: optimizer state does not match ({e}); did optimizer.name change?") from None


def _load_full_into_shards(ck: Path, st: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
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
            F.load_full_state_dict(model, lambda k: where[k].get_tensor(k) if k in where else None, str(ck))
    else:
        sd = dict(iter_checkpoint_tensors(folder))  # .bin weights: memory-mapped by torch.load
        F.load_full_state_dict(model, sd.get, str(ck))
        del sd
    full = st.pop("optimizer")  # memory-mapped (load_trainer_state(mmap=True)): sharded tensor by tensor
    try:
        optimizer.load_state_dict(F.shard_optimizer_state(optimizer, full))
    except (ValueError, KeyError) as e:
        raise CheckpointError(
            f"{ck}: optimizer state does not match ({e}); did optimizer.name change?"
        ) from None


def apply_recipe_hparams(optimizer: torch.optim.Optimizer, recipe_hp: list[dict]) -> None:
    """After ``load_state_dict`` restored the checkpoint's hyperparameters: the recipe's apply."""
    for g, hp in zip(optimizer.param_groups, recipe_hp):
        g.update(hp)


def recipe_hparams(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: g[k] for k in OPT_HPARAMS if k in g} for g in optimizer.param_groups]
