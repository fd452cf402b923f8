"""The compiled CPU decode kernels (``mptkit.infer.kernels``) against PyTorch: the small-M linear against
``torch.addmm`` and the decode attention against the batched-matmul path of ``KVCache``, for the AVX-512 and
the AVX2 builds where this CPU runs them; and the fallbacks (switched off, bad shapes)."""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest
import torch

from mptkit.infer import kernels as K
from mptkit.infer.kernels import FLAGS, cpu_kernels
from mptkit.infer.options import DecodeOptions


def _cpu_flags() -> set[str]:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("flags"):
                return set(ln.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


CAN_BUILD = (platform.machine().lower() in ("x86_64", "amd64") and shutil.which("gcc") is not None
             and {"avx2", "fma"} <= _cpu_flags())
BUILDS = {"native": FLAGS}
if CAN_BUILD and "avx512f" in _cpu_flags():  # also the AVX2 code path, which AVX-512 machines run too
    BUILDS["avx2"] = tuple(f if f != "-march=native" else "-march=haswell" for f in FLAGS)


@pytest.fixture(params=sorted(BUILDS))
def kern(request, tmp_path_factory, monkeypatch):
    if not CAN_BUILD:
        pytest.skip("needs x86-64 with AVX2+FMA and gcc")
    monkeypatch.setenv("MPTKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kcache"))
    k = cpu_kernels(flags=BUILDS[request.param])
    assert k is not None, "the kernels failed to build on a machine that can build them (see the log)"
    assert k.vector_width == (16 if request.param == "native" and "avx512f" in _cpu_flags() else 8)
    return k


def test_kernels_build_where_they_can():
    if CAN_BUILD:
        assert cpu_kernels() is not None
    else:
        pytest.skip("not x86-64 with AVX2+FMA and gcc: the decoder uses torch.mm")


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 17])
@pytest.mark.parametrize("n,k", [(64, 512), (131, 37), (7, 2048), (1, 16)])
def test_linear_matches_addmm(kern, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    torch.testing.assert_close(kern.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kern.linear(x, w, b), torch.addmm(b, x, w.t()), rtol=1e-5, atol=1e-4)
    # a non-contiguous x (a column slice) is accepted
    xx = torch.randn(m, k + 3, generator=g)[:, 3:]
    torch.testing.assert_close(kern.linear(xx, w), xx @ w.t(), rtol=1e-5, atol=1e-4)


def test_linear_rows_do_not_depend_on_the_batch(kern):
    """Each output row is the same dot products in the same order whatever else shares the batch."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 512, generator=g), torch.randn(300, 512, generator=g)
    full = kern.linear(x, w)
    for i in range(8):
        assert torch.equal(kern.linear(x[i : i + 1], w), full[i : i + 1])
    assert torch.equal(kern.linear(x[2:5], w), full[2:5])


def test_linear_bad_shapes(kern):
    with pytest.raises(ValueError, match="does not match"):
        kern.linear(torch.randn(2, 5), torch.randn(3, 6))
    with pytest.raises(ValueError, match="does not match"):
        kern.linear(torch.randn(2, 6, dtype=torch.float64), torch.randn(3, 6))
    with pytest.raises(ValueError, match="moved or cast"):  # weights cast after they were captured
        kern.linear(torch.randn(2, 6), torch.randn(3, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="moved or cast"):
        kern.linear(torch.randn(2, 6), torch.randn(3, 6), torch.randn(4))


def _ref_attention(q, kc, vc, pos, slopes, scale, h, hkv, d):
    """Per slot and head, the textbook formula over the slot's keys 0..pos (inclusive)."""
    n = q.shape[0]
    out = torch.empty(n, h * d, dtype=torch.float64)
    rep = h // hkv
    for s in range(n):
        p = int(pos[s])
        for hh in range(h):
            g = hh // rep
            kk, vv = kc[s, g, : p + 1].double(), vc[s, g, : p + 1].double()  # as stored (fp16: rounded)
            sc = scale * (kk @ q[s, hh * d : (hh + 1) * d].double())
            if slopes is not None:
                sc = sc + float(slopes[hh]) * (torch.arange(p + 1, dtype=torch.float64) - p)
            out[s, hh * d : (hh + 1) * d] = torch.softmax(sc, 0) @ vv
    return out.float()


@pytest.mark.parametrize("h,hkv,d", [(8, 8, 64), (4, 2, 16), (6, 1, 24), (2, 2, 5)])
@pytest.mark.parametrize("alibi", [True, False])
@pytest.mark.parametrize("kv", [torch.float32, torch.float16], ids=["kv32", "kv16"])
def test_decode_attention_matches_reference(kern, h, hkv, d, alibi, kv):
    g = torch.Generator().manual_seed(h * 100 + d)
    n, slots, cap = 3, 4, 48
    kc = torch.randn(slots, hkv, cap, d, generator=g).to(kv)
    vc = torch.randn(slots, hkv, cap, d, generator=g).to(kv)
    qkv = torch.randn(n, (h + 2 * hkv) * d, generator=g)  # q, k, v as column slices of one fused row
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    pos = torch.tensor([5, 0, 44], dtype=torch.int64)  # keys in blocks of 8 and one by one (5, 1, 5*8 + 5)
    slopes = torch.rand(h, generator=g) if alibi else None
    kc0 = kc.clone()
    out = kern.decode_attention(q, k, v, kc, vc, pos, 45, slopes, 0.3)
    for s in range(n):  # the new rows were written at each slot's position (rounded as torch rounds), nothing else
        p = int(pos[s])
        assert torch.equal(kc[s, :, p], k[s].view(hkv, d).to(kv))
        assert torch.equal(vc[s, :, p], v[s].view(hkv, d).to(kv))
        kc0[s, :, p] = kc[s, :, p]
    assert torch.equal(kc, kc0)
    torch.testing.assert_close(out, _ref_attention(q, kc, vc, pos, slopes, 0.3, h, hkv, d), rtol=1e-5, atol=1e-5)


def test_decode_attention_bad_input(kern):
    kc = torch.zeros(2, 2, 8, 4)
    q, k, v = torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="rc=-2"):  # a position at or past `top`
        kern.decode_attention(q, k, v, kc, kc.clone(), torch.tensor([1, 6]), 6, None, 1.0)
    with pytest.raises(RuntimeError, match="rc=-1"):  # top past the capacity
        kern.decode_attention(q, k, v, kc, kc.clone(), torch.tensor([1, 2]), 9, None, 1.0)
    with pytest.raises(ValueError, match="int64"):
        kern.decode_attention(q, k, v, kc, kc.clone(), torch.tensor([1, 2], dtype=torch.int32), 3, None, 1.0)
    with pytest.raises(ValueError, match="slopes"):
        kern.decode_attention(q, k, v, kc, kc.clone(), torch.tensor([1, 2]), 3, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="for 2 slots"):  # a cache with fewer slots than rows
        kern.decode_attention(q, k, v, kc[:1], kc[:1].clone(), torch.tensor([1, 2]), 3, None, 1.0)
    with pytest.raises(ValueError, match="for H=2"):  # k wider than the cache's heads
        kern.decode_attention(q, torch.zeros(2, 12), v, kc, kc.clone(), torch.tensor([1, 2]), 3, None, 1.0)


