"""Finetuning data rendered with the tokenizer's own chat_template (ChatML stays the default), and the dataset's
eos_token_id (llm-foundry keys), through build_finetune_dataset and the recipe's finetuning loader."""

from __future__ import annotations

import json

import pytest

from mptkit.data.finetune import IGNORE_INDEX, FinetuneOptions, build_finetune_dataset, chat_template_renderer
from mptkit.data.tokenizer import CHATML_TEMPLATE
from mptkit.errors import ConfigError

# a template unlike ChatML (Zephyr-like markers as plain text, EOS as the end of each reply)
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
            "{% elif m['role'] == 'system' %}<|system|>\n{{ m['content'] }}\n"
            "{% else %}<|assistant|>\n{{ m['content'] }}<|endoftext|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MSGS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "and then?"}, {"role": "assistant", "content": "we stop"}]


@pytest.fixture
def tok(make_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(make_tokenizer()))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_a_tokenizer_chat_template_renders_the_conversation(tmp_path, tok):
    """With the tokenizer's own template: the sample is the template's rendering of the conversation, tokenized
    piece by piece (prompt, response, ...) as the tokenizer reads it; the trained tokens are exactly the
    template's replies (content + its end marker), none of the prompts."""
    tok.chat_template = TEMPLATE
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": MSGS}) + "\n")
    ds = build_finetune_dataset(tmp_path / "c.jsonl", tok, FinetuneOptions(max_seq_len=256, target_responses="all",
                                                                           system_prompt=None))
    pieces = ["<|user|>\nhi\n<|assistant|>\n", "hello there<|endoftext|>\n",
              "<|user|>\nand then?\n<|assistant|>\n", "we stop<|endoftext|>\n"]
    assert "".join(pieces) == tok.apply_chat_template(MSGS, tokenize=False)
    want = [i for p in pieces for i in _ids(tok, p)]
    n = int(ds.lengths[0])
    assert ds[0]["input_ids"][:n].tolist() == want
    lab = ds[0]["labels"][:n].tolist()
    trained = [i for i, x in zip(want, lab) if x != IGNORE_INDEX]
    assert trained == _ids(tok, pieces[1]) + _ids(tok, pieces[3])
    assert tok.eos_token_id in trained  # the template's end of reply is learnt (no extra EOS appended)
    # a system prompt goes through the template too
    ds2 = build_finetune_dataset(tmp_path / "c.jsonl", tok, FinetuneOptions(max_seq_len=256, system_prompt="Be kind."))
    assert tok.decode(ds2[0]["input_ids"][: int(ds2.lengths[0])]).startswith("<|system|>\nBe kind.\n<|user|>")


def test_chatml_stays_the_default(tok):
    """No template, or a template that renders ChatML as mptkit does: mptkit's own ChatML path (markers as
    control tokens, content as text)."""
    assert chat_template_renderer(tok) is None
    tok.chat_template = CHATML_TEMPLATE
    assert chat_template_renderer(tok) is None
    tok.chat_template = TEMPLATE
    assert chat_template_renderer(tok) is not None


def test_finetuning_eos_token_id_ends_the_response(tmp_path, make_tokenizer):
    """train_loader.dataset.eos_token_id (through the recipe): the final response ends with that id instead
    of the tokenizer's EOS; an id outside the tokenizer is refused naming the key."""
    from mptkit.train.config import config_from_dict
    from mptkit.train.recipe_data import build_finetune_data

    tokdir = make_tokenizer()
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "def f():", "response": " pass"}) + "\n")

    def cfg(**ds):
        return config_from_dict({"model": "mpt-tiny", "tokenizer": {"name": str(tokdir)}, "max_seq_len": 32,
                                 "train_loader": {"name": "finetuning", "dataset": {
                                     "hf_name": str(tmp_path / "d.jsonl"), "tokenizer_name": str(tokdir), **ds}}})

    _, plain, _, _ = build_finetune_data(cfg())
    _, custom, _, _ = build_finetune_data(cfg(eos_token_id=7))
    n = int(plain.lengths[0])
    assert plain[0]["input_ids"][n - 1] == 0  # <|endoftext|>
    assert custom[0]["input_ids"][: n - 1].tolist() == plain[0]["input_ids"][: n - 1].tolist()
    assert custom[0]["input_ids"][n - 1] == 7 and custom[0]["labels"][n - 1] == 7
    with pytest.raises(Exception, match="eos_token_id"):
        build_finetune_data(cfg(eos_token_id=10_000))
    with pytest.raises(ConfigError, match="tokenizer_name"):
        build_finetune_data(cfg(tokenizer_name=str(tmp_path / "other")))
