"""Media streams on the wire: per-encoding frame codecs and the JSON messages.

Pure (no sockets, threads or clocks): ``bridge/api/streams.py`` feeds this the
call's 20 ms frames and the client's text messages and sends what comes back.

Encodings, one 20 ms frame per ``media`` message from the bridge:

- ``mulaw``: G.711 µ-law at 8 kHz, 160 bytes (what telephony AI services expect);
- ``pcm16``: signed 16-bit little-endian linear PCM at 16 kHz, 640 bytes;
- ``opus``: one Opus packet of 20 ms at 16 kHz (RFC 6716), a few dozen bytes.

The call runs at its own clock rate (``media.clock_rate``), so frames are
resampled with stateful ``Resampler``s: a stream is converted chunk by chunk
with no clicks at the joins. Client audio may come in chunks of any length
(Opus: one packet per message); it is decoded, resampled to the call's rate
and cut into whole 20 ms frames, a partial frame waiting for the next chunk.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from media import g711
from media.frames import FRAME_MS, bytes_per_frame, samples_per_frame
from media.opus import OpusDecoder, OpusEncoder, OpusError
from media.resample import Resampler

# encoding -> sample rate on the wire
ENCODINGS = {"mulaw": 8000, "pcm16": 16000, "opus": 16000}
DIRECTIONS = ("in", "out", "both")
CLIENT_EVENTS = ("media", "clear", "mark")
MAX_MARK_NAME = 256


class StreamProtocolError(ValueError):
    """A client message the bridge cannot use; ``code`` goes back in the ``error`` message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _check_encoding(encoding: str) -> int:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r} (known: {', '.join(ENCODINGS)})")
    return ENCODINGS[encoding]


class FrameEncoder:
    """Call-rate 20 ms PCM frames to payloads in one encoding, one payload per frame.

    Stateful (resampler history, Opus predictor), so one per direction of a
    stream and a fresh one per connection. ``None`` (a tick that sent the
    caller nothing) encodes as silence, keeping the wire's 20 ms cadence.
    """

    def __init__(self, encoding: str, call_rate: int):
        self.encoding = encoding
        self.rate = _check_encoding(encoding)
        self.call_rate = call_rate
        self._silence = bytes(bytes_per_frame(call_rate))
        self._resampler = Resampler(call_rate, self.rate) if call_rate != self.rate else None
        self._frame_bytes = bytes_per_frame(self.rate)
        self._carry = b""
        self._opus = OpusEncoder(self.rate) if encoding == "opus" else None

    def _exact(self, pcm: bytes) -> bytes:
        """Exactly one wire frame of PCM: up-sampling by a fraction gives one
        sample less on the very first chunk, so the first frame is padded at the
        front; any extra sample is carried to the next frame. A frame of another
        size is padded or carried the same way (a media message to a bot always
        holds 20 ms: an empty payload broke Twilio's format)."""
        if self._resampler is None:
            if len(pcm) == self._frame_bytes and not self._carry:
                return pcm
            buf = self._carry + pcm                # an odd-sized frame (none at all: silence) still
        else:                                      # makes exactly one wire frame
            buf = self._carry + self._resampler.process(pcm)
        if len(buf) < self._frame_bytes:
            buf = bytes(self._frame_bytes - len(buf)) + buf
        self._carry = buf[self._frame_bytes:2 * self._frame_bytes]     # bounded: at most a frame waits
        return buf[:self._frame_bytes]

    def encode(self, pcm: bytes | None) -> bytes:
        wire = self._exact(self._silence if pcm is None else pcm)
        if self.encoding == "mulaw":
            return g711.ulaw_encode(wire)
        if self._opus is not None:
            return self._opus.encode(wire)
        return wire


class FrameDecoder:
    """Client payloads (any length) to call-rate 20 ms frames."""

    def __init__(self, encoding: str, call_rate: int):
        self.encoding = encoding
        self.rate = _check_encoding(encoding)
        self.call_rate = call_rate
        self.frame_bytes = bytes_per_frame(call_rate)
        self.reset()

    def reset(self) -> None:
        """Forget partial audio and codec state (after a ``clear``)."""
        self._resampler = Resampler(self.rate, self.call_rate) if self.rate != self.call_rate else None
        self._opus = OpusDecoder(self.rate) if self.encoding == "opus" else None
        self._buf = b""

    @property
    def pending(self) -> int:
        """Bytes of call-rate PCM waiting to make a whole frame."""
        return len(self._buf)

    def pcm(self, payload: bytes) -> bytes:
        """One payload to PCM at the encoding's rate; raises StreamProtocolError."""
        if not payload:
            raise StreamProtocolError("invalid_payload", "empty media payload")
        if self.encoding == "mulaw":
            return g711.ulaw_decode(payload)
        if self.encoding == "pcm16":
            if len(payload) % 2:
                raise StreamProtocolError("invalid_payload", "pcm16 payload is not whole 16-bit samples")
            return payload
        try:
            return self._opus.decode(payload)
        except OpusError as exc:
            raise StreamProtocolError("invalid_payload", str(exc)) from None

    def decode(self, payload: bytes) -> list[bytes]:
        """Whole call-rate frames now available; a partial frame waits for more."""
        pcm = self.pcm(payload)
        if self._resampler is not None:
            pcm = self._resampler.process(pcm)
        self._buf += pcm
        n = len(self._buf) // self.frame_bytes
        frames = [self._buf[i * self.frame_bytes:(i + 1) * self.frame_bytes] for i in range(n)]
        self._buf = self._buf[n * self.frame_bytes:]
        return frames

    def flush(self) -> list[bytes]:
        """The partial frame, padded with silence (before a mark, or when the client pauses)."""
        if not self._buf:
            return []
        frame = self._buf + bytes(self.frame_bytes - len(self._buf))
        self._buf = b""
        return [frame]


