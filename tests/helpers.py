"""What the tests build for themselves (no network): tiny model configs, tiny models with weights spread wider
than MPT's init (seeded), byte-level BPE tokenizers trained on the standard library's source, and the trainer
tests' learnable data and run configs. ``tests/conftest.py`` turns the tokenizer into fixtures.

One builder, many spreads: a test that needs its particular weights (a tolerance measured on them, a score that
must clearly differ) names the ``Spread`` and the seed it was written with, so its numbers stay the same."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 448  # model vocabulary beside the 400-token test tokenizer: 48 padded rows (as MPT-7B's 50432)
TOKENIZER_VOCAB = 400
EOS, PAD = "<|endoftext|>", "<|padding|>"
CHATML_SPECIALS = (EOS, PAD, "<|im_start|>", "<|im_end|>")


def tiny_cfg(**over) -> dict:
    """A tiny MPT config dict (fast on CPU); keyword overrides merge into attn_config/ffn_config/init_config."""
    d = {
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "expansion_ratio": 2,
        "max_seq_len": 64,
        "vocab_size": 211,
        "no_bias": True,
        "learned_pos_emb": False,
        "attn_config": {"alibi": True, "attn_impl": "torch"},
    }
    for k, v in over.items():
        if k in ("attn_config", "ffn_config", "init_config"):
            d[k] = {**d.get(k, {}), **v}
        else:
            d[k] = v
    return d


@dataclass(frozen=True)
class Spread:
    """How ``spread_weights`` redraws a model's parameters. Matrices: N(0, ``std``), those whose name contains one
    of ``embed`` N(0, ``embed_std``) (if set). Vectors: biases N(0, ``biases``) (if set), the other vectors
    (norm weights; biases too when ``biases`` is None) U(``vectors``) (if set); otherwise left as built.
    ``seed``: matrices are drawn from their own generator with that seed instead of torch's global one."""

    std: float
    embed_std: float | None = None
    embed: tuple[str, ...] = ("wte", "wpe")
    vectors: tuple[float, float] | None = None
    biases: float | None = None
    seed: int | None = None


# matrices, norms and biases all far from their init: attention patterns, the ALiBi bias, norms and biases
# matter to the logits (MPT's small init leaves a random model nearly blind to its context)
WIDE = Spread(std=0.15, embed_std=0.5, vectors=(0.6, 1.4), biases=0.1)
MATRICES = Spread(std=0.3)  # every matrix N(0, 0.3), vectors as built
SCORES = Spread(
    std=0.12, embed_std=0.3, embed=("wte",)
)  # eval: predictions and choices' scores clearly differ
NORMS = Spread(
    std=0.15, embed_std=0.3, vectors=(0.5, 1.5)
)  # matrices and every vector (norms, biases) redrawn


def spread_weights(model: torch.nn.Module, spread: Spread = WIDE) -> torch.nn.Module:
    """Redraw ``model``'s parameters in place as ``spread`` says (see ``Spread``); returns the model."""
    gen = torch.Generator().manual_seed(spread.seed) if spread.seed is not None else None
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() > 1:
                std = (
                    spread.embed_std
                    if spread.embed_std is not None and any(e in n for e in spread.embed)
                    else spread.std
                )
                if gen is not None:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
                else:
                    p.normal_(0, std)
            elif n.endswith("bias") and spread.biases is not None:
                p.normal_(0, spread.biases)
            elif spread.vectors is not None:
                p.uniform_(*spread.vectors)
    return model


def tiny_model(*, seed: int | None = 0, spread: Spread | None = WIDE, config=None, **over):
    """An MPT model of ``tiny_cfg(**over)`` (or of ``config``, an MPTConfig or dict) in eval mode, built after
    ``torch.manual_seed(seed)`` (``seed=None``: from torch's RNG as it stands), weights redrawn by ``spread``
    (``None``: MPT's own init)."""
    from mptkit.model import MPTForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    model = MPTForCausalLM(config if config is not None else tiny_cfg(**over)).eval()
    if spread is not None:
        spread_weights(model, spread)
    return model