def test_switched_off_and_unbuildable(monkeypatch, tmp_path):
    off = DecodeOptions(cpu_kernels=False)  # the decoder passes its option as `enabled`
    assert cpu_kernels(enabled=off.cpu_kernels) is None
    monkeypatch.setenv("MPTKIT_CACHE_DIR", str(tmp_path))
    # a compiler that fails: None (the decoder keeps torch.mm), and nothing half-written is left behind
    assert cpu_kernels(cc="false") is None
    assert not any(tmp_path.rglob("*.so"))


def test_build_is_cached_and_atomic(monkeypatch, tmp_path):
    if not CAN_BUILD:
        pytest.skip("needs x86-64 with AVX2+FMA and gcc")
    monkeypatch.setenv("MPTKIT_CACHE_DIR", str(tmp_path))
    p1 = K._build("gcc", FLAGS)
    mtime = p1.stat().st_mtime_ns
    assert K._build("gcc", FLAGS) == p1 and p1.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [f.name for f in p1.parent.iterdir()] == [p1.name]  # no temporary files left


def test_gelu_matches_torch(kern):
    x = torch.cat([torch.linspace(-12, 12, 20011), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 50.0, -50.0])])
    ref = torch.nn.functional.gelu(x.double()).float()
    got = kern.gelu_(x.clone())
    assert (got - ref).abs().max().item() < 1e-6  # erf to ~1.5e-7 absolute (PyTorch's own: ~1e-6)
    assert (got - torch.nn.functional.gelu(x)).abs().max().item() < 2e-6
    with pytest.raises(ValueError, match="contiguous fp32"):
        kern.gelu_(x.double())


def test_release_openmp_threads_then_compute_again():
    """The calling thread's OpenMP pool can be handed back (as Engine.start does before the engine thread takes
    over the compute) and the thread still computes correctly afterwards, on a new pool; the environment
    switch keeps the pool."""
    import threading
    from pathlib import Path

    from mptkit.infer.kernels import release_openmp_threads

    if not list((Path(torch.__file__).parent / "lib").glob("libgomp*.so*")):
        pytest.skip("this torch build does not run on GNU OpenMP (libgomp)")
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    ref = a @ b
    assert release_openmp_threads() is True
    torch.testing.assert_close(a @ b, ref, rtol=0, atol=0)
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("c", a @ b))
    th.start()
    th.join()
    torch.testing.assert_close(out["c"], ref, rtol=0, atol=0)
    keep = DecodeOptions(keep_openmp_pool=True)  # what Engine.start passes
    assert release_openmp_threads(keep_pool=keep.keep_openmp_pool) is False


