"""Media streams: a call's raw audio to and from a WebSocket, live.

A ``MediaStream`` is an audio tap on one call (``session.add_tap``). Every
20 ms tick the cell hands it both legs; the tap only stamps the frames and
appends them to the stream's bounded send buffer, so the tick never waits on
the network. A sender task per connection encodes (µ-law, PCM or Opus), wraps
each frame in a JSON ``media`` message and writes it to the WebSocket. When
the consumer is slower than real time the buffer fills and the oldest frames
are dropped and counted; a send blocked for ``send_timeout`` means the
consumer is gone and the connection is dropped.

The bridge either connects out to the stream's ``url`` (reconnecting with
exponential backoff and jitter when the connection breaks, bounded by
``reconnect_attempts``) or a client connects in at
``/v1/calls/{call_id}/streams/{stream_id}/ws`` with an API key. A
bidirectional stream plays what the client sends into the call, paced a few
frames ahead of the media clock by ``Playout``; ``clear`` flushes it
(barge-in) and ``mark`` is echoed once the audio queued before it has been
played (marks flushed by ``clear`` are echoed with ``cleared: true``).
``bridge/api/stream_manager.py`` starts and ends a cell's streams; ``bridge/api/bot.py``
is the app of a number routed straight to a bot.

Nothing a stream does can end its call: a failing stream is stopped and says
so in events (``stream_reconnecting``, ``stream_stopped``, ``stream_failed``).
"""
from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections import deque
from typing import Callable

import aiohttp
from aiohttp import WSMsgType, web

from bridge.core import backoff as _backoff
from bridge.core.states import StreamState
from bridge.api.base import json_too_deep
from bridge.core.guarded_http import failure_class
from bridge.records.store import new_id
from media.frames import FRAMES_PER_SECOND
from media.playout import Playout, Segment
from media import twilio as tw
from media.streamcodec import (ENCODINGS, FrameDecoder, FrameEncoder, MediaClock, StreamProtocolError,
                               error_message, mark_message, media_message, parse_client, start_message,
                               stop_message)
from media.twilio import TwilioWire

log = logging.getLogger("trunkline.streams")

MAX_MESSAGE = 1 << 20          # largest client message accepted (bytes)
MAX_QUEUED_ERRORS = 20         # error replies waiting to be sent; more are not queued
MAX_MARKS = 100                # marks waiting for their audio plus echoes waiting to be sent
PARTIAL_FLUSH_AFTER = 0.1      # a partial client frame is played after this long with no more audio


