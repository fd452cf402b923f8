"""Ordinary errors are one line from the CLI (what failed, where, what to do; exit 2), never a raw
traceback, and `--debug` still shows the traceback: OS errors (disk full, permissions) in any command, a
full disk while preparing data, training (checkpoint saves, metrics, the export) or exporting, named with the
folder being written, a read error on the training data named as a read (not a write), an unwritable export_folder found
before the first step, an `--out`/`--json` that cannot be written, a recipe path that is a folder or not
UTF-8, `--device cuda` without CUDA, `--threads -3`, a legacy (non-zip) pytorch_model.bin."""

from __future__ import annotations

import errno

import pytest
import torch
import yaml

from mptkit.cli import main
from mptkit.errors import EXIT_NOT_RETRYABLE


def _one_line(capsys, rc, *needles, code=2):
    err = capsys.readouterr().err
    assert rc == code and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer and a small prepared dataset (seq 16) for tiny training runs."""
    from mptkit.data.prepare import prepare_dataset
    from mptkit.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("cli_errors")
    tok = train_tokenizer(None, 384, root / "tok", max_files=3)
    prepare_dataset(None, tok, root / "data", 16, max_files=3, val_fraction=0.0, progress=False)
    return root


def _recipe(tmp, data, **over):
    d = {"model": {"d_model": 32, "n_heads": 2, "n_layers": 1, "expansion_ratio": 2, "max_seq_len": 16,
                   "vocab_size": 384, "attn_config": {"alibi": True, "attn_impl": "torch"}},
         "tokenizer": {"name": str(data / "tok")},
         "train_loader": {"name": "text", "dataset": {"local": str(data / "data"), "split": "train"}},
         "max_duration": "4ba", "global_train_batch_size": 4, "device_train_microbatch_size": 4,
         "optimizer": {"name": "decoupled_adamw", "lr": 1e-3}, "eval_interval": "0ba", "save_interval": "2ba",
         "save_folder": str(tmp / "ck"), "run_folder": str(tmp / "run"), "progress_bar": False,
         "log_to_console": False, "run_name": "t", "peak_tflops": 1.0, "torch_threads": 1, "seed": 1}
    d.update(over)
    p = tmp / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


# ------------------------------------------------------------------------------ the CLI's own handler
@pytest.mark.parametrize("exc,needles", [
    (PermissionError(errno.EACCES, "Permission denied", "/some/where/file.bin"),
     ["/some/where/file.bin", "Permission denied", "check the permissions"]),
    (OSError(errno.ENOSPC, "No space left on device"), ["No space left on device", "disk is full"]),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), ["/ro/x", "Read-only", "writable"]),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/a/file/x"), ["/a/file/x", "is a file, not a folder"]),
    (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: basic_ios::clear: "
                  "iostream error"), ["the write failed", "basic_ios::clear"]),
    (UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"), ["not valid UTF-8", "0xff"]),
])
def test_os_errors_in_any_command_are_one_line_unless_debug(tmp_path, monkeypatch, capsys, exc, needles):
    """An OSError (or torch's stream error, or a UnicodeDecodeError) escaping a command's handler is printed
    as one line naming the path and what to do, exit 2; --debug raises it with its traceback."""
    import mptkit.data.prepare as prep

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(prep, "prepare_dataset", fail)
    argv = ["data", "prepare", "--tokenizer", str(tmp_path), "--max-seq-len", "8", "--out", str(tmp_path / "o")]
    _one_line(capsys, main(["-q", *argv]), "mptkit data: error:", *needles)
    with pytest.raises(type(exc)):
        main(["--debug", *argv])


def test_other_exceptions_still_show_their_traceback(monkeypatch):
    """A programming error is not disguised as an ordinary one: it propagates (the traceback is shown)."""
    import mptkit.data.prepare as prep

    monkeypatch.setattr(prep, "prepare_dataset", lambda *a, **k: {}["not a key"])
    with pytest.raises(KeyError):
        main(["-q", "data", "prepare", "--tokenizer", "x", "--max-seq-len", "8", "--out", "o"])


# ------------------------------------------------------------------------------ a full disk
def _full(exc):
    def raiser(*a, **k):
        raise exc
    return raiser


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 RuntimeError("basic_ios::clear: iostream error")])
def test_disk_full_while_preparing_is_one_line_and_keeps_the_dataset(tmp_path, data, monkeypatch, capsys, exc):
    """A full disk while shards are written: one line naming the output folder and saying the disk is full;
    the previous dataset is intact and nothing of the failed run remains but its part cache."""
    from mptkit.data import prepare as prep
    from mptkit.data.shards import TokenDataset

    out = tmp_path / "d"
    argv = ["-q", "data", "prepare", "--max-files", "2", "--tokenizer", str(data / "tok"), "--max-seq-len", "16",
            "--out", str(out), "--val-fraction", "0"]
    assert main(argv) == 0
    manifest = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(prep._ShardWriter, "write", _full(exc))
    monkeypatch.setattr("mptkit.utils.outputs.free_space", lambda p: 4096)
    _one_line(capsys, main([*argv[:-2], "--val-fraction", "0.5"]), str(out), "disk is full")
    assert (out / "manifest.json").read_bytes() == manifest and len(TokenDataset(out, verify=True)) > 0
    assert not list(out.rglob("*.tmp")) and sorted(p.name for p in out.iterdir()) == [".lock", ".parts", "gen1",
                                                                                        "manifest.json"]


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1 vs 0: "
                                              "basic_ios::clear: iostream error")])
def test_disk_full_while_saving_a_checkpoint_is_one_line(tmp_path, data, monkeypatch, capsys, exc):
    """torch.save failing on a full disk at the first checkpoint: one line naming the save folder and saying
    the disk is full, exit 2; no half-written checkpoint is left."""
    monkeypatch.setattr(torch, "save", _full(exc))
    monkeypatch.setattr("mptkit.utils.outputs.free_space", lambda p: 4096)
    _one_line(capsys, main(["-q", "train", str(_recipe(tmp_path, data))]), "mptkit train: error:",
              str(tmp_path / "ck"), "disk is full")
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


def test_a_read_error_on_the_training_data_is_not_reported_as_a_write(tmp_path, data, monkeypatch, capsys):
    """An OSError (EIO) while reading a shard mid-run: one line saying the shard could not be read, naming
    it, not "cannot write" and not the run or save folder."""
    from mptkit.data.shards import TokenDataset

    real, calls = TokenDataset._open, []

    def flaky(self):
        calls.append(1)
        if len(calls) > 9:  # the third step's batch
            raise OSError(errno.EIO, "Input/output error")
        return real(self)

    monkeypatch.setattr(TokenDataset, "_open", flaky)
    err = _one_line(capsys, main(["-q", "train", str(_recipe(tmp_path, data))]), "mptkit train: error:",
                    "cannot read", str(data / "data"), "Input/output error")
    assert "cannot write" not in err and str(tmp_path / "run") not in err and str(tmp_path / "ck") not in err


def test_disk_full_while_writing_metrics_names_the_run_folder(tmp_path, data, monkeypatch, capsys):
    """A full disk while a metrics line is written: one line naming metrics.jsonl in the run folder."""
    from mptkit.train import metrics

    real, calls = metrics.MetricsWriter.write, []

    def full(self, rec):
        calls.append(1)
        if len(calls) > 2:
            self._f.write = _full(OSError(errno.ENOSPC, "No space left on device"))
        return real(self, rec)

    monkeypatch.setattr(metrics.MetricsWriter, "write", full)
    monkeypatch.setattr("mptkit.utils.outputs.free_space", lambda p: 4096)
    err = _one_line(capsys, main(["-q", "train", str(_recipe(tmp_path, data))]), "mptkit train: error:",
                    "cannot write", str(tmp_path / "run" / "metrics.jsonl"), "disk is full")
    assert str(tmp_path / "ck") not in err


def test_disk_full_while_exporting_at_the_end_names_the_export_folder(tmp_path, data, monkeypatch, capsys):
    """The export at the end of a run failing on a full disk: one line naming export_folder, no partial
    export left."""
    from mptkit.model import MPTForCausalLM

    monkeypatch.setattr(MPTForCausalLM, "save_pretrained", _full(OSError(errno.ENOSPC, "No space left on device")))
    monkeypatch.setattr("mptkit.utils.outputs.free_space", lambda p: 4096)
    out = tmp_path / "hf"
    err = _one_line(capsys, main(["-q", "train", str(_recipe(tmp_path, data, save_folder=None,
                                                               export_folder=str(out)))]),
                    "cannot write the export (export_folder)", str(out), "disk is full")
    assert str(tmp_path / "run") + ":" not in err and not out.exists()


def test_unwritable_export_folder_is_refused_before_the_first_step(tmp_path, data, capsys):
    """An export_folder below a file (or one that is a file) is refused before training starts, not after."""
    (tmp_path / "afile").write_text("x")
    for folder in (tmp_path / "afile" / "hf", tmp_path / "afile"):
        rc = main(["-q", "train", str(_recipe(tmp_path, data, export_folder=str(folder)))])
        _one_line(capsys, rc, "export_folder", str(tmp_path / "afile"), code=EXIT_NOT_RETRYABLE)
        assert not (tmp_path / "ck").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------ outputs checked before work
def test_eval_json_and_plot_out_are_checked_before_any_work(tmp_path, data, capsys, monkeypatch):
    """eval --json / plot --out that is a folder or lies below a file: refused before the model is loaded or
    anything is read."""
    from mptkit.eval import scoring

    loaded = []
    monkeypatch.setattr(scoring, "load_model", lambda *a, **k: loaded.append(1) or (_ for _ in ()).throw(
        AssertionError("loaded")))
    (tmp_path / "afile").write_text("x")
    for bad, msg in ((tmp_path, "is a folder"), (tmp_path / "afile" / "r.json", "is a file, not a folder")):
        rc = main(["-q", "eval", "perplexity", str(tmp_path / "m"), "--data", str(data / "data"), "--json", str(bad)])
        _one_line(capsys, rc, "--json", msg)
        rc = main(["-q", "plot", str(tmp_path / "run"), "--out", str(bad)])
        _one_line(capsys, rc, "--out", msg)
    assert loaded == []


# ------------------------------------------------------------------------------ recipe paths
def test_recipe_that_is_a_folder_or_not_utf8_is_a_config_error(tmp_path, capsys):
    (tmp_path / "recipes").mkdir()
    _one_line(capsys, main(["-q", "train", str(tmp_path / "recipes")]), str(tmp_path / "recipes"), "is a folder",
              code=EXIT_NOT_RETRYABLE)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"run_name: caf\xe9\n")
    _one_line(capsys, main(["-q", "train", str(bad)]), str(bad), "not valid UTF-8", "line 1", code=EXIT_NOT_RETRYABLE)


# ------------------------------------------------------------------------------ flags checked by argparse
def _argparse_error(capsys, argv, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


@pytest.mark.parametrize("cmd", [["generate", "M", "--prompt", "x"], ["chat", "M"], ["serve", "M"],
                                 ["eval", "perplexity", "M", "--data", "D"]])
def test_device_and_threads_are_checked_when_parsed(capsys, cmd):
    """--device cuda without CUDA (or a CUDA device that does not exist), a device name torch does not know,
    and --threads below 1 are argparse errors naming the flag, before any model is read."""
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    _argparse_error(capsys, ["-q", *cmd, "--device", missing], "argument --device", "CUDA", "--device cpu")
    _argparse_error(capsys, ["-q", *cmd, "--device", "gpu0"], "argument --device", "not a device")
    for n in ("-3", "0", "two"):
        _argparse_error(capsys, ["-q", *cmd, "--threads", n], "argument --threads", "1 or more")


# ------------------------------------------------------------------------------ legacy weights
def test_legacy_non_zip_pytorch_model_bin_says_what_it_is_and_how_to_convert(tmp_path, make_tokenizer, capsys):
    """A pytorch_model.bin in torch's legacy (pre-1.6, non-zip) format: one line saying so, that mptkit
    will not unpickle it, and how to convert it; the same weights in the zip format load."""
    from safetensors.torch import load_file

    from mptkit.model import MPTForCausalLM
    from tests.helpers import saved_model

    saved_model(tmp_path / "M", make_tokenizer())
    sd = load_file(str(tmp_path / "M" / "model.safetensors"))
    (tmp_path / "M" / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "M" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    rc = main(["-q", "generate", str(tmp_path / "M"), "--prompt", "x", "--max-new-tokens", "2"])
    _one_line(capsys, rc, "pytorch_model.bin", "legacy (pre-1.6, non-zip) torch file", "will not unpickle",
              "safetensors")
    torch.save(sd, tmp_path / "M" / "pytorch_model.bin")
    MPTForCausalLM.from_pretrained(tmp_path / "M")
