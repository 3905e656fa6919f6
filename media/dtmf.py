"""DTMF tone detection (Goertzel) on 20 ms PCM frames.

Voice-activity detectors call DTMF tones speech; this tells the two apart so
a caller keying digits does not barge in or open a turn.
"""
from __future__ import annotations

import functools
import math

import numpy as np

LOW = (697, 770, 852, 941)
HIGH = (1209, 1336, 1477, 1633)
KEYS = ("123A", "456B", "789C", "*0#D")


@functools.lru_cache(maxsize=16)
def _basis(n: int, rate: int, freqs: tuple) -> np.ndarray:
    """One complex exponential per tone, built once per frame size and rate (this runs per frame)."""
    t = np.arange(n)
    return np.exp(-1j * 2 * math.pi * np.outer(freqs, t) / rate)


def _powers(x: np.ndarray, rate: int, freqs) -> np.ndarray:
    return np.abs(_basis(x.size, rate, tuple(freqs)) @ x) ** 2 / x.size


def detect(pcm: bytes, rate: int) -> str | None:
    """The DTMF key in this frame, or None. Needs both tones clearly above the rest."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    if x.size < 64:
        return None
    energy = float(np.dot(x, x)) / x.size
    if energy < 1e4:                      # quieter than about -35 dBFS
        return None
    lo, hi = _powers(x, rate, LOW), _powers(x, rate, HIGH)
    li, hi_i = int(np.argmax(lo)), int(np.argmax(hi))
    # the two tones carry most of the energy (a sine's Goertzel power is n*A^2/4 / n ≈ energy/2)
    if (lo[li] + hi[hi_i]) < 0.5 * energy:
        return None
    if np.sort(lo)[-2] > 0.1 * lo[li] or np.sort(hi)[-2] > 0.1 * hi[hi_i]:
        return None
    return KEYS[li][hi_i]
