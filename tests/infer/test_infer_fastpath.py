"""The fast paths' contract (``mptkit.model.fastpath``): a model whose Linear layers are wrapped (a LoRA-like
adapter adding a low-rank delta), subclassed or hooked generates exactly what its own full forward gives —
greedy tokens through ``Generator``, ``generate_text`` and the serving engine equal a plain loop of full forwards
with argmax — because the fast decoder, the compiled kernels and the CPU training MLP do not cover it and say
so in the log; a standard model keeps the fast path (so it is not silently lost)."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from torch import nn

from mptkit.infer import Generator, SamplingParams, generate_text
from mptkit.infer.engine import Engine
from mptkit.model import MPTForCausalLM
from mptkit.model.fastpath import block_coverage, model_coverage
from tests.helpers import tiny_cfg

V = 211


class LoRALike(nn.Module):
    """``base(x) + scale * x A^T B^T``, exposing the base's ``weight``/``bias`` as adapters commonly do (code
    reading ``.weight`` directly would run without an error and silently drop the delta)."""

    def __init__(self, base: nn.Linear, rank: int = 2, scale: float = 0.8):
        super().__init__()
        self.base = base
        g = torch.Generator().manual_seed(base.in_features * 7 + base.out_features)
        self.A = nn.Parameter(torch.randn(rank, base.in_features, generator=g) * 0.3)
        self.B = nn.Parameter(torch.randn(base.out_features, rank, generator=g) * 0.3)
        self.scale = scale

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.A.t() @ self.B.t())


class DeltaLinear(nn.Linear):
    """A subclass of nn.Linear whose forward adds a low-rank delta to the plain result."""

    def forward(self, x):
        return super().forward(x) + 0.8 * (x @ self.lora_A.t() @ self.lora_B.t())


def _subclassed(base: nn.Linear) -> nn.Linear:
    m = DeltaLinear(base.in_features, base.out_features, bias=base.bias is not None)
    m.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(base.out_features)
    m.lora_A = nn.Parameter(torch.randn(2, base.in_features, generator=g) * 0.3)
    m.lora_B = nn.Parameter(torch.randn(base.out_features, 2, generator=g) * 0.3)
    return m


def _hooked(base: nn.Linear) -> nn.Linear:
    g = torch.Generator().manual_seed(base.in_features)
    d = torch.randn(base.out_features, generator=g) * 0.5
    base.register_forward_hook(lambda mod, inp, out: out + d)
    return base


def _mptkit_lora(base: nn.Linear) -> nn.Module:
    """mptkit's own LoRA layer (model/lora.py, as ``model.peft_config`` and ``--adapter`` apply it), B nonzero."""
    from mptkit.model.lora import LoRALinear

    m = LoRALinear(base, r=2, lora_alpha=4)
    g = torch.Generator().manual_seed(base.out_features)
    with torch.no_grad():
        m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    return m


WRAPS = {"lora_wrapper": LoRALike, "linear_subclass": _subclassed, "forward_hook": _hooked,
         "mptkit_lora": _mptkit_lora}


def _model(**over):
    torch.manual_seed(0)
    m = MPTForCausalLM(tiny_cfg(**over)).eval()
    with torch.no_grad():  # larger weights than the init, so that every term matters
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return m


def _wrap(model, wrap, blocks=None):
    for i, blk in enumerate(model.transformer.blocks):
        if blocks is not None and i not in blocks:
            continue
        blk.attn.Wqkv = wrap(blk.attn.Wqkv)
        blk.attn.out_proj = wrap(blk.attn.out_proj)
        blk.ffn.up_proj = wrap(blk.ffn.up_proj)
        blk.ffn.down_proj = wrap(blk.ffn.down_proj)
    return model.eval()


@torch.inference_mode()
def _full_forward_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(n):
        tok = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
    return out


PROMPTS = [[5, 17, 3, 99, 42, 7, 150], [1, 2, 3], list(range(20, 40))]


