"""Twilio Media Streams on the wire: the bidirectional protocol as Twilio documents it.

Pure (no sockets, clocks or ids drawn here): ``bridge/api/streams.py`` asks a
``TwilioWire`` for the text of each message and hands it what the bot sends.

From the bridge, in this order on every connection: ``connected`` (the only
message without a ``sequenceNumber``), ``start``, then ``media`` (base64 µ-law,
8 kHz, one 20 ms frame each; ``chunk`` counts a track's frames from 1,
``timestamp`` is milliseconds since the stream's first frame), ``dtmf``,
``mark`` (an echo) and finally ``stop``. Every number Twilio sends as a string
(``sequenceNumber``, ``chunk``, ``timestamp``) is a string here too.

From the bot: ``media`` (``media.payload``, base64 µ-law 8 kHz, any length),
``mark`` (``mark.name``) and ``clear``; ``streamSid`` and other fields are
accepted and ignored: they are the messages ``streamcodec.parse_client`` reads.
Twilio answers a bad message with nothing on the socket (it goes to its
debugger), so the wire has no ``error`` message.
"""
from __future__ import annotations

import base64
import hashlib
import json

PROTOCOLS = ("trunkline", "twilio")
ENCODING = "mulaw"                       # the only encoding Twilio Media Streams carry
MEDIA_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
TRACKS = {"in": ["inbound"], "out": ["outbound"], "both": ["inbound", "outbound"]}
TRACK = {"in": "inbound", "out": "outbound"}
DEFAULT_ACCOUNT_SID = "AC" + "0" * 32


def sid(prefix: str, source: str) -> str:
    """A Twilio-shaped SID (two letters and 32 hex digits) derived from ``source``."""
    return prefix + hashlib.sha256(source.encode()).hexdigest()[:32]


def call_sid(call_id: str) -> str:
    """A call's ``callSid``: Twilio-shaped (``CA`` and 32 hex digits) and safe in a URL path,
    which a SIP Call-ID (the Trunkline call id of an inbound call) need not be."""
    return sid("CA", call_id)


def _dumps(m: dict) -> str:
    return json.dumps(m, separators=(",", ":"))


class TwilioWire:
    """The messages of one Twilio stream; keeps each track's ``chunk`` count (across reconnects,
    like the sequence numbers and timestamps)."""

    def __init__(self, stream_sid: str, call_sid: str, account_sid: str, direction: str,
                 custom: dict[str, str] | None = None):
        if direction not in TRACKS:
            raise ValueError(f"unknown direction {direction!r}")
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self.account_sid = account_sid
        self.tracks = list(TRACKS[direction])
        self.custom = dict(custom or {})
        self._chunks = {"in": 0, "out": 0}

    def connected(self) -> str:
        return _dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start(self, seq: int) -> str:
        return _dumps({"event": "start", "sequenceNumber": str(seq),
                       "start": {"accountSid": self.account_sid, "streamSid": self.stream_sid,
                                 "callSid": self.call_sid, "tracks": self.tracks,
                                 "customParameters": self.custom, "mediaFormat": dict(MEDIA_FORMAT)},
                       "streamSid": self.stream_sid})

    def media(self, seq: int, direction: str, timestamp: int, payload: bytes) -> str:
        # by hand, as in streamcodec.media_message: 50-100 a second per stream, every field JSON-safe
        self._chunks[direction] += 1
        b64 = base64.b64encode(payload).decode("ascii")
        return (f'{{"event":"media","sequenceNumber":"{seq}","media":{{"track":"{TRACK[direction]}",'
                f'"chunk":"{self._chunks[direction]}","timestamp":"{timestamp}","payload":"{b64}"}},'
                f'"streamSid":"{self.stream_sid}"}}')

    def dtmf(self, seq: int, digit: str) -> str:
        return _dumps({"event": "dtmf", "streamSid": self.stream_sid, "sequenceNumber": str(seq),
                       "dtmf": {"track": "inbound_track", "digit": digit}})

    def mark(self, seq: int, name: str) -> str:
        return _dumps({"event": "mark", "sequenceNumber": str(seq), "streamSid": self.stream_sid,
                       "mark": {"name": name}})

    def stop(self, seq: int) -> str:
        return _dumps({"event": "stop", "sequenceNumber": str(seq), "streamSid": self.stream_sid,
                       "stop": {"accountSid": self.account_sid, "callSid": self.call_sid}})
