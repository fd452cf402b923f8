"""FSDP2 sharding (``fsdp_config``) on CPU: two gloo ranks under ``torchrun``, a tiny MPT (d_model 32, 2 layers).

One torchrun launch runs every multi-rank scenario in turn (one process group, so the ~4 s start-up is paid
once); the tests then compare the runs' metrics, checkpoints and exports. What they prove:

* FSDP's initial weights are bitwise those of the unsharded init with the same seed (no sync needed);
* FSDP trains like DDP: the first step's loss is bitwise equal, the others and the final weights and
  optimizer state agree to float rounding (rtol 1e-4 / atol 1e-5, as DDP vs one process in
  test_train_ddp.py). Not bitwise: FSDP reduce-scatters each microbatch's gradients into the shards,
  DDP sums the microbatches locally and all-reduces once, so the additions happen in another order;
  the clipping norm is likewise a sum of per-shard partial norms (measured: 6e-8 max abs weight difference);
* each rank holds half of the parameters (local shard numel), DDP ranks all of them;
* a full checkpoint from FSDP resumes in one process, and a DDP checkpoint under FSDP, each ending where
  the uninterrupted run ends (to rounding: the world size changes the reduction order); a one-process
  checkpoint resumes on 2 ranks (DDP and FSDP) at the same global sample and ends where the one-process
  run ends;
* a sharded (torch.distributed.checkpoint) checkpoint resumes under FSDP bitwise equal to the run that never
  stopped, and in one process; it is complete, checksummed and skipped by autoresume when corrupted;
* a pretrained model folder is loaded on CPU, sharded and trained like one process trains it;
* HYBRID_SHARD with activation checkpointing and prefetching, and SHARD_GRAD_OP with sync_module_states,
  train like DDP, and do what they say (seen from the blocks: SHARD_GRAD_OP keeps a block's weights gathered
  after its forward, FULL_SHARD and HYBRID_SHARD reshard them; activation checkpointing recomputes every
  block's forward in backward); the end-of-run export under FSDP holds the final weights;
* a recipe with fsdp_config in one process trains bitwise like the recipe without it;
* bad fsdp_config keys and values fail validation with the key and the closest valid name; fp16 compute or
  reductions are refused;
* a sharded checkpoint whose DCP metadata (or a non-tensor item) pickles a foreign global is refused before
  anything runs; a sharded save gathers each rank's own shard digests and spreads rank 0's failures;
* meta materialisation names a parameter the init leaves uninitialised (NaN-filled) instead of keeping it.
"""

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

from mptkit.errors import CheckpointError, ConfigError
from mptkit.io import open_model_source
from mptkit.io.dcp import consolidate_sharded_checkpoint
from mptkit.train import checkpoint as ck
from mptkit.train.config import config_from_dict
from mptkit.train.data import TensorDataset
from mptkit.train.fsdp import FSDPSettings, build_mesh, parse_fsdp_config
from mptkit.train.trainer import Trainer
from tests.helpers import pattern_data, tiny_run

ROOT = Path(__file__).resolve().parents[2]
SCHED = {"name": "cosine_with_warmup", "t_warmup": "2ba", "alpha_f": 0.1, "t_max": "4ba"}
# eval on 5 samples, batch 2: rank 0 runs 2 eval batches, rank 1 only 1 (FSDP pads it with a weight-0 forward)
COMMON = {"device": "cpu", "device_train_microbatch_size": 2, "device_eval_batch_size": 2, "save_interval": "2ba",
          "scheduler": SCHED, "max_duration": "4ba"}

WORKER = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tests.helpers import pattern_data, tiny_run
from tests.train.test_train_fsdp import COMMON
from mptkit.train.config import config_from_dict
from mptkit.train.data import TensorDataset
from mptkit.train.fsdp import gather_full_state_dict
from mptkit.train.trainer import Trainer

dist.init_process_group("gloo")  # one group for every run (the trainer uses it and leaves it up)
rank = dist.get_rank()
tmp = Path(sys.argv[1])

