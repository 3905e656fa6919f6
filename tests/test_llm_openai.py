"""The OpenAI-compatible LLM backend against a real HTTP server on loopback
(a scripted stand-in for the user's model server: SSE chat completions)."""
import atexit
import functools
import json
import socket

import pytest
from aiohttp import web

from ai.llm import GenParams, OpenAIChat, estimate_tokens
from support import serve_on_loopback


@functools.lru_cache(maxsize=1)
def _vocab():
    """A real tokenizer (the bundled SmolLM2's vocabulary only) for the stand-in server."""
    from llama_cpp import Llama
    from ai import models
    vocab = Llama(model_path=str(models.smollm2_gguf()), vocab_only=True, verbose=False)
    atexit.register(vocab.close)        # before the interpreter tears llama_cpp down
    return vocab


def prompt_tokens(body: dict) -> int:
    """The request's prompt as a server with this tokenizer counts it: every message rendered in
    ChatML (tool calls as their JSON), the tool catalogue, the generation prompt."""
    text = "".join(f"<|im_start|>{m['role']}\n{m.get('content') or ''}"
                   f"{json.dumps(m['tool_calls']) if m.get('tool_calls') else ''}<|im_end|>\n"
                   for m in body["messages"])
    text += json.dumps(body.get("tools") or "") + "<|im_start|>assistant\n"
    return len(_vocab().tokenize(text.encode("utf-8"), add_bos=False, special=True))


class FakeOpenAI:
    def __init__(self, mode: str, window: int = 0):
        self.mode = mode
        self.window = window            # > 0: a prompt + max_tokens above it gets the 400 of a model
        self.requests = []              # server whose context it overflows (vLLM, llama-server do)
        self.port, self.loop = serve_on_loopback(self._app)

    def _app(self):
        async def chat(request):
            body = await request.json()
            self.requests.append((dict(request.headers), body))
            if self.mode == "500":
                return web.json_response({"error": "overloaded"}, status=500)
            if self.window and prompt_tokens(body) + body.get("max_tokens", 0) > self.window:
                return web.json_response({"error": {"message": "This model's maximum context length is exceeded",
                                                    "type": "invalid_request_error",
                                                    "code": "context_length_exceeded"}}, status=400)
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


# A remote model with a 2,048-token window, enforced by the stand-in server with a real tokenizer.
WINDOW = 2048


def _long_call(turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": "You are the front desk of Example Dental. Be brief and kind."}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"Caller turn {i}: I would like to ask about the opening "
                                                 f"hours on the {i}th of next month, and about parking."})
        if i == 3:                  # a tool round trip in the old history: dropped together
            msgs.append({"role": "assistant", "content": None, "tool_calls": [{
                "id": "t1", "type": "function", "function": {"name": "hours", "arguments": '{"day": "monday"}'}}]})
            msgs.append({"role": "tool", "tool_call_id": "t1", "name": "hours", "content": "9 to 5"})
        msgs.append({"role": "assistant", "content": f"Reply {i}: we are open nine to five, and parking is free."})
    msgs.append({"role": "user", "content": "And one last thing: do you take new patients?"})
    return msgs


def test_a_long_call_is_fitted_to_the_remote_context():
    """Issue 14 for the OpenAI-compatible backend: after a long call the whole history outgrows
    the remote model's window and the server answers 400 (the agent would go silent). With
    ``context`` the oldest turns are dropped; the system prompt and the newest turn stay."""
    srv = FakeOpenAI("ok", window=WINDOW)
    msgs = _long_call(100)
    assert prompt_tokens({"messages": msgs}) > 2 * WINDOW        # far beyond the window
    llm = OpenAIChat(f"http://127.0.0.1:{srv.port}/v1", "m", context=WINDOW)
    out = "".join(llm.stream("c", msgs, GenParams(max_tokens=80)))
    assert out == "We are open nine to five."
    sent = srv.requests[-1][1]["messages"]
    assert sent[0] == msgs[0] and sent[-1] == msgs[-1]            # the system prompt and the newest turn
    assert sent[1:] == msgs[len(msgs) - len(sent) + 1:]           # then the newest history, in order
    assert 3 < len(sent) < len(msgs) and llm.trimmed == 1
    assert sent[1]["role"] != "tool"                             # never a result without its call
    assert prompt_tokens(srv.requests[-1][1]) + 80 <= WINDOW
    assert prompt_tokens({"messages": sent}) > WINDOW // 2        # trimmed, not emptied


