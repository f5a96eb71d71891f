"""A real headless Chromium (Debian's package) driven over the DevTools protocol: load a page, collect its console
errors and exceptions, check its pictures decoded, read its text, take a screenshot."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0", "--window-size=1280,1600"]
PAGE_FACTS = """JSON.stringify({images: [...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0]),
  text: document.body.innerText, links: [...document.links].map(a => a.href)})"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Page:
    errors: list[str]  # console errors, exceptions and failed loads
    images: list[tuple[str, bool]]  # (alt text, decoded)
    text: str
    links: list[str]  # as the browser resolves them: absolute URLs


class _DevTools:
    def __init__(self, url: str) -> None:
        import websocket

        self.socket = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.next_id, self.events = 0, []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {timeout_s} s")
            self.events.append(json.loads(self.socket.recv()))


def _errors(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            out.append(params["exceptionDetails"].get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            out.append(params["entry"].get("text", "error"))
    return out


def render_page(path: Path, screenshot: Path) -> Page:
    """Load ``path`` in headless Chromium; what went wrong on the way, what the page shows, and a screenshot."""
    # the profile outlives a slow Chromium's last write only if every one of its processes is gone first
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        process = subprocess.Popen([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True)
        try:
            port = None
            for line in process.stderr:  # "DevTools listening on ws://127.0.0.1:<port>/devtools/browser/<id>"
                if "DevTools listening on" in line:
                    port = int(line.split("ws://127.0.0.1:")[1].split("/")[0])
                    break
            assert port, "Chromium did not open its DevTools port"
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
            tools = _DevTools(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
            for domain in ("Page", "Runtime", "Log"):
                tools.call(f"{domain}.enable")
            tools.call("Page.navigate", url=path.absolute().as_uri())
            tools.wait_for("Page.loadEventFired")
            facts = json.loads(tools.call("Runtime.evaluate", expression=PAGE_FACTS, returnByValue=True)["result"]["value"])
            shot = tools.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return Page(_errors(tools.events), [tuple(i) for i in facts["images"]], facts["text"], facts["links"])
        finally:
            _kill_group(process)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL Chromium and every process it started (renderer, GPU, utility: one process group), and wait
    until none is left writing into its profile."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
