"""torchrun-style data parallelism on CPU: two gloo processes equal one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = r"""
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.helpers import datasets, make_cfg
from mptkit.train.trainer import Trainer
tmp = Path(sys.argv[1])
cfg = make_cfg(tmp, max_duration="4ba", save_interval="2ba", device_train_microbatch_size=2, device="cpu")
tr, ev = datasets()
Trainer(cfg, train_dataset=tr, eval_dataset=ev).fit()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    """WORLD_SIZE=2 (gloo): each rank takes half of every global batch; the averaged gradients give the
    single-process weights (to float rounding); only rank 0 writes checkpoints; the checkpoint holds
    both ranks' data positions."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = SCRIPT.format(root=str(ROOT))
    one = subprocess.run([sys.executable, "-c", code, str(tmp_path / "one")], env=env, capture_output=True,
                         timeout=300, check=False)
    assert one.returncode == 0, one.stderr.decode()[-2000:]
    port = str(_free_port())
    procs = []
    for rank in range(2):
        e = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "two")], env=e,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    a = load_file(str(tmp_path / "one" / "ck" / "ep0-ba4" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "ck" / "ep0-ba4" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    from mptkit.train.checkpoint import load_trainer_state

    st = load_trainer_state(tmp_path / "two" / "ck" / "ep0-ba4")
    assert st["world_size"] == 2 and len(st["data"]) == 2 and len(st["rng"]) == 2
    assert not list((tmp_path / "two" / "ck").glob(".*"))  # no temp leftovers
