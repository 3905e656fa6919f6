"""A call's context: the flat name -> text values an operator's prompts and tool templates read.

Context reaches a call from its carrier headers (``x_customer_id`` for ``X-Customer-ID``,
``pai_number``, ``diversion_number``..., see ``sip.headers``), from ``POST /v1/calls
{context}`` and from nothing else. Everything here is untrusted text:

* ``check`` bounds what the API accepts: a flat JSON object of at most ``MAX_KEYS``
  names (``[A-Za-z][A-Za-z0-9_]*``, up to ``MAX_NAME`` characters) with string or number
  values of at most ``MAX_VALUE`` characters; numbers are kept as their text.
* header values keep their own names (``x_customer_id``): a caller's header can never fill
  a name the API sets (``customer_id``), which tools may bind as a trusted value.
* ``fill`` puts values into an operator's text (a system prompt, a greeting) in one pass:
  ``{context.NAME}`` becomes the value cleaned by ``prompt_value`` (no braces, so a value can
  never add template syntax), or nothing when the call has no such value.
"""
from __future__ import annotations

import re
from typing import Any

MAX_KEYS = 32
MAX_NAME = 64
MAX_VALUE = 256
NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
REF = re.compile(r"\{context\.([A-Za-z0-9_]+)\}")
_PROMPT_SAFE = re.compile(r"[^A-Za-z0-9+._@:;=<>,\- ]")


class ContextError(ValueError):
    """What is wrong with a context object; ``field`` names the offending part (``context.NAME``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check(value: Any, field: str = "context") -> dict[str, str]:
    """A context object from an API body, checked and with its values as text."""
    if not isinstance(value, dict):
        raise ContextError(field, "expected a flat object of names to strings or numbers")
    if len(value) > MAX_KEYS:
        raise ContextError(field, f"at most {MAX_KEYS} values")
    out: dict[str, str] = {}
    for name, v in value.items():
        where = f"{field}.{name}" if isinstance(name, str) and len(name) <= MAX_NAME else field
        if not isinstance(name, str) or not NAME.match(name):
            raise ContextError(where, f"a name is a letter then letters, digits or _, at most {MAX_NAME} "
                                      "characters")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ContextError(where, "expected a string or a number (the context is flat)")
        text = v if isinstance(v, str) else repr(v) if isinstance(v, float) else str(v)
        if len(text) > MAX_VALUE:
            raise ContextError(where, f"at most {MAX_VALUE} characters")
        out[name] = text
    return out


def prompt_value(value: str) -> str:
    """A context value as it may appear in a prompt: only the characters of ids, numbers and SIP
    URIs are kept (never a brace), at most 64 of them, and never a run of words long enough to
    read as an order to the model."""
    clean = _PROMPT_SAFE.sub("", value)[:64]
    return clean if len(clean.split()) <= 3 else clean.split()[0]


def fill(text: str, context: dict[str, str]) -> str:
    """``{context.NAME}`` in ``text`` replaced, in one pass, by the call's value (cleaned), or by
    nothing when the call has none."""
    if "{context." not in text:
        return text
    return REF.sub(lambda m: prompt_value(context.get(m.group(1), "")), text)


def refs(text: str) -> list[str]:
    """The context names ``text`` refers to."""
    return REF.findall(text)
