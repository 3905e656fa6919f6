"""Barge-in at the caller's ear, sans I/O: pause at the first voice, cancel only on real speech.

Cancelling the reply needs confidence (a "mhm" or "okay" under ~0.4 s must
not throw the answer away), but the caller should hear the agent stop at
once. So the two are split:

- ``bargein_onset`` of voice (~60 ms, 3 frames) while the agent is audible
  *pauses* the agent: the call's downlink is flushed and the frames that were
  queued but not played go back to the front of the playout (``rewind``);
- ``bargein_confirm`` of voiced time (~0.8 s) makes it a barge-in: the reply
  is cancelled and what the caller heard is kept (``TurnMachine._barge_in``);
- quiet again before that (``pause`` seconds): the short utterance is
  transcribed (with a whisper prompt of backchannels, ``SHORT_PROMPT``; the
  call's language has its own words and prompt, ``short_words``) while
  the agent stays paused, and ``read_short`` decides. Backchannels ("mhm",
  "okay", "yeah", "right" ..., any hum such as "M-hm"), nothing clear,
  whisper's stock hallucinations ("you", "Thank you.") and a lone word that
  is not an interruption let the agent go on from the frame it stopped at;
  an interrupting word ("No.", "Wait.", "Stop.", "Goodbye.") or two or more
  confident words take the turn after all: the reply is cut then and the
  words are the caller's turn;
- STT slower than ``SHORT_WAIT`` after the caller went quiet: the agent goes
  on anyway (it used to stay paused up to 2 s after the onset under load), and
  a late transcript with words still stops it then; not while the caller has
  spoken again since (a barge-in in pieces, "Wait, stop. I have ..."): then
  only after ``SHORT_WAIT_MAX``.

Why (measured on real calls, ``tests/bench/bargein.py``): Piper reads "Mhm."
as the letters "em-aitch-em" (0.44 s voiced), which whisper tiny.en writes
as "and make sure" / "and make them." at avg_logprob -0.75 to -1.08, either
side of the -1.0 that makes a transcript "unclear"; on hums it writes a short
word ("them.", "Emma.", "But...") at -0.5 to -1.2, as sure as it is of a
real "Stop." (-0.49). With the prompt the same clips mostly come back as
"Mm-hmm." and "Uh-huh." (once on a call still "And make some.", -0.50) while
"No.", "Wait.", "Stop.", "What?" are unchanged and surer (-0.02 to -0.3).

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
SHORT_WAIT = 1.0             # the longest the agent stays paused for a short utterance's transcript (after asking)
SHORT_WAIT_MAX = 3.0         # ... or after the pause, if the caller spoke again meanwhile ("Wait, stop. I ...")
SHORT_MIN_LOGPROB = -0.4     # two or more words at least this sure cut the reply; so does any interrupting word
INTERRUPT_WORDS = frozenset("""no nope not stop wait hold hang sorry what pardon excuse hello hey repeat again
bye goodbye cancel don't dont""".split())
SHORT_PROMPT = "Mm-hmm. Uh-huh. Hmm. Okay."     # whisper's prompt for a short utterance: it writes hums as hums
HALLUCINATIONS = frozenset({"you", "thank you", "thank you very much", "thanks for watching",
                            "thank you for watching", "thanks for watching bye", "please subscribe"})
HUM = re.compile(r"^(?:[mh]+|u+[hm]+|[aeo]+h+|h+u+h+|e+r+m*|e+m+)$")   # mhm, m-hm, hmm, uh, um, ah, oh, huh, erm, em


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
    voiced: float = 0.0          # the endpointer's voiced time when it was sent
    asked_at: float = 0.0        # when it was sent (``now``)
    last_voiced: float | None = None     # the caller's last voiced frame then (voice since: talking on)


BACKCHANNEL_WORDS = frozenset("""mhm mm hmm hm uh huh um uhhuh mmhmm okay ok k yeah yep yup ya right sure alright
all got it i see ah oh aha cool great good fine""".split())