def test_without_a_context_the_whole_history_is_sent_and_refused():
    """``context = 0`` (the default, today's behaviour) sends everything: the server's 400."""
    srv = FakeOpenAI("ok", window=WINDOW)
    llm = OpenAIChat(f"http://127.0.0.1:{srv.port}/v1", "m")
    with pytest.raises(RuntimeError, match="answered HTTP 400"):
        list(llm.stream("c", _long_call(100), GenParams(max_tokens=80)))
    assert srv.requests[-1][1]["messages"] == _long_call(100)


def test_a_short_call_and_its_tools_are_sent_whole():
    srv = FakeOpenAI("ok", window=WINDOW)
    msgs = _long_call(2)
    tool = {"name": "hours", "description": "Opening hours", "parameters": {"type": "object", "properties": {}}}
    llm = OpenAIChat(f"http://127.0.0.1:{srv.port}/v1", "m", context=WINDOW)
    assert "".join(llm.stream("c", msgs, GenParams(tools=[tool]))) == "We are open nine to five."
    assert srv.requests[-1][1]["messages"] == msgs and llm.trimmed == 0


def test_the_tool_catalogue_counts_against_the_window():
    """Tools travel with every request: a large catalogue leaves less room for the history."""
    msgs = _long_call(12)
    big = [{"name": f"tool_{i}", "description": "x" * 300, "parameters": {"type": "object", "properties": {}}}
           for i in range(8)]
    llm = OpenAIChat("http://127.0.0.1:9/v1", "m", context=WINDOW)
    without, with_tools = llm.fit(msgs, GenParams()), llm.fit(msgs, GenParams(tools=big))
    assert len(with_tools) < len(without) and with_tools[-1] == msgs[-1] and with_tools[0] == msgs[0]


def test_the_context_key_is_validated():
    from bridge.core.config import ConfigError, DEFAULTS, load
    assert DEFAULTS["models"]["llm_url_context"] == 0
    assert load(None, environ={"TRUNKLINE_MODELS_LLM_URL_CONTEXT": "8192"}).raw["models"]["llm_url_context"] == 8192
    for bad in ("100", "-1", "lots"):
        with pytest.raises(ConfigError, match="llm_url_context"):
            load(None, environ={"TRUNKLINE_MODELS_LLM_URL_CONTEXT": bad})


def test_the_estimate_errs_long_for_english_digits_and_tool_calls():
    """No tokenizer for a remote model: the estimate must not undercount what a call carries most
    (English speech, numbers, tool-call JSON) - checked against a real (small, English) vocabulary."""
    texts = [m.get("content") or json.dumps(m.get("tool_calls")) for m in _long_call(6)]
    texts += ["My card number is 4111 1111 1111 1111, expiry 09/27, phone +44 20 7946 0958.",
              "予約を変更したいのですが、来週の火曜日は空いていますか。"]
    for text in texts:
        real = len(_vocab().tokenize(text.encode("utf-8"), add_bos=False, special=True))
        assert real <= estimate_tokens(text) <= 2 * real + 4, text


def test_the_configured_window_reaches_the_backend():
    """``[models] llm_url_context`` travels from the config through the inference process's
    settings to the backend it builds."""
    from ai.worker import load_engines
    from bridge.agent.hub import worker_config
    from bridge.core.config import load
    env = {"TRUNKLINE_MODELS_LLM_BACKEND": "openai", "TRUNKLINE_MODELS_LLM_URL": "http://127.0.0.1:9/v1",
           "TRUNKLINE_MODELS_LLM_MODEL": "m", "TRUNKLINE_MODELS_LLM_URL_CONTEXT": "4096",
           "TRUNKLINE_HTTP_OUTBOUND_ALLOW": "127.0.0.1/32"}
    _, llm, _ = load_engines({**worker_config(load(None, environ=env)), "engines": ()})
    assert isinstance(llm, OpenAIChat) and llm.context == 4096
