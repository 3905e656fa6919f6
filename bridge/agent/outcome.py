"""What came of a call: a short summary, a disposition and the caller's intent.

When an agent call ends, the model is asked (once, in the inference process,
off the media path) to read the transcript. A capable model (an OpenAI-style
endpoint, or a GGUF the operator chose) answers with three fields in JSON;
the bundled 135M model cannot, so it is asked only the one question it
answers reasonably ("in one sentence, what did the caller want?"), and its
sentence becomes the summary and the intent. Answers are parsed defensively
(JSON, ``key: value`` lines, a plain sentence) and checked against what is
known for certain: a caller who never spoke abandoned the call (the model is
not even asked), a transfer is a transfer, a promised call back is a
callback. When the answer is unusable the rules decide and the summary is
made from the transcript.

Published as the ``call_summary`` event and stored (sealed) with the call.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Callable

DISPOSITIONS = ("resolved", "transferred", "callback", "abandoned", "unresolved")
PROMPT = ("Read the phone call below. Answer with JSON only, like "
          '{"summary": "one short sentence", "disposition": "resolved", "intent": "a few words"}. '
          "disposition is one of: resolved, callback, unresolved. intent is what the caller wanted.")
QUESTION = "Here is a phone call:\n{transcript}\n\nIn one sentence, what did the caller want?"
MAX_TRANSCRIPT = 2400        # characters of transcript the model reads (the end of a long call)
MAX_FIELD = 300


@dataclass(frozen=True)
class Facts:
    """What the call's own records say, whatever the model thinks."""
    caller_turns: int = 0
    transferred: bool = False
    callback_promised: bool = False      # the agent said the tool fallback line ("someone will call you back")
    tools_ok: int = 0
    tools_failed: int = 0
    tools: tuple[str, ...] = ()          # tools used, in order


@dataclass(frozen=True)
class CallOutcome:
    summary: str
    disposition: str
    intent: str
    source: str                          # "model": the summary is the model's; "rules": made from the records

    def as_dict(self) -> dict:
        return asdict(self)


def tool_failed(content: str | None) -> bool:
    """Whether a tool message in the history is a failure (the runner's ``{"status":"error",...}``)."""
    try:
        data = json.loads(content or "")
    except ValueError:
        return True
    return not isinstance(data, dict) or (data.get("status") == "error" and "error" in data)


def transcript_lines(history: list[dict]) -> list[str]:
    """The conversation as plain lines (tool calls named, not their JSON)."""
    out = []
    for m in history:
        role, content = m.get("role"), m.get("content")
        if role == "user" and content:
            out.append(f"Caller: {content}")
        elif role == "assistant" and m.get("tool_calls"):
            out.append(f"(the agent used the tool {m['tool_calls'][0]['function']['name']})")
        elif role == "assistant" and content:
            out.append(f"Agent: {content}")
        elif role == "tool":
            ok = not tool_failed(content)
            out.append(f"(the tool {m.get('name', 'tool')} {'worked' if ok else 'failed'})")
    return out


def facts_of(history: list[dict], transferred: bool = False, callback_text: str = "") -> Facts:
    tools, ok, failed = [], 0, 0
    for m in history:
        if m.get("role") == "tool":
            tools.append(m.get("name", "tool"))
            if tool_failed(m.get("content")):
                failed += 1
            else:
                ok += 1
    said = " ".join(m.get("content") or "" for m in history if m.get("role") == "assistant")
    return Facts(caller_turns=sum(1 for m in history if m.get("role") == "user" and (m.get("content") or "").strip()),
                 transferred=transferred, callback_promised=bool(callback_text) and callback_text in said,
                 tools_ok=ok, tools_failed=failed, tools=tuple(tools))


def messages(history: list[dict], structured: bool = True) -> list[dict]:
    """What the model is asked: the three fields in JSON, or (a small model) one question."""
    text = "\n".join(transcript_lines(history))
    if len(text) > MAX_TRANSCRIPT:
        text = "..." + text[-MAX_TRANSCRIPT:]
    if not structured:
        return [{"role": "user", "content": QUESTION.format(transcript=text)}]
    return [{"role": "system", "content": PROMPT}, {"role": "user", "content": text}]


def wants_json(hub) -> bool:
    """Whether the configured model can be asked for JSON (not the bundled 135M one)."""
    cfg = getattr(hub, "cfg", None)
    if cfg is None:
        return True
    m = cfg.raw["models"]
    return m["llm_backend"] == "openai" or bool(m["llm"])


