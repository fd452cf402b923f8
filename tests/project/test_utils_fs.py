"""Atomic writes: the final file/folder gets the mode a plain open()/mkdir() would give (not mkstemp's 0600),
and a failed write leaves the previous good file untouched."""

from __future__ import annotations

import os
import stat

import pytest

from mptkit.utils.fs import atomic_dir, atomic_write_json, atomic_write_text


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_atomic_file_mode_matches_plain_open(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    (tmp_path / "plain.txt").write_text("x")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~_umask()


def test_atomic_dir_mode_matches_mkdir(tmp_path):
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("x")
    (tmp_path / "plain").mkdir()
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_failed_write_keeps_good_file(tmp_path):
    p = tmp_path / "keep.txt"
    atomic_write_text(p, "good")
    with pytest.raises(RuntimeError):
        from mptkit.utils.fs import atomic_path

        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert p.read_text() == "good"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keep.txt"]


def test_real_path_follows_links_and_survives_a_loop(tmp_path, monkeypatch):
    """real_path (the one resolution the corpus finder and the output checks share): absolute, links followed,
    and a symlink loop gives a path instead of an error."""
    from mptkit.utils.fs import real_path

    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "d", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    assert real_path("link") == (tmp_path / "d").resolve()
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    assert real_path(tmp_path / "a").is_absolute()


def test_env_number_defaults_and_bad_values(monkeypatch):
    """env_number: unset or empty gives the default; a value that does not parse gives the default, or the
    caller's error (torchrun's ranks)."""
    from mptkit.utils.env import env_number

    monkeypatch.delenv("MPTKIT_TEST_N", raising=False)
    assert env_number("MPTKIT_TEST_N", 3, int) == 3
    for v, want in (("", 2.5), ("7.25", 7.25), ("x", 2.5)):
        monkeypatch.setenv("MPTKIT_TEST_N", v)
        assert env_number("MPTKIT_TEST_N", 2.5, float) == want
    monkeypatch.setenv("MPTKIT_TEST_N", "two")
    with pytest.raises(ValueError, match="bad two"):
        env_number("MPTKIT_TEST_N", 1, int, invalid=lambda v: ValueError(f"bad {v}"))
