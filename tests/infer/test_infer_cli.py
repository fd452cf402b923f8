"""`mptkit generate` (prompt flag and stdin) and `mptkit chat` (ChatML, history trimmed) run end to end."""

from __future__ import annotations

import io
import sys

import torch

from mptkit.cli import main
from mptkit.infer.chat import trim_history
from mptkit.io import load_tokenizer
from mptkit.model import MPTForCausalLM
from mptkit.prompts import DEFAULT_SYSTEM_PROMPT, render_chatml
from tests.helpers import model_folder


def _folder(tmp_path, make_tokenizer):
    tok = load_tokenizer(make_tokenizer())
    return model_folder(tmp_path / "m", tok, spread=None, vocab_size=len(tok), max_seq_len=256)


def test_generate_cli_flag_and_stdin(tmp_path, make_tokenizer, capsys, monkeypatch):
    """The same greedy continuation from --prompt and from stdin; exit code 0."""
    d = _folder(tmp_path, make_tokenizer)
    assert main(["generate", str(d), "--prompt", "def f(x):", "--max-new-tokens", "6", "--ignore-eos"]) == 0
    a = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.StringIO("def f(x):"))
    assert main(["generate", str(d), "--max-new-tokens", "6", "--ignore-eos", "--seed", "1"]) == 0
    b = capsys.readouterr().out
    assert a == b and a.strip()
    assert main(["generate", str(d), "--prompt", "x", "--temperature", "-1"]) == 2  # user error, no traceback
    assert main(["generate", str(d), "--prompt", "def f(x):", "--max-new-tokens", "6", "--ignore-eos",
                 "--kv-dtype", "fp16"]) == 0  # an fp16 KV cache: same tiny model, still generates
    assert capsys.readouterr().out.strip()


def test_generate_instruct_wraps_the_prompt_in_the_instruct_template(tmp_path, make_tokenizer, capsys):
    """--instruct feeds INSTRUCT_PROMPT.format(instruction=PROMPT): --echo shows it, and the continuation equals
    the one for the formatted prompt given verbatim."""
    from mptkit.prompts import INSTRUCT_PROMPT

    d = _folder(tmp_path, make_tokenizer)
    args = ["--max-new-tokens", "5", "--ignore-eos", "--quiet-stats"]
    assert main(["generate", str(d), "--prompt", "Say hi.\n", "--instruct", "--echo", *args]) == 0
    a = capsys.readouterr().out
    full = INSTRUCT_PROMPT.format(instruction="Say hi.")
    assert a.startswith(full) and len(a) > len(full)
    assert main(["generate", str(d), "--prompt", full, "--echo", *args]) == 0
    assert capsys.readouterr().out == a


def test_generate_warns_of_a_capped_max_new_tokens_encoding_the_prompt_once(tmp_path, make_tokenizer, capsys,
                                                                           caplog, monkeypatch):
    """--max-new-tokens beyond what the context leaves after the prompt: a warning with the prompt's token
    count, taken from the ids the generator encodes (the prompt is tokenized once)."""
    from mptkit.infer.generate import Generator

    d = _folder(tmp_path, make_tokenizer)
    calls = []
    real = Generator.encode
    monkeypatch.setattr(Generator, "encode", lambda self, p: calls.append(p) or real(self, p))
    with caplog.at_level("WARNING"):
        assert main(["generate", str(d), "--prompt", "def f(x):", "--max-new-tokens", "100", "--max-context", "16",
                     "--ignore-eos", "--quiet-stats"]) == 0
    assert calls == ["def f(x):"]
    n_prompt = len(load_tokenizer(d).encode("def f(x):", add_special_tokens=False))
    msg = next(r.getMessage() for r in caplog.records if "--max-new-tokens 100" in r.getMessage())
    assert f"the context holds 16 tokens and the prompt takes {n_prompt}, so at most {16 - n_prompt} new" in msg
    assert capsys.readouterr().out.strip()