def _sentence(text: str) -> dict:
    """A plain answer ("The caller wanted to know ..."): the summary and the intent in it, if it is one."""
    first = re.split(r"(?<=[.!?])\s", (text or "").strip(), maxsplit=1)[0].strip()
    if not re.search(r"\bcaller\b", first, re.I) or len(first.split()) < 4 or \
            re.search(r"\b(sorry|cannot|can't|as an ai)\b", first, re.I):
        return {}
    first = re.sub(r",\s*(?:which|this is|and this)\b.*$", ".", first)      # the small model's editorials
    out = {"summary": first[:MAX_FIELD]}
    m = re.search(r"\bcaller (?:wanted|wants|was trying|tried|asked|called|would like)(?: to| for| about)? (.+?)"
                  r"(?:[.,;]|\bwhich\b|$)", first, re.I)
    if m:
        out["intent"] = m.group(1).strip()[:120]
    return out


def parse(text: str) -> dict:
    """Whatever of ``summary``/``disposition``/``intent`` can be read from ``text`` ({} if nothing)."""
    out: dict = {}
    for m in re.finditer(r"\{[^{}]*\}", text or ""):
        try:
            data = json.loads(m.group(0))
        except ValueError:
            continue
        if isinstance(data, dict):
            out = {k.lower(): v for k, v in data.items() if isinstance(k, str)}
            break
    if not out:
        for key in ("summary", "disposition", "outcome", "intent"):     # "summary": "..." without the braces
            m = re.search(rf'"{key}"\s*:\s*"([^"]*)"', text or "", re.I)
            if m:
                out[key] = m.group(1)
        for m in re.finditer(r"(?im)^\W*(summary|disposition|outcome|intent)\W*[:=]\s*(.+)$", text or ""):
            out.setdefault(m.group(1).lower(), m.group(2))
    if not out:
        out = _sentence(text)
    if "outcome" in out and "disposition" not in out:
        out["disposition"] = out["outcome"]
    res = {}
    for key in ("summary", "disposition", "intent"):
        v = out.get(key)
        if isinstance(v, str):
            v = re.sub(r"\s+", " ", v).strip().strip('",').strip()
            if v:
                res[key] = v[:MAX_FIELD]
    return res


def _disposition(word: str | None) -> str | None:
    if not word:
        return None
    w = word.lower()
    for d in DISPOSITIONS:
        if re.search(rf"\b{d}\b", w):
            return d
    if "call back" in w or "call-back" in w:
        return "callback"
    return None


def rule_disposition(f: Facts) -> str:
    if f.transferred:
        return "transferred"
    if f.caller_turns == 0:
        return "abandoned"
    if f.callback_promised:
        return "callback"
    if f.tools_ok and not f.tools_failed:
        return "resolved"
    return "unresolved"


def decide(answer: str | None, f: Facts, history: list[dict]) -> CallOutcome:
    """The outcome from the model's ``answer`` (None: not asked or failed), checked against the facts."""
    got = parse(answer or "")
    rules = rule_disposition(f)
    model = _disposition(got.get("disposition"))
    if rules in ("transferred", "abandoned") or (rules == "callback" and model != "resolved"):
        disposition = rules                        # certain from the records
    else:
        disposition = model or rules
    callers = [m["content"] for m in history if m.get("role") == "user" and m.get("content")]
    intent = got.get("intent") or (callers[0][:120] if callers else "")
    summary = got.get("summary")
    if not summary or len(summary) < 8 or not re.search(r"[A-Za-z]{3}", summary):
        summary = _rule_summary(f, callers, disposition)
    source = "model" if got.get("summary") == summary else "rules"
    return CallOutcome(summary=summary, disposition=disposition, intent=intent, source=source)


def _rule_summary(f: Facts, callers: list[str], disposition: str) -> str:
    if not callers:
        return "The caller did not say anything."
    first = callers[0].rstrip(".?! ")[:120]
    used = f" The agent used {', '.join(dict.fromkeys(f.tools))}." if f.tools else ""
    return f'The caller said: "{first}".{used} Outcome: {disposition}.'


def summarize(hub, key: str, history: list[dict], facts: Facts, done: Callable[[CallOutcome], None],
              max_tokens: int = 80) -> None:
    """Ask the model (through the inference hub, asynchronously) and call ``done`` with the outcome.
    A call where the caller never spoke is decided at once, without the model."""
    if facts.caller_turns == 0:
        done(decide(None, facts, history))
        return
    tokens: list[str] = []
    finished = []

    def finish(answer: str | None) -> None:
        if finished:
            return
        finished.append(True)
        try:
            hub.release(key)
        finally:
            done(decide(answer, facts, history))

    params = {"max_tokens": max_tokens, "temperature": 0.0, "repeat_penalty": 1.1}
    hub.llm(key, messages(history, wants_json(hub)), params,
            on_token=tokens.append, on_done=lambda *_: finish("".join(tokens)),
            on_error=lambda msg: finish(None))
