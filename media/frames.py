"""20 ms frames and the bounded queues that carry them between threads.

A ``FrameQueue`` is the one hand-off between the media clock thread and the
rest of the program. It is a ``collections.deque`` with a ``maxlen``: append
and popleft are atomic in CPython, so the clock thread never takes a lock,
and when the consumer falls behind the oldest frame is dropped and counted.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

FRAME_MS = 20
FRAMES_PER_SECOND = 1000 // FRAME_MS


def samples_per_frame(rate: int) -> int:
    return rate * FRAME_MS // 1000


def bytes_per_frame(rate: int) -> int:
    """Bytes in one 20 ms frame of mono signed 16-bit PCM."""
    return 2 * samples_per_frame(rate)


def silence(rate: int) -> bytes:
    return bytes(bytes_per_frame(rate))


def split_frames(pcm: bytes, rate: int, pad: bool = True) -> list[bytes]:
    """Cut PCM into whole 20 ms frames; the tail is zero-padded (or dropped)."""
    size = bytes_per_frame(rate)
    frames = [pcm[i:i + size] for i in range(0, len(pcm), size)]
    if frames and len(frames[-1]) < size:
        if pad:
            frames[-1] = frames[-1] + bytes(size - len(frames[-1]))
        else:
            frames.pop()
    return frames


class FrameQueue:
    """Bounded single-producer/single-consumer queue that drops the oldest."""

    __slots__ = ("_q", "maxlen", "dropped", "pushed")

    def __init__(self, maxlen: int):
        if maxlen < 1:
            raise ValueError("maxlen must be >= 1")
        self._q: deque = deque(maxlen=maxlen)
        self.maxlen = maxlen
        self.dropped = 0
        self.pushed = 0

    def push(self, item) -> None:
        if len(self._q) >= self.maxlen:
            self.dropped += 1
        self._q.append(item)
        self.pushed += 1

    def pop(self):
        """Oldest item, or None when empty."""
        try:
            return self._q.popleft()
        except IndexError:
            return None

    def drain(self) -> list:
        out = []
        q = self._q
        while True:
            try:
                out.append(q.popleft())
            except IndexError:
                return out

    def clear(self) -> int:
        """Drop everything queued (barge-in); returns how many were dropped."""
        return len(self.drain())

    def __len__(self) -> int:
        return len(self._q)


@dataclass
class TimingSummary:
    frames: int
    seconds: float
    rate: float          # frames per second over the measured span
    p50: float           # interval seconds
    p99: float
    max: float
    gaps: int            # intervals over the gap threshold


class FrameTimer:
    """Records when frames arrive; summarises rate, interval percentiles, gaps.

    The clock thread calls ``tick(now)`` (one float compare and two appends);
    the reader calls ``take_intervals()`` to move them into metrics and
    ``summary()`` at the end of a call. Intervals are kept in a bounded deque
    so a long call does not grow memory.
    """

    __slots__ = ("first", "last", "count", "_pending", "_all", "gap_threshold", "gaps", "max_interval")

    def __init__(self, keep: int = 30_000, gap_threshold: float = 0.040):
        self.first: float | None = None
        self.last: float | None = None
        self.count = 0
        self._pending: deque = deque(maxlen=4096)
        self._all: deque = deque(maxlen=keep)
        self.gap_threshold = gap_threshold
        self.gaps = 0
        self.max_interval = 0.0

    def tick(self, now: float) -> None:
        last = self.last
        self.last = now
        self.count += 1
        if last is None:
            self.first = now
            return
        d = now - last
        self._pending.append(d)
        self._all.append(d)
        if d > self.gap_threshold:
            self.gaps += 1
        if d > self.max_interval:
            self.max_interval = d

    def take_intervals(self) -> list[float]:
        out = []
        q = self._pending
        while True:
            try:
                out.append(q.popleft())
            except IndexError:
                return out

    def summary(self) -> TimingSummary:
        iv = sorted(self._all)
        span = (self.last - self.first) if (self.first is not None and self.last is not None) else 0.0
        rate = (self.count - 1) / span if span > 0 else 0.0
        return TimingSummary(
            frames=self.count, seconds=span, rate=rate,
            p50=percentile(iv, 50), p99=percentile(iv, 99),
            max=self.max_interval, gaps=self.gaps,
        )


def percentile(sorted_values, pct: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0.0 if empty)."""
    n = len(sorted_values)
    if n == 0:
        return 0.0
    k = max(0, min(n - 1, math.ceil(pct / 100.0 * n) - 1))
    return sorted_values[k]
