"""MPT features transformers' MptForCausalLM cannot check (GQA/MQA, qk_ln, learned positions, untied head,
biases, GLU, RMSNorm, logit_scale, padding, packed sequences), each against an independent computation:
a from-the-spec reference forward written here with per-head loops, or the same sequences run one by one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mptkit.model import MPTConfig, MPTForCausalLM
from tests.helpers import tiny_cfg


def reference_logits(model: MPTForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """MPT's forward straight from the description, one sequence and one head at a time."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items() if v.is_floating_point()}
    d, h, hd, kvh = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.kv_n_heads
    eps = cfg.layer_norm_epsilon

    def norm(x, prefix, size):
        w = sd[prefix + ".weight"]
        b = sd.get(prefix + ".bias")
        if cfg.norm_type.endswith("rmsnorm"):
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + eps) * w
        return y + b if b is not None else y

    def lin(x, prefix):
        y = x @ sd[prefix + ".weight"].T
        b = sd.get(prefix + ".bias")
        return y + b if b is not None else y

    n = 2 ** math.ceil(math.log2(h))
    base = [2 ** (-(j + 1) * cfg.attn_config["alibi_bias_max"] / n) for j in range(n)]
    slopes = base if n == h else (base[1::2] + base[::2])[:h]
    outs = []
    for seq in ids:
        t = seq.shape[0]
        x = sd["transformer.wte.weight"][seq]
        if cfg.use_learned_pos_emb:
            x = x + sd["transformer.wpe.weight"][:t]
        for i in range(cfg.n_layers):
            p = f"transformer.blocks.{i}"
            a = norm(x, p + ".norm_1", d)
            qkv = lin(a, p + ".attn.Wqkv")
            if cfg.attn_config["clip_qkv"]:
                c = cfg.attn_config["clip_qkv"]
                qkv = qkv.clamp(-c, c)
            q, k, v = qkv[:, :d], qkv[:, d : d + kvh * hd], qkv[:, d + kvh * hd :]
            if cfg.attn_config["qk_ln"]:
                q = norm(q, p + ".attn.q_ln", d)
                k = norm(k, p + ".attn.k_ln", kvh * hd)
            heads = []
            for hh in range(h):
                g = hh // (h // kvh)
                qh, kh, vh = q[:, hh * hd : (hh + 1) * hd], k[:, g * hd : (g + 1) * hd], v[:, g * hd : (g + 1) * hd]
                s = qh @ kh.T * cfg.softmax_scale
                if cfg.alibi:
                    s = s + slopes[hh] * (torch.arange(t)[None, :] - torch.arange(t)[:, None]).double()
                s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
                heads.append(torch.softmax(s, -1) @ vh)
            x = x + lin(torch.cat(heads, -1), p + ".attn.out_proj")
            f = norm(x, p + ".norm_2", d)
            if cfg.ffn_config["ffn_type"] == "mptglu":
                f = lin(F.gelu(lin(f, p + ".ffn.gate_proj")) * lin(f, p + ".ffn.up_proj"), p + ".ffn.down_proj")
            else:
                f = lin(F.gelu(lin(f, p + ".ffn.up_proj")), p + ".ffn.down_proj")
            x = x + f
        x = norm(x, "transformer.norm_f", d)
        w = sd["transformer.wte.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
        logits = x @ w.T
        if cfg.logit_scale_value is not None:
            logits = logits * cfg.logit_scale_value
        outs.append(logits)
    return torch.stack(outs).float()


VARIANTS = {
    "gqa": tiny_cfg(n_heads=8, attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2}),
    "mqa": tiny_cfg(n_heads=4, attn_config={"attn_type": "multiquery_attention"}),
    "qk_ln": tiny_cfg(attn_config={"qk_ln": True, "clip_qkv": 3.0}),
    "learned_pos": tiny_cfg(learned_pos_emb=True, attn_config={"alibi": False}),
    "untied_logit_scale": tiny_cfg(tie_word_embeddings=False, logit_scale="inv_sqrt_d_model"),
    "bias_layernorm": tiny_cfg(no_bias=False, norm_type="layernorm"),
    "glu_rmsnorm": tiny_cfg(norm_type="rmsnorm", ffn_config={"ffn_type": "mptglu", "ffn_hidden_size": 96}),
    "nonpow2_heads_bias_max": tiny_cfg(n_heads=6, d_model=96, attn_config={"alibi_bias_max": 4}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("impl", ["torch", "sdpa"])
def test_variant_matches_reference_forward(name, impl):
    """Each variant's logits equal the per-head reference (fp64) to fp32 precision, for both backends."""
    model = MPTForCausalLM(VARIANTS[name]).eval()
    with torch.no_grad():  # randomise norms/biases too, so they are exercised
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if n.endswith("weight") else p.normal_(0, 0.1)
    model.set_attn_impl(impl)
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    with torch.no_grad():
        got = model(ids).logits
    ref = reference_logits(model, ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 2e-4 * max(1.0, ref.abs().max().item())


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA head mapping: a GQA model equals the MHA model whose K/V heads are the GQA heads repeated."""
    gqa = MPTForCausalLM(tiny_cfg(n_heads=8, attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2})).eval()
    mha = MPTForCausalLM(tiny_cfg(n_heads=8)).eval()
    sd = gqa.state_dict()
    new = {}
    d, hd, kvh, rep = 64, 8, 2, 4
    for k, v in sd.items():
        if k.endswith("attn.Wqkv.weight"):
            q, kk, vv = v[:d], v[d : d + kvh * hd], v[d + kvh * hd :]
            kk = kk.view(kvh, hd, d).repeat_interleave(rep, 0).reshape(-1, d)
            vv = vv.view(kvh, hd, d).repeat_interleave(rep, 0).reshape(-1, d)
            v = torch.cat([q, kk, vv])
        new[k] = v
    mha.load_state_dict(new)
    ids = torch.randint(0, 211, (2, 20))
    with torch.no_grad():
        assert torch.allclose(gqa(ids).logits, mha(ids).logits, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "sdpa"])
@pytest.mark.parametrize("learned", [False, True])
def test_left_padded_batch_equals_one_by_one(impl, learned):
    """Left padding with attention_mask: the real tokens' logits equal each sequence run alone."""
    cfg = tiny_cfg(learned_pos_emb=learned, attn_config={"alibi": not learned})
    model = MPTForCausalLM(cfg).eval()
    model.set_attn_impl(impl)
    lens = [12, 7, 3]
    seqs = [torch.randint(2, 211, (n,)) for n in lens]
    t = max(lens)
    ids = torch.zeros(len(lens), t, dtype=torch.long)
    mask = torch.zeros(len(lens), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = s
        mask[i, t - len(s):] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        assert torch.isfinite(batched).all()
        for i, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            assert torch.allclose(batched[i, t - len(s):], alone, atol=1e-5), i


@pytest.mark.parametrize("impl", ["torch", "sdpa"])
def test_sequence_id_packing_equals_documents_alone(impl):
    """attn_uses_sequence_id: each packed document's logits equal the document run alone (ALiBi is
    relative, so the offset inside the pack does not matter); without the flag, they differ."""
    model = MPTForCausalLM(tiny_cfg(attn_config={"attn_uses_sequence_id": True})).eval()
    model.set_attn_impl(impl)
    docs = [torch.randint(0, 211, (n,)) for n in (9, 14, 5)]
    ids = torch.cat(docs)[None]
    seq_id = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(ids, sequence_id=seq_id).logits[0]
        off = 0
        for d in docs:
            assert torch.allclose(packed[off : off + len(d)], model(d[None]).logits[0], atol=1e-5)
            off += len(d)
        plain = MPTForCausalLM(model.config.replace(attn_config={"attn_uses_sequence_id": False})).eval()
        plain.load_state_dict(model.state_dict())
        unmasked = plain(ids, sequence_id=seq_id).logits[0]
    assert not torch.allclose(unmasked[9:], packed[9:], atol=1e-3)


def test_loss_is_next_token_cross_entropy_with_ignore_index():
    model = MPTForCausalLM(tiny_cfg()).eval()
    ids = torch.randint(0, 211, (2, 16))
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
        manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 211), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, manual)


def test_sdpa_and_eager_gradients_match():
    """The SDPA backend's gradients equal the eager reference's (padding + ALiBi + GQA)."""
    cfg = tiny_cfg(n_heads=8, attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 4})
    torch.manual_seed(0)
    a = MPTForCausalLM(cfg)
    b = MPTForCausalLM(cfg)
    b.load_state_dict(a.state_dict())
    a.set_attn_impl("torch")
    b.set_attn_impl("sdpa")
    ids = torch.randint(0, 211, (2, 24))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    labels = ids.masked_fill(mask == 0, -100)
    a(ids, attention_mask=mask, labels=labels).loss.backward()
    b(ids, attention_mask=mask, labels=labels).loss.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=1e-4), n


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = MPTForCausalLM(tiny_cfg())
    b = MPTForCausalLM(tiny_cfg())
    b.load_state_dict(a.state_dict())
    b.set_gradient_checkpointing(True)
    ids = torch.randint(0, 211, (2, 20))
    a.train()
    b.train()
    a(ids, labels=ids).loss.backward()
    b(ids, labels=ids).loss.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_embedding_fraction_scales_embedding_gradient_only():
    """embedding_fraction f: same forward, embedding gradient (through the input path) scaled by f."""
    cfg = tiny_cfg(tie_word_embeddings=False)
    torch.manual_seed(0)
    a = MPTForCausalLM(cfg)
    b = MPTForCausalLM({**cfg, "embedding_fraction": 0.25})
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 211, (2, 10))
    la, lb = a(ids, labels=ids).loss, b(ids, labels=ids).loss
    assert torch.allclose(la, lb)
    la.backward()
    lb.backward()
    ga, gb = a.transformer.wte.weight.grad, b.transformer.wte.weight.grad
    assert torch.allclose(gb, 0.25 * ga, atol=1e-7)


