"""MPTForCausalLM: one plain ``torch.nn.Module`` for training, finetuning, eval and inference.

Parameter names are MPT's HF names (``transformer.wte.weight``, ``transformer.blocks.N.attn.Wqkv.weight``
…), so a state dict is a checkpoint as-is.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mptkit.errors import ConfigError
from mptkit.model.attention import alibi_slopes
from mptkit.model.blocks import MPTBlock, norm_factory
from mptkit.model.config import READ_ONLY_HINT, MPTConfig, load_model_config
from mptkit.model.fastpath import FastPathOptions, plain_reason
from mptkit.model.fused_loss import linear_cross_entropy, shifted_labels
from mptkit.model.init import init_weights


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: logits[:, t] predicts labels[:, t+1]; mean over non-ignored targets.

    The labels are shifted instead of the logits (the last position gets ``ignore_index``), so the (B, T, V)
    logits are neither sliced into a copy nor, when already fp32, cast into one."""
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype != torch.float32:
        flat = flat.float()
    return F.cross_entropy(flat, shifted_labels(labels, ignore_index).reshape(-1), ignore_index=ignore_index)


class _ReadOnlyConfig:
    """``module.config``: the (frozen) config the module was built from; assigning another one is refused,
    because the submodules made from the first would keep it (a change must rebuild them)."""

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return obj.__dict__["_config"]

    def __set__(self, obj, value) -> None:
        if "_config" in obj.__dict__:
            raise ConfigError(f"{type(obj).__name__}.config: {READ_ONLY_HINT}")
        obj.__dict__["_config"] = value.freeze()


