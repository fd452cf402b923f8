"""Corpus sources: find input files and read documents from them, reporting bad input with file and line.

A *source* is one file (or one Arrow file of a local ``datasets`` folder). A *document* is one text:
a whole text file (``.txt``, ``.md``, ``.py``, any UTF-8 text), one JSON line / array record / CSV row /
Parquet or Arrow row (``text`` field by default).

Bad input (invalid UTF-8, malformed JSON, missing or non-string text field, empty documents, binary
files) is reported as ``file:line: problem`` through an :class:`Issues` collector: skipped and counted
by default, raised as :class:`~mptkit.errors.DataError` when ``strict``.

The default corpus (no input given) is the running interpreter's standard library source tree: every
``.py`` file under ``sysconfig.get_paths()["stdlib"]``, sorted by relative path, excluding
``site-packages``/``dist-packages``, empty files and the test suites (``test/``, ``tests/``, ``idle_test/``). On
CPython 3.11 that is about 730 files, 12 MB of text, 3.2 M tokens with an 8K BPE vocabulary.
"""

from __future__ import annotations

import csv
import errno
import glob
import hashlib
import json
import logging
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mptkit.errors import DataError
from mptkit.utils.fs import real_path

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".tex", ".html", ".htm", ".c", ".h", ".cpp", ".hpp",
                 ".cc", ".js", ".ts", ".java", ".go", ".rs", ".sh", ".yaml", ".yml", ".toml", ".ini", ".cfg",
                 ".xml", ".css", ".sql", ".rb", ".pl", ".lua", ".r", ".jl", ".swift", ".kt", ".scala", ".m",
                 ".pyi", ".ipynb", ""}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