@pytest.mark.parametrize("name", sorted(WRAPS))
def test_wrapped_linears_generate_what_the_full_forward_gives(name, caplog):
    model = _wrap(_model(), WRAPS[name])
    ref = [_full_forward_greedy(model, p, 12) for p in PROMPTS]
    plain = _model()
    assert [_full_forward_greedy(plain, p, 12) for p in PROMPTS] != ref  # the delta changes the tokens
    with caplog.at_level(logging.INFO, logger="mptkit.infer.decode"):
        gen = Generator(model, None)
    assert gen.fast is None  # decided once, at setup
    lines = [r.getMessage() for r in caplog.records if "fast decode off" in r.getMessage()]
    assert len(lines) == 1 and "transformer.blocks.0.attn.Wqkv" in lines[0], lines
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    assert [gen.generate([p], sp)[0].token_ids for p in PROMPTS] == ref  # one at a time
    assert [o.token_ids for o in gen.generate(PROMPTS, sp)] == ref  # batched, slots of different lengths
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mptkit.infer.decode"):
        Generator(model, None)
    assert not [r for r in caplog.records if "fast decode off" in r.getMessage()]  # logged once per model

    eng = Engine(gen, max_batch=2, prefill_chunk=5).start()
    try:
        got = {k: [] for k in range(len(PROMPTS))}
        hs = [
            eng.submit(p, [sp], lambda ev, k=k: ev.token is not None and got[k].append(ev.token))
            for k, p in enumerate(PROMPTS)
        ]
        t = time.time()
        while not all(h.finished for h in hs) and time.time() - t < 60:
            time.sleep(0.01)
    finally:
        eng.stop()
    assert [got[k] for k in range(len(PROMPTS))] == ref


def test_generate_text_of_a_wrapped_model_is_its_full_forward(make_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_tokenizer(vocab_size=V)))
    model = _wrap(_model(vocab_size=len(tok)), LoRALike, blocks={1})  # one block of two wrapped
    prompt = "def load(fp):"
    ids = tok.encode(prompt, add_special_tokens=False)
    ref = _full_forward_greedy(model, ids, 10)
    text = generate_text(model, tok, prompt, max_new_tokens=10, ignore_eos=True)
    assert text == tok.decode(ref, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_wrapped_block_is_not_covered_and_says_why():
    model = _wrap(_model(), LoRALike, blocks={1})
    cov = model_coverage(model)
    assert not cov.fast and "transformer.blocks.1.attn.Wqkv" in cov.reason and "LoRALike" in cov.reason
    assert cov.blocks[0].fast and cov.blocks[0].kernel
    assert not cov.blocks[1].fast and not cov.blocks[1].kernel
    from mptkit.infer.kernels import BlockWeights

    assert BlockWeights.of(model.transformer.blocks[1]) is None  # the kernels ask the same predicate
    sub = _model()
    sub.transformer.blocks[0].ffn.up_proj = _subclassed(sub.transformer.blocks[0].ffn.up_proj)
    assert "DeltaLinear" in block_coverage(sub.transformer.blocks[0]).reason


def test_standard_models_keep_the_fast_path():
    """Unwrapped models are covered (the fast decoder is used), standard blocks also by the compiled kernel."""
    for over, kernel in (
        ({}, True),
        ({"no_bias": False, "attn_config": {"clip_qkv": 0.5}}, True),
        ({"learned_pos_emb": True, "attn_config": {"alibi": False}}, True),
        ({"norm_type": "rmsnorm", "ffn_config": {"ffn_type": "mptglu"}}, False),
        ({"attn_config": {"qk_ln": True}}, False),
        ({"tie_word_embeddings": False}, True),
    ):
        model = _model(**over)
        cov = model_coverage(model)
        assert cov.fast and cov.reason is None, over
        assert [c.kernel for c in cov.blocks] == [kernel] * len(cov.blocks), over
        assert Generator(model, None).fast is not None, over


@pytest.mark.parametrize("name", sorted(WRAPS))
def test_cpu_training_mlp_runs_the_wrapped_linears(name, monkeypatch):
    """The chunked CPU training MLP (which reads up_proj/down_proj weights) is taken for the plain MLP and not
    when its Linears are wrapped: output and gradients are then those of the modules' own forward."""
    from mptkit.model import blocks
    from mptkit.model.fastpath import FastPathOptions

    calls = []
    real = blocks._ChunkedMLP.apply
    monkeypatch.setattr(blocks._ChunkedMLP, "apply", lambda *a: calls.append(1) or real(*a))
    model = _model()
    model.set_fast_paths(FastPathOptions(mlp_chunk=7))
    model.train()
    x = torch.randn(2, 45, 64, requires_grad=True)
    model.transformer.blocks[0].ffn(x)
    assert calls == [1]  # the standard MLP keeps its fast path
    mlp = _wrap(model, WRAPS[name]).transformer.blocks[0].ffn
    model.train()
    y = mlp(x)
    assert calls == [1]
    ref_x = x.detach().clone().requires_grad_(True)
    ref = mlp.down_proj(torch.nn.functional.gelu(mlp.up_proj(ref_x)))
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    y.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)


