"""llm-foundry's own YAMLs as written (project-made copies of the shape of pretrain/mpt-125m.yaml, pretrain/mpt-7b.yaml
with its fsdp_config.device_mesh, and finetune/mpt-7b_dolly_sft.yaml, under tests/train/foundry_yamls/): `mptkit
train` validates each unchanged, and trains one step of the 125m and Dolly ones with only local paths and tiny sizes
overridden (the 7b one differs from the 125m one in sizes and its fsdp_config, whose mapping is checked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mptkit.cli import main as cli_main
from mptkit.train.config import load_run_config
from tests.helpers import VOCAB, model_folder

YAMLS = Path(__file__).resolve().parent / "foundry_yamls"
TINY = ["model.d_model=32", "model.n_heads=2", "model.n_layers=1", f"model.vocab_size={VOCAB}", "max_seq_len=32"]
STEP = ["global_train_batch_size=4", "device_train_microbatch_size=2", "device_eval_batch_size=2", "max_duration=1ba",
        "precision=fp32", "scheduler.t_warmup=0.5dur", "eval_subset_num_batches=1", "torch_threads=1"]


@pytest.mark.parametrize("name", ["mpt-125m", "mpt-7b", "mpt-7b_dolly_sft", "mpt-7b_dolly_lora"])
def test_foundry_yamls_validate_as_written(name, capsys):
    assert cli_main(["train", str(YAMLS / f"{name}.yaml"), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "fsdp_config:" in printed and "train_loader:" in printed
    if name == "mpt-7b":
        from mptkit.train.fsdp_config import parse_fsdp_config

        s = parse_fsdp_config(load_run_config(YAMLS / "mpt-7b.yaml").fsdp_config)
        assert (s.sharding_strategy, s.data_parallel_replicate_degree, s.data_parallel_shard_degree) == (
            "HYBRID_SHARD", 2, 4)


@pytest.fixture
def prepared(tmp_path, make_tokenizer):
    import json as _json

    from mptkit.data.prepare import prepare_dataset

    tok = make_tokenizer()
    src = Path(_json.__file__).parent
    prepare_dataset([str(src)], str(tok), str(tmp_path / "c4"), 32, val_fraction=0.3, split_seed=1)
    return tok, tmp_path / "c4"


@pytest.mark.parametrize("name", ["mpt-125m"])  # mpt-7b.yaml: the same keys but fsdp_config's (validated above)
def test_pretrain_yamls_train_a_step(tmp_path, prepared, name):
    tok, data = prepared
    run = tmp_path / "run"
    assert cli_main(["train", str(YAMLS / f"{name}.yaml"), f"data_local={data}", f"tokenizer.name={tok}", *TINY, *STEP,
                     f"run_folder={run}"]) == 0
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "train_loss" in r] == [1]


@pytest.mark.parametrize("name", ["mpt-7b_dolly_sft", "mpt-7b_dolly_lora"])
def test_dolly_sft_yaml_trains_a_step(tmp_path, make_tokenizer, name):
    tok = make_tokenizer()
    base = model_folder(tmp_path / "mpt", tok, max_seq_len=64)
    data = tmp_path / "dolly"
    data.mkdir()
    rec = {"prompt": "Below is an instruction.\n### Instruction:\nSay hi.\n### Response:\n", "response": "hi"}
    for split, n in (("train", 8), ("test", 4)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(rec) + "\n" for _ in range(n)))
    run = tmp_path / "run"
    assert cli_main(["train", str(YAMLS / f"{name}.yaml"), f"tokenizer_name={base}", f"dolly_local={data}",
                     f"model.pretrained_model_name_or_path={base}", "max_seq_len=64", *STEP, f"run_folder={run}",
                     f"export_folder={tmp_path / 'out'}"]) == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "train_loss" in r] == [1]
    assert any("eval_loss" in r for r in recs)  # eval_first: true
    if name.endswith("lora"):  # only the adapter trained: the export is peft's adapter folder, r=16 on Wqkv
        from mptkit.io.adapter import read_adapter_config

        ad = read_adapter_config(tmp_path / "out")
        assert (ad.r, ad.lora_alpha, list(ad.target_modules)) == (16, 32, ["Wqkv"])
