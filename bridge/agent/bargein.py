"""Barge-in at the caller's ear, sans I/O: pause at the first voice, cancel only on real speech.

Cancelling the reply needs confidence (a "mhm" or "okay" under ~0.4 s must
not throw the answer away), but the caller should hear the agent stop at
once. So the two are split:

- ``bargein_onset`` of voice (~60 ms, 3 frames) while the agent is audible
  *pauses* the agent: the call's downlink is flushed and the frames that were
  queued but not played go back to the front of the playout (``rewind``);
- ``bargein_confirm`` of voiced time (~0.8 s) makes it a barge-in: the reply
  is cancelled and what the caller heard is kept (``TurnMachine._barge_in``);
- quiet again before that (``pause`` seconds): the agent goes on from the
  frame it stopped at, and the short utterance is transcribed. Only
  backchannel words ("mhm", "okay", "yeah", "right" ...) or nothing clear are
  dropped; anything else ("No.", "Goodbye.") takes the turn after all: the
  reply is cut then and the words are the caller's turn.

``BargeIn`` is that part of ``TurnMachine`` (a base class of it, sans I/O
like the rest); ``RewindPlayout``, ``OnsetCounter`` and the records are its
helpers.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from bridge.agent.actions import ClearMark, Flush, LogEvent, LogTurn, Metric, RequestStt, Transcript
from bridge.agent.turnstate import Decode, State
from media.playout import Playout

log = logging.getLogger("trunkline.agent")
HOLD_MAX = 1.5               # an unresolved pause for the caller's voice lets the agent go on after this
SHORT_WAIT = 2.0             # the longest the agent stays paused for a short utterance's transcript


class RewindPlayout(Playout):
    """A ``Playout`` that can take back what the downlink did not play yet."""

    def rewind(self, downlink_cleared: int) -> int:
        """``downlink_cleared`` frames were taken back unplayed: they are sent again on the next
        ``fill``. Returns the frames given back."""
        self._played(len(self._in_flight) - downlink_cleared)
        back = len(self._in_flight)
        segments = list(dict.fromkeys(list(self._in_flight) + list(self.queue)))
        for seg in segments:
            seg.sent = seg.played
        self._in_flight.clear()
        self.queue.clear()
        self.queue.extend(s for s in segments if s.sent < len(s.frames))
        self.frames_out -= back
        return back


@dataclass
class Hold:
    """The agent's audio paused for the caller's voice, since ``onset`` (first voiced frame)."""
    onset: float
    paused_at: float
    frames_back: int


@dataclass
class Short:
    """A short utterance over the agent, sent to STT to tell a backchannel from a short answer."""
    id: int
    onset: float
    paused_at: float


BACKCHANNEL_WORDS = frozenset("""mhm mm hmm hm uh huh um uhhuh mmhmm okay ok k yeah yep yup ya right sure alright
all got it i see ah oh aha cool great good fine""".split())


def is_backchannel(text: str) -> bool:
    """Only listener noises and acknowledgements (or no words at all)."""
    words = re.findall(r"[a-z]+", text.lower())
    return all(w in BACKCHANNEL_WORDS for w in words)


class OnsetCounter:
    """Consecutive loud voiced frames (the pause trigger, faster than the endpointer's start)."""
    FRAME = 0.020

    def __init__(self, onset: float):
        self.need = max(1, round(onset / self.FRAME))
        self.run = 0
        self.first: float | None = None

    def push(self, voiced: bool, t: float) -> bool:
        if not voiced:
            self.run, self.first = 0, None
            return False
        if self.run == 0:
            self.first = t
        self.run += 1
        return self.run >= self.need


class BargeIn:
    """The turn machine's barge-in handling (a part of ``TurnMachine``, kept here with its helpers)."""

    def _pause_for_caller(self, onset: float, now: float) -> None:
        """Voice while the agent talks: silence the line at once, keeping the unplayed audio."""
        self._act(Flush())
        back = self.playout.rewind(self._queued)
        self._queued = 0
        self.hold = Hold(onset, now, back)
        log.debug("call %s: paused for the caller (%d frames kept)", self.call_id, back)

    def _held(self, ev: str | None, voiced: bool, t: float, now: float) -> str | None:
        """The agent is paused for the caller: a real barge-in, a short utterance to read, or not yet
        known. Returns the endpointer event still to handle."""
        h, ep = self.hold, self.ep
        if ep.in_speech and ep.voiced_time >= self.cfg.get("bargein_confirm", 0.8):
            self.hold, self.short = None, None
            if self.reply is not None or self.playout.active:
                self._barge_in(h.onset, now, h.paused_at)
            return ev
        quiet = t - (ep.last_voiced or t)
        if self.short is not None:               # reading a short utterance: stay paused meanwhile
            if t - h.paused_at > SHORT_WAIT and quiet >= self.cfg["pause"]:
                self._go_on()                    # STT is slow and the caller is quiet: go on
            return ev if ev == "start" else None
        if (not voiced and quiet >= self.cfg["pause"]) or t - h.onset > HOLD_MAX:
            self.onset.push(False, t)
            if ep.in_speech and self.state not in (State.HANGING_UP, State.ENDED):
                self.short = Short(next(self._ids), h.onset, h.paused_at)      # "mhm" or "No."?
                self._act(RequestStt(self.short.id, b"".join(self.utterance)))
            else:
                self._go_on()                    # a click or a breath
            return None
        return ev

    def _go_on(self) -> None:
        """The caller's sound was nothing to answer: forget it; the agent goes on where it stopped."""
        self.hold, self.short = None, None
        self.ep.reset()
        self.utterance, self.decode = [], None
        self.turn_end.reset()

    def _short_result(self, t: Transcript, now: float) -> None:
        s, self.short = self.short, None
        ep = self.ep
        if self.hold is None:
            return
        if t.unclear or is_backchannel(t.text) or self.state in (State.HANGING_UP, State.ENDED):
            if ep.last_voiced is not None and now - ep.last_voiced < self.cfg["pause"]:
                return                           # talking again ("Stop. I just..."): stay paused, the words decide
            self._go_on()
            self._act(LogEvent("backchannel", {"call_id": self.call_id, "paused": round(now - s.paused_at, 3)}))
            return
        self.hold = None                         # words ("No.", "Wait, ..."): they take the turn
        if self.reply is not None or self.playout.active:
            self._barge_in(s.onset, now, s.paused_at)
        if not ep.in_speech:                     # the endpointer ended it meanwhile: this is the turn
            self.utterance, self.decode = [], None
            self._finalize(t, now)
        else:                                    # the turn goes on; these words stand unless the caller does
            self.decode = Decode(s.id, len(self.utterance), now, result=t)

    def _barge_in(self, onset: float, now: float, paused_at: float | None = None) -> None:
        self._act(Flush())
        heard = self.playout.flush(self._queued)
        self._queued = 0
        quiet_at = paused_at if paused_at is not None else now       # when the caller's line went quiet
        self._act(Metric("bargein_latency", max(0.0, quiet_at - onset)), Metric("interruptions", count=True))
        r = self.reply
        self._cancel_reply()
        self._rest("barge-in", now)
        self._act(ClearMark())
        self._mark_out, self._mark_time = False, None
        if r is not None or heard.text:
            spoken = " ".join(r.sentences) if r is not None else heard.text
            if heard.text:
                self.history.append({"role": "assistant", "content": heard.text})
            self._act(LogTurn(self.turn_no, "agent", spoken, {"heard": heard.text, "interrupted": True,
                                                              "bargein_latency": round(quiet_at - onset, 3)}))
        self._act(LogEvent("barge_in", {"call_id": self.call_id, "heard": heard.text,
                                        "latency": round(quiet_at - onset, 3), "confirmed": round(now - onset, 3)}))
