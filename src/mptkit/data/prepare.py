"""Corpus -> packed token shards + manifest (``mptkit data prepare``).

Pipeline (one pass, deterministic):

1. Resolve the inputs to a sorted file list and hash every file (sha256). The *key* of the run is a hash
   of the tokenizer fingerprint, the sources and every option; if ``manifest.json`` already holds that key
   and its shards are intact, the call is a no-op.
2. Read documents (see :mod:`mptkit.data.corpus`) and group consecutive ones into *parts* of about
   ``part_bytes`` of text. Each part is tokenized with the tokenizer's Rust ``encode_batch`` over all cores
   (long documents are cut at safe line breaks first so the cores stay balanced; the ids are identical to
   encoding the whole document), each document becomes ``[bos] ids [eos]`` (llm-foundry's
   ``concat_tokens``), and is routed to the ``train`` or ``val`` split by a seeded hash of (file sha256,
   line). Finished parts are cached under ``.parts/`` (atomic writes), so an interrupted run resumes
   without tokenizing them again.
3. Each split's token stream is cut into samples of ``max_seq_len`` tokens: ``wrap`` (default) chops the
   continuous stream; no-wrap starts every sample at a document start and drops the rest of the buffer
   once a sample is emitted (llm-foundry's ``--no_wrap``). The tail shorter than ``max_seq_len`` is
   dropped (counted in the manifest). Samples are written to ``<split>/shard-NNNNN.bin`` (raw C-order
   ``(num_samples, max_seq_len)`` arrays of uint16, or uint32 when a token id exceeds 65535).
4. ``manifest.json`` is written last, atomically: a folder without it (a crash) is never taken as
   complete. Each run writes its shards into a new *generation* folder ``genN/`` that no manifest names
   yet, so a previous dataset stays complete and readable until the new manifest replaces the old one in
   one rename; only then are the previous generation's shards deleted. A run that fails or is killed
   leaves the previous dataset as it was; the next run (holding the folder's lock, so no other prepare is
   running on it) removes what the killed one left: unreferenced ``genN/`` folders and temporary files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mptkit.data.corpus import Issues, file_sha256, is_prepared_dir, iter_documents, resolve_inputs
from mptkit.data.tokenizer import _backend, padded_vocab_size, tokenizer_fingerprint
from mptkit.errors import DataError
from mptkit.io.tokenizer_files import load_tokenizer
from mptkit.utils.fs import atomic_path, atomic_write_json
from mptkit.utils.outputs import check_output, write_errors

log = logging.getLogger(__name__)

FORMAT = "mptkit.tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
_CHUNK_CHARS = 1 << 16  # long documents are encoded in pieces of about this many characters
# Memory bounds for huge documents (the Rust encoder holds ~150-200 bytes per byte of a piece while it works,
# and every encoding of one call until it returns): a run of more than _PIECE_BYTES (UTF-8) without a safe
# cut point is cut anyway (at a space between words if it has one, else at a character boundary), and one
# encode call gets at most _BATCH_BYTES of text.
_PIECE_BYTES = 1 << 20
_BATCH_BYTES = 8 << 20


# ------------------------------------------------------------------------------------------ helpers
def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _split_of(seed: int, sha: str, line: int, val_fraction: float) -> int:
    """0 = train, 1 = val: a seeded hash of the document's identity (its file's sha256 and its line)."""
    if val_fraction <= 0:
        return 0
    h = hashlib.blake2b(f"{seed}|{sha}|{line}".encode(), digest_size=8).digest()
    return int(int.from_bytes(h, "little") / 2.0**64 < val_fraction)


# Safe cut points for a byte-level (GPT-2/NeoX regex) pre-tokenizer + NFC: (a) after a lone "\n" that
# follows a non-space character and precedes a printable ASCII one: the "\n" is a pre-token of its own
# either way; (b) before a " " that follows ASCII whitespace and precedes a printable ASCII character:
# the pre-tokenizer splits the whitespace run right there (" word" takes the last space). In both cases
# no pre-token spans the cut and NFC cannot compose across it.
_SAFE_CUT = re.compile(r"(?<=[^\s]\n)(?=[!-~])|(?<=[ \t\n\r])(?= [!-~])")
_NEWLINE_CUT = re.compile(r"(?<=[^\s]\n)(?=[!-~])")  # rule (a) only


def _safe_chunks(text: str, max_chars: int = _CHUNK_CHARS, pattern: re.Pattern = _SAFE_CUT) -> list[str]:
    """Cut ``text`` into pieces of about ``max_chars`` at points where encoding the pieces and concatenating
    the ids gives exactly the ids of the whole text (see ``_SAFE_CUT``). Text without such points stays whole.
    """
    n = len(text)
    if n <= max_chars:
        return [text]
    out, start = [], 0
    while n - start > max_chars:
        m = pattern.search(text, start + max_chars)
        if m is None:
            break
        out.append(text[start:m.start()])
        start = m.start()
    out.append(text[start:])
    return out


def _max_utf8(text: str) -> int:
    """An upper bound of ``len(text.encode())`` without encoding it."""
    return len(text) if text.isascii() else 4 * len(text)


def _bounded_pieces(text: str, word_cuts: bool, budget: int | None = None) -> list[str]:
    """``text`` in pieces of at most ``budget`` UTF-8 bytes (default ``_PIECE_BYTES``), for a run that has no
    safe cut point (``_safe_chunks`` left it whole), so that encoding it needs bounded memory.

    ``word_cuts`` (a plain byte-level BPE, see ``_cut_pattern``): cut before the last single space between a
    non-space character and a printable ASCII one in the second half of the window: the pre-tokenizer splits
    there anyway (" word" is a pre-token of its own), so the ids are unchanged. Otherwise, or without such a
    space, cut at the budget, moved back over combining marks (never between a character and its accents):
    there, and only there, the ids may differ from encoding the run whole (a token across the cut is split).
    """
    import unicodedata

    budget = int(budget or _PIECE_BYTES)
    if _max_utf8(text) <= budget:
        return [text]
    limit = budget if text.isascii() else max(1, budget // 4)  # characters: at most 4 UTF-8 bytes each
    out, start, n = [], 0, len(text)
    while n - start > limit:
        end = start + limit
        cut = None
        if word_cuts:
            i = text.rfind(" ", start + limit // 2, end)
            while i > start and not (not text[i - 1].isspace() and "!" <= text[i + 1] <= "~"):
                i = text.rfind(" ", start + limit // 2, i)
            cut = i if i > start else None
        if cut is None:
            cut = end
            while cut > start + 1 and unicodedata.combining(text[cut]):
                cut -= 1
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _cut_pattern(spec: dict) -> re.Pattern | None:
    """Which cuts keep the ids of this tokenizer (its ``tokenizer.json`` as a dict), or None for no cuts.

    Needs a BPE with the GPT-2/NeoX byte-level regex pre-tokenizer without prefix space and no normalizer or
    NFC. With only special added tokens (encoded as text here): both rules. With non-special added tokens
    (GPT-NeoX-20B's whitespace-run tokens) that contain no newline and strip nothing: the lone-newline rule
    only (a whitespace-run token could span a rule (b) cut). Anything else is encoded whole: slower on very
    long documents, never different."""
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if not ((spec.get("model") or {}).get("type") == "BPE"
            and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") and pre.get("use_regex", True)
            and (norm is None or norm.get("type") == "NFC")):
        return None
    added = [a for a in spec.get("added_tokens") or [] if not a.get("special")]
    if not added:
        return _SAFE_CUT
    if all("\n" not in a.get("content", "") and not (a.get("lstrip") or a.get("rstrip") or a.get("single_word"))
           for a in added):
        return _NEWLINE_CUT
    return None


@contextlib.contextmanager
def _tokenizers_parallelism(on: bool):
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if on else "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Serialize concurrent prepares of one folder (e.g. every rank of a torchrun job calling it)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(folder / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Encoder:
    """Encodes batches of documents into flat id arrays with the tokenizer's Rust backend."""

    def __init__(self, tok, num_workers: int):
        self.tok = tok
        backend = _backend(tok)
        self.num_workers = num_workers
        if backend is not None:
            from tokenizers import Tokenizer

            b = Tokenizer.from_str(backend.to_str())  # a private copy: settings below stay local
            b.no_truncation()
            b.no_padding()
            specials_as_text = hasattr(b, "encode_special_tokens")
            if specials_as_text:
                b.encode_special_tokens = True  # "<|endoftext|>" inside a document is text, not an EOS
            self.backend = b
            self.chunk = _cut_pattern(json.loads(b.to_str())) if specials_as_text else None
        else:
            self.backend = None
            self.chunk = None
        if self.chunk is None:
            log.debug("long documents are encoded whole (the tokenizer is not a plain byte-level BPE)")

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        pieces, owner = [], []
        word_cuts = self.chunk is _SAFE_CUT
        for i, t in enumerate(texts):
            for c in (_safe_chunks(t, pattern=self.chunk) if self.chunk is not None else (t,)):
                for b in _bounded_pieces(c, word_cuts):
                    pieces.append(b)
                    owner.append(i)
        out: list[list[np.ndarray]] = [[] for _ in texts]
        if self.backend is None:  # slow tokenizer: Python, one core
            for i, c in zip(owner, pieces):
                out[i].append(np.asarray(self.tok.encode(c, add_special_tokens=False), dtype=np.int64))
        else:
            enc = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            start = 0
            while start < len(pieces):  # at most _BATCH_BYTES of text per call: its encodings are held at once
                stop, size = start + 1, _max_utf8(pieces[start])
                while stop < len(pieces) and size + _max_utf8(pieces[stop]) <= _BATCH_BYTES:
                    size += _max_utf8(pieces[stop])
                    stop += 1
                with _tokenizers_parallelism(self.num_workers > 1):
                    encs = enc(pieces[start:stop], add_special_tokens=False)
                for i, e in zip(owner[start:stop], encs):
                    out[i].append(np.asarray(e.ids, dtype=np.int64))
                del encs
                start = stop
        return [a[0] if len(a) == 1 else (np.concatenate(a) if a else np.empty(0, np.int64)) for a in out]


class _ShardWriter:
    """Writes (n, T) sample arrays into ``<split>/shard-NNNNN.bin`` files, each one atomically."""

    def __init__(self, root: Path, split: str, seq_len: int, dtype, samples_per_shard: int, subdir: str = ""):
        self.root, self.split, self.T, self.dtype = root, split, seq_len, np.dtype(dtype)
        self.subdir = f"{subdir}/" if subdir else ""
        self.per_shard = max(1, samples_per_shard)
        self.shards: list[dict] = []
        self._cm = self._f = self._sha = None
        self._n = 0

    def _open(self):
        rel = f"{self.subdir}{self.split}/shard-{len(self.shards):05d}.bin"
        self._rel = rel
        self._cm = atomic_path(self.root / rel)
        tmp = self._cm.__enter__()
        self._f = open(tmp, "wb")  # noqa: SIM115 - closed in _close/abort
        self._sha = hashlib.sha256()
        self._n = 0

    def _close(self):
        self._f.close()
        self._cm.__exit__(None, None, None)
        self.shards.append({"file": self._rel, "num_samples": self._n,
                            "bytes": self._n * self.T * self.dtype.itemsize, "sha256": self._sha.hexdigest()})
        self._cm = self._f = None

    def write(self, samples: np.ndarray) -> None:
        i = 0
        while i < len(samples):
            if self._f is None:
                self._open()
            take = min(len(samples) - i, self.per_shard - self._n)
            b = np.ascontiguousarray(samples[i:i + take], dtype=self.dtype.newbyteorder("<")).tobytes()
            self._f.write(b)
            self._sha.update(b)
            self._n += take
            i += take
            if self._n == self.per_shard:
                self._close()

    def close(self) -> None:
        if self._f is not None:
            self._close()

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            with contextlib.suppress(BaseException):
                self._cm.__exit__(RuntimeError, RuntimeError("aborted"), None)
            self._cm = self._f = None

    @property
    def num_samples(self) -> int:
        return sum(s["num_samples"] for s in self.shards) + (self._n if self._f is not None else 0)


class _Packer:
    """Cuts one split's document stream into fixed-length samples (wrap or llm-foundry no-wrap)."""

    def __init__(self, writer: _ShardWriter, seq_len: int, wrap: bool):
        self.w, self.T, self.wrap = writer, seq_len, wrap
        self.buf = np.empty(0, dtype=np.int64)
        self.pieces: list[np.ndarray] = []
        self.cur = 0
        self.tokens_in = self.dropped = self.documents = 0

    def add(self, tokens: np.ndarray, doclens: np.ndarray) -> None:
        self.tokens_in += len(tokens)
        self.documents += len(doclens)
        T = self.T
        if self.wrap:
            data = np.concatenate([self.buf, tokens]) if len(self.buf) else tokens
            n = len(data) // T
            if n:
                self.w.write(data[: n * T].reshape(n, T))
            self.buf = data[n * T:].copy()
            return
        offs = [0] + np.cumsum(doclens).tolist()
        for a, b in zip(offs[:-1], offs[1:]):  # noqa: RUF007 (py3.10)
            self.pieces.append(tokens[a:b])
            self.cur += b - a
            if self.cur >= T:
                data = np.concatenate(self.pieces)
                self.w.write(data[:T].reshape(1, T))
                self.dropped += self.cur - T
                self.pieces, self.cur = [], 0

    def finish(self) -> None:
        self.dropped = int(self.dropped + len(self.buf) + self.cur)
        self.buf = np.empty(0, dtype=np.int64)
        self.pieces, self.cur = [], 0
        self.w.close()


def _progress(enabled: bool | None, total_bytes: int):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=(None if enabled is None
                                                                                        else not enabled),
                dynamic_ncols=True, leave=True)