def run(name, init_to=None, **over):
    t0 = time.time()
    cfg = config_from_dict(tiny_run(tmp / name, **{{**COMMON, **over}}))
    tr = Trainer(cfg, train_dataset=TensorDataset(pattern_data(64)),
                 eval_dataset=TensorDataset(pattern_data(5, seed=1)))
    tr.setup()
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in tr.model.parameters())
    blocks = getattr(tr.model, "module", tr.model).transformer.blocks
    probe = {{"forwards": 0, "block0_weight_in_forward": None}}  # the strategy, seen from the blocks

    def count(mod, args):  # training forwards of block 0 (a recomputation in backward counts too)
        if torch.is_grad_enabled() and mod.training:
            probe["forwards"] += 1

    def look(mod, args):  # as block 1 starts its first training forward: is block 0 resharded already?
        if torch.is_grad_enabled() and mod.training and probe["block0_weight_in_forward"] is None:
            probe["block0_weight_in_forward"] = type(blocks[0].attn.Wqkv.weight).__name__

    blocks[0].register_forward_pre_hook(count)
    blocks[1].register_forward_pre_hook(look)
    if init_to is not None:
        sd = gather_full_state_dict(tr.model, rank == 0)
        if rank == 0:
            save_file(sd, str(tmp / init_to))
    s = tr.fit()
    (tmp / name / f"rank{{rank}}-{{s['steps']}}.json").write_text(json.dumps(
        {{"local": local, "total": sum(p.numel() for p in tr.model.parameters()), "eval_loss": s["eval_loss"],
         "resumed_from": s["resumed_from"], "s": time.time() - t0, **probe}}))

run("ddp")
run("fsdp", init_to="fsdp_init.safetensors", fsdp_config={{"verbose": True}}, export_folder=str(tmp / "fsdp" / "hf"))
run("sharded", fsdp_config={{"state_dict_type": "sharded"}}, max_duration="2ba")
run("sharded", fsdp_config={{"state_dict_type": "sharded"}}, autoresume=True)
run("ddp_to_fsdp", fsdp_config={{}}, load_path=str(tmp / "ddp" / "ck" / "ep0-ba2"))
run("grow_ddp", load_path=str(tmp / "one" / "ck" / "ep0-ba2"))  # a 1-process checkpoint on 2 ranks
run("grow_fsdp", fsdp_config={{}}, load_path=str(tmp / "one" / "ck" / "ep0-ba2"))
run("hsdp", save_folder=None, fsdp_config={{"sharding_strategy": "HYBRID_SHARD", "activation_checkpointing": True,
    "forward_prefetch": True, "backward_prefetch_limit": 2, "limit_all_gathers": True, "mixed_precision": "PURE"}})
run("zero2", save_folder=None, fsdp_config={{"sharding_strategy": "SHARD_GRAD_OP", "sync_module_states": True,
    "cpu_offload": True, "activation_cpu_offload": True}})  # both offloads: ignored on CPU, with a warning
run("from_hf", save_folder=None, model=str(tmp / "fsdp" / "hf"), fsdp_config={{"sync_module_states": True}})
run("weights_only", fsdp_config={{}}, max_duration="2ba", load_path=str(tmp / "one" / "ck" / "ep0-ba2"),
    load_weights_only=True, load_ignore_keys=["state/model/model.transformer.wte*"],  # into the shards
    callbacks={{"hf_checkpointer": {{"save_folder": str(tmp / "weights_only" / "hfck"), "save_interval": "1ba",
                                    "precision": "bfloat16"}}}})  # gathered from the shards
import gc
gc.collect()  # the runs' DDP/FSDP modules (and their gloo work objects) go before the group, not at teardown
dist.destroy_process_group()
"""


GROW = r"""
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.helpers import pattern_data, tiny_run
from tests.train.test_train_fsdp import COMMON
from mptkit.train.config import config_from_dict
from mptkit.train.data import TensorDataset
from mptkit.train.trainer import Trainer