def test_decode_layers_equal_block_by_block(kern):
    """The whole stack in one call (``decode_layers``) is the per-layer ``decode_block`` calls, bitwise, cache
    writes included; the layer table follows a cache that was re-allocated (grown) between steps."""
    from mptkit.infer.kernels import BlockWeights, DecodeStack
    from mptkit.model import MPTForCausalLM
    from tests.helpers import tiny_cfg

    torch.manual_seed(0)
    model = MPTForCausalLM(tiny_cfg(attn_config={"clip_qkv": 2.0})).eval()
    blocks = [BlockWeights.of(b) for b in model.transformer.blocks]
    stack = DecodeStack.of(blocks)
    assert stack is not None and stack.n_layers == len(blocks) >= 2
    cfg = model.config
    n, hkv, d = 3, cfg.kv_n_heads, cfg.head_dim
    slopes = model.slopes.float().contiguous()
    for cap in (16, 40):  # a second set of (larger) caches: new pointers for the same stack
        kc = [torch.randn(n, hkv, cap, d) for _ in blocks]
        vc = [torch.randn(n, hkv, cap, d) for _ in blocks]
        kc2, vc2 = [t.clone() for t in kc], [t.clone() for t in vc]
        pos = torch.tensor([5, 0, cap - 2])
        x = torch.randn(n, cfg.d_model)
        x2 = x.clone()
        for i, b in enumerate(blocks):
            kern.decode_block(x, b, kc[i], vc[i], pos, cap - 1, slopes)
        kern.decode_layers(x2, stack, kc2, vc2, pos, cap - 1, slopes)
        assert torch.equal(x, x2)
        assert all(torch.equal(a, b) for a, b in zip(kc + vc, kc2 + vc2))
    with pytest.raises(ValueError, match="every layer's cache"):
        kern.decode_layers(x2, stack, kc2[:-1] + [kc2[-1][:, :, :8].contiguous()], vc2, pos, cap - 1, slopes)
    with pytest.raises(ValueError, match="layers but"):
        kern.decode_layers(x2, stack, kc2[:1], vc2[:1], pos, cap - 1, slopes)
    blk = model.transformer.blocks[1]
    blk.ffn.up_proj.weight.data = blk.ffn.up_proj.weight.data.clone()  # what .to()/.half() do to a parameter
    with pytest.raises(ValueError, match="re-allocated or cast"):
        kern.decode_layers(x2, stack, kc2, vc2, pos, cap - 1, slopes)


@pytest.mark.parametrize("kv", [torch.float32, torch.float16], ids=["kv32", "kv16"])
def test_decode_attention_skips_keys_alibi_proves_irrelevant(kern, kv):
    """With a key-norm bound (kmax), a steep ALiBi head does not read keys it proves get weight exactly 0: with
    NaN in those keys' values the output is still finite, and bitwise equal to the output computed reading
    every key (values zeroed there instead); the new key raises the bound."""
    g = torch.Generator().manual_seed(7)
    n, h, hkv, d, cap, pos = 2, 4, 2, 64, 320, 300
    kc = (torch.randn(n, hkv, cap, d, generator=g) * 0.1).to(kv)
    vc = torch.randn(n, hkv, cap, d, generator=g).to(kv)
    q, k, v = (torch.randn(n, h * d, generator=g) * 0.1, torch.randn(n, hkv * d, generator=g) * 0.1,
               torch.randn(n, hkv * d, generator=g))
    slopes = torch.tensor([1.0, 0.5, 1.0, 0.5])  # reach ~90 and ~180 keys: keys 0..99 are far past both
    p = torch.full((n,), pos, dtype=torch.int64)
    kmax = kc[:, :, :pos].float().norm(dim=-1).amax(-1).contiguous()  # a true bound of the stored keys
    far = slice(0, 100)
    vc_nan, vc_zero = vc.clone(), vc.clone()
    vc_nan[:, :, far] = float("nan")
    vc_zero[:, :, far] = 0
    km = kmax.clone()
    got = kern.decode_attention(q, k, v, kc.clone(), vc_nan, p, pos + 1, slopes, 0.125, km)
    ref = kern.decode_attention(q, k, v, kc.clone(), vc_zero, p, pos + 1, slopes, 0.125)  # reads every key
    assert torch.isfinite(got).all()
    assert torch.equal(got, ref)
    new_norm = k.view(n, hkv, d).to(kv).float().norm(dim=-1)
    torch.testing.assert_close(km, torch.maximum(kmax, new_norm), rtol=1e-6, atol=0)
    # without the bound every key is read: the NaN values reach the output
    assert torch.isnan(kern.decode_attention(q, k, v, kc.clone(), vc_nan, p, pos + 1, slopes, 0.125)).any()
    # a bound too small for the keys is the caller's error to avoid; a wrongly shaped one is refused
    with pytest.raises(ValueError, match="kmax must be"):
        kern.decode_attention(q, k, v, kc.clone(), vc_zero, p, pos + 1, slopes, 0.125, kmax[:1].contiguous())
