"""The web chat page at / streams a reply over the API in a real browser (headless Chromium): the page sends
`?say=...` on load; we drive Chromium over the DevTools protocol (``--remote-debugging-pipe``, no extra packages)
and poll the live DOM in real time until the page marks the stream finished (``<body data-state="done">``).
Skipped when no chromium binary is installed (CI: `apt-get install -y chromium`)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from tests.infer.test_server_api import server  # noqa: F401  (module-scoped fixture reused)


def test_index_served(server):  # noqa: F811
    """/ returns the page with the model id filled in."""
    base, _ = server
    r = httpx.get(base + "/")
    assert r.status_code == 200 and "mptkit chat" in r.text and "tiny" in r.text


class _CDP:
    """Minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3: commands in, fd 4: replies out;
    messages are JSON terminated by a NUL byte)."""

    def __init__(self, exe: str, user_dir: str):
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()
        # the child's ends, moved to fds >= 10 so that putting them on 3 and 4 cannot clobber one with the
        # other; a Python trampoline does the dup2s and execs chromium (no preexec_fn: unsafe with the
        # server's threads; sh cannot name fds above 9)
        a = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
        b = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
        for fd in (to_child_r, from_child_w):
            os.close(fd)
        trampoline = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
                      "os.close(int(sys.argv[1])); os.close(int(sys.argv[2])); os.execvp(sys.argv[3], sys.argv[3:])")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", trampoline, str(a), str(b),
             exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={user_dir}", "about:blank"],
            pass_fds=(a, b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(a)
        os.close(b)
        self._buf = b""
        self._id = 0

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def close(self):
        try:
            self.call("Browser.close")
        except (OSError, RuntimeError):  # already gone: the wait/kill below still reaps it
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)


@pytest.mark.slow
def test_page_streams_in_headless_chromium(server, tmp_path):  # noqa: F811
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("no chromium installed (apt-get install -y chromium)")
    base, _ = server
    cdp = _CDP(exe, str(tmp_path))
    try:
        target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        cdp.call("Page.navigate", {"url": base + "/?say=hello&max_tokens=8&temperature=0"}, session)
        probe = ("JSON.stringify({state: document.body ? (document.body.dataset.state || '') : '',"
                 " log: document.getElementById('log') ? document.getElementById('log').innerHTML : ''})")
        deadline = time.monotonic() + 90
        page = {"state": "", "log": ""}
        while time.monotonic() < deadline:
            res = cdp.call("Runtime.evaluate", {"expression": probe, "returnByValue": True}, session)
            page = json.loads(res["result"].get("value") or "{}") or page
            if page.get("state") in ("done", "error", "stopped"):
                break
            time.sleep(0.2)
    finally:
        cdp.close()
    assert page["state"] == "done", page
    log = page["log"]
    assert 'class="user"' in log and "hello" in log
    # the assistant turn exists and holds streamed text
    i = log.find('class="assistant"')
    assert i >= 0, log
    content = log[i:].split('class="content">', 1)[1].split("</span>", 1)[0]
    assert content.strip(), log
