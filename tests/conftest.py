"""Shared fixtures: the seed, and the test tokenizer (trained once per session by tests/helpers.py, copied to
where a test asks for it). What the tests build (tiny configs, models, data) is in tests/helpers.py."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import TokenizerFolders

# tests/_strict_skips.py: MPTKIT_STRICT_SKIPS=1 (CI) fails the run on a skip not on its allow-list
pytest_plugins = ["pytester", "tests._strict_skips"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def tokenizer_folders(tmp_path_factory):
    """The session's tokenizers (``helpers.TokenizerFolders``): each vocabulary size trained once."""
    return TokenizerFolders(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture
def make_tokenizer(tmp_path, tokenizer_folders):
    """``make_tokenizer(folder=None, vocab_size=400)``: the test tokenizer (a byte-level BPE trained on standard
    library source, ``helpers.bpe_tokenizer``) as an HF folder at ``folder`` (default ``tmp_path/"tok"``)."""

    def _make(folder=None, vocab_size=400):
        return tokenizer_folders.make(folder or (tmp_path / "tok"), vocab_size)

    return _make
