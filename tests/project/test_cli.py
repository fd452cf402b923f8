"""The `mptkit` console command: version, help, the info job, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

from mptkit import __version__
from mptkit.cli import main


def test_version_and_help_from_the_installed_entry_point():
    out = subprocess.run(["mptkit", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"mptkit {__version__}"
    out = subprocess.run([sys.executable, "-m", "mptkit.cli", "--help"], capture_output=True, text=True, check=True)
    assert "info" in out.stdout and "usage: mptkit" in out.stdout


def test_info_reports_size_and_flops_without_allocating(capsys):
    assert main(["info", "mpt-7b", "--no-time"]) == 0
    out = capsys.readouterr().out
    assert "6,649,286,656" in out
    # FLOPs/token at max_seq_len 2048: 6N + 12 * L * d * T
    assert f"{6 * 6_649_286_656 + 12 * 32 * 4096 * 2048:,}" in out


def test_info_times_a_forward_pass(capsys):
    assert main(["info", "mpt-tiny", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "batch 1 x 32 tokens" in out


def test_user_error_is_one_line_without_traceback(capsys):
    assert main(["info", "mpt-tni"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'mpt-tiny'" in err and "Traceback" not in err
