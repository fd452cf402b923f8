"""One dtype table for the whole package (``mptkit.utils.dtypes``): every spelling it lists means one torch dtype,
and the commands' choices, the KV cache, ``export_hf`` and ``fsdp_config``'s mixed precision read their names
from it (each accepts every spelling of the table, and refuses what is not in it)."""

from __future__ import annotations

import pytest
import torch

from mptkit.errors import ConfigError, ExportError, InferenceError
from mptkit.utils import dtypes

EXPECTED = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def test_the_table_names_three_dtypes_and_their_spellings():
    assert {s: dtypes.any_torch_dtype(s) for s in dtypes.DTYPES} == EXPECTED
    for name, short in dtypes.ALIASES.items():
        assert dtypes.any_torch_dtype(name) is EXPECTED[short], name
    for precision, short in dtypes.PRECISIONS.items():
        assert dtypes.any_torch_dtype(precision) is EXPECTED[short], precision
    assert list(dtypes.WEIGHT_DTYPES) == ["fp32", "float32", "bf16", "bfloat16", "fp16", "float16"]
    for name in dtypes.WEIGHT_DTYPES:
        assert dtypes.torch_dtype(name) is EXPECTED[dtypes.ALIASES[name]]
        assert dtypes.torch_name(dtypes.torch_dtype(name)) == dtypes.WEIGHT_DTYPES[name]
    with pytest.raises(KeyError):
        dtypes.torch_dtype("half")  # the command choices are the short and torch names only
    with pytest.raises(KeyError):
        dtypes.torch_name(torch.int8)


def test_the_kv_cache_and_the_hf_export_read_the_table(tmp_path):
    from mptkit.export.hf import HF_DTYPES, export_hf
    from mptkit.infer.generate import kv_cache_dtype

    for name in dtypes.WEIGHT_DTYPES:
        assert kv_cache_dtype(name, torch.float32) is dtypes.torch_dtype(name)
    with pytest.raises(InferenceError, match="use one of auto, fp32, fp16, bf16"):
        kv_cache_dtype("half", torch.float32)
    assert HF_DTYPES == EXPECTED
    for name in dtypes.ALIASES:  # each spelling passes the dtype check, then the missing folder is the error
        with pytest.raises(ExportError) as e:
            export_hf(tmp_path / "no-model", tmp_path / "out", dtype=name)
        assert "--dtype" not in str(e.value), (name, str(e.value))
    with pytest.raises(ExportError, match="--dtype int8: expected one of fp32, bf16, fp16"):
        export_hf(tmp_path / "no-model", tmp_path / "out", dtype="int8")


def test_fsdp_mixed_precision_reads_the_table():
    from mptkit.train.fsdp import parse_fsdp_config

    for name in (*dtypes.ALIASES, *dtypes.PRECISIONS, "BF16"):
        parse_fsdp_config({"mixed_precision": {"param_dtype": name, "reduce_dtype": name}})
    with pytest.raises(ConfigError, match="param_dtype: 'int8' is not one of fp32, bf16, fp16"):
        parse_fsdp_config({"mixed_precision": {"param_dtype": "int8"}})
