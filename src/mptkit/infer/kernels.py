"""CPU kernels of our own for the decode step, compiled on first use with the machine's C compiler.

``cpu_kernels()`` returns a :class:`CpuKernels`, fp32 on CPU —

* ``linear(x, w, b)``: ``y = x @ w.T (+ b)`` for the few rows a decode step has (one per sequence);
* ``decode_attention(...)``: one decode step of attention for every cache slot, cache write included —

or ``None`` where they cannot be had: not x86-64 with AVX-512F or AVX2+FMA, no C compiler, a failed build or
self-test, or switched off (``DecodeOptions.cpu_kernels``, default from ``MPTKIT_CPU_KERNELS``). The decoder
then keeps ``torch.mm`` and the batched-matmul attention; results agree to float rounding either way.

Which blocks the kernels may compute is decided by :func:`mptkit.model.fastpath.block_coverage` (the same
predicate as the decoder's); :class:`BlockWeights` adds the checks on the tensors (fp32, CPU, contiguous).

Why: at decode time the linear layers stream every weight once per step, and a batch of 8 sequences should
cost little more than one. MKL's fp32 GEMM at M=8 costs well above its M=1 time (its blocking is
made for large M); ``csrc/cpu_kernels.c`` walks each weight row once for all rows of ``x`` with software
prefetch (figures: bench/results/inference.md).

The shared library is built with ``-O3 -march=native`` (it only ever runs where it was built), linked against
the OpenMP runtime torch itself loaded (one thread pool, not two), written atomically into
``$MPTKIT_CACHE_DIR`` (default ``~/.cache/mptkit``) under a name that hashes the source, the flags, the
compiler and the CPU, and checked against ``torch.mm`` before it is used.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.c"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno")
KERNEL_KV_DTYPES = (torch.float32, torch.float16)  # cache storage types the attention kernels read
_lock = threading.Lock()
_cached: dict[tuple, CpuKernels | None] = {}


class CpuKernels:
    """The compiled kernels: ``linear(x, w, b=None)`` and ``decode_attention(...)``, fp32 on CPU."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        self._fn = lib.mptkit_smallgemm
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
        self.vector_width = lib.mptkit_smallgemm_vector_width()
        self.has_f16 = bool(lib.mptkit_has_f16())  # fp16 KV caches supported (F16C / AVX-512)
        self._attn = lib.mptkit_decode_attention
        self._attn.restype = ctypes.c_int
        self._attn.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int]
                               + [ctypes.c_void_p] + [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 2
                               + [ctypes.c_long] * 5 + [ctypes.c_void_p, ctypes.c_float, ctypes.c_int])

        self._block = lib.mptkit_decode_block
        self._block.restype = ctypes.c_int
        P, L, F = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
        self._block.argtypes = [P, L, L, P, P, F, P, P, F, P, P, ctypes.c_int, P, P, L, L, L, L, L, P, F, P, P, P, P, F,
                                P, P, L, P, P, P, ctypes.c_int]
        self._gelu = lib.mptkit_gelu
        self._gelu.restype = None
        self._gelu.argtypes = [P, L]
        self._layers = lib.mptkit_decode_layers
        self._layers.restype = ctypes.c_int
        self._layers.argtypes = [P, L, L, P, L, ctypes.c_int, P, L, L, L, L, P, P, ctypes.c_int]

    def supports(self, w: torch.Tensor) -> bool:
        return _f32cpu(w, contiguous=True) and w.dim() == 2

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ w.T (+ b)``: x (M, K), w (N, K) contiguous, b (N,). Checked on every call (cheap): weights
        captured once may since have been moved or cast (``model.half()``)."""
        if not _f32cpu(w, contiguous=True) or w.dim() != 2 or (b is not None and (
                not _f32cpu(b, contiguous=True) or b.shape != (w.shape[0],))):
            raise ValueError(f"linear: w {tuple(w.shape)} {w.dtype} {w.device} (and its bias) must be a contiguous "
                             "fp32 CPU matrix (was the model moved or cast after the decoder was built?)")
        if not _f32cpu(x) or x.dim() != 2 or x.shape[1] != w.shape[1]:
            raise ValueError(f"linear: x {tuple(x.shape)} {x.dtype} does not match w {tuple(w.shape)}")
        x = x.contiguous()
        m, n, k = x.shape[0], w.shape[0], w.shape[1]
        y = torch.empty((m, n), dtype=torch.float32)
        if m == 0:
            return y
        rc = self._fn(x.data_ptr(), w.data_ptr(), 0 if b is None else b.data_ptr(), y.data_ptr(), m, n, k,
                      torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"linear failed (rc={rc}) for x {tuple(x.shape)}, w {tuple(w.shape)}")
        return y

    def decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor,
                         vc: torch.Tensor, pos: torch.Tensor, top: int, slopes: torch.Tensor | None,
                         scale: float, kmax: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step of attention for ``n`` slots, writing the new keys/values into the cache first.

        ``q`` (n, H*D), ``k``/``v`` (n, Hkv*D) fp32 rows (each with unit column stride; column slices of the
        fused QKV output are fine); ``kc``/``vc`` one layer of the cache, (slots, Hkv, cap, D) contiguous, fp32
        or fp16 (stored rounded to fp16, read back to fp32: the compute stays fp32);
        ``pos`` (n,) int64, each slot's length before this token (-1: an idle slot, neither written nor read,
        its output rows zero), ``top`` = max(pos) + 1; ``slopes`` (H,) fp32
        for ALiBi or None. ``kmax``: (slots, Hkv) fp32, a bound on the norm of every key stored per slot and kv
        head (the new keys raise it): with ALiBi, keys it proves to get weight exactly 0 are not read (the
        result is bitwise the same); None reads every key. Returns (n, H*D)."""
        n, hkv, cap, d = q.shape[0], kc.shape[1], kc.shape[2], kc.shape[3]
        h = q.shape[1] // d
        _check_attention_args(q, k, v, kc, vc, pos, slopes, n, h, hkv, d, kmax)
        out = torch.empty((n, h * d), dtype=torch.float32)
        scratch = torch.empty((n * h * top,), dtype=torch.float32)
        rc = self._attn(q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), k.stride(0), v.stride(0),
                        kc.data_ptr(), vc.data_ptr(), int(kc.dtype == torch.float16), _ptr(kmax),
                        pos.data_ptr(), top, out.data_ptr(), scratch.data_ptr(), n, h, hkv, d, cap,
                        0 if slopes is None else slopes.data_ptr(), scale, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"decode_attention failed (rc={rc}): n={n} H={h} Hkv={hkv} D={d} cap={cap}")
        return out

    def gelu_(self, x: torch.Tensor) -> torch.Tensor:
        """Exact-form GELU in place on a contiguous fp32 CPU tensor (erf to ~1.5e-7 absolute, as PyTorch's)."""
        if not _f32cpu(x, contiguous=True):
            raise ValueError("gelu_: needs a contiguous fp32 CPU tensor")
        self._gelu(x.data_ptr(), x.numel())
        return x

    def decode_block(self, x: torch.Tensor, blk: BlockWeights, kc: torch.Tensor, vc: torch.Tensor,
                     pos: torch.Tensor, top: int, slopes: torch.Tensor | None, kmax: torch.Tensor | None = None) -> None:
        """One MPT block of a decode step on ``x`` (n, d_model), in place: LN1 -> Wqkv (+clip) -> attention over
        the cache (new K/V rows written) -> out_proj -> residual -> LN2 -> up -> GELU -> down -> residual.
        ``kc``/``vc``, ``pos``, ``top``, ``slopes`` as for :meth:`decode_attention`."""
        n, d = x.shape
        if not _f32cpu(x, contiguous=True):
            raise ValueError("decode_block: x (n, d) must be a contiguous fp32 CPU tensor")
        b = blk
        if not all(_f32cpu(t, contiguous=True) for t in (b.wqkv, b.wout, b.wup, b.wdown, b.ln1_w, b.ln2_w)):
            raise ValueError("decode_block: the block's weights are no longer contiguous fp32 on the CPU (was the "
                             "model moved or cast after the decoder was built?)")
        _check_attention_args(None, None, None, kc, vc, pos, slopes, n, b.n_heads, kc.shape[1], kc.shape[3], kmax)
        if d != b.wqkv.shape[1]:
            raise ValueError(f"decode_block: x has {d} features, the block expects {b.wqkv.shape[1]}")
        ws = torch.empty(n * (2 * d + b.qkv_dim + b.ffn) + n * b.n_heads * top, dtype=torch.float32)
        p = _ptr
        rc = self._block(x.data_ptr(), n, d, p(b.ln1_w), p(b.ln1_b), b.eps1, p(b.wqkv), p(b.bqkv), b.clip,
                         kc.data_ptr(), vc.data_ptr(), int(kc.dtype == torch.float16), _ptr(kmax), pos.data_ptr(), top,
                         kc.shape[2], b.n_heads, kc.shape[1],
                         kc.shape[3], p(slopes), b.scale, p(b.wout), p(b.bout), p(b.ln2_w), p(b.ln2_b), b.eps2,
                         p(b.wup), p(b.bup), b.ffn, p(b.wdown), p(b.bdown), ws.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"decode_block failed (rc={rc}): n={n} d={d} top={top} cap={kc.shape[2]}")


    def decode_layers(self, x: torch.Tensor, stack: DecodeStack, kcs: list[torch.Tensor], vcs: list[torch.Tensor],
                      pos: torch.Tensor, top: int, slopes: torch.Tensor | None,
                      kmaxes: list[torch.Tensor] | None = None) -> None:
        """Every block of a decode step in one call (:meth:`decode_block` for each layer in order) on ``x``
        (n, d_model) in place; ``kcs``/``vcs`` each layer's cache, the rest as for :meth:`decode_attention`."""
        n, d = x.shape
        if not _f32cpu(x, contiguous=True) or d != stack.d_model:
            raise ValueError(f"decode_layers: x must be a contiguous fp32 CPU (n, {stack.d_model}) tensor, "
                             f"got {tuple(x.shape)} {x.dtype}")
        if len(kcs) != stack.n_layers or len(vcs) != stack.n_layers:
            raise ValueError(f"decode_layers: {stack.n_layers} layers but {len(kcs)}/{len(vcs)} caches")
        stack.check()
        kc0 = kcs[0]
        _check_attention_args(None, None, None, kc0, vcs[0], pos, slopes, n, stack.n_heads, kc0.shape[1],
                              kc0.shape[3], kmaxes[0] if kmaxes else None)
        if kmaxes is not None and (len(kmaxes) != stack.n_layers or any(
                not _f32cpu(t, contiguous=True) or t.shape != kmaxes[0].shape for t in kmaxes)):
            raise ValueError(f"decode_layers: kmaxes must be {stack.n_layers} contiguous fp32 CPU tensors alike")
        shape, dt = kc0.shape, kc0.dtype
        for c in kcs + vcs:  # every layer's cache alike: the C code takes one shape for all
            if c.shape != shape or c.dtype != dt or not c.is_cpu or not c.is_contiguous():
                raise ValueError(f"decode_layers: every layer's cache must be a contiguous CPU {tuple(shape)} {dt} "
                                 f"tensor like layer 0's, got {tuple(c.shape)} {c.dtype}")
        ws = torch.empty(n * stack.ws_row + n * stack.n_heads * top, dtype=torch.float32)
        with stack.lock:  # the table holds this call's cache pointers until the C code has run
            stack.set_caches(kcs, vcs, kmaxes)
            rc = self._layers(x.data_ptr(), n, d, ctypes.addressof(stack.table), stack.n_layers,
                              int(kc0.dtype == torch.float16), pos.data_ptr(), top, kc0.shape[2], kc0.shape[1],
                              kc0.shape[3], _ptr(slopes), ws.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"decode_layers failed (rc={rc}): n={n} d={d} top={top} cap={kc0.shape[2]}")


