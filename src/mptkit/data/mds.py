"""Interop: read MDS datasets written by llm-foundry's ``convert_dataset_hf.py`` / ``convert_dataset_json.py``
(``--concat_tokens``; one ``tokens`` column) through the optional ``mosaicml-streaming`` package.

``MDSTokenDataset`` gives the same items as :class:`mptkit.data.shards.TokenDataset`
(``input_ids``, ``sequence_id``), so the trainer and :class:`ResumableSampler` use either.
:func:`open_token_dataset` picks the reader from the folder's contents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mptkit.errors import DataError

INSTALL_HINT = ("reading MDS datasets needs the optional package mosaicml-streaming: "
                "pip install 'mptkit[mds]' (or pip install mosaicml-streaming)")


def _streaming():
    try:
        import streaming  # noqa: F401
        from streaming import StreamingDataset
    except ImportError:
        raise DataError(INSTALL_HINT) from None
    return StreamingDataset


def is_mds_folder(folder, split: str | None = None) -> bool:
    p = Path(folder)
    return (p / "index.json").is_file() or (split is not None and (p / split / "index.json").is_file())


class MDSTokenDataset(torch.utils.data.Dataset):
    """Samples of an llm-foundry MDS folder (``local``, optional ``split`` subfolder).

    ``tokens`` may be an ``ndarray`` column (current llm-foundry: int32) or ``bytes`` (older llm-foundry:
    raw int64). ``eos_token_id`` (or ``bos_token_id``) gives ``sequence_id`` as for prepared shards;
    ``max_seq_len`` checks every sample's length.
    """

    def __init__(self, local, split: str | None = None, *, eos_token_id: int | None = None,
                 bos_token_id: int | None = None, max_seq_len: int | None = None, bytes_dtype: str = "int64"):
        local = Path(local)
        if not is_mds_folder(local, split):
            raise DataError(f"{local}: not an MDS dataset (no index.json{' under ' + split if split else ''})")
        StreamingDataset = _streaming()
        try:
            self._ds = StreamingDataset(local=str(local), split=split, shuffle=False)
        except Exception as e:  # noqa: BLE001 - streaming raises many types
            raise DataError(f"{local}: cannot open as MDS ({type(e).__name__}: {e})") from None
        self.eos_token_id, self.bos_token_id = eos_token_id, bos_token_id
        self.max_seq_len = max_seq_len
        self.bytes_dtype = np.dtype(bytes_dtype)
        self.manifest = {"format": "mds", "path": str(local), "split": split, "eos_token_id": eos_token_id,
                         "bos_token_id": bos_token_id, "max_seq_len": max_seq_len,
                         "num_samples": {split or "train": len(self._ds)}}

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, i: int) -> dict:
        from mptkit.data.shards import sequence_ids

        item = self._ds[int(i)]
        if "tokens" not in item:
            raise DataError(f"MDS sample {i} has no 'tokens' column (columns: {sorted(item)})")
        t = item["tokens"]
        arr = np.frombuffer(t, dtype=self.bytes_dtype) if isinstance(t, (bytes, bytearray)) else np.asarray(t)
        arr = arr.astype(np.int64)
        if self.max_seq_len is not None and len(arr) != self.max_seq_len:
            raise DataError(f"MDS sample {i} has {len(arr)} tokens, expected max_seq_len {self.max_seq_len}")
        return {"input_ids": torch.from_numpy(arr),
                "sequence_id": torch.from_numpy(sequence_ids(arr, self.eos_token_id, self.bos_token_id))}


def open_token_dataset(folder, split: str = "train", **kw):
    """A :class:`TokenDataset` for an mptkit prepared folder (``manifest.json``), an
    :class:`MDSTokenDataset` for an MDS folder (``index.json``), else :class:`DataError`."""
    from mptkit.data.shards import SPLIT_ALIASES, TokenDataset

    p = Path(folder)
    if (p / "manifest.json").is_file():
        return TokenDataset(p, split, **{k: v for k, v in kw.items() if k == "verify"})
    subs = [s for s in (split, SPLIT_ALIASES.get(split, split)) if (p / s / "index.json").is_file()]
    if subs or (p / "index.json").is_file():
        sub = subs[0] if subs else None
        return MDSTokenDataset(p, sub, **{k: v for k, v in kw.items() if k != "verify"})
    raise DataError(f"{p}: neither an mptkit prepared dataset (manifest.json) nor an MDS dataset (index.json)")
