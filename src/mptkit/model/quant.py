"""Weight-only quantisation of a model's block Linears: llama.cpp's ``q8_0`` (int8) and ``q4_0`` (4-bit) blocks.

The formats (one per weight matrix ``w`` of shape (out_features, in_features), as ``nn.Linear`` stores it):
each row is cut into blocks of :data:`BLOCK_SIZE` = 32 consecutive weights along the input dimension, and each
block ``x`` gets one scale ``d`` (computed in fp32, stored as fp16) and 32 small integers.

* ``q8_0`` (``--quant int8``): ``d = max|x| / 127``, ``q = roundf(x * (1/d))`` (round half away from zero; all
  zeros when ``d == 0``), 32 int8 values; the weight is ``fp16(d) * q``. ggml's ``quantize_row_q8_0_ref``.
  Stored as ``weight_q`` (out, in) int8 and ``scales`` (out, in / 32) fp16.
* ``q4_0`` (``--quant q4``): ``m`` = the block's first value of largest magnitude (its sign kept),
  ``d = m / -8``, ``q = min(15, trunc(x * (1/d) + 8.5))`` (0 when ``d == 0``, so 8 - 8 = 0), values 0..15 with an
  offset of 8; the weight is ``fp16(d) * (q - 8)``. ggml's ``quantize_row_q4_0_ref``. Stored as ``weight_q``
  (out, in / 2) uint8 — per block 16 bytes, byte ``j`` holding value ``j`` in its low nibble and value ``j + 16``
  in its high nibble (ggml's ``block_q4_0.qs``) — and ``scales`` (out, in / 32) fp16.

The weight a block stands for is exactly representable in fp32 (11 significant bits times 4 or 8), so
dequantising is exact, and the same weights quantise to the same bytes here and in a llama.cpp file of that type
(``mptkit export gguf --dtype q8_0|q4_0`` writes these very blocks). Biases stay fp32.

Policy (:func:`quantize_model`): every plain ``nn.Linear`` inside the transformer blocks (``attn.Wqkv``,
``attn.out_proj``, ``ffn.up_proj``, ``ffn.down_proj``, a GLU's ``gate_proj``) is quantised; the tied LM head gets a
q8_0 copy of ``wte`` (``quant_head``: a decode step streams the head every token), while the token / position
embeddings themselves (read one row per token), an untied head, the norms and every bias stay fp32. A Linear whose
``in_features`` is not a multiple of 32 stays fp32 (logged with its name), as does any module that is not
exactly ``nn.Linear`` (a wrapped or subclassed one: its own forward stays in charge). The model's config records
what was done under the ``quantization`` key (:data:`FORMAT_VERSION`, the type, the quantised and kept module
names), so ``save_pretrained`` writes a quantised folder that :mod:`mptkit.io.quant_folder` reads back.

:class:`QuantLinear` is a correct module anywhere: its forward dequantises a few output rows at a time
(never a full fp32 copy of the weight) and multiplies in torch. The decode step's fast path reads its int8
values and scales directly (``mptkit.infer.quant_kernels``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mptkit.errors import ConfigError

log = logging.getLogger(__name__)

BLOCK_SIZE = 32
FORMAT_VERSION = 2  # 2: the tied LM head's q8_0 copy (``quant_head``, the entry's ``head``); 1 is still read
READ_VERSIONS = (1, 2)
HEAD_MODULE = "quant_head"  # the model attribute holding the tied LM head's quantised copy
HEAD_BLOCK = "q8_0"  # its blocks, for every --quant type (llama.cpp: q8_0 in q8_0 files, q6_K in q4_0 ones)
QUANT_TYPES = {"int8": "q8_0", "q4": "q4_0"}  # the names --quant accepts -> the block format
QUANT_ALIASES = {"q8_0": "int8", "q4_0": "q4"}  # also accepted: the block formats' own names
BLOCK_TYPES = tuple(QUANT_TYPES.values())
CONFIG_KEY = "quantization"
FORMAT_NAME = "mptkit-weight-only"  # the config entry's "format"
# output rows dequantised at a time by QuantLinear's forward: bounds its transient fp32 buffer (~4 MiB)
_CHUNK_ELEMS = 1 << 20


def check_quant_type(name: str) -> str:
    """The canonical name (``int8`` / ``q4``) of a known quantisation type (``q8_0`` / ``q4_0`` accepted too),
    else a :class:`ConfigError` naming the known ones."""
    name = QUANT_ALIASES.get(name, name)
    if name not in QUANT_TYPES:
        raise ConfigError(
            f"unknown quantisation type {name!r}: known {', '.join(QUANT_TYPES)} "
            "(int8 = llama.cpp's q8_0 blocks, q4 = its q4_0 blocks; q8_0 / q4_0 also accepted)"
        )
    return name


# ----------------------------------------------------------------------------- the block maths


def quantize_q8_0(w: torch.Tensor, *, rows_per_chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (N, K) floating, K a multiple of 32 -> (``q`` (N, K) int8, ``scales`` (N, K/32) fp16), on CPU.

    ggml's ``quantize_row_q8_0_ref``: per block of 32, ``d = amax / 127`` in fp32, ``id = 1/d`` (0 when d is 0),
    ``q = roundf(x * id)`` with ties away from zero (computed exactly in fp32: round half to even, then the
    exact ties moved away from zero), ``scale = fp16(d)`` (round to nearest even). Rows are done
    ``rows_per_chunk`` at a time, so the work buffers stay small for a 7B matrix (32 MB at K = 16384)."""
    if w.dim() != 2 or w.shape[1] % BLOCK_SIZE:
        raise ConfigError(
            f"q8_0 needs a 2-D weight with in_features a multiple of {BLOCK_SIZE}, got {tuple(w.shape)}"
        )
    n, k = w.shape
    q = torch.empty((n, k), dtype=torch.int8)
    s = torch.empty((n, k // BLOCK_SIZE), dtype=torch.float16)
    for r0 in range(0, n, rows_per_chunk):
        x = w[r0 : r0 + rows_per_chunk].detach().to(device="cpu", dtype=torch.float32)
        x = x.reshape(x.shape[0], -1, BLOCK_SIZE)
        d = x.abs().amax(dim=-1) / 127.0  # fp32, as ggml
        inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
        v = x * inv.unsqueeze(-1)  # the fp32 product
        # roundf (ties away from zero), exactly, in fp32: round-half-even, then each exact tie moved away
        # from zero (v - trunc(v) is exact, so a tie is recognised exactly)
        t = torch.trunc(v)
        r = torch.where((v - t).abs() == 0.5, t + torch.sign(v), torch.round(v))
        q[r0 : r0 + x.shape[0]] = r.clamp_(-127, 127).to(torch.int8).reshape(x.shape[0], k)
        s[r0 : r0 + x.shape[0]] = d.to(torch.float16)
    return q, s


def dequantize_q8_0(
    q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``scales`` broadcast over their blocks times ``q``, in fp32 (exact), then cast to ``dtype``."""
    n, k = q.shape
    w = q.to(torch.float32).reshape(n, -1, BLOCK_SIZE) * scales.to(torch.float32).unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


def _check_2d(w: torch.Tensor, block: str) -> None:
    if w.dim() != 2 or w.shape[1] % BLOCK_SIZE:
        raise ConfigError(
            f"{block} needs a 2-D weight with in_features a multiple of {BLOCK_SIZE}, got {tuple(w.shape)}"
        )


def quantize_q4_0(w: torch.Tensor, *, rows_per_chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (N, K) floating, K a multiple of 32 -> (``q`` (N, K/2) uint8 packed nibbles, ``scales`` (N, K/32)
    fp16), on CPU.

    ggml's ``quantize_row_q4_0_ref``, in fp32: per block of 32, ``m`` = the first value of largest |x|,
    ``d = m / -8``, ``id = 1/d`` (0 when d is 0), ``v = min(15, trunc(x * id + 8.5))``; byte j of the block's 16
    holds ``v[j] | v[j + 16] << 4``; ``scale = fp16(d)``. Rows are done ``rows_per_chunk`` at a time."""
    _check_2d(w, "q4_0")
    n, k = w.shape
    q = torch.empty((n, k // 2), dtype=torch.uint8)
    s = torch.empty((n, k // BLOCK_SIZE), dtype=torch.float16)
    half = BLOCK_SIZE // 2
    for r0 in range(0, n, rows_per_chunk):
        x = w[r0 : r0 + rows_per_chunk].detach().to(device="cpu", dtype=torch.float32)
        rows = x.shape[0]
        x = x.reshape(rows, -1, BLOCK_SIZE)
        m = torch.gather(x, -1, x.abs().argmax(dim=-1, keepdim=True))  # argmax: the first of equal maxima
        d = m / -8.0  # fp32, as ggml
        inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
        v = torch.trunc(x * inv + 8.5).clamp_(0, 15).to(torch.uint8)  # fp32 product, fp32 sum, truncation
        q[r0 : r0 + rows] = (v[..., :half] | (v[..., half:] << 4)).reshape(rows, k // 2)
        s[r0 : r0 + rows] = d.squeeze(-1).to(torch.float16)
    return q, s


def unpack_q4_0(q: torch.Tensor) -> torch.Tensor:
    """Packed (N, K/2) uint8 -> the values (N, K) int8 in -8..7 (the stored nibbles minus the offset 8)."""
    n = q.shape[0]
    b = q.reshape(n, -1, BLOCK_SIZE // 2)
    v = torch.cat((b & 0x0F, b >> 4), dim=-1).to(torch.int8) - 8
    return v.reshape(n, -1)


def dequantize_q4_0(
    q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``scales`` broadcast over their blocks times (value - 8), in fp32 (exact), then cast to ``dtype``."""
    n = q.shape[0]
    b = q.reshape(n, -1, BLOCK_SIZE // 2)
    w = torch.empty((n, b.shape[1], BLOCK_SIZE), dtype=torch.float32, device=q.device)
    w[..., : BLOCK_SIZE // 2] = b & 0x0F  # written straight into the fp32 buffer: no int8 intermediate
    w[..., BLOCK_SIZE // 2 :] = b >> 4
    w.sub_(8).mul_(scales.to(torch.float32).unsqueeze(-1))
    return w.reshape(n, -1).to(dtype)


# ----------------------------------------------------------------------------- q4_k (GGUF export)

QK_K = 256  # weights per q4_k super-block (8 sub-blocks of 32)
Q4_K_BLOCK_BYTES = 144  # fp16 d, fp16 dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes of nibbles
_F = np.float32


def _seq_sum(terms) -> np.ndarray:
    """The fp32 sum of ``terms`` (an iterable of same-shaped fp32 arrays) added left to right, one rounding
    per addition: the order of ggml's scalar C loops (a pairwise or vectorised sum would round differently)."""
    it = iter(terms)
    acc = np.array(next(it), dtype=_F, copy=True)
    for t in it:
        acc += t
    return acc


def _round_clip(v: np.ndarray, hi: int) -> np.ndarray:
    """ggml's ``MAX(0, MIN(hi, nearest_int(v)))``: round half to even in fp32, then clamped (fp32 values)."""
    return np.clip(np.rint(v), 0, hi).astype(_F)


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's ``make_qkx2_quants(32, 15, x, w, L, &the_min, Laux, -1, 0.1, 20, false)`` for every column of
    ``x`` / ``w`` ((32, M) fp32: one sub-block per column) at once -> (scale (M,), the_min (M,), L (32, M)).

    A weighted least-squares fit of ``x ≈ scale * L + min`` (min ≤ 0, L in 0..15): the first guess from the
    range, then 21 trial inverse scales ``(-1 + 0.1 * is + 15) / (max - min)``, each refit in closed form and
    kept when its weighted squared error is strictly smaller (and its min used by the later trials, as C
    updates ``min`` in place). All arithmetic in fp32 in C's order."""
    n = x.shape[0]
    mn = np.minimum(x.min(axis=0), _F(0))
    mx = x.max(axis=0)
    sum_w = _seq_sum(w[i] for i in range(n))
    sum_x = _seq_sum(w[i] * x[i] for i in range(n))
    flat = mx == mn
    rng = np.where(flat, _F(1), mx - mn)
    xm = x - mn
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = _F(15) / rng
        scale = _F(1) / iscale
        lq = _round_clip(iscale * xm, 15)
        best = _seq_sum(w[i] * np.square(scale * lq[i] + mn - x[i]) for i in range(n))
        mn = mn.copy()
        for step in range(21):  # C updates `min` as it goes: later steps use the best fit's min so far
            isc = (_F(-1) + _F(0.1) * _F(step) + _F(15)) / np.where(flat, _F(1), mx - mn)
            la = _round_clip(isc * (x - mn), 15)
            wl = w * la
            sum_l = _seq_sum(wl[i] for i in range(n))
            sum_l2 = _seq_sum(wl[i] * la[i] for i in range(n))
            sum_xl = _seq_sum(wl[i] * x[i] for i in range(n))
            det = sum_w * sum_l2 - sum_l * sum_l
            ok = (det > 0) & ~flat
            dd = np.where(ok, det, _F(1))
            t_scale = (sum_w * sum_xl - sum_x * sum_l) / dd
            t_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd
            pos = t_min > 0
            t_scale = np.where(pos, sum_xl / np.where(ok, sum_l2, _F(1)), t_scale)
            t_min = np.where(pos, _F(0), t_min)
            mad = _seq_sum(w[i] * np.square(t_scale * la[i] + t_min - x[i]) for i in range(n))
            better = ok & (mad < best)
            lq = np.where(better, la, lq)
            best = np.where(better, mad, best)
            scale = np.where(better, t_scale, scale)
            mn = np.where(better, t_min, mn)
    scale = np.where(flat, _F(0), scale).astype(_F)
    lq = np.where(flat, _F(0), lq)
    return scale, (-mn).astype(_F), lq


def _q4_k_superblocks(x: np.ndarray) -> np.ndarray:
    """``x`` (S, 256) fp32 -> (S, 144) uint8: ggml's ``quantize_row_q4_K_ref``, one super-block per row."""
    s = x.shape[0]
    sub = np.ascontiguousarray(x.reshape(s * 8, 32).T)  # (32, M): one sub-block per column
    with np.errstate(over="ignore", invalid="ignore"):
        av = np.sqrt(_seq_sum(sub[i] * sub[i] for i in range(32)) / _F(32))
        wts = av + np.abs(sub)
        scales, mins, lq = _make_qkx2_quants(sub, wts)
        scales, mins = scales.reshape(s, 8), mins.reshape(s, 8)
        lq = lq.T.reshape(s, 8, 32)
        max_scale = np.maximum(scales.max(axis=1), _F(0))
        max_min = np.maximum(mins.max(axis=1), _F(0))
        inv_s = np.where(max_scale > 0, _F(63) / np.where(max_scale > 0, max_scale, _F(1)), _F(0))
        inv_m = np.where(max_min > 0, _F(63) / np.where(max_min > 0, max_min, _F(1)), _F(0))
        # uint8_t ls = nearest_int(...): a negative value wraps, then MIN(63, ls)
        ls = np.minimum(np.rint(inv_s[:, None] * scales).astype(np.int64) & 0xFF, 63).astype(np.uint8)
        lm = np.minimum(np.rint(inv_m[:, None] * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)
        d16 = (max_scale / _F(63)).astype(np.float16)
        m16 = (max_min / _F(63)).astype(np.float16)
        d = d16.astype(_F)[:, None] * ls.astype(_F)  # (S, 8): exact
        dm = m16.astype(_F)[:, None] * lm.astype(_F)
        live = d != 0  # a sub-block whose scale is 0 keeps make_qkx2_quants' values (ggml's `continue`)
        v = (x.reshape(s, 8, 32) + dm[..., None]) / np.where(live, d, _F(1))[..., None]
        lq = np.where(live[..., None], _round_clip(v, 15), lq).astype(np.uint8).reshape(s, 4, 2, 32)
    packed = np.empty((s, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0x0F) | ((lm[:, 4:8] & 0x0F) << 4)
    qs = (lq[:, :, 0, :] | (lq[:, :, 1, :] << 4)).reshape(s, 128)
    return np.concatenate(
        [d16.reshape(s, 1).view(np.uint8), m16.reshape(s, 1).view(np.uint8), packed, qs], axis=1
    )


def quantize_q4_k(w: torch.Tensor, *, rows_per_chunk: int = 256) -> torch.Tensor:
    """``w`` (N, K) floating, K a multiple of 256 -> (N, K/256 * 144) uint8: each row as ggml's ``block_q4_K``
    s, byte for byte ``quantize_row_q4_K_ref`` (no importance matrix).

    Per super-block of 256 weights, 8 sub-blocks of 32: each sub-block is fitted as ``scale * L - min``
    (L in 0..15) by ggml's ``make_qkx2_quants`` with weights ``sqrt(mean(x²)) + |x|``; the 8 scales and 8 mins
    are quantised to 6 bits against ``d = max scale / 63`` and ``dmin = max min / 63`` (stored fp16), and the
    values requantised with those: ``L = clamp(round((x + dmin * m) / (d * sc)), 0, 15)``. Layout of the 144
    bytes: ``d``, ``dmin`` (fp16), ``scales[12]`` (sub-blocks 0..3: scale and min in the low 6 bits of bytes
    j and j + 4; 4..7: low nibbles in byte j + 4 (scale low, min high), top 2 bits in bytes j - 4 and j), then
    ``qs[128]``: for each 64 weights, 32 bytes holding weight l (low nibble) and l + 32 (high nibble). Rows
    are done ``rows_per_chunk`` at a time (numpy, fp32 in ggml's order of operations)."""
    if w.dim() != 2 or w.shape[1] % QK_K:
        raise ConfigError(f"q4_k needs a 2-D weight with in_features a multiple of {QK_K}, got {tuple(w.shape)}")
    n, k = w.shape
    out = np.empty((n, k // QK_K * Q4_K_BLOCK_BYTES), dtype=np.uint8)
    for r0 in range(0, n, rows_per_chunk):
        x = w[r0 : r0 + rows_per_chunk].detach().to(device="cpu", dtype=torch.float32).numpy()
        rows = x.shape[0]
        out[r0 : r0 + rows] = _q4_k_superblocks(x.reshape(-1, QK_K)).reshape(rows, -1)
    return torch.from_numpy(out)


def q4_k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of each super-block (..., 12) uint8 -> (sc, m) (..., 8): ggml's ``get_scale_min_k4``
    for j = 0..7."""
    lo, mid, hi = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = torch.cat((lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)), dim=-1)
    m = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=-1)
    return sc, m


def dequantize_q4_k(blocks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K/256 * 144) uint8 ``block_q4_K`` rows -> (N, K) weights, ``d * sc * L - dmin * m`` in fp32 (the
    products are exact, one rounding for the difference, as ggml's ``dequantize_row_q4_K``), cast to
    ``dtype``."""
    n = blocks.shape[0]
    b = blocks.reshape(-1, Q4_K_BLOCK_BYTES)
    d = b[:, 0:2].contiguous().view(torch.float16).to(torch.float32)  # (S, 1)
    dmin = b[:, 2:4].contiguous().view(torch.float16).to(torch.float32)
    sc, m = q4_k_scale_min(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 1, 32)
    lq = torch.cat((qs & 0x0F, qs >> 4), dim=2).reshape(-1, 8, 32).to(torch.float32)
    scale = (d * sc.to(torch.float32)).unsqueeze(-1)
    low = (dmin * m.to(torch.float32)).unsqueeze(-1)
    return (scale * lq - low).reshape(n, -1).to(dtype)


_QUANTIZE = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0}
_DEQUANTIZE = {"q8_0": dequantize_q8_0, "q4_0": dequantize_q4_0}


def quantize_weight(w: torch.Tensor, block: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` as ``block`` (``q8_0`` / ``q4_0``): (values, scales) as :class:`QuantLinear` stores them."""
    return _QUANTIZE[block](w)


def dequantize_weight(
    q: torch.Tensor, scales: torch.Tensor, block: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return _DEQUANTIZE[block](q, scales, dtype)


def weight_q_shape(block: str, out_features: int, in_features: int) -> tuple[tuple[int, int], torch.dtype]:
    """The shape and dtype of a QuantLinear's ``weight_q`` for ``block``."""
    if block == "q4_0":
        return (out_features, in_features // 2), torch.uint8
    return (out_features, in_features), torch.int8


# ----------------------------------------------------------------------------- the module


_LINEAR_KERNEL: contextvars.ContextVar = contextvars.ContextVar("mptkit_quant_linear_kernel", default=None)


@contextlib.contextmanager
def linear_kernel(fn: Callable[[QuantLinear, torch.Tensor], torch.Tensor | None] | None) -> Iterator[None]:
    """Within this context (this thread / task), every :class:`QuantLinear`'s forward first offers its input,
    as 2-D rows, to ``fn(module, x)``: a tensor (rows, out_features) is the output, None leaves it to the torch
    dequantise-then-matmul. ``mptkit.infer``'s prefill runs under the decode step's kernels this way, so a
    prompt and the tokens after it see the same arithmetic (``fn`` None: no change)."""
    token = _LINEAR_KERNEL.set(fn)
    try:
        yield
    finally:
        _LINEAR_KERNEL.reset(token)


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held as ``q8_0`` or ``q4_0`` blocks (``block``): buffers ``weight_q``
    ((out, in) int8 for q8_0, (out, in/2) uint8 packed nibbles for q4_0) and ``scales`` (out, in/32) fp16,
    ``bias`` an fp32 parameter or None. Inference only (no gradient to the weight).

    ``forward`` dequantises at most ~1M weights at a time into a transient buffer of ``x``'s dtype and runs
    ``F.linear`` on that slice of output rows: exact dequantise-then-matmul on any device, no fp32 copy of the
    whole weight kept (this is also the prefill's path). Dtype casts of the model (``.half()``,
    ``.to(torch.bfloat16)``) keep the scales fp16 (:meth:`_apply`); the forward reads any float scales, the
    compiled decode kernel only fp16 ones (it falls back to this forward otherwise)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device=None,
        block_size: int = BLOCK_SIZE,
        block: str = "q8_0",
    ):
        super().__init__()
        if block_size != BLOCK_SIZE:
            raise ConfigError(f"QuantLinear: only blocks of {BLOCK_SIZE} are implemented, got {block_size}")
        if block not in BLOCK_TYPES:
            raise ConfigError(f"QuantLinear: block {block!r} is not one of {', '.join(BLOCK_TYPES)}")
        if in_features % BLOCK_SIZE:
            raise ConfigError(
                f"QuantLinear: in_features {in_features} is not a multiple of the block size {BLOCK_SIZE}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.block = block
        shape, dt = weight_q_shape(block, out_features, in_features)
        self.register_buffer("weight_q", torch.empty(shape, dtype=dt, device=device))
        self.register_buffer(
            "scales",
            torch.empty((out_features, in_features // BLOCK_SIZE), dtype=torch.float16, device=device),
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_weight(cls, w: torch.Tensor, block: str = "q8_0") -> QuantLinear:
        """A bias-free ``block`` linear of the (out, in) weight ``w`` (e.g. the tied LM head from ``wte``)."""
        m = cls(w.shape[1], w.shape[0], bias=False, device="meta", block=block)
        q, s = quantize_weight(w.detach(), block)
        m.weight_q = q.to(w.device)
        m.scales = s.to(w.device)
        return m

    @classmethod
    def from_linear(cls, lin: nn.Linear, block: str = "q8_0") -> QuantLinear:
        """The ``block`` form of ``lin`` (its bias copied as fp32), on ``lin``'s device."""
        w = lin.weight
        m = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta", block=block)
        q, s = quantize_weight(w, block)
        m.weight_q = q.to(w.device)
        m.scales = s.to(w.device)
        if lin.bias is not None:
            m.bias = nn.Parameter(lin.bias.detach().to(torch.float32).clone(), requires_grad=False)
        return m

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)`` moves the buffers; a dtype cast (``model.half()``, ``.to(torch.bfloat16)``) leaves
        the scales fp16 — the format's type — and the integer values as they are (the bias follows the cast)."""
        scales = self._buffers["scales"]
        out = super()._apply(fn, recurse)
        new = self._buffers["scales"]
        if new is not None and new.dtype != torch.float16:
            self._buffers["scales"] = scales.to(device=new.device)
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight as a new (out, in) tensor (for tests and exports; the forward never makes one)."""
        return dequantize_weight(self.weight_q, self.scales, self.block, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _LINEAR_KERNEL.get()
        if kernel is not None:
            y = kernel(self, x.reshape(-1, self.in_features))
            if y is not None:
                return y.reshape(*x.shape[:-1], self.out_features)
        dt = x.dtype if x.is_floating_point() else torch.float32
        rows = max(1, _CHUNK_ELEMS // max(1, self.in_features))
        n = self.out_features
        b = self.bias
        deq = _DEQUANTIZE[self.block]
        if n <= rows:
            return F.linear(x, deq(self.weight_q, self.scales, dt), None if b is None else b.to(dt))
        out = x.new_empty((*x.shape[:-1], n), dtype=dt)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            w = deq(self.weight_q[r0:r1], self.scales[r0:r1], dt)
            out[..., r0:r1] = F.linear(x, w, None if b is None else b[r0:r1].to(dt))
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self.block}"
        )


# ----------------------------------------------------------------------------- the model


@dataclass
class QuantReport:
    """What :func:`quantize_model` did: ``quantized`` module names, ``kept`` name -> why it stayed fp32."""

    quant: str
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    head: str | None = None  # the tied LM head's block format (its q8_0 copy in ``quant_head``), or None

    def config_entry(self) -> dict:
        """The ``quantization`` entry of config.json."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "type": self.quant,
            "block": QUANT_TYPES[self.quant],
            "block_size": BLOCK_SIZE,
            "quantized": list(self.quantized),
            "kept": dict(self.kept),
            "head": self.head,
        }


def plan_quantization(model: nn.Module, quant: str = "int8", *, head: bool = True) -> QuantReport:
    """Which block Linears :func:`quantize_model` would quantise as ``quant`` and which it keeps fp32 (and
    why); ``head``: also the tied LM head (a q8_0 copy of ``wte``, the embedding itself kept fp32)."""
    rep = QuantReport(check_quant_type(quant))
    cfg = model.config
    if head and cfg.tie_word_embeddings and cfg.d_model % BLOCK_SIZE == 0:
        rep.head = HEAD_BLOCK
    elif head and cfg.tie_word_embeddings:
        rep.kept["lm_head"] = f"the tied head (transformer.wte): d_model {cfg.d_model} is not a multiple of {BLOCK_SIZE}"
    elif head:
        rep.kept["lm_head"] = "an untied LM head stays fp32 (only the tied head, MPT's, is quantised)"
    for i, blk in enumerate(model.transformer.blocks):
        for name, m in blk.named_modules():
            full = f"transformer.blocks.{i}.{name}"
            if type(m) is QuantLinear:
                rep.quantized.append(full)
            elif type(m) is nn.Linear:
                if m.in_features % BLOCK_SIZE:
                    rep.kept[full] = (
                        f"in_features {m.in_features} is not a multiple of the block size {BLOCK_SIZE}"
                    )
                else:
                    rep.quantized.append(full)
            elif isinstance(m, nn.Linear):
                rep.kept[full] = f"{type(m).__qualname__} is not exactly nn.Linear (its own forward is kept)"
    return rep


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def set_quantization_entry(model: nn.Module, entry: dict) -> None:
    """Record ``entry`` as the model's ``quantization`` config key (the config stays frozen: a new one is set
    on the model and its transformer, as ``set_attn_impl`` does)."""
    cfg = model.config.replace(**{CONFIG_KEY: entry}).freeze()
    for m in (model, model.transformer):
        m.__dict__["_config"] = cfg


def quantize_model(model: nn.Module, quant: str = "int8", *, head: bool = True) -> QuantReport:
    """Replace the block Linears of ``model`` (an ``MPTForCausalLM``) by :class:`QuantLinear` s of ``quant``'s
    blocks (``int8``: q8_0, ``q4``: q4_0) in place, one
    tensor at a time (each fp32 weight is freed as its quantised form takes its place); returns the report,
    also recorded in ``model.config`` under ``quantization``. ``head``: the tied LM head as a q8_0 copy of ``wte``
(``quant_head``); embeddings / an untied head / norms / biases stay fp32;
    Linears that do not fit the block size stay fp32, each named in a log line. Quantising a quantised model
    again changes nothing."""
    quant = check_quant_type(quant)
    block = QUANT_TYPES[quant]
    rep = plan_quantization(model, quant, head=head)
    if rep.head is not None and getattr(model, HEAD_MODULE, None) is None:
        setattr(model, HEAD_MODULE, QuantLinear.from_weight(model.transformer.wte.weight, rep.head))
    elif rep.head is None and getattr(model, HEAD_MODULE, None) is not None:
        rep.head = getattr(model, HEAD_MODULE).block  # quantised before: the copy stays
    for name in rep.quantized:
        m = model.get_submodule(name)
        if type(m) is QuantLinear and m.block != block:
            raise ConfigError(f"quantize_model: {name} is already {m.block}; quantise the fp32 model as {quant}")
    for name in rep.quantized:
        m = model.get_submodule(name)
        if type(m) is nn.Linear:
            replace_module(model, name, QuantLinear.from_linear(m, block))
    for name, why in rep.kept.items():
        log.info("quantisation: %s stays fp32 (%s)", name, why)
    set_quantization_entry(model, rep.config_entry())
    return rep


def quant_buffer_names(model: nn.Module) -> set[str]:
    """The state-dict names of every QuantLinear's ``weight_q`` / ``scales`` (their dtype is the format's:
    a loader must not cast them)."""
    out = set()
    for name, m in model.named_modules():  # (quant_head included: a module of the model)
        if type(m) is QuantLinear:
            out.update((f"{name}.weight_q", f"{name}.scales"))
    return out


__all__ = [
    "BLOCK_SIZE",
    "BLOCK_TYPES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HEAD_BLOCK",
    "HEAD_MODULE",
    "Q4_K_BLOCK_BYTES",
    "QK_K",
    "QUANT_ALIASES",
    "QUANT_TYPES",
    "QuantLinear",
    "QuantReport",
    "check_quant_type",
    "dequantize_q4_0",
    "dequantize_q4_k",
    "dequantize_q8_0",
    "dequantize_weight",
    "linear_kernel",
    "plan_quantization",
    "q4_k_scale_min",
    "quant_buffer_names",
    "quantize_model",
    "quantize_q4_0",
    "quantize_q4_k",
    "quantize_q8_0",
    "quantize_weight",
    "unpack_q4_0",
    "weight_q_shape",
]