def test_chat_repl_and_trimming(tmp_path, make_tokenizer, capsys, monkeypatch):
    """The chat REPL answers two turns; ChatML renders as MPT-7B-Chat; old turns are dropped to fit."""
    d = _folder(tmp_path, make_tokenizer)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n/quit\n"))
    assert main(["chat", str(d), "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.count("assistant> ") == 2
    p = render_chatml([{"role": "user", "content": "hi"}], default_system=DEFAULT_SYSTEM_PROMPT)
    assert p == (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                 "<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "s"}] + [{"role": r, "content": "x" * 10} for r in ["user", "assistant"] * 5]
    msgs.append({"role": "user", "content": "last"})
    kept = trim_history(msgs, lambda m: len(render_chatml(m)), 120)
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last" and kept[1]["role"] == "user"
    assert len(render_chatml(kept)) <= 120 < len(render_chatml(msgs))


def test_generate_serve_and_eval_take_a_training_run(tmp_path, make_tokenizer, capsys):
    """`mptkit generate RUN` loads the run's newest valid checkpoint (tokenizer from the run folder) and
    continues exactly as the same weights in a model folder do; the server (over HTTP) answers with that same
    continuation and the eval loader loads those weights; a folder with neither a model nor a checkpoint is a
    clear error."""
    import shutil

    from mptkit.eval.scoring import load_model
    from mptkit.infer.server import build_server
    from mptkit.train.trainer import Trainer
    from tests.helpers import TINY_MODEL, datasets, make_cfg

    ck = tmp_path / "ck"
    tok_dir = make_tokenizer(tmp_path / "tok")
    shutil.copytree(tok_dir, ck)  # the tokenizer kept at the run's top level, beside its checkpoints
    vocab = len(load_tokenizer(tok_dir))
    tr, ev = datasets()
    Trainer(make_cfg(tmp_path, model={**TINY_MODEL, "vocab_size": vocab}, max_duration="4ba"),
            train_dataset=tr, eval_dataset=ev).fit()
    [ckpt] = [p for p in (ck).iterdir() if p.name.startswith("ep")]
    flat = tmp_path / "flat"
    shutil.copytree(ckpt / "model", flat)
    for f in tok_dir.iterdir():
        shutil.copy(f, flat / f.name)
    args = ["--prompt", "def f(x):", "--max-new-tokens", "5", "--ignore-eos"]
    assert main(["generate", str(flat), *args]) == 0
    want = capsys.readouterr().out
    assert main(["generate", str(ck), *args]) == 0
    assert capsys.readouterr().out == want and want.strip()
    model, tok = load_model(ck, device="cpu")
    assert tok is not None and torch.equal(model.transformer.wte.weight,
                                           MPTForCausalLM.from_pretrained(flat).transformer.wte.weight)
    import httpx

    from mptkit.infer.server import BackgroundServer

    with BackgroundServer(build_server(str(ck))) as bg:  # `mptkit serve RUN`: the same weights answer
        assert [m["id"] for m in httpx.get(bg.base_url + "/v1/models").json()["data"]] == ["ck"]
        r = httpx.post(bg.base_url + "/v1/completions", timeout=60, json={
            "model": "ck", "prompt": "def f(x):", "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want.rstrip("\n")
    (tmp_path / "empty").mkdir()
    assert main(["generate", str(tmp_path / "empty"), "--prompt", "x"]) != 0
    assert "no usable checkpoint" in capsys.readouterr().err


def test_chat_session_reuses_the_conversation_so_far(tmp_path, make_tokenizer):
    """The second turn prefills only what the session's cache does not hold (the previous prompt and reply
    are kept), and replies exactly as a fresh session given the same history does (greedy)."""
    from mptkit.infer import Generator, SamplingParams
    from mptkit.infer.chat import ChatSession

    d = _folder(tmp_path, make_tokenizer)
    gen = Generator(MPTForCausalLM.from_pretrained(d), load_tokenizer(d))
    params = SamplingParams(max_tokens=6, temperature=0.0)
    s = ChatSession(gen, params=params)
    for _ in s.send("hello there"):  # the caller's code between tokens is not in inference mode
        assert not torch.is_inference_mode_enabled()
    assert s.last_cached == 0
    second = "".join(s.send("and again"))
    assert 0 < s.last_cached < len(s.prompt_ids())
    fresh = ChatSession(gen, params=params)
    fresh.history = s.history[:2]
    assert "".join(fresh.send("and again")) == second
    assert fresh.last_cached == 0


def test_attn_impl_flag_picks_the_prefill_backend(tmp_path, make_tokenizer, capsys, monkeypatch):
    """The folder's config names ``torch`` (as many HF MPT files do): prefill runs the eager backend; with
    ``--attn-impl sdpa`` it runs ``sdpa`` instead, and the greedy continuation is the same. A name that is no
    backend is a one-line error (exit 2)."""
    import importlib

    attn_mod = importlib.import_module("mptkit.model.attention")  # the package exports a function of that name
    d = _folder(tmp_path, make_tokenizer)
    used = []
    for name in ("torch", "sdpa"):
        real = attn_mod.BACKENDS[name]
        monkeypatch.setitem(attn_mod.BACKENDS, name, lambda *a, _n=name, _r=real, **k: used.append(_n) or _r(*a, **k))
    args = ["--prompt", "def f(x):", "--max-new-tokens", "4", "--ignore-eos", "--quiet-stats"]
    assert main(["generate", str(d), *args]) == 0
    a = capsys.readouterr().out
    assert "torch" in used and "sdpa" not in used
    used.clear()
    assert main(["generate", str(d), *args, "--attn-impl", "sdpa"]) == 0
    assert capsys.readouterr().out == a and a.strip()
    assert "sdpa" in used and "torch" not in used
    assert main(["generate", str(d), *args, "--attn-impl", "nope"]) == 2
    assert "attn_impl" in capsys.readouterr().err