JSON_SUFFIXES = {".json"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
CSV_SUFFIXES = {".csv", ".tsv"}
ARROW_SUFFIXES = {".arrow"}
# Never treated as corpus text when a folder is walked.
SKIP_SUFFIXES = {".pyc", ".pyo", ".so", ".dll", ".dylib", ".o", ".a", ".exe", ".bin", ".png", ".jpg", ".jpeg",
                 ".gif", ".bmp", ".ico", ".pdf", ".zip", ".gz", ".bz2", ".xz", ".zst", ".tar", ".whl", ".egg",
                 ".npy", ".npz", ".pt", ".pth", ".safetensors", ".gguf", ".mds", ".lock", ".db", ".sqlite"}

_TEST_DIRS = {"test", "tests", "idle_test"}
_SITE_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def default_corpus_files(*, include_tests: bool = False) -> list[Path]:
    """The running interpreter's standard-library ``.py`` files, sorted by relative path (deterministic).

    Excludes ``site-packages``/``dist-packages``/``__pycache__``, empty files and, unless ``include_tests``,
    the test suites (``test``, ``tests``, ``idle_test`` folders). About 730 files / 12 MB on CPython 3.11.
    """
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        skip = _SITE_DIRS | (set() if include_tests else _TEST_DIRS)
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        if rel.parts and (set(rel.parts) & skip):
            continue
        for fn in filenames:
            f = Path(dirpath) / fn
            if fn.endswith(".py") and f.stat().st_size > 0:  # skip the empty __init__.py files
                out.append(f)
    out.sort(key=lambda p: p.relative_to(root).as_posix())
    if not out:
        raise DataError(f"the default corpus is empty: no .py files under {root} (is the stdlib source installed?)")
    return out


def link_problem(path: str | os.PathLike) -> str | None:
    """Why a symbolic link cannot be read (a loop, a dangling target), or None for anything else."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        if e.errno == errno.ENOENT:
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"a dangling symbolic link (to {target})"
        return f"an unreadable symbolic link ({e.strerror or e})"
    return None


def limit_files(files: list[Path], *, max_files: int | None = None, max_bytes: int | None = None) -> list[Path]:
    """Keep the first files (in order) up to ``max_files`` files and ``max_bytes`` bytes (at least one file)."""
    out, total = [], 0
    for f in files:
        if max_files is not None and len(out) >= max_files:
            break
        size = f.stat().st_size if f.is_file() else 0
        if max_bytes is not None and out and total + size > max_bytes:
            break
        out.append(f)
        total += size
    return out


def is_prepared_dir(p: str | os.PathLike) -> bool:
    """A folder written by ``mptkit data prepare``: token shards with an mptkit ``manifest.json`` (never read
    back as corpus text)."""
    p = Path(p)
    try:
        with open(p / "manifest.json", "rb") as f:
            return b'"mptkit.tokens"' in f.read(256)
    except OSError:
        return False


def _is_hf_datasets_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_dict.json").is_file() or
                           ((p / "state.json").is_file() and (p / "dataset_info.json").is_file()))


def _hf_dataset_arrow_files(p: Path, split: str | None) -> list[Path]:
    """Arrow files of a ``datasets.save_to_disk`` folder (a Dataset, or one split of a DatasetDict)."""
    if (p / "dataset_dict.json").is_file():
        try:
            splits = json.loads((p / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{p / 'dataset_dict.json'}: unreadable dataset_dict.json ({e})") from None
        want = split or ("train" if "train" in splits else None)
        if want is None or want not in splits:
            raise DataError(f"{p}: a DatasetDict with splits {splits}; choose one with --hf-split "
                            f"(asked for {split!r})")
        p = p / want
    try:
        state = json.loads((p / "state.json").read_text())
        names = [d["filename"] for d in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{p / 'state.json'}: not a datasets save_to_disk state file ({e})") from None
    return [p / n for n in names]


def resolve_inputs(inputs: list[str] | None, *, max_files: int | None = None, max_bytes: int | None = None,
                   hf_split: str | None = None, include_tests: bool = False,
                   exclude: list | None = None) -> list[Path]:
    """Expand files, folders (walked recursively, hidden entries and binary suffixes skipped) and globs
    into a deterministic list of files. ``None`` or ``[]`` means the default corpus (stdlib source).
    A local ``datasets`` folder (``save_to_disk``) expands to its Arrow files. Files inside an ``exclude``
    folder (e.g. the output folder, when it lies inside an input folder) are left out."""
    if not inputs:
        files = default_corpus_files(include_tests=include_tests)
        return limit_files(files, max_files=max_files, max_bytes=max_bytes)
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if _is_hf_datasets_dir(p):
            files.extend(_hf_dataset_arrow_files(p, hf_split))
        elif p.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                if "manifest.json" in filenames and is_prepared_dir(dirpath):
                    dirnames[:] = []
                    log.info("skipping %s: an mptkit prepared dataset, not corpus text", dirpath)
                    continue
                if Path(dirpath) != p and _is_hf_datasets_dir(Path(dirpath)):  # a nested save_to_disk folder
                    dirnames[:] = []
                    found.extend(_hf_dataset_arrow_files(Path(dirpath), hf_split))
                    continue
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SITE_DIRS)
                for fn in filenames:
                    f = Path(dirpath) / fn
                    if fn.startswith(".") or f.suffix.lower() in SKIP_SUFFIXES:
                        continue
                    problem = link_problem(f)
                    if problem is not None:
                        log.warning("skipping %s: %s", f, problem)
                        continue
                    found.append(f)
            found.sort(key=lambda f: f.relative_to(p).as_posix())
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif glob.has_magic(item):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(item), recursive=True))
            matches = [m for m in matches if m.is_file()]
            if not matches:
                raise DataError(f"input {item!r}: the pattern matches no files")
            files.extend(matches)
        elif link_problem(p) is not None:
            raise DataError(f"input {item!r}: {link_problem(p)}; fix or remove the link")
        else:
            raise DataError(f"input {item!r}: no such file or folder")
    # de-duplicate, keep first occurrence
    skip = [real_path(x) for x in exclude or []]
    seen, uniq = set(), []
    for f in files:
        k = real_path(f)
        if any(s == k or s in k.parents for s in skip):
            continue
        if k not in seen:
            seen.add(k)
            uniq.append(f)
    if not uniq:
        raise DataError(f"inputs {inputs} contain no files")
    return limit_files(uniq, max_files=max_files, max_bytes=max_bytes)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- issues
@dataclass
class Issues:
    """Collects bad-input reports. ``strict``: the first one raises :class:`DataError`."""

    strict: bool = False
    max_examples: int = 20
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def report(self, kind: str, where: str, message: str) -> None:
        text = f"{where}: {message}"
        if self.strict:
            raise DataError(f"{text} (bad input '{kind}'; without --strict it would be skipped and counted)")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(text)
            log.warning("skipped bad input: %s", text)
        elif len(self.examples) == self.max_examples:
            self.examples.append("... (more not shown)")
            log.warning("more bad input skipped; see the manifest's bad_inputs counts")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "counts": dict(sorted(self.counts.items())), "examples": list(self.examples)}


# --------------------------------------------------------------------------------------------- readers
def source_kind(path: Path) -> str:
    s = path.suffix.lower()
    if s in JSONL_SUFFIXES:
        return "jsonl"
    if s in JSON_SUFFIXES:
        return "json"
    if s in PARQUET_SUFFIXES:
        return "parquet"
    if s in CSV_SUFFIXES:
        return "csv"
    if s in ARROW_SUFFIXES:
        return "arrow"
    return "text"


def _get_field(rec, text_field: str):
    """``rec[text_field]``, with dotted paths (``a.b``) into nested objects. Raises KeyError."""
    cur = rec
    for part in text_field.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(part)
        cur = cur[part]
    return cur


def _check_text(value, where: str, text_field: str, issues: Issues) -> str | None:
    if not isinstance(value, str):
        issues.report("non_string_text", where, f"field {text_field!r} is {type(value).__name__}, expected a string")
        return None
    if not value.strip():
        issues.report("empty_text", where, f"field {text_field!r} is empty")
        return None
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: Any, path: str = "", what: str | None = None) -> str | None:
    """Where in a parsed JSON value a string holds a lone surrogate (JSON may escape one, ``"\\ud800"``, but
    it is no Unicode text: UTF-8 cannot hold it and tokenizers refuse it), e.g. ``"field 'a.b' (\\ud800 at
    character 4)"``; None when there is none."""
    if isinstance(value, str):
        m = None if value.isascii() else _SURROGATE.search(value)
        if m is None:
            return None
        return f"{what or (f'field {path!r}' if path else 'the record')} (\\u{ord(m.group()):04x} at character {m.start()})"
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if (found := _lone_surrogate(k, what=f"a key in {f'field {path!r}' if path else 'the record'}")) or \
                    (found := _lone_surrogate(v, sub)):
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if found := _lone_surrogate(v, f"{path}[{i}]"):
                return found
    return None


