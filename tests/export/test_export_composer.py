"""`mptkit convert composer`: an llm-foundry / Composer checkpoint (torch.save of Composer's layout, written
here from a tiny model) becomes an HF folder that transformers loads with the model's logits; a checkpoint
whose pickle names anything outside the allow-list is refused before any of it runs, and nothing is written."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mptkit.cli import main as cli_main
from mptkit.errors import CheckpointError, ExportError
from mptkit.export.composer import convert_composer
from tests.helpers import VOCAB, tiny_model

X = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(3))


def _fake_composer_module():
    """A stand-in ``composer.core.time`` module so that the test can pickle an object of a Composer class (the
    reader must keep it as inert data without importing composer)."""
    mods = {n: types.ModuleType(n) for n in ("composer", "composer.core", "composer.core.time")}

    class Timestamp:
        def __init__(self, batch):
            self.batch = batch

    Timestamp.__module__ = "composer.core.time"
    Timestamp.__qualname__ = "Timestamp"
    mods["composer.core.time"].Timestamp = Timestamp
    return mods, Timestamp


def composer_checkpoint(path, model, tokenizer_folder=None, *, extra=None, with_config=True):
    """torch.save of a dict in Composer's checkpoint layout for ``model`` (llm-foundry's names)."""
    sd = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("model.lm_head.weight", None)
    hf = {"model": {"config": {"file_extension": ".json", "class": "llmfoundry.models.mpt.MPTForCausalLM",
                               "content": {**model.config.to_dict(layout="mosaicml"), "init_device": "meta"}}},
          "tokenizer": {}}
    if tokenizer_folder is not None:
        for f in tokenizer_folder.glob("*.json"):
            hf["tokenizer"][f.stem] = {"file_extension": ".json", "content": json.loads(f.read_text())}
    mods, Timestamp = _fake_composer_module()
    state = {"model": sd, "optimizers": {"DecoupledAdamW": {"state": {}, "param_groups": []}},
             "timestamp": Timestamp(batch=12), "rng": np.random.get_state(),
             "integrations": {"huggingface": hf} if with_config else {}, "run_name": "x", **(extra or {})}
    sys.modules.update(mods)
    try:
        torch.save({"state": state, "rng": [{"torch": torch.get_rng_state()}]}, path)
    finally:
        for n in mods:
            sys.modules.pop(n, None)
    return path


def test_composer_checkpoint_converts_to_a_folder_transformers_loads_with_the_same_logits(tmp_path, make_tokenizer):
    """Through the CLI: the HF folder loads in transformers (MptForCausalLM, no remote code) with the logits of
    the model the checkpoint was written from (<= 1e-4), and with the checkpoint's tokenizer; untied LM head."""
    tok = make_tokenizer()
    model = tiny_model(vocab_size=VOCAB, tie_word_embeddings=False, expansion_ratio=4)
    ck = composer_checkpoint(tmp_path / "ep1-ba12-rank0.pt", model, tok)
    assert cli_main(["convert", "composer", str(ck), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "MptForCausalLM"
    with torch.no_grad():
        a, b = hf(X).logits, model(X).logits
    assert a.std() > 0.5 and (a - b).abs().max().item() <= 1e-4
    t = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert t("def f(x):")["input_ids"] == AutoTokenizer.from_pretrained(str(tok))("def f(x):")["input_ids"]


def test_a_checkpoint_without_hf_metadata_needs_config(tmp_path):
    """No state.integrations.huggingface: the error says to pass --config; with it, the weights convert (tied)."""
    model = tiny_model(vocab_size=VOCAB)
    ck = composer_checkpoint(tmp_path / "c.pt", model, with_config=False)
    with pytest.raises(ExportError, match="--config"):
        convert_composer(ck, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    model.config.save(tmp_path / "cfgdir")
    convert_composer(ck, tmp_path / "hf", config=tmp_path / "cfgdir")
    from mptkit.model import MPTForCausalLM

    got = MPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(got(X).logits, model(X).logits)


class _Planted:
    """An object whose unpickling would run a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker, fn=os.system):
        self.marker, self.fn = marker, fn

    def __reduce__(self):
        if self.fn is os.system:
            return (os.system, (f"touch {self.marker}",))
        return (self.fn, (f"open({str(self.marker)!r}, 'w').write('x')",))


@pytest.mark.parametrize("fn", [os.system, exec], ids=["os.system", "exec"])
def test_a_planted_object_is_refused_and_never_runs(tmp_path, fn):
    """A checkpoint whose state holds an object that would run code when unpickled: refused with a
    CheckpointError naming the global; the marker file it would write never appears; OUT is not created and
    no temporary folder is left beside it."""
    marker = tmp_path / "PWNED"
    ck = composer_checkpoint(tmp_path / "evil.pt", tiny_model(vocab_size=VOCAB),
                             extra={"callbacks": {"x": _Planted(marker, fn)}})
    with pytest.raises(CheckpointError, match="allow-list") as e:
        convert_composer(ck, tmp_path / "out" / "hf")
    assert ("system" in str(e.value)) if fn is os.system else ("exec" in str(e.value))
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    # the CLI says it in one line (exit code 2), and still nothing ran
    assert cli_main(["convert", "composer", str(ck), str(tmp_path / "hf2")]) == 2
    assert not marker.exists() and not (tmp_path / "hf2").exists()


def test_not_a_composer_checkpoint_is_named(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="not a Composer checkpoint"):
        convert_composer(tmp_path / "w.pt", tmp_path / "hf")
