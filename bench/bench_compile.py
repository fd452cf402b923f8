"""compile_config on CPU: a training step of an MPT with its blocks torch.compile'd vs eager (what
``compile_config`` does, src/mptkit/train/compile.py). Run under ``flock /tmp/mptkit-bench.lock``:

    PYTHONPATH=src python bench/bench_compile.py

Prints, for eager / compiled / eager / compiled (a fresh model each time, in one process): the time of the
first 3 steps (compilation included) and the median of the next 15 steps.
"""

from __future__ import annotations

import time

import torch

from mptkit.model import MPTForCausalLM

CFG = {"d_model": 256, "n_heads": 4, "n_layers": 4, "expansion_ratio": 4, "max_seq_len": 128, "vocab_size": 4096,
       "attn_config": {"alibi": True}}


def run(compiled: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    m = MPTForCausalLM(CFG).train()
    if compiled:
        for b in m.transformer.blocks:
            b.compile()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    x = torch.randint(0, CFG["vocab_size"], (8, CFG["max_seq_len"]))

    def step() -> None:
        out = m(x).logits
        loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, CFG["vocab_size"]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()

    t0 = time.perf_counter()
    for _ in range(3):
        step()
    warm = time.perf_counter() - t0
    ts = []
    for _ in range(15):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return warm, sorted(ts)[len(ts) // 2]


def main() -> None:
    torch.set_num_threads(2)
    for c in (False, True, False, True):
        w, med = run(c)
        print(f"compiled={c} first 3 steps {w:.1f} s, median step {med * 1000:.0f} ms", flush=True)


if __name__ == "__main__":
    main()
