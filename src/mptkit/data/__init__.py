"""Data: tokenizers, corpus preparation into packed token shards, and an exactly-resumable loader.

- :mod:`mptkit.data.corpus`: input files (and the default corpus: the stdlib source), document readers,
  bad-input reports.
- :mod:`mptkit.data.tokenizer`: ``train_tokenizer``, ``tokenizer_fingerprint``, ``encode_batch`` (loading tokenizer
  files: :func:`mptkit.io.tokenizer_files.load_tokenizer`).
- :mod:`mptkit.data.prepare`: ``prepare_dataset`` (corpus -> ``manifest.json`` + shards).
- :mod:`mptkit.data.shards`: ``TokenDataset``, ``ResumableSampler``, ``check_compatible``.
- :mod:`mptkit.data.mds`: llm-foundry MDS folders (``MDSTokenDataset``, ``open_token_dataset``).

See docs/data.md. Submodules are imported on use (this package imports nothing heavy).
"""
