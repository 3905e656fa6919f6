"""What every part of the control API shares: the error type and its JSON shape,
the route declaration, and schema fragments used by more than one route."""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

DIRECTION = {"type": "string", "enum": ["in", "out", "both"]}
TEXT = {"type": "string", "minLength": 1, "maxLength": 2000}
URI_OR_NUMBER = {"type": "string", "minLength": 1, "maxLength": 256, "pattern": r"^(sips?:|tel:|\+?[0-9*#]+$)"}


MAX_JSON_DEPTH = 32             # arrays/objects inside each other, in any body or message
MAX_JSON_BYTES = 64 * 1024      # a request body or client message: parsed on the loop in a few ms at most
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def json_too_deep(text: str | bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``text`` nests arrays/objects more than ``limit`` deep (brackets inside strings
    do not count). Linear, no recursion, stops at the first level too deep."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "replace")
    if text.count("[") + text.count("{") <= limit:
        return False                      # the common case: too few brackets to be too deep
    depth = 0
    for m in _BRACKET.finditer(_JSON_STRING.sub('""', text)):
        if m.group(0) in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def parse_json(raw: str | bytes, what: str = "body") -> Any:
    """A request body or client message as JSON; ``ApiError`` 400 (``invalid_json``) for anything
    malformed, too large or nested deeper than ``MAX_JSON_DEPTH`` (never a RecursionError)."""
    if len(raw) > MAX_JSON_BYTES:
        raise ApiError(413, "too_large", f"{what} is larger than {MAX_JSON_BYTES} bytes")
    if json_too_deep(raw):
        raise ApiError(400, "invalid_json", f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "invalid_json", f"{what} is nested too deeply") from None
    except ValueError as exc:            # JSONDecodeError, UnicodeDecodeError, huge integers
        raise ApiError(400, "invalid_json", f"{what} is not valid JSON: {str(exc)[:200]}") from None


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers


class RateLimiter:
    """A token bucket per API key id: ``rate`` requests a second on average, ``burst`` at once.
    ``take`` returns 0 when the request may go, else the seconds until it may (Retry-After).
    ``rate`` 0 turns the limit off. Buckets of keys idle long enough to be full are dropped."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10000):
        self.rate, self.burst, self.clock, self.max_keys = float(rate), max(1, int(burst)), clock, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}      # key id -> (tokens, at)

    def take(self, key: str) -> float:
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.max_keys:
                self._prune(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = self.burst / self.rate
        for k in [k for k, (_, at) in self._buckets.items() if now - at >= full]:
            del self._buckets[k]


def retry_after(seconds: float) -> dict:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def error_response(status: int, code: str, message: str, field: str | None = None, headers=None) -> web.Response:
    err = {"code": code, "message": message}
    if field:
        err["field"] = field
    return web.json_response({"error": err}, status=status, headers=headers)


@dataclass
class Route:
    method: str
    path: str
    handler: str
    scope: str                    # "read", "control", or "callback" (signed URL instead of a key)
    summary: str
    body: dict | None = None
    status: int = 200
    raw: bool = False             # the handler answers the request itself (a WebSocket)
