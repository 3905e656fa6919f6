"""Structured logs: one JSON object per line on stderr.

Logs carry call ids, timings and metadata, never what a caller said or keyed:
the fields of ``event(...)`` lines that hold words, digits or phone numbers
(``WORD_FIELDS``: text, from/to, tool arguments and results ...; ``DIGIT_FIELDS``
unless they hold only the ``X`` mask, as they do unless ``[pii] show_dtmf``) are written as ``"[redacted]"``, at any depth. ``records.log_words = true``
(``setup(words=True)``) keeps them, for debugging on a test box only.
"""
from __future__ import annotations

import json
import logging
import sys
import time

from bridge.core import pii

WORD_FIELDS = frozenset({
    "text", "message", "from", "to", "from_uri", "to_uri", "heard", "said",
    "reply", "utterance", "caller", "number", "args", "arguments", "request", "response", "transcript",
    "prompt", "content", "messages", "target", "words", "interim", "final_text", "partial"})
DIGIT_FIELDS = frozenset({"dtmf", "digit", "digits"})
REDACTED = "[redacted]"
_words = False


def show_words(on: bool) -> None:
    """The operator's opt-in (``records.log_words``): log what callers said, unredacted."""
    global _words
    _words = bool(on)


def redact(value, depth: int = 0):
    """``value`` with every word-carrying field replaced (``result`` only when it is structured:
    a call's result is an enumeration, a tool's is data)."""
    if depth > 8:
        return REDACTED
    if isinstance(value, dict):
        return {k: (REDACTED if v not in (None, "") and (k in WORD_FIELDS or (
                    k == "result" and isinstance(v, (dict, list))) or (
                    k in DIGIT_FIELDS and not (isinstance(v, str) and set(v) <= {"X"}))) else redact(v, depth + 1))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, depth + 1) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields if _words else redact(fields))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(pii.mask(out), default=str)       # card numbers and [pii] patterns masked


def setup(level: str = "info", words: bool = False) -> None:
    show_words(words)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def event(logger: logging.Logger, name: str, **fields) -> None:
    logger.info(name, extra={"fields": {"event": name, **fields}})
