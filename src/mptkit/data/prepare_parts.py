"""Preparation past one machine: ``mptkit data prepare ... --num-shards N --shard-index i`` and
``mptkit data merge PART... --out DIR``.

The expensive step of a prepare is tokenization; it is split by **files**: every part resolves the same sorted
file list (inputs, ``--max-files`` / ``--max-bytes``) and takes the contiguous run of files whose first byte
lies in its ``1/N`` of the corpus's bytes (file ``k`` goes to part ``floor(bytes before k * N / total)``), so the
parts are deterministic, disjoint, cover the corpus, and hold their files in the corpus's order. A part hashes
and reads only its own files, tokenizes them exactly as the one-machine prepare does (same documents, same
split routing by (file sha256, line), same ``[bos] ids [eos]``) and writes a *part folder*: ``chunks/`` of token
arrays (``{split}_tokens``, ``{split}_doclens``, as the ``.parts/`` cache) and ``part.json`` (written last).

The merge reads the parts in shard order and feeds their documents to the same packer, shard writer and
manifest builder as the one-machine prepare, so its shards are byte-identical and its manifest equal to a
one-machine prepare of the same inputs into a new folder, except the ``stats`` block (timings and counters of
the run, which differ between any two runs). Packing reads the tokens once, sequentially (no tokenization).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from mptkit.data.corpus import Issues
from mptkit.data.prepare import (
    SPLITS,
    _build_manifest,
    _Encoder,
    _folder_lock,
    _hash,
    _hash_sources,
    _iter_parts,
    _log_prepared,
    _Packer,
    _prefetch,
    _progress,
    _ShardWriter,
    _tokenize_batch,
    _write_dataset,
)
from mptkit.errors import DataError
from mptkit.utils.fs import atomic_path, atomic_write_json, real_path

log = logging.getLogger(__name__)

PART_FORMAT = "mptkit.tokens-part"
PART_FORMAT_VERSION = 1
# what every part of one corpus must agree on (the merge refuses parts that differ)
_SAME = ("num_shards", "listing", "settings", "pack", "tokenizer_fingerprint", "tokenizer", "tokenizer_vocab_size",
         "eos_text", "bos_text", "pad_token_id", "limits", "default_corpus")


def shard_of_files(sizes: list[int], num_shards: int) -> list[int]:
    """The part of each file: ``floor(bytes before it * N / total bytes)`` (contiguous runs, by bytes)."""
    total = sum(sizes)
    out, before = [], 0
    for i, n in enumerate(sizes):
        k = (before * num_shards) // total if total else (i * num_shards) // max(1, len(sizes))
        out.append(min(num_shards - 1, k))
        before += n
    return out


def check_part_args(num_shards, shard_index, out: Path, inputs) -> None:
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise DataError(f"--num-shards: expected a positive number of parts, got {num_shards!r}")
    if isinstance(shard_index, bool) or not isinstance(shard_index, int) or not 0 <= shard_index < num_shards:
        raise DataError(f"--shard-index: expected 0 .. {num_shards - 1} (the part to prepare of --num-shards "
                        f"{num_shards}), got {shard_index!r}")
    o = real_path(out)
    for item in inputs or []:
        p = real_path(Path(item).expanduser())
        if p.is_dir() and (o == p or p in o.parents):
            raise DataError(f"--out {out}: a part folder must not lie inside the input folder {item} (the other "
                            "parts, running at the same time, would read it as corpus text); put it elsewhere")


def _read_part(folder: Path) -> dict:
    pj = folder / "part.json"
    if not pj.is_file():
        raise DataError(f"{folder}: no part.json, not a finished part (an unfinished or failed `mptkit data prepare "
                        "--num-shards N --shard-index I` run: run that part again)")
    try:
        m = json.loads(pj.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{pj}: unreadable ({e})") from None
    if not isinstance(m, dict) or m.get("format") != PART_FORMAT:
        raise DataError(f"{pj}: not an mptkit part ({PART_FORMAT!r}) written by `mptkit data prepare --num-shards`")
    if m.get("format_version", 0) > PART_FORMAT_VERSION:
        raise DataError(f"{pj}: format_version {m.get('format_version')} is newer than this mptkit; upgrade mptkit")
    return m


def _chunks_intact(folder: Path, m: dict) -> bool:
    return all((folder / c["file"]).is_file() and (folder / c["file"]).stat().st_size == c["bytes"]
               for c in m.get("chunks", []))


def prepare_part(files: list[Path], out: Path, num_shards: int, shard_index: int, *, tok, tok_path, fp, settings,
                 pack, eos_text, bos_text, n_tok, num_workers, strict, progress, limits, default_corpus, force,
                 t0) -> dict:
    """Tokenize part ``shard_index`` of ``num_shards`` of ``files`` (the whole corpus's sorted list) into the
    part folder ``out``; returns its ``part.json``. A no-op when ``out`` already holds this part of the same
    inputs, tokenizer and options."""
    sizes = []
    for f in files:
        try:
            sizes.append(f.stat().st_size)
        except OSError as e:
            from mptkit.utils.outputs import describe_os_error

            raise DataError(describe_os_error(e, f, "cannot read input")) from None
    owner = shard_of_files(sizes, num_shards)
    mine = [i for i, o in enumerate(owner) if o == shard_index]
    lo, hi = (mine[0], mine[-1] + 1) if mine else (0, 0)
    if not mine:  # where the part would begin: after the files of the parts before it
        lo = hi = sum(1 for o in owner if o < shard_index)
    listing = [[str(f), n] for f, n in zip(files, sizes)]
    sources = _hash_sources(files[lo:hi], out / "part.json", trust_mtime=not force)
    key = _hash({"settings": settings, "pack": pack, "num_shards": num_shards, "shard_index": shard_index,
                 "listing": listing, "sources": [(s["path"], s["sha256"]) for s in sources]})
    with _folder_lock(out):
        with contextlib.suppress(DataError):
            old = _read_part(out)
            if not force and old.get("key") == key and _chunks_intact(out, old):
                log.info("%s is up to date (part %d of %d, same inputs, tokenizer and options): nothing to do", out,
                         shard_index, num_shards)
                return old
        (out / "part.json").unlink(missing_ok=True)  # the part is unfinished from here until part.json lands
        shutil.rmtree(out / "chunks", ignore_errors=True)
        (out / "chunks").mkdir(parents=True)
        issues = Issues(strict=strict)
        encoder = _Encoder(tok, num_workers)
        eos = np.asarray(settings["eos_ids"], dtype=np.int64)
        bos = np.asarray(settings["bos_ids"], dtype=np.int64)
        doc_counts = [0] * len(sources)
        chunks, tokens = [], 0
        bar = _progress(progress, sum(s["bytes"] for s in sources))
        try:
            parts = _prefetch(_iter_parts(sources, settings["text_field"], issues, settings["part_bytes"], doc_counts))
            for pi, batch in enumerate(parts):
                part, n = _tokenize_batch(batch, sources, settings, encoder, eos, bos, settings["dtype"])
                tokens += n
                rel = f"chunks/chunk-{pi:06d}.npz"
                with atomic_path(out / rel) as tmp, open(tmp, "wb") as f:
                    np.savez(f, **part)
                chunks.append({"file": rel, "bytes": (out / rel).stat().st_size,
                               "documents": int(sum(len(part[f"{s}_doclens"]) for s in SPLITS))})
                if bar is not None:
                    bar.update(min(sum(len(t) for _, _, t in batch), max(bar.total - bar.n, 0)))
        finally:
            if bar is not None:
                bar.close()
        bad = issues.as_dict()
        bad["examples"] = [e for e in bad["examples"] if e != "... (more not shown)"]
        m = {"format": PART_FORMAT, "format_version": PART_FORMAT_VERSION, "key": key, "num_shards": num_shards,
             "shard_index": shard_index, "listing": listing, "range": [lo, hi],
             "sources": [{**s, "documents": doc_counts[i]} for i, s in enumerate(sources)],
             "settings": settings, "pack": pack, "tokenizer_fingerprint": fp,
             "tokenizer": {"path": tok_path, "class": type(tok).__name__, "size": len(tok)},
             "tokenizer_vocab_size": n_tok, "eos_text": eos_text, "bos_text": bos_text,
             "pad_token_id": getattr(tok, "pad_token_id", None), "limits": limits, "default_corpus": default_corpus,
             "bad_inputs": bad, "chunks": chunks,
             "stats": {"elapsed_s": round(time.perf_counter() - t0, 3), "tokenized_tokens": tokens,
                       "num_workers": num_workers}}
        atomic_write_json(out / "part.json", m)
    log.info("prepared part %d of %d into %s: %d of %d files, %s tokens", shard_index, num_shards, out, hi - lo,
             len(files), f"{tokens:,}")
    return m


def merge_parts(parts: list, out_dir, *, progress: bool | None = None, force: bool = False) -> dict:
    """The dataset of the whole corpus from its part folders (any order): shards and manifest as a one-machine
    prepare of the same inputs writes them (see the module docstring). Returns the manifest."""
    from mptkit.data.prepare import _is_prepare_output
    from mptkit.utils.outputs import check_output

    t0 = time.perf_counter()
    if not parts:
        raise DataError("mptkit data merge: name the part folders (PART ...) written by `mptkit data prepare "
                        "--num-shards N --shard-index I`")
    folders = [Path(p) for p in parts]
    out = Path(out_dir)
    check_output(out, kind="folder", flag="--out", inputs=[p for p in folders if p.exists()],
                 replaceable=_is_prepare_output, earlier="a prepared dataset (manifest.json)", overwrite=None,
                 error=DataError)
    metas = []
    for f in folders:
        m = _read_part(f)
        if not _chunks_intact(f, m):
            raise DataError(f"{f}: a chunk listed in part.json is missing or truncated; run that part again")
        metas.append((m, f))
    metas.sort(key=lambda mf: mf[0]["shard_index"])
    first, f0 = metas[0]
    n = first["num_shards"]
    idx = [m["shard_index"] for m, _ in metas]
    dup = sorted({i for i in idx if idx.count(i) > 1})
    if dup:
        raise DataError(f"part {dup[0]} given twice ({', '.join(str(f) for m, f in metas if m['shard_index'] == dup[0])})")
    missing = sorted(set(range(n)) - set(idx))
    if missing:
        raise DataError(f"parts {missing} of {n} are missing: prepare them with --num-shards {n} --shard-index I and "
                        "name every part folder")
    for m, f in metas[1:]:
        for k in _SAME:
            if m.get(k) != first.get(k):
                what = "the corpus's file list" if k == "listing" else k
                raise DataError(f"{f}: {what} differs from {f0}'s: the parts come from different prepare commands "
                                "(inputs, tokenizer and options must be the same for every part)")
    if [m["range"] for m, _ in metas] != [[a, b] for a, b in zip([0, *[m["range"][1] for m, _ in metas[:-1]]],
                                                                [m["range"][1] for m, _ in metas])] or \
            metas[-1][0]["range"][1] != len(first["listing"]):
        raise DataError("the parts do not cover the corpus's files in order (part.json ranges); prepare them again")
    settings, pack = first["settings"], first["pack"]
    sources = [{k: s[k] for k in ("path", "sha256", "bytes", "mtime_ns")} for m, _ in metas for s in m["sources"]]
    doc_counts = [int(s["documents"]) for m, _ in metas for s in m["sources"]]
    key = _hash({"settings": settings, "pack": pack, "sources": [(s["path"], s["sha256"]) for s in sources]})
    T, dtype = int(pack["max_seq_len"]), settings["dtype"]

    def produce(gen: str) -> dict:
        samples_per_shard = max(1, pack["shard_bytes"] // (T * np.dtype(dtype).itemsize))
        writers = {s: _ShardWriter(out, s, T, dtype, samples_per_shard, subdir=gen) for s in SPLITS}
        packers = {s: _Packer(writers[s], T, pack["wrap"]) for s in SPLITS}
        total_tokens, nchunks = 0, 0
        t_loop = time.perf_counter()
        try:
            for m, f in metas:
                for c in m["chunks"]:
                    with np.load(f / c["file"], allow_pickle=False) as z:
                        for name in SPLITS:
                            toks = z[f"{name}_tokens"].astype(np.int64)
                            total_tokens += len(toks)
                            packers[name].add(toks, z[f"{name}_doclens"])
                    nchunks += 1
            for p in packers.values():
                p.finish()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        counts: dict = {}
        examples: list = []
        for m, _ in metas:
            for k, v in m["bad_inputs"]["counts"].items():
                counts[k] = counts.get(k, 0) + v
            examples += m["bad_inputs"]["examples"]
        limit = Issues().max_examples
        if sum(counts.values()) > limit:
            examples = [*examples[:limit], "... (more not shown)"]
        bad = {"total": sum(counts.values()), "counts": dict(sorted(counts.items())), "examples": examples}
        stats = {"parts": nchunks, "parts_reused": 0,
                 "tokenized_tokens": sum(m["stats"]["tokenized_tokens"] for m, _ in metas),
                 "num_workers": first["stats"]["num_workers"], "merged_parts": n,
                 "parts_elapsed_s": [m["stats"]["elapsed_s"] for m, _ in metas]}
        manifest = _build_manifest(packers, writers, sources, doc_counts, bad, settings, pack, key,
                                   first["tokenizer_fingerprint"], first["tokenizer"], first["tokenizer_vocab_size"],
                                   first["eos_text"], first["bos_text"], first["pad_token_id"], T, dtype,
                                   first["limits"], first["default_corpus"], t0, t_loop, total_tokens, stats)
        atomic_write_json(out / "manifest.json", manifest)
        _log_prepared(out, manifest, total_tokens, f"; merged from {n} parts")
        return manifest

    return _write_dataset(out, key, force, produce)


def default_shard_index() -> int | None:
    """The array task's index from the batch system's environment (``SLURM_ARRAY_TASK_ID``, PBS Pro's
    ``PBS_ARRAY_INDEX``, a Kubernetes indexed Job's ``JOB_COMPLETION_INDEX``), None when none is set."""
    for var in ("SLURM_ARRAY_TASK_ID", "PBS_ARRAY_INDEX", "JOB_COMPLETION_INDEX"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None
