"""The strict-skips plugin (tests/_strict_skips.py) that CI runs under: with MPTKIT_STRICT_SKIPS=1 a skip whose
reason is not on the allow-list -- pytest.skip, skipif, importorskip in a test or at module level, xfail --
fails the session and is listed with its reason; an allowed skip (a CUDA-only test) passes; unset, skips are
ordinary; =all refuses even allowed ones."""

from __future__ import annotations

import pytest

from tests._strict_skips import ALLOWED, ENV, allowed_for

UNEXPECTED = """
import pytest

def test_runs():
    pass

def test_skip():
    pytest.skip("no chromium installed")

@pytest.mark.skipif(True, reason="flag off")
def test_skipif():
    pass

def test_importorskip():
    pytest.importorskip("surely_not_a_module_xyz")

@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False
"""

MODULE_SKIP = """
import pytest
pytest.importorskip("another_missing_module_xyz")

def test_never():
    pass
"""

ALLOWED_ONLY = """
import pytest

def test_runs():
    pass

def test_cuda():
    pytest.skip("needs CUDA")
"""


def _run(pytester, monkeypatch, mode, **files):
    if mode is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, mode)
    pytester.makepyfile(**files)
    return pytester.runpytest("-p", "tests._strict_skips", "-p", "no:cacheprovider")


def test_unexpected_skips_fail_the_session(pytester, monkeypatch):
    r = _run(pytester, monkeypatch, "1", test_a=UNEXPECTED, test_b=MODULE_SKIP)
    assert r.ret == pytest.ExitCode.TESTS_FAILED
    r.assert_outcomes(passed=1, skipped=4, xfailed=1)
    out = r.stdout.str()
    assert f"{ENV}: unexpected skips" in out and "5 test(s) skipped that must run here" in out
    for needle in ("test_a.py::test_skip", "no chromium installed", "test_a.py::test_skipif", "flag off",
                   "test_a.py::test_importorskip", "surely_not_a_module_xyz", "test_a.py::test_xfail",
                   "xfail: known bug", "test_b.py", "another_missing_module_xyz"):
        assert needle in out, needle


def test_allowed_skip_passes(pytester, monkeypatch):
    r = _run(pytester, monkeypatch, "1", test_c=ALLOWED_ONLY)
    assert r.ret == pytest.ExitCode.OK
    r.assert_outcomes(passed=1, skipped=1)
    assert "unexpected skips" not in r.stdout.str()


def test_off_by_default_and_all_refuses_every_skip(pytester, monkeypatch):
    r = _run(pytester, monkeypatch, None, test_a=UNEXPECTED)
    assert r.ret == pytest.ExitCode.OK and "unexpected skips" not in r.stdout.str()
    r = _run(pytester, monkeypatch, "all", test_c=ALLOWED_ONLY)
    assert r.ret == pytest.ExitCode.TESTS_FAILED and "test_c.py::test_cuda" in r.stdout.str()


def test_a_real_failure_keeps_its_exit_code(pytester, monkeypatch):
    r = _run(pytester, monkeypatch, "1", test_d="import pytest\ndef test_f():\n    assert False\n"
                                               "def test_s():\n    pytest.skip('nope')\n")
    assert r.ret == pytest.ExitCode.TESTS_FAILED and "test_d.py::test_s" in r.stdout.str()


def test_allow_list_entries_have_reasons_and_match_narrowly():
    assert ALLOWED and all(a.why.strip() for a in ALLOWED)
    assert allowed_for("tests/test_x.py::test_y", "Skipped: needs CUDA")
    assert allowed_for("tests/test_x.py::test_y", "Skipped: needs x86-64 with AVX2+FMA and gcc") is None
    # mosaicml-streaming's writer is installed by .ci/run (--no-deps): its comparisons may not skip in CI
    mds = "tests/data/test_data_mds.py::test_mosaicml_streaming_writer_and_reader_agree_with_mptkit"
    assert allowed_for(mds, "Skipped: mosaicml-streaming's own MDSWriter is not installed in .cache") is None
    assert allowed_for(mds, "could not import 'streaming': No module named 'streaming'") is None
