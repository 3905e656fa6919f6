"""Opus (RFC 6716) for the non-SIP paths: media streams and recordings.

A thin wrapper over opuslib (libopus) that works in whole 20 ms frames of
signed 16-bit little-endian PCM, mono or interleaved stereo, at any rate
libopus accepts (8, 12, 16, 24 or 48 kHz). Bad input raises ``OpusError``
(a ``ValueError``) instead of whatever libopus says.
"""
from __future__ import annotations

RATES = (8000, 12000, 16000, 24000, 48000)
FRAME_MS = 20


class OpusError(ValueError):
    pass


def _lib():
    try:
        import opuslib
    except Exception as exc:  # noqa: BLE001 - libopus0 missing shows up here
        raise OpusError(f"Opus is not available (is libopus0 installed?): {exc}") from None
    return opuslib


class OpusEncoder:
    def __init__(self, rate: int, channels: int = 1, bitrate: int = 0, application: str = "voip"):
        if rate not in RATES:
            raise OpusError(f"Opus cannot run at {rate} Hz (choose one of {RATES})")
        if channels not in (1, 2):
            raise OpusError("Opus frames here are mono or stereo")
        opuslib = _lib()
        self.rate, self.channels = rate, channels
        self.samples = rate * FRAME_MS // 1000
        self.frame_bytes = self.samples * 2 * channels
        self._enc = opuslib.Encoder(rate, channels, application)
        if bitrate:
            self._enc.bitrate = bitrate

    def encode(self, pcm: bytes) -> bytes:
        if len(pcm) != self.frame_bytes:
            raise OpusError(f"an Opus frame is {self.frame_bytes} bytes of PCM here, got {len(pcm)}")
        return self._enc.encode(pcm, self.samples)


class OpusDecoder:
    def __init__(self, rate: int, channels: int = 1):
        if rate not in RATES:
            raise OpusError(f"Opus cannot run at {rate} Hz (choose one of {RATES})")
        opuslib = _lib()
        self.rate, self.channels = rate, channels
        self.samples = rate * FRAME_MS // 1000
        self._dec = opuslib.Decoder(rate, channels)

    def decode(self, packet: bytes) -> bytes:
        """One packet to PCM (20 ms, or whatever duration the packet holds, up to 120 ms)."""
        if not packet:
            raise OpusError("empty Opus packet")
        try:
            return self._dec.decode(packet, self.rate * 120 // 1000)
        except Exception as exc:  # noqa: BLE001 - opuslib.OpusError and friends
            raise OpusError(f"not a valid Opus packet: {exc}") from None

    def conceal(self) -> bytes:
        """One frame of packet-loss concealment."""
        return self._dec.decode(b"", self.samples)
