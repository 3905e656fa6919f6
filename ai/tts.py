"""Text to speech with Piper, on an onnxruntime session we build ourselves
(``PiperVoice.load`` would let onnxruntime take every core)."""
from __future__ import annotations

import ctypes
import json
import os
from typing import Iterator

# onnxruntime (1.32 on Linux) sends usage telemetry to mobile.events.data.microsoft.com unless this is
# set before its environment starts: nothing may leave the box (tests/test_offline.py catches it).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


MAX_WORDS = 40        # per sentence Piper runs; the agent cuts its own sentences at 40 words too
KEEP_PHONEMES = 200   # onnxruntime keeps its arena after a run of up to this many phoneme ids (~15 words)
_ENDS = (".", "!", "?", "…")


def pieces(text: str, max_words: int = MAX_WORDS) -> list[str]:
    """``text`` cut only where a run of more than ``max_words`` words has no sentence end (at its
    last comma inside the limit, else at the limit); Piper splits the pieces into sentences itself.
    onnxruntime's memory arena keeps the high-water mark of the longest input it ever ran
    (measured with the bundled voice: 136 MB after loading, 414 MB after one 60-word sentence,
    705 MB after 120 words, for good), and an API ``say`` text without punctuation would
    otherwise be one sentence of up to 2,000 characters."""
    words = text.split()
    out: list[str] = []
    start = run = 0                      # the current piece's first word; the current sentence's first
    for i, w in enumerate(words):
        if i - run + 1 > max_words:      # this word would make the sentence too long: cut before it
            commas = [j + 1 for j in range(run, i) if words[j].endswith(",") and j + 1 - run >= max_words // 2]
            cut = commas[-1] if commas else i
            out.append(" ".join(words[start:cut]))
            start = run = cut
        if w.endswith(_ENDS):
            run = i + 1
    if start < len(words):
        out.append(" ".join(words[start:]))
    return out


try:
    _TRIM = ctypes.CDLL(None).malloc_trim       # glibc
except (OSError, AttributeError):               # another libc: nothing to trim
    _TRIM = None


def _malloc_trim() -> None:
    if _TRIM is not None:
        _TRIM(0)


class ArenaSession:
    """Piper's onnxruntime session, giving its memory back after a long input.

    onnxruntime's CPU arena keeps the high-water mark of the longest input ever run, so without
    this an inference process grows in steps for hours (the bundled voice: 136 MB after loading,
    ~430 MB after one 40-word sentence and ~570 MB after twenty different ones; the kept and
    shrunk arenas side by side: ``tests/bench/ttsmem.py``). A run of more than ``keep`` phoneme ids shrinks the arena when it
    ends, and ``malloc_trim`` hands the freed pages back (glibc keeps them otherwise). The trim
    works on the whole process: it locks each malloc arena in turn, so whisper's and llama.cpp's
    threads may wait for it briefly, and it returns their free pages too. Shorter runs, most of
    an agent's sentences, reuse the arena and pay nothing. Shrinking after every run would keep
    the voice near its load size but costs ~30 ms on a 12-word sentence (ttsmem: 139 vs 108 ms). The session must have its
    arena on (onnxruntime refuses a shrink otherwise); PiperTTS builds it so."""

    def __init__(self, session, keep: int = KEEP_PHONEMES):
        import onnxruntime
        self.session, self.keep, self.shrinks = session, keep, 0
        self.shrink = onnxruntime.RunOptions()
        self.shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def __getattr__(self, name):
        if name == "session":                   # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.session, name)

    def run(self, output_names, input_feed, run_options=None):
        ids = input_feed.get("input")
        if run_options is not None or ids is None or ids.shape[-1] <= self.keep:
            return self.session.run(output_names, input_feed, run_options)
        out = self.session.run(output_names, input_feed, self.shrink)
        self.shrinks += 1
        _malloc_trim()
        return out


class PiperTTS:
    def __init__(self, model: str, config: str, threads: int = 1, length_scale: float | None = None):
        import onnxruntime
        from piper.config import PiperConfig, SynthesisConfig
        from piper.voice import PiperVoice
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        session = onnxruntime.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
        with open(config, encoding="utf-8") as f:
            cfg = PiperConfig.from_dict(json.load(f))
        self.voice = PiperVoice(session=ArenaSession(session), config=cfg)
        self.rate = cfg.sample_rate
        self.syn = SynthesisConfig(length_scale=length_scale)

    def synthesize(self, text: str) -> Iterator[bytes]:
        """Mono s16le chunks at ``self.rate``, one per sentence (of at most MAX_WORDS words) in ``text``."""
        for piece in pieces(text):
            for chunk in self.voice.synthesize(piece, self.syn):
                yield chunk.audio_int16_bytes