def test_dropout_active_only_in_training():
    model = MPTForCausalLM(tiny_cfg(resid_pdrop=0.5, emb_pdrop=0.5, attn_config={"attn_pdrop": 0.5}))
    ids = torch.randint(0, 211, (1, 12))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.allclose(model(ids).logits, model(ids).logits)


def test_mpt_init_statistics():
    """kaiming_normal_ fan_in (relu gain): std sqrt(2/fan_in); residual projections / sqrt(2*n_layers)."""
    cfg = MPTConfig.from_dict(tiny_cfg(d_model=256, n_layers=8, vocab_size=4096))
    model = MPTForCausalLM(cfg)
    blk = model.transformer.blocks[0]
    std = math.sqrt(2 / 256)
    assert abs(blk.attn.Wqkv.weight.std().item() - std) / std < 0.05
    assert abs(blk.ffn.up_proj.weight.std().item() - std) / std < 0.05
    res_std = std / math.sqrt(16)
    assert abs(blk.attn.out_proj.weight.std().item() - res_std) / res_std < 0.05
    fan_in_down = cfg.ffn_hidden_size
    assert abs(blk.ffn.down_proj.weight.std().item() - math.sqrt(2 / fan_in_down) / 4) / (math.sqrt(2 / fan_in_down) / 4) < 0.05
    assert torch.equal(blk.norm_1.weight, torch.ones(256))


