"""Per-tool circuit breaker and rate window, given ``now`` (no clock inside).

closed --(``threshold`` failures in a row)--> open --(``cooldown`` passed)-->
half-open: one trial request; success closes, failure opens again. While
open the API is not called at all: the caller hears that it cannot be done
right now, and the API gets room to recover.
"""
from __future__ import annotations

from collections import deque

from bridge.core import backoff as _backoff

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", HALF_OPEN: "half_open", OPEN: "open"}


class Breaker:
    def __init__(self, threshold: int = 5, cooldown: float = 30.0):
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at = 0.0
        self.state = CLOSED
        self.trial = False          # a half-open trial request is in flight

    def allow(self, now: float) -> bool:
        if self.state == OPEN and now - self.opened_at >= self.cooldown:
            self.state = HALF_OPEN
            self.trial = False
        if self.state == CLOSED:
            return True
        if self.state == HALF_OPEN and not self.trial:
            self.trial = True
            return True
        return False

    def success(self) -> None:
        self.state = CLOSED
        self.failures = 0
        self.trial = False

    def failure(self, now: float) -> None:
        self.failures += 1
        self.trial = False
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            self.state = OPEN
            self.opened_at = now

    def release(self) -> None:
        """A trial that ended neither way (e.g. invalid arguments): let another try."""
        self.trial = False


class RateWindow:
    """At most ``limit`` events in any ``window`` seconds."""

    def __init__(self, limit: int, window: float = 60.0):
        self.limit = limit
        self.window = window
        self.times: deque[float] = deque()

    def take(self, now: float) -> bool:
        while self.times and now - self.times[0] >= self.window:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


def backoff(attempt: int, base: float, cap: float, rand: float) -> float:
    """Full jitter (``bridge.core.backoff``): uniform in [0, min(cap, base * 2**attempt)]; ``rand`` in [0, 1)."""
    return _backoff.delay(attempt, base, cap, lambda: rand)


def retry_after(value: str | None, now_epoch: float) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - now_epoch)
