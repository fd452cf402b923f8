"""The quantised linears of the decode step: ``x @ W.T (+ b)`` reading a :class:`~mptkit.model.quant.QuantLinear`'s
q8_0 int8 values or q4_0 packed nibbles and its fp16 scales directly (``csrc/quant_kernels.c``), never an fp32
copy of the weight.

:func:`q8_kernels` returns a :class:`Q8Kernels` (compiled on first use like ``mptkit.infer.kernels``: the
machine's C compiler, ``-O3 -march=native``, OpenMP linked against torch's runtime, cached under
``$MPTKIT_CACHE_DIR``, checked against the torch reference before use) or ``None`` (no C compiler, a failed
build or self-test, switched off by ``DecodeOptions.cpu_kernels``). The C file has an AVX-512F path, an
AVX2 + FMA path and a plain C one, chosen by what ``-march=native`` enables; unlike the fp32 kernels it is not
limited to x86-64 (on ARM the plain C path is compiled, vectorised as far as the compiler does).

:func:`q8_linear_fn` is what the fast decoder uses for one QuantLinear: the kernel for batches up to
``small_rows`` rows, else (and wherever the kernel is missing) :func:`torch_q8_linear`, which dequantises a
few output rows at a time and multiplies in torch (the module's own forward: exact, on any device).
"""

from __future__ import annotations

import copy
import ctypes
import logging
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from mptkit.infer.kernels import FLAGS, load_kernel
from mptkit.model.quant import BLOCK_SIZE, QuantLinear, dequantize_weight, quantize_weight, weight_q_shape

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "quant_kernels.c"
_lock = threading.Lock()
_cached: dict[tuple, Q8Kernels | None] = {}


_QDTYPE_BLOCK = {torch.int8: "q8_0", torch.uint8: "q4_0"}  # weight_q's dtype -> its block format


