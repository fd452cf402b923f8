"""ggml's Q4_K blocks (``mptkit.model.quant.quantize_q4_k`` / ``dequantize_q4_k``): the dequantiser equals one
written here from the block definition, the ``gguf`` package's and reconstructs close to the weights; the
quantised bytes equal ggml's own ``quantize_row_q4_K_ref`` (called from llama-cpp-python's libggml-base)."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest
import torch

from mptkit.errors import ConfigError
from mptkit.model.quant import dequantize_q4_0, dequantize_q4_k, quantize_q4_0, quantize_q4_k


def reference_dequantize(blocks: np.ndarray, n_cols: int) -> np.ndarray:
    """block_q4_K, one block at a time, from its definition: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and
    mins (sub-block j < 4: bytes j and j + 4; j >= 4: low nibbles in byte j + 4, top bits in the top 2 bits of
    bytes j - 4 and j), 128 bytes of nibbles (per 64 weights: 32 bytes, low nibble weight l, high l + 32)."""
    rows = blocks.reshape(blocks.shape[0], -1, 144)
    out = np.zeros((blocks.shape[0], n_cols), dtype=np.float32)
    for r in range(rows.shape[0]):
        for b in range(rows.shape[1]):
            blk = rows[r, b]
            d = float(blk[0:2].view(np.float16)[0])
            dmin = float(blk[2:4].view(np.float16)[0])
            sc_bytes, qs = [int(v) for v in blk[4:16]], blk[16:]
            for j in range(8):
                if j < 4:
                    sc, m = sc_bytes[j] & 63, sc_bytes[j + 4] & 63
                else:
                    sc = (sc_bytes[j + 4] & 0xF) | ((sc_bytes[j - 4] >> 6) << 4)
                    m = (sc_bytes[j + 4] >> 4) | ((sc_bytes[j] >> 6) << 4)
                for i in range(32):
                    pos = 32 * j + i  # weight within the super-block
                    byte = qs[(pos // 64) * 32 + pos % 32]
                    q = (byte >> 4) if (pos % 64) >= 32 else (byte & 0xF)
                    out[r, b * 256 + pos] = np.float32(np.float32(d * sc) * q) - np.float32(dmin * m)
    return out


def _weights(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 512, generator=g) * torch.exp(torch.randn(24, 1, generator=g))
    w[1] = torch.rand(512, generator=g)  # all positive: min 0
    w[2] = -torch.rand(512, generator=g) - 1  # all negative
    w[3] = 0.0  # zeros: d = dmin = 0
    w[4] = -0.25  # constant: every sub-block's scale 0, its min 0.25
    w[5, :32] *= 1e-4  # a sub-block whose 6-bit scale rounds to 0 (ggml keeps its first fit's values)
    w[6] *= torch.rand(512, generator=g) > 0.9  # sparse outliers
    return w


def test_q4_k_dequantises_as_the_block_definition_says_and_reconstructs_closely():
    w = _weights()
    blocks = quantize_q4_k(w)
    assert blocks.dtype == torch.uint8 and blocks.shape == (24, 2 * 144)
    got = dequantize_q4_k(blocks)
    np.testing.assert_array_equal(got.numpy(), reference_dequantize(blocks.numpy(), 512))
    assert dequantize_q4_k(blocks, torch.float16).dtype == torch.float16
    assert torch.equal(got[3], torch.zeros(512))
    torch.testing.assert_close(got[4], torch.full((512,), -0.25), rtol=0, atol=2e-4)  # 63 * fp16(0.25 / 63)
    # a 4-bit fit with a min per 32 weights: closer to the weights than q4_0's symmetric blocks
    err_k = (got - w).square().mean()
    err_0 = (dequantize_q4_0(*quantize_q4_0(w)) - w).square().mean()
    assert err_k < 0.8 * err_0, (float(err_k), float(err_0))
    with pytest.raises(ConfigError, match="multiple of 256"):
        quantize_q4_k(torch.zeros(4, 96))


def test_q4_k_dequantiser_equals_the_gguf_package():
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    blocks = quantize_q4_k(_weights(1)).numpy()
    np.testing.assert_array_equal(dequantize(blocks, gguf.GGMLQuantizationType.Q4_K),
                                  dequantize_q4_k(torch.from_numpy(blocks)).numpy())


def test_q4_k_bytes_equal_ggmls_reference_quantiser():
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.quantize_row_q4_K_ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.quantize_row_q4_K_ref.restype = None
    for seed in range(3):
        w = _weights(seed)
        if seed == 2:
            w = w * 1e-3 + 1e-4  # small, off-centre weights (the mins matter)
        x = np.ascontiguousarray(w.numpy(), dtype=np.float32)
        want = np.empty(x.size // 256 * 144, dtype=np.uint8)
        lib.quantize_row_q4_K_ref(x.ctypes.data, want.ctypes.data, x.size)
        got = quantize_q4_k(w, rows_per_chunk=7).numpy()  # chunking does not change a byte
        np.testing.assert_array_equal(got.reshape(-1), want)
