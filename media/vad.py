"""Frame-level voice activity: WebRTC VAD, gated by energy, with DTMF vetoed.

Telephone audio has G.711 quantisation noise and line hiss that WebRTC's VAD
(in its aggressive modes) mostly rejects; an energy floor drops what it
still lets through, and DTMF tones, which it calls speech, are vetoed.
"""
from __future__ import annotations

import numpy as np

from media import dtmf


def rms_dbfs(pcm: bytes) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    if x.size == 0:
        return -120.0
    r = float(np.sqrt(np.dot(x, x) / x.size))
    return 20 * np.log10(max(r, 1e-3) / 32768.0)


class VoiceDetector:
    def __init__(self, rate: int, mode: int = 3, floor_dbfs: float = -45.0):
        import webrtcvad
        if rate not in (8000, 16000, 32000, 48000):
            raise ValueError(f"VAD needs 8/16/32/48 kHz, not {rate}")
        self.rate = rate
        self.vad = webrtcvad.Vad(mode)
        self.floor = floor_dbfs
        self.last_level = -120.0
        self.last_dtmf: str | None = None

    def is_speech(self, pcm: bytes) -> bool:
        self.last_level = level = rms_dbfs(pcm)
        self.last_dtmf = None
        if level < self.floor:
            return False
        if not self.vad.is_speech(pcm, self.rate):
            return False
        self.last_dtmf = dtmf.detect(pcm, self.rate)
        return self.last_dtmf is None
