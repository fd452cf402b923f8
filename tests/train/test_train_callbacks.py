"""The recipe's callbacks do what their llm-foundry / composer namesakes do, through the trainer:
kill_loss_spike (KillLossSpike's rules and defaults), scheduled_gc (ScheduledGarbageCollector: automatic gc
off, gc.collect() on schedule, restored after), optimizer_monitor (OptimizerMonitor's per-parameter norms in
metrics.jsonl); and loader / callback options that change nothing are named in a warning, never silent."""

from __future__ import annotations

import gc
import json
import logging
import math
import random
import sys

import pytest
import torch

from mptkit.errors import ConfigError, TrainError
from mptkit.train.config import load_run_config
from mptkit.train.metrics import LossSpikeMonitor
from mptkit.train.trainer import Trainer
from tests.helpers import datasets, make_cfg, tiny_run


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _trainer(cfg):
    tr, ev = datasets()
    return Trainer(cfg, train_dataset=tr, eval_dataset=ev)


# ----------------------------------------------------------------------------------- kill_loss_spike


def test_loss_spike_rules_and_defaults_are_llm_foundrys():
    """Defaults: patience 4, multiplier 2, window max(100, 5% of the run), loss_cap 10 (then the first full
    window's largest loss, at most 10), log only. Nothing is judged before the window is full; a loss >= 2x the
    window mean is an outlier, and patience + 1 consecutive outliers are a spike; outliers enter the window;
    half the window above loss_cap from step 2 x window on is a high loss; NaN stops at once."""
    m = LossSpikeMonitor()
    assert (m.patience, m.mult, m.window_size, m.loss_cap, m.log_only) == (4, 2.0, 100, 10.0, True)
    assert LossSpikeMonitor(total_steps=4000).window_size == 200 and LossSpikeMonitor(total_steps=900).window_size == 100

    m = LossSpikeMonitor(patience=2, window_size=20, log_only=False)
    for step in range(1, 20):  # the window is not full yet: even a huge loss is not judged
        assert m(step, 100.0 if step == 10 else 1.0) is None
    assert m.outliers == 0
    m(20, 1.0)  # window of 20 full
    m(21, 2 * sum(m.window) / 20)  # exactly 2x the mean counts (>=)
    assert m.outliers == 1
    m(22, 1.0)  # a normal loss resets the count
    assert m.outliers == 0
    assert m(23, 100.0) is None and m(24, 100.0) is None  # 2 consecutive outliers: within patience 2
    assert list(m.window)[-2:] == [100.0, 100.0]  # outliers enter the window
    with pytest.raises(TrainError, match="loss spike at step 25: 3 consecutive"):
        m(25, 100.0)

    quiet = LossSpikeMonitor(patience=0, window_size=5)  # log_only by default: events, no error
    for step in range(1, 6):
        quiet(step, 1.0)
    ev = quiet(6, 50.0)
    assert ev["event"] == "loss_spike" and ev["outlier_counter"] == 1 and ev["running_loss_avg"] == 1.0
    assert quiet.spikes == 1

    hi = LossSpikeMonitor(window_size=4, loss_cap=5.0, log_only=False)
    for step in range(1, 8):  # losses above the cap, not outliers; judged only from step 2 x window = 8
        assert hi(step, 6.0) is None
    with pytest.raises(TrainError, match="high loss at step 8: 4 of the last 4 losses are above loss_cap 5"):
        hi(8, 6.0)

    derived = LossSpikeMonitor(window_size=4)  # no loss_cap: the first full window's largest loss
    for step, x in enumerate([3.0, 4.0, 2.0, 3.0, 4.5, 4.5, 4.5], start=1):
        assert derived(step, x) is None
    assert derived.loss_cap == 4.0
    assert derived(8, 4.5)["event"] == "high_loss"  # 3 of the window's 4 losses above 4.0
    capped = LossSpikeMonitor(window_size=2)
    for step in range(1, 4):
        capped(step, 12.0)
    assert capped.loss_cap == 10.0
    with pytest.raises(TrainError, match="diverged"):
        capped(4, float("nan"))


