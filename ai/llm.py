"""Language models behind one interface: ``stream(key, messages) -> tokens``.

``key`` names a conversation. llama.cpp keeps one conversation's KV cache per
``Llama`` object, so ``LlamaChat`` keeps a small pool of them, one per live
conversation: each turn re-uses the cached prefix (system prompt and history)
and only evaluates what is new.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator


@dataclass
class GenParams:
    max_tokens: int = 80
    temperature: float = 0.3
    top_p: float = 0.9
    repeat_penalty: float = 1.3        # the 135M model loops without it
    stop: tuple[str, ...] = ("\n\n", "<|im_end|>", "User:", "user:")


class LlamaChat:
    parallel = False                   # streams are interleaved in one thread

    def __init__(self, model_path: str, n_ctx: int = 2048, threads: int = 2, conversations: int = 4):
        from llama_cpp import Llama
        self._make = lambda: Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.pool: OrderedDict[str, object] = OrderedDict()
        self.spare = [self._make() for _ in range(conversations)]

    def _llama(self, key: str):
        if key in self.pool:
            self.pool.move_to_end(key)
            return self.pool[key]
        if self.spare:
            llm = self.spare.pop()
        else:                               # more conversations than instances: reuse the oldest
            _, llm = self.pool.popitem(last=False)
            llm.reset()
        self.pool[key] = llm
        return llm

    def release(self, key: str) -> None:
        llm = self.pool.pop(key, None)
        if llm is not None:
            llm.reset()
            self.spare.append(llm)

    def stream(self, key: str, messages: list[dict], p: GenParams) -> Iterator[str]:
        llm = self._llama(key)
        for chunk in llm.create_chat_completion(
                messages, stream=True, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p,
                repeat_penalty=p.repeat_penalty, stop=list(p.stop)):
            delta = chunk["choices"][0]["delta"].get("content")
            if delta:
                yield delta


class OpenAIChat:
    """Any OpenAI-compatible /chat/completions endpoint, streamed (SSE)."""
    parallel = True                    # each stream blocks on the network: one thread each

    def __init__(self, url: str, model: str, api_key: str = "", timeout: float = 20.0):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout

    def release(self, key: str) -> None:
        pass

    def stream(self, key: str, messages: list[dict], p: GenParams) -> Iterator[str]:
        body = json.dumps({"model": self.model, "messages": messages, "stream": True,
                           "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
                           "stop": list(p.stop)[:4]}).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"LLM endpoint answered {exc.code}: {exc.read()[:200]!r}") from None
        except urllib.error.URLError as exc:
            raise RuntimeError(f"LLM endpoint unreachable: {exc.reason}") from None
        with resp:
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    delta = json.loads(data)["choices"][0].get("delta", {}).get("content")
                except (ValueError, KeyError, IndexError, TypeError):
                    raise RuntimeError(f"LLM endpoint sent a malformed event: {data[:120]!r}") from None
                if delta:
                    yield delta


def api_key_from_env(name: str) -> str:
    return os.environ.get(name, "") if name else ""


