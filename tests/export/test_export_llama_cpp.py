"""The GGUF export runs in llama.cpp (through llama-cpp-python) as the same model: for small random-init
models in every configuration the exporter accepts, llama.cpp's greedy continuation equals mptkit's and
its logits are close to mptkit's at every position of prompt + continuation.

Tolerance: f32 file with an f32 KV cache, max |logit difference| <= 0.03 (measured <= 0.011 with logits
of standard deviation 1.2 to 5): ggml's GELU is the tanh approximation looked up through an f16 table,
MPT's is the exact erf GELU; everything else matches to f32 rounding. f16 file with llama.cpp's default f16
KV cache: <= 0.1 (measured 0.017).

Skipped when llama-cpp-python is not installed (building it compiles llama.cpp: ~12 minutes on 2 cores).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow  # about a minute in all on a busy 2-core machine
pytest.importorskip("gguf")

from mptkit.export.gguf import export_gguf
from tests.helpers import llama_cpp_greedy_run, saved_model

N_NEW = 24
TEXT = "def load(fp, *, cls=None):\n    return json.loads(fp.read())  # naïve\n\tx = [1, 22, 333]  'quoted'\n"

CONFIGS = {
    "mha-alibi": ({}, 0.03),
    "6-heads-alibi": ({"d_model": 96, "n_heads": 6}, 0.03),  # non-power-of-two heads: interleaved slopes
    "untied-clip": ({"tie_word_embeddings": False, "attn_config": {"clip_qkv": 0.8}}, 0.03),
    "gqa": ({"d_model": 96, "n_heads": 6, "attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2}}, 0.03),
    "biases-mqa-clip": ({"no_bias": False, "d_model": 96, "n_heads": 6,
                             "attn_config": {"attn_type": "multiquery_attention", "clip_qkv": 1.0}}, 0.03),
    "learned-pos-no-alibi": ({"learned_pos_emb": True, "attn_config": {"alibi": False}, "expansion_ratio": 3}, 0.03),
    "alibi-bias-max-4": ({"attn_config": {"alibi_bias_max": 4}}, 0.03),
    "folded-scales": ({"logit_scale": 0.5, "attn_config": {"softmax_scale": 0.05}}, 0.03),
}


def _llama(path, dtype):
    # One thread: with two, ggml's threads spin-wait on each other and, on a busy 2-core machine, a
    # 40-token test takes seconds instead of milliseconds.
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if dtype == "f32" else {}
    return llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False, seed=0, **kv)


def _mptkit_greedy(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq


def _check(tmp_path, make_tokenizer, over, dtype, tol):
    model = saved_model(tmp_path / "m", make_tokenizer(), **over)
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", dtype=dtype)
    llm = _llama(tmp_path / "m.gguf", dtype)
    prompt = torch.randint(2, 400, (16,), generator=torch.Generator().manual_seed(3)).tolist()
    got, lc_logits = llama_cpp_greedy_run(llm, prompt, N_NEW)
    want = _mptkit_greedy(model, prompt, N_NEW)
    assert got == want
    with torch.no_grad():
        ref = model(torch.tensor([want])).logits[0].numpy()
    n = len(want) - 1  # llama.cpp has logits for every evaluated token (the last token was not evaluated)
    err = float(np.abs(lc_logits[:n] - ref[:n]).max())
    assert ref.std() > 1.0  # the logits discriminate: agreement is not trivial
    assert err <= tol, f"max |logit diff| {err:.4g} > {tol}"
    return llm


@pytest.mark.parametrize("name", list(CONFIGS))
def test_f32_gguf_matches_mptkit_in_llama_cpp(tmp_path, make_tokenizer, name):
    """Same greedy continuation (24 tokens after a 16-token prompt); logits within the stated tolerance."""
    over, tol = CONFIGS[name]
    _check(tmp_path, make_tokenizer, over, "f32", tol)


def test_f16_gguf_matches_mptkit_in_llama_cpp(tmp_path, make_tokenizer):
    _check(tmp_path, make_tokenizer, {}, "f16", 0.1)


def test_embedded_tokenizer_tokenizes_like_the_hf_tokenizer(tmp_path, make_tokenizer):
    """llama.cpp's gpt2 tokenizer built from the embedded vocabulary and merges gives the HF tokenizer's ids
    for code with spaces, tabs, newlines, digits and non-ASCII text, and decodes them back to the text."""
    from transformers import AutoTokenizer

    tok = make_tokenizer()
    saved_model(tmp_path / "m", tok)
    export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    llm = _llama(tmp_path / "m.gguf", "f32")
    hf = AutoTokenizer.from_pretrained(str(tok))
    want = hf(TEXT)["input_ids"]
    got = llm.tokenize(TEXT.encode("utf-8"), add_bos=False, special=False)
    assert got == want and len(want) > 10
    assert llm.detokenize(got).decode("utf-8") == TEXT
    assert llm.token_eos() == hf.eos_token_id


def test_mptkit_trained_tokenizer_with_chatml_tokens(tmp_path):
    """mptkit's own tokenizer (GPT-NeoX style: NFC + byte-level BPE, ChatML special tokens) is embedded with
    pre 'mpt'; llama.cpp tokenizes plain text and ChatML-formatted text (special tokens parsed) like HF."""
    tokmod = pytest.importorskip("mptkit.data.tokenizer")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((TEXT * 3 + "Hello world, numbers 12345 and ünïcödé.\n") * 20)
    tok = tokmod.train_tokenizer([str(corpus)], 384, tmp_path / "tok")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok))
    vocab = tokmod.padded_vocab_size(len(hf))
    saved_model(tmp_path / "m", tok, vocab_size=vocab)
    # --tokenizer: save_pretrained(tokenizer=<folder>) does not copy chat_template.jinja into the model folder
    export_gguf(tmp_path / "m", tmp_path / "m.gguf", tokenizer=tok)
    import gguf

    fields = {k: f.contents() for k, f in gguf.GGUFReader(str(tmp_path / "m.gguf")).fields.items()}
    assert fields["tokenizer.ggml.pre"] == "mpt"
    assert hf.chat_template and fields["tokenizer.chat_template"] == hf.chat_template
    llm = _llama(tmp_path / "m.gguf", "f32")
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == hf(TEXT)["input_ids"]
    chat = "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    want = hf(chat)["input_ids"]
    assert hf.convert_tokens_to_ids("<|im_start|>") in want
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == want
