"""MPT features transformers' MptForCausalLM lacks, each checked against code mptkit did not write:
transformers' MPT with the one missing piece supplied by another transformers component or by the formula's
source, never by mptkit's own modules.

* GQA / MQA: the K/V heads expanded with transformers' own ``repeat_kv`` (its GQA definition, used by Llama
  and the others) and run through transformers' multi-head MPT.
* GLU (``ffn_type: mptglu``): transformers' ``LlamaMLP`` with ``hidden_act="gelu"`` (``down(act(gate(x)) *
  up(x))``, llm-foundry's MPTGLU with its default exact GELU) in place of transformers' MPT MLP.
* ``alibi_bias_max`` != 8 with a non-power-of-two head count: transformers' own ``build_mpt_alibi_tensor``
  given the value (its MptModel always passes 8), and the slopes against the ALiBi paper's formula
  (Press et al. 2022, the non-power-of-two rule of its reference code) generalised to a bias max.
* ``qk_ln``: transformers' MPT with llm-foundry's formula (LayerNorm over the whole query, d_model, and the
  whole key, kv_n_heads * head_dim, right after Wqkv) applied to Wqkv's output by a hook written here.
* ``logit_scale``: transformers' logits times the scale.
* learned positions without ALiBi: transformers' MPT with its ALiBi bias set to zero and the position rows
  added to the token embeddings (MPT's ``wte(x) + wpe(pos)``) by a hook written here.

What stays checked only against the per-head reference written in tests/test_model_features.py: qk_ln
together with clip_qkv (the order clip -> qk_ln), RMSNorm, biases (``no_bias: false``), and these features in
combination.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, MptConfig
from transformers import MptForCausalLM as HFMpt
from transformers.models.llama.modeling_llama import LlamaMLP, repeat_kv
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from mptkit.model import MPTForCausalLM
from mptkit.model.attention import alibi_slopes
from tests.helpers import NORMS, spread_weights, tiny_cfg


def _randomise(model: nn.Module) -> nn.Module:
    """Weights large enough that attention patterns and norms matter (inits are tiny)."""
    return spread_weights(model, NORMS).eval()


def _hf_like(ours: MPTForCausalLM, sd: dict) -> HFMpt:
    """transformers' MptForCausalLM of the same shape, multi-head, loaded with ``sd`` (the tied head aside)."""
    c = ours.config
    hf = HFMpt(MptConfig(d_model=c.d_model, n_heads=c.n_heads, n_layers=c.n_layers, vocab_size=c.vocab_size,
                         max_seq_len=c.max_seq_len, no_bias=True,
                         attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": None})).eval()
    return hf, sd


def _load(hf: HFMpt, sd: dict) -> HFMpt:
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as mptkit's
    return hf


def _compare(ours: MPTForCausalLM, hf: HFMpt, *, scale: float = 1.0, t: int = 48) -> None:
    x = torch.randint(0, ours.config.vocab_size, (2, t))
    with torch.no_grad():
        ref = hf(x).logits * scale
        for impl in ("torch", "sdpa"):
            ours.set_attn_impl(impl)
            got = ours(x).logits
            assert (got - ref).abs().max().item() <= 2e-4 * max(1.0, ref.abs().max().item()), impl
    assert ref.std() > 0.3  # not trivially equal


@pytest.mark.parametrize("kv_heads, attn_type", [(2, "grouped_query_attention"), (1, "multiquery_attention")])
def test_gqa_and_mqa_against_transformers_repeat_kv(kv_heads, attn_type):
    """A GQA/MQA model equals transformers' multi-head MPT whose K/V heads are the GQA ones expanded by
    transformers' repeat_kv (query head h reads kv head h // (n_heads / kv_heads))."""
    extra = {"kv_n_heads": kv_heads} if attn_type == "grouped_query_attention" else {}
    ours = _randomise(MPTForCausalLM(tiny_cfg(n_heads=8, expansion_ratio=4,
                                              attn_config={"attn_type": attn_type, **extra})))
    c = ours.config
    d, hd, rep = c.d_model, c.head_dim, c.n_heads // kv_heads
    sd = {}
    for k, v in ours.state_dict().items():
        if k.endswith("attn.Wqkv.weight"):
            q, kk, vv = v[:d], v[d:d + kv_heads * hd], v[d + kv_heads * hd:]
            # repeat_kv takes (batch, kv_heads, seq, head_dim): here a weight's rows (kv_heads, head_dim, d_model)
            kk = repeat_kv(kk.reshape(1, kv_heads, hd, d), rep).reshape(c.n_heads * hd, d)
            vv = repeat_kv(vv.reshape(1, kv_heads, hd, d), rep).reshape(c.n_heads * hd, d)
            v = torch.cat([q, kk, vv])
        sd[k] = v
    hf, sd = _hf_like(ours, sd)
    _compare(ours, _load(hf, sd))


class _PlusResidual(nn.Module):
    """transformers' MptBlock calls ffn(x, residual) and expects the residual added."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x, residual):
        return self.mlp(x) + residual


def test_glu_against_transformers_llama_mlp():
    """ffn_type mptglu equals transformers' MPT whose MLPs are transformers' LlamaMLP (gelu) holding the same
    gate/up/down weights."""
    hidden = 96
    ours = _randomise(MPTForCausalLM(tiny_cfg(expansion_ratio=4,
                                              ffn_config={"ffn_type": "mptglu", "ffn_hidden_size": hidden})))
    c = ours.config
    hf, _ = _hf_like(ours, {})
    for blk in hf.transformer.blocks:
        blk.ffn = _PlusResidual(LlamaMLP(LlamaConfig(hidden_size=c.d_model, intermediate_size=hidden,
                                                     hidden_act="gelu", mlp_bias=False)))
    sd = {k.replace(".ffn.", ".ffn.mlp."): v for k, v in ours.state_dict().items()}
    _compare(ours, _load(hf, sd))


def _paper_slopes(n: int, bias_max: float) -> list[float]:
    """ALiBi's reference rule (Press et al.): a geometric sequence for 2^k heads, starting at and stepping by
    2^(-bias_max / n); otherwise the closest smaller power of two's, then every other one of twice that."""
    def pow2(k):
        start = 2 ** (-bias_max / k)
        return [start * start ** i for i in range(k)]

    if math.log2(n).is_integer():
        return pow2(n)
    c = 2 ** math.floor(math.log2(n))
    return pow2(c) + pow2(2 * c)[0::2][: n - c]


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 64])
@pytest.mark.parametrize("bias_max", [8, 4, 16, 2.5])
def test_alibi_slopes_against_transformers_and_the_paper(heads, bias_max):
    """MPT's slopes for any head count and alibi_bias_max: transformers' build_mpt_alibi_tensor and the ALiBi
    paper's formula give the same numbers."""
    ours = alibi_slopes(heads, bias_max)
    hf = -build_mpt_alibi_tensor(heads, 2, alibi_bias_max=bias_max)[:, 0, 0]  # bias at distance 1 = -slope
    torch.testing.assert_close(ours, hf.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, torch.tensor(_paper_slopes(heads, bias_max)), rtol=1e-6, atol=0)