cfg = config_from_dict(tiny_run(Path(sys.argv[2]), **{{**COMMON, "load_path": sys.argv[1]}}))
Trainer(cfg, train_dataset=TensorDataset(pattern_data(64)), eval_dataset=TensorDataset(pattern_data(5, seed=1))).fit()
"""


def _torchrun(script: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--monitor-interval", "0.1", str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp")
    script = tmp / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    _fit(tmp / "one")  # the uninterrupted one-process run; its ep0-ba2 is resumed on 2 ranks by the worker
    r = _torchrun(script, 2, str(tmp))
    assert r.returncode == 0, r.stderr[-4000:]
    (tmp / "worker.log").write_text(r.stderr)
    return tmp


def _cfg(tmp: Path, **over):
    return config_from_dict(tiny_run(tmp, **{**COMMON, **over}))


def _fit(tmp: Path, **over) -> dict:
    return Trainer(_cfg(tmp, **over), train_dataset=TensorDataset(pattern_data(64)),
                   eval_dataset=TensorDataset(pattern_data(5, seed=1))).fit()


def _weights(ckpt: Path) -> dict:
    return load_file(str(ckpt / "model" / "model.safetensors"))


def _steps(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "train_loss" in r]


def _close(a: dict, b: dict, rtol=1e-4, atol=1e-5) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.slow
def test_fsdp_initial_weights_are_the_unsharded_init(runs):
    """Built on meta and initialised leaf by leaf after sharding: bitwise the single-process init."""
    from mptkit.train.recipe_data import build_model
    from mptkit.train.trainer import seed_everything

    cfg = _cfg(runs / "plain")
    seed_everything(cfg.seed)
    plain = build_model(cfg, torch.device("cpu"))
    got = load_file(str(runs / "fsdp_init.safetensors"))
    ref = {k: v for k, v in plain.state_dict().items() if k in got}
    assert ref.keys() == got.keys()
    for k, v in ref.items():
        assert torch.equal(v, got[k]), k


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_each_rank_holds_half(runs):
    ddp, fsdp = _steps(runs / "ddp"), _steps(runs / "fsdp")
    assert len(ddp) == len(fsdp) == 4
    assert ddp[0]["train_loss"] == fsdp[0]["train_loss"]  # same init, same first forward
    for a, b in zip(ddp, fsdp, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["lr"] == a["lr"]
    _close(_weights(runs / "ddp" / "ck" / "ep0-ba4"), _weights(runs / "fsdp" / "ck" / "ep0-ba4"))
    sa = ck.load_trainer_state(runs / "ddp" / "ck" / "ep0-ba4")
    sb = ck.load_trainer_state(runs / "fsdp" / "ck" / "ep0-ba4")
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    for i, st in sa["optimizer"]["state"].items():  # the same layout (indices, full tensors) as DDP's
        _close(st, sb["optimizer"]["state"][i], rtol=1e-4, atol=1e-7)
    # the evaluation (5 samples: ranks run 2 and 1 batches, FSDP pads) gives DDP's loss
    ev = {n: json.loads((runs / n / "rank0-4.json").read_text())["eval_loss"] for n in ("ddp", "fsdp")}
    assert ev["fsdp"] == pytest.approx(ev["ddp"], rel=1e-6)
    # memory: each FSDP rank holds its half of every parameter; each DDP rank all of them
    for r in (0, 1):
        d = json.loads((runs / "ddp" / f"rank{r}-4.json").read_text())
        f = json.loads((runs / "fsdp" / f"rank{r}-4.json").read_text())
        assert d["local"] == d["total"] == f["total"]
        assert abs(f["local"] - f["total"] / 2) <= 64, f  # dim-0 chunks: uneven by at most a row per tensor
    loc = [json.loads((runs / "fsdp" / f"rank{r}-4.json").read_text())["local"] for r in (0, 1)]
    assert sum(loc) == f["total"]
    # the export at the end of an FSDP run holds the final (gathered) weights
    ex = load_file(str(runs / "fsdp" / "hf" / "model.safetensors"))
    fin = _weights(runs / "fsdp" / "ck" / "ep0-ba4")
    assert all(torch.equal(ex[k], fin[k]) for k in fin)


@pytest.mark.slow
def test_other_strategies_train_like_ddp(runs):
    """HYBRID_SHARD (mesh 1x2) + activation checkpointing + prefetching, SHARD_GRAD_OP + sync_module_states (+ the
    offloads, which CPU ranks ignore with a warning) train like DDP, and do what the strategies say, seen from
    the blocks: FULL_SHARD (and HYBRID_SHARD within its group) has block 0 resharded (a DTensor shard) by the
    time block 1 runs forward, SHARD_GRAD_OP keeps it gathered (a plain full Parameter) until backward;
    activation checkpointing runs every block's forward twice per microbatch (forward, then the recomputation
    in backward)."""
    log = (runs / "worker.log").read_text()
    assert "fsdp_config.cpu_offload: parameters are already in CPU memory" in log
    assert "fsdp_config.activation_cpu_offload: activations are already in CPU memory" in log
    ddp = _steps(runs / "ddp")
    for name in ("hsdp", "zero2"):
        other = _steps(runs / name)
        assert [r["step"] for r in other] == [1, 2, 3, 4]
        for a, b in zip(ddp, other, strict=True):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5), name
    probe = {n: [json.loads((runs / n / f"rank{r}-4.json").read_text()) for r in (0, 1)]
             for n in ("ddp", "fsdp", "hsdp", "zero2")}
    microbatches = 4 * 8 // 2 // 2  # 4 steps, 8 samples over 2 ranks, microbatch 2: per rank
    for name, resharded, recomputed in (("fsdp", True, False), ("hsdp", True, True), ("zero2", False, False)):
        for rec in probe[name]:
            assert rec["block0_weight_in_forward"] == ("DTensor" if resharded else "Parameter"), (name, rec)
            assert rec["forwards"] == microbatches * (2 if recomputed else 1), (name, rec)
    assert all(rec["forwards"] == microbatches for rec in probe["ddp"])


@pytest.mark.slow
def test_fsdp_starts_from_pretrained_weights(runs, tmp_path):
    """A model folder (loaded on CPU, then sharded, with sync_module_states) trains like one process does."""
    _fit(tmp_path, model=str(runs / "fsdp" / "hf"), save_folder=None)
    one, two = _steps(tmp_path), _steps(runs / "from_hf")
    assert two[0]["train_loss"] < _steps(runs / "fsdp")[0]["train_loss"]  # trained weights, not a fresh init
    for a, b in zip(one, two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_full_checkpoints_cross_between_fsdp_ddp_and_one_process(runs, tmp_path):
    """An FSDP full checkpoint resumes in one process; a DDP checkpoint resumes under FSDP; both end where the
    uninterrupted run ends (float rounding: the world size changes the order of the gradient sums)."""
    s = _fit(tmp_path / "one", fsdp_config={}, load_path=str(runs / "fsdp" / "ck" / "ep0-ba2"))
    assert s["resumed_from"] and s["steps"] == 4
    _close(_weights(tmp_path / "one" / "ck" / "ep0-ba4"), _weights(runs / "fsdp" / "ck" / "ep0-ba4"))
    rec = json.loads((runs / "ddp_to_fsdp" / "rank0-4.json").read_text())
    assert rec["resumed_from"].endswith("ep0-ba2")
    _close(_weights(runs / "ddp_to_fsdp" / "ck" / "ep0-ba4"), _weights(runs / "ddp" / "ck" / "ep0-ba4"))


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_more_ranks(runs):
    """Growing 1 -> 2 ranks: each rank takes its half of the global batches that follow (the data position is
    rescaled, not indexed by rank), so the DDP and the FSDP continuation end where the one-process run ends
    (to rounding), with the same per-step losses after the resume."""
    one = _steps(runs / "one")
    assert [r["step"] for r in one] == [1, 2, 3, 4]
    for name in ("grow_ddp", "grow_fsdp"):
        for r in (0, 1):
            rec = json.loads((runs / name / f"rank{r}-4.json").read_text())
            assert rec["resumed_from"].endswith("ep0-ba2"), name
        grown = _steps(runs / name)
        assert [r["step"] for r in grown] == [3, 4], name
        for a, b in zip(one[2:], grown, strict=True):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5), name
        _close(_weights(runs / name / "ck" / "ep0-ba4"), _weights(runs / "one" / "ck" / "ep0-ba4"))
        st = ck.load_trainer_state(runs / name / "ck" / "ep0-ba4")
        assert st["world_size"] == 2 and st["data"] == [{"epoch": 0, "offset": 16}] * 2, st["data"]


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_four_ranks(runs, tmp_path):
    """Growing 2 -> 4 DDP ranks: ranks 2 and 3 have no saved position of their own (the IndexError this
    fixes); the rescaled position gives every rank its quarter of the same global batches, so the run ends
    where the uninterrupted 2-rank run ends (to rounding)."""
    script = tmp_path / "grow.py"
    script.write_text(GROW.format(root=str(ROOT)))
    r = _torchrun(script, 4, str(runs / "ddp" / "ck" / "ep0-ba2"), str(tmp_path / "four"))
    assert r.returncode == 0, r.stderr[-4000:]
    _close(_weights(tmp_path / "four" / "ck" / "ep0-ba4"), _weights(runs / "ddp" / "ck" / "ep0-ba4"))
    st = ck.load_trainer_state(tmp_path / "four" / "ck" / "ep0-ba4")
    assert st["world_size"] == 4 and st["data"] == [{"epoch": 0, "offset": 8}] * 4


def test_data_position_for_ranks_the_checkpoint_did_not_have():
    """A 2-rank position list read by 3 ranks: 16 consumed samples do not split over 3, so each rank keeps
    its saved position if it had one and a new rank starts the checkpoint's epoch (with the warning)."""
    from types import SimpleNamespace

    from mptkit.train.distributed import DistInfo

    st = {"data": [{"epoch": 1, "offset": 8}] * 2, "world_size": 2, "epoch": 1}
    pos = [Trainer._data_position(SimpleNamespace(dist=DistInfo(rank=r, world_size=3)), st) for r in range(3)]
    assert pos == [{"epoch": 1, "offset": 8}, {"epoch": 1, "offset": 8}, {"epoch": 1, "offset": 0}]
    four = [Trainer._data_position(SimpleNamespace(dist=DistInfo(rank=r, world_size=4)), st) for r in range(4)]
    assert four == [{"epoch": 1, "offset": 4}] * 4  # exact: 16 samples = 4 per rank


