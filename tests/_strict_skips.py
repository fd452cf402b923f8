"""Strict skips (a pytest plugin, loaded by tests/conftest.py): with ``MPTKIT_STRICT_SKIPS=1`` (set by
``.ci/run``) the session fails when a test is skipped -- ``pytest.skip``, ``skipif``, ``importorskip`` (also
at module level), or xfailed -- for a reason not on ``ALLOWED`` below, and lists every such test with its
reason. ``MPTKIT_STRICT_SKIPS=all`` allows no skip at all. Unset or ``0``: skips are reported as usual.

A test that CI cannot run on its machine goes on ``ALLOWED`` with the reason why; anything else that skips
in CI is a missing install (chromium, llama-cpp-python, ...) and must fail the build."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pytest

ENV = "MPTKIT_STRICT_SKIPS"


@dataclass(frozen=True)
class Allowed:
    reason: str  # regex searched in the skip / xfail reason
    why: str  # why CI may skip it
    nodeid: str = ""  # if set, only test ids starting with this


ALLOWED: tuple[Allowed, ...] = (
    # CUDA-only tests skip with a reason that says so ("needs CUDA", "requires a GPU")
    Allowed(r"(?i)\b(needs?|requires?)\b.*\b(cuda|gpus?)\b", "CUDA-only: the CI machine has no GPU"),
)

def _mode() -> str:
    v = os.environ.get(ENV, "").strip().lower()
    return "" if v in ("", "0", "false", "no") else ("all" if v == "all" else "list")


def allowed_for(nodeid: str, reason: str) -> Allowed | None:
    for a in ALLOWED:
        if (not a.nodeid or nodeid.startswith(a.nodeid)) and re.search(a.reason, reason):
            return a
    return None


def _reason(report) -> str:
    if getattr(report, "wasxfail", None) is not None:
        return f"xfail: {report.wasxfail}" if report.wasxfail else "xfail"
    lr = report.longrepr
    return str(lr[2]) if isinstance(lr, tuple) and len(lr) == 3 else str(lr)


def _where(report) -> str:
    lr = report.longrepr
    if not (isinstance(lr, tuple) and len(lr) == 3):
        return ""
    path = os.path.relpath(lr[0]) if os.path.isabs(lr[0]) and not os.path.relpath(lr[0]).startswith("..") else lr[0]
    return f"{path}:{lr[1]}"  # as pytest's own -rs summary prints it


class StrictSkips:
    def __init__(self, mode: str):
        self.mode = mode
        self.bad: list[tuple[str, str, str]] = []  # (test id, file:line, reason)

    def _note(self, report) -> None:
        if not report.skipped:
            return
        reason = _reason(report)
        if self.mode == "all" or allowed_for(report.nodeid, reason) is None:
            self.bad.append((report.nodeid, _where(report), reason))

    def pytest_collectreport(self, report):  # module-level importorskip / skip(allow_module_level=True)
        self._note(report)

    def pytest_runtest_logreport(self, report):  # skip, skipif, importorskip in a test, xfail
        self._note(report)

    def pytest_sessionfinish(self, session, exitstatus):
        if self.bad and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        if not self.bad:
            return
        what = ("any skip" if self.mode == "all"
                else "a skip whose reason is not on the allow-list, ALLOWED in tests/_strict_skips.py")
        tr = terminalreporter
        tr.section(f"{ENV}: unexpected skips", sep="=", red=True, bold=True)
        tr.line(f"{len(self.bad)} test(s) skipped that must run here ({ENV}={os.environ.get(ENV)} fails on {what}):",
                red=True)
        for nodeid, where, reason in self.bad:
            tr.line(f"  {nodeid}" + (f" ({where})" if where else "") + f": {reason}")
        tr.line("Install what they need, or add them to ALLOWED with the reason CI cannot run them.")


def pytest_configure(config):
    mode = _mode()
    if mode:
        config.pluginmanager.register(StrictSkips(mode), "mptkit-strict-skips")
