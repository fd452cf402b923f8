"""`mptkit tokenizer train`, `mptkit data prepare`, `mptkit data inspect`, `mptkit data finetune-check`."""

from __future__ import annotations

import argparse
import json


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="files, folders or globs (.txt/.md/.py/any text, .jsonl/.json, .parquet, .csv, a local "
                        "datasets folder); none = the Python standard library source tree")
    p.add_argument("--text-field", default="text", help="JSON/CSV/Parquet field holding the text (default: text)")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N files of the corpus")
    p.add_argument("--max-bytes", type=int, default=None, help="use only the first files up to N bytes")
    p.add_argument("--hf-split", default=None, help="split of a local datasets DatasetDict folder (default: train)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad input (default: skip and count)")


def _tokenizer_train(args: argparse.Namespace) -> int:
    from mptkit.data.tokenizer import padded_vocab_size, tokenizer_fingerprint, train_tokenizer
    from mptkit.io.tokenizer_files import load_tokenizer

    out = train_tokenizer(args.inputs or None, args.vocab_size, args.out, min_frequency=args.min_frequency,
                          text_field=args.text_field, max_files=args.max_files, max_bytes=args.max_bytes,
                          hf_split=args.hf_split, strict=args.strict, show_progress=not args.quiet)
    tok = load_tokenizer(out)
    print(f"tokenizer   {out}")
    print(f"tokens      {len(tok)} (model vocab_size {padded_vocab_size(tok)})")
    print(f"fingerprint {tokenizer_fingerprint(tok)}")
    return 0


def _model_limits(spec: str) -> tuple[int, int]:
    """(vocab_size, max_seq_len) of a model spec (recipe name, YAML, config.json or model folder)."""
    from mptkit.errors import DataError, MPTKitError

    try:
        from mptkit.model import load_model_config

        cfg = load_model_config(spec)
    except DataError:
        raise
    except MPTKitError as e:  # ConfigError / CheckpointError from the model area
        raise DataError(f"--model {spec}: {e}") from None
    return int(cfg.vocab_size), int(cfg.max_seq_len)


def _data_prepare(args: argparse.Namespace) -> int:
    from mptkit.data.prepare import prepare_dataset
    from mptkit.errors import DataError

    if args.model:
        vocab, seq = _model_limits(args.model)
        if args.model_vocab_size is None:
            args.model_vocab_size = vocab
        if args.max_seq_len > seq:
            raise DataError(f"--max-seq-len {args.max_seq_len} exceeds the model's max_seq_len {seq} ({args.model})")
    if args.num_shards is not None and args.shard_index is None:
        from mptkit.data.prepare_parts import default_shard_index

        args.shard_index = default_shard_index()
        if args.shard_index is None:
            raise DataError("--num-shards needs --shard-index I (or a batch system's array index in the environment: "
                            "SLURM_ARRAY_TASK_ID, PBS_ARRAY_INDEX, JOB_COMPLETION_INDEX)")
    if args.shard_index is not None and args.num_shards is None:
        raise DataError("--shard-index needs --num-shards N (how many parts the corpus is prepared in)")
    m = prepare_dataset(args.inputs or None, args.tokenizer, args.out, args.max_seq_len, text_field=args.text_field,
                        eos_text=args.eos_text, bos_text=args.bos_text, wrap=not args.no_wrap,
                        val_fraction=args.val_fraction, split_seed=args.split_seed, max_files=args.max_files,
                        max_bytes=args.max_bytes, hf_split=args.hf_split, strict=args.strict,
                        num_workers=args.workers, model_vocab_size=args.model_vocab_size, force=args.force,
                        keep_parts=args.keep_parts, progress=False if args.quiet else None,
                        num_shards=args.num_shards, shard_index=args.shard_index)
    if args.num_shards is not None:
        lo, hi = m["range"]
        print(f"part         {m['shard_index']} of {m['num_shards']} -> {args.out}")
        print(f"files        {hi - lo} of {len(m['listing'])} ({sum(s['bytes'] for s in m['sources']):,} bytes), "
              f"{sum(s['documents'] for s in m['sources']):,} documents, {m['stats']['tokenized_tokens']:,} tokens")
        print(f"next         mptkit data merge PART_0 ... PART_{m['num_shards'] - 1} --out DIR (once every part "
              "is done)")
        return 0
    _print_summary(args.out, m)
    return 0


