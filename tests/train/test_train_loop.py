"""The training loop: learning, exact resumption, checkpoint validity, OOM handling, export, bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mptkit.errors import ConfigError, TrainError
from mptkit.io import open_model_source
from mptkit.train import checkpoint as ck
from mptkit.train.trainer import Trainer
from tests.helpers import datasets, make_cfg


def _fit(cfg, **kw):
    tr, ev = datasets()
    t = Trainer(cfg, train_dataset=kw.pop("train_dataset", tr), eval_dataset=kw.pop("eval_dataset", ev), **kw)
    return t, t.fit()


def _weights(folder):
    return load_file(str(folder / "model" / "model.safetensors"))


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_and_metrics_are_logged(tmp_path):
    """30 steps on a learnable pattern: eval loss ends far below the first train loss; metrics.jsonl has
    loss, lr, grad norm, tokens/s, MFU and memory for every step; config.yaml is saved in the run folder."""
    cfg = make_cfg(tmp_path, max_duration="30ba", eval_interval="10ba", save_folder=None)
    _t, s = _fit(cfg)
    recs = _metrics(tmp_path / "run")
    steps = [r for r in recs if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "mem_rss_peak_gb"):
        assert key in steps[-1]
    assert steps[0]["lr"] == 0.0  # warmup starts at 0 (composer semantics)
    assert s["eval_loss"] < 0.5 * steps[0]["train_loss"], (s["eval_loss"], steps[0]["train_loss"])
    evals = [r for r in recs if "eval_loss" in r and "event" not in r]
    assert len(evals) == 3 and evals[-1]["eval_perplexity"] == pytest.approx(2.718281828 ** evals[-1]["eval_loss"])
    assert (tmp_path / "run" / "config.yaml").exists()
    assert any(r.get("peak_source", "").startswith("declared") for r in recs)


def test_resume_from_checkpoint_is_bitwise_identical(tmp_path):
    """A run resumed from its step-4 checkpoint ends with exactly the weights of the uninterrupted run,
    and a truncated newest checkpoint is skipped in favour of the previous valid one."""
    a = tmp_path / "a"
    _fit(make_cfg(a))
    final_a = _weights(a / "ck" / "ep1-ba12")
    # resume from step 4 in a fresh save folder
    b = tmp_path / "b"
    (b / "ck").mkdir(parents=True)
    shutil.copytree(a / "ck" / "ep0-ba4", b / "ck" / "ep0-ba4")
    t, _s = _fit(make_cfg(b, autoresume=True))
    assert t.resumed_from.name == "ep0-ba4"
    final_b = _weights(b / "ck" / "ep1-ba12")
    assert final_a.keys() == final_b.keys()
    for k in final_a:
        assert torch.equal(final_a[k], final_b[k]), k
    # truncate the newest checkpoint of a copy: find_latest_checkpoint falls back to the previous one
    c = tmp_path / "c"
    shutil.copytree(a / "ck", c / "ck")
    shutil.rmtree(c / "ck" / "ep1-ba12")
    newest = ck.list_checkpoints(c / "ck")[0]
    assert newest.name.endswith("-ba8")
    wf = newest / "model" / "model.safetensors"
    wf.write_bytes(wf.read_bytes()[:-100])
    assert ck.verify_checkpoint(newest) is not None
    assert ck.find_latest_checkpoint(c / "ck").name == "ep0-ba4"
    assert open_model_source(c / "ck").folder == c / "ck" / "ep0-ba4" / "model"
    t, _ = _fit(make_cfg(c, autoresume=True))
    assert t.resumed_from.name == "ep0-ba4"
    final_c = _weights(c / "ck" / "ep1-ba12")
    assert all(torch.equal(final_a[k], final_c[k]) for k in final_a)


def test_keep_last_n_and_manifest(tmp_path):
    """save_num_checkpoints_to_keep=2 leaves the two newest; each has a manifest whose checksums verify."""
    _fit(make_cfg(tmp_path, save_num_checkpoints_to_keep=2))
    names = [p.name for p in ck.list_checkpoints(tmp_path / "ck")]
    assert names == ["ep1-ba12", "ep0-ba8"]
    m = ck.read_manifest(tmp_path / "ck" / "ep1-ba12")
    assert m["step"] == 12 and "model/model.safetensors" in m["files"] and "trainer_state.pt" in m["files"]
    assert ck.verify_checkpoint(tmp_path / "ck" / "ep1-ba12") is None
    st = ck.load_trainer_state(tmp_path / "ck" / "ep1-ba12")  # weights_only=True load
    assert st["step"] == 12 and "optimizer" in st and "rng" in st and st["data"]["offset"] >= 0
    assert ck.find_latest_checkpoint(tmp_path / "nothing-here") is None


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """Microbatch 2 (4 accumulation steps) gives the same weights as microbatch 8, up to float rounding."""
    _fit(make_cfg(tmp_path / "x", device_train_microbatch_size=8, max_duration="4ba"))
    _fit(make_cfg(tmp_path / "y", device_train_microbatch_size=2, max_duration="4ba"))
    wx = _weights(tmp_path / "x" / "ck" / "ep0-ba4")
    wy = _weights(tmp_path / "y" / "ck" / "ep0-ba4")
    for k in wx:
        torch.testing.assert_close(wx[k], wy[k], rtol=1e-4, atol=1e-5)


def _oom_above(limit):
    from mptkit.train.trainer import causal_lm_loss

    def loss_fn(model, mb):
        if mb["input_ids"].shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return causal_lm_loss(model, mb)

    return loss_fn


def test_auto_microbatch_steps_down_on_oom(tmp_path):
    """device_train_microbatch_size=auto: an out-of-memory microbatch is halved and the step retried."""
    cfg = make_cfg(tmp_path, device_train_microbatch_size="auto", max_duration="3ba", save_folder=None)
    t, s = _fit(cfg, loss_fn=_oom_above(2))
    assert s["steps"] == 3 and t.microbatch == 2
    assert [r["microbatch"] for r in _metrics(tmp_path / "run") if "train_loss" in r] == [2, 2, 2]
    with pytest.raises(TrainError, match="out of memory.*device_train_microbatch_size=4"):
        _fit(make_cfg(tmp_path / "f", max_duration="3ba", save_folder=None), loss_fn=_oom_above(2))


def test_export_folder_loads_in_transformers(tmp_path):
    """export_folder is an HF folder that transformers' AutoModelForCausalLM loads with the same logits;
    open_model_source(save_folder).folder is the newest checkpoint's complete model folder."""
    from transformers import AutoModelForCausalLM

    t, _s = _fit(make_cfg(tmp_path, max_duration="4ba", export_folder=str(tmp_path / "hf")))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    hf.eval()
    t.model.eval()
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        ours = t.model(x).logits
        theirs = hf(x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    mf = open_model_source(tmp_path / "ck").folder
    assert mf == tmp_path / "ck" / "ep0-ba4" / "model" and (mf / "config.json").exists()
    hf2 = AutoModelForCausalLM.from_pretrained(str(mf))
    with torch.no_grad():
        torch.testing.assert_close(hf2(x).logits, theirs, rtol=0, atol=0)


def test_bad_inputs_fail_before_the_first_step(tmp_path):
    """Indivisible batch, unwritable save folder, leftover checkpoints without autoresume, amp_fp16 on CPU,
    a missing data folder and a diverging (NaN) loss each raise a clear, actionable error."""
    with pytest.raises(ConfigError, match="not divisible by device_train_microbatch_size"):
        _fit(make_cfg(tmp_path / "a", global_train_batch_size=8, device_train_microbatch_size=3))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainError, match="save_folder .* not writable"):
        _fit(make_cfg(tmp_path / "b", save_folder=str(blocker / "ck")))
    _fit(make_cfg(tmp_path / "c", max_duration="4ba"))
    with pytest.raises(TrainError, match="autoresume=true"):
        _fit(make_cfg(tmp_path / "c", max_duration="4ba"))
    with pytest.raises(ConfigError, match="amp_fp16 needs a CUDA GPU"):
        _fit(make_cfg(tmp_path / "d", precision="amp_fp16"))
    cfg = make_cfg(tmp_path / "e", train_loader={"name": "text", "dataset": {"local": str(tmp_path / "nope")}})
    with pytest.raises(Exception, match="does not exist"):
        Trainer(cfg).fit()

    def nan_loss(model, mb):
        from mptkit.train.trainer import causal_lm_loss

        return causal_lm_loss(model, mb) * float("nan")

    with pytest.raises(TrainError, match="diverged"):
        _fit(make_cfg(tmp_path / "g", save_folder=None), loss_fn=nan_loss)


