"""Weight-only quantisation (``mptkit.model.quant``): the q8_0 and q4_0 block maths against numpy references
written here from the block definitions (and against the ``gguf`` package's own quantisers), QuantLinear's
forward, ``quantize_model``'s policy and its bad inputs, and int8 / q4 models' logits and greedy tokens against
fp32."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

from mptkit.errors import ConfigError
from mptkit.model import MPTForCausalLM
from mptkit.model.quant import (
    BLOCK_SIZE,
    QuantLinear,
    dequantize_q4_0,
    dequantize_q8_0,
    quantize_model,
    quantize_q4_0,
    quantize_q8_0,
)
from tests.helpers import tiny_cfg


def ref_q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The q8_0 block definition in numpy: per block of 32 along a row, d = max|x| / 127 (fp32), id = 1/d (0 for
    d = 0), q = x * id rounded half away from zero, the scale stored as fp16; the weight is fp16(d) * q."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    b = w.reshape(n, k // 32, 32)
    d = (np.abs(b).max(axis=-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    x = (b * inv[..., None]).astype(np.float32).astype(np.float64)
    q = np.where(x >= 0, np.floor(x + 0.5), np.ceil(x - 0.5)).astype(np.int8)
    s = d.astype(np.float16)
    deq = q.astype(np.float32) * s.astype(np.float32)[..., None]
    return q.reshape(n, k), s, deq.reshape(n, k)


def ref_q4_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The q4_0 block definition in numpy, element by element: per block of 32, m = the first value of largest
    |x| (sign kept), d = m / -8 (fp32), id = 1/d (0 for d = 0), v = min(15, trunc(x * id + 8.5)) in fp32; the
    16 bytes hold v[j] | v[j + 16] << 4; the scale is fp16(d); the weight is fp16(d) * (v - 8)."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    packed = np.zeros((n, k // 2), dtype=np.uint8)
    s = np.zeros((n, k // 32), dtype=np.float16)
    deq = np.zeros((n, k), dtype=np.float32)
    for r in range(n):
        for b in range(k // 32):
            x = w[r, 32 * b : 32 * b + 32]
            m = np.float32(0)
            for v in x:  # the first of equal magnitudes wins
                if abs(v) > abs(m):
                    m = v
            d = np.float32(m / np.float32(-8))
            inv = np.float32(1) / d if d != 0 else np.float32(0)
            vals = [min(15, int(np.float32(np.float32(xi * inv) + np.float32(8.5)))) for xi in x]
            for j in range(16):
                packed[r, 16 * b + j] = vals[j] | (vals[j + 16] << 4)
            s[r, b] = np.float16(d)
            deq[r, 32 * b : 32 * b + 32] = np.float32(s[r, b]) * (np.array(vals, dtype=np.float32) - 8)
    return packed, s, deq


def _tricky(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 1, n).unsqueeze(1)
    w[0, :32] = 0  # an all-zero block: scale 0, values 0
    if k >= 64:  # ties: amax 127 gives d = 1 exactly, so x * id = x: 2.5 -> 3, -2.5 -> -3, 0.5 -> 1
        w[1, 32:64] = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, 1.5, -126.5] + [0.25] * 25)
    w[2, :32] = 1e-9  # a scale below fp16's smallest subnormal: stored 0
    return w


@pytest.mark.parametrize("shape", [(3, 32), (7, 96), (33, 256), (130, 64)])
def test_quantize_dequantize_equals_the_block_definition(shape):
    w = _tricky(*shape, seed=sum(shape))
    q, s = quantize_q8_0(w)
    rq, rs, rdeq = ref_q8_0(w.numpy())
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (shape[0], shape[1] // 32)
    np.testing.assert_array_equal(q.numpy(), rq)
    np.testing.assert_array_equal(s.numpy().view(np.uint16), rs.view(np.uint16))  # bit for bit
    np.testing.assert_array_equal(dequantize_q8_0(q, s).numpy(), rdeq)  # exact
    if shape[1] >= 64:
        assert q[1, 32:39].tolist() == [127, 3, -3, 1, -1, 2, -127]  # half away from zero, not to even
    assert (q[0, :32] == 0).all() and (s[0, 0] == 0).item()
    # row chunks give the same result as one pass
    q2, s2 = quantize_q8_0(w, rows_per_chunk=5)
    assert torch.equal(q, q2) and torch.equal(s, s2)


@pytest.mark.parametrize("shape", [(3, 32), (7, 96), (12, 256)])
def test_q4_0_round_trip_equals_the_block_definition(shape):
    w = _tricky(*shape, seed=sum(shape))
    w[1, :32] = torch.tensor([3.0, -3.0] + [1.0] * 30)  # equal magnitudes: the first (+3) sets d = -0.375
    w[2, 32 % shape[1] : 32 % shape[1] + 32] = torch.tensor([-8.0, 8.0, 7.5, -7.5] + [0.5] * 28)  # v clamps at 15
    q, s = quantize_q4_0(w)
    rq, rs, rdeq = ref_q4_0(w.numpy())
    assert q.dtype == torch.uint8 and q.shape == (shape[0], shape[1] // 2) and s.dtype == torch.float16
    np.testing.assert_array_equal(q.numpy(), rq)
    np.testing.assert_array_equal(s.numpy().view(np.uint16), rs.view(np.uint16))  # bit for bit
    np.testing.assert_array_equal(dequantize_q4_0(q, s).numpy(), rdeq)  # exact
    assert float(s[1, 0]) == -0.375 and (q[0, :16] == 0x88).all() and float(s[0, 0]) == 0  # zero block: v = 8
    q2, s2 = quantize_q4_0(w, rows_per_chunk=5)
    assert torch.equal(q, q2) and torch.equal(s, s2)


def test_same_blocks_as_the_gguf_packages_q4_0():
    """The gguf package's q4_0 quantiser: the same bytes (a fp16 scale, then the 16 packed bytes)."""
    gguf = pytest.importorskip("gguf")
    w = _tricky(40, 128, seed=4)
    q, s = quantize_q4_0(w)
    raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0).reshape(40, 4, 18)
    np.testing.assert_array_equal(raw[..., :2].copy().view(np.uint16)[..., 0], s.numpy().view(np.uint16))
    np.testing.assert_array_equal(raw[..., 2:].reshape(40, 64), q.numpy())
    deq = gguf.quants.dequantize(raw.reshape(40, 72), gguf.GGMLQuantizationType.Q4_0)
    np.testing.assert_array_equal(deq, dequantize_q4_0(q, s).numpy())


