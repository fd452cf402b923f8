"""Continuous batching: requests that join and leave a running batch (more requests than slots, different
prompt lengths and max_tokens, chunked prefill) get exactly the greedy tokens each gets alone; a cancelled
request frees its slot."""

from __future__ import annotations

import time

import torch

from mptkit.infer import Generator, SamplingParams
from mptkit.infer.engine import Engine
from mptkit.model import MPTForCausalLM
from tests.conftest import tiny_cfg


def test_engine_equals_unbatched_and_cancel():
    torch.manual_seed(0)
    gen = Generator(MPTForCausalLM(tiny_cfg()).eval(), None)
    eng = Engine(gen, max_batch=3, prefill_chunk=4).start()
    try:
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (3, 11, 7, 1, 9)]
        res = {k: [] for k in range(len(prompts))}
        hs = [eng.submit(p, [SamplingParams(max_tokens=10 + k)], lambda ev, k=k: res[k].append(ev.token))
              for k, p in enumerate(prompts)]
        t = time.time()
        while not all(h.finished for h in hs) and time.time() - t < 30:
            time.sleep(0.01)
        for k, p in enumerate(prompts):
            assert res[k] == gen.generate([p], SamplingParams(max_tokens=10 + k))[0].token_ids
        h = eng.submit(prompts[0], [SamplingParams(max_tokens=50, ignore_eos=True)], lambda ev: None)
        eng.cancel(h)
        t = time.time()
        while (eng.num_running or eng.num_waiting) and time.time() - t < 10:
            time.sleep(0.01)
        assert eng.num_running == 0 and eng.num_waiting == 0 and h.finished
    finally:
        eng.stop()


def test_engine_restores_the_interpreter_switch_interval():
    """start() shortens the process-wide GIL switch interval for the engine thread; stop() puts it back."""
    import sys

    before = sys.getswitchinterval()
    gen = Generator(MPTForCausalLM(tiny_cfg()).eval(), None)
    eng = Engine(gen, max_batch=1).start()
    assert sys.getswitchinterval() == min(before, 0.0005)
    eng.stop()
    assert sys.getswitchinterval() == before