FILLERS = frozenset("and so but well then the a".split())     # whisper's glue around a hum ("And mm-hmm.")


def _words(text: str) -> list[str]:
    return re.findall(r"(?:[^\W\d_]|')+", text.lower())        # letters of any language ([a-z'] in English)


@dataclass(frozen=True)
class ShortWords:
    """One language's words for reading a short utterance over the agent (``read_short``)."""
    backchannels: frozenset[str]
    interrupt: frozenset[str]
    prompt: str = ""                           # whisper's prompt for a short utterance
    fillers: frozenset[str] = frozenset()
    hallucinations: frozenset[str] = frozenset()
    min_words: int = 2                         # this many sure other words take the turn


ENGLISH = ShortWords(BACKCHANNEL_WORDS, INTERRUPT_WORDS, SHORT_PROMPT, FILLERS, HALLUCINATIONS, 2)
# a language with no lists of its own: only hums are backchannels, one sure word takes the turn (a
# backchannel may stop the agent; a "Nein." always does), and no English prompt biases whisper
OTHER = ShortWords(frozenset(), frozenset(), "", frozenset(), frozenset(), 1)


def short_words(cfg: dict) -> ShortWords:
    """The call's words: English's for an ``en`` language, ``OTHER`` for any other, with the
    language table's ``backchannels``, ``interrupt_words`` and ``short_prompt`` over them
    (``cfg["short_words"]``, set per call from ``[languages.xx]``)."""
    base = ENGLISH if (cfg.get("language") or "en").split("-")[0].lower() == "en" else OTHER
    own = cfg.get("short_words") or {}
    if not own:
        return base
    bc, iw, prompt = own.get("backchannels"), own.get("interrupt_words"), own.get("short_prompt")
    return ShortWords(
        frozenset(w for entry in bc for w in _words(entry)) if bc is not None else base.backchannels,
        frozenset(w for entry in iw for w in _words(entry)) if iw is not None else base.interrupt,
        prompt if prompt is not None else base.prompt, base.fillers, base.hallucinations,
        2 if iw else base.min_words)


def _listener(word: str, words: ShortWords = ENGLISH) -> bool:
    w = word.strip("'")
    return w in words.backchannels or bool(HUM.match(w))


def is_backchannel(text: str, words: ShortWords = ENGLISH) -> bool:
    """Only listener noises and acknowledgements, maybe glued with "and"/"so" (or no words at all)."""
    return all(_listener(w, words) or w in words.fillers for w in _words(text))


@dataclass(frozen=True)
class Verdict:
    """What a short utterance over the agent was: ``go_on`` (nothing to answer) and why."""
    go_on: bool
    why: str                     # unclear | backchannel | hallucination | unsure | words


