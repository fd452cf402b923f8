"""The q8_0 decode path: the compiled kernel (the vector path ``-march=native`` gives, and the plain C path) and
the torch fallback equal dequantise-then-matmul to float rounding; the fast-path contract keeps quantised
blocks off the fp32 whole-block kernel; the fast decoder on an int8 model generates exactly what the int8
model's own forward gives, with the kernel and with the fallback."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mptkit.infer import DecodeOptions, Generator, SamplingParams
from mptkit.infer.kernels import FLAGS
from mptkit.infer.quant_kernels import (
    int_dot_reference,
    module_kernel,
    q8_kernels,
    q8_linear_fn,
    torch_q8_linear,
)
from mptkit.model import MPTForCausalLM
from mptkit.model.fastpath import block_coverage, model_coverage
from mptkit.model.quant import (
    QuantLinear,
    dequantize_weight,
    linear_kernel,
    quantize_model,
    quantize_q8_0,
    quantize_weight,
)
from tests.helpers import assert_decode_logits_agree, round_quant_inputs, tiny_cfg

PLAIN_C = tuple(f for f in FLAGS if f != "-march=native")  # no AVX: the scalar path


def _kernel(flags):
    k = q8_kernels(flags=flags)
    assert k is not None, "the q8 kernel did not build (see the log)"
    return k


@pytest.mark.parametrize("block", ["q8_0", "q4_0"])
@pytest.mark.parametrize("flags", [FLAGS, PLAIN_C], ids=["native", "plain-c"])
def test_kernel_equals_dequantise_then_matmul(flags, block):
    k = _kernel(flags)
    if flags is PLAIN_C:
        assert k.vector_width == 1
    g = torch.Generator().manual_seed(0)
    for n, kk in ((1, 32), (67, 96), (130, 64), (257, 320), (9, 1024)):
        w = torch.randn(n, kk, generator=g) * 0.2
        w[0, :32] = 0
        q, s = quantize_weight(w, block)
        ref_w = dequantize_weight(q, s, block)
        b = torch.randn(n, generator=g)
        for m in range(1, 17):
            x = torch.randn(m, kk, generator=g)
            for bias in (None, b):
                ref = (x.double() @ ref_w.double().t() + (0 if bias is None else bias.double())).float()
                got = k.linear(x, q, s, bias)
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * kk**0.5)
    # a row's result does not depend on the other rows of the batch
    x = torch.randn(16, 320, generator=g)
    w = torch.randn(33, 320, generator=g)
    q, s = quantize_weight(w, block)
    full = k.linear(x, q, s)
    for m in (1, 3, 7):
        assert torch.equal(k.linear(x[:m], q, s), full[:m])


@pytest.mark.parametrize("block", ["q8_0", "q4_0"])
@pytest.mark.parametrize("flags", [FLAGS, PLAIN_C], ids=["native", "plain-c"])
def test_integer_path_equals_rounded_activations_times_the_dequantised_weight(flags, block):
    """DecodeOptions(quant_int_dot=True): llama.cpp's arithmetic (activations rounded to q8_0 blocks, integer
    block dot products) — equal to that rounding done in torch then an fp64 matmul, to fp32 summation order;
    within ~1% of the exact path on these random matrices."""
    k = _kernel(flags)
    g = torch.Generator().manual_seed(1)
    for n, kk in ((1, 32), (67, 96), (130, 512), (70, 352)):  # q4: groups of 8 rows + the rest, full + partial tiles
        w = torch.randn(n, kk, generator=g) * 0.2
        w[0, :32] = 0
        q, s = quantize_weight(w, block)
        deq = dequantize_weight(q, s, block)
        b = torch.randn(n, generator=g)
        for m in (1, 2, 5, 16):
            x = torch.randn(m, kk, generator=g)
            x[0, :32] = 0  # an all-zero activation block
            for bias in (None, b):
                got = k.int_linear(x, q, s, bias)
                torch.testing.assert_close(got, int_dot_reference(x, deq, bias), rtol=1e-5, atol=1e-5 * kk**0.5)
            exact = x @ deq.t()
            assert (k.int_linear(x, q, s) - exact).abs().max() <= 0.03 * exact.abs().max()
        full = k.int_linear(x, q, s)  # a row's result does not depend on the other rows of the batch
        for m in (1, 3, 4, 7):
            assert torch.equal(k.int_linear(x[:m], q, s), full[:m])
    lin = QuantLinear.from_linear(nn.Linear(64, 40), block)
    fn = q8_linear_fn(lin, k.integer_variant(), 16)
    x = torch.randn(3, 64, generator=g)
    torch.testing.assert_close(fn(x), int_dot_reference(x, lin.dequantize(), lin.bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fn(x), fn(x))  # the second call takes the unchecked fast path


def test_prompt_forward_takes_the_decode_kernels_in_scope():
    """model/quant.py's linear_kernel scope with infer's module_kernel: a QuantLinear's forward (any leading
    shape, any number of rows: a prompt) runs the integer path; with gradients on, or outside the scope, its
    exact torch forward; the exact kernels take up to small_rows rows and leave longer inputs to torch."""
    k = _kernel(FLAGS)
    torch.manual_seed(4)
    lin = QuantLinear.from_linear(nn.Linear(96, 40), "q4_0")
    x = torch.randn(2, 37, 96)  # 74 rows: more than small_rows
    exact = torch.nn.functional.linear(x, lin.dequantize(), lin.bias)
    want = int_dot_reference(x.reshape(-1, 96), lin.dequantize(), lin.bias).reshape(2, 37, 40)
    with torch.inference_mode(), linear_kernel(module_kernel(k.integer_variant(), 16)):
        got = lin(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert (got - exact).abs().max() > 1e-4  # not the exact arithmetic: the activations were rounded
    with linear_kernel(module_kernel(k.integer_variant(), 16)):
        xg = x.clone().requires_grad_(True)
        out = lin(xg)  # gradients on: the exact forward, differentiable
    torch.testing.assert_close(out.detach(), exact, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert xg.grad is not None
    with torch.inference_mode(), linear_kernel(module_kernel(k, 16)):  # the exact kernels
        torch.testing.assert_close(lin(x[0, :16]), exact[0, :16], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lin(x), exact, rtol=1e-6, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), exact, rtol=1e-6, atol=1e-6)  # the scope is gone


def test_decoder_with_integer_dot_products(tmp_path):
    m = _int8_model("q4")
    gen = Generator(m, None, decode_options=DecodeOptions(quant_int_dot=True))
    assert gen.fast.q8 is not None and gen.fast.q8.int_dot
    assert Generator(m, None).fast.q8.int_dot  # llama.cpp's arithmetic by default
    assert Generator(m, None, decode_options=DecodeOptions(quant_int_dot=False)).fast.q8.int_dot is False
    out = gen.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    assert len(out) == 8


def test_kernel_refuses_what_it_cannot_read():
    k = _kernel(FLAGS)
    q, s = quantize_q8_0(torch.randn(8, 64))
    with pytest.raises(ValueError, match="quantised linear"):
        k.linear(torch.randn(1, 64), q, s.float())  # fp32 scales: not the format
    with pytest.raises(ValueError, match="does not match"):
        k.linear(torch.randn(1, 32), q, s)
    lin = QuantLinear.from_linear(nn.Linear(64, 8))
    assert k.supports(lin)
    fn = q8_linear_fn(lin, k, 16)
    x = torch.randn(2, 64)
    torch.testing.assert_close(fn(x), lin(x), rtol=1e-5, atol=1e-5)
    lin.scales = lin.scales.float()  # model.float() casts the scales buffer: the fallback takes over
    assert not k.supports(lin)
    assert q8_linear_fn(lin, k, 16) == lin.forward
    torch.testing.assert_close(fn(x), lin(x), rtol=1e-6, atol=1e-6)  # a function made before the cast too
    with pytest.raises(ValueError, match="does not match"):  # x is checked on every call
        q8_linear_fn(QuantLinear.from_linear(nn.Linear(64, 8)), k, 16)(torch.randn(1, 32))


@pytest.mark.parametrize("bias", [False, True])
def test_torch_fallback_and_dispatch(bias):
    torch.manual_seed(0)
    lin = QuantLinear.from_linear(nn.Linear(96, 50, bias=bias))
    ref_w = lin.dequantize()
    x = torch.randn(20, 96)
    want = torch.nn.functional.linear(x, ref_w, lin.bias)
    torch.testing.assert_close(torch_q8_linear(lin)(x), want, rtol=1e-6, atol=1e-6)
    fn = q8_linear_fn(lin, _kernel(FLAGS), small_rows=16)
    torch.testing.assert_close(fn(x[:16]), want[:16], rtol=1e-5, atol=1e-5)  # the kernel
    torch.testing.assert_close(fn(x), want, rtol=1e-6, atol=1e-6)  # 20 rows > small_rows: the fallback
    assert q8_linear_fn(lin, None, 16) == lin.forward


def _int8_model(quant="int8", **over):
    torch.manual_seed(0)
    m = MPTForCausalLM(tiny_cfg(**{"d_model": 64, "n_heads": 4, **over})).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    quantize_model(m, quant)
    return m


def test_contract_quantised_blocks_take_the_whole_block_kernel():
    """q8_0 / q4_0 blocks (also a block with a single quantised Linear) are covered by the whole-block C kernel:
    every layer of the step in one call, each quantised linear read through its block kernel; without the
    compiled kernels the decoder takes the per-linear path (each QuantLinear's exact torch forward)."""
    m = _int8_model()
    cov = model_coverage(m)
    assert cov.fast and all(c.kernel for c in cov.blocks)
    fp = MPTForCausalLM(tiny_cfg()).eval()
    assert block_coverage(fp.transformer.blocks[0]).kernel  # the fp32 block: the whole-block kernel
    one = copy.deepcopy(fp)
    blk = one.transformer.blocks[0]
    blk.attn.out_proj = QuantLinear.from_linear(blk.attn.out_proj)  # one quantised Linear in an fp32 block
    assert block_coverage(blk).fast and block_coverage(blk).kernel
    gen = Generator(m, None)
    assert gen.fast.q8 is not None  # the compiled q8 kernel reads the int8 blocks
    if gen.fast.small is not None:
        assert gen.fast.stack is not None and all(L.block is not None and L.block.quantised for L in gen.fast.layers)
        mixed = Generator(one, None).fast
        assert mixed.stack is not None and mixed.layers[0].block.quantised and not mixed.layers[1].block.quantised
    off = Generator(m, None, decode_options=DecodeOptions(cpu_kernels=False)).fast
    assert off.stack is None and off.q8 is None and all(L.block is None for L in off.layers)


def _per_linear(gen):
    """The same generator with the whole-block kernel switched off: one kernel call per quantised linear."""
    gen.fast.stack = None
    for L in gen.fast.layers:
        L.block = None
    return gen


@pytest.mark.parametrize("int_dot", [False, True], ids=["fp32_dot", "int_dot"])
@pytest.mark.parametrize("quant", ["int8", "q4"])
def test_whole_block_kernel_equals_the_per_linear_path(quant, int_dot):
    """The quantised whole-step call computes what the per-linear path computes (the same block kernels, fp32 or
    integer dot products, on the same rows): logits step by step at batch 1 and in a batched step with slots of
    different lengths, some idle. Mixed blocks too (one fp32 Linear left in a quantised model)."""
    m = _int8_model(quant, no_bias=False)
    blk = m.transformer.blocks[1]
    blk.ffn.up_proj = nn.Linear(blk.ffn.up_proj.in_features, blk.ffn.up_proj.out_features)  # an fp32 linear
    opts = DecodeOptions(quant_int_dot=int_dot)
    fast, ref = Generator(m, None, decode_options=opts), _per_linear(Generator(m, None, decode_options=opts))
    if fast.fast.small is None or fast.fast.q8 is None:
        pytest.skip("no compiled CPU kernels on this machine (x86-64 AVX2/AVX-512 only)")
    assert fast.fast.stack is not None and ref.fast.stack is None
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (7, 3, 12)]
    assert_decode_logits_agree(fast, ref, prompts, steps=10, batched_steps=5)


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"no_bias": False, "attn_config": {"clip_qkv": 0.5}},
        {"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2}},
    ],
    ids=["mha", "bias_clip", "gqa"],
)
@pytest.mark.parametrize("path", ["int_dot", "exact", "torch"])
def test_fast_decoder_on_int8_equals_the_int8_models_own_forward(over, path):
    _fast_decoder_equals_own_forward("int8", over, path)


