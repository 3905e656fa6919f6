"""What the model is told about an API response.

Models are bad at long JSON and the caller must not hear internal ids or
someone's personal data, so a response is reduced before anyone sees it:

- ``path`` picks the interesting part (``invoices``);
- ``fields`` is an allow-list ``source path -> name``; with none, keys that
  look like ids or personal data are dropped instead;
- lists are cut to ``max_items`` and ``count`` says how many there were;
- ``codes`` turn machine values into words (``"ovd" -> "overdue"``).
"""
from __future__ import annotations

import re
from typing import Any

from bridge.core.toolspec import ResultMap
from bridge.agent.tools.template import MissingValue, lookup

# Without an allow-list these keys never reach the model.
SENSITIVE = re.compile(r"(^|_)(id|uuid|guid|ssn|dob|email|e_?mail|phone|address|card|iban|account|token|secret|"
                       r"password|ip)s?$|^(id|.*_id)$", re.I)


def _scrub(v: Any, m: ResultMap) -> Any:
    if isinstance(v, dict):
        return {k: _scrub(x, m) for k, x in v.items() if not SENSITIVE.search(k) and k not in m.drop}
    if isinstance(v, list):
        return [_scrub(x, m) for x in v]
    return v


def _pick(item: Any, m: ResultMap) -> Any:
    if not m.fields:
        return _scrub(item, m)
    out = {}
    for src, name in m.fields.items():
        try:
            v = lookup(item, src)
        except MissingValue:
            continue
        words = m.codes.get(name) or m.codes.get(src)
        if words is not None and str(v) in words:
            v = words[str(v)]
        out[name] = v
    return out


def map_result(data: Any, m: ResultMap) -> dict:
    """The mapped result, always a dict (lists come back as ``items`` + ``count``)."""
    if m.path:
        try:
            data = lookup(data, m.path)
        except MissingValue:
            data = None
    if isinstance(data, list):
        return {"count": len(data), "items": [_pick(x, m) for x in data[:m.max_items]]}
    if isinstance(data, dict):
        out = _pick(data, m)
        for k, v in list(out.items()):
            if isinstance(v, list) and len(v) > m.max_items:
                out[k] = v[:m.max_items]
                out[f"{k}_count"] = len(v)
        return out
    return {"value": data}
