"""The console page in headless Chromium (Debian `chromium`), against a real
agent cell with a real call: the live transcript, quality and recent calls."""
import asyncio
import base64
import json
import shutil
import subprocess
import time
import urllib.request

import aiohttp
import pytest

from support import create_key
from voice import Caller

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, tmp, port: int):
        self.port = port
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--window-size=1200,900", f"--user-data-dir={tmp}/chromium", f"--remote-debugging-port={port}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1) as r:
                    pages = [p for p in json.load(r) if p["type"] == "page"]
                if pages:
                    self.ws_url = pages[0]["webSocketDebuggerUrl"]
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("chromium did not start")

    async def __aenter__(self):
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.ws_url, max_msg_size=0)
        self.n = 0
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()
        await self.session.close()
        self.proc.kill()
        self.proc.wait(5)

    async def cdp(self, method: str, **params):
        self.n += 1
        await self.ws.send_json({"id": self.n, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == self.n:
                return msg.get("result", {})

    async def text(self, selector: str) -> str:
        r = await self.cdp("Runtime.evaluate", expression=f"(document.querySelector({selector!r}) || {{}}).innerText || ''",
                           returnByValue=True)
        return r["result"].get("value", "")

    async def wait_text(self, selector: str, needle: str, timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        text = ""
        while time.monotonic() < end:
            text = await self.text(selector)
            if needle.lower() in text.lower():
                return text
            await asyncio.sleep(0.3)
        raise AssertionError(f"{needle!r} never appeared in {selector}: {text!r}")


@pytest.mark.slow
@pytest.mark.sample
def test_console_shows_a_live_call(cell_factory, tmp_path):
    assert CHROMIUM, "chromium is not installed (make test installs it)"
    cell = cell_factory('[agent]\nmax_reply_tokens = 20\n', args=("--app", "agent"))
    key = create_key(cell.data, "read")
    url = f"http://127.0.0.1:{cell.ports['http']}/console#key={key}"

    async def scenario():
        async with Browser(tmp_path, cell.ports["sip"] + 31) as b:
            await b.cdp("Page.enable")
            await b.cdp("Page.navigate", url=url)
            await b.wait_text("#status", "live")
            loop = asyncio.get_running_loop()
            caller = await loop.run_in_executor(None, Caller, cell, tmp_path)
            try:
                await loop.run_in_executor(None, caller.silence, 1.0)
                await b.wait_text("#active", "app agent")
                fut = loop.run_in_executor(None, caller.speak, "What are your opening hours?")
                await fut
                speak = loop.run_in_executor(None, caller.silence, 6.0)
                active = await b.wait_text("#active", "caller: what are your opening")
                assert "agent: Hello! How can I help you today?" in active
                await speak
                active = await b.text("#active")
                assert "MOS 4." in active and "codec PCMU" in active
                shot = await b.cdp("Page.captureScreenshot", format="png")
                (tmp_path / "console.png").write_bytes(base64.b64decode(shot["data"]))
                await loop.run_in_executor(None, caller.goodbye)
            finally:
                caller.close()
            recent = await b.wait_text("#recent", "goodbye")
            assert "answered" in recent
            await b.wait_text("#active", "No active calls")
    asyncio.run(scenario())