class _LayerStruct(ctypes.Structure):
    """``mptkit_layer`` in csrc/cpu_kernels.c (same field order)."""

    _fields_ = ([(name, ctypes.c_void_p) for name in ("ln1_w", "ln1_b", "wqkv", "bqkv", "wout", "bout", "ln2_w",
                                                      "ln2_b", "wup", "bup", "wdown", "bdown", "kc", "vc", "kmax")]
                + [(name, ctypes.c_float) for name in ("eps1", "eps2", "clip", "scale")]
                + [("n_heads", ctypes.c_long), ("ffn", ctypes.c_long)]
                + [(name, ctypes.c_void_p) for name in ("fqkv", "fout", "fup", "fdown", "sqkv", "sout", "sup", "sdown")])


class DecodeStack:
    """The blocks of a whole model for :meth:`CpuKernels.decode_layers`: a table of every layer's weight
    pointers, built once. ``of(blocks)`` is None unless every block is covered by :class:`BlockWeights` with
    the same head count and width. :meth:`check` (every call) verifies that no weight was since re-allocated
    or cast (``model.half()``, ``param.data = ...``): the C code reads raw pointers."""

    _PTRS = ("ln1_w", "ln1_b", "wqkv", "bqkv", "wout", "bout", "ln2_w", "ln2_b", "wup", "bup", "wdown", "bdown",
             "sqkv", "sout", "sup", "sdown")

    def __init__(self, blocks: list[BlockWeights]):
        self.blocks = blocks
        self.n_layers = len(blocks)
        b0 = blocks[0]
        self.n_heads, self.d_model = b0.n_heads, b0.d_in
        self.ws_row = max(2 * self.d_model + b.qkv_dim + b.ffn for b in blocks)
        self.table = (_LayerStruct * self.n_layers)()
        self._tensors = [getattr(b, k) for b in blocks for k in self._PTRS if getattr(b, k) is not None]
        self._ptrs = [t.data_ptr() for t in self._tensors]
        for row, b in zip(self.table, blocks):
            for k in self._PTRS:
                setattr(row, k, _ptr(getattr(b, k)))
            row.eps1, row.eps2, row.clip, row.scale = b.eps1, b.eps2, b.clip, b.scale
            row.n_heads, row.ffn = b.n_heads, b.ffn
            row.fqkv, row.fout, row.fup, row.fdown = b.fqkv or None, b.fout or None, b.fup or None, b.fdown or None
        self._kv: list[int] = []
        # one table per model: two threads decoding through one generator (each with its own cache) take
        # turns, or one would run the C code on the other's cache pointers
        self.lock = threading.Lock()

    @classmethod
    def of(cls, blocks: list[BlockWeights | None]) -> DecodeStack | None:
        if not blocks or any(b is None for b in blocks):
            return None
        b0 = blocks[0]
        if any(b.n_heads != b0.n_heads or b.d_in != b0.d_in for b in blocks):
            return None
        return cls(blocks)

    def check(self) -> None:
        if [t.data_ptr() for t in self._tensors] != self._ptrs:  # same storage: same fp32 CPU tensor
            raise ValueError("decode_layers: the model's weights were re-allocated or cast after the decoder was "
                             "built (was the model moved or cast?)")

    def set_caches(self, kcs: list[torch.Tensor], vcs: list[torch.Tensor],
                   kmaxes: list[torch.Tensor] | None = None) -> None:
        n = self.n_layers
        ptrs = [t.data_ptr() for t in kcs] + [t.data_ptr() for t in vcs] + (
            [t.data_ptr() for t in kmaxes] if kmaxes is not None else [0] * n)
        if ptrs != self._kv:  # a new cache, or one that grew (re-allocated)
            for i, row in enumerate(self.table):
                row.kc, row.vc, row.kmax = ptrs[i], ptrs[n + i], ptrs[2 * n + i]
            self._kv = ptrs