def test_same_blocks_as_the_gguf_packages_q8_0():
    """The gguf package (llama.cpp's Python tools) quantises to the same bytes: a fp16 scale then 32 int8."""
    gguf = pytest.importorskip("gguf")
    w = _tricky(40, 128, seed=3)
    q, s = quantize_q8_0(w)
    raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0).reshape(40, 4, 34)
    np.testing.assert_array_equal(
        raw[..., :2].copy().view(np.float16)[..., 0].view(np.uint16), s.numpy().view(np.uint16)
    )
    np.testing.assert_array_equal(raw[..., 2:].view(np.int8).reshape(40, 128), q.numpy())


@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_forward_is_dequantise_then_matmul(bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 70, bias=bias)
    m = QuantLinear.from_linear(lin)
    w = m.dequantize()
    np.testing.assert_array_equal(w.numpy(), ref_q8_0(lin.weight.detach().numpy())[2])
    x = torch.randn(2, 5, 96)
    want = torch.nn.functional.linear(x, w, lin.bias)
    torch.testing.assert_close(m(x), want, rtol=1e-6, atol=1e-6)
    # several chunks of output rows (a small transient buffer) give the same result
    import mptkit.model.quant as mq

    old = mq._CHUNK_ELEMS
    mq._CHUNK_ELEMS = 96 * 16
    try:
        torch.testing.assert_close(m(x), want, rtol=1e-6, atol=1e-6)
    finally:
        mq._CHUNK_ELEMS = old
    assert not any(p.requires_grad for p in m.parameters())
    assert {k: v.dtype for k, v in m.state_dict().items() if k != "bias"} == {
        "weight_q": torch.int8,
        "scales": torch.float16,
    }
    # a dtype cast leaves the format alone: int8 values, fp16 scales, bit for bit; the bias follows
    q0, s0 = m.weight_q.clone(), m.scales.clone()
    m.to(torch.bfloat16)
    assert torch.equal(m.weight_q, q0) and m.scales.dtype == torch.float16 and torch.equal(m.scales, s0)
    assert bias is False or m.bias.dtype == torch.bfloat16
    assert m(x.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="multiple of the block size"):
        QuantLinear(48, 8)


@pytest.mark.parametrize("bias", [False, True])
def test_q4_quant_linear_forward_is_dequantise_then_matmul(bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 70, bias=bias)
    m = QuantLinear.from_linear(lin, "q4_0")
    assert m.block == "q4_0" and m.weight_q.dtype == torch.uint8 and m.weight_q.shape == (70, 48)
    w = m.dequantize()
    np.testing.assert_array_equal(w.numpy(), ref_q4_0(lin.weight.detach().numpy())[2])
    x = torch.randn(2, 5, 96)
    want = torch.nn.functional.linear(x, w, lin.bias)
    torch.testing.assert_close(m(x), want, rtol=1e-6, atol=1e-6)
    import mptkit.model.quant as mq

    old = mq._CHUNK_ELEMS
    mq._CHUNK_ELEMS = 96 * 16  # the prefill's path: a few output rows dequantised at a time
    try:
        torch.testing.assert_close(m(x), want, rtol=1e-6, atol=1e-6)
    finally:
        mq._CHUNK_ELEMS = old
    with pytest.raises(ConfigError, match="block 'q5_0'"):
        QuantLinear(64, 8, block="q5_0")


def _model(seed=0, std=0.05, **over):
    torch.manual_seed(seed)
    cfg = tiny_cfg(
        **{"d_model": 128, "n_heads": 4, "n_layers": 2, "expansion_ratio": 4, "max_seq_len": 128, **over}
    )
    m = MPTForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial weights: larger than the init
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
    return m


