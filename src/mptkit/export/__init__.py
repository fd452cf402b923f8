"""Exports: a HF folder (``export_hf``: transformers / mptkit) and a GGUF file (``export_gguf``: llama.cpp)."""

from __future__ import annotations

__all__ = ["export_gguf", "export_hf"]


def __getattr__(name: str):
    if name == "export_hf":
        from mptkit.export.hf import export_hf

        return export_hf
    if name == "export_gguf":
        from mptkit.export.gguf import export_gguf

        return export_gguf
    raise AttributeError(name)
