"""Speech to text with faster-whisper (CTranslate2)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Transcript:
    text: str
    no_speech_prob: float
    avg_logprob: float
    audio_seconds: float
    seconds: float            # wall time spent decoding

    @property
    def rtf(self) -> float:
        return self.seconds / self.audio_seconds if self.audio_seconds else 0.0

    def unclear(self, no_speech: float = 0.6, min_logprob: float = -1.0) -> bool:
        """Nothing usable was heard: empty, likely silence, or very low confidence."""
        return (not self.text.strip() or self.no_speech_prob > no_speech or self.avg_logprob < min_logprob)


class WhisperSTT:
    def __init__(self, model_dir: str, threads: int = 2, compute_type: str = "int8",
                 language: str | None = "en", beam_size: int = 1):
        from faster_whisper import WhisperModel
        self.model = WhisperModel(str(model_dir), device="cpu", compute_type=compute_type,
                                  cpu_threads=threads, num_workers=1)
        self.language = language
        self.beam_size = beam_size

    def warm(self) -> None:
        """One decode of a second of silence: CTranslate2 allocates its buffers and threads on the
        first one (~57 MB and ~70 ms here), which would otherwise land on the first caller's turn
        after every (re)start of the inference process, and look like growth to a soak."""
        self.transcribe(bytes(32000))

    def transcribe(self, pcm16k: bytes, prompt: str | None = None, language: str | None = None) -> Transcript:
        """Decode mono s16le 16 kHz audio (in ``language``, else the one it was made with)."""
        start = time.perf_counter()
        audio = np.frombuffer(pcm16k, dtype="<i2").astype(np.float32) / 32768.0
        segments, _info = self.model.transcribe(
            audio, language=language or self.language, beam_size=self.beam_size, vad_filter=False,
            condition_on_previous_text=False, without_timestamps=True, initial_prompt=prompt,
            temperature=0.0)
        texts, nsp, lp = [], [], []
        for s in segments:
            texts.append(s.text)
            nsp.append(s.no_speech_prob)
            lp.append(s.avg_logprob)
        return Transcript(
            text=" ".join(t.strip() for t in texts).strip(),
            no_speech_prob=max(nsp) if nsp else 1.0,
            avg_logprob=min(lp) if lp else -10.0,
            audio_seconds=audio.size / 16000,
            seconds=time.perf_counter() - start,
        )
