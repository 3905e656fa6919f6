"""Loudness normalisation for synthesized speech before it goes on the line."""
from __future__ import annotations

import numpy as np


def normalize(pcm: bytes, target_dbfs: float = -18.0, peak: float = 0.89) -> bytes:
    """Scale to ``target_dbfs`` RMS (speech-active samples), never past ``peak`` full scale."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    if x.size == 0:
        return pcm
    active = x[np.abs(x) > 100]
    if active.size == 0:
        return pcm
    rms = np.sqrt(np.mean(active ** 2))
    gain = (32768.0 * 10 ** (target_dbfs / 20)) / rms
    top = np.max(np.abs(x))
    gain = min(gain, peak * 32767.0 / top)
    return np.clip(np.round(x * gain), -32768, 32767).astype("<i2").tobytes()
