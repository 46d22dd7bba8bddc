"""Headless Chromium driven over the DevTools protocol on a pipe (no extra package).

``--remote-debugging-pipe`` makes Chromium read protocol messages from file descriptor 3
and write its answers to descriptor 4, each a JSON object ended by a NUL byte. The page is
opened from disk in a fresh profile with networking, sync and component updates off.

    python tests/headless_chromium.py PAGE.html SHOT.png   # a screenshot, e.g. for docs
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-pipe",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, executable: str, width: int = 1280, height: int = 1000, timeout: float = 60):
        self.timeout = timeout
        self.size = (width, height)
        self.profile = tempfile.mkdtemp(prefix="flowdppo-chromium-")
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()
        # Above 2 and 4 so that the moves to 3 and 4 below cannot clobber each other.
        to_child, from_child = os.dup(to_child), os.dup(from_child)

        def fds():
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen(
            [
                executable,
                *FLAGS,
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
            ],
            preexec_fn=fds,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child)
        os.close(from_child)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    # ------------------------------------------------------------------ protocol
    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe (it exited)")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: bool = True, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            e = self._read(deadline)
            if e.get("method") == method:
                return e
            self.events.append(e)

    # ------------------------------------------------------------------ pages
    def open(self, path: Path) -> None:
        """Open a file in a new tab, with console and log events on, and wait for its load."""
        target = self.send("Target.createTarget", session=False, url="about:blank")["targetId"]
        self.session = self.send(
            "Target.attachToTarget", session=False, targetId=target, flatten=True
        )["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.resize(*self.size)
        self.send("Page.navigate", url=Path(path).resolve().as_uri())
        self.wait_for("Page.loadEventFired")

    def resize(self, width: int, height: int) -> None:
        """Lay the open page out again in a window of this size (a desktop, not a phone:
        no mobile viewport rules)."""
        self.size = (width, height)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def evaluate(self, expression: str):
        result = self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        errors = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in (
                "error",
                "assert",
            ):
                errors.append(
                    " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
                )
            elif e.get("method") == "Runtime.exceptionThrown":
                errors.append(p["exceptionDetails"].get("text", "exception"))
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append(p["entry"]["text"])
        return errors

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
            self.proc.wait(10)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._w)
            os.close(self._r)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Every <img> decoded (its natural width), every <video> with its first frame (or an error).
IMAGES_JS = """Promise.all(Array.from(document.images).map(function (i) {
  return i.decode().then(function () { return i.naturalWidth; }, function () { return 0; });
}))"""
VIDEOS_JS = """Promise.all(Array.from(document.querySelectorAll('video')).map(function (v) {
  if (v.readyState >= 2) return v.videoWidth;
  return new Promise(function (done) {
    v.addEventListener('loadeddata', function () { done(v.videoWidth); });
    v.addEventListener('error', function () { done(0); });
  });
}))"""

# What sticks out of the window to the right: the page's own width, and every visible
# element's right edge, except inside a box that scrolls sideways itself (wide tables,
# the config). An empty list: nothing overflows.
OVERFLOW_JS = """(function () {
  var w = document.documentElement.clientWidth, out = [];
  var page = document.documentElement.scrollWidth;
  if (page > w) out.push('page ' + page + ' > ' + w);
  document.querySelectorAll('body *').forEach(function (e) {
    if (e.parentElement.closest('.scroll, pre')) return;
    var r = e.getBoundingClientRect();
    if (r.width > 0 && r.right > w + 0.5) {
      out.push(e.tagName.toLowerCase() + '.' + e.className + ' ends at ' + Math.round(r.right));
    }
  });
  return out;
})()"""
# The lines each element matching a selector takes (its text's line boxes).
LINES_JS = """Array.from(document.querySelectorAll(%r)).map(function (e) {
  var range = document.createRange(); range.selectNodeContents(e);
  return new Set(Array.from(range.getClientRects()).map(function (r) {
    return Math.round(r.top); })).size;
})"""


if __name__ == "__main__":
    exe = find_chromium()
    if exe is None:
        sys.exit("no chromium on PATH (Debian: apt-get install chromium)")
    page, shot = sys.argv[1], sys.argv[2]
    width, height = (int(x) for x in (sys.argv[3] if len(sys.argv) > 3 else "1280x1000").split("x"))
    with Browser(exe, width, height) as b:
        b.open(Path(page))
        widths = b.evaluate(IMAGES_JS)
        b.screenshot(Path(shot))
        print(
            f"{len(widths)} images, undecoded {widths.count(0)}, console errors {b.console_errors()}"
        )