def _f32cpu(t: torch.Tensor, contiguous: bool = False) -> bool:
    return t.dtype is torch.float32 and t.is_cpu and (not contiguous or t.is_contiguous())


def _check_attention_args(q, k, v, kc, vc, pos, slopes, n, h, hkv, d, kmax=None) -> None:
    """What the C code indexes without bounds checks: the caches and positions, q/k/v (when given: the
    attention kernel; the block kernel makes its own), the slopes."""
    bad = []
    if not (kc.dim() == 4 and kc.shape == vc.shape and kc.shape[0] >= n and kc.is_cpu and vc.is_cpu
            and kc.dtype == vc.dtype and kc.dtype in KERNEL_KV_DTYPES and kc.is_contiguous() and vc.is_contiguous()):
        bad.append(f"caches {tuple(kc.shape)}/{tuple(vc.shape)} {kc.dtype} must be contiguous fp32/fp16 CPU tensors "
                   f"(slots, Hkv, cap, D) with a slot for each row, {n} rows: enough for {n} slots")
    if not (pos.dtype == torch.int64 and pos.is_contiguous() and pos.numel() == n):
        bad.append(f"pos must be ({n},) int64, got {tuple(pos.shape)} {pos.dtype}")
    if q is not None:
        if not (_f32cpu(q) and _f32cpu(k) and _f32cpu(v)) or not q.stride(1) == k.stride(1) == v.stride(1) == 1:
            bad.append("q/k/v must be fp32 CPU rows with unit column stride")
        elif (q.dim() != 2 or q.shape != (n, h * d) or k.shape != (n, hkv * d) or v.shape != (n, hkv * d)
              or h % hkv):
            bad.append(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} for H={h} Hkv={hkv} D={d}")
    if slopes is not None and (not _f32cpu(slopes, contiguous=True) or slopes.numel() != h):
        bad.append(f"slopes must be {h} contiguous fp32 values, got {tuple(slopes.shape)} {slopes.dtype}")
    if kmax is not None and (not _f32cpu(kmax, contiguous=True) or kmax.shape != kc.shape[:2]):
        bad.append(f"kmax must be a contiguous fp32 CPU {tuple(kc.shape[:2])} tensor (slots, Hkv), got "
                   f"{tuple(kmax.shape)} {kmax.dtype}")
    if bad:
        raise ValueError("decode attention: " + "; ".join(bad))


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class BlockWeights:
    """The tensors of one standard MPT block that :meth:`CpuKernels.decode_block` reads (looked up once, never
    copied: in-place weight updates are seen). ``BlockWeights.of(blk)`` is None for blocks it does not cover:
    blocks :func:`mptkit.model.fastpath.block_coverage` does not give to the kernel (norms other than
    LayerNorm/LPLayerNorm, QK-LayerNorm, FFNs other than MPTMLP, any wrapped, subclassed or hooked module), and
    non-fp32/non-contiguous or non-CPU weights."""

    __slots__ = ("bdown", "bout", "bqkv", "bup", "clip", "d_in", "eps1", "eps2", "fdown", "ffn", "fout", "fqkv", "fup",
                 "ln1_b", "ln1_w", "ln2_b", "ln2_w", "n_heads", "qkv_dim", "quantised", "scale", "sdown", "sout",
                 "sqkv", "sup", "wdown", "wout", "wqkv", "wup")

    @classmethod
    def of(cls, blk, q8=None) -> BlockWeights | None:
        """``q8``: the quantised-linear kernels (:func:`mptkit.infer.quant_kernels.q8_kernels`) for a block whose
        linears are q8_0 / q4_0 :class:`~mptkit.model.quant.QuantLinear` s (read as block values and fp16 scales
        through their kernel, fp32 or integer dot products as ``q8.int_dot`` says); without it such a block is
        not covered (None)."""
        from mptkit.model.fastpath import block_coverage
        from mptkit.model.quant import QuantLinear

        if not block_coverage(blk).kernel:  # exact standard modules only (no wrapped / hooked Linear)
            return None
        a, f = blk.attn, blk.ffn
        w = cls()
        w.ln1_w, w.ln1_b, w.eps1 = blk.norm_1.weight, blk.norm_1.bias, float(blk.norm_1.eps)
        w.ln2_w, w.ln2_b, w.eps2 = blk.norm_2.weight, blk.norm_2.bias, float(blk.norm_2.eps)
        fp32 = [w.ln1_w, w.ln1_b, w.ln2_w, w.ln2_b]
        w.quantised = False
        for key, m in (("qkv", a.Wqkv), ("out", a.out_proj), ("up", f.up_proj), ("down", f.down_proj)):
            setattr(w, "b" + key, m.bias)
            fp32.append(m.bias)
            if type(m) is QuantLinear:
                if q8 is None or not q8.supports(m):
                    return None
                setattr(w, "w" + key, m.weight_q)
                setattr(w, "s" + key, m.scales)
                setattr(w, "f" + key, q8.linear_address(m.block))
                w.quantised = True
            else:
                setattr(w, "w" + key, m.weight)
                setattr(w, "s" + key, None)
                setattr(w, "f" + key, 0)
                fp32.append(m.weight)
        w.clip = float(a.clip_qkv or 0.0)
        w.scale = float(a.softmax_scale)
        w.n_heads = a.n_heads
        w.d_in = a.Wqkv.in_features
        w.qkv_dim = a.Wqkv.out_features
        w.ffn = f.up_proj.out_features
        if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                   for t in fp32 if t is not None):
            return None
        return w