def test_quantize_model_policy():
    m = _model(no_bias=False)
    wte = m.transformer.wte.weight
    rep = quantize_model(m, "int8")
    blk = m.transformer.blocks[0]
    for lin in (blk.attn.Wqkv, blk.attn.out_proj, blk.ffn.up_proj, blk.ffn.down_proj):
        assert type(lin) is QuantLinear and lin.bias is not None and lin.bias.dtype == torch.float32
    assert len(rep.quantized) == 8 and rep.kept == {}
    assert m.num_params() == _model(no_bias=False).num_params()  # int8 weights counted as parameters
    # embeddings and the tied LM head stay fp32, the same tensor
    assert m.transformer.wte.weight is wte and wte.dtype == torch.float32
    assert type(m.transformer.norm_f.weight) is nn.Parameter
    entry = m.config.extra["quantization"]
    assert entry["type"] == "int8" and entry["block"] == "q8_0" and entry["block_size"] == BLOCK_SIZE
    assert entry["version"] == 2 and entry["quantized"] == rep.quantized
    # no fp32 copy of a quantised weight is kept anywhere in the model
    assert not [n for n, _ in m.named_parameters() if n.endswith(("Wqkv.weight", "up_proj.weight"))]
    # again: nothing changes; another type on a quantised model is refused
    assert quantize_model(m).quantized == rep.quantized
    with pytest.raises(ConfigError, match="already q8_0"):
        quantize_model(m, "q4")
    q4 = _model(no_bias=False)
    n = q4.num_params()
    rep4 = quantize_model(q4, "q4_0")
    assert rep4.quant == "q4" and q4.config.extra["quantization"]["block"] == "q4_0"
    assert q4.num_params() == n  # two 4-bit weights per byte, counted as two parameters


def test_unfitting_shapes_stay_fp32_per_tensor_named_in_the_log(caplog):
    m = _model(d_model=48, n_heads=3)  # in_features 48: Wqkv, out_proj, up_proj; down_proj has 192
    with caplog.at_level(logging.INFO, logger="mptkit.model.quant"):
        rep = quantize_model(m)
    blk = m.transformer.blocks[1]
    assert type(blk.attn.Wqkv) is nn.Linear and type(blk.ffn.up_proj) is nn.Linear
    assert type(blk.ffn.down_proj) is QuantLinear
    assert set(rep.kept) == {
        f"transformer.blocks.{i}.{n}" for i in (0, 1) for n in ("attn.Wqkv", "attn.out_proj", "ffn.up_proj")
    } | {"lm_head"}  # the tied head too: d_model 48 does not fit the blocks
    assert "transformer.blocks.1.attn.Wqkv stays fp32 (in_features 48 is not a multiple" in caplog.text
    m(torch.randint(0, 211, (1, 5)))  # still a working model


def test_unknown_quant_type_is_a_clear_error():
    m = _model()
    with pytest.raises(ConfigError, match=r"unknown quantisation type 'q3'.*known int8, q4"):
        quantize_model(m, "q3")
    assert type(m.transformer.blocks[0].attn.Wqkv) is nn.Linear  # nothing half-done


def test_wrapped_linear_is_left_alone():
    class Wrapped(nn.Linear):
        pass

    m = _model()
    old = m.transformer.blocks[0].ffn.up_proj
    w = Wrapped(old.in_features, old.out_features, bias=False)
    m.transformer.blocks[0].ffn.up_proj = w
    rep = quantize_model(m)
    assert m.transformer.blocks[0].ffn.up_proj is w
    assert "not exactly nn.Linear" in rep.kept["transformer.blocks.0.ffn.up_proj"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_int8_logits_close_to_fp32_and_greedy_tokens_mostly_equal(seed):
    """Measured on this tiny model (d 128, 2 layers, weights N(0, 0.05)), 4 x 64 random tokens: max |logit
    difference| 1.3-1.5% of max |logit|, teacher-forced top-1 agreement 97.3-98.4%, 32 greedy tokens equal
    for seeds 0-2. Asserted with margin: 3% and 95%."""
    m = _model(seed)
    q = copy.deepcopy(m)
    quantize_model(q)
    ids = torch.randint(0, 211, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = m(ids).logits, q(ids).logits
    assert (a - b).abs().max() <= 0.03 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_q4_logits_close_to_fp32(seed):
    """The same tiny random models in q4_0 (16 levels per block of Gaussian weights: a far coarser grid than
    int8's 255): measured max |logit difference| 20-24% of max |logit| (int8: 1.3-1.5%), teacher-forced top-1
    agreement 71-75% (int8: 97-98%). Asserted with margin: 30% and 65%. Trained models: docs/inference.md."""
    m = _model(seed)
    q = copy.deepcopy(m)
    quantize_model(q, "q4")
    ids = torch.randint(0, 211, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = m(ids).logits, q(ids).logits
    assert (a - b).abs().max() <= 0.30 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.65
