"""Resuming a run under another number of ranks, for real: a run trained by 2 gloo ranks and SIGKILLed after its
step-4 checkpoint autoresumes on 1 rank (and a 1-rank run on 2 ranks) with the same global batch, the
gradient accumulation adapting; every step trains the same samples as an uninterrupted 1-rank run, and the
final weights equal it to float rounding."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
# a TensorDataset that appends every index it is asked for to LOG.rank<R> (the samples each rank trains on)
SCRIPT = r"""
import os, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.helpers import datasets, make_cfg
from mptkit.train.data import TensorDataset
from mptkit.train.trainer import Trainer

class Logged(TensorDataset):
    def __getitem__(self, i):
        with open(os.environ["LOG"] + ".rank" + os.environ.get("RANK", "0"), "a") as f:
            f.write(f"{{int(i)}}\n")
        return super().__getitem__(i)

tmp = Path(sys.argv[1])
cfg = make_cfg(tmp, max_duration="8ba", save_interval="4ba", autoresume=True, device_train_microbatch_size=2,
               device="cpu")
tr, ev = datasets()
Trainer(cfg, train_dataset=Logged(tr.input_ids), eval_dataset=ev).fit()
"""
STEPS, GLOBAL_BATCH = 8, 8
KILL = "kill@rank0:step5,kill@rank1:step5"  # after the step-4 checkpoint, mid step 5, on every rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(folder: Path, ranks: int, log: Path, faults: str = "") -> list[subprocess.Popen]:
    """``ranks`` processes of the training script over ``folder``, as torchrun starts them (RANK, WORLD_SIZE,
    MASTER_*: the trainer's gloo group)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LOG": str(log), "MPTKIT_FAULTS": faults}
    if ranks > 1:
        env.update(WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    out = []
    for r in range(ranks):
        e = {**env, "RANK": str(r), "LOCAL_RANK": str(r)} if ranks > 1 else env
        out.append(subprocess.Popen([sys.executable, "-c", SCRIPT.format(root=str(ROOT)), str(folder)], env=e,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    return out


def _wait(procs: list[subprocess.Popen], killed: bool = False) -> None:
    for p in procs:
        _, err = p.communicate(timeout=300)
        if killed:
            assert p.returncode == -9, err.decode()[-2000:]  # the injected SIGKILL, not another failure
        else:
            assert p.returncode == 0, err.decode()[-2000:]


def _steps(log: Path, ranks: int, first: int, last: int) -> list[set[int]]:
    """The samples of each step ``first..last`` a leg of ``ranks`` ranks trained (rank r's indices, in order,
    are its per-rank batches of GLOBAL_BATCH / ranks samples; a step's global batch is their union)."""
    per = GLOBAL_BATCH // ranks
    logs = [[int(x) for x in Path(f"{log}.rank{r}").read_text().split()] for r in range(ranks)]
    assert all(lg[0] == 0 for lg in logs)  # the trainer's start-up look at sample 0 (its shape), no step's
    logs = [lg[1:] for lg in logs]
    return [set().union(*(lg[(s - first) * per:(s - first + 1) * per] for lg in logs)) for s in range(first, last + 1)]


def _weights(folder: Path) -> dict:
    from mptkit.io.checkpoints import list_checkpoints

    newest = list_checkpoints(folder / "ck")[0]
    assert newest.name.endswith(f"-ba{STEPS}"), newest
    return load_file(str(newest / "model" / "model.safetensors"))


def test_a_run_resumes_under_another_number_of_ranks(tmp_path):
    """2 ranks -> 1 and 1 rank -> 2: killed at step 5 (after the step-4 checkpoint), autoresumed under the other
    world size. Each step's global batch is the same set of samples as in the uninterrupted 1-rank run, and
    the final weights match it to rtol 1e-4 / atol 1e-5: not bitwise, since the gradient of a global batch is
    summed in another order (two microbatches per rank averaged by an all-reduce vs four accumulated on one
    rank), float32 rounding that eight AdamW steps carry into the weights (the bound the 2-rank DDP test
    uses)."""
    ref, a, b = tmp_path / "ref", tmp_path / "two_one", tmp_path / "one_two"
    first = _launch(ref, 1, tmp_path / "ref.log") + _launch(a, 2, tmp_path / "a1.log", KILL)
    _wait(first[:1])
    _wait(first[1:], killed=True)
    _wait(_launch(a, 1, tmp_path / "a2.log"))  # autoresume of the 2-rank checkpoint on one rank
    _wait(_launch(b, 1, tmp_path / "b1.log", KILL), killed=True)
    _wait(_launch(b, 2, tmp_path / "b2.log"))  # autoresume of the 1-rank checkpoint on two ranks

    want = _steps(tmp_path / "ref.log", 1, 1, STEPS)
    assert all(len(s) == GLOBAL_BATCH for s in want) and len(set().union(*want)) == 64  # one epoch, no repeats
    assert _steps(tmp_path / "a1.log", 2, 1, 4) + _steps(tmp_path / "a2.log", 1, 5, STEPS) == want
    assert _steps(tmp_path / "b1.log", 1, 1, 4) + _steps(tmp_path / "b2.log", 2, 5, STEPS) == want
    from mptkit.io.checkpoints import list_checkpoints
    from mptkit.train.checkpoint import load_trainer_state

    assert load_trainer_state(list_checkpoints(a / "ck")[0])["world_size"] == 1
    assert load_trainer_state(list_checkpoints(b / "ck")[0])["world_size"] == 2
    w_ref = _weights(ref)
    for folder in (a, b):
        w = _weights(folder)
        assert w.keys() == w_ref.keys()
        for k in w_ref:
            torch.testing.assert_close(w[k], w_ref[k], rtol=1e-4, atol=1e-5)
