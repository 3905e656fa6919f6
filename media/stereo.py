"""Two call legs as one stereo stream: caller left, what the caller heard right.

The cell hands a recording each tick the caller's frames (``inbound``) and
the frames sent to the caller (``outbound``, ``None`` for a silent tick).
The media clock runs rx and tx once per 20 ms, so the i-th frame of each leg
is the same 20 ms; but the asyncio tick can drain between a clock tick's rx
and its tx, leaving one leg a frame ahead for a moment. ``StereoPairer``
keeps that frame for the next tick instead of padding, so the legs stay
sample-aligned. Only when one leg stops outright (hold, a dead stream) for
more than ``hold`` frames is the other paired with silence, to keep time.

Also: interleaving, and the WAV header a stereo recording starts with.

Pure: no clocks, files or threads.
"""
from __future__ import annotations

import struct
from collections import deque

import numpy as np

UNKNOWN_SIZE = 0xFFFFFFFF          # a streamed WAV's sizes are unknown until it ends


def interleave(left: bytes, right: bytes) -> bytes:
    """Two mono s16le frames of the same length as one interleaved stereo frame."""
    out = np.empty(len(left), dtype="<i2")      # 2 channels x len/2 samples
    out[0::2] = np.frombuffer(left, dtype="<i2")
    out[1::2] = np.frombuffer(right, dtype="<i2")
    return out.tobytes()


def split_stereo(pcm: bytes) -> tuple[np.ndarray, np.ndarray]:
    x = np.frombuffer(pcm[:len(pcm) // 4 * 4], dtype="<i2").reshape(-1, 2)
    return x[:, 0], x[:, 1]


class StereoPairer:
    """Pairs inbound and outbound frames across ticks; yields (left, right) mono frames."""

    def __init__(self, frame_bytes: int, hold: int = 5):
        self.frame_bytes = frame_bytes
        self.silence = bytes(frame_bytes)
        self.hold = hold
        self._in: deque = deque()
        self._out: deque = deque()
        self.padded = 0              # frames paired with silence because a leg was missing

    def _fit(self, pcm: bytes | None) -> bytes:
        if pcm is None:
            return self.silence
        n = len(pcm)
        if n == self.frame_bytes:
            return pcm
        return pcm[:self.frame_bytes] if n > self.frame_bytes else pcm + bytes(self.frame_bytes - n)

    def push(self, inbound: list, outbound: list) -> list[tuple[bytes, bytes]]:
        for _, pcm in inbound:
            self._in.append(self._fit(pcm))
        for _, pcm in outbound:
            self._out.append(self._fit(pcm))
        pairs = []
        while self._in and self._out:
            pairs.append((self._in.popleft(), self._out.popleft()))
        while len(self._in) > self.hold:
            pairs.append((self._in.popleft(), self.silence))
            self.padded += 1
        while len(self._out) > self.hold:
            pairs.append((self.silence, self._out.popleft()))
            self.padded += 1
        return pairs

    def drain(self) -> list[tuple[bytes, bytes]]:
        """Whatever is left, paired with silence (at the end of a recording)."""
        pairs = []
        while self._in or self._out:
            pairs.append((self._in.popleft() if self._in else self.silence,
                          self._out.popleft() if self._out else self.silence))
        return pairs


def wav_header(rate: int, channels: int = 2, data_bytes: int | None = None) -> bytes:
    """A 44-byte PCM WAV header; ``data_bytes=None`` writes the streaming 'unknown' sizes."""
    if data_bytes is None:
        riff, data = UNKNOWN_SIZE, UNKNOWN_SIZE
    else:
        riff, data = min(36 + data_bytes, UNKNOWN_SIZE), min(data_bytes, UNKNOWN_SIZE)
    block = 2 * channels
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, 16) +
            b"data" + struct.pack("<I", data))


WAV_HEADER_BYTES = 44


class WavStream:
    """Stereo 16-bit WAV written as it comes: the header first (sizes unknown), then PCM.

    Same interface as ``media.ogg.OggOpusEncoder`` so a recording can use either.
    """

    def __init__(self, rate: int, channels: int = 2):
        self.rate, self.channels = rate, channels
        self.frame_bytes = rate // 50 * 2 * channels

    def header(self) -> bytes:
        return wav_header(self.rate, self.channels)

    def encode(self, pcm: bytes) -> bytes:
        return pcm

    def flush(self) -> bytes:
        return b""

    def close(self) -> bytes:
        return b""
