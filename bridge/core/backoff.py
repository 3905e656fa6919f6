"""One backoff rule for every retry in Trunkline: exponential growth, capped, with full jitter.

``delay(attempt, base, cap, rnd)`` is pure: ``attempt`` counts retries from 0
(the first retry waits up to ``base``), ``rnd`` is a random source returning a
float in [0, 1) (``random.random`` in production, a constant in tests). The
delay is uniform in ``[0, min(cap, base * 2**attempt))``: "full jitter".

Why full jitter (and not decorrelated jitter): it needs nothing but the
attempt number (decorrelated jitter needs the previous delay, i.e. state in
every caller), and of the usual rules it spreads a crowd of clients cut by
one outage (many media streams, many webhook deliveries, many cells) the
most evenly, so they do not come back in lockstep. Its expected wait is half
the capped exponential, which callers with a hard attempt limit accept.
"""
from __future__ import annotations

import random
from typing import Callable

Random = Callable[[], float]


def ceiling(attempt: int, base: float, cap: float) -> float:
    """The upper bound of retry ``attempt``'s delay: ``min(cap, base * 2**attempt)``, never negative."""
    if attempt < 0:
        attempt = 0
    if base <= 0 or cap <= 0:
        return 0.0
    # 2**attempt overflows a float near 1024: past the cap it no longer matters
    exp = base * (2.0 ** min(attempt, 1000))
    return min(cap, exp)


def delay(attempt: int, base: float, cap: float, rnd: Random = random.random) -> float:
    """Seconds to wait before retry ``attempt`` (0, 1, 2, ...): uniform in [0, ceiling)."""
    r = rnd()
    if not 0.0 <= r < 1.0:
        r = min(max(r, 0.0), 1.0)           # a source slightly off its range stays within the bound
    return r * ceiling(attempt, base, cap)