def _spike_reference(losses, window_size, loss_cap=None, patience=4, mult=2.0):
    """The monitor's rules written out the plain way (the whole window summed and counted every step): the
    events, and the window's mean before each step."""
    window, cap, cap_set, outliers, events, means = [], loss_cap or 10.0, loss_cap is not None, 0, [], []
    for step, loss in enumerate(losses, start=1):
        means.append(sum(window) / len(window) if window else None)
        if len(window) == window_size:
            if not cap_set:
                cap, cap_set = min(max(window), 10.0), True
            mean = sum(window) / len(window)
            ev = None
            if loss >= mean * mult:
                outliers += 1
                if outliers > patience:
                    ev = ("loss_spike", step, outliers, mean)
            else:
                outliers = 0
            if ev is None and step >= 2 * window_size:
                high = sum(1 for x in window if x > cap)
                if high >= window_size / 2:
                    ev = ("high_loss", step, high, cap)
            if ev is not None:
                events.append(ev)
            window.pop(0)
        window.append(loss)
    return events, means


@pytest.mark.parametrize("loss_cap", [None, 3.5])
def test_loss_spike_running_sums_equal_the_whole_window_computation(loss_cap):
    """The monitor's running window sum and high-loss count give the events the whole-window computation gives,
    over a long random series with spikes, high-loss stretches and the cap; its mean is the window's exact mean,
    correctly rounded, within 1e-12 of the plain float sum's."""
    from fractions import Fraction

    rng = random.Random(0)
    losses, x = [], 3.0
    while len(losses) < 6000:
        r = rng.random() if len(losses) > 60 else 1.0  # a quiet first window: a derived cap of about 3.3
        if r < 0.01:  # a spike: a few consecutive outliers
            losses += [x * rng.uniform(2.5, 40.0) for _ in range(rng.randint(1, 8))]
        elif r < 0.015:  # a high-loss stretch, above the cap but no outlier
            losses += [rng.uniform(3.6, 5.5) for _ in range(rng.randint(20, 120))]
        else:
            x = min(max(x + rng.gauss(0, 0.05), 0.5), 4.0)
            losses.append(x * rng.uniform(0.9, 1.1))
    w = 50
    m = LossSpikeMonitor(window_size=w, loss_cap=loss_cap)
    want, means = _spike_reference(losses, w, loss_cap)
    got = []
    for step, (loss, plain) in enumerate(zip(losses, means), start=1):
        if step > 1:
            assert math.isclose(m.running_mean, plain, rel_tol=1e-12)
        if step % 10 == 0:  # the exact mean (Fractions are slow: every 10th step)
            window = list(m.window)
            assert m.running_mean == float(Fraction(sum(map(Fraction, window)), len(window)))
        ev = m(step, loss)
        if ev is not None:
            got.append((ev["event"], ev["step"], ev.get("outlier_counter", ev.get("high_losses")),
                        ev.get("running_loss_avg", ev.get("loss_cap"))))
    assert len(want) > 20 and {e[0] for e in want} == {"loss_spike", "high_loss"}
    assert [e[:3] for e in got] == [e[:3] for e in want]
    assert all(math.isclose(a[3], b[3], rel_tol=1e-12) for a, b in zip(got, want))
    assert m.loss_cap == (loss_cap if loss_cap is not None else min(max(losses[:w]), 10.0))