def _cache_dir() -> Path:
    base = os.environ.get("MPTKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mptkit")
    return Path(base) / "kernels"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model name and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _openmp_link_args() -> list[str]:
    """Link against the libgomp torch ships (same soname, so the process keeps one OpenMP runtime)."""
    lib = Path(torch.__file__).parent / "lib"
    if any(lib.glob("libgomp*.so*")):
        return [f"-L{lib}", f"-Wl,-rpath,{lib}"]
    return []


def _build(cc: str, flags: tuple[str, ...], source: Path = SOURCE) -> Path:
    src = source.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc} --version failed: {e}") from e
    link = _openmp_link_args()
    key = hashlib.sha256(b"\0".join([src, " ".join(flags + tuple(link)).encode(), version.encode(),
                                     _cpu_id().encode(), torch.__version__.encode()])).hexdigest()[:16]
    out = _cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("building mptkit's CPU decode kernels once for this machine (%s, a few seconds) into %s", cc, out.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *flags, str(source), "-o", tmp, *link]
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{r.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)  # atomic: a concurrent build writes the same bytes under its own temp name
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _self_test(sl: CpuKernels) -> None:
    """Shapes with tails (K not a multiple of the vector width, odd N, M past 8) against torch.mm."""
    g = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 67, 37), (3, 130, 64), (8, 64, 512), (11, 9, 100)):
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=g)
        for bias in (None, b):
            ref = torch.addmm(bias, x, w.t()) if bias is not None else x @ w.t()
            got = sl.linear(x, w, bias)
            if not torch.allclose(got, ref, rtol=1e-4, atol=1e-4):
                err = (got - ref).abs().max().item()
                raise RuntimeError(f"self-test failed for M={m} N={n} K={k}: max abs error {err:.3g}")
    x = torch.linspace(-6, 6, 37)
    if not torch.allclose(sl.gelu_(x.clone()), torch.nn.functional.gelu(x), atol=1e-5):
        raise RuntimeError("self-test failed for gelu")
    h, hkv, d, cap = 4, 2, 20, 9  # D not a multiple of the vector width; GQA; one slot at position 0
    for kv in KERNEL_KV_DTYPES if sl.has_f16 else KERNEL_KV_DTYPES[:1]:
        kc = torch.randn(2, hkv, cap, d, generator=g).to(kv)
        vc = torch.randn(2, hkv, cap, d, generator=g).to(kv)
        q, k, v = torch.randn(2, h * d, generator=g), torch.randn(2, hkv * d, generator=g), torch.randn(2, hkv * d)
        slopes, pos = torch.rand(h, generator=g), torch.tensor([6, 0])
        got = sl.decode_attention(q, k, v, kc, vc, pos, 7, slopes, 0.3)
        for s_ in range(2):
            p_ = int(pos[s_])
            for hh in range(h):
                kk, vv = kc[s_, hh // 2, : p_ + 1].float(), vc[s_, hh // 2, : p_ + 1].float()
                sc = 0.3 * (kk @ q[s_, hh * d : (hh + 1) * d]) + slopes[hh] * (torch.arange(p_ + 1) - p_)
                if not torch.allclose(got[s_, hh * d : (hh + 1) * d], torch.softmax(sc, 0) @ vv, atol=1e-4):
                    raise RuntimeError(f"self-test failed for decode attention ({kv} cache)")


def release_openmp_threads(*, keep_pool: bool = False) -> bool:
    """Hand back the calling thread's OpenMP worker threads (``omp_pause_resource_all(omp_pause_hard)`` in the
    libgomp torch runs on); returns whether it was done.

    Each thread that starts OpenMP work gets its own pool of workers. When the thread that loaded a model
    hands the compute to another (the serving engine's), two pools exist and libgomp, counting more threads
    than cores, stops letting idle workers spin: every parallel region then waits for a sleeping worker to be
    woken, and a decode step is slower until the first pool is released (measured:
    bench/results/inference.md). A thread that runs OpenMP work again simply gets a new pool.

    ``keep_pool`` (``DecodeOptions.keep_openmp_pool``): do nothing and return False (for comparisons)."""
    if keep_pool:
        return False
    lib = next(iter(sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))), None)
    try:
        gomp = ctypes.CDLL(str(lib) if lib is not None else "libgomp.so.1")
        fn = gomp.omp_pause_resource_all
    except (OSError, AttributeError):  # no GNU OpenMP runtime (another OpenMP, or another platform)
        return False
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int]
    return fn(2) == 0  # omp_pause_hard


