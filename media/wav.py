"""Read WAV prompts into mono signed 16-bit PCM at a chosen rate."""
from __future__ import annotations

import wave

import numpy as np

from media._audioop import audioop
from media.resample import resample


class WavError(ValueError):
    pass


def read_wav(path: str, rate: int | None = None) -> tuple[bytes, int]:
    """Return (pcm, rate): mono s16le, resampled to ``rate`` when given.

    Accepts 8/16/24/32-bit PCM, any channel count (mixed down). Anything else
    raises ``WavError`` with the reason.
    """
    try:
        with wave.open(path, "rb") as w:
            channels, width, src_rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            data = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise WavError(f"{path}: not a PCM WAV file ({exc})") from exc
    except OSError as exc:
        raise WavError(f"{path}: {exc.strerror or exc}") from exc
    if width not in (1, 2, 3, 4):
        raise WavError(f"{path}: unsupported sample width {width}")
    if width == 1:
        data = audioop.bias(data, 1, -128)  # WAV 8-bit is unsigned
    if width != 2:
        data = audioop.lin2lin(data, width, 2)
    if channels > 1:
        x = np.frombuffer(data, dtype="<i2").reshape(-1, channels).astype(np.int32)
        data = (x.sum(axis=1) // channels).astype("<i2").tobytes()
    if rate and rate != src_rate:
        data = resample(data, src_rate, rate)
        src_rate = rate
    return data, src_rate


def write_wav(path: str, pcm: bytes, rate: int, channels: int = 1) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