class MediaClock:
    """Media timestamps: milliseconds since the stream's first frame, on the 20 ms grid.

    Each frame carries the clock-thread time it was taken at. Consecutive
    frames of one direction differ by exactly 20 ms; a longer step means the
    media clock really paused (or frames were dropped before the stream saw
    them). Clock jitter never makes a timestamp repeat or go back.
    """

    def __init__(self):
        self.t0: float | None = None
        self._last: dict[str, int] = {}

    def stamp(self, direction: str, t: float) -> int:
        if self.t0 is None:
            self.t0 = t
        grid = FRAME_MS * round((t - self.t0) * 1000 / FRAME_MS)
        last = self._last.get(direction)
        ts = grid if last is None else max(last + FRAME_MS, grid)
        self._last[direction] = ts
        return ts


# -- messages from the bridge ---------------------------------------------------------
def start_message(seq: int, stream_id: str, call_id: str, encoding: str, direction: str,
                  bidirectional: bool, connection: int = 1, extra: dict | None = None) -> str:
    rate = _check_encoding(encoding)
    return json.dumps({"event": "start", "sequence_number": seq, "stream_id": stream_id, "call_id": call_id,
                       "start": {"direction": direction, "bidirectional": bidirectional, "connection": connection,
                                 "media_format": {"encoding": encoding, "sample_rate": rate, "channels": 1,
                                                  "frame_ms": FRAME_MS, "frame_samples": samples_per_frame(rate)},
                                 **(extra or {})}})


def media_message(seq: int, stream_id: str, call_id: str, direction: str, timestamp: int, payload: bytes) -> str:
    # Built by hand: this runs 50-100 times a second per stream, and every field is
    # a number or a JSON-safe token (ids are [a-z0-9_], base64 needs no escaping).
    b64 = base64.b64encode(payload).decode("ascii")
    return (f'{{"event":"media","sequence_number":{seq},"stream_id":"{stream_id}","call_id":"{call_id}",'
            f'"media":{{"direction":"{direction}","timestamp":{timestamp},"payload":"{b64}"}}}}')


def mark_message(seq: int, stream_id: str, call_id: str, name: str, cleared: bool = False) -> str:
    return json.dumps({"event": "mark", "sequence_number": seq, "stream_id": stream_id, "call_id": call_id,
                       "mark": {"name": name, "cleared": cleared}})


def stop_message(seq: int, stream_id: str, call_id: str, reason: str, stats: dict | None = None) -> str:
    return json.dumps({"event": "stop", "sequence_number": seq, "stream_id": stream_id, "call_id": call_id,
                       "stop": {"reason": reason, "stats": stats or {}}})


def error_message(seq: int, stream_id: str, call_id: str, code: str, message: str) -> str:
    return json.dumps({"event": "error", "sequence_number": seq, "stream_id": stream_id, "call_id": call_id,
                       "error": {"code": code, "message": message}})


# -- messages from the client -----------------------------------------------------------
@dataclass
class ClientMessage:
    event: str
    payload: bytes = b""       # media: decoded base64
    name: str = ""             # mark


def parse_client(text: str | bytes, max_payload: int = 1 << 20) -> ClientMessage:
    """One text message from the client; raises StreamProtocolError saying what is wrong.

    ``{"event":"media","media":{"payload":"<base64>"}}``, ``{"event":"clear"}``,
    ``{"event":"mark","mark":{"name":"..."}}``. Other fields (``stream_id``,
    ``sequence_number``) are accepted and ignored, as hosted APIs' clients send them.
    """
    try:
        m = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StreamProtocolError("invalid_json", f"not JSON: {exc}") from None
    if not isinstance(m, dict) or not isinstance(m.get("event"), str):
        raise StreamProtocolError("invalid_message", "expected a JSON object with an \"event\"")
    event = m["event"]
    if event not in CLIENT_EVENTS:
        raise StreamProtocolError("unknown_event", f"unknown event {event!r} (expected one of {', '.join(CLIENT_EVENTS)})")
    if event == "media":
        media = m.get("media")
        b64 = media.get("payload") if isinstance(media, dict) else None
        if not isinstance(b64, str):
            raise StreamProtocolError("invalid_message", "media needs media.payload (base64)")
        if len(b64) > max_payload * 4 // 3 + 4:
            raise StreamProtocolError("payload_too_large", f"a media payload is at most {max_payload} bytes")
        try:
            payload = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise StreamProtocolError("invalid_payload", "media.payload is not valid base64") from None
        return ClientMessage("media", payload=payload)
    if event == "mark":
        mark = m.get("mark")
        name = mark.get("name") if isinstance(mark, dict) else None
        if not isinstance(name, str) or not 0 < len(name) <= MAX_MARK_NAME:
            raise StreamProtocolError("invalid_message", f"mark needs mark.name (1..{MAX_MARK_NAME} characters)")
        return ClientMessage("mark", name=name)
    return ClientMessage("clear")
