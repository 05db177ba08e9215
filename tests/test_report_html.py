"""The HTML report in a real headless Chromium: it renders with no console message, no
uncaught exception and no failed resource, every embedded image decodes, the sort script
runs, and the screenshot is not blank. Chromium is driven over the DevTools protocol with a
minimal stdlib WebSocket client; a deliberately broken page checks that the detection works."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from report_store import cached_store

pytestmark = pytest.mark.integration

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p), None)
if CHROMIUM is None:
    pytest.skip("no Chromium on PATH (Debian: apt-get install chromium; or set CHROMIUM=/path/to/chrome)", allow_module_level=True)


class WebSocket:
    """Just enough RFC 6455 for the DevTools protocol: text frames, client masking."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        assert url.startswith("ws://")
        hostport, _, path = url[len("ws://"):].partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(head.decode(errors="replace"))
        self.buffer = head.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("DevTools connection closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n) if n < 1 << 16
                                  else bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            payload = self._read(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("DevTools closed the connection")
            if opcode in (0x9, 0xA):  # ping / pong: not used by DevTools, ignore
                continue
            message += payload
            if b0 & 0x80:
                return message.decode()


class Browser:
    """Headless Chromium with a DevTools port; one page; records console problems."""

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="wsss-chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             "--window-size=1400,2000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("Chromium did not open its DevTools port within 60 s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        import urllib.request

        targets = []
        while not targets:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                targets = [t for t in json.load(r) if t.get("type") == "page"]
            if not targets:
                time.sleep(0.1)
        self.ws = WebSocket(targets[0]["webSocketDebuggerUrl"])
        self.next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_event(self, name: str, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(e.get("method") == name for e in self.events):
                return
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(name)

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")
        self.evaluate("new Promise(r => requestAnimationFrame(() => setTimeout(r, 200)))")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def problems(self) -> list[str]:
        """Console messages, uncaught exceptions, browser log errors and failed loads."""
        out = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled":
                out.append(f"console.{params['type']}: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                out.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                out.append(f"log {params['entry']['level']}: {params['entry']['text']}")
            elif method == "Network.loadingFailed":
                out.append(f"load failed: {params.get('errorText')}")
        return out

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        if getattr(self, "ws", None):
            self.ws.sock.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    from harness.report import write_report

    uri = cached_store(tmp_path_factory)
    out = tmp_path_factory.mktemp("html-report")
    write_report(uri, out, references={"demo": {"alpha": {"val_miou": 70.0}}})
    return out / "leaderboard.html"


def _pixel_std(png: bytes) -> float:
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    return float(pixels.std())


def test_detection_catches_a_broken_page(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body><p>x</p>'
                    '<img src="missing.png"><script>console.error("deliberate"); notDefined();</script></body></html>')
    browser.open(page.as_uri())
    problems = " | ".join(browser.problems())
    assert "console.error: deliberate" in problems
    assert "notDefined" in problems
    assert "missing.png" in problems or "load failed" in problems


def test_report_renders_cleanly(browser, report_html):
    browser.open(report_html.as_uri())
    assert browser.problems() == []
    assert browser.evaluate("document.title") == "wsss-bench leaderboard"
    images = browser.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
    assert len(images) == 5 + 50 and all(done and width > 0 for done, width in images)  # 4 + 1 plots, 50 gallery
    # the sort script: click a header twice, rows reorder, nothing is thrown
    first = "document.querySelector('table.main tbody tr td:nth-child(2)').textContent"
    before = browser.evaluate(first)
    browser.evaluate("document.querySelector('table.main thead th:nth-child(2)').click()")
    browser.evaluate("document.querySelector('table.main thead th:nth-child(2)').click()")
    assert browser.evaluate(first) != before or before == "gamma"
    assert browser.problems() == []
    png = browser.screenshot()
    (report_html.parent / "screenshot.png").write_bytes(png)
    assert _pixel_std(png) > 10.0  # not blank: text, tables and plots on white


def test_first_screen_shows_the_headline_numbers(browser, report_html):
    """At 1366x768 (a common laptop screen) the first screenshot shows the headline table:
    every cell of its rows (rank, method, n, the mIoU numbers, device time, published number)
    lies inside the viewport, is the topmost element at its centre (not covered, not
    scrolled off to the right) and has text drawn in the screenshot at that place."""
    import numpy as np
    from PIL import Image

    browser.call("Emulation.setDeviceMetricsOverride", width=1366, height=768, deviceScaleFactor=1, mobile=False)
    try:
        browser.open(report_html.as_uri())
        cells = browser.evaluate("""(() => {
            const table = document.querySelector('table.main');
            const out = [];
            table.querySelectorAll('tbody tr').forEach(tr => tr.querySelectorAll('td').forEach(td => {
                const r = td.getBoundingClientRect();
                const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
                out.push({text: td.textContent.trim(), left: r.left, top: r.top, right: r.right, bottom: r.bottom,
                          on_top: hit !== null && (hit === td || td.contains(hit))});
            }));
            return out;
        })()""")
        png = browser.screenshot()
    finally:
        browser.call("Emulation.clearDeviceMetricsOverride")
    texts = [c["text"] for c in cells]
    assert "62.0 ± 2.0" in texts and "alpha" in texts and "70.0 (Δ -4.0)" in texts  # alpha's val SS; published val_miou
    assert any(t.startswith("baseline: all background") for t in texts)
    image = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    assert image.shape == (768, 1366)
    for c in cells:
        assert 0 <= c["left"] and c["right"] <= 1366 and 0 <= c["top"] and c["bottom"] <= 768, c
        assert c["on_top"], c
        if c["text"]:
            patch = image[int(c["top"]) + 1:int(c["bottom"]) - 1, int(c["left"]) + 1:int(c["right"]) - 1]
            assert patch.size and patch.std() > 5.0, c  # glyphs drawn there, not an empty box
