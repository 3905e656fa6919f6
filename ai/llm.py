"""Language models behind one interface: ``stream(key, messages) -> tokens``.

With ``params.tools`` set, ``stream`` may instead yield one dict,
``{"tool": name, "arguments": {...}, "id": ...}``: the model chose a tool.
Messages use the OpenAI shape throughout (assistant ``tool_calls``, role
``tool`` results); the llama.cpp adapter renders them as plain turns for the
model's chat template and picks tools with a grammar built from the tools'
JSON Schemas, so what comes out always parses and names a real tool.

``key`` names a conversation. llama.cpp keeps one conversation's KV cache per
``Llama`` object, so ``LlamaChat`` keeps a small pool of them, one per live
conversation: each turn re-uses the cached prefix (system prompt and history)
and only evaluates what is new.

The history the agent sends is bounded in turns (``[agent] history_turns``),
not in tokens: long utterances, a long system prompt or tool results could
still outgrow ``llm_context``, and llama.cpp refuses such a prompt outright.
``fit_context`` drops the oldest history (never the system prompt or the
newest message) until the prompt and the reply fit the window. The
OpenAI-compatible backend has no tokenizer for the remote model: with
``[models] llm_url_context`` set it applies the same rules to an estimate
(``estimate_tokens``: by character class, erring long for English).
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Union


@dataclass
class GenParams:
    max_tokens: int = 80
    temperature: float = 0.3
    top_p: float = 0.9
    repeat_penalty: float = 1.3        # the 135M model loops without it
    stop: tuple[str, ...] = ("\n\n", "<|im_end|>", "User:", "user:")
    tools: list = field(default_factory=list)    # [{"name", "description", "parameters"}]


Chunk = Union[str, dict]

# Worded so a small model commits to a tool when offered one: with a shortlist, "none" is
# mostly decided before the model is asked (tests/bench/tools.py measures both ways).
DECIDE = "Call the right tool for the caller's last message, with its arguments, in JSON."


def describe_tools(tools: list) -> str:
    """The tool list as the model reads it in its system prompt."""
    lines = ["You can use these tools:"]
    for t in tools:
        props = t["parameters"].get("properties", {})
        args = ", ".join(f"{k} ({v.get('type', 'string')}"
                         + (f", one of {'/'.join(map(str, v['enum']))}" if "enum" in v else "")
                         + (f", {v['description']}" if v.get("description") else "") + ")"
                         for k, v in props.items()) or "none"
        lines.append(f"- {t['name']}: {t['description']} Arguments: {args}.")
    return "\n".join(lines)


def choice_schema(tools: list) -> dict:
    """JSON Schema of a decision: one tool with its arguments, or none."""
    alts = [{"type": "object", "properties": {"tool": {"const": "none"}}, "required": ["tool"]}]
    for t in tools:
        params = {k: v for k, v in t["parameters"].items() if k != "description"}
        props = {k: {kk: vv for kk, vv in v.items() if kk in ("type", "enum", "minimum", "maximum")}
                 for k, v in params.get("properties", {}).items()}
        alts.append({"type": "object", "required": ["tool", "arguments"],
                     "properties": {"tool": {"const": t["name"]},
                                    "arguments": {"type": "object", "properties": props,
                                                  "required": list(params.get("properties", {}))}}})
    return {"anyOf": alts}


# Tokens a chat template adds around one message (role markers, separators; ChatML uses 5)
# and around the whole prompt (BOS, the generation prompt): generous, so the estimate errs long.
MESSAGE_OVERHEAD = 8
PROMPT_OVERHEAD = 16


def _content(message: dict) -> str:
    return message.get("content") or ""


def fit_context(messages: list[dict], budget: int, count: Callable[[str], int],
                text: Callable[[dict], str] = _content) -> list[dict]:
    """``messages`` with the oldest history dropped until their estimated tokens fit ``budget``.

    ``count(text)`` is the model's token count of a text; ``text(message)`` is what of a message
    the model reads (its content by default). The leading system message and everything from
    the caller's last message on are always kept (if even they do not fit, the model's own check
    reports it); the kept history never starts with a tool result whose call was dropped."""
    cost = [count(text(m)) + MESSAGE_OVERHEAD for m in messages]
    total = sum(cost) + PROMPT_OVERHEAD
    if total <= budget:
        return messages
    head = 1 if messages and messages[0].get("role") == "system" else 0
    keep = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages) - 1)
    start = head
    while total > budget and start < keep:
        total -= cost[start]
        start += 1
        while start < keep and messages[start].get("role") == "tool":
            total -= cost[start]
            start += 1
    return messages[:head] + messages[start:]


def plain_messages(messages: list[dict], tools: list) -> list[dict]:
    """OpenAI-shaped history as plain chat turns (tool calls and results as text)."""
    out = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            fn = m["tool_calls"][0]["function"]
            out.append({"role": "assistant", "content": f"(using tool {fn['name']} {fn['arguments']})"})
        elif role == "tool":
            out.append({"role": "tool", "content": f"{m.get('name', 'tool')} result: {m.get('content', '')}"})
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    if tools and out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + describe_tools(tools)}
    return out


class LlamaChat:
    parallel = False                   # streams are interleaved in one thread

    def __init__(self, model_path: str, n_ctx: int = 2048, threads: int = 2, conversations: int = 4):
        from llama_cpp import Llama
        self._make = lambda: Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.n_ctx = n_ctx
        self.pool: OrderedDict[str, object] = OrderedDict()
        self.spare = [self._make() for _ in range(conversations)]
        self._grammars: dict[str, object] = {}
        self.trimmed = 0                    # prompts that had to drop history to fit n_ctx
        self._counts: dict[str, int] = {}   # tokens of a message text (one vocabulary for the pool)

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

    def _fit(self, llm, messages: list[dict], max_tokens: int) -> list[dict]:
        """``messages`` trimmed so that the prompt and ``max_tokens`` of reply fit the context."""
        def count(text: str) -> int:
            n = self._counts.get(text)
            if n is None:
                if len(self._counts) >= 4096:
                    self._counts.clear()
                n = self._counts[text] = len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
            return n
        budget = self.n_ctx - min(max_tokens, self.n_ctx // 2)
        fitted = fit_context(messages, budget, count)
        if len(fitted) < len(messages):
            self.trimmed += 1
        return fitted

    def _grammar(self, tools: list):
        from llama_cpp import LlamaGrammar
        schema = json.dumps(choice_schema(tools), sort_keys=True)
        g = self._grammars.get(schema)
        if g is None:
            g = self._grammars[schema] = LlamaGrammar.from_json_schema(schema, verbose=False)
        return g

    def choose(self, key: str, messages: list[dict], p: GenParams) -> dict | None:
        """One grammar-constrained pass: which tool (and arguments), or None."""
        llm = self._llama(key)
        msgs = self._fit(llm, plain_messages(messages, p.tools) + [{"role": "system", "content": DECIDE}], 160)
        out = llm.create_chat_completion(msgs, max_tokens=160, temperature=0.0, repeat_penalty=1.0,
                                         grammar=self._grammar(p.tools))
        text = out["choices"][0]["message"].get("content") or ""
        try:
            choice = json.loads(text)
        except ValueError:
            return None                    # cut off by max_tokens: treat as no tool
        if not isinstance(choice, dict) or choice.get("tool") in (None, "none"):
            return None
        return {"tool": choice["tool"], "arguments": choice.get("arguments") or {}}

    def stream(self, key: str, messages: list[dict], p: GenParams) -> Iterator[Chunk]:
        if p.tools:
            choice = self.choose(key, messages, p)
            if choice is not None:
                yield choice
                return
        llm = self._llama(key)
        msgs = self._fit(llm, plain_messages(messages, p.tools), p.max_tokens)
        for chunk in llm.create_chat_completion(
                msgs, stream=True, max_tokens=p.max_tokens,
                temperature=p.temperature, top_p=p.top_p, repeat_penalty=p.repeat_penalty, stop=list(p.stop)):
            delta = chunk["choices"][0]["delta"].get("content")
            if delta:
                yield delta


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: it could send the request (and its API key) anywhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


# No environment proxies (HTTP(S)_PROXY would see the bearer key and the conversation) and no redirects.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


# No tokenizer for a remote model: its prompt is estimated by character class. A run of ASCII
# letters costs a token per 3 letters (BPE vocabularies average ~4 characters of English a token),
# a space rides with the word after it (else it is one), and each digit, punctuation mark, accented letter counts a token
# (some vocabularies split digits one by one; JSON tool calls are mostly punctuation). Any other
# character (Cyrillic, CJK, emoji: 2-4 bytes of UTF-8, often split) counts two. Against two small
# English vocabularies (SmolLM2, GPT-2) this errs long for English (+19-31 %), digits, JSON, Japanese,
# Cyrillic and emoji, and short by 5-17 % for German/French/Spanish (and Chinese against GPT-2),
# which multilingual vocabularies encode far more densely: ``llm_url_context`` should leave a margin.


def estimate_tokens(text: str) -> int:
    """A conservative token count of ``text`` for a model whose tokenizer is not at hand."""
    letters = tokens = 0
    for i, ch in enumerate(text):
        if ch.isascii():
            if ch.isalpha():
                letters += 1
            elif not ch.isspace() or not text[i + 1:i + 2].isalpha():
                tokens += 1                            # a space only rides with a word
        else:
            tokens += 1 if ord(ch) < 0x250 else 2     # Latin-1 and Latin Extended: one
    return tokens + -(-letters // 3)


def _wire_text(message: dict) -> str:
    """What of an OpenAI-shaped message reaches the model: content, tool calls, tool name."""
    parts = [message.get("content") or ""]
    if message.get("tool_calls"):
        parts.append(json.dumps(message["tool_calls"]))
    if message.get("name"):
        parts.append(str(message["name"]))
    return " ".join(parts)


class OpenAIChat:
    """Any OpenAI-compatible /chat/completions endpoint, streamed (SSE).

    The URL is checked against the SSRF guard when the config is loaded
    (``bridge.core.config``: ``http.outbound_allow``); redirects are never followed.
    With ``context`` (the remote model's window in tokens, ``[models] llm_url_context``) the
    conversation is fitted like llama.cpp's (``fit_context`` on ``estimate_tokens``): the oldest
    history goes first, the system prompt and the caller's last message always stay. ``0``
    sends the whole conversation."""
    parallel = True                    # each stream blocks on the network: one thread each

    def __init__(self, url: str, model: str, api_key: str = "", timeout: float = 20.0, context: int = 0):
        self.url = url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.context = context
        self.trimmed = 0                    # requests that had to drop history to fit ``context``

    def release(self, key: str) -> None:
        pass

    def fit(self, messages: list[dict], p: GenParams) -> list[dict]:
        """``messages`` trimmed so the estimated prompt, the tools and ``p.max_tokens`` fit ``context``."""
        if not self.context:
            return messages
        tools = estimate_tokens(json.dumps(p.tools)) if p.tools else 0
        budget = self.context - min(p.max_tokens, self.context // 2) - tools
        fitted = fit_context(messages, budget, estimate_tokens, _wire_text)
        if len(fitted) < len(messages):
            self.trimmed += 1
        return fitted

    def stream(self, key: str, messages: list[dict], p: GenParams) -> Iterator[Chunk]:
        messages = self.fit(messages, p)
        payload = {"model": self.model, "messages": messages, "stream": True,
                   "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p,
                   "stop": list(p.stop)[:4]}
        if p.tools:                    # native tool calling
            payload["tools"] = [{"type": "function", "function": t} for t in p.tools]
            payload["tool_choice"] = "auto"
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            resp = _OPENER.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                raise RuntimeError(f"LLM endpoint answered {exc.code}: redirects are not followed") from None
            raise RuntimeError(f"LLM endpoint answered HTTP {exc.code}") from None   # never its body
        except urllib.error.URLError as exc:
            raise RuntimeError(f"LLM endpoint unreachable: {exc.reason}") from None
        calls: dict[int, dict] = {}
        with resp:
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    delta = json.loads(data)["choices"][0].get("delta", {})
                    content = delta.get("content")
                    for tc in delta.get("tool_calls") or ():
                        acc = calls.setdefault(tc.get("index", 0), {"id": "", "name": "", "arguments": ""})
                        acc["id"] = tc.get("id") or acc["id"]
                        fn = tc.get("function") or {}
                        acc["name"] += fn.get("name") or ""
                        acc["arguments"] += fn.get("arguments") or ""
                except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                    raise RuntimeError(f"LLM endpoint sent a malformed event: {data[:120]!r}") from None
                if content:
                    yield content
        if calls:                      # the first tool call (one at a time on a phone call)
            c = calls[min(calls)]
            try:
                args = json.loads(c["arguments"]) if c["arguments"].strip() else {}
            except ValueError:
                args = c["arguments"]     # not JSON: the runner tells the model so
            yield {"tool": c["name"], "arguments": args, "id": c["id"] or None}


def api_key_from_env(name: str) -> str:
    return os.environ.get(name, "") if name else ""


