"""Stored caller speech and its transcript for agent tests (tests/fixtures/): no model at import."""
from __future__ import annotations

import functools
import json
import math
import wave
from pathlib import Path

import numpy as np

from media.frames import split_frames
from media.resample import resample

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SENTENCE = "book_cleaning_16k.wav"


@functools.lru_cache(maxsize=8)
def speech(name: str = SENTENCE, rate: int = 8000) -> bytes:
    """The stored utterance as 16-bit mono PCM at ``rate``."""
    with wave.open(str(FIXTURES / name), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm, src = w.readframes(w.getnframes()), w.getframerate()
    return pcm if src == rate else resample(pcm, src, rate)


def speech_frames(name: str = SENTENCE, rate: int = 8000) -> list[bytes]:
    return split_frames(speech(name, rate), rate)


def transcript(name: str = SENTENCE) -> dict:
    """What whisper made of ``name`` (text, no_speech, logprob, audio_s, seconds)."""
    return json.loads((FIXTURES / "transcripts.json").read_text())[name]


def spoken(text: str, rate: int = 8000, per_char: float = 0.06) -> bytes:
    """Stand-in TTS audio for ``text``: a quiet two-tone of about the length Piper would make."""
    n = int(rate * per_char * max(1, len(text)))
    t = np.arange(n) / rate
    x = 3000 * np.sin(2 * math.pi * 220 * t) + 1500 * np.sin(2 * math.pi * 330 * t)
    return x.astype("<i2").tobytes()
