"""The per-call hand-off between the media clock thread and the application.

The clock thread (inside pjmedia) calls ``rx`` with each 20 ms frame the
caller sent (queued with its arrival time) and ``tx`` for each frame it must send; the application drains
``uplink`` and fills ``downlink`` on its own schedule. Both queues are
bounded and drop the oldest frame (counted) when the other side stalls.

When ``tap_out`` is on (a recording or media stream wants the outbound leg),
``tx`` also queues ``(now, pcm or None)`` on ``sent``: what the caller actually
got, tick by tick, ``None`` for a tick that sent silence. rx and tx run once
each per clock tick, so the i-th uplink frame and the i-th sent frame belong
to the same 20 ms.
"""
from __future__ import annotations

from media.frames import FrameQueue, FrameTimer, bytes_per_frame


class CallMedia:
    __slots__ = ("rate", "frame_bytes", "uplink", "downlink", "rx_timer",
                 "tx_frames", "tx_silence", "errors", "mark", "mark_time", "sent", "tap_out")

    def __init__(self, rate: int, uplink_frames: int = 250, downlink_frames: int = 1500):
        self.rate = rate
        self.frame_bytes = bytes_per_frame(rate)
        self.uplink = FrameQueue(uplink_frames)
        self.downlink = FrameQueue(downlink_frames)
        self.rx_timer = FrameTimer()
        self.tx_frames = 0
        self.tx_silence = 0     # frames requested while nothing was queued
        self.errors = 0         # callback errors swallowed to protect the clock
        self.mark: bytes | None = None     # a queued frame whose send time we want
        self.mark_time: float | None = None
        self.sent = FrameQueue(uplink_frames)
        self.tap_out = False

    # -- clock-thread side -------------------------------------------------
    def rx(self, pcm: bytes, now: float) -> None:
        self.rx_timer.tick(now)
        self.uplink.push((now, pcm))

    def tx(self, now: float) -> bytes | None:
        pcm = self.downlink.pop()
        if pcm is None:
            self.tx_silence += 1
        else:
            self.tx_frames += 1
            if pcm is self.mark:
                self.mark_time = now
                self.mark = None
        if self.tap_out:
            self.sent.push((now, pcm))
        return pcm

    # -- application side --------------------------------------------------
    def queued_out(self) -> int:
        return len(self.downlink)

    def mark_frame(self, pcm: bytes) -> None:
        """Record when the clock takes this (already queued or about to be) frame."""
        self.mark_time = None
        self.mark = pcm

    def flush_out(self) -> int:
        """Drop queued outgoing audio now (barge-in); returns frames dropped."""
        return self.downlink.clear()
