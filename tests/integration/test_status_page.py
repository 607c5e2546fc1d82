"""The status page at / in a real headless Chromium (driven over the DevTools protocol) against a
running two-node cluster: a file written on one node shows up live in the page's event list.

The screenshot is kept as a test artifact (TEST_ARTIFACTS_DIR, default the test's tmp dir);
UPDATE_DOCS_SCREENSHOT=1 also refreshes docs/status-page.png for the README."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
from conftest import converged, need_tool, write

ROOT = Path(__file__).resolve().parents[2]


def _chromium() -> str:
    """Debian's chromium (.ci/run installs it; as root with apt-get the test installs it itself).
    Missing, the test fails and names it: never a skip."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run("apt-get install -y -qq chromium >/dev/null 2>&1 || "
                       "(apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1",
                       shell=True, timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return need_tool("chromium")


class CDP:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        i = next(self.ids)
        await self.ws.send_json({"id": i, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), 30)
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expr: str) -> Any:
        res = await self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return res.get("result", {}).get("value")

    async def until(self, expr: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := await self.js(expr):
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"page never satisfied {expr!r}; events: {await self.js(EVENTS)!r}")


EVENTS = "document.getElementById('events').innerText"


async def test_status_page_shows_live_events(cluster, volume, tmp_path):
    binary = _chromium()
    a, b = cluster("n1"), cluster("n2")
    a.ok("VolumeDriver.Create", {"Name": volume, "Opts": {"conflict_resolution": "timestamp", "versioning": "trash"}})
    b.mount(volume)
    write(a.vol(volume) / "reports/q1.csv", "a,b\n1,2\n")
    write(a.vol(volume) / "images/logo.bin", os.urandom(200_000))
    converged([a, b], volume, expect=lambda t: "images/logo.bin" in t)

    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(  # noqa: ASYNC220 - a browser to drive, started once
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1360,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, "chromium exited"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json(content_type=None)
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 << 20) as ws:
                cdp = CDP(ws)
                await cdp.call("Page.enable")
                await cdp.call("Page.navigate", url=f"http://127.0.0.1:{a.port}/")
                await cdp.until("window.syncmesh && window.syncmesh.connected && window.syncmesh.refreshed > 0")
                await cdp.until("document.getElementById('nodes').innerText.includes('n2')")
                # written on n2, applied on n1: the page (served by n1) shows it without a reload
                write(b.vol(volume) / "from-n2/hello-page.txt", "written on n2")
                text = await cdp.until(f"{EVENTS}.includes('hello-page.txt') && {EVENTS}")
                assert "applied" in text and volume in text
                await cdp.until("document.getElementById('conv').innerText.includes('converged')")
                await cdp.until("!document.getElementById('conv').innerText.includes('behind')", 10)
                assert "in sync" in await cdp.js("document.getElementById('sync').innerText")
                # n2 replaces a file n1 wrote: n1 keeps the old version, and its page lists it
                write(b.vol(volume) / "reports/q1.csv", "a,b\n3,4\n")
                kept = await cdp.until("document.getElementById('versions').innerText.includes('q1.csv') && "
                                       "document.getElementById('versions').innerText")
                assert "replaced" in kept and "n2" in kept
                shot = await cdp.call("Page.captureScreenshot", format="png")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    png = base64.b64decode(shot["data"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    artifacts = Path(os.environ.get("TEST_ARTIFACTS_DIR", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "status-page.png").write_bytes(png)
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs" / "status-page.png").write_bytes(png)
    print(f"status page screenshot: {artifacts / 'status-page.png'} ({json.dumps(len(png))} bytes)")
