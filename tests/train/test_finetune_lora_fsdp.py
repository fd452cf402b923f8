"""LoRA under FSDP2 (``model.peft_config`` with ``fsdp_config``): two gloo ranks under ``torchrun`` on CPU, a tiny
MPT. The adapters are injected before ``fully_shard``, so the frozen base is sharded beside them; only the
adapters have gradients (reduce-scattered) and optimizer state; checkpoints hold the adapter alone, gathered to
rank 0 in peft's files, with the same adapter-only trainer state one process writes; a resume restores the
adapter and its optimizer state shard by shard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mptkit.errors import ConfigError
from mptkit.io.adapter import is_adapter_folder
from mptkit.train import checkpoint as ck
from mptkit.train.config import config_from_dict
from mptkit.train.trainer import Trainer
from tests.helpers import TINY_MODEL, datasets, model_folder, tiny_run

ROOT = Path(__file__).resolve().parents[2]
SCHED = {"name": "cosine_with_warmup", "t_warmup": "2ba", "alpha_f": 0.1, "t_max": "4ba"}
COMMON = {"device": "cpu", "device_train_microbatch_size": 2, "save_interval": "2ba", "scheduler": SCHED,
          "max_duration": "4ba", "optimizer": {"name": "decoupled_adamw", "lr": 1e-2}}
FSDP = {"sharding_strategy": "FULL_SHARD"}


def lora_model(base: str) -> dict:
    return {"pretrained_model_name_or_path": base, "pretrained": True,
            "peft_config": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "modules_to_save": ["norm_f"]}}


WORKER = r"""
import json, shutil, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from tests.helpers import datasets, tiny_run
from tests.train.test_finetune_lora_fsdp import COMMON, FSDP, lora_model
from mptkit.train.config import config_from_dict
from mptkit.train.fsdp import gather_full_state_dict
from mptkit.train.trainer import Trainer

dist.init_process_group("gloo")  # one group for both runs (the trainer uses it and leaves it up)
rank = dist.get_rank()
tmp, base = Path(sys.argv[1]), sys.argv[2]

def run(name, **over):
    cfg = config_from_dict(tiny_run(tmp / name, model=lora_model(base), fsdp_config=FSDP, autoresume=True,
                                    **COMMON, **over))
    tr, ev = datasets()
    t = Trainer(cfg, train_dataset=tr, eval_dataset=ev)
    t.fit()
    return t

t = run("fsdp", export_folder=str(tmp / "export"))
opt = [p for g in t.optimizer.param_groups for p in g["params"]]
frozen = [(n, p) for n, p in t.model.named_parameters() if not p.requires_grad]
w = dict(t.model.named_parameters())["transformer.blocks.0.attn.Wqkv.base_layer.weight"]
sd = gather_full_state_dict(t.model, rank == 0)
if rank == 0:
    ref = load_file(str(Path(base) / "model.safetensors"))
    got = {{k.replace(".base_layer.", "."): v for k, v in sd.items() if ".lora_" not in k}}
    changed = sorted(k for k in ref if k != "transformer.norm_f.weight" and not torch.equal(ref[k], got[k]))
    # (norm_f is in modules_to_save: trained; wte is tied to the LM head, so lm_head.weight is not its own key)
else:
    changed = None
info = {{"opt_params": len(opt), "opt_all_trainable": all(p.requires_grad for p in opt),
        "frozen_sharded": all(isinstance(p, DTensor) for _, p in frozen), "n_frozen": len(frozen),
        "frozen_grads": sum(p.grad is not None for _, p in frozen),
        "wqkv_local": w.to_local().numel(), "wqkv_full": w.numel(), "base_changed": changed}}
(tmp / f"info{{rank}}.json").write_text(json.dumps(info))
for name, src in (("res", "fsdp"), ("cross", "one")):  # a run killed after its step-2 checkpoint, resumed
    if rank == 0:  # on 2 ranks: that checkpoint alone (cross: the one-process run's)
        (tmp / name / "ck").mkdir(parents=True)
        shutil.copytree(tmp / src / "ck" / "ep0-ba2", tmp / name / "ck" / "ep0-ba2")
    dist.barrier()
    t = run(name)
    if rank == 0:
        (tmp / f"resumed-{{name}}.txt").write_text(str(t.resumed_from))
