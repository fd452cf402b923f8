"""loggers.mlflow (a local tracking folder) and loggers.wandb (offline, no network): every step's numbers reach
the real packages, read back through their own APIs / files; refused options name the key."""

from __future__ import annotations

import json

import pytest

from mptkit.errors import ConfigError
from mptkit.train.trainer import Trainer
from tests.helpers import datasets, make_cfg


def _fit(cfg):
    tr, ev = datasets()
    Trainer(cfg, train_dataset=tr, eval_dataset=ev).fit()
    return [json.loads(x) for x in (cfg.run_folder and open(f"{cfg.run_folder}/metrics.jsonl")).read().splitlines()]


def test_mlflow_logs_every_step_to_a_local_tracking_folder(tmp_path):
    import mlflow

    cfg = make_cfg(tmp_path, max_duration="4ba", save_folder=None, metadata={"owner": "me"},
                   loggers={"mlflow": {"tracking_uri": str(tmp_path / "mlruns"), "experiment_name": "exp",
                                       "tags": {"team": "x"}}})
    recs = _fit(cfg)
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("exp")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["team"] == "x"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert hist == [(r["step"], r["train_loss"]) for r in recs if "train_loss" in r]
    assert run.data.params["optimizer/lr"] == "0.003" and run.data.params["metadata/owner"] == "me"
    with pytest.raises(ConfigError, match="model_registry_uri"):
        make_cfg(tmp_path, loggers={"mlflow": {"model_registry_uri": "databricks-uc"}})


def _wandb_records(b: bytes):
    """The protobuf records of a .wandb file: a 7-byte header (':W&B', magic, version), then LevelDB-log blocks
    of 32 KiB holding records (crc32 4 bytes, length 2, type 1: full / first / middle / last)."""
    assert b[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(b):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        n, kind = int.from_bytes(b[pos + 4:pos + 6], "little"), b[pos + 6]
        data = b[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind == 0 and n == 0:
            pos += 32768 - pos % 32768 if pos % 32768 else 0
            continue
        buf = data if kind in (1, 2) else buf + data
        if kind in (1, 4):
            out.append(buf)
            buf = b""
    return out


def test_wandb_offline_works_without_a_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_cfg(tmp_path, max_duration="3ba", save_folder=None,
                   loggers={"wandb": {"project": "p", "init_kwargs": {"mode": "offline", "dir": str(tmp_path / "wb")}}})
    recs = _fit(cfg)
    (run_file,) = list((tmp_path / "wb").rglob("offline-run-*/run-*.wandb"))
    # read the offline run back with wandb's own reader: one history record per step, the same numbers
    from wandb.proto import wandb_internal_pb2 as pb

    got = []
    for data in _wandb_records(run_file.read_bytes()):
        r = pb.Record()
        r.ParseFromString(data)
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            if "train_loss" in items:
                got.append((items["_step"], items["train_loss"]))
    assert got == [(r["step"], pytest.approx(r["train_loss"])) for r in recs if "train_loss" in r]
    with pytest.raises(ConfigError, match="log_artifacts"):
        make_cfg(tmp_path, loggers={"wandb": {"log_artifacts": True}})
