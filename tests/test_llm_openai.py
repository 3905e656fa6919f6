"""The OpenAI-compatible LLM backend against a real HTTP server on loopback
(a scripted stand-in for the user's model server: SSE chat completions)."""
import json
import socket

import pytest
from aiohttp import web

from ai.llm import GenParams, OpenAIChat
from support import serve_on_loopback


class FakeOpenAI:
    def __init__(self, mode: str):
        self.mode = mode
        self.requests = []
        self.port, self.loop = serve_on_loopback(self._app)

    def _app(self):
        async def chat(request):
            body = await request.json()
            self.requests.append((dict(request.headers), body))
            if self.mode == "500":
                return web.json_response({"error": "overloaded"}, status=500)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            if self.mode == "garbage":
                await resp.write(b"data: {not json\n\n")
                return resp
            for piece in ["We are ", "open ", "nine to five."]:
                chunk = {"choices": [{"delta": {"content": piece}}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app


def test_streams_tokens_and_sends_the_conversation(monkeypatch):
    srv = FakeOpenAI("ok")
    llm = OpenAIChat(f"http://127.0.0.1:{srv.port}/v1", "big-model", api_key="sk-test")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hours?"}]
    out = list(llm.stream("call-1", msgs, GenParams(max_tokens=20)))
    assert "".join(out) == "We are open nine to five."
    headers, body = srv.requests[0]
    assert headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "big-model" and body["stream"] is True and body["messages"] == msgs
    assert body["max_tokens"] == 20


@pytest.mark.parametrize("mode, message", [("500", "answered HTTP 500"), ("garbage", "malformed event")])
def test_errors_are_clear(mode, message):
    srv = FakeOpenAI(mode)
    llm = OpenAIChat(f"http://127.0.0.1:{srv.port}/v1", "m")
    with pytest.raises(RuntimeError, match=message):
        list(llm.stream("c", [{"role": "user", "content": "hi"}], GenParams()))


def test_unreachable_endpoint():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(RuntimeError, match="unreachable"):
        list(OpenAIChat(f"http://127.0.0.1:{port}/v1", "m", timeout=2).stream("c", [], GenParams()))


def test_environment_proxies_are_not_used(tmp_path):
    """HTTP(S)_PROXY in the environment would see the bearer key and the whole conversation:
    the backend talks to the configured endpoint directly."""
    import subprocess
    import sys
    import threading
    from support import ROOT
    srv = FakeOpenAI("ok")
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(8)
    proxy.settimeout(0.2)
    hits = []

    def accept():
        while True:
            try:
                conn, _ = proxy.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            hits.append(conn.recv(4096))
            conn.close()
    threading.Thread(target=accept, daemon=True).start()
    code = ("from ai.llm import GenParams, OpenAIChat\n"
            f"llm = OpenAIChat('http://127.0.0.1:{srv.port}/v1', 'm', api_key='sk-secret', timeout=5)\n"
            "print(''.join(llm.stream('c', [{'role': 'user', 'content': 'hi'}], GenParams())))\n")
    env = {"PATH": "/usr/bin:/bin", "HTTP_PROXY": f"http://127.0.0.1:{proxy.getsockname()[1]}",
           "http_proxy": f"http://127.0.0.1:{proxy.getsockname()[1]}", "NO_PROXY": "", "no_proxy": ""}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    proxy.close()
    assert not hits, f"the proxy saw: {hits[0][:200]!r}"
    assert r.returncode == 0 and "nine to five" in r.stdout, r.stderr[-2000:]
