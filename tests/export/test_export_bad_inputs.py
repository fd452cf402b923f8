"""Exports never destroy what they read or what they did not write: an OUT that is, lies inside or contains
the source is refused, an existing OUT is replaced only when it is an earlier export and only with
--overwrite, an OUT that cannot be written is refused before any work, and a write that fails (disk full)
is one line naming the file, with the previous output untouched."""

from __future__ import annotations

import errno

import pytest

from mptkit.cli import main as cli_main
from mptkit.errors import ExportError
from tests.helpers import saved_model

gguf = pytest.importorskip("gguf")


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_gguf_out_inside_the_source_is_refused(tmp_path, make_tokenizer, capsys):
    """`export gguf M M/model.safetensors` (or M/config.json, or M itself) is refused in one line and the
    model folder is left exactly as it was."""
    saved_model(tmp_path / "M", make_tokenizer())
    before = _snapshot(tmp_path / "M")
    for out in (tmp_path / "M" / "model.safetensors", tmp_path / "M" / "config.json", tmp_path / "M" / "new.gguf"):
        rc = cli_main(["-q", "export", "gguf", str(tmp_path / "M"), str(out)])
        err = _one_line_error(capsys, rc)
        assert "the source" in err and str(out) in err
        rc = cli_main(["-q", "export", "gguf", str(tmp_path / "M"), str(out), "--overwrite"])
        assert "the source" in _one_line_error(capsys, rc)
    assert _snapshot(tmp_path / "M") == before
    assert cli_main(["-q", "export", "gguf", str(tmp_path / "M"), str(tmp_path)]) == 2
    assert "the source" in capsys.readouterr().err  # a folder holding the source


def test_gguf_existing_out_needs_overwrite_and_must_be_a_gguf_file(tmp_path, make_tokenizer, capsys):
    """An existing .gguf is replaced only with --overwrite; a file that is not a GGUF file never is."""
    from mptkit.export.gguf import export_gguf

    saved_model(tmp_path / "M", make_tokenizer())
    out = tmp_path / "m.gguf"
    export_gguf(tmp_path / "M", out)
    before = out.read_bytes()
    with pytest.raises(ExportError, match="--overwrite"):
        export_gguf(tmp_path / "M", out, dtype="f16")
    assert out.read_bytes() == before
    export_gguf(tmp_path / "M", out, dtype="f16", overwrite=True)
    assert out.read_bytes() != before and out.read_bytes()[:4] == b"GGUF"
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    rc = cli_main(["-q", "export", "gguf", str(tmp_path / "M"), str(notes), "--overwrite"])
    assert "not a GGUF file" in _one_line_error(capsys, rc)
    assert notes.read_text() == "keep me"


def test_hf_out_inside_the_model_folder_is_refused(tmp_path, make_tokenizer):
    """export hf refuses an OUT inside the model folder (as well as the folder itself or one holding it)."""
    from mptkit.export.hf import export_hf

    saved_model(tmp_path / "M", make_tokenizer())
    before = _snapshot(tmp_path / "M")
    with pytest.raises(ExportError, match="the source"):
        export_hf(tmp_path / "M", tmp_path / "M" / "hf")
    assert _snapshot(tmp_path / "M") == before


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, make_tokenizer, capsys, monkeypatch, fmt):
    """An OUT below a file, an OUT of the wrong kind, and a folder where nothing can be created (simulated
    EACCES: the tests may run as root) are one-line errors before the model is read."""
    import tempfile

    from mptkit.export import source

    saved_model(tmp_path / "M", make_tokenizer())
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "x").write_text("x")
    read = []
    real_load = source.load_config
    monkeypatch.setattr(source, "load_config", lambda f: read.append(f) or real_load(f))
    wrong_kind = tmp_path / ("afile" if fmt == "hf" else "adir")
    for out, msg in ((tmp_path / "afile" / "sub", "is a file, not a folder"),
                     (wrong_kind, "a file, not a folder" if fmt == "hf" else "is a folder")):
        rc = cli_main(["-q", "export", fmt, str(tmp_path / "M"), str(out)])
        assert msg in _one_line_error(capsys, rc)
    real_mkstemp = tempfile.mkstemp

    def denied(*a, **k):
        if "mptkit-write-test" in str(k.get("prefix", "")):
            raise PermissionError(errno.EACCES, "Permission denied", str(k.get("dir")))
        return real_mkstemp(*a, **k)

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    rc = cli_main(["-q", "export", fmt, str(tmp_path / "M"), str(tmp_path / "ro" / "out.x")])
    err = _one_line_error(capsys, rc)
    assert "Permission denied" in err and "permissions" in err and str(tmp_path) in err
    assert read == []  # refused before the source was opened


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_disk_full_during_export_is_one_line_and_keeps_the_previous_output(tmp_path, make_tokenizer, capsys,
                                                                          monkeypatch, fmt):
    """A full disk while writing (OSError ENOSPC from the writer, and torch's 'basic_ios::clear: iostream
    error' RuntimeError) is one line naming the output and saying the disk is full; the earlier export is
    left whole and no temporary file remains."""
    saved_model(tmp_path / "M", make_tokenizer())
    out = tmp_path / ("out" if fmt == "hf" else "m.gguf")
    assert cli_main(["-q", "export", fmt, str(tmp_path / "M"), str(out)]) == 0
    before = _snapshot(out) if fmt == "hf" else out.read_bytes()
    for exc in (OSError(errno.ENOSPC, "No space left on device"), RuntimeError("basic_ios::clear: iostream error")):
        if fmt == "hf":
            import safetensors.torch

            def full(*a, _e=exc, **k):
                raise _e

            monkeypatch.setattr(safetensors.torch, "save_file", full)
        else:
            import mptkit.export.gguf as g

            def full(*a, _e=exc, **k):
                raise _e

            monkeypatch.setattr(g, "_prepare", full)
        monkeypatch.setattr("mptkit.utils.outputs.free_space", lambda p: 1000)
        rc = cli_main(["-q", "export", fmt, str(tmp_path / "M"), str(out), "--overwrite"])
        err = _one_line_error(capsys, rc)
        assert "disk is full" in err and str(out) in err, err
        assert (_snapshot(out) if fmt == "hf" else out.read_bytes()) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["M", "tok", out.name])