def _unicode_ok(rec: Any, line: str | None, where: str, issues: Issues, skipped: str) -> bool:
    """False (reported as ``invalid_unicode``) when ``rec`` holds a lone surrogate; only looked for when the
    raw JSON text ``line`` has a ``\\u`` escape at all (None: always)."""
    if line is not None and "\\u" not in line:
        return True
    found = _lone_surrogate(rec)
    if found is None:
        return True
    issues.report("invalid_unicode", where, f"a lone surrogate in {found}, which is not Unicode text; {skipped}")
    return False


def _decode_utf8(data: bytes, where: str, issues: Issues, skipped: str = "file skipped") -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        issues.report("invalid_utf8", f"{where}:{line}",
                      f"invalid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); {skipped}")
        return None


def _read_text(path: Path, issues: Issues) -> Iterator[tuple[int, str]]:
    data = path.read_bytes()
    if not data.strip():
        issues.report("empty_file", str(path), "empty file" if not data else "file holds only whitespace")
        return
    if b"\x00" in data[:8192]:
        issues.report("binary_file", str(path), "looks binary (NUL bytes); file skipped")
        return
    text = _decode_utf8(data, str(path), issues)
    if text is not None:
        yield 1, text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not content


def iter_jsonl_records(path: Path, issues: Issues) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON value)`` for each non-blank line of a JSONL file; undecodable or malformed
    lines, and a file with no record at all, are reported to ``issues`` and skipped."""
    nonblank = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            nonblank += 1
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                issues.report("invalid_utf8", where, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                                                     f"{e.start + 1}); line skipped")
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                issues.report("malformed_json", where, f"malformed JSON ({e})")
                continue
            if _unicode_ok(rec, line, where, issues, "line skipped"):
                yield lineno, rec
    if not nonblank:
        issues.report("empty_file", str(path), "empty file")


def _texts(records: Iterator[tuple[int, str, Any]], text_field: str, issues: Issues) -> Iterator[tuple[int, str]]:
    """``(index, text)`` of the ``(index, where, record)`` records that hold a usable ``text_field``."""
    for n, where, rec in records:
        try:
            value = _get_field(rec, text_field)
        except KeyError:
            keys = list(rec)[:8] if isinstance(rec, dict) else type(rec).__name__
            issues.report("missing_text_field", where, f"no field {text_field!r} (found {keys})")
            continue
        text = _check_text(value, where, text_field, issues)
        if text is not None:
            yield n, text


def _read_jsonl(path: Path, text_field: str, issues: Issues) -> Iterator[tuple[int, str]]:
    recs = ((lineno, f"{path}:{lineno}", rec) for lineno, rec in iter_jsonl_records(path, issues))
    yield from _texts(recs, text_field, issues)


def read_json_array(path: Path, issues: Issues) -> list | None:
    """The records of a file holding one JSON array, or None (reported) when it is not valid UTF-8 JSON."""
    text = _decode_utf8(path.read_bytes(), str(path), issues)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        line = getattr(e, "lineno", "?")
        issues.report("malformed_json", f"{path}:{line}", f"malformed JSON array ({e}); file skipped")
        return None


def iter_json_records(path: Path, issues: Issues) -> Iterator[tuple[int, str, Any]]:
    """``(index, where, record)`` for a .json file: a JSON array (index i, ``file:[i]``), or one object per line
    as llm-foundry writes .json files (the line number, ``file:line``); an empty or malformed file is reported
    to ``issues``."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head:
        issues.report("empty_file", str(path), "empty file")
        return
    if not head.startswith(b"["):
        for lineno, rec in iter_jsonl_records(path, issues):
            yield lineno, f"{path}:{lineno}", rec
        return
    for i, rec in enumerate(read_json_array(path, issues) or []):
        if _unicode_ok(rec, None, f"{path}:[{i}]", issues, "record skipped"):
            yield i, f"{path}:[{i}]", rec


