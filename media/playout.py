"""Agent speech going out: paced into the call, and what the caller heard.

Segments (a sentence's text with its 20 ms frames) are queued; ``fill`` keeps
only a few frames ahead of the media clock in the call's downlink, so a flush
(barge-in) silences the line within those few frames. Because frames are
handed over a few at a time, the frames the clock has consumed are exactly
the ones the caller heard, and ``flush`` can say which words got out.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(eq=False)
class Segment:
    text: str
    frames: list[bytes]
    turn: int = 0
    sent: int = 0            # frames handed to the downlink
    played: int = 0          # frames the media clock has taken


@dataclass
class Heard:
    text: str                # what the caller heard of what was flushed
    complete: bool           # True if everything queued had been heard


class Playout:
    def __init__(self, ahead: int = 3):
        self.ahead = ahead
        self.queue: deque[Segment] = deque()
        self.heard_parts: list[str] = []     # text of segments played to the end, not yet taken
        self.frames_out = 0
        self._in_flight: deque[Segment] = deque()   # one entry per frame handed over, not yet played

    @property
    def active(self) -> bool:
        return bool(self.queue) or bool(self._in_flight)

    def add(self, text: str, frames: list[bytes], turn: int = 0) -> None:
        if frames:
            self.queue.append(Segment(text, frames, turn))

    def _played(self, n: int) -> None:
        for _ in range(max(0, min(n, len(self._in_flight)))):
            seg = self._in_flight.popleft()
            seg.played += 1
            if seg.played == len(seg.frames):
                self.heard_parts.append(seg.text)

    def fill(self, downlink, queued_out: int) -> int:
        """Account for frames played since last time, then top the downlink up."""
        self._played(len(self._in_flight) - queued_out)
        pushed = 0
        while queued_out + pushed < self.ahead and self.queue:
            seg = self.queue[0]
            downlink.push(seg.frames[seg.sent])
            self._in_flight.append(seg)
            seg.sent += 1
            pushed += 1
            if seg.sent >= len(seg.frames):
                self.queue.popleft()
        self.frames_out += pushed
        return pushed

    def take_heard(self) -> str:
        text = " ".join(self.heard_parts)
        self.heard_parts.clear()
        return text

    def flush(self, downlink_cleared: int) -> Heard:
        """Drop everything not yet played; ``downlink_cleared`` frames were
        taken back from the downlink unplayed. A segment cut mid-way counts
        its words in proportion to the frames that got out."""
        self._played(len(self._in_flight) - downlink_cleared)
        parts = self.heard_parts[:]
        self.heard_parts.clear()
        partial = [seg for seg in dict.fromkeys(list(self._in_flight) + list(self.queue))
                   if 0 < seg.played < len(seg.frames)]
        for seg in partial:
            words = seg.text.split()
            n = int(len(words) * seg.played / len(seg.frames))
            if n:
                parts.append(" ".join(words[:n]))
        complete = not self._in_flight and not self.queue
        self.queue.clear()
        self._in_flight.clear()
        return Heard(" ".join(parts), complete)