@pytest.mark.slow
def test_sharded_checkpoints(runs, tmp_path):
    save = runs / "sharded" / "ck"
    assert [p.name for p in ck.list_checkpoints(save)] == ["ep0-ba4", "ep0-ba2"]
    assert not list(save.glob(".*"))  # no temporary folder left behind
    c2 = save / "ep0-ba2"
    man = ck.read_manifest(c2)
    assert man["sharded"] is True and ck.verify_checkpoint(c2) is None
    assert any(f.startswith("dcp/") for f in man["files"]) and "model/config.json" in man["files"]
    assert not (c2 / "model" / "model.safetensors").exists()
    assert ck.load_trainer_state(c2)["optimizer"] is None  # it lives in dcp/
    # resumed under FSDP from ep0-ba2: bitwise the run that never stopped
    second = json.loads((runs / "sharded" / "rank0-4.json").read_text())
    assert second["resumed_from"].endswith("ep0-ba2")
    out = consolidate_sharded_checkpoint(save / "ep0-ba4", tmp_path / "hf")
    got, ref = load_file(str(out / "model.safetensors")), _weights(runs / "fsdp" / "ck" / "ep0-ba4")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(CheckpointError, match="sharded checkpoint"):
        open_model_source(save, consolidate=False)
    # `mptkit export hf RUN` consolidates the newest sharded checkpoint on the fly (a temporary folder)
    from mptkit.export.hf import export_hf
    from mptkit.model import MPTForCausalLM

    export_hf(save, tmp_path / "exported")
    a, b = MPTForCausalLM.from_pretrained(tmp_path / "exported"), MPTForCausalLM.from_pretrained(out)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # generate / serve / eval load a run the same way (io.open_model_source): the same weights
    with open_model_source(save) as source:
        c = source.load_model()
    assert all(torch.equal(x, y) for x, y in zip(c.state_dict().values(), b.state_dict().values()))
    # one process resumes from the sharded checkpoint (DCP reshards on load)
    s = _fit(tmp_path / "one", load_path=str(c2))
    assert s["resumed_from"] and s["steps"] == 4
    _close(_weights(tmp_path / "one" / "ck" / "ep0-ba4"), ref)
    # a corrupted shard makes the checkpoint invalid: autoresume falls back to the previous one
    bad = tmp_path / "bad"
    shutil.copytree(save, bad)
    shard = next(p for p in sorted((bad / "ep0-ba4" / "dcp").iterdir()) if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-8])
    assert ck.find_latest_checkpoint(bad).name == "ep0-ba2"