def test_kill_loss_spike_through_the_trainer(tmp_path, monkeypatch):
    """The recipe's kill_loss_spike reaches the trainer's monitor: configured without log_only it only logs
    (llm-foundry's default) and writes the event to metrics.jsonl; log_only: false stops the run. The
    window defaults to the run's length rule; unset keys keep llm-foundry's defaults."""
    real = Trainer._train_step

    def spiky(self, batch):  # the real step, with the loss reported 50x from step 6 on
        loss, gnorm = real(self, batch)
        return (loss * 50 if self.step >= 5 else loss), gnorm

    monkeypatch.setattr(Trainer, "_train_step", spiky)
    spike = {"window_size": 4, "patience": 1}
    t = _trainer(make_cfg(tmp_path / "a", callbacks={"kill_loss_spike": spike}))
    t.fit()
    assert (t.spike.window_size, t.spike.patience, t.spike.mult, t.spike.log_only) == (4, 1, 2.0, True)
    events = [r for r in _metrics(tmp_path / "a" / "run") if r.get("event") == "loss_spike"]
    assert events and events[0]["step"] == 7 and events[0]["outlier_counter"] == 2  # steps 6 and 7 outliers
    with pytest.raises(TrainError, match="loss spike at step 7"):
        _trainer(make_cfg(tmp_path / "b", callbacks={"kill_loss_spike": {**spike, "log_only": False}})).fit()
    assert _trainer(make_cfg(tmp_path / "c")).setup().spike.window_size == 100  # unconfigured: defaults, log only


# ----------------------------------------------------------------------------------- scheduled_gc


@pytest.mark.parametrize("keep", [False, True])
def test_scheduled_gc_disables_gc_and_collects_on_schedule(tmp_path, monkeypatch, keep):
    """callbacks.scheduled_gc {batch_interval: 3}: automatic gc is off for every training step, gc.collect()
    runs at the start, before batches 0, 3, 6, 9 (batches done), before and after each evaluation (gc on during
    evaluation unless eval_keep_disabled) and at the end; the interpreter's setting is restored afterwards."""
    calls = []
    real_collect = gc.collect

    def counting(*a):
        if sys._getframe(1).f_code.co_filename.endswith("callbacks.py"):
            calls.append((t.step, gc.isenabled()))
        return real_collect(*a)

    monkeypatch.setattr(gc, "collect", counting)
    during_steps, during_eval = [], []
    real_step, real_eval = Trainer._train_step, Trainer.evaluate

    def step(self, batch):
        during_steps.append(gc.isenabled())
        return real_step(self, batch)

    def evaluate(self):
        during_eval.append(gc.isenabled())
        return real_eval(self)

    monkeypatch.setattr(Trainer, "_train_step", step)
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    cfg = make_cfg(tmp_path, eval_interval="4ba",
                   callbacks={"scheduled_gc": {"batch_interval": 3, "eval_keep_disabled": keep}})
    t = _trainer(cfg)
    assert gc.isenabled()
    t.fit()
    assert gc.isenabled()  # restored
    assert during_steps == [False] * 12
    assert during_eval == [not keep] * 3  # evaluations at steps 4, 8 and the final one
    assert [s for s, _ in calls] == [0, 0, 3, 4, 4, 6, 8, 8, 9, 12, 12, 12]  # start, batches, evals, end
    gc.disable()
    try:  # a run started with gc off leaves it off
        _trainer(make_cfg(tmp_path / "off", callbacks={"scheduled_gc": {"batch_interval": 5}})).fit()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_scheduled_gc_restores_gc_when_the_run_fails(tmp_path, monkeypatch):
    """A run that stops with an error still turns automatic gc back on."""
    def boom(self, batch):
        raise TrainError("stop")

    monkeypatch.setattr(Trainer, "_train_step", boom)
    with pytest.raises(TrainError, match="stop"):
        _trainer(make_cfg(tmp_path, callbacks={"scheduled_gc": {"batch_interval": 2}})).fit()
    assert gc.isenabled()


# ----------------------------------------------------------------------------------- optimizer_monitor