def saved_model(folder, tokenizer=None, *, vocab_size: int = VOCAB, **kw):
    """``tiny_model(vocab_size=VOCAB, **kw)`` saved to ``folder`` with ``tokenizer`` (a tokenizer object, a
    folder whose tokenizer files are copied, or None); returns the model."""
    model = tiny_model(vocab_size=vocab_size, **kw)
    model.save_pretrained(folder, tokenizer=tokenizer)
    return model


def model_folder(folder, tokenizer=None, **kw) -> Path:
    """``saved_model(folder, tokenizer, **kw)``, returning the folder."""
    saved_model(folder, tokenizer, **kw)
    return Path(folder)


def bpe_tokenizer(
    vocab_size: int = TOKENIZER_VOCAB,
    *,
    sources: tuple[str, ...] = ("json", "inspect"),
    specials: tuple[str, ...] = (EOS, PAD),
):
    """A byte-level BPE (an HF fast tokenizer: eos <|endoftext|>, pad <|padding|>) trained on the source of the
    standard-library modules ``sources``; ``specials`` past the first two are added special tokens (as
    ChatML's <|im_start|>/<|im_end|> in mptkit's trained tokenizers and MPT-7B-Chat's). Deterministic."""
    import importlib
    import inspect

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "".join(inspect.getsource(importlib.import_module(m)) for m in sources)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    extra = {"additional_special_tokens": list(specials[2:])} if len(specials) > 2 else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=specials[0], pad_token=specials[1], **extra
    )


class TokenizerFolders:
    """Tokenizer folders trained once per session (``bpe_tokenizer``, one per vocabulary size) and copied to
    where a test wants them: ``make(folder, vocab_size)`` returns ``folder``."""

    def __init__(self, cache: Path):
        self.cache = Path(cache)
        self._built: dict[int, Path] = {}

    def make(self, folder, vocab_size: int = TOKENIZER_VOCAB) -> Path:
        if vocab_size not in self._built:
            src = self.cache / f"bpe{vocab_size}"
            bpe_tokenizer(vocab_size).save_pretrained(str(src))
            self._built[vocab_size] = src
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for f in self._built[vocab_size].iterdir():
            shutil.copy2(f, folder / f.name)
        return folder


# --- the trainer tests: a tiny learnable dataset and a tiny run config

TINY_MODEL = {
    "d_model": 32,
    "n_heads": 2,
    "n_layers": 2,
    "expansion_ratio": 4,
    "max_seq_len": 32,
    "vocab_size": 64,
    "learned_pos_emb": False,
    "attn_config": {"alibi": True, "attn_impl": "torch"},
}


def pattern_data(n: int = 64, seq: int = 32, period: int = 8, seed: int = 0) -> torch.Tensor:
    """Rows of a repeating random pattern at random phases: easy to learn, so loss must drop."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(2, 64, (period,), generator=g)
    phase = torch.randint(0, period, (n,), generator=g)
    idx = (phase[:, None] + torch.arange(seq)[None]) % period
    return base[idx]


def tiny_run(tmp, **over) -> dict:
    """A 12-batch run of ``TINY_MODEL`` on CPU as a recipe dict (folders under ``tmp``); ``over`` replaces keys."""
    d = {
        "model": dict(TINY_MODEL),
        "max_duration": "12ba",
        "global_train_batch_size": 8,
        "device_train_microbatch_size": 4,
        "optimizer": {"name": "decoupled_adamw", "lr": 3e-3},
        "scheduler": {"name": "cosine_with_warmup", "t_warmup": "2ba", "alpha_f": 0.1},
        "algorithms": {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}},
        "eval_interval": "0ba",
        "save_interval": "4ba",
        "save_folder": str(tmp / "ck"),
        "run_folder": str(tmp / "run"),
        "progress_bar": False,
        "log_to_console": False,
        "run_name": "t",
        "peak_tflops": 1.0,
        "torch_threads": 1,
        "seed": 5,
    }
    for k, v in over.items():
        d[k] = v
    return d


def make_cfg(tmp, **over):
    """``tiny_run`` parsed into the trainer's config."""
    from mptkit.train.config import config_from_dict

    return config_from_dict(tiny_run(tmp, **over))