def _data_merge(args: argparse.Namespace) -> int:
    from mptkit.data.prepare_parts import merge_parts

    m = merge_parts(args.parts, args.out, progress=False if args.quiet else None, force=args.force)
    _print_summary(args.out, m)
    return 0


def _print_summary(folder, m: dict) -> None:
    print(f"dataset      {folder}")
    print(f"tokenizer    {m['tokenizer']['path']} ({m['tokenizer_vocab_size']} tokens, model vocab_size "
          f"{m['vocab_size']}, {m['tokenizer_fingerprint']})")
    print(f"samples      train {m['num_samples']['train']:,}  val {m['num_samples']['val']:,}  "
          f"x {m['max_seq_len']} tokens ({m['dtype']}, {'wrap' if m['wrap'] else 'no-wrap'})")
    print(f"tokens       train {m['num_tokens']['train']:,}  val {m['num_tokens']['val']:,}")
    docs = sum(s['documents'] for s in m['sources'])
    print(f"sources      {len(m['sources'])} files, {docs:,} documents"
          + (" (Python stdlib source)" if m.get("default_corpus") else ""))
    bad = m["bad_inputs"]
    if bad["total"]:
        print(f"bad inputs   {bad['total']} skipped: " + ", ".join(f"{k} {v}" for k, v in bad["counts"].items()))
    st = m.get("stats", {})
    if st:
        print(f"speed        {st.get('tokens_per_s', 0):,} tokens/s ({st.get('elapsed_s')} s)")


def _inspect_mds(args: argparse.Namespace) -> int:
    """`mptkit data inspect` of an MDS folder: samples and sample length per split (and decoded samples)."""
    from pathlib import Path

    from mptkit.data.mds import MDS_SPLIT_NAMES, MDSTokenDataset, mds_split_folder
    from mptkit.errors import DataError

    p = Path(args.folder)
    subs = [None] if (p / "index.json").is_file() else sorted(
        {s for n in MDS_SPLIT_NAMES for s in [mds_split_folder(p, n)] if s})
    print(f"dataset      {p} (MDS: index.json; no tokenizer recorded)")
    shown = None
    for sub in subs:
        ds = MDSTokenDataset(p, sub)
        n = len(ds)
        seq = len(ds[0]["input_ids"]) if n else 0
        print(f"samples      {sub or '(root)'} {n:,} x {seq} tokens ({len(ds._native.shards) if ds._native else '?'} "
              "shards)")
        if shown is None and (sub is None or sub == mds_split_folder(p, args.split)):
            shown = ds
    if args.show and shown is not None and len(shown):
        if not args.tokenizer:
            raise DataError(f"{p}: an MDS folder records no tokenizer: pass --tokenizer to decode samples")
        from mptkit.io.tokenizer_files import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        for i in range(min(args.show, len(shown))):
            print(f"--- {args.split}[{i}]")
            print(tok.decode(shown[i]["input_ids"].tolist()))
    return 0


def _data_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mptkit.data.mds import is_mds_folder
    from mptkit.data.prepare import read_manifest
    from mptkit.data.shards import TokenDataset

    if not (Path(args.folder) / "manifest.json").is_file() and is_mds_folder(args.folder):
        return _inspect_mds(args)
    m = read_manifest(args.folder)
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    _print_summary(args.folder, m)
    ds = TokenDataset(args.folder, args.split, verify=args.verify)
    if args.verify:
        print(f"verified     all {args.split} shards match their sha256")
    if args.show and len(ds):
        from mptkit.io.tokenizer_files import load_tokenizer

        tok = load_tokenizer(args.tokenizer or m["tokenizer"]["path"])
        for i in range(min(args.show, len(ds))):
            print(f"--- {args.split}[{i}]")
            print(tok.decode(ds[i]["input_ids"].tolist()))
    return 0


