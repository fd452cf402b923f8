"""The CUDA paths CI cannot run, as one prepared script for a session lent a GPU (a few minutes on an H200).

On the device machine (no network there; its image has torch, transformers, safetensors, tokenizers, numpy):

    python3 -m pip install -q --no-deps --no-build-isolation -e . && python3 bench/gpu_check.py --out $OUT/gpu.json

Each check prints PASS / FAIL / SKIP with its numbers; the exit status is 1 if any check failed.

1. attention: every backend usable on CUDA (torch, sdpa, blockwise, flex compiled, flash when flash-attn is
   importable) against an fp64 reference of ALiBi causal attention, MHA and GQA, fp32 and bf16.
2. model: a random MPT's logits on CUDA (fp32) against the same weights on CPU; bf16 autocast close.
3. training: 40 steps of a tiny learnable task through the Trainer on CUDA with amp_bf16: the loss must fall;
   tokens/s and MFU reported.
4. generation: greedy tokens on CUDA (KV cache, fp32) equal the CPU's; long-context decode on CUDA.
5. (--bench) bench_train_step on CUDA in bf16 at T=2048, to record MFU against the datasheet peak.

``--device cpu`` runs the same checks on the CPU (to test this script where there is no GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback

import torch

RESULTS: list[dict] = []


def check(name: str):
    def deco(fn):
        def run(*a, **k):
            t = time.perf_counter()
            try:
                info = fn(*a, **k) or {}
                status = info.pop("status", "PASS")
            except Exception as e:  # noqa: BLE001 - every failure is reported, the next check still runs
                status, info = "FAIL", {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
            info["seconds"] = round(time.perf_counter() - t, 2)
            RESULTS.append({"check": name, "status": status, **info})
            shown = {k: v for k, v in info.items() if k != "trace"}
            print(f"{status:4s} {name}: {json.dumps(shown, default=str)}", flush=True)
        return run
    return deco


def _ref_attention(q, k, v, slopes, scale):
    """fp64 ALiBi causal attention, (B, H, T, D) / (B, Hkv, T, D) -> (B, T, H, D)."""
    h, t = q.shape[1], q.shape[2]
    rep = h // k.shape[1]
    k = k.repeat_interleave(rep, 1).double()
    v = v.repeat_interleave(rep, 1).double()
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k) * scale
    pos = torch.arange(t, device=q.device)
    rel = (pos[None, :] - pos[:, None]).double()
    s = s + slopes.double()[None, :, None, None] * rel[None, None]
    s = s.masked_fill(rel[None, None] > 0, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, -1), v).transpose(1, 2)


@check("attention backends vs fp64 reference")
def check_attention(dev: torch.device) -> dict:
    from mptkit.model.attention import alibi_slopes, attention

    out, worst = {}, {}
    for dtype, tol in ((torch.float32, 2e-4), (torch.bfloat16, 3e-2)):
        for h, hkv in ((8, 8), (8, 2)):
            g = torch.Generator(device="cpu").manual_seed(h + hkv)
            q = torch.randn(2, h, 512, 64, generator=g).to(dev, dtype)
            k = torch.randn(2, hkv, 512, 64, generator=g).to(dev, dtype)
            v = torch.randn(2, hkv, 512, 64, generator=g).to(dev, dtype)
            slopes = alibi_slopes(h).to(dev)
            ref = _ref_attention(q, k, v, slopes, 0.125)
            for impl in ("torch", "sdpa", "blockwise", "flex", "flash"):
                key = f"{impl}/{str(dtype)[6:]}/{h}x{hkv}"
                if impl == "flash" and (dev.type != "cuda" or dtype == torch.float32):
                    continue
                try:
                    got = attention(q, k, v, slopes=slopes, softmax_scale=0.125, impl=impl)
                except Exception as e:  # noqa: BLE001
                    out[key] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
                    continue
                err = (got.double() - ref).abs().max().item()
                out[key] = round(err, 6)
                if err > tol:
                    worst[key] = err
    return {"status": "FAIL" if worst else "PASS", "max_abs_err": out, "over_tolerance": worst}


def _tiny_model(**over):
    from mptkit.model import MPTForCausalLM

    cfg = {"d_model": 256, "n_heads": 8, "n_layers": 4, "max_seq_len": 512, "vocab_size": 1024,
           "attn_config": {"alibi": True}}
    cfg.update(over)
    torch.manual_seed(0)
    return MPTForCausalLM(cfg).eval()


@check("model logits on the device vs CPU")
def check_model(dev: torch.device) -> dict:
    model = _tiny_model()
    x = torch.randint(0, 1024, (2, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).logits
        m = _tiny_model().to(dev)
        got = m(x.to(dev)).logits.float().cpu()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            bf = m(x.to(dev)).logits.float().cpu()
    e32 = (got - ref).abs().max().item()
    ebf = (bf - ref).abs().max().item()
    agree = (bf.argmax(-1) == ref.argmax(-1)).float().mean().item()
    ok = e32 < 1e-3 and agree > 0.95
    return {"status": "PASS" if ok else "FAIL", "fp32_max_abs": e32, "bf16_max_abs": ebf, "bf16_argmax_agree": agree}


@check("training on the device (amp_bf16 on CUDA)")
def check_training(dev: torch.device, tmp: str) -> dict:
    from mptkit.train.config import config_from_dict
    from mptkit.train.data import TensorDataset
    from mptkit.train.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    base = torch.randint(2, 1024, (16,), generator=g)
    phase = torch.randint(0, 16, (256,), generator=g)
    data = base[(phase[:, None] + torch.arange(256)[None]) % 16]
    cfg = config_from_dict({
        "model": {"d_model": 256, "n_heads": 8, "n_layers": 4, "max_seq_len": 256, "vocab_size": 1024,
                  "attn_config": {"alibi": True}},
        "max_duration": "40ba", "global_train_batch_size": 16, "device_train_microbatch_size": 16,
        "optimizer": {"name": "decoupled_adamw", "lr": 3e-3}, "scheduler": {"name": "cosine_with_warmup",
                                                                          "t_warmup": "4ba", "alpha_f": 0.1},
        "precision": "amp_bf16" if dev.type == "cuda" else "fp32", "device": dev.type,
        "eval_interval": "0ba", "save_folder": None, "run_folder": tmp + "/run", "progress_bar": False,
        "log_to_console": False, "run_name": "gpu_check", "seed": 1})
    t = Trainer(cfg, train_dataset=TensorDataset(data), eval_dataset=TensorDataset(data[:32]))
    s = t.fit()
    with open(tmp + "/run/metrics.jsonl") as f:
        recs = [json.loads(x) for x in f.read().splitlines()]
    steps = [r for r in recs if "train_loss" in r]
    first, last = steps[0]["train_loss"], steps[-1]["train_loss"]
    ok = last < 0.5 * first and math.isfinite(last)
    return {"status": "PASS" if ok else "FAIL", "first_loss": first, "last_loss": last,
            "eval_loss": s.get("eval_loss"), "tokens_per_s": steps[-1]["tokens_per_s"], "mfu": steps[-1]["mfu"]}


@check("greedy generation on the device vs CPU")
def check_generation(dev: torch.device) -> dict:
    from mptkit.infer import Generator, SamplingParams

    p = torch.randint(0, 1024, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    cpu = Generator(_tiny_model(), None).generate([p], params)[0].token_ids
    g = Generator(_tiny_model().to(dev), None)
    got = g.generate([p], params)[0].token_ids
    long_p = torch.randint(0, 1024, (4000,), generator=torch.Generator().manual_seed(3)).tolist()
    t = time.perf_counter()
    out = Generator(_tiny_model().to(dev), None, max_context=4200).generate([long_p], params)[0]
    dt = time.perf_counter() - t
    same = got == cpu
    return {"status": "PASS" if same else "FAIL", "tokens_equal": same, "first_mismatch":
            next((i for i, (a, b) in enumerate(zip(got, cpu)) if a != b), None),
            "long_context_4000_tokens_s": round(dt, 2), "long_finish": out.finish_reason}


@check("bench_train_step bf16 T=2048 (MFU)")
def check_bench(dev: torch.device) -> dict:
    import subprocess

    if dev.type != "cuda":
        return {"status": "SKIP", "why": "CUDA only"}
    cmd = [sys.executable, "bench/bench_train_step.py", "--device", "cuda", "--dtype", "bf16", "--seq", "2048",
           "--d-model", "1024", "--n-layers", "8", "--n-heads", "16", "--steps", "5", "--warmup", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, check=False)
    return {"status": "PASS" if r.returncode == 0 else "FAIL", "cmd": " ".join(cmd), "tail": r.stdout[-1500:] +
            r.stderr[-500:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="write every result as JSON here")
    ap.add_argument("--bench", action="store_true", help="also run bench_train_step in bf16 at T=2048")
    args = ap.parse_args()
    import tempfile

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu to test the script")
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"}
    try:
        import flash_attn

        info["flash_attn"] = flash_attn.__version__
    except ImportError:
        info["flash_attn"] = None
    print(json.dumps(info), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        check_attention(dev)
        check_model(dev)
        check_training(dev, tmp)
        check_generation(dev)
        if args.bench:
            check_bench(dev)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "results": RESULTS}, f, indent=1, default=str)
    sys.exit(1 if any(r["status"] == "FAIL" for r in RESULTS) else 0)


if __name__ == "__main__":
    main()