def datasets(n: int = 64):
    """(train, eval) datasets of ``pattern_data``."""
    from mptkit.train.data import TensorDataset

    return TensorDataset(pattern_data(n)), TensorDataset(pattern_data(16, seed=0))


def kill_after_checkpoint(proc, save_folder, step: int, *, timeout: float = 240, poll: float = 0.01) -> None:
    """SIGKILL the training process ``proc`` (a ``subprocess.Popen``) as soon as its newest checkpoint under
    ``save_folder`` is at step ``step`` or later (the kill-then-autoresume tests); returns at once if it ends first."""
    import os
    import signal
    import time

    from mptkit.io.checkpoints import list_checkpoints

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        cks = list_checkpoints(save_folder)
        if cks and int(cks[0].name.split("-ba")[1]) >= step:
            os.kill(proc.pid, signal.SIGKILL)
            return
        time.sleep(poll)


def assert_decode_logits_agree(a, b, prompts, *, steps: int = 12, batched_steps: int = 6, atol: float = 2e-5):
    """Two generators (``a`` the one under test, ``b`` its reference) give the same logits step by step: at
    batch 1 (``prompts[0]`` prefilled, ``steps`` greedy steps on ``b``'s argmax) and in a batched step of three
    slots of different lengths, the middle one idle every other step. Each generator gets its own cache."""
    with torch.inference_mode():
        for g in (a, b):
            g.c = g.new_cache(capacity=8)  # grows during the steps
        la, lb = a.prefill(a.c, 0, prompts[0]), b.prefill(b.c, 0, prompts[0])
        for _ in range(steps):
            t = int(lb.argmax())
            la, lb = a.decode(a.c, [t])[0], b.decode(b.c, [t])[0]
            torch.testing.assert_close(la, lb, atol=atol, rtol=atol)
        for g in (a, b):
            g.c = g.new_cache(slots=3, capacity=16)
            for i, p in enumerate(prompts[:3]):
                g.prefill(g.c, i, p)
        toks = [1, 2, 3]
        for step in range(batched_steps):
            active = [True, step % 2 == 0, True]
            la, lb = a.decode(a.c, toks, active), b.decode(b.c, toks, active)
            for i in range(3):
                if active[i]:
                    torch.testing.assert_close(la[i], lb[i], atol=atol, rtol=atol)
            toks = [int(x) for x in lb.argmax(-1)]
        assert a.c.lengths == b.c.lengths


def llama_cpp_greedy_run(llm, prompt: list[int], n: int):
    """Greedy decoding in llama.cpp (a ``llama_cpp.Llama`` made with ``logits_all=True``) one token at a time
    through its KV cache: (prompt + the ``n`` new tokens, the logits of every evaluated position as an array)."""
    import numpy as np

    llm.reset()
    llm.eval(prompt)
    got = list(prompt)
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        got.append(nxt)
        llm.eval([nxt])
    return got, np.array(llm.scores[: llm.n_tokens])


def llama_cpp_greedy(gguf_path, prompt: list[int], n: int):
    """:func:`llama_cpp_greedy_run` on the GGUF file (one thread, f32 KV cache): (prompt + the new tokens, the
    logits of every position but the last)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=64, n_threads=1, n_threads_batch=1, logits_all=True,
                          verbose=False, seed=0, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    got, scores = llama_cpp_greedy_run(llm, prompt, n)
    return got, scores[: len(got) - 1]


def round_quant_inputs(model):
    """Forward pre-hooks rounding every QuantLinear's input rows to q8_0 blocks (the integer path's view of
    the activations): the model's own forward then computes what the integer path computes, up to fp32
    summation order. Returns the hooks' handles (``.remove()`` each)."""
    from mptkit.infer.quant_kernels import round_activations_q8
    from mptkit.model.quant import QuantLinear

    def hook(_mod, args):
        x = args[0]
        return (round_activations_q8(x.reshape(-1, x.shape[-1])).reshape(x.shape),)

    return [mod.register_forward_pre_hook(hook) for mod in model.modules() if isinstance(mod, QuantLinear)]