def _shards_intact(root: Path, manifest: dict) -> bool:
    try:
        T = manifest["max_seq_len"]
        item = np.dtype(manifest["dtype"]).itemsize
        for split in manifest["splits"].values():
            for s in split["shards"]:
                p = root / s["file"]
                if not p.is_file() or p.stat().st_size != s["num_samples"] * T * item:
                    return False
    except (KeyError, TypeError, ValueError):
        return False
    return True


def _hash_sources(files: list[Path], manifest_path: Path, *, trust_mtime: bool) -> list[dict]:
    """``{path, sha256, bytes, mtime_ns}`` per file. A file whose path, size and modification time equal
    those in the existing manifest keeps its recorded sha256 (no re-read: a no-op check of a large corpus
    stays cheap); ``force`` re-hashes everything."""
    known = {}
    if trust_mtime and manifest_path.is_file():
        try:
            for s in json.loads(manifest_path.read_text()).get("sources", []):
                if "mtime_ns" in s:
                    known[s["path"]] = s
        except (OSError, ValueError, AttributeError, TypeError, KeyError):
            known = {}  # re-hash the inputs (an unreadable manifest is reported where it matters)
    out = []
    for f in files:
        try:
            st = f.stat()
            k = known.get(str(f))
            if k is not None and k.get("bytes") == st.st_size and k.get("mtime_ns") == st.st_mtime_ns:
                sha = k["sha256"]
            else:
                sha = file_sha256(f)
        except OSError as e:  # gone, a symlink loop, unreadable since it was listed
            from mptkit.utils.outputs import describe_os_error

            raise DataError(describe_os_error(e, f, "cannot read input")) from None
        out.append({"path": str(f), "sha256": sha, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def read_manifest(folder) -> dict:
    """The manifest of a prepared folder, or :class:`DataError` saying why it is unusable."""
    folder = Path(folder)
    mp = folder / "manifest.json"
    if not mp.is_file():
        extra = (" (an interrupted or running prepare: run it again to finish)" if (folder / ".parts").exists()
                 or any(folder.glob("*/shard-*.bin")) else "")
        raise DataError(f"{folder}: no manifest.json, not a prepared dataset{extra}")
    try:
        m = json.loads(mp.read_text())
    except ValueError as e:
        raise DataError(f"{mp}: unreadable manifest ({e})") from None
    if m.get("format") != FORMAT:
        raise DataError(f"{mp}: not an mptkit token manifest (format {m.get('format')!r}, expected {FORMAT!r})")
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise DataError(f"{mp}: format_version {m.get('format_version')} is newer than this mptkit supports "
                        f"({FORMAT_VERSION}); upgrade mptkit")
    return m


# ------------------------------------------------------------------------------------------ main
def prepare_dataset(inputs: list[str] | None, tokenizer, out_dir, max_seq_len: int, *, text_field: str = "text",
                    eos_text: str | None = None, bos_text: str | None = None, wrap: bool = True,
                    val_fraction: float = 0.01, split_seed: int = 0, max_files: int | None = None,
                    max_bytes: int | None = None, hf_split: str | None = None, strict: bool = False,
                    num_workers: int | None = None, part_bytes: int = 8 << 20, shard_bytes: int = 256 << 20,
                    model_vocab_size: int | None = None, force: bool = False, keep_parts: bool = False,
                    progress: bool | None = None, num_shards: int | None = None,
                    shard_index: int | None = None) -> dict:
    """Tokenize ``inputs`` (``None`` = the default stdlib corpus) into packed shards under ``out_dir``.

    Returns the manifest (also written to ``out_dir/manifest.json``). A no-op returning the existing
    manifest when the inputs (by sha256), the tokenizer (by fingerprint) and the options are unchanged,
    unless ``force``. Options:

    - ``text_field``: the JSON/CSV/Parquet/Arrow field holding the text (dotted paths for nested JSON).
    - ``eos_text`` / ``bos_text``: separators appended / prepended to every document (default: the
      tokenizer's EOS token, no BOS; ``""`` for none).
    - ``wrap``: wrap documents across samples (default) or start each sample at a document (no-wrap).
    - ``val_fraction`` / ``split_seed``: documents go to ``val`` with this probability (seeded hash).
    - ``max_files`` / ``max_bytes``: use only the first files of the corpus (e.g. a quick start).
    - ``strict``: fail on the first bad input instead of skipping and counting it.
    - ``num_workers``: cores for tokenization (default: all).
    - ``model_vocab_size``: refuse a tokenizer with more tokens than the model's vocabulary.
    - ``num_shards`` / ``shard_index``: tokenize only part ``shard_index`` of ``num_shards`` of the corpus (a
      contiguous run of its files, balanced by bytes) into ``out_dir`` as a *part folder*;
      :func:`mptkit.data.prepare_parts.merge_parts` then writes the dataset of the whole, the same as a
      one-machine prepare (data/prepare_parts.py).
    """
    t0 = time.perf_counter()
    if int(max_seq_len) < 1:
        raise DataError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    T = int(max_seq_len)
    out = Path(out_dir)
    tok_path = str(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else getattr(tokenizer, "name_or_path", "")
    # OUT may lie inside an input folder (it is never read back), but must not be or hold an input or the
    # tokenizer; an existing OUT must be a prepared folder (a re-run replaces it once complete).
    part = num_shards is not None
    check_output(out, kind="folder", flag="--out",
                 inputs=[p for p in [*(inputs or []), tok_path] if p and Path(p).exists()],
                 replaceable=_is_part_output if part else _is_prepare_output,
                 earlier="a part folder (part.json)" if part else "a prepared dataset (manifest.json)", overwrite=None,
                 error=DataError)
    if part:
        from mptkit.data.prepare_parts import check_part_args

        check_part_args(num_shards, shard_index, out, inputs)
    tok = load_tokenizer(tokenizer)
    # the number of ids the data can hold (len(tok), or more when the vocabulary has gaps)
    n_tok = max(len(tok), max(tok.get_vocab().values(), default=-1) + 1)
    if model_vocab_size is not None and n_tok > int(model_vocab_size):
        raise DataError(f"tokenizer {tok_path or ''} has {n_tok} tokens but the model's vocab_size is "
                        f"{model_vocab_size}: ids >= {model_vocab_size} would index past the embedding; use the "
                        "model's own tokenizer or a model with vocab_size >= " + str(padded_vocab_size(n_tok)))
    fp = tokenizer_fingerprint(tok)
    if eos_text is None:
        eos_text = tok.eos_token or ""
        if not eos_text:
            raise DataError(f"tokenizer {tok_path}: has no EOS token; pass eos_text (--eos-text) explicitly, "
                            "or '' for no separator")
    bos_text = bos_text or ""
    eos_ids = tok.encode(eos_text, add_special_tokens=False) if eos_text else []
    bos_ids = tok.encode(bos_text, add_special_tokens=False) if bos_text else []
    dtype = "uint16" if n_tok - 1 <= 0xFFFF else "uint32"
    num_workers = int(num_workers or os.cpu_count() or 1)

    files = resolve_inputs(inputs, max_files=max_files, max_bytes=max_bytes, hf_split=hf_split, exclude=[out])
    settings = {
        "format_version": FORMAT_VERSION, "tokenizer_fingerprint": fp, "text_field": text_field,
        "eos_ids": eos_ids, "bos_ids": bos_ids, "val_fraction": float(val_fraction), "split_seed": int(split_seed),
        "dtype": dtype, "part_bytes": int(part_bytes),
    }
    pack = {"max_seq_len": T, "wrap": bool(wrap), "shard_bytes": int(shard_bytes), "strict": bool(strict)}

    limits = {"max_files": max_files, "max_bytes": max_bytes, "hf_split": hf_split}
    if num_shards is not None:  # one part of a corpus prepared on several machines (data/prepare_parts.py)
        from mptkit.data.prepare_parts import prepare_part

        return prepare_part(files, out, int(num_shards), int(shard_index if shard_index is not None else -1),
                            tok=tok, tok_path=tok_path, fp=fp, settings=settings, pack=pack, eos_text=eos_text,
                            bos_text=bos_text, n_tok=n_tok, num_workers=num_workers, strict=strict,
                            progress=progress, limits=limits, default_corpus=not inputs, force=force, t0=t0)
    sources = _hash_sources(files, out / "manifest.json", trust_mtime=not force)
    key = _hash({"settings": settings, "pack": pack, "sources": [(s["path"], s["sha256"]) for s in sources]})
    return _write_dataset(out, key, force, lambda gen: _run(
        out, tok, tok_path, fp, sources, settings, pack, key, eos_text, bos_text, T, dtype, n_tok, num_workers,
        strict, progress, keep_parts, t0, limits=limits, default_corpus=not inputs, gen=gen))


def _write_dataset(out: Path, key: str, force: bool, produce) -> dict:
    """Under the folder's lock: the existing manifest when it holds ``key`` and its shards are intact (a no-op
    re-run), else ``produce(gen)`` writes a new generation ``genN/`` and its manifest, and what no manifest
    names any more is removed (also when ``produce`` fails: its own shards)."""
    with _folder_lock(out):
        old = _current_manifest(out)
        _remove_unreferenced(out, old)  # what a killed run left (we hold the lock: no other prepare is running)
        if old is not None and not force and old.get("key") == key and _shards_intact(out, old):
            log.info("%s is up to date (same inputs, tokenizer and options): nothing to do", out)
            return old
        # The previous dataset (if any) stays complete until the new manifest replaces it: this run's shards go
        # to a generation folder no manifest names yet.
        gen = f"gen{max([0, *_generations(out)]) + 1}"
        try:
            with write_errors(out / gen, DataError):
                manifest = produce(gen)
        except BaseException:
            with contextlib.suppress(OSError):  # this run's shards, unless its manifest did land
                _remove_unreferenced(out, _current_manifest(out))
            raise
        _remove_unreferenced(out, manifest)
    return manifest


_GEN = re.compile(r"gen(\d+)")
_OWN_NAMES = {".lock", ".parts", *SPLITS}  # and manifest.json, when it is an mptkit token manifest
_PART_NAMES = {".lock", "part.json", "chunks"}  # a part folder (data/prepare_parts.py)


def _is_prepare_output(folder: Path) -> bool:
    """A folder this module wrote: a prepared dataset, or one an interrupted run left (only its own names)."""
    return is_prepared_dir(folder) or all(f.name in _OWN_NAMES or _GEN.fullmatch(f.name) or _TEMP.fullmatch(f.name)
                                          for f in folder.iterdir())


def _is_part_output(folder: Path) -> bool:
    """A part folder (``prepare --num-shards``), or what an interrupted one left (only its own names)."""
    return all(f.name in _PART_NAMES or _TEMP.fullmatch(f.name) for f in folder.iterdir())
_TEMP = re.compile(r"\..+\.tmp")  # the temporary names mptkit.utils.fs.atomic_path makes


def _generations(out: Path) -> list[int]:
    return [int(m.group(1)) for d in out.iterdir() if d.is_dir() and (m := _GEN.fullmatch(d.name))]


def _current_manifest(out: Path) -> dict | None:
    """The folder's finished manifest, None when there is none (or it is not one of ours). A manifest that
    exists but cannot be read (permissions, I/O error) is an error: what it lists must not be taken for
    unreferenced and deleted."""
    try:
        m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    except OSError as e:
        raise DataError(f"{out / 'manifest.json'}: cannot read the prepared dataset's manifest ({e.strerror or e}); "
                        "nothing was changed. Fix its permissions (or the disk) and run again") from None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def _remove_unreferenced(out: Path, manifest: dict | None) -> None:
    """Delete what no finished run needs, and only names this module makes: generation folders and shards
    (``genN/``, and an older layout's ``train/`` / ``val/`` shard files) that ``manifest`` does not list,
    and temporary files of interrupted writes. Called with the folder's lock held."""
    import shutil

    listed = set()
    if manifest is not None:
        listed = {s.get("file") for sp in (manifest.get("splits") or {}).values() for s in sp.get("shards", [])}
    keep_gens = {f.split("/", 1)[0] for f in listed if f and _GEN.fullmatch(f.split("/", 1)[0])}
    for d in sorted(out.iterdir()):
        if d.is_dir() and not d.is_symlink() and _GEN.fullmatch(d.name) and d.name not in keep_gens:
            shutil.rmtree(d, ignore_errors=True)
    for name in SPLITS:  # the layout before generation folders: <split>/shard-NNNNN.bin
        d = out / name
        if not d.is_dir() or d.is_symlink():
            continue
        for f in d.iterdir():
            if (re.fullmatch(r"shard-\d{5}\.bin", f.name) and f"{name}/{f.name}" not in listed) or \
                    (f.name.startswith(".shard-") and _TEMP.fullmatch(f.name)):
                f.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty
    for d in (out, out / ".parts", *(out / g for g in keep_gens), *(out / g / s for g in keep_gens for s in SPLITS)):
        if d.is_dir():
            for f in d.iterdir():
                if f.is_file() and _TEMP.fullmatch(f.name) and f.name.startswith((".shard-", ".part-", ".manifest.json.")):
                    f.unlink(missing_ok=True)


def _iter_parts(sources, text_field, issues, part_bytes, doc_counts) -> Iterator[list[tuple[int, int, str]]]:
    """Group documents into parts of about ``part_bytes`` characters: lists of (source index, line, text)."""
    batch, chars = [], 0
    for si, s in enumerate(sources):
        for line, text in iter_documents(Path(s["path"]), text_field=text_field, issues=issues):
            batch.append((si, line, text))
            doc_counts[si] += 1
            chars += len(text)
            if chars >= part_bytes:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def _prefetch(it: Iterator, depth: int = 1) -> Iterator:
    """Run ``it`` in a background thread, ``depth`` items ahead (reading and parsing the next part while
    the current one is tokenized: the Rust encoder releases the GIL). Exceptions are re-raised here."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in it:
                if not put((None, item)):
                    return
            put((None, done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((e, None))

    th = threading.Thread(target=work, name="mptkit-prepare-reader", daemon=True)
    th.start()
    try:
        while True:
            err, item = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        th.join(timeout=5)


def _build_manifest(packers, writers, sources, doc_counts, bad_inputs, settings, pack, key, fp, tok_info, n_tok,
                    eos_text, bos_text, pad_token_id, T, dtype, limits, default_corpus, t0, t_loop, total_tokens,
                    stats) -> dict:
    """The finished dataset's manifest (after the packers finished), or DataError when it holds no training
    sample. Shared by the one-machine prepare and the merge of parts, so that both write the same manifest."""
    if sum(doc_counts) == 0:
        raise DataError(f"no usable documents in {len(sources)} input files ({bad_inputs['total']} bad inputs "
                        f"skipped: {bad_inputs['counts']}); see the warnings above")
    if packers["train"].w.num_samples == 0:
        raise DataError(f"the corpus yields no training sample of {T} tokens ({packers['train'].tokens_in} train "
                        "tokens); use more data or a smaller --max-seq-len")
    if settings["val_fraction"] > 0 and packers["val"].w.num_samples == 0:
        log.warning("the validation split is empty (%d documents; %d val tokens): use more documents, a larger "
                    "val_fraction or a smaller max_seq_len", sum(doc_counts), packers["val"].tokens_in)

    elapsed = time.perf_counter() - t0
    loop_s = time.perf_counter() - t_loop
    eos_id = settings["eos_ids"][0] if len(settings["eos_ids"]) == 1 else None
    bos_id = settings["bos_ids"][0] if len(settings["bos_ids"]) == 1 else None
    splits = {}
    for name in SPLITS:
        p, w = packers[name], writers[name]
        splits[name] = {"num_samples": w.num_samples, "num_documents": p.documents, "num_tokens": p.tokens_in,
                        "tokens_in_samples": w.num_samples * T, "dropped_tokens": p.dropped, "shards": w.shards}
    from mptkit import __version__

    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "mptkit_version": __version__, "key": key,
        "tokenizer_fingerprint": fp,
        "tokenizer": tok_info,
        "vocab_size": padded_vocab_size(n_tok), "tokenizer_vocab_size": n_tok,
        "max_seq_len": T, "dtype": dtype, "wrap": pack["wrap"],
        "eos_text": eos_text, "bos_text": bos_text, "eos_ids": settings["eos_ids"], "bos_ids": settings["bos_ids"],
        "eos_token_id": eos_id, "bos_token_id": bos_id,
        "pad_token_id": pad_token_id,
        "text_field": settings["text_field"], "val_fraction": settings["val_fraction"],
        "split_seed": settings["split_seed"],
        "num_samples": {n: splits[n]["num_samples"] for n in SPLITS},
        "num_tokens": {n: splits[n]["num_tokens"] for n in SPLITS},
        "splits": splits,
        "sources": [{**s, "documents": doc_counts[i]} for i, s in enumerate(sources)],
        "default_corpus": default_corpus, "limits": limits,
        "bad_inputs": bad_inputs,
        "stats": {"elapsed_s": round(elapsed, 3), "tokens_per_s": round(total_tokens / max(loop_s, 1e-9)), **stats},
    }
    return manifest


def _tokenize_batch(batch, sources, settings, encoder, eos, bos, dtype) -> tuple[dict, int]:
    """One part's documents -> ``{<split>_tokens, <split>_doclens}`` (each document ``[bos] ids [eos]``, routed
    to its split by the seeded hash), and the number of document tokens."""
    ids = encoder.encode([text for _, _, text in batch])
    part = {}
    which = [_split_of(settings["split_seed"], sources[si]["sha256"], line, settings["val_fraction"])
             for si, line, _ in batch]
    extra = len(bos) + len(eos)
    for split_i, name in enumerate(SPLITS):
        pieces, lens = [], []
        for k, w in enumerate(which):
            if w == split_i:
                pieces += (bos, ids[k], eos)
                lens.append(len(ids[k]) + extra)
        part[f"{name}_tokens"] = np.concatenate(pieces).astype(dtype) if pieces else np.empty(0, dtype)
        part[f"{name}_doclens"] = np.asarray(lens, dtype=np.int64)
    return part, sum(len(a) for a in ids)


def _run(out, tok, tok_path, fp, sources, settings, pack, key, eos_text, bos_text, T, dtype, n_tok, num_workers,
         strict, progress, keep_parts, t0, limits, default_corpus, gen) -> dict:
    parts_dir = out / ".parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    issues = Issues(strict=strict)
    encoder = _Encoder(tok, num_workers)
    eos = np.asarray(settings["eos_ids"], dtype=np.int64)
    bos = np.asarray(settings["bos_ids"], dtype=np.int64)
    samples_per_shard = max(1, pack["shard_bytes"] // (T * np.dtype(dtype).itemsize))
    writers = {s: _ShardWriter(out, s, T, dtype, samples_per_shard, subdir=gen) for s in SPLITS}
    packers = {s: _Packer(writers[s], T, pack["wrap"]) for s in SPLITS}
    doc_counts = [0] * len(sources)
    used_parts, reused, tokenized_tokens, tokenized_s = set(), 0, 0, 0.0
    bar = _progress(progress, sum(s["bytes"] for s in sources))
    total_tokens = 0
    t_loop = time.perf_counter()
    try:
        parts = _prefetch(_iter_parts(sources, settings["text_field"], issues, settings["part_bytes"], doc_counts))
        for pi, batch in enumerate(parts):
            ident = [(sources[si]["sha256"], line) for si, line, _ in batch]
            pkey = _hash({"settings": settings, "docs": ident})[:24]
            ppath = parts_dir / f"part-{pi:06d}-{pkey}.npz"
            used_parts.add(ppath.name)
            part = None
            if ppath.is_file():
                try:
                    with np.load(ppath, allow_pickle=False) as z:
                        part = {k: z[k] for k in z.files}
                    reused += 1
                except (OSError, ValueError, KeyError):
                    part = None  # a damaged cache entry: tokenize again
            if part is None:
                ts = time.perf_counter()
                part, n = _tokenize_batch(batch, sources, settings, encoder, eos, bos, dtype)
                tokenized_s += time.perf_counter() - ts
                tokenized_tokens += n
                with atomic_path(ppath) as tmp, open(tmp, "wb") as f:
                    np.savez(f, **part)
            for name in SPLITS:
                toks = part[f"{name}_tokens"].astype(np.int64)
                total_tokens += len(toks)
                packers[name].add(toks, part[f"{name}_doclens"])
            if bar is not None:
                bar.update(min(sum(len(text) for _, _, text in batch), max(bar.total - bar.n, 0)))
                el = max(time.perf_counter() - t_loop, 1e-9)
                bar.set_postfix_str(f"{total_tokens / el / 1e3:,.0f}K tok/s, {total_tokens:,} tok", refresh=False)
        for p in packers.values():
            p.finish()
        if bar is not None:
            bar.update(max(bar.total - bar.n, 0))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if bar is not None:
            bar.close()

    stats = {"parts": len(used_parts), "parts_reused": reused, "tokenized_tokens": tokenized_tokens,
             "tokenize_s": round(tokenized_s, 3), "num_workers": num_workers}
    tok_info = {"path": tok_path, "class": type(tok).__name__, "size": len(tok)}
    manifest = _build_manifest(packers, writers, sources, doc_counts, issues.as_dict(), settings, pack, key, fp,
                               tok_info, n_tok, eos_text, bos_text, getattr(tok, "pad_token_id", None), T, dtype,
                               limits, default_corpus, t0, t_loop, total_tokens, stats)
    atomic_write_json(out / "manifest.json", manifest)
    if not keep_parts:
        for f in parts_dir.glob("*"):
            f.unlink()
        with contextlib.suppress(OSError):
            parts_dir.rmdir()
    else:
        for f in parts_dir.glob("part-*.npz"):
            if f.name not in used_parts:
                f.unlink()
    _log_prepared(out, manifest, total_tokens, f"; {reused} of {len(used_parts)} parts reused" if reused else "")
    return manifest


def _log_prepared(out, m: dict, total_tokens: int, extra: str = "") -> None:
    st = m["stats"]
    log.info("prepared %s: %d train / %d val samples of %d tokens (%s tokens, %.1fs, %s tok/s; %d bad inputs skipped"
             "%s)", out, m["num_samples"]["train"], m["num_samples"]["val"], m["max_seq_len"], f"{total_tokens:,}",
             st["elapsed_s"], f"{st['tokens_per_s']:,}", m["bad_inputs"]["total"], extra)