@pytest.mark.parametrize("over", [{}, {"no_bias": False}], ids=["mha", "bias"])
@pytest.mark.parametrize("path", ["int_dot", "exact", "torch"])
def test_fast_decoder_on_q4_equals_the_q4_models_own_forward(over, path):
    """The q4_0 kernel (batch 1 and the engine's small batches) and the fallback: the q4 model's own tokens."""
    _fast_decoder_equals_own_forward("q4", over, path)


def _fast_decoder_equals_own_forward(quant, over, path):
    """``path``: int_dot (the default: the kernels with activations rounded to q8_0 blocks, against the model's
    forward with the same rounding before every quantised linear), exact (``quant_int_dot=False``: the
    dequantise-then-matmul kernels against the plain forward), torch (no compiled kernels: the fallback)."""
    m = _int8_model(quant, **over)
    assert type(m.transformer.blocks[0].attn.Wqkv) is QuantLinear
    assert m.transformer.blocks[0].attn.Wqkv.block == {"int8": "q8_0", "q4": "q4_0"}[quant]
    kernels = path != "torch"
    opts = DecodeOptions(cpu_kernels=kernels) if path != "exact" else DecodeOptions(quant_int_dot=False)
    gen = Generator(m, None, decode_options=opts)
    assert gen.fast is not None and (gen.fast.q8 is not None) == kernels
    assert kernels is False or gen.fast.q8.int_dot == (path == "int_dot")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 211, (n,), generator=g).tolist() for n in (5, 11, 2)]
    for p in prompts:  # batch 1, greedy, token for token against a full recompute
        out = gen.generate([p], SamplingParams(max_tokens=16, ignore_eos=True))[0].token_ids
        seq = list(p)
        hooks = round_quant_inputs(m) if path == "int_dot" else []
        try:
            with torch.inference_mode():
                for t in out:
                    assert int(m(torch.tensor([seq])).logits[0, -1].argmax()) == t
                    seq.append(t)
        finally:
            for h in hooks:
                h.remove()
    batched = gen.generate(
        prompts, SamplingParams(max_tokens=10, ignore_eos=True)
    )  # the engine's small batches
    for p, o in zip(prompts, batched):
        assert gen.generate([p], SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids == o.token_ids


def test_server_serves_an_int8_model(tmp_path, make_tokenizer):
    """`mptkit serve MODEL --quant int8`'s build_server: the engine's model is quantised, and a completion
    through the engine's batched decode equals the int8 model's own greedy tokens."""
    pytest.importorskip("fastapi")
    import httpx

    from mptkit.infer.server import BackgroundServer, build_server
    from mptkit.io import load_tokenizer

    tok = load_tokenizer(make_tokenizer())
    torch.manual_seed(0)
    src = tmp_path / "m"
    MPTForCausalLM(tiny_cfg(vocab_size=len(tok), max_seq_len=128)).save_pretrained(src, tokenizer=tok)
    srv = build_server(str(src), model_name="q", quant="int8")
    model = srv.engine.gen.model
    assert type(model.transformer.blocks[0].attn.Wqkv) is QuantLinear
    prompt = tok.encode("def f(x):", add_special_tokens=False)
    want = (
        Generator(model, tok).generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    )
    with BackgroundServer(srv) as bg:
        r = httpx.post(
            f"{bg.base_url}/v1/completions",
            json={"model": "q", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True},
            timeout=60,
        )
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == tok.decode(want)
