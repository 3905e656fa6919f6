"""Sample-rate conversion for mono signed 16-bit PCM.

``Resampler`` is stateful so a stream can be converted chunk by chunk with no
clicks at the joins: when going down in rate it first low-passes with a
windowed-sinc FIR (Hann, cut-off just under the new Nyquist) so speech above
4 kHz does not alias into the telephone band, then interpolates at the new
rate carrying the fractional read position from chunk to chunk.
"""
from __future__ import annotations

import numpy as np


def _lowpass(cutoff: float, taps: int) -> np.ndarray:
    """FIR low-pass; ``cutoff`` as a fraction of the input sample rate (0..0.5)."""
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hanning(taps)
    return h / h.sum()


class Resampler:
    def __init__(self, src_rate: int, dst_rate: int, taps: int = 63):
        if src_rate <= 0 or dst_rate <= 0:
            raise ValueError("sample rates must be positive")
        self.src_rate = src_rate
        self.dst_rate = dst_rate
        self.step = src_rate / dst_rate          # input samples per output sample
        self._fir = _lowpass(0.45 * dst_rate / src_rate, taps) if dst_rate < src_rate else None
        self._fir_tail = np.zeros((taps - 1) if self._fir is not None else 0)
        self._prev = 0.0       # last filtered input sample of the previous chunk
        self._pos = 0.0        # read position relative to the start of the next chunk (>= -1)

    def process(self, pcm: bytes) -> bytes:
        if self.src_rate == self.dst_rate:
            return pcm
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
        if x.size == 0:
            return b""
        if self._fir is not None:
            padded = np.concatenate([self._fir_tail, x])
            self._fir_tail = padded[-(self._fir.size - 1):]
            x = np.convolve(padded, self._fir, mode="valid")
        # Work on [prev, x...] so position -1 is the previous chunk's last sample.
        ext = np.concatenate([[self._prev], x])
        last = x.size - 1                          # highest readable position
        count = int(np.floor((last - self._pos) / self.step)) + 1 if self._pos <= last else 0
        if count > 0:
            positions = self._pos + self.step * np.arange(count)
            y = np.interp(positions + 1, np.arange(ext.size), ext)
            self._pos = positions[-1] + self.step - x.size
        else:
            y = np.zeros(0)
            self._pos -= x.size
        self._prev = float(x[-1])
        return np.clip(np.round(y), -32768, 32767).astype("<i2").tobytes()


def resample(pcm: bytes, src_rate: int, dst_rate: int) -> bytes:
    """One-shot conversion of a whole buffer."""
    return Resampler(src_rate, dst_rate).process(pcm)
