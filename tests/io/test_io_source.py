"""open_model_source: every kind of path a user may give (model folder, run folder, checkpoint folder, sharded
checkpoint) opens as the same model + tokenizer, and a path that is none of them is one clear error."""

from __future__ import annotations

import warnings

import pytest
import torch

from mptkit.errors import CheckpointError, DataError
from mptkit.io import load_tokenizer, open_model_source
from mptkit.model import MPTConfig, MPTForCausalLM
from mptkit.train import checkpoint as ck
from tests.helpers import tiny_cfg

X = torch.randint(0, 211, (2, 12))


def _model(seed: int) -> MPTForCausalLM:
    torch.manual_seed(seed)
    return MPTForCausalLM(tiny_cfg()).eval()


def _same(a: MPTForCausalLM, b: MPTForCausalLM) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _run(tmp_path, make_tokenizer):
    """A run folder with two full checkpoints (ep0-ba2 older, ep0-ba4 newest) and the tokenizer beside them."""
    tok = load_tokenizer(make_tokenizer())
    run = tmp_path / "run"
    old, new = _model(1), _model(2)
    ck.save_checkpoint(
        run / "checkpoints", model=old, trainer_state={"step": 2}, epoch=0, step=2, tokenizer=tok
    )
    ck.save_checkpoint(
        run / "checkpoints", model=new, trainer_state={"step": 4}, epoch=0, step=4, tokenizer=tok
    )
    return run, old, new


def test_a_model_folder_opens_as_itself_with_its_tokenizer(tmp_path, make_tokenizer):
    model = _model(0)
    model.save_pretrained(tmp_path / "m", tokenizer=make_tokenizer())
    with open_model_source(tmp_path / "m") as src:
        assert (src.kind, src.folder, src.checkpoint, src.tokenizer_folder) == (
            "model",
            tmp_path / "m",
            None,
            tmp_path / "m",
        )
        assert _same(src.load_model(), model)
        assert src.load_tokenizer().decode(src.load_tokenizer().encode("def f(x):")) == "def f(x):"
        assert src.load_config().d_model == model.config.d_model
    model.save_pretrained(tmp_path / "bare")  # no tokenizer anywhere near it
    with open_model_source(tmp_path / "bare") as src:
        assert src.tokenizer_folder is None and src.load_tokenizer() is None


def test_a_run_and_a_checkpoint_folder_open_the_newest_valid_checkpoint(tmp_path, make_tokenizer):
    run, old, new = _run(tmp_path, make_tokenizer)
    for path in (run, run / "checkpoints"):  # the run folder and its save folder
        with open_model_source(path) as src:
            assert src.kind == "checkpoint" and src.checkpoint.name == "ep0-ba4"
            assert src.folder == run / "checkpoints" / "ep0-ba4" / "model"
            assert _same(src.load_model(), new) and src.load_tokenizer() is not None
    with open_model_source(run / "checkpoints" / "ep0-ba2") as src:  # one checkpoint itself
        assert src.kind == "checkpoint" and src.folder == run / "checkpoints" / "ep0-ba2" / "model"
        assert _same(src.load_model(), old)
    w = run / "checkpoints" / "ep0-ba4" / "model" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-64])  # the newest one truncated: the previous valid one is used
    with open_model_source(run) as src:
        assert src.checkpoint.name == "ep0-ba2" and _same(src.load_model(), old)
    with pytest.raises(
        CheckpointError,
        match=r"ep0-ba4: an invalid checkpoint: model/model.safetensors has \d+ bytes, manifest says",
    ):
        open_model_source(run / "checkpoints" / "ep0-ba4")


def test_a_sharded_checkpoint_is_consolidated_for_the_duration(tmp_path, make_tokenizer):
    """A sharded (DCP) checkpoint written in one process, as FSDP's state_dict_type: sharded lays it out: the
    source is a temporary HF folder with the same weights and the tokenizer, removed on close;
    consolidate=False refuses it instead."""
    from mptkit.train.fsdp import dcp_save
    from mptkit.train.optim import build_optimizer

    model = MPTForCausalLM(tiny_cfg())
    opt = build_optimizer(model, {"name": "decoupled_adamw", "lr": 1e-3})
    model(X, labels=X).loss.backward()
    opt.step()

    def write_shards(folder):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp_save(model, opt, folder)

    run = tmp_path / "run"
    ck.save_sharded_checkpoint(
        run,
        write_shards=write_shards,
        broadcast=lambda x: x,
        gather=lambda x: [x],
        rank=0,
        model_config=MPTConfig.from_dict(tiny_cfg()),
        trainer_state={"optimizer": None},
        epoch=0,
        step=3,
        tokenizer=make_tokenizer(),
    )
    with open_model_source(run) as src:
        assert src.kind == "sharded" and src.checkpoint == run / "ep0-ba3"
        tmp = src.folder
        assert tmp.is_dir() and not tmp.is_relative_to(run)
        assert _same(src.load_model(), model.eval())
        assert src.tokenizer_folder is not None and src.load_tokenizer() is not None
    assert not tmp.exists()
    with pytest.raises(CheckpointError, match=r"ep0-ba3 is a sharded checkpoint.*mptkit export hf"):
        open_model_source(run, consolidate=False)


def test_paths_that_hold_no_model_are_one_clear_error(tmp_path, make_tokenizer):
    with pytest.raises(CheckpointError, match=r"nope: no such file or folder \(expected a model folder"):
        open_model_source(tmp_path / "nope")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"f.txt: not a folder \(expected a model folder"):
        open_model_source(tmp_path / "f.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        CheckpointError,
        match=r"empty: not a model folder, and no usable checkpoint in it: no valid "
        r"checkpoint found \(looked for ep\*-ba\* folders",
    ):
        open_model_source(tmp_path / "empty")
    (tmp_path / "cfg").mkdir()
    MPTConfig.from_dict(tiny_cfg()).save(tmp_path / "cfg")
    with pytest.raises(CheckpointError, match=r"cfg: no weights found \(expected model.safetensors"):
        open_model_source(tmp_path / "cfg")
    _model(0).save_pretrained(tmp_path / "m")
    (tmp_path / "notok").mkdir()
    with pytest.raises(DataError, match="--tokenizer .*notok: not a folder with tokenizer files"):
        open_model_source(tmp_path / "m", tokenizer=tmp_path / "notok")
    with open_model_source(tmp_path / "m", tokenizer=make_tokenizer()) as src:
        assert src.tokenizer_folder == tmp_path / "tok"


def test_a_saved_model_folders_tokenizer_is_limited_to_the_models_length(tmp_path, make_tokenizer):
    """``save_pretrained(folder, tokenizer=...)`` — the trainer's end-of-run export, checkpoints' model folders,
    `mptkit export hf/quant` — writes the tokenizer with ``model_max_length`` = the model's ``max_seq_len``, so
    ``truncation=True`` keeps inputs to what the model accepts; the tokenizer's own files are left alone."""
    from transformers import AutoTokenizer

    from tests.helpers import tiny_model

    tok = make_tokenizer()
    before = (tok / "tokenizer_config.json").read_bytes()
    tiny_model(vocab_size=448, max_seq_len=40).save_pretrained(tmp_path / "m", tokenizer=tok)
    t = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert len(t("def f(x):\n    return x\n" * 50, truncation=True)["input_ids"]) == 40
    assert (tok / "tokenizer_config.json").read_bytes() == before
