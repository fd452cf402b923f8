"""The bundled Instruct, Chat and StoryWriter recipes, run as a user runs them (`mptkit train
configs/finetune/X.yaml` with tiny overrides), do what docs/finetuning.md says: packed examples do not attend to
each other, in training and in the model the recipe produces; StoryWriter trains and exports past its base's
context; and every kind of ``model.config_overrides`` on a pretrained start reaches the modules (a forward that
depends on it changes exactly as a model built with that config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mptkit.cli import main
from mptkit.errors import ConfigError
from mptkit.model import MPTForCausalLM
from tests.helpers import Spread, model_folder, tiny_cfg

ROOT = Path(__file__).resolve().parents[2]


def _base(tmp: Path, tok: Path, **cfg) -> Path:
    """A tiny ALiBi MPT (max_seq_len 128, as the quickstart model) with the tokenizer beside it. Its weights are
    random with a large spread: attention is peaked and every setting visibly changes the output (MPT's own
    small init makes a random model nearly blind to its context)."""
    return model_folder(tmp / "base", tok, seed=None, spread=Spread(std=0.3, seed=5), max_seq_len=128, **cfg)


def _overrides(tmp: Path, base: Path) -> list[str]:
    return [f"variables.base={base}", f"save_folder={tmp / 'run' / 'ck'}", f"run_folder={tmp / 'run'}",
            f"export_folder={tmp / 'run' / 'hf'}", "progress_bar=false", "torch_threads=1", "peak_tflops=1.0"]


def _segments(ids: torch.Tensor, labels: torch.Tensor, seq: torch.Tensor):
    """(input_ids, labels) of each example packed in one sample (padding, sequence id -1, dropped)."""
    out = []
    for s in seq.unique().tolist():
        if s < 0:
            continue
        where = (seq == s).nonzero().flatten()
        lo, hi = int(where[0]), int(where[-1]) + 1
        assert torch.equal(where, torch.arange(lo, hi)), "an example's tokens are contiguous in its sample"
        out.append((ids[lo:hi], labels[lo:hi]))
    return out


def _ce_sum(model, ids, labels) -> tuple[float, int]:
    """Summed next-token cross-entropy of one example run alone (no packing, no sequence ids)."""
    with torch.no_grad():
        logits = model(ids[None].long()).logits[0, :-1].double()
    tgt = labels[1:].long()
    keep = tgt != -100
    return float(F.cross_entropy(logits[keep], tgt[keep], reduction="sum")), int(keep.sum())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["instruct", "chat", "instruct-lora", "chat-lora"])
def test_bundled_recipe_trains_packed_examples_as_if_alone(recipe, tmp_path, make_tokenizer):
    """One full-batch step of the bundled recipe: the loss the trainer reports at step 1 (computed on the
    packed samples with the starting weights; a fresh LoRA adapter is exactly the base) equals the loss of every
    example run alone through the base model; and the model the recipe exports (for LoRA: merged by `mptkit
    export hf RUN OUT --merge`) still keeps packed examples apart and says its context length."""
    from mptkit.data.finetune import builtin_records
    from mptkit.train.config import load_run_config
    from mptkit.train.recipe_data import build_finetune_data

    base = _base(tmp_path, make_tokenizer())
    path = ROOT / "configs" / "finetune" / f"{recipe}.yaml"
    data = tmp_path / "data"  # the first records of the recipe's own built-in dataset (all 716 are slow here)
    data.mkdir()
    for split, n in (("train", 96), ("test", 8)):
        recs = [r for _, r in builtin_records(f"mptkit:stdlib-{recipe.removesuffix('-lora')}", split)[:n]]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    # 1024-token samples: this test tokenizer's long prompts pack several to a sample (256 holds one)
    over = [*_overrides(tmp_path, base), f"variables.data={data}", "max_seq_len=1024"]
    _, train, _, _ = build_finetune_data(load_run_config(path, over))  # the samples the trainer will see
    n = len(train)
    packs = [_segments(train.input_ids[i], train.labels[i], train.sequence_id[i]) for i in range(n)]
    assert max(len(p) for p in packs) >= 2, "the recipe packs several examples per sample"
    for pack in packs:  # each boundary's target is the next example's first (prompt) token: not trained on
        for _, labels in pack[1:]:
            assert int(labels[0]) == -100
    rc = main(["train", str(path), *over, f"global_train_batch_size={n}", f"device_train_microbatch_size={n}",
               "max_duration=1ba", "scheduler.t_warmup=0ba", "eval_first=false", "eval_interval=1ba"])
    assert rc == 0
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"train_loss"' in line]
    start = MPTForCausalLM.from_pretrained(base).eval()
    total, count = 0.0, 0
    for pack in packs:
        for ids, labels in pack:
            s, c = _ce_sum(start, ids, labels)
            total, count = total + s, count + c
    assert steps[0]["step"] == 1
    assert steps[0]["train_loss"] == pytest.approx(total / count, rel=1e-5, abs=1e-6)

    made_folder = tmp_path / "run" / "hf"
    if recipe.endswith("-lora"):  # the run's export is the adapter alone: merge it into the base
        made_folder = tmp_path / "merged"
        assert main(["export", "hf", str(tmp_path / "run" / "hf"), str(made_folder), "--merge"]) == 0
    made = MPTForCausalLM.from_pretrained(made_folder).eval()
    assert made.config.max_seq_len == 1024  # the context it was trained at, as the recipe's comment says
    i = max(range(n), key=lambda j: len(packs[j]))
    ids, seq = train.input_ids[i][None].long(), train.sequence_id[i][None].long()
    with torch.no_grad():
        packed = made(ids, sequence_id=seq).logits[0]
        for s in range(len(packs[i])):
            where = (seq[0] == s).nonzero().flatten()
            alone = made(ids[:, where]).logits[0]
            torch.testing.assert_close(packed[where], alone, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ config_overrides reach the modules

X = torch.randint(0, 448, (2, 24), generator=torch.Generator().manual_seed(0))
SEQ = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])


def _forward(model, *, train: bool = False) -> torch.Tensor:
    """Logits on a fixed packed batch; with ``train`` in training mode from a fixed seed (dropout)."""
    model.train(train)
    torch.manual_seed(7)
    with torch.set_grad_enabled(False):
        return model(X, sequence_id=SEQ).logits


def _wte_grad(model) -> torch.Tensor:
    model.zero_grad()
    model.train()
    model(X, labels=X).loss.backward()
    return model.transformer.wte.weight.grad.clone()


CASES = {  # override -> how a model's behaviour shows it
    "attn_uses_sequence_id": ({"attn_config": {"attn_uses_sequence_id": True}}, _forward),
    "clip_qkv": ({"attn_config": {"clip_qkv": 0.05}}, _forward),
    "softmax_scale": ({"attn_config": {"softmax_scale": 0.9}}, _forward),
    "alibi_bias_max": ({"attn_config": {"alibi_bias_max": 2}}, _forward),
    "attn_pdrop": ({"attn_config": {"attn_pdrop": 0.3}}, lambda m: _forward(m, train=True)),
    "resid_pdrop": ({"resid_pdrop": 0.3}, lambda m: _forward(m, train=True)),
    "emb_pdrop": ({"emb_pdrop": 0.3}, lambda m: _forward(m, train=True)),
    "logit_scale": ({"logit_scale": 0.5}, _forward),
    "norm_type": ({"norm_type": "rmsnorm"}, _forward),
    "layer_norm_epsilon": ({"layer_norm_epsilon": 0.5}, _forward),
    "embedding_fraction": ({"embedding_fraction": 0.25}, _wte_grad),
}


def _recipe_model(tmp: Path, base: Path, overrides: dict):
    """The model `mptkit train` builds for the bundled Instruct recipe started from ``base`` with ``overrides``
    given as ``model.config_overrides`` (the trainer's own builder, from the recipe file and CLI overrides)."""
    from mptkit.train.config import load_run_config
    from mptkit.train.recipe_data import build_model

    def flat(d, pre="model.config_overrides."):
        for k, v in d.items():
            yield from flat(v, f"{pre}{k}.") if isinstance(v, dict) else [f"{pre}{k}={json.dumps(v)}"]

    cfg = load_run_config(ROOT / "configs" / "finetune" / "instruct.yaml",
                          [*_overrides(tmp, base), *flat(overrides)])
    return build_model(cfg, torch.device("cpu"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_overrides_of_a_pretrained_start_reach_the_modules(name, tmp_path, make_tokenizer):
    """For each override: the recipe's model behaves exactly as a model built with the overridden config and
    the base weights, and differently from the base model (so the override took effect in the modules)."""
    over, probe = CASES[name]
    base = _base(tmp_path, make_tokenizer())
    start = MPTForCausalLM.from_pretrained(base)
    # the recipe itself sets attn_uses_sequence_id; the reference is the folder's config with all of it
    want = start.config.replace(max_seq_len=256, attn_config={"attn_uses_sequence_id": True}).replace(**over)
    ref = MPTForCausalLM(want)
    ref.load_state_dict(start.state_dict())
    got = _recipe_model(tmp_path, base, over)
    torch.testing.assert_close(probe(got), probe(ref), rtol=0, atol=0)
    # the recipe itself sets attn_uses_sequence_id: without it is the base model
    without = start if name == "attn_uses_sequence_id" else _recipe_model(tmp_path, base, {})
    assert not torch.allclose(probe(got), probe(without), atol=1e-4), f"{name} changed nothing"


def test_attn_impl_override_selects_the_backend(tmp_path, make_tokenizer, monkeypatch):
    """``attn_config.attn_impl`` given as an override is the backend the recipe's model runs (counted at the
    dispatch), with the same result as the base model's backend."""
    import importlib

    attention = importlib.import_module("mptkit.model.attention")
    calls = []
    real = attention.BACKENDS["blockwise"]
    monkeypatch.setitem(attention.BACKENDS, "blockwise", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = _base(tmp_path, make_tokenizer())
    plain = _forward(_recipe_model(tmp_path, base, {}))
    assert not calls
    got = _forward(_recipe_model(tmp_path, base, {"attn_config": {"attn_impl": "blockwise"}}))
    assert len(calls) == 2  # one per layer
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def test_shape_changing_override_of_a_pretrained_start_is_refused(tmp_path, make_tokenizer, capsys):
    """An override that would change the weights' shapes (here qk_ln's norms) is a clear error naming it."""
    base = _base(tmp_path, make_tokenizer())
    with pytest.raises(ConfigError, match=r"overrides \(attn_config.*shape"):
        _recipe_model(tmp_path, base, {"attn_config": {"qk_ln": True}})
    rc = main(["train", str(ROOT / "configs" / "finetune" / "instruct.yaml"), *_overrides(tmp_path, base),
               "model.config_overrides.d_model=128"])
    assert rc != 0 and "d_model" in capsys.readouterr().err


def test_a_built_models_config_is_read_only():
    """Changing a built model's config cannot silently leave its modules behind: it is refused, and
    ``set_attn_impl`` (the one sanctioned change) updates the config and every layer together."""
    model = MPTForCausalLM(tiny_cfg())
    with pytest.raises(ConfigError, match="read-only"):
        model.config.attn_config["attn_uses_sequence_id"] = True
    with pytest.raises(ConfigError, match="read-only"):
        model.config.max_seq_len = 4096
    with pytest.raises(ConfigError, match="read-only"):
        model.config = model.config.replace(max_seq_len=4096)
    with pytest.raises(ConfigError, match="read-only"):
        model.transformer.config = model.config.replace(max_seq_len=4096)
    changed = model.config.replace(attn_config={"clip_qkv": 1.0})  # a copy is changeable, the model untouched
    assert changed.attn_config["clip_qkv"] == 1.0 and model.config.attn_config["clip_qkv"] is None
    model.set_attn_impl("blockwise")
    assert model.config.attn_impl == model.transformer.config.attn_impl == "blockwise"
    assert {b.attn.attn_impl for b in model.transformer.blocks} == {"blockwise"}


@pytest.mark.slow
def test_bundled_storywriter_recipe_trains_past_the_base_context(tmp_path, make_tokenizer):
    """The StoryWriter recipe (tiny overrides) from a base trained at 128 tokens: the loss `mptkit train`
    reports at step 1 of a full batch is the base model's loss over whole 512-token samples (trained at the
    new length, nothing cut), and the exported folder says the new context, which transformers' own MPT then
    runs at that length with mptkit's logits."""
    import inspect
    import textwrap

    from transformers import AutoModelForCausalLM

    from mptkit.data.shards import TokenDataset

    base = _base(tmp_path, make_tokenizer(), expansion_ratio=4)  # a shape transformers' MPT can express
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for mod in (json, textwrap):
        (corpus / f"{mod.__name__}.py").write_text(inspect.getsource(mod))
    path = ROOT / "configs" / "finetune" / "storywriter.yaml"
    over = [*_overrides(tmp_path, base), f"variables.corpus={corpus}", f"variables.data={tmp_path / 'data'}",
            "max_seq_len=512", "max_duration=1ba", "scheduler.t_warmup=0ba", "eval_first=false"]
    assert main(["train", str(path), *over, "--print-config"]) == 0  # validates before the data exists
    from mptkit.train.config import load_run_config
    from mptkit.train.distributed import DistInfo
    from mptkit.train.recipe_data import prepare_if_needed

    prepare_if_needed(load_run_config(path, over), DistInfo())  # what the run does first (cached for it)
    train = TokenDataset(tmp_path / "data", split="train")
    n = len(train)
    assert n >= 2 and train.manifest["max_seq_len"] == 512
    rc = main(["train", str(path), *over, f"global_train_batch_size={n}", f"device_train_microbatch_size={n}",
               "eval_interval=1ba"])
    assert rc == 0
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"train_loss"' in line]
    start = MPTForCausalLM.from_pretrained(base).eval()
    ids = torch.stack([torch.as_tensor(train[i]["input_ids"]).long() for i in range(n)])
    assert ids.shape == (n, 512)
    with torch.no_grad():
        want = float(start(ids, labels=ids).loss)
    assert steps[0]["train_loss"] == pytest.approx(want, rel=1e-5)

    hf = tmp_path / "run" / "hf"
    made = MPTForCausalLM.from_pretrained(hf).eval()
    assert made.config.max_seq_len == 512 and start.config.max_seq_len == 128
    theirs = AutoModelForCausalLM.from_pretrained(str(hf), local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids[:1]).logits, made(ids[:1]).logits, rtol=1e-4, atol=1e-4)