def test_alibi_bias_max_model_against_transformers(tmp_path):
    """A 6-head model with alibi_bias_max 4, saved by transformers and read by mptkit from its config.json,
    equals transformers' MPT computing with its own ALiBi tensor for bias max 4."""
    bias_max = 4
    hf = _randomise(HFMpt(MptConfig(d_model=96, n_heads=6, n_layers=2, vocab_size=300, max_seq_len=64,
                                    attn_config={"alibi": True, "alibi_bias_max": bias_max})))
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attn_config"]["alibi_bias_max"] == bias_max
    ours = MPTForCausalLM.from_pretrained(tmp_path).eval()
    assert ours.config.attn_config["alibi_bias_max"] == bias_max
    x = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        as_shipped = hf(x).logits  # transformers' MptModel passes bias max 8 whatever the config says
        hf.transformer.build_mpt_alibi_tensor = (
            lambda n, t, alibi_bias_max=8, device=None: build_mpt_alibi_tensor(n, t, bias_max, device))
        ref = hf(x).logits
        got = ours(x).logits
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert (as_shipped - ref).abs().max().item() > 1e-2  # the bias max matters at this size


def test_qk_ln_against_transformers_with_llm_foundrys_formula():
    """qk_ln (no clip_qkv): transformers' MPT with LayerNorm over the whole query (d_model) and the whole key
    (kv heads x head_dim) applied to Wqkv's output, with mptkit's q_ln / k_ln weights, as llm-foundry does."""
    ours = _randomise(MPTForCausalLM(tiny_cfg(expansion_ratio=4, attn_config={"qk_ln": True})))
    c = ours.config
    sd = ours.state_dict()
    hf, _ = _hf_like(ours, {})
    d = c.d_model
    for i, blk in enumerate(hf.transformer.blocks):
        wq, wk = sd[f"transformer.blocks.{i}.attn.q_ln.weight"], sd[f"transformer.blocks.{i}.attn.k_ln.weight"]
        bq, bk = sd.get(f"transformer.blocks.{i}.attn.q_ln.bias"), sd.get(f"transformer.blocks.{i}.attn.k_ln.bias")

        def hook(mod, inp, out, wq=wq, wk=wk, bq=bq, bk=bk):
            q, k, v = out[..., :d], out[..., d:2 * d], out[..., 2 * d:]
            q = nn.functional.layer_norm(q, (d,), wq, bq, c.layer_norm_epsilon)
            k = nn.functional.layer_norm(k, (d,), wk, bk, c.layer_norm_epsilon)
            return torch.cat([q, k, v], -1)

        blk.attn.Wqkv.register_forward_hook(hook)
    _compare(ours, _load(hf, {k: v for k, v in sd.items() if "_ln." not in k}))


@pytest.mark.parametrize("logit_scale", [0.37, "inv_sqrt_d_model"])
def test_logit_scale_against_transformers(logit_scale):
    """logit_scale multiplies transformers' logits (a number, or 1/sqrt(d_model))."""
    ours = _randomise(MPTForCausalLM(tiny_cfg(expansion_ratio=4, logit_scale=logit_scale)))
    hf, sd = _hf_like(ours, dict(ours.state_dict()))
    scale = 1 / math.sqrt(ours.config.d_model) if logit_scale == "inv_sqrt_d_model" else logit_scale
    _compare(ours, _load(hf, sd), scale=scale)


def test_learned_positions_against_transformers_without_alibi():
    """learned_pos_emb without ALiBi: transformers' MPT with a zero ALiBi bias and the position rows added to
    its token embeddings."""
    ours = _randomise(MPTForCausalLM(tiny_cfg(expansion_ratio=4, learned_pos_emb=True, attn_config={"alibi": False})))
    sd = dict(ours.state_dict())
    wpe = sd.pop("transformer.wpe.weight")
    hf, _ = _hf_like(ours, {})
    hf.transformer.build_mpt_alibi_tensor = (
        lambda n, t, alibi_bias_max=8, device=None: torch.zeros(n, 1, t, device=device))
    hf.transformer.wte.register_forward_hook(lambda mod, inp, out: out + wpe[: out.shape[1]])
    _compare(ours, _load(hf, sd))
