"""`mptkit export hf|gguf|quant`: thin wrappers over mptkit.export.hf / .gguf / .quant."""

from __future__ import annotations

import argparse


def _hf(args: argparse.Namespace) -> int:
    from mptkit.export.hf import export_hf

    export_hf(args.src, args.out, dtype=args.dtype, layout=args.layout, max_shard_size=args.max_shard_size,
              tokenizer=args.tokenizer, overwrite=args.overwrite, merge=args.merge, adapter_only=args.adapter_only,
              adapter=args.adapter)  # logs what it wrote
    return 0


def _gguf(args: argparse.Namespace) -> int:
    from mptkit.export.gguf import export_gguf

    export_gguf(args.model, args.out, dtype=args.dtype, tokenizer=args.tokenizer,
                overwrite=args.overwrite)  # logs what it wrote
    return 0


def _quant(args: argparse.Namespace) -> int:
    from mptkit.export.quant import export_quant

    export_quant(args.model, args.out, quant=args.quant, max_shard_size=args.max_shard_size,
                 tokenizer=args.tokenizer, overwrite=args.overwrite)  # logs what it wrote
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a model as a HF folder (transformers) or a GGUF file (llama.cpp)",
                       description="Export a model folder, a training run or a checkpoint.")
    ex = p.add_subparsers(dest="export_format", metavar="FORMAT")
    ex.required = True

    h = ex.add_parser("hf", help="a HF folder: config.json + safetensors + tokenizer",
                      description="Write SRC (a model folder, a training run or a checkpoint: the newest valid "
                                  "checkpoint is used) as a self-contained HF folder OUT that mptkit and "
                                  "transformers' AutoModelForCausalLM load. Written atomically.")
    h.add_argument("src", metavar="SRC", help="model folder, training run (save_folder) or checkpoint folder")
    h.add_argument("out", metavar="OUT", help="the folder to write")
    h.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype (default fp32)")
    h.add_argument("--layout", default="transformers", choices=["transformers", "mosaicml"],
                   help="config.json layout: transformers' MptForCausalLM (default) or MosaicML's MPTForCausalLM")
    h.add_argument("--max-shard-size", default="5GB", help="split weights into shards above this size (5GB)")
    h.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder to include, when the model folder / run has none")
    h.add_argument("--overwrite", action="store_true", help="replace an earlier export at OUT")
    lora = h.add_mutually_exclusive_group()
    lora.add_argument("--merge", action="store_true",
                      help="a LoRA run / adapter: fold the adapter into the base's weights (a plain HF folder)")
    lora.add_argument("--adapter-only", action="store_true",
                      help="a LoRA run / adapter: write the adapter alone (peft's adapter_config.json + "
                           "adapter_model.safetensors) with the tokenizer")
    h.add_argument("--adapter", default=None, metavar="ADAPTER",
                   help="a LoRA adapter folder or LoRA run to apply on top of SRC (with --merge)")
    h.set_defaults(func=_hf)

    g = ex.add_parser("gguf", help="a GGUF file for llama.cpp (architecture mpt)",
                      description="Write MODEL (a model folder, a training run or a checkpoint) as one GGUF file "
                                  "in llama.cpp's mpt architecture, tokenizer embedded; MODEL may also be a "
                                  "quantised folder (written in its own q8_0 / q4_0 blocks, streaming). "
                                  "Settings llama.cpp cannot compute are refused with the key named.")
    g.add_argument("model", metavar="MODEL", help="model folder, training run or checkpoint folder")
    g.add_argument("out", metavar="OUT.gguf", help="the file to write")
    g.add_argument("--dtype", default=None, choices=["f32", "f16", "q8_0", "q4_0", "q4_k"],
                   help="type of the weight matrices (norms and biases stay f32); q8_0 / q4_0 quantise the "
                        "block Linears with mptkit's blocks (the weights `--quant int8|q4` runs), q4_k with "
                        "ggml's Q4_K super-blocks of 256 (a matrix whose rows are not whole super-blocks: "
                        "q4_0, named in the log), embeddings and output head stay f32; default f32. A "
                        "quantised folder (`mptkit export quant`'s) is written in its own blocks as they are "
                        "(int8: q8_0, q4: q4_0; the default for it, the only type it takes)")
    g.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder to embed, when the model folder / run has none")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier GGUF file at OUT.gguf")
    g.set_defaults(func=_gguf)

    q = ex.add_parser("quant", help="a quantised model folder (int8 / q4: llama.cpp's q8_0 / q4_0 blocks) for mptkit",
                      description="Write MODEL (a model folder, a training run or a checkpoint) with its block "
                                  "Linears quantised, read and quantised tensor by tensor, as a model folder "
                                  "that mptkit generate / chat / serve / eval load quantised (embeddings, LM "
                                  "head, norms and biases stay fp32; see docs/inference.md). Written atomically.")
    q.add_argument("model", metavar="MODEL", help="model folder, training run or checkpoint folder")
    q.add_argument("out", metavar="OUT", help="the folder to write")
    q.add_argument("--quant", "--type", dest="quant", default="int8", metavar="TYPE",
                   help="quantisation type: int8 (q8_0 blocks, the default) or q4 (q4_0 blocks); q8_0 / q4_0 "
                        "also accepted")
    q.add_argument("--max-shard-size", default="5GB", help="split weights into shards above this size (5GB)")
    q.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder to include, when the model folder / run has none")
    q.add_argument("--overwrite", action="store_true", help="replace an earlier export at OUT")
    q.set_defaults(func=_quant)
