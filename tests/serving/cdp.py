"""A minimal Chrome DevTools Protocol driver for headless Chromium (Debian package `chromium`).

Just what the browser test needs: open a page, run JavaScript in it, read
what is shown, allow downloads. No test-tool browser download, no network.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
from websockets.sync.client import connect

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-dev-shm-usage", "--remote-debugging-port=0",
)


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Session:
    """One DevTools websocket (a page or the browser)."""

    def __init__(self, ws_url: str):
        self.ws = connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=20)
        self._ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = 30.0, **params) -> dict:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            raw = self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            msg = json.loads(raw)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()


class Page(Session):
    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                last = self.eval(expression)
                if last:
                    return last
            time.sleep(0.1)
        raise TimeoutError(f"waited {timeout}s for {expression!r} (last value {last!r})")

    def goto(self, url: str) -> None:
        """Open `url` and wait until the new document (wherever a redirect led) has loaded."""
        with contextlib.suppress(RuntimeError):
            self.eval("window.__leaving = true")
        self.call("Page.navigate", url=url)
        self.wait_for("!window.__leaving && document.readyState === 'complete'")

    def loaded(self, path_prefix: str, timeout: float = 20.0) -> None:
        self.wait_for(f"location.pathname.startsWith({json.dumps(path_prefix)}) "
                      "&& document.readyState === 'complete'", timeout)

    def text(self) -> str:
        return self.eval("document.body.innerText")


class Chromium:
    """A headless Chromium process with its own profile folder, driven over DevTools."""

    def __init__(self, profile: Path):
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("chromium is not installed (Debian package `chromium`)")
        profile.mkdir(parents=True, exist_ok=True)
        self.profile = profile
        self.proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port, browser_path = port_file.read_text().splitlines()[:2]
        self.http = f"http://127.0.0.1:{port}"
        self.browser = Session(f"ws://127.0.0.1:{port}{browser_path}")

    def new_page(self) -> Page:
        target = httpx.put(f"{self.http}/json/new?about:blank", timeout=10).json()
        page = Page(target["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call("Runtime.enable")
        return page

    def allow_downloads(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.browser.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(folder))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.browser.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