def load_kernel(
    what: str, source: Path, wrap, self_test, fallback: str, *, cache: dict, lock: threading.Lock,
    flags: tuple[str, ...] = FLAGS, cc: str | None = None, x86_only: bool = False,
):
    """Compile ``source`` with the machine's C compiler (cached on disk by content), load it, wrap the library
    (``wrap(cdll, path)``) and run ``self_test`` on it: the wrapped kernel, or None with the reason logged once
    (``what``: the kernel's name in the log; ``fallback``: what runs instead). Thread-safe; built once per
    process, compiler and flag set (``cache`` / ``lock``: the caller's)."""
    cc = cc or os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    key = (cc, flags)
    with lock:
        if key in cache:
            return cache[key]
        k = None
        if x86_only and platform.machine().lower() not in ("x86_64", "amd64"):
            log.info("mptkit %s: %s is not x86-64; using %s", what, platform.machine(), fallback)
        elif ctypes.sizeof(ctypes.c_long) != 8:  # the C code takes sizes and int64 tensors as `long` (LP64 only)
            log.info("mptkit %s: C long is not 64-bit on this platform; using %s", what, fallback)
        elif cc is None:
            log.info("mptkit %s: no C compiler found (set CC); using %s", what, fallback)
        else:
            try:
                path = _build(cc, flags, source)
                k = wrap(ctypes.CDLL(str(path)), path)
                self_test(k)
                log.debug("mptkit %s: %s (vector width %d)", what, path, k.vector_width)
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
                log.warning("mptkit %s unavailable, using %s: %s", what, fallback, e)
                k = None
        cache[key] = k
        return k


def cpu_kernels(*, enabled: bool = True, flags: tuple[str, ...] = FLAGS, cc: str | None = None) -> CpuKernels | None:
    """The compiled kernel, or ``None`` (the reason is logged once; ``enabled`` False: None at once, the
    decoder's ``DecodeOptions.cpu_kernels``). Thread-safe; built once per process."""
    if not enabled:
        return None
    return load_kernel("CPU kernels", SOURCE, CpuKernels, _self_test, "torch.mm", cache=_cached, lock=_lock,
                       flags=flags, cc=cc, x86_only=True)
