"""Cutting a token stream into sentences for TTS, as the tokens arrive."""
from __future__ import annotations

import re

_ABBREV = {"mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "inc", "ltd", "no", "approx"}
_END = re.compile(r"([.!?…]+)[\"')\]]*\s")


class SentenceCutter:
    """``feed(token)`` returns the sentences completed by that token.

    The first cut of a reply may happen at a comma or dash once ``first_min``
    words are in, so speech can start before a long first sentence is done.
    Decimals ("3.5"), abbreviations ("Dr. Smith") and times ("9 a.m.") do
    not end a sentence.
    """

    def __init__(self, first_min: int = 4, max_words: int = 40):
        self.buf = ""
        self.first_min = first_min
        self.max_words = max_words
        self.emitted = 0

    def feed(self, token: str) -> list[str]:
        self.buf += token
        out = []
        while True:
            s = self._cut()
            if s is None:
                return out
            out.append(s)

    def flush(self) -> list[str]:
        rest = self.buf.strip()
        self.buf = ""
        if rest:
            self.emitted += 1
            return [rest]
        return []

    def _cut(self) -> str | None:
        for m in _END.finditer(self.buf):
            head = self.buf[:m.start()]
            last = head.split()[-1].lower() if head.split() else ""
            if m.group(1) == "." and (last.rstrip(".") in _ABBREV or re.fullmatch(r"(?:[a-z]\.)+[a-z]?", last + ".")):
                continue
            return self._take(m.end())
        words = self.buf.split()
        if self.emitted == 0 and len(words) > self.first_min:
            for m in re.finditer(r"[,;:—–]\s", self.buf):
                if len(self.buf[:m.start()].split()) >= self.first_min:
                    return self._take(m.end())
        if len(words) > self.max_words:
            cut = self.buf.rfind(" ", 0, len(self.buf) - 1)
            return self._take(cut + 1) if cut > 0 else None
        return None

    def _take(self, end: int) -> str | None:
        s, self.buf = self.buf[:end].strip(), self.buf[end:]
        if not s:
            return None
        self.emitted += 1
        return s


def clean_for_speech(text: str) -> str:
    """Drop markup an LLM likes to emit that a voice should not read out."""
    text = re.sub(r"[*_#`>\[\]]+", "", text)
    text = re.sub(r"\s+", " ", text)
    return text.strip()