def test_start_from_pretrained_folder(tmp_path):
    """model: FOLDER starts from that folder's weights (not a fresh init)."""
    _fit(make_cfg(tmp_path / "a", max_duration="3ba", export_folder=str(tmp_path / "hf"), save_folder=None))
    src = load_file(str(tmp_path / "hf" / "model.safetensors"))
    tr, ev = datasets()
    t = Trainer(make_cfg(tmp_path / "b", model=str(tmp_path / "hf"), max_duration="3ba", save_folder=None),
                train_dataset=tr, eval_dataset=ev).setup()
    sd = t.model.state_dict()
    assert all(torch.equal(sd[k], src[k]) for k in src)
    t.fit()
    assert not all(torch.equal(t.model.state_dict()[k], src[k]) for k in src)


def test_pretrained_folder_is_one_decision(tmp_path):
    """pretrained_folder(cfg): a folder with config.json (string or pretrained_model_name_or_path form), None
    for a recipe name, a folder without config.json given as a string, or pretrained: false; a mapping that
    asks for weights from a folder without config.json is a ConfigError."""
    from mptkit.train.recipe_data import pretrained_folder

    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "tok_only").mkdir()
    (folder / "config.json").write_text("{}")
    assert pretrained_folder(make_cfg(tmp_path, model=str(folder))) == folder
    assert pretrained_folder(make_cfg(tmp_path, model=str(tmp_path / "tok_only"))) is None
    assert pretrained_folder(make_cfg(tmp_path, model="mpt-tiny")) is None
    assert pretrained_folder(make_cfg(tmp_path)) is None  # a mapping of MPT keys
    spec = {"name": "mpt_causal_lm", "pretrained_model_name_or_path": str(folder)}
    assert pretrained_folder(make_cfg(tmp_path, model=spec)) == folder
    assert pretrained_folder(make_cfg(tmp_path, model={**spec, "pretrained": False})) is None
    bad = {**spec, "pretrained_model_name_or_path": str(tmp_path / "tok_only")}
    with pytest.raises(ConfigError, match="not a local model folder with a config.json"):
        pretrained_folder(make_cfg(tmp_path, model=bad))


def test_training_never_imports_inference(tmp_path, make_tokenizer):
    """The trainer has no decoder of its own: a run with sample_prompt and a tokenizer, through the Python API,
    imports nothing from mptkit.infer and leaves the summary's sample empty (`mptkit train` passes its sampler)."""
    import subprocess
    import sys
    from pathlib import Path

    tok = make_tokenizer(tmp_path / "tok", vocab_size=300)
    code = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from tests.helpers import TINY_MODEL, datasets, make_cfg
from mptkit.data.tokenizer import load_tokenizer
from mptkit.train.trainer import Trainer
train, val = datasets()
cfg = make_cfg(Path({str(tmp_path)!r}), model={{**TINY_MODEL, "vocab_size": 320}}, max_duration="2ba",
               save_folder=None, sample_prompt="ab", sample_max_new_tokens=2)
t = Trainer(cfg, tokenizer=load_tokenizer({str(tok)!r}), train_dataset=train, eval_dataset=val)
s = t.fit()
assert t.tokenizer is not None and s["sample"] is None, s
bad = sorted(m for m in sys.modules if m.startswith("mptkit.infer"))
assert not bad, bad
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
