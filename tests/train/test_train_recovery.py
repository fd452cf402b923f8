"""Recovery without a human (the recipe's ``recovery``, train/recovery.py): a planted bad batch (a spike) or a
poisoned one (a NaN loss) is rolled back or skipped, the run finishes, and its final weights equal, bit for bit, a
run that never saw the skipped batches; the skipped batches are in the checkpoint, so a run interrupted after a
rollback and resumed ends bitwise equal to the uninterrupted one; ``stop`` exits with the documented code through
the CLI; log only continues and logs; every event is in metrics.jsonl and summary.json; bad values are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mptkit.errors import EXIT_DIVERGED, ConfigError, TrainDiverged
from mptkit.train.step import causal_lm_loss
from mptkit.train.trainer import Trainer
from tests.helpers import make_cfg, pattern_data

BS = 8  # global_train_batch_size of tests.helpers.tiny_run
BAD = 7  # the planted batch (0-based, shuffle off): trained as step 8
SPIKE = {"kill_loss_spike": {"window_size": 4, "patience": 0}}  # a single outlier (>= 2x the mean) is a spike


def _data(bad: int | None = BAD, poison: bool = False, drop: tuple[int, ...] = ()) -> torch.Tensor:
    """128 rows of tests.helpers.pattern_data (16 batches, in order); batch ``bad`` replaced by random tokens
    (a loss spike) or, with ``poison``, marked with token 1 (the NaN loss below); the batches ``drop`` left out."""
    x = pattern_data(128)
    if bad is not None:
        rows = slice(bad * BS, (bad + 1) * BS)
        x[rows] = torch.randint(2, 64, (BS, 32), generator=torch.Generator().manual_seed(1))
        if poison:
            x[rows, 0] = 1
    keep = [i for i in range(len(x)) if i // BS not in drop]
    return x[keep]


def nan_on_marked(model, mb):
    """The causal LM loss, NaN for a microbatch holding token 1 (a poisoned batch)."""
    loss = causal_lm_loss(model, mb)
    return loss * float("nan") if bool((mb["input_ids"] == 1).any()) else loss


def _fit(tmp: Path, x: torch.Tensor, **over):
    from mptkit.train.data import TensorDataset

    loss_fn = over.pop("loss_fn", causal_lm_loss)
    over.setdefault("train_loader", {"name": "text", "dataset": {"local": "unused", "shuffle": False}})
    over.setdefault("save_interval", "3ba")
    t = Trainer(make_cfg(tmp, **over), train_dataset=TensorDataset(x), loss_fn=loss_fn)
    return t, t.fit()


def _weights(t: Trainer) -> dict:
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _metrics(tmp: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


def test_rollback_on_a_planted_spike_equals_a_run_that_never_saw_those_batches_also_after_a_resume(tmp_path):
    """The spike at step 8 (batch 7) rolls back to the newest checkpoint before it (ep0-ba6) and skips the batches
    of steps 7 and 8 (batches 6, 7); the run trains 12 steps and ends bitwise equal to a run on the data without
    those batches. A run that crashes right after the rollback resumes from the re-saved ep0-ba6, whose trainer
    state records the skipped batches, and ends bitwise equal too. Every event is in metrics.jsonl (one line per
    step) and summary.json."""
    rec = {"callbacks": SPIKE, "recovery": {"loss_spike": "rollback"}}
    t, s = _fit(tmp_path / "a", _data(), **rec)
    assert s["steps"] == 12 and s["batches_skipped"] == 2
    [ev] = s["recovery"]
    assert (ev["event"], ev["step"], ev["action"], ev["batch"]) == ("loss_spike", 8, "rollback", [0, BAD])
    assert ev["rollback_to"] == 6 and ev["checkpoint"].endswith("ep0-ba6") and ev["batches_skipped"] == [[0, 6, 7]]
    assert ev["loss"] >= 2 * ev["running_loss_avg"]
    lines = _metrics(tmp_path / "a")
    assert [r["step"] for r in lines if "train_loss" in r] == list(range(1, 13))  # the rolled-back steps once
    assert [r for r in lines if r.get("event") == "loss_spike"] == [ev]
    st = torch.load(tmp_path / "a" / "ck" / "ep0-ba6" / "trainer_state.pt", weights_only=True)
    assert st["recovery"]["ranges"] == [[0, 6, 7]] and len(st["loss_monitor"]["window"]) == 4
    ref, _ = _fit(tmp_path / "ref", _data(drop=(6, 7)))
    _assert_bitwise(_weights(t), _weights(ref))

    class Crash(Exception):
        pass

    holder = {}

    def crash_after_rollback(model, mb):
        tr = holder["t"]
        if tr.recovery.count and tr.step == 7:  # the first step after the rollback, before any new checkpoint
            raise Crash
        return causal_lm_loss(model, mb)

    from mptkit.train.data import TensorDataset

    cfg = make_cfg(tmp_path / "b", save_interval="3ba", autoresume=True, **rec,
                   train_loader={"name": "text", "dataset": {"local": "unused", "shuffle": False}})
    holder["t"] = Trainer(cfg, train_dataset=TensorDataset(_data()), loss_fn=crash_after_rollback)
    with pytest.raises(Crash):
        holder["t"].fit()
    b, sb = _fit(tmp_path / "b", _data(), autoresume=True, **rec)
    assert sb["resumed_from"].endswith("ep0-ba6") and sb["steps"] == 12
    assert [e["id"] for e in sb["recovery"]] == [ev["id"]] and sb["batches_skipped"] == 2  # not met again
    _assert_bitwise(_weights(b), _weights(t))
    assert [r["step"] for r in _metrics(tmp_path / "b") if "train_loss" in r] == list(range(1, 13))


def test_nonfinite_loss_skip_and_rollback_finish_bitwise_as_without_the_batch(tmp_path):
    """A NaN loss (a poisoned batch) with ``skip`` drops that step's update and trains the next batch as the step
    (no optimizer or schedule step): bitwise the run without that batch. With ``rollback`` and skip_batches: 1 the
    run goes back to ep0-ba6 and skips only the bad batch, and the lr is lowered by lr_factor for lr_steps steps;
    the default (stop) ends the run with TrainDiverged."""
    x = _data(poison=True)
    t, s = _fit(tmp_path / "skip", x, recovery={"nonfinite": "skip"}, loss_fn=nan_on_marked)
    [ev] = s["recovery"]
    assert (ev["event"], ev["step"], ev["action"], ev["batches_skipped"]) == ("nonfinite", 8, "skip", [[0, BAD, BAD]])
    assert s["steps"] == 12 and s["batches_skipped"] == 1
    ref, _ = _fit(tmp_path / "ref", _data(drop=(BAD,)))
    _assert_bitwise(_weights(t), _weights(ref))

    r, s = _fit(tmp_path / "rb", x, loss_fn=nan_on_marked,
                recovery={"nonfinite": "rollback", "skip_batches": 1, "lr_factor": 0.5, "lr_steps": 2})
    [ev] = s["recovery"]
    assert (ev["action"], ev["rollback_to"], ev["batches_skipped"]) == ("rollback", 6, [[0, BAD, BAD]])
    assert (ev["lr_from_step"], ev["lr_to_step"]) == (7, 8)
    lr = {m["step"]: m["lr"] for m in _metrics(tmp_path / "rb") if "lr" in m}
    lr_ref = {m["step"]: m["lr"] for m in _metrics(tmp_path / "ref") if "lr" in m}
    assert all(lr[k] == pytest.approx(lr_ref[k] * (0.5 if k in (7, 8) else 1.0), rel=1e-12) for k in lr_ref)

    with pytest.raises(TrainDiverged, match="loss is nan at step 8") as e:
        _fit(tmp_path / "stop", x, loss_fn=nan_on_marked)
    assert e.value.exit_code == EXIT_DIVERGED
    assert [m["action"] for m in _metrics(tmp_path / "stop") if m.get("event") == "nonfinite"] == ["stop"]


def test_max_recoveries_stops_a_run_that_keeps_diverging(tmp_path):
    """Every batch poisoned from batch 7 on: skip drops 2 (max_recoveries) and the third stops the run."""
    x = _data(poison=True)
    x[BAD * BS:, 0] = 1
    with pytest.raises(TrainDiverged, match=r"max_recoveries \(2\)"):
        _fit(tmp_path, x, max_duration="10ba", recovery={"nonfinite": "skip", "max_recoveries": 2},
             loss_fn=nan_on_marked)
    evs = [m for m in _metrics(tmp_path) if m.get("event") == "nonfinite"]
    assert [(m["step"], m["action"]) for m in evs] == [(8, "skip"), (8, "skip"), (8, "stop")]


@pytest.mark.parametrize(("recovery", "callbacks", "match"), [
    ({"nonfinite": "rolback"}, None, r"recovery.nonfinite: .*did you mean 'rollback'"),
    ({"loss_spike": "restart"}, None, "recovery.loss_spike: expected one of log, stop, skip, rollback"),
    ({"loss_spike": "rollback"}, {"kill_loss_spike": {"log_only": True}},
     "recovery.loss_spike: rollback contradicts callbacks.kill_loss_spike.log_only: True"),
    ({"skip_batches": 0}, None, "recovery.skip_batches: expected an integer >= 1"),
    ({"lr_factor": 2}, None, r"recovery.lr_factor: expected a number in \(0, 1\]"),
    ({"lr_factor": 0.5}, None, "recovery.lr_steps: lr_factor 0.5 .* set lr_steps >= 1"),
    ({"max_recoverys": 3}, None, "unknown key 'recovery.max_recoverys'; did you mean 'recovery.max_recoveries'"),
    ({"nonfinite": "rollback"}, None, "recovery.nonfinite: rollback .* needs a save_folder"),
])
def test_bad_recovery_values_are_refused_naming_the_key(tmp_path, recovery, callbacks, match):
    over = {"recovery": recovery}
    if callbacks is not None:
        over["callbacks"] = callbacks
    if "needs a save_folder" in match:
        over["save_folder"] = None
    with pytest.raises(ConfigError, match=match):
        make_cfg(tmp_path, **over)


def test_a_spike_in_prepared_data_through_mptkit_train_logs_stops_with_the_code_or_rolls_back(tmp_path,
                                                                                            make_tokenizer, capsys):
    """`mptkit train` on prepared shards where one document is random characters (a spike at step 9, batch 8):
    log only (llm-foundry's default) continues and logs; log_only=false stops with EXIT_DIVERGED and one line;
    recovery.loss_spike=rollback finishes and its summary lists the rollbacks."""
    import random

    import yaml

    from mptkit.cli import main
    from mptkit.data.prepare import prepare_dataset
    from tests.helpers import TINY_MODEL

    tok = make_tokenizer(tmp_path / "tok")
    rnd = random.Random(0)
    docs = ["def f(x):\n    return x\n"] * 120
    docs.insert(90, "".join(chr(rnd.randrange(0x100, 0x17F)) for _ in range(200)))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_dataset([str(tmp_path / "c.jsonl")], str(tok), tmp_path / "data", 16, val_fraction=0.0, progress=False)
    recipe = {"model": {**TINY_MODEL, "vocab_size": 448, "max_seq_len": 16}, "tokenizer": {"name": str(tok)},
              "train_loader": {"name": "text", "dataset": {"local": str(tmp_path / "data"), "shuffle": False}},
              "max_duration": "12ba", "global_train_batch_size": 8, "device_train_microbatch_size": 8,
              "optimizer": {"name": "decoupled_adamw", "lr": 1e-2}, "eval_interval": "0ba",
              "save_interval": "4ba", "progress_bar": False, "peak_tflops": 1.0, "torch_threads": 1,
              "callbacks": {"kill_loss_spike": {"window_size": 4, "patience": 0}}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def run(name: str, *over: str) -> tuple[int, dict | None, list[dict]]:
        rc = main(["train", str(path), f"run_folder={tmp_path / name}", f"save_folder={tmp_path / name / 'ck'}",
                   *over])
        summary = tmp_path / name / "summary.json"
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return rc, json.loads(summary.read_text()) if summary.exists() else None, lines

    rc, s, lines = run("log")
    assert rc == 0 and s["steps"] == 12
    spikes = [r for r in lines if r.get("event") == "loss_spike"]
    assert spikes and spikes[0]["step"] == 9 and spikes[0]["batch"] == [0, 8] and spikes[0]["action"] == "log"
    assert s["recovery"] == spikes and s["batches_skipped"] == 0
    capsys.readouterr()
    rc, s, lines = run("stop", "callbacks.kill_loss_spike.log_only=false")
    assert rc == EXIT_DIVERGED and s is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mptkit train: error: loss spike at step 9: 1 consecutive losses")
    assert f"exit code {EXIT_DIVERGED}" in err[-1]
    assert [(r["step"], r["action"]) for r in lines if r.get("event") == "loss_spike"] == [(9, "stop")]
    rc, s, lines = run("rollback", "recovery.loss_spike=rollback")
    assert rc == 0 and s["steps"] == 12 and s["recovery"]
    assert {e["action"] for e in s["recovery"]} == {"rollback"} and s["recovery"][0]["step"] == 9
    assert s["recovery"][0]["batches_skipped"] == [[0, 8, 8]] and s["batches_skipped"] == len(s["recovery"])
    assert [r["step"] for r in lines if "train_loss" in r] == list(range(1, 13))


def test_a_rollback_moves_aside_the_checkpoints_saved_during_the_spike(tmp_path):
    """patience 1: batches 7 and 8 are outliers, the spike is found at step 9, but ep0-ba8 already holds the update
    of step 8: the rollback goes to ep0-ba4 (before the first outlier), moves ep0-ba8 aside as ep0-ba8.rolledback
    (never resumed from), skips the batches of steps 5..9 and ends bitwise as a run without them."""
    x = _data()
    x[8 * BS:9 * BS] = torch.randint(2, 64, (BS, 32), generator=torch.Generator().manual_seed(2))
    rec = {"callbacks": {"kill_loss_spike": {"window_size": 4, "patience": 1, "outlier_multiplier": 1.5}},
           "recovery": {"loss_spike": "rollback"}, "save_interval": "4ba", "max_duration": "11ba"}
    t, s = _fit(tmp_path / "a", x, **rec)
    [ev] = s["recovery"]
    assert (ev["step"], ev["outlier_counter"], ev["rollback_to"]) == (9, 2, 4)
    assert ev["batches_skipped"] == [[0, 4, 8]] and ev["checkpoints_moved_aside"] == ["ep0-ba8.rolledback"]
    assert (tmp_path / "a" / "ck" / "ep0-ba8.rolledback" / "trainer_state.pt").is_file()
    ref, _ = _fit(tmp_path / "ref", _data(drop=(4, 5, 6, 7, 8)), save_interval="4ba", max_duration="11ba")
    _assert_bitwise(_weights(t), _weights(ref))
