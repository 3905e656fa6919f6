"""G.711 µ-law / A-law for the non-SIP paths (recordings, media streams, tests).

On calls, pjmedia does the codec work; this is for audio that leaves or
enters the bridge some other way, and for checking what went over the wire.
"""
from __future__ import annotations

from media._audioop import audioop


PAYLOAD_TYPES = {0: "PCMU", 8: "PCMA"}


def ulaw_encode(pcm: bytes) -> bytes:
    return audioop.lin2ulaw(pcm, 2)


def ulaw_decode(data: bytes) -> bytes:
    return audioop.ulaw2lin(data, 2)


def alaw_encode(pcm: bytes) -> bytes:
    return audioop.lin2alaw(pcm, 2)


def alaw_decode(data: bytes) -> bytes:
    return audioop.alaw2lin(data, 2)


def decode(payload_type: int, data: bytes) -> bytes:
    if payload_type == 0:
        return ulaw_decode(data)
    if payload_type == 8:
        return alaw_decode(data)
    raise ValueError(f"not a G.711 payload type: {payload_type}")


def encode(payload_type: int, pcm: bytes) -> bytes:
    if payload_type == 0:
        return ulaw_encode(pcm)
    if payload_type == 8:
        return alaw_encode(pcm)
    raise ValueError(f"not a G.711 payload type: {payload_type}")