class StreamRefused(Exception):
    """The API refuses to start a stream: HTTP status, error code, message, field."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def backoff(attempt: int, base: float, cap: float, rnd: Callable[[], float] = random.random) -> float:
    """Delay before reconnect ``attempt`` (1, 2, ...): up to ``base`` doubling to ``cap``, full
    jitter (``bridge.core.backoff``) so many streams cut by one outage do not come back in lockstep."""
    return _backoff.delay(attempt - 1, base, cap, rnd)


STABLE_AFTER = 2.0           # s: a connection that stayed up this long resets the reconnect backoff
NORMAL_CLOSES = (1000, 0)    # 0: a close frame with no status code (``close()`` without one, as browsers send)


def connection_end(sender_done: bool, send_error: BaseException | None, peer_close: int | None,
                   close_code: int | None, send_timeout: float) -> tuple[str, str]:
    """How one connection ended: ``stopped`` (our sender sent ``stop`` and finished),
    ``closed`` (the peer sent a close frame with 1000 or no code) or ``lost``, with a detail for the API.
    ``peer_close`` is the code of the peer's close frame (None: none came; a dropped TCP
    connection is not a close, though aiohttp may report its close code as 1000).

    The peer's close wins over a send that failed at the same moment: once aiohttp has
    read a close frame it refuses further writes, so a frame on its way out then fails."""
    if sender_done and send_error is None:
        return "stopped", ""
    if peer_close in NORMAL_CLOSES:
        return "closed", "closed by the peer"
    if peer_close is not None:
        return "lost", f"the peer closed with code {peer_close}"
    if sender_done:
        if isinstance(send_error, TimeoutError):
            return "lost", f"consumer too slow: a send blocked for {send_timeout:g} s"
        if isinstance(send_error, ConnectionError):
            return "lost", "send failed: the connection broke"
        return "lost", f"send failed: {failure_class(send_error)}"
    return "lost", f"connection lost (close code {close_code})"


class MediaStream:
    def __init__(self, manager, session, url: str | None, direction: str, encoding: str,
                 bidirectional: bool, protocol: str = "trunkline", parameters: dict | None = None,
                 account_sid: str | None = None, bot: bool = False):
        """``manager``: the cell's ``bridge.api.stream_manager.StreamManager`` (cfg, metrics, HTTP client)."""
        cfg = manager.cfg
        self.manager = manager
        self.session = session
        self.cfg = cfg
        self.id = new_id(f"st_c{session.services.cell_id}")
        self.call_id = session.call_id
        self.url = url
        self.direction = direction
        self.encoding = encoding
        self.bidirectional = bidirectional
        self.rate = session.media.rate
        self.protocol = protocol
        self.parameters = dict(parameters or {})
        # the call's own bot (a number routed to a stream) hears the real DTMF digits, as the
        # call's app does; a stream the API added gets them as events show them (``pii.dtmf``)
        self.bot = bot
        self.on_stopped: Callable[[str], None] | None = None     # the bot app: the stream ended
        self.twilio: TwilioWire | None = None
        if protocol == "twilio":
            self.twilio = TwilioWire(tw.sid("MZ", self.id), tw.call_sid(self.call_id),
                                     account_sid or tw.DEFAULT_ACCOUNT_SID,
                                     direction, parameters)
        self.status: StreamState = StreamState.CONNECTING if url else StreamState.WAITING
        self.reason: str | None = None
        self.detail: str | None = None
        self.created = time.time()
        self.ended: float | None = None
        self.stats = {"frames_sent": 0, "frames_dropped": 0, "frames_received": 0, "messages_received": 0,
                      "client_errors": 0, "marks": 0, "connections": 0, "reconnects": 0}
        # the send buffer: media items (direction, timestamp, pcm) and control messages
        # (callables that build the text once they get their sequence number)
        self._out: deque = deque()
        self._media_queued = 0
        self._errors_queued = 0
        self._capacity = cfg["buffer_frames"] * (2 if direction == "both" else 1)
        self._wake = asyncio.Event()
        self._seq = 0
        self.clock = MediaClock()
        self._ws = None
        self._changed = asyncio.Event()      # a client attached or left (inbound)
        self._task: asyncio.Task | None = None
        self._stopping = False
        # playback of client audio (bidirectional)
        self.playout = Playout(ahead=3) if bidirectional else None
        self.decoder = FrameDecoder(encoding, self.rate) if bidirectional else None
        self._max_pending = int(cfg["playback_seconds"] * FRAMES_PER_SECOND)
        self._pending = 0                    # client frames not yet handed to the downlink
        self._last_seg: Segment | None = None
        self._marks: deque[tuple[str, Segment | None]] = deque()
        self._marks_queued = 0               # mark echoes in the send buffer
        self._last_media_at = 0.0
        m = manager.metrics
        self._m_sent = m.stream_frames_sent.labels(encoding)
        self._m_received = m.stream_frames_received.labels(encoding)
        self._m_dropped = m.stream_frames_dropped.labels(encoding)

    # -- views -------------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        return not self._stopping

    @property
    def ws_path(self) -> str | None:
        return None if self.url else f"/v1/calls/{self.call_id}/streams/{self.id}/ws"

    def as_dict(self) -> dict:
        return {"id": self.id, "call_id": self.call_id, "url": self.url, "ws_path": self.ws_path,
                "protocol": self.protocol,
                **({"stream_sid": self.twilio.stream_sid} if self.twilio is not None else {}),
                "direction": self.direction, "encoding": self.encoding, "sample_rate": ENCODINGS[self.encoding],
                "bidirectional": self.bidirectional, "status": self.status, "reason": self.reason,
                "detail": self.detail, "created": self.created, "ended": self.ended,
                "buffered_frames": self._media_queued, "stats": dict(self.stats)}

    def _event(self, etype: str, **data) -> None:
        self.session.emit(etype, {"stream_id": self.id, **data})

    # -- lifecycle --------------------------------------------------------------------------
    def begin(self) -> None:
        self.session.add_tap(self)
        runner = self._run_outbound() if self.url else self._run_inbound()
        self._task = asyncio.get_running_loop().create_task(runner, name=f"stream-{self.id}")

    def stop(self, reason: str, detail: str | None = None, failed: bool = False) -> None:
        """End the stream now: no more frames are taken; what is buffered is still sent,
        then ``stop``, then the WebSocket closes. The event is published at once (the
        call may be ending: its events must come before ``call_hangup``)."""
        if self._stopping:
            return
        self._stopping = True
        self.session.remove_tap(self)
        if self.playout is not None and self.playout.active:
            self.playout.flush(self.session.media.flush_out())
        self.status = StreamState.FAILED if failed else StreamState.STOPPED
        self.reason, self.detail, self.ended = reason, detail, time.time()
        data = {"reason": reason, "stats": dict(self.stats)}
        if detail:
            data["detail"] = detail
        self._event("stream_failed" if failed else "stream_stopped", **data)
        self.manager.ended(self)
        log.info("stream %s on call %s %s: %s %s", self.id, self.call_id, self.status, reason, detail or "",
                 extra={"fields": {"call_id": self.call_id, "stream_id": self.id}})
        self._wake.set()
        self._changed.set()
        if self._ws is None and self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        # kept for GET after the call: let the call (its app, its queues) go
        self.session = self.playout = self.decoder = None
        self._marks.clear()
        if self.on_stopped is not None:
            on_stopped, self.on_stopped = self.on_stopped, None
            on_stopped(reason)

    # the cell's tap interface
    def call_ended(self) -> None:
        self.stop("call_ended")

    def failed(self, exc: BaseException) -> None:
        self.stop("error", f"{type(exc).__name__}: {exc}", failed=True)

    # -- the 20 ms tick (never awaits) ---------------------------------------------------------
    def on_audio(self, inbound: list, outbound: list, now: float) -> None:
        if self._stopping:
            return
        if self.direction != "out":
            for t, pcm in inbound:
                self._queue_media("in", t, pcm)
        if self.direction != "in":
            for t, pcm in outbound:
                self._queue_media("out", t, pcm)
        if self.playout is not None:
            self._play(now)

    def _queue_media(self, direction: str, t: float, pcm: bytes | None) -> None:
        self._out.append((direction, self.clock.stamp(direction, t), pcm))
        self._media_queued += 1
        if self._media_queued > self._capacity:
            self._drop_oldest()
        self._wake.set()

    def _drop_oldest(self) -> None:
        out = self._out
        for i in range(len(out)):
            if not callable(out[i]):
                del out[i]
                break
        self._media_queued -= 1
        self.stats["frames_dropped"] += 1
        self._m_dropped.inc()

    def _queue_control(self, build: Callable[[int], str], front: bool = False) -> None:
        if front:
            self._out.appendleft(build)
        else:
            self._out.append(build)
        self._wake.set()

    # -- playback of client audio --------------------------------------------------------------
    def _play(self, now: float) -> None:
        media = self.session.media
        if self.decoder.pending and not self._pending and now - self._last_media_at > PARTIAL_FLUSH_AFTER:
            self._add_playback(self.decoder.flush())       # the client paused mid-frame
        self._pending -= self.playout.fill(media.downlink, media.queued_out())
        self.playout.take_heard()                          # segments carry no text here
        if self._marks:
            self._echo_marks()

    def _add_playback(self, frames: list[bytes]) -> None:
        if frames:
            self.playout.add("", frames)
            self._last_seg = self.playout.queue[-1]
            self._pending += len(frames)
            self.stats["frames_received"] += len(frames)
            self._m_received.inc(len(frames))

    def _echo_marks(self) -> None:
        while self._marks:
            name, seg = self._marks[0]
            if seg is not None and seg.played < len(seg.frames):
                return
            self._marks.popleft()
            self._send_mark(name, False)

    def _send_mark(self, name: str, cleared: bool) -> None:
        self.stats["marks"] += 1
        self._marks_queued += 1

        def build(seq: int) -> str:
            self._marks_queued -= 1
            if self.twilio is not None:
                return self.twilio.mark(seq, name)
            return mark_message(seq, self.id, self.call_id, name, cleared)
        self._queue_control(build)

    def _clear(self) -> None:
        if self.playout is not None:
            self.decoder.reset()
            cleared = self.session.media.flush_out() if self.playout.active else 0
            self.playout.flush(cleared)
            self._pending = 0
            self._last_seg = None
        while self._marks:
            name, seg = self._marks.popleft()
            self._send_mark(name, seg is not None and seg.played < len(seg.frames))

    def _mark(self, name: str) -> None:
        if len(self._marks) + self._marks_queued >= MAX_MARKS:
            self.manager.metrics.api_limited.labels("stream_marks").inc()
            raise StreamProtocolError("too_many_marks", f"more than {MAX_MARKS} marks waiting; wait for their "
                                                        "echoes (or send clear)")
        if self.playout is not None:
            self._add_playback(self.decoder.flush())
        seg = self._last_seg
        self._marks.append((name, seg if seg is not None and seg.played < len(seg.frames) else None))
        self._echo_marks()

    def _client_error(self, code: str, message: str) -> None:
        self.stats["client_errors"] += 1
        self.manager.metrics.stream_client_errors.inc()
        if self.twilio is not None:          # Twilio answers a bad message with nothing on the socket
            log.info("stream %s: bad message from the bot: %s: %s", self.id, code, message,
                     extra={"fields": {"call_id": self.call_id, "stream_id": self.id}})
            return
        if self._errors_queued >= MAX_QUEUED_ERRORS:
            return

        def build(seq: int) -> str:
            self._errors_queued -= 1
            return error_message(seq, self.id, self.call_id, code, message)
        self._errors_queued += 1
        self._queue_control(build)

    def on_client_message(self, text: str | bytes) -> None:
        """One message from the consumer; a bad one gets an ``error`` back and the stream goes on."""
        if self._stopping:
            return
        self.stats["messages_received"] += 1
        try:
            if json_too_deep(text):
                raise StreamProtocolError("invalid_json", "not JSON: nested too deeply")
            m = parse_client(text, MAX_MESSAGE)
            if m.event == "media":
                if self.playout is None:
                    raise StreamProtocolError("not_bidirectional", "this stream does not play audio into the call "
                                                                   "(start it with bidirectional: true)")
                frames = self.decoder.decode(m.payload)
                if self._pending + len(frames) > self._max_pending:
                    raise StreamProtocolError("playback_full", f"more than {self.cfg['playback_seconds']:g} s of "
                                                               "audio queued; send clear or wait for a mark")
                self._last_media_at = time.monotonic()
                self._add_playback(frames)
            elif m.event == "clear":
                self._clear()
            else:
                self._mark(m.name)
        except StreamProtocolError as exc:
            self._client_error(exc.code, exc.message)

    def on_dtmf(self, digit: str) -> None:
        """A digit the caller pressed (Twilio protocol only: Trunkline's own streams carry
        audio and the API's ``dtmf_received`` event carries the digits)."""
        if self._stopping or self.twilio is None or self.direction == "out":
            return
        wire = self.twilio
        self._queue_control(lambda seq: wire.dtmf(seq, digit))

    # -- connections ------------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def _send_loop(self, ws, encoders: dict[str, FrameEncoder]) -> None:
        timeout = self.cfg["send_timeout"]
        out = self._out
        wire = self.twilio
        if wire is not None:                 # Twilio: ``connected`` first, with no sequence number
            async with asyncio.timeout(timeout):
                await ws.send_str(wire.connected())
        while True:
            if not out:
                if self._stopping:
                    if wire is not None:
                        text = wire.stop(self._next_seq())
                    else:
                        text = stop_message(self._next_seq(), self.id, self.call_id, self.reason or "stopped",
                                            dict(self.stats))
                    async with asyncio.timeout(timeout):
                        await ws.send_str(text)
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            item = out.popleft()
            if callable(item):
                text = item(self._next_seq())
            else:
                self._media_queued -= 1
                direction, ts, pcm = item
                if wire is not None:
                    text = wire.media(self._next_seq(), direction, ts, encoders[direction].encode(pcm))
                else:
                    text = media_message(self._next_seq(), self.id, self.call_id, direction, ts,
                                         encoders[direction].encode(pcm))
            async with asyncio.timeout(timeout):
                await ws.send_str(text)
            if not callable(item):
                self.stats["frames_sent"] += 1
                self._m_sent.inc()

    async def _recv_loop(self, ws) -> int | None:
        """Read the peer's messages until the connection ends; returns the code of the
        peer's close frame, or None when it ended without one (dropped, or closed by us)."""
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.TEXT:
                self.on_client_message(msg.data)
            elif msg.type == WSMsgType.BINARY:
                self.stats["messages_received"] += 1
                self._client_error("invalid_message", "binary messages are not used: send JSON text")
            elif msg.type == WSMsgType.CLOSE:
                return msg.data
            elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return None

    def _limit_socket_buffer(self, ws) -> None:
        """Size the kernel's send buffer like the stream's own buffer. Left to autotuning
        it grows to megabytes on a fast link, and a stalled consumer would then hide
        behind tens of seconds of audio queued in the kernel before the bridge saw it."""
        sock = ws.get_extra_info("socket")
        if sock is None:
            return
        per_frame = 150 + 4 * {"mulaw": 160, "pcm16": 640, "opus": 60}[self.encoding] // 3   # JSON + base64
        size = max(8192, min(1 << 18, per_frame * self._capacity)) // 2     # Linux doubles what it is given
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        except OSError:
            pass

    async def _serve(self, ws) -> tuple[str, str]:
        """Run one connection until it ends; returns (how, detail): how is ``stopped``
        (we sent ``stop``), ``closed`` (the peer closed it with 1000) or ``lost``."""
        self._ws = ws
        self._limit_socket_buffer(ws)
        self.stats["connections"] += 1
        n = self.stats["connections"]
        self.status = StreamState.STREAMING
        if self.twilio is not None:
            self._queue_control(self.twilio.start, front=True)
        else:
            extra = {"parameters": self.parameters} if self.parameters else None
            self._queue_control(lambda seq: start_message(seq, self.id, self.call_id, self.encoding,
                                                          self.direction, self.bidirectional, n, extra), front=True)
        self._event("stream_started", url=self.url, direction=self.direction, encoding=self.encoding,
                    bidirectional=self.bidirectional, connection=n, protocol=self.protocol)
        encoders = {d: FrameEncoder(self.encoding, self.rate) for d in ("in", "out")}
        sender = asyncio.create_task(self._send_loop(ws, encoders))
        receiver = asyncio.create_task(self._recv_loop(ws))
        try:
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if receiver not in done and not sender.cancelled() and sender.exception() is not None \
                    and not isinstance(sender.exception(), TimeoutError):
                # a write failed: if the peer closed at that moment, its close frame is being
                # answered right now; let the receiver finish reading it
                done |= (await asyncio.wait({receiver}, timeout=0.2))[0]
        finally:
            for t in (sender, receiver):
                t.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
            self._ws = None
        sent = sender in done and not sender.cancelled()
        heard = receiver in done and not receiver.cancelled() and receiver.exception() is None
        how, detail = connection_end(sent, sender.exception() if sent else None,
                                     receiver.result() if heard else None, ws.close_code, self.cfg["send_timeout"])
        try:
            # a graceful close after ``stop``; a lost peer will not answer one (and a
            # cancelled close drops the connection, which is all that is left to do)
            async with asyncio.timeout(2.0 if how == "stopped" else 0.2):
                await ws.close()
        except Exception:  # noqa: BLE001 - the peer may be gone already
            pass
        return how, detail

    async def _run_outbound(self) -> None:
        cfg = self.cfg
        attempt = 0             # connects that failed in a row: ``reconnect_attempts`` of them end the stream
        flaps = 0               # connections in a row the consumer dropped within STABLE_AFTER: they back off
        while not self._stopping:
            try:
                async with asyncio.timeout(cfg["connect_timeout"]):
                    ws = await self.manager.http().ws_connect(self.url, autoping=True, max_msg_size=MAX_MESSAGE)
            except asyncio.CancelledError:
                raise
            except aiohttp.WSServerHandshakeError as exc:
                if 300 <= exc.status < 400 or 400 <= exc.status < 500 and exc.status not in (408, 429):
                    # the consumer said no (wrong path, bad credentials): asking again will not help
                    self.stop("rejected", f"the consumer answered the WebSocket handshake with {exc.status}",
                              failed=True)
                    return
                how, detail = "lost", f"connect failed: handshake answered {exc.status}"
            except Exception as exc:  # noqa: BLE001 - refused, DNS, TLS, timeout
                # the class of failure only: an address or a peer's words never reach the API
                cls = failure_class(exc)
                if cls in ("refused address", "redirect refused", "invalid URL"):
                    self.stop("refused", f"connect failed: {cls}", failed=True)
                    return
                how, detail = "lost", f"connect failed: {cls}"
            else:
                attempt = 0
                up = time.monotonic()
                how, detail = await self._serve(ws)
                flaps = flaps + 1 if time.monotonic() - up < STABLE_AFTER else 0
            if self._stopping:
                return
            if how == "closed":
                self.stop("consumer_closed", detail)
                return
            attempt += 1
            if attempt > cfg["reconnect_attempts"]:
                self.stop("reconnect_exhausted", detail, failed=True)
                return
            # a consumer that takes each connection and drops it at once would otherwise be
            # reconnected every base delay for the whole call (and each one is two events)
            delay = backoff(max(attempt, flaps), cfg["reconnect_base_delay"], cfg["reconnect_max_delay"])
            self.status = StreamState.RECONNECTING
            self.stats["reconnects"] += 1
            self.manager.metrics.stream_reconnects.inc()
            self._event("stream_reconnecting", attempt=attempt, delay=round(delay, 3), detail=detail)
            log.warning("stream %s: %s; reconnect %d in %.2f s", self.id, detail, attempt, delay,
                        extra={"fields": {"call_id": self.call_id, "stream_id": self.id}})
            await asyncio.sleep(delay)

    async def _run_inbound(self) -> None:
        """Watch an inbound stream: a client must be connected, or connect within ``connect_timeout``."""
        timeout = self.cfg["connect_timeout"]
        while not self._stopping:
            self._changed.clear()
            if self._ws is None:
                try:
                    async with asyncio.timeout(timeout):
                        await self._changed.wait()
                except TimeoutError:
                    self.stop("no_client", f"no client connected within {timeout:g} s", failed=True)
                    return
            else:
                await self._changed.wait()

    async def accept(self, request: web.Request) -> web.WebSocketResponse:
        """An inbound client (key already checked): serve it until it or the stream ends."""
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=None)
        await ws.prepare(request)
        if self._stopping:                   # stopped while the handshake went on
            await ws.close()
            return ws
        self._changed.set()
        how, detail = await self._serve(ws)
        self._changed.set()
        if not self._stopping:
            if how == "closed":
                self.stop("client_closed", detail)
            else:
                self.status = StreamState.WAITING
                log.warning("stream %s: %s; waiting for the client", self.id, detail,
                            extra={"fields": {"call_id": self.call_id, "stream_id": self.id}})
        return ws
