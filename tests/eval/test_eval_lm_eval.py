"""Agreement with EleutherAI's lm-evaluation-harness, per example (bench/bench_lm_eval.py's pieces, on a tiny
model): the same local tasks (a 4-way multiple-choice task and a LAMBADA-style task) scored by ``mptkit eval
icl`` (the CLI), by lm-eval's ``hf`` model on the exported folder (transformers' MptForCausalLM) and by lm-eval's
``local-completions`` model against ``mptkit serve`` with the server's own tokenizer endpoints (what lm-eval's
default ``tokenizer_backend=auto`` picks). Also the tokenizer endpoints themselves."""

from __future__ import annotations

import httpx
import pytest

from bench.bench_lm_eval import TASKS, compare, lm_eval_hf, lm_eval_server, mptkit_icl, write_tasks
from mptkit.io import load_tokenizer
from mptkit.model import MPTForCausalLM
from tests.helpers import SCORES, model_folder

pytest.importorskip("lm_eval")

N = 24  # records per task


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_folders):
    tmp = tmp_path_factory.mktemp("lm_eval")
    tok_dir = tokenizer_folders.make(tmp / "tok")
    # transformers' MPT has a 4x MLP; 128 positions hold every request
    folder = model_folder(
        tmp / "model", load_tokenizer(tok_dir), seed=0, spread=SCORES, expansion_ratio=4, max_seq_len=128
    )
    model = MPTForCausalLM.from_pretrained(folder).eval()
    task_dir = write_tasks(tmp / "tasks", N, model, load_tokenizer(folder))
    ref = mptkit_icl(folder, task_dir, tmp / "mptkit.json")
    return folder, task_dir, ref


def _check(cmp: dict, ref: dict, run: dict) -> None:
    mc, lm = cmp["mptkit_mc"], cmp["mptkit_lm"]
    assert (mc["requests"], lm["requests"]) == (4 * N, N)
    assert mc["max_abs_diff"] <= 1e-4 and lm["max_abs_diff"] <= 1e-4, cmp
    assert mc["picks_differ_sum"] == mc["picks_differ_per_char"] == mc["picks_differ_per_token"] == 0
    assert lm["greedy_differ"] == 0
    # lm-eval's own metrics equal the same criteria applied to mptkit's numbers: acc (by sum) is mptkit's
    # accuracy; lm-eval's acc_norm (per character) is mptkit's log-likelihoods per character; mptkit's acc_norm
    # (per token) is lm-eval's log-likelihoods per token
    lm_acc, lm_norm = run["mptkit_mc"]["metrics"]["acc"], run["mptkit_mc"]["metrics"]["acc_norm"]
    assert lm_acc == pytest.approx(ref["mptkit_mc"]["metrics"]["acc"]) == pytest.approx(mc["acc_sum"][1])
    assert lm_norm == pytest.approx(mc["acc_per_char"][0])
    assert ref["mptkit_mc"]["metrics"]["acc_norm"] == pytest.approx(mc["acc_per_token"][1])
    assert run["mptkit_lm"]["metrics"]["acc"] == pytest.approx(ref["mptkit_lm"]["metrics"]["acc"])


@pytest.mark.slow
def test_lm_eval_agrees_per_example_hf_backend_and_through_the_server(setup):
    """Per request log-likelihoods within 1e-4 of mptkit eval icl's, identical picks (by sum, per character,
    per token) and greedy flags, for lm-eval's hf model on the folder and its local-completions model against
    the server (the tokenizer through the server's /tokenize). Not trivially: the tasks have right and wrong
    picks and both greedy outcomes."""
    from mptkit.infer.server import BackgroundServer, build_server

    folder, task_dir, ref = setup
    greedy = [r[0][1] for r in ref["mptkit_lm"]["requests"]]
    assert any(greedy) and not all(greedy)
    assert 0 < ref["mptkit_mc"]["metrics"]["acc"] < 1
    hf = lm_eval_hf(folder, task_dir)
    _check(compare(ref, hf, task_dir), ref, hf)
    srv = build_server(str(folder), model_name="tiny")
    with BackgroundServer(srv) as bg:
        from lm_eval.utils import check_remote_tokenizer_support

        assert check_remote_tokenizer_support(bg.base_url + "/v1/completions")  # what 'auto' probes
        served = lm_eval_server(
            bg.base_url, task_dir, tokenizer_backend="auto", model="tiny", max_length=srv.max_context - 1
        )
    _check(compare(ref, served, task_dir), ref, served)
    assert set(served) == set(TASKS)


def test_tokenizer_endpoints(setup):
    """/tokenizer_info, /tokenize (a prompt as /v1/completions tokenizes it, a conversation as chat does) and
    /detokenize, as vLLM shapes them; bad input is a 400 naming the parameter."""
    from mptkit.infer.server import BackgroundServer, build_server

    folder = setup[0]
    srv = build_server(str(folder), model_name="tiny")
    with BackgroundServer(srv) as bg:
        b = bg.base_url
        info = httpx.get(b + "/tokenizer_info").json()
        assert info["eos_token"] == srv.tok.eos_token and info["model_max_length"] == srv.max_context
        text = "def f(x):\n    return x <|endoftext|>"
        r = httpx.post(b + "/tokenize", json={"prompt": text}).json()
        assert r["tokens"] == srv.encode(text, "prompt") and r["count"] == len(r["tokens"])
        assert r["max_model_len"] == srv.max_context
        assert (
            srv.tok.eos_token_id not in r["tokens"]
        )  # a special token's spelling is text, as in completions
        parsed = httpx.post(b + "/tokenize", json={"prompt": text, "parse_special_tokens": True}).json()
        assert parsed["tokens"][-1] == srv.tok.eos_token_id
        msgs = [{"role": "user", "content": "hi"}]
        r = httpx.post(b + "/tokenize", json={"messages": msgs}).json()
        assert r["tokens"] == srv.chat_ids(msgs)
        back = httpx.post(b + "/detokenize", json={"tokens": srv.encode(text, "prompt")}).json()
        assert back == {"prompt": text}
        for path, body, param in [
            ("/tokenize", {}, "prompt"),
            ("/tokenize", {"prompt": "a", "messages": msgs}, "prompt"),
            ("/detokenize", {"tokens": [10**6]}, "tokens"),
            ("/detokenize", {"tokens": "a"}, "tokens"),
            ("/tokenize", {"prompt": "a", "model": "other"}, "model"),
        ]:
            r = httpx.post(b + path, json=body)
            assert r.status_code in (400, 404), (path, body, r.text)
            assert r.json()["error"]["param"] == param, (path, body, r.text)
