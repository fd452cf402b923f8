"""`mptkit convert composer DIR OUT` on a sharded Composer checkpoint: the folder is written by torch's own
``torch.distributed.checkpoint.save`` from two gloo ranks whose tiny MPT is sharded by FSDP2 (DTensor shards,
so every weight is split across ``__0_0.distcp`` and ``__1_0.distcp``), in Composer's layout
(``{"state": {"model": {"model.transformer.*": ...}, "integrations": {"huggingface": ...}, "timestamp": ...,
"optimizers": ...}, "rng": ...}``). The conversion runs in this one process, without a process group; the HF
folder loads in transformers with the original model's logits; a planted object in ``.metadata`` is refused
before it runs; a folder without ``.metadata``, without model tensors, or with a truncated shard is a named
error, and OUT is never half-written."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mptkit.cli import main as cli_main
from mptkit.errors import CheckpointError
from mptkit.export.composer import convert_composer
from tests.helpers import VOCAB, tiny_model

ROOT = Path(__file__).resolve().parents[2]
X = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(5))

_WRITER = textwrap.dedent('''
    import json, os, sys, types
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import torch.multiprocessing as mp

    def rank_main(rank, model_dir, tok_dir, out, init):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        from torch.distributed.fsdp import fully_shard
        from mptkit.model import MPTForCausalLM
        model = MPTForCausalLM.from_pretrained(model_dir, device="cpu")
        for block in model.transformer.blocks:
            fully_shard(block)
        fully_shard(model)
        content = json.load(open(os.path.join(model_dir, "config.json")))
        # an object of a Composer class, pickled into a .distcp file: the reader must never unpickle it
        mod = types.ModuleType("composer.core.time")
        class Timestamp:
            def __init__(self, batch):
                self.batch = batch
        Timestamp.__module__, Timestamp.__qualname__ = "composer.core.time", "Timestamp"
        mod.Timestamp = Timestamp
        sys.modules["composer"] = types.ModuleType("composer")
        sys.modules["composer.core"] = types.ModuleType("composer.core")
        sys.modules["composer.core.time"] = mod
        state = {
            "model": {f"model.{k}": v for k, v in model.state_dict().items()},
            "optimizers": {"DecoupledAdamW": {"param_groups": [{"lr": 1e-3}]}},
            "timestamp": Timestamp(batch=100),
            "integrations": {"huggingface": {"model": {"config": {
                "file_extension": ".json", "class": "llmfoundry.models.mpt.MPTForCausalLM",
                "content": {**content, "init_device": "meta"}}}, "tokenizer": {
                f[:-5]: {"file_extension": ".json", "content": json.load(open(os.path.join(tok_dir, f)))}
                for f in os.listdir(tok_dir) if f.endswith(".json")}}},
            "run_name": "tiny",
        }
        dcp.save({"state": state, "rng": [{"torch": torch.get_rng_state()}]}, checkpoint_id=out)
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(rank_main, args=tuple(sys.argv[1:5]), nprocs=2)
''')


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer_folders):
    """(folder, model, tokenizer folder): a sharded Composer checkpoint of ``model`` (untied LM head) written by 2 FSDP2 ranks."""
    tmp = tmp_path_factory.mktemp("sharded")
    model = tiny_model(vocab_size=VOCAB, tie_word_embeddings=False, expansion_ratio=4)
    model.save_pretrained(tmp / "model", layout="mosaicml")
    tokenizer_folders.make(tmp / "tok", 400)
    (tmp / "writer.py").write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    folder = tmp / "ep0-ba100"
    subprocess.run([sys.executable, str(tmp / "writer.py"), str(tmp / "model"), str(tmp / "tok"), str(folder),
                    f"file://{tmp / 'rdzv'}"], check=True, env=env, timeout=120)
    return folder, model.eval(), tmp / "tok"


def _copy(sharded, tmp_path) -> Path:
    return Path(shutil.copytree(sharded[0], tmp_path / "ep0-ba100"))


def test_sharded_checkpoint_converts_in_one_process_to_the_same_logits(sharded, tmp_path):
    """Through the CLI, with no process group: the folder's weights really are split across both ranks'
    files; the HF folder loads in transformers (MptForCausalLM) with the original model's logits."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemReader

    folder, model, tok = sharded
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    md = FileSystemReader(str(folder)).read_metadata()  # trusted here: the test wrote it
    wte = md.state_dict_metadata["state.model.model.transformer.wte.weight"]
    assert len(wte.chunks) == 2  # one shard per rank
    assert not dist.is_initialized()
    assert cli_main(["convert", "composer", str(folder), str(tmp_path / "hf")]) == 0
    assert not dist.is_initialized()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "MptForCausalLM"
    with torch.no_grad():
        a, b = hf(X).logits, model(X).logits
    assert a.std() > 0.5 and (a - b).abs().max().item() <= 1e-4
    # the HF metadata is rebuilt from DCP's flattened items: nested dicts, lists of dicts (added_tokens) as
    # lists; only empty containers, which DCP does not save, are missing
    import json

    from mptkit.io.composer import load_composer_sharded

    saved = load_composer_sharded(folder)["state"]["integrations"]["huggingface"]["tokenizer"]["tokenizer"]
    original = json.loads((tok / "tokenizer.json").read_text())
    assert original["post_processor"].pop("special_tokens") == {}
    assert isinstance(saved["content"]["added_tokens"], list) and saved["content"] == original
    # the config came back from DCP's flattened items (no --config given); the tokenizer's did not: DCP drops
    # this tokenizer.json's empty post_processor.special_tokens, so it is left out with a warning, and
    # --tokenizer puts one in
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert cli_main(["convert", "composer", str(folder), str(tmp_path / "hf2"), "--tokenizer", str(tok)]) == 0
    text = "def f(x):\n    return [x, {'a': 1}]"
    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf2"))(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(str(tok))(text)["input_ids"]


class _Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_object_in_metadata_is_refused_and_never_runs(sharded, tmp_path):
    """``.metadata`` is a pickle: one that names os.system is refused (a CheckpointError naming it) before
    anything is called; the marker file is never written and OUT is not created."""
    from torch.distributed.checkpoint import FileSystemReader

    folder = _copy(sharded, tmp_path)
    md = FileSystemReader(str(folder)).read_metadata()
    marker = tmp_path / "PWNED"
    md.planner_data["evil"] = _Planted(marker)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        convert_composer(folder, tmp_path / "hf")
    assert not marker.exists() and not (tmp_path / "hf").exists()
    assert cli_main(["convert", "composer", str(folder), str(tmp_path / "hf")]) == 2
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_bad_sharded_folders_are_named_and_nothing_is_written(sharded, tmp_path):
    """No .metadata; no state.model tensors (a DCP folder of something else); a truncated shard file:
    each a CheckpointError naming what is wrong, and OUT does not appear."""
    import torch.distributed.checkpoint as dcp

    folder = _copy(sharded, tmp_path)
    out = tmp_path / "out" / "hf"
    os.rename(folder / ".metadata", tmp_path / "md")
    with pytest.raises(CheckpointError, match="no .metadata"):
        convert_composer(folder, out)
    os.rename(tmp_path / "md", folder / ".metadata")

    other = tmp_path / "other"
    with warnings.catch_warnings():  # DCP warns that no_dist means one process: it does
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"weights": {"w": torch.zeros(3)}}, checkpoint_id=str(other), no_dist=True)
    with pytest.raises(CheckpointError, match=r"no state\.model\.\* tensors"):
        convert_composer(other, out)

    shard = folder / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="ep0-ba100"):
        convert_composer(folder, out)
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])