def test_meta_model_materializes_and_runs():
    cfg = MPTConfig.from_dict(tiny_cfg())
    cfg.init_device = "meta"
    m = MPTForCausalLM(cfg)
    assert m.is_meta
    m.materialize("cpu")
    assert not m.is_meta and m.alibi_slopes.shape == (4,)
    assert torch.isfinite(m(torch.randint(0, 211, (1, 8))).logits).all()


def test_low_precision_layernorm_runs_in_autocast_dtype():
    """Under autocast, MPT's LPLayerNorm casts input and weights to the autocast dtype (and returns it);
    plain LayerNorm under CPU autocast stays fp32. Outside autocast both equal F.layer_norm."""
    from mptkit.model.blocks import LayerNorm, LPLayerNorm

    lp, ln = LPLayerNorm(32, bias=False), LayerNorm(32, bias=False)
    with torch.no_grad():
        lp.weight.uniform_(0.5, 1.5)
        ln.weight.copy_(lp.weight)
    x = torch.randn(4, 32)
    assert torch.equal(lp(x), F.layer_norm(x, (32,), lp.weight, None, 1e-5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lp(x)
    assert y.dtype == torch.bfloat16
    ref = F.layer_norm(x.bfloat16(), (32,), lp.weight.bfloat16(), None, 1e-5)
    assert torch.equal(y, ref)