def read_short(t: Transcript, words: ShortWords = ENGLISH) -> Verdict:
    """Tell a backchannel (or nothing) from words that take the turn, for a short utterance
    (under ``bargein_confirm`` of voice) heard over the agent.

    Whisper writes a hum as some short word ("But...", "them.", "Emmett.", at -0.35 to -1.2) and
    Piper's spelled "Mhm." as "and make sure" / "And make some." (-0.5 to -1.08 with or without
    the prompt) or "And Mm-hmm." (-0.32), while real short phrases come back at -0.02 to -0.3 with
    ``SHORT_PROMPT``. So besides backchannels (glue words such as "and" allowed) and stock
    hallucinations, only an interrupting word ("No.", "Wait.", "Stop.", "Hold on.", "What?",
    "Goodbye.", "Don't.") or two or more other words whisper is sure of ("I'm busy.") take the
    turn; a single other word ("Tuesday.", "Yes.") lets the agent finish, and the caller is heard
    when they say more. ``words`` are the call's language's (``short_words``)."""
    if t.unclear:
        return Verdict(True, "unclear")
    said = _words(t.text)
    if is_backchannel(t.text, words):
        return Verdict(True, "backchannel")
    if " ".join(said) in words.hallucinations:
        return Verdict(True, "hallucination")
    if words.interrupt.intersection(w.strip("'") for w in said):
        return Verdict(False, "words")
    content = [w for w in said if not (_listener(w, words) or w in words.fillers)]
    if len(content) >= words.min_words and t.logprob >= SHORT_MIN_LOGPROB:
        return Verdict(False, "words")
    return Verdict(True, "unsure")


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

    @property
    def short_words(self) -> ShortWords:
        words = self.__dict__.get("_short_words")
        if words is None:
            words = self.__dict__["_short_words"] = short_words(self.cfg)
        return words

    def _pause_for_caller(self, onset: float, now: float) -> None:
        """Voice while the agent talks: silence the line at once, keeping the unplayed audio."""
        self.late = None                         # a new utterance: it decides, not an older late one
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
            s = self.short
            spoke_since = ep.last_voiced != s.last_voiced
            if quiet >= self.cfg["pause"] and (now - s.asked_at > SHORT_WAIT and not spoke_since or
                                               now - h.paused_at > SHORT_WAIT_MAX):
                self._go_on()                    # STT is slow and the caller is quiet: go on; its words may
                                                 # still cut the reply when they come (``late``)
                self.late = s
                self._act(LogEvent("backchannel", {"call_id": self.call_id, "paused": round(now - s.paused_at, 3),
                                                   "why": "stt_slow", "voiced": round(s.voiced, 3)}))
            return ev if ev == "start" else None
        if (not voiced and quiet >= self.cfg["pause"]) or t - h.onset > HOLD_MAX:
            self.onset.push(False, t)
            if ep.in_speech and self.state not in (State.HANGING_UP, State.ENDED):
                self.short = Short(next(self._ids), h.onset, h.paused_at, ep.voiced_time, now,  # "mhm" or "No."?
                                   ep.last_voiced)
                self._act(RequestStt(self.short.id, b"".join(self.utterance), prompt=self.short_words.prompt))
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

    def _is_short(self, decode: int) -> bool:
        """Is STT request ``decode`` a short utterance's (being read, or late)?"""
        return any(s is not None and s.id == decode for s in (self.short, self.late))

    def _short_failed(self, decode: int) -> None:
        if self.late is not None and self.late.id == decode:
            self.late = None
        else:
            self._go_on()                        # a short utterance we could not read: the agent goes on

    def _short_result(self, decode: int, t: Transcript, now: float) -> None:
        late = self.late is not None and self.late.id == decode
        if late:
            s, self.late = self.late, None
        else:
            s, self.short = self.short, None
        ep = self.ep
        v = read_short(t, self.short_words)
        talking = ep.last_voiced is not None and now - ep.last_voiced < self.cfg["pause"]
        self._act(LogEvent("short_utterance", {"call_id": self.call_id, "text": t.text, "voiced": round(s.voiced, 3),
                                               "no_speech": round(t.no_speech, 3), "logprob": round(t.logprob, 3),
                                               "wait": round(now - s.asked_at, 3), "why": v.why, "late": late,
                                               "talking": talking}))
        if late:                                 # the agent went on without it: only clear words cut it now,
            if not v.go_on and self.hold is None and not ep.in_speech and self.decode is None and \
                    self.state not in (State.HANGING_UP, State.ENDED):      # and only if the caller is quiet
                if self.reply is not None or self.playout.active:
                    self._barge_in(s.onset, now, now)
                self.utterance, self.decode = [], None
                self._finalize(t, now)
            return
        if self.hold is None:
            return
        if v.go_on or self.state in (State.HANGING_UP, State.ENDED):
            if talking:
                return                           # talking again ("Stop. I just..."): stay paused, the words decide
            self._go_on()
            self._act(LogEvent("backchannel", {"call_id": self.call_id, "paused": round(now - s.paused_at, 3),
                                               "why": v.why, "voiced": round(s.voiced, 3)}))
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