"""


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "0.1", str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def _adapter(folder: Path, step: int) -> dict:
    return load_file(str(folder / "ck" / f"ep0-ba{step}" / "model" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_lora_under_fsdp2_matches_one_process_and_resumes(tmp_path):
    """Same adapter as one process (fp32, to float rounding: the reductions sum in another order), the base
    sharded and unchanged, only adapter tensors in the optimizer and in the checkpoint, the same trainer-state
    layout as one process; resuming the step-2 checkpoint on 2 ranks gives the uninterrupted run's step 4 (bit for
    bit), and checkpoints cross between one process and FSDP both ways."""
    base = model_folder(tmp_path / "base", None, seed=3, spread=None,
                        **{k: v for k, v in TINY_MODEL.items() if k != "name"})
    tr, ev = datasets()
    one = config_from_dict(tiny_run(tmp_path / "one", model=lora_model(str(base)), **COMMON))
    Trainer(one, train_dataset=tr, eval_dataset=ev).fit()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    r = _torchrun(script, str(tmp_path), str(base))
    assert r.returncode == 0, r.stderr[-4000:]
    info = [json.loads((tmp_path / f"info{i}.json").read_text()) for i in range(2)]
    for i in info:  # the frozen base is sharded (half of each tensor per rank), holds no gradients
        assert i["frozen_sharded"] and i["n_frozen"] > 0 and i["frozen_grads"] == 0
        assert i["wqkv_local"] * 2 == i["wqkv_full"]
        assert i["opt_all_trainable"]
    assert info[0]["base_changed"] == []
    for step in (2, 4):
        a, b = _adapter(tmp_path / "one", step), _adapter(tmp_path / "fsdp", step)
        assert a.keys() == b.keys() and any("norm_f" in k for k in a)
        assert info[0]["opt_params"] == len(a)  # the optimizer holds the adapter's tensors, no more
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)
    last = tmp_path / "fsdp" / "ck" / "ep0-ba4"
    assert sorted(p.name for p in (last / "model").iterdir() if p.suffix == ".safetensors") == [
        "adapter_model.safetensors"]
    exported = load_file(str(tmp_path / "export" / "adapter_model.safetensors"))  # export_folder: the adapter
    assert exported.keys() == b.keys() and all(torch.equal(exported[k], b[k]) for k in b)
    assert is_adapter_folder(last / "model") and not (tmp_path / "export" / "model.safetensors").exists()
    s1 = torch.load(tmp_path / "one" / "ck" / "ep0-ba4" / ck.STATE_FILE, weights_only=False)
    s2 = torch.load(last / ck.STATE_FILE, weights_only=False)
    o1, o2 = s1["optimizer"], s2["optimizer"]
    assert sorted(o1["state"]) == sorted(o2["state"]) and len(o1["state"]) == len(a)
    for idx in o1["state"]:
        for key, v in o1["state"][idx].items():
            if isinstance(v, torch.Tensor) and v.dim():
                torch.testing.assert_close(o2["state"][idx][key], v, rtol=1e-3, atol=1e-6)
    # the resumed run (from the step-2 checkpoint) ends where the uninterrupted one did, bit for bit
    for name in ("res", "cross"):
        assert (tmp_path / f"resumed-{name}.txt").read_text() == str(tmp_path / name / "ck" / "ep0-ba2")
    c = _adapter(tmp_path / "res", 4)
    for k in b:
        assert torch.equal(b[k], c[k]), k
    # checkpoints cross: one process's step 2 resumed on 2 FSDP ranks, and FSDP's step 2 in one process
    (tmp_path / "back" / "ck").mkdir(parents=True)
    shutil.copytree(tmp_path / "fsdp" / "ck" / "ep0-ba2", tmp_path / "back" / "ck" / "ep0-ba2")
    back = config_from_dict(tiny_run(tmp_path / "back", model=lora_model(str(base)), autoresume=True, **COMMON))
    t = Trainer(back, train_dataset=tr, eval_dataset=ev)
    t.fit()
    assert t.resumed_from == tmp_path / "back" / "ck" / "ep0-ba2"
    for name in ("cross", "back"):
        d = _adapter(tmp_path / name, 4)
        for k in a:
            torch.testing.assert_close(d[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("over, match", [
    ({"state_dict_type": "sharded"}, "use state_dict_type: full"),
])
def test_lora_fsdp_settings_refused(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(tiny_run(tmp_path, model=lora_model(str(tmp_path)), fsdp_config={**FSDP, **over}, **COMMON))


def test_lora_fsdp_base_dtype_refused(tmp_path):
    m = lora_model(str(tmp_path))
    m["peft_config"]["base_dtype"] = "bf16"
    with pytest.raises(ConfigError, match="base_dtype bf16 with fsdp_config"):
        config_from_dict(tiny_run(tmp_path, model=m, fsdp_config=FSDP, **COMMON))