def test_options_defaults_from_the_environment_and_unknown_keys(monkeypatch):
    """Environment variables are only the options' defaults, read when the options are made; a recipe section
    with an unknown key is an error naming it."""
    from mptkit.errors import ConfigError, InferenceError
    from mptkit.infer.options import DecodeOptions
    from mptkit.model.fastpath import FastPathOptions

    monkeypatch.setenv("MPTKIT_CPU_KERNELS", "off")
    monkeypatch.setenv("MPTKIT_KEEP_OPENMP_POOL", "1")
    monkeypatch.setenv("MPTKIT_FLEX_COMPILE", "0")
    d, f = DecodeOptions(), FastPathOptions()
    assert (d.cpu_kernels, d.keep_openmp_pool, f.flex_compile) == (False, True, False)
    monkeypatch.delenv("MPTKIT_CPU_KERNELS")
    assert d.cpu_kernels is False and DecodeOptions().cpu_kernels is True  # read at construction only
    assert FastPathOptions.from_dict({"mlp_chunk": 0}).mlp_chunk == 0
    with pytest.raises(ConfigError, match="mlp_chunks"):
        FastPathOptions.from_dict({"mlp_chunks": 0})
    with pytest.raises(InferenceError, match="small_row"):
        DecodeOptions.from_dict({"small_row": 4})
    model = _model()
    gen = Generator(model, None, decode_options=DecodeOptions(cpu_kernels=False, skip_min_past=5))
    assert gen.fast is not None and gen.fast.small is None and gen.new_cache().options.skip_min_past == 5


def test_a_wrapped_untied_lm_head_is_called_as_a_module_everywhere():
    """An adapter on an untied LM head (``lm_head`` wrapped) is part of the logits, the fused training loss (which
    otherwise reads ``lm_head.weight`` straight into its chunked matmul) and greedy generation; on the old code
    the logits and the loss dropped the delta silently."""
    from tests.helpers import tiny_model

    model = tiny_model(tie_word_embeddings=False)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = model(ids, return_hidden=True).hidden_states
        plain = model.lm_head(h)
        model.lm_head = LoRALike(model.lm_head)
        wrapped = model.lm_head(h)
        assert (wrapped - plain).abs().max() > 1e-2  # the adapter changes the logits
        torch.testing.assert_close(model(ids).logits, wrapped, rtol=1e-5, atol=1e-5)
        fused = model(ids, labels=ids, return_logits=False).loss
        ref = nn.functional.cross_entropy(wrapped[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    assert not model_coverage(model).fast
    prompt = ids[0, :5].tolist()
    got = Generator(model, None).generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    assert got == _full_forward_greedy(model, prompt, 6)
