"""``{placeholder}`` templates for URLs, queries, bodies, keys and spoken lines.

Deliberately not ``str.format``: values come from callers and from API
responses, and a template may only *read* a path such as ``{args.phone}``,
``{call.id}`` or ``{items[0].amount}`` — no attribute access, no code.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Callable
from urllib.parse import quote, unquote, urlsplit

from bridge.core.toolspec import PLACEHOLDER

_STEP = re.compile(r"\.?([A-Za-z0-9_]+)|\[([0-9]+)\]")


class MissingValue(KeyError):
    pass


class UnsafeValue(ValueError):
    """A value that would change which resource a URL names (a ``.``/``..`` path segment)."""


def lookup(data: Any, path: str) -> Any:
    """``a.b[0].c`` in nested dicts/lists; raises ``MissingValue``."""
    cur = data
    pos = 0
    while pos < len(path):
        m = _STEP.match(path, pos)
        if not m:
            raise MissingValue(path)
        key, index = m.group(1), m.group(2)
        try:
            if index is not None:
                cur = cur[int(index)]
            elif isinstance(cur, dict):
                cur = cur[key]
            else:
                raise MissingValue(path)
        except (KeyError, IndexError, TypeError):
            raise MissingValue(path) from None
        pos = m.end()
    return cur


def spoken(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}".rstrip("0").rstrip(".") if v != int(v) else str(int(v))
    if v is None:
        return ""
    return str(v)


def render(template: str, values: dict, escape: Callable[[str], str] = lambda s: s, strict: bool = True) -> str:
    def sub(m: re.Match) -> str:
        try:
            return escape(spoken(lookup(values, m.group(1))))
        except MissingValue:
            if strict:
                raise
            return ""
    return PLACEHOLDER.sub(sub, template)


def _dot_segment(segment: str) -> bool:
    """``.`` or ``..``, also percent-encoded (``%2e``, ``%252e%252e``: decoded up to 3 times)."""
    for _ in range(4):
        if segment in (".", ".."):
            return True
        decoded = unquote(segment)
        if decoded == segment:
            return False
        segment = decoded
    return False


def render_url(template: str, values: dict) -> str:
    """Path pieces are percent-encoded, so an argument cannot add ``/``, ``?`` or ``#``; and an
    argument that makes a path segment ``.`` or ``..`` (in any encoding) is refused with
    ``UnsafeValue``: HTTP clients normalise such paths, so ``..`` would climb out of the path
    the operator wrote."""
    url = render(template, values, escape=lambda s: quote(s, safe=""))
    path = urlsplit(url).path
    if any(_dot_segment(seg) for seg in path.split("/")):
        raise UnsafeValue("an argument may not be '.' or '..' in the URL path")
    return url


def args_hash(args: dict) -> str:
    """Same arguments, same hash: the idempotency key of a repeated request."""
    return hashlib.sha256(json.dumps(args, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
