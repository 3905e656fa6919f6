"""End-of-turn detection from per-frame voice decisions.

Feed ``push(voiced, now)`` once per 20 ms frame. It returns at most one event:

- ``"start"``: ``min_speech`` seconds of voice within the last ``start_window``
  (short clicks and noise bursts do not start a turn);
- ``"pause"``: the caller has been quiet for ``pause`` seconds (a good moment
  for a speculative decode);
- ``"end"``: quiet for the silence window: the turn is over;
- ``"noise"``: what started was shorter than ``min_utterance`` when it ended.

The silence window can be stretched for the current turn with ``extend()``,
e.g. while the caller is reading out digits one by one.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass
class EndpointConfig:
    min_speech: float = 0.12        # voiced time needed to call it speech
    start_window: float = 0.20
    pause: float = 0.25             # quiet time that triggers a speculative decode
    silence: float = 0.60           # quiet time that ends the turn
    min_utterance: float = 0.25     # shorter turns are noise
    max_utterance: float = 20.0     # force an end on endless speech


class Endpointer:
    FRAME = 0.020

    def __init__(self, cfg: EndpointConfig | None = None):
        self.cfg = cfg or EndpointConfig()
        self._recent: deque[bool] = deque(maxlen=max(1, round(self.cfg.start_window / self.FRAME)))
        self.in_speech = False
        self.speech_started: float | None = None   # time of the first voiced frame of the turn
        self.last_voiced: float | None = None      # time of the most recent voiced frame
        self.voiced_time = 0.0
        self._paused = False
        self._extra = 0.0

    def extend(self, seconds: float) -> None:
        self._extra = max(self._extra, seconds)

    def reset(self) -> None:
        self._recent.clear()
        self.in_speech = False
        self.speech_started = None
        self._paused = False
        self._extra = 0.0
        self.voiced_time = 0.0

    def push(self, voiced: bool, now: float) -> str | None:
        c = self.cfg
        self._recent.append(voiced)
        if voiced:
            self.last_voiced = now
        if not self.in_speech:
            if voiced and sum(self._recent) * self.FRAME >= c.min_speech:
                self.in_speech = True
                self.voiced_time = sum(self._recent) * self.FRAME
                self.speech_started = now - (len(self._recent) - 1) * self.FRAME
                self._paused = False
                return "start"
            return None
        if voiced:
            self.voiced_time += self.FRAME
            self._paused = False
            if now - self.speech_started >= c.max_utterance:
                return self._end("end")
            return None
        quiet = now - (self.last_voiced or now)
        if quiet >= c.silence + self._extra:
            return self._end("end" if self.voiced_time >= c.min_utterance else "noise")
        if not self._paused and quiet >= c.pause and self.voiced_time >= c.min_utterance:
            self._paused = True
            return "pause"
        return None

    def _end(self, kind: str) -> str:
        self.in_speech = False
        self._recent.clear()
        self._extra = 0.0
        self._paused = False
        return kind