def iter_csv_rows(path: Path, issues: Issues, *, column: str | None = None) -> Iterator[tuple[int, dict]]:
    """``(line number, row)`` for a CSV (TSV by suffix) file with a header; with ``column``, a file without that
    column is reported and skipped. Empty, undecodable or malformed files are reported to ``issues``."""
    csv.field_size_limit(1 << 30)
    delim = "\t" if path.suffix.lower() == ".tsv" else ","
    data = path.read_bytes()
    if not data.strip():
        issues.report("empty_file", str(path), "empty file")
        return
    text = _decode_utf8(data, str(path), issues)
    if text is None:
        return
    import io

    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delim)
    if column is not None and (reader.fieldnames is None or column not in reader.fieldnames):
        issues.report("missing_text_field", f"{path}:1",
                      f"no column {column!r} (columns: {reader.fieldnames}); file skipped")
        return
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as e:
        issues.report("malformed_csv", f"{path}:{reader.line_num}", f"malformed CSV ({e}); rest of file skipped")


def _read_json(path: Path, text_field: str, issues: Issues) -> Iterator[tuple[int, str]]:
    yield from _texts(iter_json_records(path, issues), text_field, issues)


def _read_csv(path: Path, text_field: str, issues: Issues) -> Iterator[tuple[int, str]]:
    for lineno, row in iter_csv_rows(path, issues, column=text_field):
        t = _check_text(row.get(text_field), f"{path}:{lineno}", text_field, issues)
        if t is not None:
            yield lineno, t


def open_table(path: Path, kind: str, columns: list[str] | None = None):
    """``(column names, iterator of record batches)`` of a Parquet or Arrow (IPC stream or file) table: only
    ``columns`` when given, and no iterator (None) when one of them is missing. Raises :class:`DataError`
    without pyarrow, and pyarrow's own errors (``ArrowInvalid`` / ``OSError``) for an unreadable file —
    callers report those as bad input."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading {kind} files needs pyarrow (pip install 'mptkit[data]')") from None
    if kind == "parquet":
        pf = pq.ParquetFile(str(path))
        names = pf.schema_arrow.names
        if columns and not set(columns) <= set(names):
            return names, None
        return names, pf.iter_batches(columns=columns, batch_size=4096)
    src = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_stream(src)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(src)
        reader = reader.read_all().to_reader() if hasattr(reader, "read_all") else reader
    names = reader.schema.names
    if columns and not set(columns) <= set(names):
        return names, None
    return names, ((b.select(columns) for b in reader) if columns else iter(reader))


def _read_table(path: Path, text_field: str, issues: Issues, kind: str) -> Iterator[tuple[int, str]]:
    try:
        names, batches = open_table(path, kind, [text_field])
    except (OSError, Exception) as e:  # pyarrow raises ArrowInvalid/ArrowIOError (OSError subclasses)
        if isinstance(e, DataError):
            raise
        issues.report("unreadable_file", str(path), f"cannot read as {kind} ({e}); file skipped")
        return
    if batches is None:
        issues.report("missing_text_field", str(path), f"no column {text_field!r} (columns: {names}); file skipped")
        return
    row = 0
    for batch in batches:
        for value in batch.column(0).to_pylist():
            where = f"{path}:row {row}"
            if value is None:
                issues.report("missing_text_field", where, f"column {text_field!r} is null")
            else:
                t = _check_text(value, where, text_field, issues)
                if t is not None:
                    yield row, t
            row += 1
    if row == 0:
        issues.report("empty_file", str(path), "no rows")


def iter_documents(path: Path, *, text_field: str = "text", issues: Issues | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line_or_row, text)`` for each good document of one source file; report bad ones."""
    issues = issues if issues is not None else Issues()
    kind = source_kind(path)
    try:
        if kind == "jsonl":
            yield from _read_jsonl(path, text_field, issues)
        elif kind == "json":
            yield from _read_json(path, text_field, issues)
        elif kind == "csv":
            yield from _read_csv(path, text_field, issues)
        elif kind in ("parquet", "arrow"):
            yield from _read_table(path, text_field, issues, kind)
        else:
            yield from _read_text(path, issues)
    except OSError as e:
        issues.report("unreadable_file", str(path), f"cannot read ({e.strerror or e})")
