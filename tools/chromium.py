"""Drive a headless Chromium from Python with the standard library only: the DevTools protocol over a pipe.

`chromium --remote-debugging-pipe` reads DevTools commands from file descriptor 3 and writes
replies and events to descriptor 4, each a JSON message ended by a NUL byte. That is all a test
needs to open a page from file://, move the mouse, click, evaluate JavaScript and take a
screenshot, with no websocket client and no browser download (playwright's `install` would fetch
its own build; this uses the system's, Debian's `chromium` package).

    with Browser() as browser:
        page = browser.open("file:///tmp/explore.html", width=1400, height=1000)
        page.evaluate("document.title")
        page.click(x, y); page.hover(x, y)
        page.screenshot("/tmp/shot.png")
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(RuntimeError):
    """Chromium is missing, died, or a DevTools command failed."""


def find_chromium() -> str | None:
    """Path of a Chromium-family browser on PATH (MINIVL_CHROMIUM overrides), or None."""
    override = os.environ.get("MINIVL_CHROMIUM")
    if override:
        return override
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium process spoken to over --remote-debugging-pipe."""

    def __init__(self, executable: str | None = None, timeout: float = 60.0):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise BrowserError("no Chromium found on PATH; install Debian's `chromium` package "
                               "(apt-get install -y chromium) or set MINIVL_CHROMIUM to the browser's path")
        self.timeout = timeout
        self._next_id = 0
        self._buffer = b""
        self._events: list[dict] = []

    def __enter__(self) -> "Browser":
        self.profile = tempfile.mkdtemp(prefix="minivl-chromium-")
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # the browser reads fd 3 and writes fd 4: move our pipe ends onto those numbers in the child,
        # through fds >= 10 first so that neither dup2 overwrites the other end
        def child_fds():
            read_end = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        # --no-sandbox: CI runs as root; --disable-dev-shm-usage: containers have a small /dev/shm
        args = [self.executable, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--allow-file-access-from-files", f"--user-data-dir={self.profile}", "about:blank"]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, preexec_fn=child_fds,
                                        pass_fds=(3, 4, to_browser_r, from_browser_w))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._write, self._read = to_browser_w, from_browser_r
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.send("Browser.close")
        except BrowserError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._write, self._read):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.process.stderr:
            self.process.stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    # ------------------------------------------------------------------ the protocol

    def send(self, method: str, params: dict | None = None, session_id: str | None = None) -> dict:
        """One DevTools command; returns its `result`, raises BrowserError on an `error` reply."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        try:
            os.write(self._write, json.dumps(message).encode() + b"\0")
        except OSError as e:
            raise BrowserError(f"chromium pipe closed while sending {method}: {e}") from None
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def _receive(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise BrowserError(f"no reply from chromium within {self.timeout} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                stderr = self.process.stderr.read().decode(errors="replace")[-2000:] if self.process.stderr else ""
                raise BrowserError(f"chromium exited (code {self.process.poll()}): {stderr}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def wait_event(self, method: str, session_id: str | None = None) -> dict:
        """Block until an event named `method` arrives (or has already arrived) for the session."""
        while True:
            for index, event in enumerate(self._events):
                if event.get("method") == method and (session_id is None or event.get("sessionId") == session_id):
                    return self._events.pop(index)
            self._events.append(self._receive())

    def open(self, url: str, width: int = 1400, height: int = 1000) -> "Page":
        """A new tab of the given viewport size showing `url`, loaded (the load event has fired)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.send("Page.enable")
        page.send("Runtime.enable")
        page.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        page.send("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired", session)
        return page


class Page:
    """One tab: evaluate JavaScript, move and click the mouse, take screenshots."""

    def __init__(self, browser: Browser, session_id: str):
        self.browser, self.session_id = browser, session_id

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.browser.send(method, params, self.session_id)

    def evaluate(self, expression: str, await_promise: bool = True):
        """The JSON value of a JavaScript expression (a Promise is awaited); a thrown error raises BrowserError."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": await_promise})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript error in {expression[:80]!r}: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"{expression!r} still falsy after {timeout} s")
            time.sleep(0.05)

    def center_of(self, selector: str) -> tuple[float, float]:
        """Viewport coordinates of the centre of the first element matching a CSS selector (scrolled into view)."""
        box = self.evaluate(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            if (!e) return null; e.scrollIntoView({{block: 'center', inline: 'center'}});
            const r = e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; }})()""")
        if box is None:
            raise BrowserError(f"no element matches {selector!r}")
        return box[0], box[1]

    def hover(self, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def click(self, x: float, y: float) -> None:
        self.hover(x, y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def screenshot(self, path: str | os.PathLike, full_page: bool = False) -> str:
        """Write a PNG of the viewport (or the whole page) to `path`; returns the path."""
        params = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
            size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}
        data = self.send("Page.captureScreenshot", params)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return os.fspath(path)