def render_targets(tok, ids: list[int], labels: list[int], open_: str = "[[", close: str = "]]") -> str:
    """The sample's text with the trained spans (labels != -100) between ``open_`` and ``close``."""
    out, span, trained = [], [], False
    for t, lab in zip(ids, labels):
        now = lab != -100
        if now != trained and span:
            text = tok.decode(span)
            out.append(f"{open_}{text}{close}" if trained else text)
            span = []
        trained = now
        span.append(t)
    if span:
        text = tok.decode(span)
        out.append(f"{open_}{text}{close}" if trained else text)
    return "".join(out)


def _finetune_check(args: argparse.Namespace) -> int:
    from mptkit.data.finetune import FinetuneOptions, build_finetune_dataset
    from mptkit.io.tokenizer_files import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    opts = FinetuneOptions(max_seq_len=args.max_seq_len, target_prompts=args.target_prompts,
                           target_responses=args.target_responses, packing_ratio="auto" if args.packing else None,
                           system_prompt=None if args.no_system else "default", strict=args.strict)
    ds = build_finetune_dataset(args.data, tok, opts, split=args.split)
    st = ds.stats
    print(f"data         {args.data} ({args.split})")
    print(f"records      {st.records} parsed; {st.bad['total']} bad skipped {st.bad['counts'] or ''}".rstrip())
    print(f"examples     {st.examples} ({st.truncated} cut at {args.max_seq_len} tokens, {st.dropped_too_long} dropped: "
          "the prompt fills the window)")
    print(f"samples      {st.samples} of {args.max_seq_len} tokens ({st.examples / max(1, st.samples):.2f} examples per "
          f"sample), {st.tokens} tokens, {st.target_tokens} trained ({st.target_tokens / max(1, st.tokens):.0%})")
    for i in range(min(args.show, len(ds))):
        n = int(ds.lengths[i])
        print(f"--- sample {i} ({n} tokens; trained spans in [[...]])")
        print(render_targets(tok, ds.input_ids[i, :n].tolist(), ds.labels[i, :n].tolist()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    # mptkit tokenizer ...
    tp = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer",
                        description="Tokenizer tools.")
    tsub = tp.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tt = tsub.add_parser("train", help="train a GPT-NeoX-style byte-level BPE on a corpus",
                         description="Train a GPT-NeoX-style byte-level BPE (specials <|endoftext|> <|padding|> "
                                     "<|im_start|> <|im_end|>) and save it as an HF tokenizer folder.")
    _add_corpus_args(tt)
    tt.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (rounded up to a multiple of 64)")
    tt.add_argument("--out", required=True, help="output folder")
    tt.add_argument("--min-frequency", type=int, default=2)
    tt.set_defaults(func=_tokenizer_train)
    tp.set_defaults(func=lambda a: (tp.print_help(), 0)[1])

    # mptkit data ...
    dp = sub.add_parser("data", help="prepare and inspect token datasets", description="Dataset tools.")
    dsub = dp.add_subparsers(dest="data_command", metavar="ACTION")
    pp = dsub.add_parser("prepare", help="tokenize a corpus into packed shards + manifest",
                         description="Tokenize a corpus in parallel into fixed-length samples (numpy shards + "
                                     "manifest.json). Re-running on unchanged inputs is a no-op; an interrupted "
                                     "run resumes.")
    _add_corpus_args(pp)
    pp.add_argument("--tokenizer", required=True, help="a local HF tokenizer folder (or model folder)")
    pp.add_argument("--max-seq-len", type=int, required=True, help="tokens per sample")
    pp.add_argument("--out", required=True, help="output folder")
    pp.add_argument("--eos-text", default=None, help="document separator (default: the tokenizer's EOS token)")
    pp.add_argument("--bos-text", default=None, help="text prepended to every document (default: none)")
    pp.add_argument("--no-wrap", action="store_true",
                    help="start every sample at a document start (drop the rest of a sample's last document)")
    pp.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents for val (default 0.01)")
    pp.add_argument("--split-seed", type=int, default=0)
    pp.add_argument("--workers", type=int, default=None, help="tokenization threads (default: all cores)")
    pp.add_argument("--model-vocab-size", type=int, default=None,
                    help="refuse a tokenizer with more tokens than this model vocabulary")
    pp.add_argument("--model", default=None,
                    help="check the tokenizer and --max-seq-len against this model (recipe, YAML, config.json, folder)")
    pp.add_argument("--force", action="store_true", help="prepare again even if the folder is up to date")
    pp.add_argument("--keep-parts", action="store_true", help="keep the per-part token cache (.parts/)")
    pp.add_argument("--num-shards", type=int, default=None,
                    help="prepare the corpus in N parts (one machine or job each; then `mptkit data merge`)")
    pp.add_argument("--shard-index", type=int, default=None,
                    help="the part to prepare, 0..N-1 (default: the batch system's array index, e.g. "
                         "SLURM_ARRAY_TASK_ID); --out is then the part's folder")
    pp.set_defaults(func=_data_prepare)
    mp = dsub.add_parser("merge", help="write the dataset of the whole from the parts of a sharded prepare",
                         description="Pack the part folders of `mptkit data prepare --num-shards N --shard-index I` "
                                     "into one prepared folder: shards and manifest as a one-machine prepare of the "
                                     "same inputs writes them (docs/data.md).")
    mp.add_argument("parts", nargs="+", metavar="PART", help="the part folders (any order; all N of them)")
    mp.add_argument("--out", required=True, help="output folder (the prepared dataset)")
    mp.add_argument("--force", action="store_true", help="merge again even if the folder is up to date")
    mp.set_defaults(func=_data_merge)
    ip = dsub.add_parser("inspect", help="summarize a prepared folder or an MDS folder (and decode samples)")
    ip.add_argument("folder")
    ip.add_argument("--split", default="train")
    ip.add_argument("--show", type=int, default=0, help="decode the first N samples")
    ip.add_argument("--tokenizer", default=None, help="tokenizer for --show (default: the one in the manifest)")
    ip.add_argument("--verify", action="store_true", help="check every shard's sha256")
    ip.add_argument("--json", action="store_true", help="print the manifest")
    ip.set_defaults(func=_data_inspect)
    fc = dsub.add_parser("finetune-check", help="what a finetuning run would train on: counts, and samples with "
                                                "the trained spans marked",
                         description="Read, format and tokenize finetuning examples exactly as `mptkit train` with "
                                     "train_loader.name: finetuning does, and report them (docs/finetuning.md).")
    fc.add_argument("data", help="a file or folder of examples, or a built-in dataset (mptkit:stdlib-chat, ...)")
    fc.add_argument("--tokenizer", required=True, help="a tokenizer folder or model folder")
    fc.add_argument("--max-seq-len", type=int, required=True)
    fc.add_argument("--split", default="train")
    fc.add_argument("--target-prompts", default="none", help="none | all | length>=N")
    fc.add_argument("--target-responses", default="last", choices=["last", "all"])
    fc.add_argument("--packing", action="store_true", help="pack examples (packing_ratio: auto)")
    fc.add_argument("--no-system", action="store_true", help="no default system message for chats without one")
    fc.add_argument("--strict", action="store_true", help="fail on the first bad record")
    fc.add_argument("--show", type=int, default=1, help="print the first N samples (default 1)")
    fc.set_defaults(func=_finetune_check)
    dp.set_defaults(func=lambda a: (dp.print_help(), 0)[1])