@pytest.mark.parametrize("optimizer_metrics", [True, False])
def test_optimizer_monitor_logs_per_parameter_norms(tmp_path, optimizer_metrics):
    """callbacks.optimizer_monitor {batch_log_interval: 4}: steps 4, 8 and 12 of metrics.jsonl carry
    l2_norm/grad/<name> for every parameter and l2_norm/grad/global, their root sum of squares: the norm of
    the clipped gradient (min(grad_norm, 1.0) with clipping threshold 1.0); with log_optimizer_metrics the
    first-moment and weight norms after the step, equal at the last step to the trainer's own state."""
    cfg = make_cfg(tmp_path, callbacks={"optimizer_monitor": {"batch_log_interval": 4,
                                                              "log_optimizer_metrics": optimizer_metrics}})
    t = _trainer(cfg)
    t.fit()
    recs = [r for r in _metrics(tmp_path / "run") if "train_loss" in r]
    assert [r["step"] for r in recs if "l2_norm/grad/global" in r] == [4, 8, 12]
    names = [n for n, _ in t.model.named_parameters()]
    assert "transformer.blocks.0.attn.Wqkv.weight" in names
    for r in recs[3::4]:
        grads = [r[f"l2_norm/grad/{n}"] for n in names]
        assert math.isclose(r["l2_norm/grad/global"], math.sqrt(sum(g * g for g in grads)), rel_tol=1e-5)
        assert math.isclose(r["l2_norm/grad/global"], min(r["grad_norm"], 1.0), rel_tol=1e-4)
        assert all(g > 0 for g in grads)
        kinds = {k.split("/")[1] for k in r if k.startswith("l2_norm/")}
        assert kinds == ({"grad", "moment", "param"} if optimizer_metrics else {"grad"})
    if optimizer_metrics:
        last = recs[-1]
        for n, p in t.model.named_parameters():
            assert math.isclose(last[f"l2_norm/param/{n}"], torch.linalg.vector_norm(p.detach()).item(), rel_tol=1e-5)
            exp_avg = t.optimizer.state[p]["exp_avg"]
            assert math.isclose(last[f"l2_norm/moment/{n}"], torch.linalg.vector_norm(exp_avg).item(), rel_tol=1e-5)


