"""`mptkit convert composer CKPT.pt|DIR OUT`: a thin wrapper over mptkit.export.composer."""

from __future__ import annotations

import argparse


def _composer(args: argparse.Namespace) -> int:
    from mptkit.export.composer import convert_composer

    out = convert_composer(args.ckpt, args.out, config=args.config, tokenizer=args.tokenizer, dtype=args.dtype,
                           layout=args.layout, overwrite=args.overwrite)
    print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert another tool's checkpoint into an HF model folder",
                       description="Convert a checkpoint written by another training tool into an HF folder.")
    cv = p.add_subparsers(dest="convert_format", metavar="FORMAT")
    cv.required = True
    c = cv.add_parser("composer", help="an llm-foundry / Composer MPT checkpoint (.pt or sharded folder) -> an HF folder",
                      description="Write the MPT model of an llm-foundry / Composer checkpoint CKPT.pt (state.model "
                                  "with model.transformer.* tensors) as an HF folder OUT (config.json + "
                                  "safetensors + tokenizer) that mptkit and transformers load. CKPT may also be the "
                                  "folder of a sharded (FSDP, torch.distributed.checkpoint) checkpoint (.metadata + "
                                  "__*_0.distcp), read in this one process. The pickle is "
                                  "read through an allow-list: anything but tensors, containers, numpy arrays "
                                  "and Composer's own state is refused, and nothing in it runs. Written "
                                  "atomically.")
    c.add_argument("ckpt", metavar="CKPT.pt", help="the Composer checkpoint file, or a sharded checkpoint's folder")
    c.add_argument("out", metavar="OUT", help="the folder to write")
    c.add_argument("--config", default=None, metavar="CONFIG",
                   help="config.json, model folder or model YAML (when the checkpoint carries no HF config)")
    c.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer folder to include instead of the one the checkpoint carries")
    c.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weight dtype (default fp32)")
    c.add_argument("--layout", default="transformers", choices=["transformers", "mosaicml"],
                   help="config.json layout: transformers' MptForCausalLM (default) or MosaicML's MPTForCausalLM")
    c.add_argument("--overwrite", action="store_true", help="replace an earlier export at OUT")
    c.set_defaults(func=_composer)
