"""A page opened in a real headless Chromium (Debian's `chromium`), driven over the DevTools protocol through the pipe
Chromium offers on file descriptors 3 and 4 (--remote-debugging-pipe): no driver, no websocket library, no network.
What the page logged as an error, the results of scripts run in it, and a screenshot come back."""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class Page:
    """One tab of a fresh headless browser (a throwaway profile), at `url` once loaded."""

    def __init__(self, url: str, timeout: float = 300.0, width: int = 1280, height: int = 2000):
        self.timeout, self.errors, self._id, self._events = timeout, [], 0, []
        self._profile = tempfile.TemporaryDirectory()
        to_browser, self._to_browser = os.pipe()
        self._from_browser, from_browser = os.pipe()

        def wire():  # in the child: the protocol's pipe ends on descriptors 3 (commands) and 4 (replies)
            # Moved out of the way first: either end may itself be 3 or 4. dup2 makes both inheritable.
            ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
            os.dup2(ends[0], 3)
            os.dup2(ends[1], 4)

        self.process = subprocess.Popen(
            [find_browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe",
             "--no-first-run", "--no-default-browser-check", "--allow-file-access-from-files",
             "--autoplay-policy=no-user-gesture-required", f"--window-size={width},{height}",
             f"--user-data-dir={self._profile.name}", "about:blank"],
            preexec_fn=wire, close_fds=False,  # closing would happen after `wire`, and take 3 and 4 with it
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        try:
            target = next(t["targetId"] for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable", session=True)
            self.call("Page.navigate", url=url, session=True)
            self.wait_for("Page.loadEventFired")
        except BaseException:
            self.close()
            raise

    # --- the protocol: JSON messages ended by a NUL byte, replies matched by id, events kept
    def _send(self, method: str, params: dict, session: bool) -> int:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        return self._id

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("the browser did not answer")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("the browser closed its pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message = json.loads(raw)
        self._note(message)
        return message

    def _note(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"{params['entry'].get('text')} ({params['entry'].get('url', '')})")
        if method:
            self._events.append(message)

    def call(self, method: str, session: bool = False, **params) -> dict:
        wanted, deadline = self._send(method, params, session), time.monotonic() + self.timeout
        while True:
            message = self._receive(deadline)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def wait_for(self, event: str) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, message in enumerate(self._events):
                if message["method"] == event:
                    return self._events.pop(i)
            self._receive(deadline)

    # --- what a test asks of the page
    def evaluate(self, expression: str):
        """The value of a script run in the page (a promise is awaited)."""
        result = self.call("Runtime.evaluate", session=True, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"the script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", session=True, format="png")["data"])

    def close(self) -> None:
        try:
            os.close(self._to_browser)
        except OSError:
            pass
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.close(self._from_browser)
        self._profile.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_file(path: Path, **kw) -> Page:
    return Page(Path(path).resolve().as_uri(), **kw)


MISSING = ("no headless browser: install Debian's chromium (apt-get install chromium) to run the tests of pages in a "
           "real browser; .ci/run installs it when it runs as root")

# Each plot on the page: [its name, the traces it was given that hold points, the traces drawn in its SVG].
TRACES = """[...document.querySelectorAll('.js-plotly-plot')].map(d => [d.dataset.key || d.id,
  d.data.filter(t => (t.x || t.y || []).length > 0).length,
  d.querySelectorAll('.scatterlayer .trace, .barlayer .trace, .plot .trace, .parcoords .trace').length])"""

# Every <audio> of the page, once each has loaded its metadata or failed (or `seconds` passed): [src, readyState,
# error code or null].
AUDIO = """new Promise(resolve => {
  const players = [...document.querySelectorAll('audio')];
  const settled = a => a.readyState >= 1 || a.error !== null;
  const report = () => resolve(players.map(a => [a.getAttribute('src'), a.readyState, a.error && a.error.code]));
  const started = Date.now();
  (function poll() {
    if (players.every(settled) || Date.now() - started > SECONDS * 1000) report(); else setTimeout(poll, 100);
  })();
})"""


def audio_states(page: Page, seconds: float = 240) -> list:
    return page.evaluate(AUDIO.replace("SECONDS", str(seconds)))


def is_blank(png: bytes) -> bool:
    """A screenshot of one colour, or nearly (a page that drew nothing)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("L")
    low, high = image.getextrema()
    return high - low < 32 or len(image.getcolors(1 << 16) or range(1 << 16)) < 8