class MPTModel(nn.Module):
    """The decoder stack (``transformer.*``): embeddings, blocks, final norm."""

    config = _ReadOnlyConfig()

    def __init__(self, config: MPTConfig, fast_paths: FastPathOptions | None = None):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        if config.use_learned_pos_emb:
            self.wpe = nn.Embedding(config.max_seq_len, config.d_model)
        self.emb_drop = nn.Dropout(config.emb_pdrop)
        self.blocks = nn.ModuleList([MPTBlock(config, fast_paths) for _ in range(config.n_layers)])
        self.norm_f = norm_factory(config)(config.d_model)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        slopes: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        sequence_id: torch.Tensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        past = cache.seq_len if cache is not None else 0
        kpm = None
        if attention_mask is not None:
            kpm = attention_mask.to(torch.bool)
            if kpm.shape != (b, past + t):
                raise ConfigError(
                    f"attention_mask has shape {tuple(kpm.shape)}; expected (batch, past + new tokens) = "
                    f"({b}, {past + t})"
                )
        if sequence_id is not None and not cfg.attn_config["attn_uses_sequence_id"]:
            sequence_id = None  # MPT ignores it unless attn_uses_sequence_id is set
        if hasattr(self, "wpe"):
            if past + t > cfg.max_seq_len:
                raise ConfigError(
                    f"sequence of {past + t} tokens exceeds max_seq_len={cfg.max_seq_len}: this model uses "
                    "learned position embeddings, which have no entry past their table (ALiBi models do not "
                    "have this limit)"
                )
            if kpm is not None:  # left padding: positions count real tokens only (as llm-foundry)
                pos = (kpm.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                pos = torch.arange(past, past + t, device=x.device)[None]
            x = x + self.wpe(pos)
        if cfg.embedding_fraction != 1:
            f = cfg.embedding_fraction
            x = x * f + x.detach() * (1 - f)
        x = self.emb_drop(x)
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            lc = cache.layer(i) if cache is not None else None
            if use_ckpt:
                x = checkpoint(block, x, slopes, kpm, sequence_id, lc, use_reentrant=False)
            else:
                x = block(x, slopes, kpm, sequence_id, lc)
        if cache is not None:
            cache.advance(t)
        return self.norm_f(x)


class MPTForCausalLM(nn.Module):
    """An MPT decoder with a language-model head (tied to ``wte`` unless ``tie_word_embeddings`` is false).

    ``config`` becomes read-only: the model and its modules read that one config (``model.config``), so
    settings cannot drift apart after construction; build a new model from ``config.replace(...)`` instead.
    ``device`` places the parameters (e.g. ``"meta"`` to build without allocating); by default the config's
    ``init_device`` does (``cpu`` / ``mixed`` → the current default device). ``fast_paths``: the options of
    the training fast paths (:class:`~mptkit.model.fastpath.FastPathOptions`: packed QKV, the chunked CPU
    MLP, flex compilation); runtime options, not part of the config or of a checkpoint
    (:meth:`set_fast_paths` changes them)."""

    config = _ReadOnlyConfig()

    def __init__(self, config: MPTConfig | dict | str, *, init: bool = True,
                 device: str | torch.device | None = None, fast_paths: FastPathOptions | None = None):
        super().__init__()
        config = load_model_config(config)
        self.config = config
        self.fast_paths = fast_paths or FastPathOptions()
        if device is None and config.init_device not in (None, "cpu", "mixed"):
            device = config.init_device
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.transformer = MPTModel(config, self.fast_paths)
            if not config.tie_word_embeddings:
                self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.register_buffer("alibi_slopes", torch.empty(0), persistent=False)
        self.reset_buffers()
        if init and not self.is_meta:
            init_weights(self, config)

    # ---------------------------------------------------------------- buffers / init / meta
    @property
    def is_meta(self) -> bool:
        return any(p.is_meta for p in self.parameters())

    def reset_buffers(self) -> None:
        """(Re)compute non-persistent buffers (ALiBi slopes) on the parameters' device."""
        dev = self.transformer.wte.weight.device
        if self.config.alibi:
            self.alibi_slopes = alibi_slopes(self.config.n_heads, self.config.attn_config["alibi_bias_max"], device=dev)
        else:
            self.alibi_slopes = torch.empty(0, device=dev)

    def init_weights(self) -> None:
        """MPT init in place; with a meta model, call after ``to_empty(device=...)``."""
        self.reset_buffers()
        init_weights(self, self.config)

    def materialize(self, device: str | torch.device = "cpu") -> MPTForCausalLM:
        """Allocate a meta-device model on ``device`` and initialise it (torchtitan-style)."""
        self.to_empty(device=device)
        self.init_weights()
        return self

    # ---------------------------------------------------------------- forward
    @property
    def slopes(self) -> torch.Tensor | None:
        return self.alibi_slopes if self.config.alibi else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        sequence_id: torch.Tensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
        return_logits: bool = True,
    ) -> CausalLMOutput:
        """``input_ids`` (B, T) -> logits (B, T, V); ``labels`` (B, T) gives the next-token loss
        (ignore index -100). ``attention_mask`` (B, past+T): 1 for real tokens (left padding).
        ``sequence_id`` (B, T): packed-document ids (used when ``attn_uses_sequence_id``).
        ``cache``: a KV cache (mptkit.infer.cache) to read and extend. ``logits_to_keep=k`` computes only
        the last k positions' logits (generation). ``return_logits=False`` returns ``logits=None`` and, with
        ``labels``, computes the loss fused with the LM head in chunks, so the (B, T, V) logits are never
        held (the training step's choice: faster, and memory independent of the vocabulary)."""
        h = self.transformer(
            input_ids, slopes=self.slopes, attention_mask=attention_mask, sequence_id=sequence_id,
            cache=cache, inputs_embeds=inputs_embeds,
        )
        if not return_logits:
            loss = None
            if labels is not None and not self._plain_head():  # a wrapped LM head: its own forward, unfused
                loss = causal_lm_loss(self.logits(h), labels)
            elif labels is not None:
                w = self.transformer.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight
                loss = linear_cross_entropy(
                    h.reshape(-1, h.shape[-1]), w, shifted_labels(labels).reshape(-1),
                    scale=self.config.logit_scale_value,
                )
            return CausalLMOutput(logits=None, loss=loss, hidden_states=h if return_hidden else None)
        hk = h[:, -logits_to_keep:] if logits_to_keep else h
        logits = self.logits(hk)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits=logits, loss=loss, hidden_states=h if return_hidden else None)

    def _plain_head(self) -> bool:
        """Whether the LM head's logits may be computed from its weight (tied: the embedding's; untied: an exact
        ``nn.Linear`` with no hooks, ``model/fastpath.py``'s predicate); a wrapped head (an adapter) is called as
        a module instead."""
        if getattr(self, "quant_head", None) is not None:  # the tied head's q8_0 copy (model/quant.py)
            return False
        return self.config.tie_word_embeddings or plain_reason(self.lm_head, nn.Linear) is None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self._plain_head():
            w = self.transformer.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight
            out = F.linear(h, w)
        elif getattr(self, "quant_head", None) is not None:
            out = self.quant_head(h)
        else:
            out = self.lm_head(h)
        s = self.config.logit_scale_value
        if s is not None:
            out = out * s
        return out

    # ---------------------------------------------------------------- sizes
    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        # QuantLinear weights: one per int8 value (q8_0), two per packed byte (q4_0)
        qh = getattr(self, "quant_head", None)  # a copy of the tied wte: not parameters of its own
        n += sum(m.in_features * m.out_features for m in self.modules() if hasattr(m, "weight_q") and m is not qh)
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel()
            if hasattr(self.transformer, "wpe"):
                n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), llm-foundry's formula:
        6 * N + 12 * n_layers * d_model * seq_len (N = all parameters, attention included)."""
        t = self.config.max_seq_len if seq_len is None else seq_len
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layers * c.d_model * t

    def flops_per_batch(self, batch_size: int, seq_len: int) -> int:
        return batch_size * seq_len * self.flops_per_token(seq_len)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.transformer.gradient_checkpointing = enabled

    def set_fast_paths(self, fast_paths: FastPathOptions) -> None:
        """Use ``fast_paths`` (:class:`~mptkit.model.fastpath.FastPathOptions`) in every block from now on."""
        if not isinstance(fast_paths, FastPathOptions):
            raise ConfigError(f"set_fast_paths: expected FastPathOptions, got {type(fast_paths).__name__}")
        self.fast_paths = fast_paths
        for blk in self.transformer.blocks:
            if hasattr(blk, "set_fast_paths"):
                blk.set_fast_paths(fast_paths)

    def set_attn_impl(self, impl: str) -> None:
        """Switch every layer's attention backend (``auto``, ``torch``, ``sdpa``, …)."""
        from mptkit.model.config import ATTN_IMPLS

        if impl not in ATTN_IMPLS:
            raise ConfigError(f"attn_impl '{impl}' is not one of {ATTN_IMPLS}")
        # the one setting that may change after construction: every module that reads it is updated here
        cfg = self.config.replace(attn_config={"attn_impl": impl}).freeze()
        for m in (self, self.transformer):
            m.__dict__["_config"] = cfg
        for blk in self.transformer.blocks:
            blk.attn.attn_impl = impl

    # ---------------------------------------------------------------- I/O
    # The file formats live in mptkit.io.hf_folder, which knows this class only as the ``cls`` handed to it;
    # these two lazy calls are the model layer's one documented import of mptkit.io (tests/project/test_layering.py).
    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device = "cpu",
        attn_impl: str | None = None,
        quant: str | None = None,
        **config_overrides: Any,
    ) -> MPTForCausalLM:
        """Load a HF-layout model folder (config.json + safetensors, or ``pytorch_model.bin`` read with
        ``weights_only=True``); ``config_overrides`` change config keys before the model is built. A quantised
        folder loads quantised; ``quant="int8"`` quantises the block Linears while reading (``model/quant.py``)."""
        from mptkit.io.hf_folder import load_pretrained

        return load_pretrained(
            cls, folder, dtype=dtype, device=device, attn_impl=attn_impl, quant=quant, **config_overrides
        )

    def save_pretrained(self, folder: str | os.PathLike, **kw: Any):
        """Write config.json + safetensors (sharded above ``max_shard_size``) and, given ``tokenizer``, its
        files: :func:`mptkit.io.hf_folder.save_pretrained`."""
        from mptkit.io.hf_folder import save_pretrained

        return save_pretrained(self, folder, **kw)
