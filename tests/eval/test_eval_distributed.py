"""Distributed evaluation: ``torchrun --nproc-per-node 2 -m mptkit.cli eval icl ...`` (gloo) splits the records
over the ranks and gathers them; rank 0 reports the same numbers as one process, record by record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mptkit.cli import main
from mptkit.eval.distributed import merge_results, shard
from mptkit.eval.icl import ICLResult
from mptkit.io import load_tokenizer
from tests.helpers import SCORES, model_folder

ROOT = Path(__file__).resolve().parents[2]

LINES = [
    "def load(fp, *, cls=None):",
    "return loads(fp.read())",
    "import re",
    "class JSONDecodeError(ValueError):",
    "self.pos = pos",
    "if not isinstance(s, str):",
    "raise TypeError",
    "end = _w(s, end).end()",
    "return obj, end",
    "except StopIteration as err:",
    "nextchar = s[end:end + 1]",
]


def _tasks(tmp: Path) -> list[str]:
    """An MC task, a LAMBADA-style task and a generation task (7, 11 and 5 records: shares of unequal size)."""
    mc = [
        {
            "query": a.split(" ")[0],
            "choices": [" " + " ".join(a.split(" ")[1:]) or " x", " pass", " None"],
            "gold": i % 3,
        }
        for i, a in enumerate(LINES[:7])
    ]
    lm = [
        {"context": ln.rsplit(" ", 1)[0], "continuation": ln.rsplit(" ", 1)[1]} for ln in LINES if " " in ln
    ]
    gen = [{"context": ln.split(" ")[0], "answer": ln.split(" ")[1], "aliases": []} for ln in LINES[:5]]
    out = []
    for name, recs in (("mc", mc), ("lm", lm), ("gen", gen)):
        p = tmp / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        out.append(str(p))
    return out


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_same_numbers_as_one_process(tmp_path, make_tokenizer):
    folder = model_folder(tmp_path / "m", load_tokenizer(make_tokenizer()), seed=0, spread=SCORES)
    tasks = ",".join(_tasks(tmp_path))
    args = [
        "eval",
        "icl",
        str(folder),
        "--tasks",
        tasks,
        "--num-fewshot",
        "0,2",
        "--details",
        "--device",
        "cpu",
        "--batch-size",
        "3",
    ]
    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "mptkit.cli",
            *args,
            "--json",
            str(tmp_path / "two.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert r.stdout.count("results written to") == 1  # rank 0 reports
    one = json.loads((tmp_path / "one.json").read_text())["results"]
    two = json.loads((tmp_path / "two.json").read_text())["results"]
    assert [(x["task"], x["num_fewshot"]) for x in two] == [(x["task"], x["num_fewshot"]) for x in one]
    assert len(one) == 6
    for a, b in zip(one, two):
        for k in ("task_type", "examples", "accuracy", "accuracy_norm", "truncated"):
            assert a[k] == b[k], (a["task"], k)
        assert len(a["details"]) == a["examples"] == len(b["details"])
        for da, db in zip(a["details"], b["details"]):
            assert da.keys() == db.keys()
            for k in da:
                if k in ("logprob", "logprobs"):
                    assert db[k] == pytest.approx(da[k], abs=1e-5)
                else:
                    assert da[k] == db[k], (a["task"], da["index"], k)
    assert 0 < one[0]["accuracy"] < 1  # not all right or all wrong


def test_shard_and_merge():
    """Rank r scores records r, r + W, ...; merging puts every record back in order and recomputes the
    figures over all of them; a missing record is an error."""
    assert [shard(7, r, 3) for r in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert shard(1, 1, 2) == []

    def part(idx, truncated=0):
        d = [{"index": i, "correct": i % 2 == 0, "correct_norm": i < 2} for i in idx]
        return ICLResult("t", "multiple_choice", 0, len(idx), 0.0, 0.0, truncated, d)

    m = merge_results([part([0, 2, 4], 1), part([1, 3], 2)], 5)
    assert [d["index"] for d in m.details] == [0, 1, 2, 3, 4]
    assert (m.examples, m.accuracy, m.accuracy_norm, m.truncated) == (5, 3 / 5, 2 / 5, 3)
    with pytest.raises(RuntimeError, match="gathered 4 records of 5"):
        merge_results([part([0, 2]), part([1, 3])], 5)