@pytest.mark.slow
def test_load_weights_only_into_fsdp_shards(runs, tmp_path):
    """load_path + load_weights_only (with load_ignore_keys) on 2 FSDP ranks: the weights are set shard by shard;
    the run ends with the weights of the same run in one process; its hf_checkpointer folders hold the gathered
    weights."""
    one = _fit(tmp_path / "one", max_duration="2ba", load_path=str(runs / "one" / "ck" / "ep0-ba2"),
               load_weights_only=True, load_ignore_keys=["state/model/model.transformer.wte*"])
    assert one["steps"] == 2 and one["resumed_from"] is None
    final = _weights(runs / "weights_only" / "ck" / "ep0-ba2")
    _close(final, _weights(tmp_path / "one" / "ck" / "ep0-ba2"))
    # callbacks.hf_checkpointer under FSDP: the gathered weights in bf16, every batch and at the end
    hf = runs / "weights_only" / "hfck" / "huggingface"
    assert sorted(p.name for p in hf.iterdir()) == ["ba1", "ba2"]
    got = load_file(str(hf / "ba2" / "model.safetensors"))
    assert got.keys() == final.keys() and all(torch.equal(got[k], final[k].to(torch.bfloat16)) for k in got)


@pytest.mark.parametrize(("cfg", "match"), [
    ({"sharding_strategy": "FULL_SHARD", "limit_all_gather": True}, "did you mean 'fsdp_config.limit_all_gathers'"),
    ({"sharding_strategy": "FULL_SHRAD"}, "did you mean 'FULL_SHARD'"),
    ({"mixed_precision": "PUER"}, "did you mean 'PURE'"),
    ({"mixed_precision": {"param_dtype": "bf16", "reduce_dtpe": "fp32"}}, "mixed_precision.reduce_dtype"),
    ({"mixed_precision": {"param_dtype": "int8"}}, "param_dtype: 'int8' is not one of"),
    ({"state_dict_type": "local"}, "'local'.*not supported"),
    ({"state_dict_type": "shraded"}, "did you mean 'sharded'"),
    ({"backward_prefetch": "BACKWARD_PRES"}, "did you mean 'BACKWARD_PRE'"),
    ({"activation_checkpointing": "yes"}, "activation_checkpointing: expected true or false"),
    ({"te_shard_fp8_weight": True}, "te_shard_fp8_weight: not supported"),
    ({"forward_prefetch_limit": 0}, "forward_prefetch_limit: expected an integer"),
    ({"data_parallel_replicate_degree": 2}, "needs sharding_strategy: HYBRID_SHARD"),
])
def test_bad_fsdp_config_is_a_clear_error(tmp_path, cfg, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(tiny_run(tmp_path, fsdp_config=cfg))


def test_checking_fsdp_config_does_not_load_the_sharding_runtime(tmp_path):
    """The recipe validator reads fsdp_config through mptkit.train.fsdp_config alone: checking a recipe (a good
    fsdp_config and a bad one) leaves the torch.distributed runtime module mptkit.train.fsdp unimported."""
    code = ("import sys, pathlib\n"
            "from mptkit.errors import ConfigError\n"
            "from mptkit.train.config import config_from_dict\n"
            "from tests.helpers import tiny_run\n"
            f"tmp = pathlib.Path({str(tmp_path)!r})\n"
            "config_from_dict(tiny_run(tmp, fsdp_config={'sharding_strategy': 'SHARD_GRAD_OP'}))\n"
            "try:\n"
            "    config_from_dict(tiny_run(tmp, fsdp_config={'sharding_strategy': 'FULL_SHRAD'}))\n"
            "except ConfigError as e:\n"
            "    assert 'FULL_SHARD' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('the bad fsdp_config passed')\n"
            "print(sorted(m for m in sys.modules if m.startswith('mptkit.train.fsdp')))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[-2] == "['mptkit.train.fsdp_config']", r.stdout


def test_fsdp_config_parsing_and_mesh_checks():
    s = parse_fsdp_config({"sharding_strategy": "shard_grad_op", "state_dict_type": "sharded",
                           "activation_checkpointing_reentrant": False, "use_orig_params": True, "verbose": True})
    assert s.sharding_strategy == "SHARD_GRAD_OP" and not s.reshard and s.sharded_checkpoints
    assert parse_fsdp_config({}) == FSDPSettings() and FSDPSettings().reshard
    assert parse_fsdp_config(None) is None
    with pytest.raises(ConfigError, match="data_parallel_shard_degree to a divisor of 4"):
        build_mesh(FSDPSettings(sharding_strategy="HYBRID_SHARD", data_parallel_shard_degree=3), 4,
                   torch.device("cpu"))
    with pytest.raises(ConfigError, match="use sharding_strategy HYBRID_SHARD"):
        build_mesh(FSDPSettings(data_parallel_shard_degree=2), 4, torch.device("cpu"))


def test_fsdp_config_with_one_process_trains_unsharded(tmp_path):
    """A recipe with fsdp_config runs in a single process too (unsharded, like llm-foundry on one GPU): the
    same losses and final weights, bit for bit, as the recipe without fsdp_config."""
    def fit(name, **over):
        t = Trainer(_cfg(tmp_path / name, max_duration="2ba", save_folder=None, **over),
                    train_dataset=TensorDataset(pattern_data(64)),
                    eval_dataset=TensorDataset(pattern_data(5, seed=1)))
        assert t.fit()["steps"] == 2
        return _steps(tmp_path / name), {k: v.detach().clone() for k, v in t.model.state_dict().items()}

    steps, weights = fit("fsdp", fsdp_config={"sharding_strategy": "FULL_SHARD"})
    ref_steps, ref_weights = fit("plain")
    assert [r["train_loss"] for r in steps] == [r["train_loss"] for r in ref_steps]
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


@pytest.mark.parametrize(("mp", "precision", "match"), [
    ({"param_dtype": "fp16"}, "fp32", "mixed_precision.param_dtype fp16 is not supported"),
    ({"param_dtype": "bf16", "reduce_dtype": "float16"}, "fp32", "mixed_precision.reduce_dtype fp16 is not supported"),
    ("DEFAULT", "amp_fp16", "precision amp_fp16 with fsdp_config is not supported"),
    ("PURE", "amp_fp16", "precision amp_fp16 with fsdp_config is not supported"),
])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fp16_compute_under_fsdp_is_refused(mp, precision, match, device):
    """fp16 without a (sharded) loss scaler underflows: refused whether it comes from precision or from
    mixed_precision's dtypes, on CUDA and on CPU alike (not silently turned into fp32 there)."""
    from mptkit.train.fsdp import compute_dtypes

    s = parse_fsdp_config({"mixed_precision": mp})
    with pytest.raises(ConfigError, match=match):
        compute_dtypes(s, precision, torch.device(device))
    assert compute_dtypes(parse_fsdp_config({"mixed_precision": {"param_dtype": "bf16"}}), "fp32",
                          torch.device("cpu")) == (torch.float32, torch.float32)  # bf16 on CPU: fp32, a warning


def test_materialize_refuses_a_parameter_the_init_misses():
    """materialize_sharded starts every full tensor as NaN: a parameter init_weights does not cover is a
    TrainError naming it, not uninitialised memory kept silently (here: the init skips the norms)."""
    from mptkit.errors import TrainError
    from mptkit.model import MPTForCausalLM
    from mptkit.model.config import MPTConfig
    from mptkit.model.init import init_weights
    from mptkit.train.fsdp import materialize_sharded
    from tests.helpers import TINY_MODEL

    def build():
        cfg = MPTConfig.from_dict(dict(TINY_MODEL), where="model", strict=True)
        cfg.init_device = "meta"
        return MPTForCausalLM(cfg)

    model = build()
    torch.manual_seed(0)
    materialize_sharded(model, torch.device("cpu"), lambda m: init_weights(m, model.config))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model = build()

    def skip_norms(m):
        if not hasattr(m, "normalized_shape"):
            init_weights(m, model.config)

    with pytest.raises(TrainError, match=r"parameter transformer\.blocks\.0\.norm_1\.weight .*uninitialised"):
        materialize_sharded(model, torch.device("cpu"), skip_norms)


class _RunsOnUnpickle:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_process_sharded_checkpoint(folder: Path) -> None:
    """A sharded checkpoint's model/ + dcp/ (written by one process: DCP needs no process group)."""
    import warnings

    from mptkit.model import MPTForCausalLM
    from mptkit.model.config import MPTConfig
    from mptkit.train.fsdp import dcp_save
    from mptkit.train.optim import build_optimizer
    from tests.helpers import TINY_MODEL

    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig.from_dict(dict(TINY_MODEL), where="model", strict=True))
    opt = build_optimizer(model, {"name": "decoupled_adamw", "lr": 1e-3})
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.config.save(folder / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_save(model, opt, folder / "dcp")


def test_sharded_checkpoint_metadata_is_not_unpickled_blindly(tmp_path):
    """torch's FileSystemReader reads .metadata with pickle.load: mptkit's reader allows only DCP's metadata
    types, so a .metadata that references os.system is a CheckpointError and the command never runs; the
    optimizer's non-tensor items are read weights-only (a payload there is refused too)."""
    import io
    import pickle

    from mptkit.io.dcp import safe_planner
    from mptkit.train.fsdp import dcp_load

    ckpt = tmp_path / "ck"
    _one_process_sharded_checkpoint(ckpt)
    out = consolidate_sharded_checkpoint(ckpt, tmp_path / "hf")  # the genuine metadata passes the allow-list
    assert (out / "model.safetensors").is_file()
    marker = tmp_path / "pwned"
    meta = ckpt / "dcp" / ".metadata"
    meta.write_bytes(pickle.dumps({"storage_data": _RunsOnUnpickle(marker)}))
    with pytest.raises(CheckpointError, match=r"refusing to load this sharded checkpoint.*\.system"):
        consolidate_sharded_checkpoint(ckpt, tmp_path / "hf2")
    from mptkit.model import MPTForCausalLM, load_model_config

    with pytest.raises(CheckpointError, match="refusing"):
        dcp_load(MPTForCausalLM(load_model_config(ckpt / "model")), None, ckpt / "dcp")
    assert not marker.exists() and not (tmp_path / "hf2").exists()
    item = type("Item", (), {"dest_index": type("I", (), {"fqn": "optim.param_groups.0.lr"})()})()
    with pytest.raises(CheckpointError, match="refusing a non-tensor item"):
        safe_planner().load_bytes(item, io.BytesIO(pickle.dumps(_RunsOnUnpickle(marker), protocol=2)))
    assert not marker.exists()


def _meta_config():
    from mptkit.model.config import MPTConfig
    from tests.helpers import TINY_MODEL

    return MPTConfig.from_dict(dict(TINY_MODEL), where="model", strict=True)


def test_sharded_save_each_rank_hashes_its_own_shards(tmp_path):
    """Rank 0 of a (simulated) 2-rank sharded save takes rank 1's shard digests from the gather instead of
    reading rank 1's shard itself (the manifest holds exactly what rank 1 reported); a rank that reports a
    failure makes rank 0 raise it, broadcast it, and leave no checkpoint behind."""
    def write_shards(folder: Path) -> None:
        folder.mkdir(parents=True)
        for name, data in (("__0_0.distcp", b"rank0"), ("__1_0.distcp", b"rank1"), (".metadata", b"meta")):
            (folder / name).write_bytes(data)

    reported = {"dcp/__1_0.distcp": {"sha256": "from-rank-1", "bytes": 5}}
    sent: list = []
    kw = {"write_shards": write_shards, "broadcast": sent.append, "rank": 0, "model_config": _meta_config(),
          "trainer_state": {"step": 2}, "epoch": 0, "step": 2}
    path = ck.save_sharded_checkpoint(tmp_path / "a", gather=lambda own: [own, reported], **kw)
    files = ck.read_manifest(path)["files"]
    assert files["dcp/__1_0.distcp"] == reported["dcp/__1_0.distcp"]  # not re-hashed by rank 0
    assert files["dcp/__0_0.distcp"]["bytes"] == 5 and "dcp/.metadata" in files and "model/config.json" in files
    assert sent[-1] == str(path)  # the final path goes to every rank
    sent.clear()
    failed = {"mptkit-checkpoint-failed": "OSError: [Errno 28] No space left on device"}
    with pytest.raises(CheckpointError, match="rank 1 could not sync and hash its shard: OSError.*No space"):
        ck.save_sharded_checkpoint(tmp_path / "b", gather=lambda own: [own, failed], **kw)
    assert "No space left" in sent[-1]["mptkit-checkpoint-failed"]
    assert ck.list_checkpoints(tmp_path / "b") == [] and not list((tmp_path / "b").glob(".*"))


def test_sharded_save_rank0_failure_reaches_every_rank(tmp_path):
    """Rank 0 cannot create the checkpoint folder: it broadcasts a failure marker instead of the path, so
    the other ranks raise rank 0's error at once (instead of waiting in the broadcast until dist_timeout),
    without writing anything."""
    (tmp_path / "file").write_text("in the way")
    sent: list = []
    common = {"gather": lambda own: pytest.fail("no gather after a failed start"), "model_config": _meta_config(),
              "trainer_state": {}, "epoch": 0, "step": 2}
    with pytest.raises(OSError):
        ck.save_sharded_checkpoint(tmp_path / "file" / "ck", write_shards=lambda f: pytest.fail("no shards"),
                                   broadcast=sent.append, rank=0, **common)
    assert len(sent) == 1 and "mptkit-checkpoint-failed" in sent[0]
    with pytest.raises(CheckpointError, match="rank 0 could not create its folder: .*Error"):
        ck.save_sharded_checkpoint(tmp_path / "file" / "ck", write_shards=lambda f: pytest.fail("no shards"),
                                   broadcast=lambda _: sent[0], rank=1, **common)
    # a failure after the shards (here: rank 0's manifest) is broadcast at the end: rank 1 raises it too
    answers = iter([str(tmp_path / "tmp"), {"mptkit-checkpoint-failed": "OSError: disk full"}])
    got = []
    with pytest.raises(CheckpointError, match="failed on rank 0: OSError: disk full"):
        ck.save_sharded_checkpoint(tmp_path / "x", write_shards=lambda f: None, broadcast=lambda _: next(answers),
                                   rank=1, **{**common, "gather": got.append})
    assert got == [{}]  # rank 1 took part in the gather (no shards of its own in this fake)
