"""Run mosaicml-streaming's own MDSWriter / StreamingDataset in a child process (tests/data/test_data_mds.py).

mosaicml-streaming cannot be installed into the test environment (its ``torchvision`` requirement links CUDA
beside the CPU torch, and it pins ``transformers<5`` and ``numpy<2.2``: .ci/run), so .ci/run installs the
package with ``pip install --no-deps --target DIR`` plus the small libraries its ``streaming.base`` modules
import (zstd, brotli, python-snappy + cramjam, catalogue; xxhash, numpy, torch, Pillow, tqdm come from the test
environment). Its top-level ``streaming/__init__.py`` imports ``streaming.vision`` (torchvision) only to
re-export it, so this child registers the ``streaming`` package without running that one file and then imports
``streaming.base`` -- the package's own modules, unchanged: the writer and reader used are the real ones (the
child checks they were loaded from DIR).

    python streaming_child.py DIR JOB.json  ->  prints a JSON report

JOB.json: ``{"write": [{"out": folder, "rows": file.npy, "size_limit": int, "compression": str | null}],
"read": [folder, ...]}``; each
write puts one sample ``{"tokens": row}`` per int32 row, with llm-foundry's ``convert_dataset_hf.py``
columns (``{"tokens": "ndarray:int32"}``, no compression unless the job names one: e.g. ``zstd``); each read dumps ``StreamingDataset(local=folder,
shuffle=False)``'s tokens to ``folder + ".read.npy"``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys


def load_streaming(target: str):
    sys.path.append(target)  # after the test environment: numpy, torch, xxhash... are the environment's
    spec = importlib.machinery.ModuleSpec("streaming", None, is_package=True)
    spec.submodule_search_locations = [os.path.join(target, "streaming")]
    sys.modules["streaming"] = importlib.util.module_from_spec(spec)
    import streaming.base
    import streaming.base.format.mds.writer as writer_module
    from streaming._version import __version__

    where = os.path.realpath(writer_module.__file__)
    if not where.startswith(os.path.realpath(target) + os.sep):
        raise SystemExit(f"streaming's writer was loaded from {where}, not from {target}")
    return streaming.base, __version__, where


def main(target: str, job_path: str) -> None:
    import numpy as np

    base, version, where = load_streaming(target)
    with open(job_path) as f:
        job = json.load(f)
    report = {"version": version, "writer_file": where, "written": [], "read": []}
    for w in job.get("write", []):
        rows = np.load(w["rows"])
        with base.MDSWriter(
            out=w["out"],
            columns={"tokens": "ndarray:int32"},
            compression=w.get("compression"),
            size_limit=w.get("size_limit", 1 << 26),
        ) as out:
            for r in rows:
                out.write({"tokens": r.astype(np.int32)})
        report["written"].append(w["out"])
    for folder in job.get("read", []):
        ds = base.StreamingDataset(local=folder, shuffle=False, batch_size=1)
        rows = np.stack([np.asarray(ds[i]["tokens"]) for i in range(ds.num_samples)])
        np.save(folder.rstrip("/") + ".read.npy", rows)
        report["read"].append(folder)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
