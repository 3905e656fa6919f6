"""Where an id argument came from: a tool's result or the caller, never the model's imagination.

A small model asked to pay "the invoice" will happily invent ``23456789``. So
arguments that name things (an invoice, an order, a customer) must be vouched
for before any request is sent: their value has to appear in a tool result
this call has seen, or in what the caller said or keyed (DTMF) on this call.
Otherwise the call is refused and the refusal goes back to the model as the
tool's result ("look it up first or ask the caller"), so it can recover.

Which arguments are ids, per property of a tool's ``parameters``:

- ``"x-source" = "tool"`` (only from a tool result), ``"caller"`` (only from
  the caller), ``"tool|caller"`` (either), ``"model"`` (not checked);
- otherwise, a name ending in ``id``/``Id``/``_id``/``ID`` (``invoiceId``,
  ``order_id``) means ``"tool|caller"``;
- arguments bound from the call (``bind``) are never checked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from bridge.core.toolspec import ID_SOURCES

SOURCES = ID_SOURCES        # checked when the tools are loaded (bridge.core.toolspec)
_ID_NAME = re.compile(r"(?:^|_)ids?$|[a-z0-9]Ids?$|IDs?$|^ID$")
_DIGIT_WORDS = {"zero": "0", "oh": "0", "o": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9"}
MAX_SEEN = 2000             # values remembered from tool results per call


def _norm(v: Any) -> str:
    return re.sub(r"[^0-9a-z]", "", str(v).lower())


def _digits(text: str) -> str:
    """The digits of ``text``, spoken digit words included ("four one two" -> "412")."""
    out = []
    for w in re.findall(r"[a-z]+|\d+", text.lower()):
        if w.isdigit():
            out.append(w)
        elif w in _DIGIT_WORDS:
            out.append(_DIGIT_WORDS[w])
    return "".join(out)


def id_arguments(parameters: dict, bound: dict | None = None) -> dict[str, str]:
    """``{argument: allowed source}`` for the arguments that must be vouched for."""
    out = {}
    for name, sub in parameters.get("properties", {}).items():
        if bound and name in bound:
            continue
        src = sub.get("x-source") if isinstance(sub, dict) else None
        if src is None and _ID_NAME.search(name):
            src = "tool|caller"
        if src and src != "model":
            out[name] = src
    return out


@dataclass
class Evidence:
    """What one call has shown: tool results' values, the caller's words and keys."""
    seen: set[str] = field(default_factory=set)        # normalised scalar values from tool results
    said: list[str] = field(default_factory=list)      # normalised caller utterances
    spoken_digits: str = ""                             # every digit the caller said, in order
    keyed: str = ""                                     # DTMF digits

    def caller(self, text: str) -> None:
        if text:
            self.said.append(_norm(text))
            self.spoken_digits += _digits(text) + " "

    def dtmf(self, digits: str) -> None:
        self.keyed += "".join(d for d in digits if d.isdigit())

    def tool_result(self, result: Any) -> None:
        def walk(v: Any) -> None:
            if len(self.seen) >= MAX_SEEN:
                return
            if isinstance(v, dict):
                for x in v.values():
                    walk(x)
            elif isinstance(v, list):
                for x in v:
                    walk(x)
            elif v is not None and not isinstance(v, bool):
                n = _norm(v)
                if n:
                    self.seen.add(n)
        walk(result)

    def from_tool(self, value: Any) -> bool:
        return _norm(value) in self.seen

    def from_caller(self, value: Any) -> bool:
        n = _norm(value)
        if not n:
            return False
        if any(n in s for s in self.said):
            return True
        digits = re.sub(r"\D", "", str(value))
        # "INV-1002" vouched for by a caller who said "one zero zero two" (or keyed 1002)
        if len(digits) >= 3 and len(digits) >= len(n) - 4:
            return digits in self.spoken_digits.replace(" ", "") or digits in self.keyed
        return False

    def vouches(self, value: Any, source: str) -> bool:
        ok = False
        if "tool" in source:
            ok = self.from_tool(value)
        if not ok and "caller" in source:
            ok = self.from_caller(value)
        return ok


def unvouched(parameters: dict, bound: dict, args: dict, evidence: Evidence) -> str | None:
    """The refusal for the model when an id argument has no provenance, else None."""
    for name, source in id_arguments(parameters, bound).items():
        if name not in args or args[name] in (None, ""):
            continue
        if not evidence.vouches(args[name], source):
            where = {"tool": "a tool result", "caller": "the caller"}.get(source, "a tool result or the caller")
            return (f"refused: {name} {str(args[name])[:40]!r} did not come from {where} on this call; "
                    f"look it up with a tool first or ask the caller for it, never guess it")
    return None