class Q8Kernels:
    """``linear(x, q, scales, b=None)``: x (M, K) fp32, q (N, K) int8 (q8_0) or (N, K/2) uint8 (q4_0), scales
    (N, K/32) fp16, b (N,) fp32."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        P, L = ctypes.c_void_p, ctypes.c_long
        self._fns = {}
        for block, name in (("q8_0", "mptkit_q8_linear"), ("q4_0", "mptkit_q4_linear")):
            f = getattr(lib, name)
            f.restype = ctypes.c_int
            f.argtypes = [P] * 5 + [L] * 3 + [ctypes.c_int]
            self._fns[block] = f
        self._fn = self._fns["q8_0"]
        # the addresses of the linears for csrc/cpu_kernels.c's whole-block decode (its mptkit_qlinear pointer)
        self._addr = {(blk, i): ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                      for (blk, i), name in {("q8_0", False): "mptkit_q8_linear", ("q4_0", False): "mptkit_q4_linear",
                                             ("q8_0", True): "mptkit_q8i_linear",
                                             ("q4_0", True): "mptkit_q4i_linear"}.items()}
        self._qi = lib.mptkit_qi_linear
        self._qi.restype = ctypes.c_int
        self._qi.argtypes = [ctypes.c_int] + [P] * 7 + [L] * 3 + [ctypes.c_int]
        self.int_vectorised = bool(lib.mptkit_qi_vectorised())
        self.int_dot = False  # this object's linears: the exact fp32 path (integer_variant(): the integer one)
        self.vector_width = int(lib.mptkit_q8_vector_width())
        self._h2f = lib.mptkit_q8_half_to_float
        self._h2f.restype = ctypes.c_float
        self._h2f.argtypes = [ctypes.c_uint16]

    @staticmethod
    def supports(m: QuantLinear) -> bool:
        """Whether the kernel can read ``m``'s tensors as they are now (CPU, contiguous, fp16 scales)."""
        if m.block not in ("q8_0", "q4_0"):
            return False
        shape, dt = weight_q_shape(m.block, m.out_features, m.in_features)
        return (
            m.weight_q.is_cpu
            and m.weight_q.dtype == dt
            and tuple(m.weight_q.shape) == shape
            and m.weight_q.is_contiguous()
            and m.scales.dtype == torch.float16
            and m.scales.is_contiguous()
            and m.scales.is_cpu
            and m.in_features % BLOCK_SIZE == 0
            and tuple(m.scales.shape) == (m.out_features, m.in_features // BLOCK_SIZE)
            and (
                m.bias is None or (m.bias.dtype == torch.float32 and m.bias.is_cpu and m.bias.is_contiguous())
            )
        )

    def linear(
        self, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x @ dequantize(q, scales).T (+ b)`` (the block format by ``q``'s dtype: int8 q8_0, uint8 q4_0),
        checked on every call (cheap: the module's tensors may have been moved or cast since the decoder was
        built)."""
        block = _QDTYPE_BLOCK.get(q.dtype)
        n, k = (q.shape[0], q.shape[1] * (2 if block == "q4_0" else 1)) if q.dim() == 2 else (0, 0)
        ok = (
            block is not None
            and q.dim() == 2
            and q.is_cpu
            and q.is_contiguous()
            and k % BLOCK_SIZE == 0
            and scales.dtype == torch.float16
            and scales.is_cpu
            and scales.is_contiguous()
            and tuple(scales.shape) == (n, k // BLOCK_SIZE)
            and (
                b is None or (b.dtype == torch.float32 and b.is_cpu and b.is_contiguous() and b.shape == (n,))
            )
        )
        if not ok:
            raise ValueError(
                f"quantised linear: q {tuple(q.shape)} {q.dtype}, scales {tuple(scales.shape)} {scales.dtype} "
                "must be contiguous int8 (q8_0) or uint8 (q4_0) / fp16 CPU tensors of one matrix (was the "
                "model moved or cast after the decoder was built?)"
            )
        if x.dtype != torch.float32 or not x.is_cpu or x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"quantised linear: x {tuple(x.shape)} {x.dtype} does not match a ({n}, {k}) {block}")
        x = x.contiguous()
        m = x.shape[0]
        y = torch.empty((m, n), dtype=torch.float32)
        if m == 0:
            return y
        rc = self._fns[block](
            x.data_ptr(),
            q.data_ptr(),
            scales.data_ptr(),
            0 if b is None else b.data_ptr(),
            y.data_ptr(),
            m,
            n,
            k,
            torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"{block} linear failed (rc={rc}) for x {tuple(x.shape)}, q {tuple(q.shape)}")
        return y

    def linear_address(self, block: str) -> int:
        """The C address of ``block``'s linear (the integer one when ``int_dot``), with the signature of
        ``mptkit_qlinear`` in csrc/cpu_kernels.c: the whole-block decode kernel calls it for a quantised block."""
        return self._addr[(block, self.int_dot)]

    def integer_variant(self) -> Q8Kernels:
        """The same library with ``int_dot`` on: :func:`q8_linear_fn` then gives the integer path."""
        other = copy.copy(self)
        other.int_dot = True
        return other

    def int_linear(
        self, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, b: torch.Tensor | None = None
    ) -> torch.Tensor:
        """llama.cpp's arithmetic: ``x``'s rows rounded to q8_0 blocks (fp32 scale per 32 values, int8 values),
        each block's dot product with the weight's block in integers, scaled by both scales and summed in fp32.
        The same checks as :meth:`linear`."""
        self.linear(x[:0], q, scales, b)  # the checks (no work for 0 rows)
        return self._int_run(_QDTYPE_BLOCK[q.dtype], x.contiguous(), q, scales, b)

    def _int_run(self, block, x, q, scales, b, nthreads=None):
        m, k = x.shape
        n = scales.shape[0]
        y = torch.empty((m, n), dtype=torch.float32)
        if m == 0:
            return y
        xq = torch.empty((m, k), dtype=torch.int8)
        xd = torch.empty((m, k // BLOCK_SIZE), dtype=torch.float32)
        rc = self._qi(
            0 if block == "q8_0" else 1, x.data_ptr(), q.data_ptr(), scales.data_ptr(),
            0 if b is None else b.data_ptr(), y.data_ptr(), xq.data_ptr(), xd.data_ptr(), m, n, k,
            torch.get_num_threads() if nthreads is None else nthreads,
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"{block} integer linear failed (rc={rc}) for x {tuple(x.shape)}")
        return y

    def half_to_float(self, bits: int) -> float:
        return float(self._h2f(bits))


def torch_q8_linear(m: QuantLinear) -> Callable[[torch.Tensor], torch.Tensor]:
    """The exact torch fallback for ``m``: its own forward (a few output rows dequantised at a time)."""
    return m.forward


def q8_linear_fn(
    m: QuantLinear, kernels: Q8Kernels | None, small_rows: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``m(x)`` for 2-D ``x``: the compiled kernel for up to ``small_rows`` rows when it can read ``m``'s
    tensors (``kernels.int_dot``: the integer path, activations rounded to q8_0 blocks), else the torch
    fallback.

    The decode step calls this once per linear per token, so the checks are kept short: the module's tensors
    are read from its buffer/parameter tables on every call (``model.float()`` or ``.to()`` replace them) and
    fully checked (:meth:`Q8Kernels.linear`) whenever their storage differs from the last checked one; ``x``
    is checked on every call (dtype, device, width: what the C code indexes)."""
    fallback = torch_q8_linear(m)
    if kernels is None or not kernels.supports(m):
        return fallback
    bufs, params = m._buffers, m._parameters
    fn, lin = kernels._fns[m.block], kernels.linear
    n, k = m.out_features, m.in_features
    seen = [None]  # the (q, scales, bias) data pointers last checked
    int_dot = kernels.int_dot
    f32, empty, nthreads = torch.float32, torch.empty, torch.get_num_threads

    def run(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows > small_rows and not int_dot:  # (the integer path: its kernel for any number of rows)
            return fallback(x)
        q, sc, b = bufs["weight_q"], bufs["scales"], params["bias"]
        ptrs = (q.data_ptr(), sc.data_ptr(), 0 if b is None else b.data_ptr())
        if ptrs != seen[0] or x.dtype is not f32 or x.dim() != 2 or x.shape[1] != k or not x.is_cpu:
            if not kernels.supports(m):  # cast or moved since: the exact fallback
                return fallback(x)
            y = kernels.int_linear(x, q, sc, b) if int_dot else lin(x, q, sc, b)  # the full checks
            seen[0] = ptrs
            return y
        if not x.is_contiguous():
            x = x.contiguous()
        if int_dot:
            return kernels._int_run(m.block, x, q, sc, b, nthreads())
        y = empty((rows, n), dtype=f32)
        if rows and fn(x.data_ptr(), ptrs[0], ptrs[1], ptrs[2], y.data_ptr(), rows, n, k, nthreads()) != 0:
            raise RuntimeError(f"{m.block} linear failed for x {tuple(x.shape)}, q ({n}, {k})")
        return y

    return run


def module_kernel(
    kernels: Q8Kernels, small_rows: int
) -> Callable[[QuantLinear, torch.Tensor], torch.Tensor | None]:
    """The function :func:`mptkit.model.quant.linear_kernel` takes: a QuantLinear's input rows through
    ``kernels`` — the integer path (``int_dot``) for any number of rows (llama.cpp rounds a prompt's
    activations too, and the kernel's cost per row falls with more rows), the exact fp32 path up to
    ``small_rows`` rows (beyond, torch's dequantise-then-matmul is the faster exact one) — else None: gradients
    on, not fp32 CPU rows, or a module the kernel cannot read (its own forward then)."""

    def run(m: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
        if torch.is_grad_enabled() or x.dtype != torch.float32 or not x.is_cpu or not kernels.supports(m):
            return None
        if kernels.int_dot:
            return kernels.int_linear(x, m.weight_q, m.scales, m.bias)
        if x.shape[0] <= small_rows:
            return kernels.linear(x, m.weight_q, m.scales, m.bias)
        return None

    return run


def decode_arithmetic(model, options=None):
    """The context in which ``model``'s own forward computes what its generation computes: a quantised model's
    linears through the decode step's kernels (``options``: a :class:`~mptkit.infer.options.DecodeOptions`,
    default the environment's — the integer path unless ``MPTKIT_QUANT_INT_DOT=0``). Evaluation scores a
    quantised model under it, so its perplexity is that of the arithmetic ``generate`` / ``serve`` run. A
    model without QuantLinears, kernels switched off or not built: no change (the exact torch forward)."""
    import contextlib

    from mptkit.infer.options import DecodeOptions
    from mptkit.model.quant import linear_kernel

    if not any(type(m) is QuantLinear for m in model.modules()):
        return contextlib.nullcontext()
    options = options or DecodeOptions()
    k = q8_kernels(enabled=options.cpu_kernels)
    if k is None:
        return contextlib.nullcontext()
    return linear_kernel(module_kernel(k.integer_variant() if options.quant_int_dot else k, options.small_rows))


def round_activations_q8(x: torch.Tensor) -> torch.Tensor:
    """``x``'s rows as the integer path sees them: per block of 32, ``d = max|x| / 127`` (fp32), values
    ``roundf(x * (1/d))`` (ties away from zero), times ``d``."""
    b = x.to(torch.float32).reshape(x.shape[0], -1, BLOCK_SIZE)
    d = b.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    v = b * inv
    r = torch.sign(v) * torch.floor(v.abs() + 0.5)
    return (r * d).reshape(x.shape)


def int_dot_reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """What the integer path computes, up to fp32 summation order: the rounded activations times the
    dequantised weight (``w``)."""
    y = (round_activations_q8(x).double() @ w.double().t()).float()
    return y if b is None else y + b


def _self_test(k: Q8Kernels) -> None:
    """Shapes with odd N, K = 32 and K not a multiple of the 64-row task, M across the row-group sizes,
    zero blocks, with and without bias, against dequantise-then-matmul."""
    g = torch.Generator().manual_seed(0)
    for block in ("q8_0", "q4_0"):
        for m, n, kk in ((1, 67, 32), (3, 130, 96), (7, 64, 512), (16, 9, 160)):
            w = torch.randn(n, kk, generator=g)
            w[0, :32] = 0
            q, s = quantize_weight(w, block)
            x = torch.randn(m, kk, generator=g)
            b = torch.randn(n, generator=g)
            ref_w = dequantize_weight(q, s, block)
            for bias in (None, b):
                ref = x @ ref_w.t() if bias is None else torch.addmm(bias, x, ref_w.t())
                got = k.linear(x, q, s, bias)
                if not torch.allclose(got, ref, rtol=1e-4, atol=1e-4):
                    err = (got - ref).abs().max().item()
                    raise RuntimeError(
                        f"{block} self-test failed for M={m} N={n} K={kk}: max abs error {err:.3g}"
                    )
    for block in ("q8_0", "q4_0"):  # the integer path against its own arithmetic, done in torch
        w, x = torch.randn(70, 96, generator=g), torch.randn(3, 96, generator=g)
        q, s = quantize_weight(w, block)
        ref = int_dot_reference(x, dequantize_weight(q, s, block))
        if not torch.allclose(k.int_linear(x, q, s), ref, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"{block} integer-path self-test failed")
    for bits in (0x0000, 0x0001, 0x03FF, 0x3C00, 0xC000, 0x7BFF, 0x1234):
        want = struct.unpack("<e", struct.pack("<H", bits))[0]
        if k.half_to_float(bits) != want:
            raise RuntimeError(f"q8 self-test failed for fp16 0x{bits:04x}")


def q8_kernels(
    *, enabled: bool = True, flags: tuple[str, ...] = FLAGS, cc: str | None = None
) -> Q8Kernels | None:
    """The compiled q8_0 / q4_0 kernels, or None (the reason logged once; ``enabled`` False: None at once).
    Thread-safe; built once per process and flag set."""
    if not enabled:
        return None
    return load_kernel("q8 kernel", SOURCE, Q8Kernels, _self_test, "the torch fallback (exact, slower)",
                       cache=_cached, lock=_lock, flags=flags, cc=cc)


__all__ = ["Q8Kernels", "decode_arithmetic", "module_kernel", "q8_kernels", "q8_linear_fn", "torch_q8_linear"]
