"""Headless Chromium driven through the DevTools protocol, for the HTML report's browser tests.

A small client over websocket-client: launch Chromium with ``--remote-debugging-port=0``, read the
port it chose from ``DevToolsActivePort`` in its profile directory, attach to the page target and
exchange JSON messages. Events that arrive while waiting for a reply are kept, so that console
errors and uncaught exceptions can be checked after the page has loaded.

Tests skip when Chromium or websocket-client is missing, unless GRADCHECK_REQUIRE_BROWSER=1 (set by
.ci/run), where they fail instead: CI must not pass by skipping them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--mute-audio",
    "--hide-scrollbars",
    "--disable-dev-shm-usage",
)  # containers often have a tiny /dev/shm
# A first start on a fresh machine builds Chromium's font and profile caches: once past 30 s in CI.
START_TIMEOUT_S = 120.0
REPLY_TIMEOUT_S = 30.0


def chromium_path() -> str | None:
    override = os.environ.get("GRADCHECK_CHROMIUM")
    if override:
        return shutil.which(override)
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_browser() -> str:
    """The Chromium executable, or skip (fail under GRADCHECK_REQUIRE_BROWSER=1) with the reason."""
    reason = None
    path = chromium_path()
    if path is None:
        reason = "headless Chromium is not installed (apt-get install chromium, or set GRADCHECK_CHROMIUM)"
    else:
        try:
            import websocket  # noqa: F401
        except ImportError:
            reason = "websocket-client is not installed (pip install -e '.[test]')"
    if reason is not None:
        if os.environ.get("GRADCHECK_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser tests are required here (GRADCHECK_REQUIRE_BROWSER=1) but {reason}")
        pytest.skip(reason)
    assert path is not None
    return path


class Page:
    """One page target; ``call`` sends a command and returns its result, keeping events."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.events: list[dict[str, Any]] = []
        self._next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message_id = self._next_id
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while time.monotonic() < deadline:
            message = json.loads(self.socket.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            self.events.append(message)
        raise TimeoutError(f"no reply to {method} within {REPLY_TIMEOUT_S} s")

    def wait_for(self, event: str) -> dict[str, Any]:
        for message in self.events:
            if message.get("method") == event:
                return message
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while time.monotonic() < deadline:
            message = json.loads(self.socket.recv())
            self.events.append(message)
            if message.get("method") == event:
                return message
        raise TimeoutError(f"no {event} within {REPLY_TIMEOUT_S} s")

    def open(self, url: str) -> None:
        """Navigate and wait for the load event (scripts have run by then)."""
        self.events = [e for e in self.events if e.get("method") != "Page.loadEventFired"]
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, width: int = 1280, height: int = 1600) -> bytes:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors (failed loads, CSP, ...)."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(f"exception: {params['exceptionDetails'].get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(f"console.{params['type']}: {[a.get('value') for a in params.get('args', [])]}")
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return found

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]


@contextmanager
def chromium_page(executable: str) -> Iterator[Page]:
    import websocket

    with tempfile.TemporaryDirectory(prefix="gradcheck-chromium-") as profile:
        process = subprocess.Popen(
            [
                executable,
                *FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        socket = None
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + START_TIMEOUT_S
            while not (port_file.exists() and port_file.read_text().strip()):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Chromium did not start (exit status {process.poll()})")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
                targets = json.load(response)
            target = next(t for t in targets if t.get("type") == "page")
            socket = websocket.create_connection(
                target["webSocketDebuggerUrl"], timeout=REPLY_TIMEOUT_S, suppress_origin=True
            )
            page = Page(socket)
            for domain in ("Page", "Runtime", "Log", "Network"):
                page.call(f"{domain}.enable")
            yield page
        finally:
            if socket is not None:
                socket.close()
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def is_blank(png: bytes) -> bool:
    """True when the screenshot is one flat colour (nothing rendered): low pixel variance."""
    import io

    from PIL import Image, ImageStat

    image = Image.open(io.BytesIO(png)).convert("L")
    stat = ImageStat.Stat(image)
    return stat.var[0] < 25.0 or len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) < 8
