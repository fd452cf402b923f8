"""Interop: read MDS datasets written by llm-foundry's ``convert_dataset_hf.py`` / ``convert_dataset_json.py``
(``--concat_tokens``; one ``tokens`` column).

Uncompressed local MDS folders are read natively (no dependency): ``index.json`` lists the shards, and a
shard file is ``[num_samples: u32][offsets: (num_samples + 1) x u32][config][samples]``, where each sample
holds one u32 size per variable-size column followed by the column values. The ``tokens`` column may be
``ndarray:<dtype>`` (current llm-foundry: int32, shape stored per sample), ``ndarray:<dtype>:<shape>``,
``ndarray`` (dtype and shape per sample) or ``bytes`` (older llm-foundry: raw int64). Compressed shards
(``compression: zstd`` / ``gz`` / ``bz2``, as mosaicml-streaming writes them) are decompressed once into mptkit's
cache (:func:`decompressed_shard`; zstd needs the ``zstandard`` package, the ``mds`` extra) and then read the
same way; brotli / snappy shards need the optional package ``mosaicml-streaming``. Pickled columns are never
read.

``MDSTokenDataset`` gives the same items as :class:`mptkit.data.shards.TokenDataset` (``input_ids``,
``sequence_id``), so the trainer and :class:`ResumableSampler` use either. :func:`open_token_dataset`
picks the reader from the folder's contents.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import numpy as np
import torch

from mptkit.errors import DataError
from mptkit.utils.fs import atomic_write_bytes, cache_dir

INSTALL_HINT = ("reading brotli / snappy compressed MDS shards needs the optional package mosaicml-streaming "
                "(pip install mosaicml-streaming); or write the MDS with zstd, gz, bz2 or no compression "
                "(llm-foundry: --compression zstd, or omitted)")

# value dtype codes of MDS's ndarray encoding
_VALUE_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32", 33: "int32",
                 34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
_SHAPE_DTYPES = {0: "uint8", 1: "uint16", 2: "uint32", 3: "uint64"}


# the subfolder names llm-foundry's converters give a split (convert_dataset_hf.py writes train/ and val/ or
# val_small/), by mptkit's split name
MDS_SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "val_small", "eval", "test")}


def is_mds_folder(folder, split: str | None = None) -> bool:
    """``folder`` holds an MDS dataset: ``index.json`` in it, or in a subfolder of ``split`` (any subfolder
    when ``split`` is None)."""
    p = Path(folder)
    if (p / "index.json").is_file():
        return True
    if split is None:
        return p.is_dir() and any((d / "index.json").is_file() for d in p.iterdir() if d.is_dir())
    return mds_split_folder(p, split) is not None


def mds_split_folder(folder, split: str) -> str | None:
    """The subfolder of ``folder`` holding the MDS ``split`` (llm-foundry's names: MDS_SPLIT_NAMES), or None."""
    from mptkit.data.shards import SPLIT_ALIASES

    split = SPLIT_ALIASES.get(split, split)
    return next((s for s in (split, *MDS_SPLIT_NAMES.get(split, ())) if (Path(folder) / s / "index.json").is_file()),
                None)


def _decode_tokens(encoding: str, data: memoryview, bytes_dtype: np.dtype, where: str) -> np.ndarray:
    """Decode one ``tokens`` value of the given MDS column encoding."""
    if encoding == "bytes":
        return np.frombuffer(data, dtype=bytes_dtype)
    parts = encoding.split(":")
    if parts[0] != "ndarray" or len(parts) > 3:
        raise DataError(f"{where}: the tokens column is encoded as {encoding!r}; mptkit reads 'bytes' and "
                        "'ndarray[:dtype[:shape]]' token columns (never pickles)")
    i = 0
    if len(parts) >= 2 and parts[1]:
        dtype = parts[1]
    else:
        code = data[i]
        i += 1
        if code not in _VALUE_DTYPES:
            raise DataError(f"{where}: unknown ndarray dtype code {code}")
        dtype = _VALUE_DTYPES[code]
    if len(parts) == 3:
        shape = tuple(int(x) for x in parts[2].split(","))
    else:
        head = data[i]
        i += 1
        ndim, sdt = head >> 2, _SHAPE_DTYPES[head & 3]
        nb = ndim * np.dtype(sdt).itemsize
        shape = tuple(int(x) for x in np.frombuffer(data[i:i + nb], dtype=sdt))
        i += nb
    arr = np.frombuffer(data[i:], dtype=np.dtype(dtype).newbyteorder("<"))
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{where}: tokens value holds {arr.size} numbers, its shape {shape} says {int(np.prod(shape))}")
    return arr.reshape(-1)


class _NeedsStreaming(DataError):
    """A shard only mosaicml-streaming can read (brotli, snappy): MDSTokenDataset then tries it."""


def _zstd_decompress(data: bytes) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise DataError("zstd-compressed MDS shards need the zstandard package: pip install 'mptkit[mds]' "
                        "(or zstandard)") from None
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


# mosaicml-streaming's compression families (streaming/base/compression.py) mptkit decompresses itself
_CODECS = {"zstd": _zstd_decompress, "gz": lambda b: __import__("gzip").decompress(b),
           "bz2": lambda b: __import__("bz2").decompress(b)}


def decompressed_shard(folder: Path, shard: dict, where: str) -> Path:
    """The raw form of a compressed MDS shard (``zip_data``: zstd, gz or bz2, as mosaicml-streaming writes them),
    decompressed once into mptkit's cache (``$MPTKIT_CACHE_DIR/mds/<key>/<raw basename>``, the key from the
    compressed file's path, size and mtime; written atomically, its size checked against ``raw_data.bytes``): the
    user's folder is never written. Other codecs (brotli, snappy): a DataError naming them."""
    comp = str(shard.get("compression"))
    family = comp.split(":")[0]
    if family not in _CODECS:
        raise _NeedsStreaming(f"{where}: shard compression {comp!r}: mptkit reads {', '.join(_CODECS)} "
                        f"(re-convert with one of them or none); {INSTALL_HINT}")
    zd, raw = shard.get("zip_data") or {}, shard.get("raw_data") or {}
    zpath = folder / str(zd.get("basename", ""))
    if not zd.get("basename") or not zpath.is_file():
        raise DataError(f"{where}: compressed shard file {zpath} is missing")
    st = zpath.stat()
    if zd.get("bytes") is not None and st.st_size != zd["bytes"]:
        raise DataError(f"{zpath}: {st.st_size} bytes, index.json says {zd['bytes']} (truncated?)")
    import hashlib

    key = hashlib.sha256(f"{zpath.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    out = cache_dir("mds") / key / str(raw.get("basename") or zpath.name + ".raw")
    if out.is_file() and (raw.get("bytes") is None or out.stat().st_size == raw["bytes"]):
        return out
    try:
        data = _CODECS[family](zpath.read_bytes())
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - each codec raises its own types
        raise DataError(f"{zpath}: cannot decompress as {family} ({type(e).__name__}: {e})") from None
    if raw.get("bytes") is not None and len(data) != raw["bytes"]:
        raise DataError(f"{zpath}: decompresses to {len(data)} bytes, index.json says {raw['bytes']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, data)
    return out


class _NativeMDS:
    """Random access to the ``tokens`` column of an uncompressed local MDS folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        ip = folder / "index.json"
        try:
            index = json.loads(ip.read_text())
            shards = index["shards"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{ip}: not an MDS index ({e})") from None
        self.shards, counts = [], []
        for k, s in enumerate(shards):
            where = f"{ip} shard {k}"
            if s.get("format") != "mds":
                raise DataError(f"{where}: format {s.get('format')!r}; only 'mds' shards are read")
            names = s.get("column_names") or []
            if "tokens" not in names:
                raise DataError(f"{where}: no 'tokens' column (columns: {names}); convert with llm-foundry's "
                                "--concat_tokens")
            raw = s.get("raw_data") or {}
            path = folder / str(raw.get("basename", ""))
            if not path.is_file() and s.get("compression"):
                path = decompressed_shard(folder, s, where)
            if not path.is_file():
                raise DataError(f"{where}: shard file {path} is missing")
            if raw.get("bytes") is not None and path.stat().st_size != raw["bytes"]:
                raise DataError(f"{path}: {path.stat().st_size} bytes, index.json says {raw['bytes']} (truncated?)")
            col = names.index("tokens")
            sizes = s.get("column_sizes") or [None] * len(names)
            self.shards.append({"path": path, "n": int(s["samples"]), "col": col, "sizes": sizes,
                                "encoding": s["column_encodings"][col]})
            counts.append(int(s["samples"]))
        self._cum = [0] + np.cumsum(counts).astype(np.int64).tolist()
        self._maps: list | None = None

    def __len__(self) -> int:
        return self._cum[-1]

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_maps"] = None
        return d

    def tokens(self, i: int, bytes_dtype: np.dtype) -> np.ndarray:
        if self._maps is None:
            self._maps = [None] * len(self.shards)
        k = bisect.bisect_right(self._cum, i) - 1
        s = self.shards[k]
        if self._maps[k] is None:
            self._maps[k] = np.memmap(s["path"], dtype=np.uint8, mode="r")
        mm = self._maps[k]
        j = i - self._cum[k]
        begin, end = np.frombuffer(mm[4 * (1 + j): 4 * (3 + j)].tobytes(), dtype="<u4")
        data = memoryview(mm[begin:end].tobytes())
        # one u32 size per variable-size column, then the values in column order
        nvar = sum(1 for z in s["sizes"] if not z)
        var = iter(np.frombuffer(data[:4 * nvar], dtype="<u4").tolist())
        off = 4 * nvar
        for c, z in enumerate(s["sizes"]):
            size = z if z else next(var)
            if c == s["col"]:
                return _decode_tokens(s["encoding"], data[off:off + size], bytes_dtype, f"{s['path']} sample {j}")
            off += size
        raise AssertionError("unreachable")


class MDSTokenDataset(torch.utils.data.Dataset):
    """Samples of an llm-foundry MDS folder (``local``, optional ``split`` subfolder).

    ``eos_token_id`` (or ``bos_token_id``) gives ``sequence_id`` as for prepared shards; ``max_seq_len``
    checks every sample's length; ``bytes_dtype`` is the dtype of a ``bytes`` tokens column (older
    llm-foundry: int64).
    """

    def __init__(self, local, split: str | None = None, *, eos_token_id: int | None = None,
                 bos_token_id: int | None = None, max_seq_len: int | None = None, bytes_dtype: str = "int64"):
        local = Path(local)
        if not is_mds_folder(local, split):
            raise DataError(f"{local}: not an MDS dataset (no index.json{' under ' + split if split else ''})")
        folder = local / split if split else local
        self._native = self._streaming = None
        try:
            self._native = _NativeMDS(folder)
        except _NeedsStreaming as e:
            self._streaming = self._open_streaming(local, split, why=str(e))
        self.eos_token_id, self.bos_token_id = eos_token_id, bos_token_id
        self.max_seq_len = max_seq_len
        self.bytes_dtype = np.dtype(bytes_dtype).newbyteorder("<")
        self.folder = folder
        import hashlib

        self.manifest = {"format": "mds", "path": str(local), "split": split, "eos_token_id": eos_token_id,
                         "bos_token_id": bos_token_id, "max_seq_len": max_seq_len,
                         "num_samples": {split or "train": len(self)},
                         # the content, cheap to take (what exact resumption depends on)
                         "index_sha256": hashlib.sha256((folder / "index.json").read_bytes()).hexdigest()}

    @staticmethod
    def _open_streaming(local: Path, split: str | None, why: str = ""):
        try:
            from streaming import StreamingDataset
        except ImportError:
            raise DataError(why or f"{local}: {INSTALL_HINT}") from None
        try:
            return StreamingDataset(local=str(local), split=split, shuffle=False)
        except Exception as e:  # noqa: BLE001 - streaming raises many types
            raise DataError(f"{local}: cannot open as MDS ({type(e).__name__}: {e})") from None

    def __len__(self) -> int:
        return len(self._native) if self._native is not None else len(self._streaming)

    def _tokens(self, i: int) -> np.ndarray:
        if self._native is not None:
            return self._native.tokens(i, self.bytes_dtype)
        item = self._streaming[i]
        if "tokens" not in item:
            raise DataError(f"MDS sample {i} has no 'tokens' column (columns: {sorted(item)})")
        t = item["tokens"]
        return np.frombuffer(t, dtype=self.bytes_dtype) if isinstance(t, (bytes, bytearray)) else np.asarray(t)

    def __getitem__(self, i: int) -> dict:
        from mptkit.data.shards import sequence_ids

        n = len(self)
        i = int(i) + (n if int(i) < 0 else 0)
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        arr = self._tokens(i).astype(np.int64).reshape(-1)
        if self.max_seq_len is not None and len(arr) != self.max_seq_len:
            raise DataError(f"MDS sample {i} has {len(arr)} tokens, expected max_seq_len {self.max_seq_len}")
        return {"input_ids": torch.from_numpy(arr),
                "sequence_id": torch.from_numpy(sequence_ids(arr, self.eos_token_id, self.bos_token_id))}


def open_token_dataset(folder, split: str = "train", **kw):
    """A :class:`TokenDataset` for an mptkit prepared folder (``manifest.json``), an
    :class:`MDSTokenDataset` for an MDS folder (``index.json``), else :class:`DataError`."""
    from mptkit.data.shards import TokenDataset

    p = Path(folder)
    if (p / "manifest.json").is_file():
        return TokenDataset(p, split, **{k: v for k, v in kw.items() if k == "verify"})
    sub = mds_split_folder(p, split)
    if sub is not None or (p / "index.json").is_file():
        return MDSTokenDataset(p, sub, **{k: v for k, v in kw.items() if k != "verify"})
    raise DataError(f"{p}: neither an mptkit prepared dataset (manifest.json) nor an MDS dataset (index.json)")
