"""Pooled ``AudioMediaPort``s that move 20 ms PCM frames to/from ``CallMedia``.

Both callbacks run in pjmedia's native clock thread, 50 times a second per
call, holding the GIL. ``bytes(frame.buf)`` walks the SWIG vector element by
element (~100-300 µs); instead we read the vector's data pointer and copy
with one ``memcpy`` (~1 µs). That relies on libstdc++'s vector layout
(begin, end, capacity pointers), so ``fast_copy_works()`` checks it once at
start against the slow path and the port falls back if it ever disagrees.

Ports are created once, registered in the conference bridge, and reused:
binding a port to a call only swaps which ``CallMedia`` it serves. Deleting
a connected port while the clock runs crashes pjmedia, so ports live until
the engine shuts down.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
import time

import pjsua2 as pj

from media.callmedia import CallMedia

log = logging.getLogger("trunkline.sip.port")

_PTR = ctypes.c_void_p
_monotonic = time.monotonic
_AUDIO = pj.PJMEDIA_FRAME_TYPE_AUDIO


def _vector_span(vec) -> tuple[int, int]:
    addr = int(vec.this)
    begin = _PTR.from_address(addr).value or 0
    end = _PTR.from_address(addr + ctypes.sizeof(_PTR)).value or 0
    return begin, end - begin


def read_buf(frame) -> bytes:
    begin, size = _vector_span(frame.buf)
    if size <= 0:
        return b""
    return ctypes.string_at(begin, size)


def write_buf(frame, pcm: bytes) -> None:
    buf = frame.buf
    n = len(pcm)
    buf.resize(n)
    begin, size = _vector_span(buf)
    if size != n:
        raise RuntimeError("vector resize not visible through its data pointer")
    ctypes.memmove(begin, pcm, n)
    frame.size = n
    frame.type = _AUDIO


def _slow_read(frame) -> bytes:
    return bytes(frame.buf)


def _slow_write(frame, pcm: bytes) -> None:
    frame.buf = pj.ByteVector(pcm)
    frame.size = len(pcm)
    frame.type = _AUDIO


def fast_copy_works() -> bool:
    """Check the pointer trick against SWIG's own conversion, both ways."""
    try:
        sample = bytes(range(256)) * 2 + b"\x01\x02"
        f = pj.MediaFrame()
        f.buf = pj.ByteVector(sample)
        if read_buf(f) != sample:
            return False
        g = pj.MediaFrame()
        write_buf(g, sample)
        return bytes(g.buf) == sample and g.size == len(sample)
    except Exception:  # noqa: BLE001 - any failure means "use the slow path"
        return False


_read, _write = read_buf, write_buf


def choose_copy() -> bool:
    global _read, _write
    if fast_copy_works():
        _read, _write = read_buf, write_buf
        return True
    log.warning("fast frame copy unavailable on this build; using the slow SWIG copy")
    _read, _write = _slow_read, _slow_write
    return False


_rt_thread = 0      # the clock thread given SCHED_FIFO (pjsua starts a new one after an idle stop)
_thread_id = threading.get_native_id


def _make_clock_realtime() -> None:
    """Give the calling (clock) thread SCHED_FIFO, so Python threads doing
    CPU work cannot delay it. Needs root or CAP_SYS_NICE; failure is logged
    once and ignored."""
    global _rt_thread
    first, _rt_thread = not _rt_thread, _thread_id()
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        if first:
            log.info("media clock thread runs SCHED_FIFO")
    except (OSError, AttributeError) as exc:
        if first:
            log.info("media clock thread stays SCHED_OTHER (%s)", exc)


class FramePort(pj.AudioMediaPort):
    realtime = False

    def __init__(self, index: int, rate: int):
        super().__init__()
        self.index = index
        self.rate = rate
        self.media: CallMedia | None = None
        fmt = pj.MediaFormatAudio()
        fmt.type = pj.PJMEDIA_TYPE_AUDIO
        fmt.clockRate = rate
        fmt.channelCount = 1
        fmt.bitsPerSample = 16
        fmt.frameTimeUsec = 20000
        self.createPort(f"tl{index}", fmt)

    def onFrameReceived(self, frame):
        m = self.media
        if m is None:
            return
        try:
            m.rx(_read(frame), _monotonic())
        except Exception:  # noqa: BLE001 - never let an error reach the clock
            m.errors += 1

    def onFrameRequested(self, frame):
        if FramePort.realtime and _rt_thread != _thread_id():
            _make_clock_realtime()
        m = self.media
        if m is None:
            return
        try:
            pcm = m.tx(_monotonic())
            if pcm is not None:
                _write(frame, pcm)
        except Exception:  # noqa: BLE001
            m.errors += 1


class PortPool:
    """A fixed set of ports, created after libStart and kept until shutdown."""

    def __init__(self, size: int, rate: int):
        self.ports = [FramePort(i, rate) for i in range(size)]
        self.free = list(self.ports)

    def take(self, media: CallMedia) -> FramePort:
        if not self.free:
            raise RuntimeError("no free media port")
        port = self.free.pop()
        port.media = media
        return port

    def give(self, port: FramePort) -> None:
        port.media = None
        if port not in self.free:
            self.free.append(port)

    def close(self) -> None:
        for p in self.ports:
            p.media = None
        self.ports.clear()
        self.free.clear()