_NORMS_WORKER = r"""
import json, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from mptkit.train import callbacks

dist.init_process_group("gloo")
torch.manual_seed(0)
full = [torch.randn(7, 5), torch.randn(3), torch.randn(4, 2, 3), torch.randn(1, 6), torch.randn(9)]
flat = init_device_mesh("cpu", (2,))
hsdp = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard"))
ts = [distribute_tensor(t, flat, [Shard(0)]) for t in full[:3]]
ts += [distribute_tensor(t, hsdp, [Replicate(), Shard(0)]) for t in full[3:]]
calls = []
real = DTensor.full_tensor
DTensor.full_tensor = lambda self, **k: calls.append(1) or real(self, **k)
got = callbacks._norms(ts)
want = [torch.linalg.vector_norm(t).item() for t in full]
if dist.get_rank() == 0:
    json.dump({"got": got, "want": want, "reductions": len(calls)}, open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_optimizer_monitor_norms_of_fsdp_shards_take_one_reduction_per_mesh(tmp_path):
    """Under FSDP (two gloo ranks, DTensor shards on a 1-D mesh and on a HYBRID_SHARD (replicate, shard) mesh,
    uneven and one-row tensors included) the monitor's norms are the whole tensors' norms, from one reduction
    per mesh and placement (not one per tensor)."""
    import os
    import subprocess
    from pathlib import Path

    script = tmp_path / "norms.py"
    script.write_text(_NORMS_WORKER)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "--monitor-interval", "0.1", str(script), str(tmp_path / "out.json")],
                       env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["reductions"] == 2
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(out["got"], out["want"], strict=True))


# ----------------------------------------------------------------------------------- keys that change nothing


def test_ignored_loader_and_callback_options_are_named_in_warnings(tmp_path, caplog):
    """Through the recipe loading path: each DataLoader key mptkit does not use (num_workers > 0, pin_memory,
    prefetch_factor, persistent_workers, timeout), a drop_last it does not follow, dataset separator ids and
    options of the always-on monitors each get a warning naming the key; keys matching what mptkit does
    do not."""
    import yaml

    run = tiny_run(tmp_path)
    loader = {"name": "text", "dataset": {"local": str(tmp_path / "data"), "eos_token_id": 0}, "num_workers": 8,
              "pin_memory": True, "prefetch_factor": 2, "persistent_workers": True, "timeout": 10,
              "drop_last": False}
    run.update(train_loader=loader,
               eval_loader={"name": "text", "dataset": {"local": str(tmp_path / "data"), "split": "val"},
                            "num_workers": 0, "drop_last": True},
               callbacks={"memory_monitor": {"memory_keys": {"peak": "x"}}, "lr_monitor": {}})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(run))
    with caplog.at_level(logging.WARNING, logger="mptkit.train.config"):
        load_run_config(recipe)
    warned = [r.getMessage().split(" is ignored")[0] for r in caplog.records]
    assert sorted(warned) == sorted([
        "train_loader.num_workers", "train_loader.pin_memory", "train_loader.prefetch_factor",
        "train_loader.persistent_workers", "train_loader.timeout", "train_loader.drop_last",
        "train_loader.dataset.eos_token_id", "eval_loader.drop_last", "callbacks.memory_monitor.memory_keys"])
    assert all("is ignored: " in r.getMessage() for r in caplog.records)
    caplog.clear()
    loader.update(num_workers=0, drop_last=True)
    for k in ("pin_memory", "prefetch_factor", "persistent_workers", "timeout"):
        del loader[k]
    del loader["dataset"]["eos_token_id"]
    run.update(train_loader=loader, callbacks={"lr_monitor": {}, "memory_monitor": {}, "runtime_estimator": {}})
    run["eval_loader"]["drop_last"] = False
    recipe.write_text(yaml.safe_dump(run))
    with caplog.at_level(logging.WARNING, logger="mptkit.train.config"):
        load_run_config(recipe)
    assert caplog.records == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mptkit.train.config"):  # a finetuning loader's safe_load
        make_cfg(tmp_path, train_loader={"name": "finetuning", "dataset": {"hf_name": "x.jsonl", "safe_load": True}})
    assert [r.getMessage().split(" is ignored")[0] for r in caplog.records] == ["train_loader.dataset.safe_load"]
    caplog.clear()
    for name in ("mpt-125m", "mpt-1b", "mpt-7b", "quickstart", "instruct", "chat", "storywriter"):  # bundled: no warning
        with caplog.at_level(logging.WARNING, logger="mptkit.train.config"):
            load_run_config(name)
        assert caplog.records == [], name


@pytest.mark.parametrize("callbacks, match", [
    ({"scheduled_gc": {}}, "scheduled_gc.batch_interval: required"),
    ({"scheduled_gc": {"batch_interval": 0}}, "batch_interval: expected an integer >= 1"),
    ({"scheduled_gc": {"batch_interval": 5, "gen_1_batch_interval": 2}}, "unknown key 'callbacks.scheduled_gc"),
    ({"optimizer_monitor": {"batch_log_intervl": 5}}, "did you mean 'callbacks.optimizer_monitor.batch_log_interval"),
    ({"optimizer_monitor": {"log_optimizer_metrics": "yes"}}, "log_optimizer_metrics: expected true or false"),
    ({"kill_loss_spike": {"patience": -1}}, "patience: expected an integer >= 0"),
    ({"kill_loss_spike": {"log_only": "false"}}, "log_only: expected true or false"),
    ({"speed_monitor": {"time_unit": "hours"}}, "unknown key 'callbacks.speed_monitor.time_unit'"),
])
def test_callback_options_are_checked(tmp_path, callbacks, match):
    """Options of the callbacks mptkit implements are checked like every other key."""
    with pytest.raises(ConfigError, match=match):
        make_cfg(tmp_path, callbacks=callbacks)
