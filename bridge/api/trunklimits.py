"""Per-trunk outbound limits: ``cps`` (call attempts per second) and ``max_calls`` (at once).

Carriers refuse calls above their contracted rate and concurrency (403/503 with no
useful reason, sometimes a temporary block of the whole trunk). ``POST /v1/calls``
checks both before anything is sent and *refuses* over them, never queues:

- over ``cps``: ``429 trunk_cps_exceeded`` with ``Retry-After`` (when the oldest attempt
  in the window leaves it);
- over ``max_calls``: ``409 trunk_max_calls`` (a state conflict, like a full cell: it
  clears when one of the trunk's calls ends, which nobody can promise a time for, so no
  ``Retry-After``).

Why refuse: a queued POST would either hold the HTTP request for an unknown time
(client timeouts, retried duplicates) or answer with a call that does not exist yet and
needs a "queued" state everywhere; the client already paces itself on 429 + Retry-After
(as for ``http.rate_limit``), and a campaign's pacing is its own business.

The counts come from the call store, which every cell of a box shares (plus the rows and
placements in flight in this process), so the limits hold box-wide up to the few
milliseconds a cell takes to commit a new call row.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

from bridge.api.base import ApiError, retry_after


def window(cps: float) -> tuple[float, int]:
    """(seconds, attempts allowed in them): ``cps`` per second, or one per ``1/cps`` s below 1."""
    seconds = max(1.0, 1.0 / cps)
    return seconds, max(1, math.floor(cps * seconds + 1e-9))


def refusal(cps: float, max_calls: int, active: int, times: list[float], now: float) -> ApiError | None:
    """The API error for one more outbound call on a trunk with these limits, or None (pure)."""
    if max_calls and active >= max_calls:
        return ApiError(409, "trunk_max_calls", f"the trunk already has {active} outbound calls (max_calls = "
                        f"{max_calls}); try again when one ends", "trunk")
    if cps:
        seconds, allowed = window(cps)
        recent = sorted(t for t in times if t > now - seconds)
        if len(recent) >= allowed:
            wait = recent[-allowed] + seconds - now
            return ApiError(429, "trunk_cps_exceeded", f"the trunk takes {cps:g} call attempts per second (cps); "
                            "retry after the Retry-After header's seconds", "trunk", headers=retry_after(wait))
    return None


class TrunkLimits:
    """The check ``POST /v1/calls`` makes, and the placements it has in flight."""

    def __init__(self, trunks, store, clock=time.time):
        self.limits = {t.name: (t.cps, t.max_calls) for t in trunks if t.cps or t.max_calls}
        self.store = store
        self.clock = clock
        self.inflight: dict[str, list[float]] = defaultdict(list)   # trunk -> start times of placements

    @contextmanager
    def placing(self, trunk: str | None) -> Iterator[None]:
        """Raise the ``ApiError`` when ``trunk`` is at a limit; else count this placement while it runs."""
        if trunk not in self.limits:
            yield
            return
        cps, max_calls = self.limits[trunk]
        now = self.clock()
        seconds = window(cps)[0] if cps else 1.0
        active, times = self.store.outbound_load(trunk, now - seconds)
        mine = self.inflight[trunk]
        err = refusal(cps, max_calls, active + len(mine), times + mine, now)
        if err is not None:
            raise err
        mine.append(now)
        try:
            yield
        finally:
            mine.remove(now)
