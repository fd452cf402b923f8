"""Perplexity cost of quantisation, mptkit and llama.cpp side by side on the same weights.

mptkit: ``mptkit eval perplexity MODEL --data TEXT [--quant int8|q4]`` (the user's path; its sliding windows).
Both runtimes again on one set of windows (the text's tokens cut into non-overlapping windows of ``--ctx``
tokens, every token after the first of a window scored): mptkit fp32 / int8 / q4 by the model's forward, and
llama.cpp (llama-cpp-python) on mptkit's GGUF exports ``f32``, ``q8_0``, ``q4_0`` (the same blocks mptkit runs,
embeddings f32) and on llama.cpp's own ``llama_model_quantize`` q8_0 / q4_0 of the f32 file (its default
policy: the token embedding / tied head quantised too). q4_k: llama.cpp on mptkit's ``--dtype q4_k`` file and on
its own Q4_K_M, and mptkit fp32 on the dequantised q4_k weights (mptkit does not run q4_k blocks). Each
runtime's delta is against its own f32.

Run: flock /tmp/mptkit-bench.lock python bench/bench_quant_quality.py MODEL --data FILE_OR_DIR [--ctx 128]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_quant_decode import llama_quantize


def cli_ppl(model: str, data: str, quant: str | None, max_tokens: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "mptkit.cli", "eval", "perplexity", model, "--data", data, "--device", "cpu",
           "--json", str(out), "--max-tokens", str(max_tokens)] + (["--quant", quant] if quant else [])
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return float(json.loads(out.read_text())["perplexity"])


def read_text(data: str) -> str:
    p = Path(data)
    files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def windows(ids: list[int], ctx: int, max_tokens: int) -> list[list[int]]:
    ids = ids[:max_tokens]
    return [ids[i : i + ctx] for i in range(0, len(ids) - 1, ctx) if len(ids[i : i + ctx]) > 1]


def mptkit_ppl(model, wins) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in wins:
            logp = torch.log_softmax(model(torch.tensor([w])).logits[0].double(), -1)
            t = torch.tensor(w[1:])
            nll -= float(logp[:-1].gather(1, t[:, None]).sum())
            n += len(w) - 1
    return math.exp(nll / n)


def llama_ppl(path: Path, wins, ctx: int, threads: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=ctx, n_threads=threads, n_threads_batch=threads,
                          logits_all=True, verbose=False, seed=0, type_k=llama_cpp.GGML_TYPE_F32,
                          type_v=llama_cpp.GGML_TYPE_F32)
    nll, n = 0.0, 0
    for w in wins:
        llm.reset()
        llm.eval(w)
        z = np.asarray(llm.scores[: len(w)], dtype=np.float64)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        n += len(w) - 1
    llm.close()
    return math.exp(nll / n)


def q4k_weights(w: torch.Tensor) -> torch.Tensor:
    """``w`` as ``export gguf --dtype q4_k`` writes it, dequantised: q4_k, else q4_0, else unchanged."""
    from mptkit.model.quant import dequantize_q4_k, dequantize_weight, quantize_q4_k, quantize_weight

    if w.shape[1] % 256 == 0:
        return dequantize_q4_k(quantize_q4_k(w))
    if w.shape[1] % 32 == 0:
        return dequantize_weight(*quantize_weight(w, "q4_0"), "q4_0")
    return w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-cli", action="store_true", help="skip the `mptkit eval perplexity` runs")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from mptkit.export.gguf import export_gguf
    from mptkit.io import load_tokenizer
    from mptkit.model import MPTForCausalLM

    td = tempfile.TemporaryDirectory()
    tmp = Path(td.name)
    rows = {}
    if not a.no_cli:
        text_file = tmp / "data.txt"
        text_file.write_text(read_text(a.data), encoding="utf-8")
        for q in (None, "int8", "q4"):
            rows[f"mptkit eval perplexity {q or 'fp32'}"] = cli_ppl(a.model, str(text_file), q, a.max_tokens,
                                                                   tmp / f"{q}.json")
    tok = load_tokenizer(a.model)
    ids = tok(read_text(a.data), add_special_tokens=False)["input_ids"]
    wins = windows(ids, a.ctx, a.max_tokens)
    from mptkit.infer.quant_kernels import decode_arithmetic

    for q in (None, "int8", "q4"):
        m = MPTForCausalLM.from_pretrained(a.model, quant=q).eval()
        with decode_arithmetic(m):  # what generate / serve run (the integer path by default)
            rows[f"mptkit {q or 'fp32'} (same windows)"] = mptkit_ppl(m, wins)
        if q is not None:  # the exact dequantise-then-matmul arithmetic (quant_int_dot=False)
            rows[f"mptkit {q} exact (same windows)"] = mptkit_ppl(m, wins)
    m = MPTForCausalLM.from_pretrained(a.model).eval()
    with torch.no_grad():  # the block matrices that fit as their q4_k weights (the others as mptkit's file: q4_0)
        for name, mod in m.named_modules():
            if type(mod) is torch.nn.Linear and name.startswith("transformer.blocks."):
                mod.weight.copy_(q4k_weights(mod.weight))
    rows["mptkit fp32 on q4_k weights (same windows)"] = mptkit_ppl(m, wins)
    try:
        f32 = export_gguf(a.model, tmp / "f32.gguf", dtype="f32").path
        files = {"llama.cpp f32": f32}
        for t in ("q8_0", "q4_0"):
            files[f"llama.cpp {t} mptkit-file"] = export_gguf(a.model, tmp / f"{t}.gguf", dtype=t).path
            files[f"llama.cpp {t} llama-quantize"] = llama_quantize(f32, tmp / f"lq-{t}.gguf", embd_f32=False,
                                                                    threads=a.threads, ftype=t)
        files["llama.cpp q4_k mptkit-file"] = export_gguf(a.model, tmp / "q4_k.gguf", dtype="q4_k").path
        files["llama.cpp q4_k_m llama-quantize"] = llama_quantize(f32, tmp / "lq-q4_k_m.gguf", embd_f32=False,
                                                                  threads=a.threads, ftype="q4_k_m")
        for name, path in files.items():
            rows[name] = llama_ppl(path, wins, a.ctx, a.threads)
    except ImportError as e:
        print(f"llama.cpp: skipped ({e})")
    print(f"model {a.model}; {sum(len(w) - 1 for w in wins)} scored tokens in windows of {a.ctx}")
    base = {"mptkit eval": rows.get("mptkit eval perplexity fp32"), "mptkit": rows["mptkit fp32 (same windows)"],
            "llama.cpp": rows.get("llama.cpp f32")}
    for name, v in rows.items():
        ref = base["mptkit eval"] if name.startswith("mptkit eval") else (
            base["llama.cpp"] if name.startswith("llama") else base["mptkit"])
        print(f"{name:40s} ppl {v:10.4f}  delta vs its f32 {100 * (v / ref - 1):+7.3f}%")
    td.cleanup()


if __name__ == "__main__":
    main()
