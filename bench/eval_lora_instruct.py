"""Held-out accuracy of the instruct format: a base model vs the same base with a LoRA adapter (or any models).

On the built-in instruct set's held-out split (``mptkit:stdlib-instruct``, test: a stdlib function's docstring
summary -> its def line), every prompt in the Dolly template mptkit generate --instruct uses, greedy, up to
``--max-new-tokens``. ``format``: the reply is one ``def name(...):`` line followed by the end of text (what the
finetune teaches); ``exact``: it is the true def line.

    python bench/eval_lora_instruct.py runs/quickstart/hf --adapter runs/instruct-lora/hf
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEF_LINE = re.compile(r"def [A-Za-z_]\w*\(.*\):")


def score(model, tok, records, max_new: int) -> dict:
    from mptkit.infer import generate_text
    from mptkit.prompts import INSTRUCT_PROMPT

    fmt = exact = 0
    samples = []
    for _, r in records:
        prompt = INSTRUCT_PROMPT.format(instruction=r["instruction"])
        out = generate_text(model, tok, prompt, max_new_tokens=max_new)  # greedy; stops at EOS
        # a reply that ran to the token limit never ended: not the format
        ended = len(tok.encode(out, add_special_tokens=False)) < max_new
        reply = out.strip()
        ok = ended and DEF_LINE.fullmatch(reply) is not None
        fmt += ok
        exact += ok and reply == r["output"]
        if len(samples) < 3:
            samples.append((r["output"], reply[:80]))
    n = len(records)
    return {"n": n, "format": fmt / n, "exact": exact / n, "samples": samples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="the base model (folder or run)")
    ap.add_argument("--adapter", default=None, help="a LoRA adapter (folder or LoRA run) on top of BASE")
    ap.add_argument("--also", action="append", default=[], help="another model to score (e.g. a full finetune)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    a = ap.parse_args()

    from mptkit.data.finetune import builtin_records
    from mptkit.io.source import open_model_source

    records = builtin_records("mptkit:stdlib-instruct", "test")
    runs = [("base", a.base, None)]
    if a.adapter:
        runs.append(("base + LoRA adapter", a.base, a.adapter))
    runs += [(p, p, None) for p in a.also]
    print(f"held-out mptkit:stdlib-instruct test split: {len(records)} prompts, greedy, <= {a.max_new_tokens} tokens")
    print("| model | format (one def line + EOS) | exact def line |")
    print("|---|---|---|")
    for name, path, adapter in runs:
        with open_model_source(path, adapter=adapter) as src:
            model = src.load_model().eval()
            tok = src.load_tokenizer()
        s = score(model, tok, records, a.max_new_tokens)
        print(f"| {name} | {s['format']:.1%} ({round(s['format'] * s['n'])}/{s['n']}) | {s['exact']:.1%} |")
        for want, got in s["samples"]:
            print(f"|  | want `{want}` | got `{got}` |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
