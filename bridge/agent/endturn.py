"""When the caller's turn is over, from the audio: the end-of-turn model's decisions, sans I/O.

The endpointer (``media.endpoint``) says when the caller went quiet; this
part of the turn machine decides what the quiet means. After
``turn_min_silence`` of quiet (~0.25 s) the machine asks the end-of-turn
model (Smart Turn, run by the inference process) about the utterance so far,
and the endpointer's window is stretched to ``turn_max_silence`` (~2 s): from
then on the machine ends the pause itself:

- ``p >= turn_threshold`` ("complete"): the turn ends as soon as the
  speculative transcript is in (the reply cannot start before it anyway),
  unless that transcript ends in digits - someone reading a number pauses
  between groups, and the model (which hears only the audio) calls "four one
  five," complete - then after ``silence + digits_extra`` of quiet once the
  digits make a whole number (``WHOLE_NUMBER``: a local phone number or
  longer), or after ``turn_max_silence`` while they are fewer;
- ``p < turn_threshold`` ("incomplete"), or no answer yet: up to
  ``turn_max_silence``, so slowly read digit groups are not cut off;
- the model failed (or did not load): today's fixed ``silence`` window;
  with ``turn_model = "none"`` the machine never asks.

Each pause of the caller gets at most one question; voice again starts over.
``TurnEnd.fields()`` is what goes into the caller's turn record.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

DIGIT_WORDS = frozenset(("zero", "oh", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
WHOLE_NUMBER = 7        # digits read out that can be a whole number: a local phone number (10 with area code)
_TOKENS = re.compile(r"[A-Za-z]+|\d+")


def digit_tail(text: str | None) -> int:
    """How many digits the transcript ends with, in figures or words, across the groups a
    reader makes ("My number is 415, eight six seven" -> 6); 0 if it ends in a word."""
    n = 0
    for tok in reversed(_TOKENS.findall(text or "")):
        if tok.isdigit():
            n += len(tok)
        elif tok.lower() in DIGIT_WORDS:
            n += 1
        else:
            break
    return n


@dataclass
class Decision:
    """One question to the model, for one pause of the caller."""
    id: int
    asked_at: float
    probability: float | None = None
    seconds: float | None = None         # the model's own time per decision
    answered_at: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class TurnEndConfig:
    enabled: bool
    min_silence: float
    max_silence: float
    threshold: float
    silence: float                       # the fixed window (fallback)
    digits_extra: float = 0.0            # added to it when the transcript ends in a whole number

    @classmethod
    def of(cls, cfg: dict) -> TurnEndConfig:
        return cls(cfg.get("turn_model", "none") != "none", cfg.get("turn_min_silence", 0.25),
                   cfg.get("turn_max_silence", 2.0), cfg.get("turn_threshold", 0.5), cfg["silence"],
                   cfg.get("digits_extra", 0.0))


class TurnEnd:
    def __init__(self, cfg: TurnEndConfig):
        self.cfg = cfg
        self.decision: Decision | None = None
        self.digits = False                       # this pause's transcript ends in a digit
        self.last: dict = {}                      # the fields of the turn that just ended
        self._tail_of: tuple[str | None, int] = (None, 0)    # (transcript, digit_tail of it)

    def reset(self) -> None:
        """The caller spoke again (or a new turn begins): the question is stale."""
        self.decision = None

    def should_ask(self, quiet: float, voiced_time: float, min_utterance: float) -> bool:
        return self.cfg.enabled and self.decision is None and quiet >= self.cfg.min_silence and \
            voiced_time >= min_utterance

    def ask(self, id: int, now: float) -> Decision:
        self.decision = Decision(id, now)
        return self.decision

    def current(self, id: int) -> Decision | None:
        d = self.decision
        return d if d is not None and d.id == id and d.probability is None and d.error is None else None

    def answer(self, d: Decision, probability: float, seconds: float, now: float) -> bool:
        """Record the answer; True when it is a confident "complete"."""
        d.probability, d.seconds, d.answered_at = probability, seconds, now
        return probability >= self.cfg.threshold

    def window(self, text: str | None) -> float | None:
        """The quiet that ends this pause when the model cannot: it failed (the fixed window,
        longer after digits), or said "complete" over a transcript (``text``, None while it is
        not in) ending in digits (the digits window); None: the stretched window decides."""
        if text != self._tail_of[0]:             # asked on every quiet 20 ms frame: count once per transcript
            self._tail_of = (text, digit_tail(text))
        d, tail = self.decision, self._tail_of[1]
        self.digits = tail > 0
        if d is None or not (d.error is not None or (self.complete and tail)):
            return None
        if not tail:
            return self.cfg.silence
        short = self.cfg.silence + self.cfg.digits_extra
        return short if tail >= WHOLE_NUMBER else max(short, self.cfg.max_silence)

    def stretch(self) -> float:
        """Extra silence (over the fixed window) the endpointer allows once the model is asked."""
        return max(0.0, self.cfg.max_silence - self.cfg.silence)

    @property
    def complete(self) -> bool:
        d = self.decision
        return d is not None and d.probability is not None and d.probability >= self.cfg.threshold

    def ended(self, how: str) -> None:
        """The turn is over (``how``: "model", "silence", "max", "digits", "forced"): keep its record."""
        if not self.cfg.enabled:
            self.last = {}
        else:
            d = self.decision
            if how == "silence" and d is not None and d.error is None:
                how = "max"                      # the stretched window ran out
            self.last = {"end": how,
                         "turn_p": None if d is None or d.probability is None else round(d.probability, 3),
                         "turn_model_ms": None if d is None or d.seconds is None else round(d.seconds * 1000, 1),
                         "turn_wait_ms": None if d is None or d.answered_at is None
                         else round((d.answered_at - d.asked_at) * 1000, 1)}
            if d is not None and d.error:
                self.last["turn_error"] = d.error
        self.decision = None
        self.digits = False

    def fields(self) -> dict:
        out, self.last = self.last, {}
        return out
