"""The agent's turn machine on its own: a synthetic clock, stored caller speech and its
stored transcript (tests/fixtures/), the real VAD, and the actions checked one by one.
No model, no loop, no I/O: each test runs in milliseconds."""
import ast
import copy
import math
from pathlib import Path

import numpy as np
import pytest

from bridge.agent import actions as A
from bridge.agent.turn import State, TurnMachine
from bridge.core.config import DEFAULTS
from media import dtmf
from media.frames import split_frames
from media.vad import VoiceDetector
from recorded import speech_frames, spoken, transcript

RATE = 16000
T0 = 100.0
FRAME = bytes(640)
SPEECH = speech_frames(rate=RATE)               # "I would like to book a cleaning please." (97 frames)
HEARD = A.Transcript(**transcript())
CANNED = ("greeting", "reprompt_text", "goodbye_text", "not_understood_text", "apology_text",
          "tool_filler_text", "tool_unavailable_text", "tool_fallback_text")


class Runner:
    """What the machine sees of the tool runner: its declared tools."""
    def __init__(self):
        from bridge.core.toolspec import load_toolbox
        self.specs = load_toolbox([{"name": "lookup_invoices", "description": "Look up open invoices and the bill",
                                    "url": "http://127.0.0.1:9/v1/invoices"}], environ={}).tools


class Outcome:
    """The runner's answer, as the machine reads it."""
    def __init__(self, tool, status="ok", say=None, result=None):
        self.tool, self.status, self.say, self.kind, self.seconds = tool, status, say, None, 0.2
        self.tool_call_id = "tc_1"
        self.result = result or {"count": 2}
        self.audit = {"tool": tool, "status": status}

    def for_model(self):
        return '{"status":"%s"}' % self.status


class Call:
    """Drives a TurnMachine the way AgentApp and the media clock do, on a synthetic clock:
    each step is 20 ms: an uplink frame (through the real VAD), a tick, and the clock
    taking one frame off the downlink."""

    def __init__(self, tools=False, filler_after=0.0, **cfg):
        conf = copy.deepcopy(DEFAULTS["agent"])
        conf.update(greeting="", interim_every=0.0, reprompt_after=0.0, hangup_after=0.0, turn_model="none")
        conf.update(cfg)
        self.canned = {k: split_frames(bytes(6400), RATE) for k in CANNED}       # 10 frames each
        self.m = TurnMachine(conf, self.canned, Runner() if tools else None,
                             {**DEFAULTS["tools"], "filler_after": filler_after}, call_id="c1", now=T0)
        self.now = T0
        self.vad = VoiceDetector(RATE, conf["vad_mode"])
        self.downlink: list[bytes] = []
        self.sent: list[bytes] = []
        self.mark, self.mark_time = None, None
        self.log: list = []                     # every action, in order
        self.at: dict[int, float] = {}          # id(action) -> when it came out
        self.voiced_at: list[float] = []        # times of the frames the VAD called speech
        self.mark_sent_at = None
        self.synthesized: set[int] = set()     # Synthesize.seq already answered
        self.model_calls = 1                    # the cell's agent calls (Line.model_calls)

    def line(self):
        return A.Line(len(self.downlink), self.mark_time, 0, self.model_calls)

    def do(self, actions):
        for a in actions:
            self.log.append(a)
            self.at[id(a)] = self.now
            if isinstance(a, A.Send):
                self.downlink.extend(a.frames)
            elif isinstance(a, A.Flush):
                self.downlink.clear()
            elif isinstance(a, A.MarkFrame):
                self.mark, self.mark_time = a.pcm, None
            elif isinstance(a, A.ClearMark):
                if not a.time_only:
                    self.mark = None
                self.mark_time = None
        return actions

    def step(self, pcm=None, voiced=None, level=-20.0):
        """20 ms: ``pcm`` through the VAD (or a given verdict), the tick, one frame sent."""
        self.now = round(self.now + 0.02, 6)
        if pcm is not None or voiced is not None:
            if voiced is None:
                voiced, level = self.vad.is_speech(pcm), self.vad.last_level
            if voiced:
                self.voiced_at.append(self.now)
            self.do(self.m.frame(A.Frame(self.now, pcm or FRAME, voiced, level), self.now, self.line()))
        self.do(self.m.tick(self.now, self.line()))
        if self.downlink:
            f = self.downlink.pop(0)
            self.sent.append(f)
            if f is self.mark:
                self.mark, self.mark_time = None, self.now
                self.mark_sent_at = self.now

    def feed(self, frames):
        for f in frames:
            self.step(f)

    def quiet(self, n):
        self.feed([FRAME] * n)

    def idle(self, seconds):
        for _ in range(round(seconds / 0.02)):
            self.step()

    def of(self, kind):
        return [a for a in self.log if isinstance(a, kind)]

    def stt(self, interim=False):
        return [a for a in self.of(A.RequestStt) if a.interim == interim]

    def answer(self, text="Sure, I can help you with that. What day works?"):
        """The model streams ``text`` for the last reply request; TTS answers every sentence."""
        req = self.of(A.RequestReply)[-1]
        for tok in text.split(" "):
            self.do(self.m.token(req.reply, tok + " ", self.now))
        self.do(self.m.reply_done(req.reply, 0.1, 10, self.now))
        self.synthesize()

    def synthesize(self):
        """TTS answers every sentence not answered yet: stand-in audio, then done."""
        for s in self.of(A.Synthesize):
            if s.seq in self.synthesized:
                continue
            self.synthesized.add(s.seq)
            self.do(self.m.speech_audio(s.reply, s.seq, split_frames(spoken(s.text, RATE), RATE), self.now))
            self.do(self.m.speech_done(s.reply, self.now))

    def turns(self, role=None):
        return [a for a in self.of(A.LogTurn) if role is None or a.role == role]


# -- a whole turn ------------------------------------------------------------------------
def test_a_normal_turn_with_the_stored_utterance():
    c = Call(speculate=False)
    c.do(c.m.answered(c.now))
    assert isinstance(c.log[-1], A.RequestReply) and c.log[-1].reply is None     # KV-cache warm-up
    c.feed(SPEECH)
    c.quiet(12)                                   # a pause: decoded, but no guess is answered
    (spec,) = c.stt()
    assert len(spec.pcm16k) > 0.8 * len(b"".join(SPEECH))       # the utterance, with its pre-roll
    c.quiet(20)                                   # the silence window closes
    assert c.m.state is State.DECODING and len(c.of(A.RequestReply)) == 1
    c.now += 0.3                                  # whisper answers 300 ms later
    c.do(c.m.stt_result(spec.decode, HEARD, c.now))
    req = c.of(A.RequestReply)[-1]
    assert c.m.state is State.REPLYING and not req.speculative
    assert req.messages[0]["role"] == "system" and req.messages[-1] == {"role": "user", "content": HEARD.text}
    assert req.params["tools"] == []
    (caller,) = c.turns("caller")
    assert caller.turn == 1 and caller.text == HEARD.text
    assert caller.extra == {"stt_seconds": round(HEARD.seconds, 3),
                            "stt_wait": round(c.now - c.at[id(spec)], 3)}
    reply = c.m.reply
    assert reply.last_voice == c.voiced_at[-1]    # the caller's last voiced frame
    c.now += 0.2                                  # the first token 200 ms later
    c.answer()
    assert [s.text for s in c.of(A.Synthesize)] == ["Sure, I can help you with that.", "What day works?"]
    assert c.m.state is State.PLAYING             # composed; now it plays out
    assert c.of(A.MarkFrame)[0].pcm is c.m.playout.queue[0].frames[0]
    c.idle(8)
    assert c.m.state is State.LISTENING and c.m.reply is None
    (agent,) = c.turns("agent")
    assert agent.text == agent.extra["heard"] == "Sure, I can help you with that. What day works?"
    assert agent.extra["interrupted"] is False and agent.extra["llm_first_token"] == 0.2
    # Voice to voice: the caller's last voiced frame to the reply's first frame on the wire.
    (lat,) = [a for a in c.of(A.Emit) if a.type == "turn_latency"]
    assert lat.data == {"turn": 1, "voice_to_voice": round(c.mark_sent_at - reply.last_voice, 3),
                        "stt": round(HEARD.seconds, 3), "llm_first_token": 0.2, "tts_first_audio": 0.0}
    assert [(a.name, a.label) for a in c.of(A.Metric)][:2] == [("turn_latency", "stt"), ("rtf", "stt")]
    assert ("turn_latency", "voice_to_voice") in [(a.name, a.label) for a in c.of(A.Metric)]
    assert c.m.history[-2:] == [{"role": "user", "content": HEARD.text},
                                {"role": "assistant", "content": agent.text}]
    assert [(t.old, t.new) for t in c.m.transitions] == [
        (State.LISTENING, State.DECODING), (State.DECODING, State.REPLYING),
        (State.REPLYING, State.PLAYING), (State.PLAYING, State.LISTENING)]


# -- speculation ----------------------------------------------------------------------------
@pytest.mark.parametrize("calls, interims", [(1, True), (2, False)])
def test_interim_transcripts_only_while_the_call_is_the_cells_only_agent_call(calls, interims):
    """A decode runs to its end, so an interim of one call started just before another call's caller
    stops would hold that reply back: interims (a live view) run only while no other agent call could."""
    c = Call(interim_every=0.5)
    c.model_calls = calls
    c.feed(SPEECH)                              # ~1.9 s of speech, no pause long enough to end it
    assert bool(c.stt(interim=True)) is interims, c.stt(interim=True)
    c.quiet(40)
    assert c.stt(interim=False), "the end-of-turn decode is asked either way"


def test_speculative_reply_is_held_then_released_at_once():
    c = Call(speculate=True)
    c.feed(SPEECH)
    c.quiet(12)
    (spec,) = c.stt()
    c.do(c.m.stt_result(spec.decode, HEARD, c.now))
    assert c.m.state is State.HOLDING
    req = c.of(A.RequestReply)[-1]
    assert req.speculative and req.messages[-1] == {"role": "user", "content": HEARD.text}
    assert not [m for m in c.m.history if m["role"] == "user"]        # nothing committed on a guess
    c.answer()
    c.quiet(5)                                    # still inside the silence window
    assert c.m.state is State.HOLDING and not c.of(A.Send) and not c.sent    # audio kept back
    assert c.of(A.MarkFrame)                      # (its first frame is marked, to time it when it goes)
    c.quiet(15)                                   # the silence window closes: the guess stands
    assert c.m.state is State.PLAYING and c.of(A.Send) and c.sent
    assert len(c.stt()) == 1                      # no second decode
    c.idle(8)
    assert c.m.state is State.LISTENING
    assert [(t.old, t.new) for t in c.m.transitions][:2] == [(State.LISTENING, State.HOLDING),
                                                            (State.HOLDING, State.PLAYING)]
    assert c.m.history[-1] == {"role": "assistant", "content": "Sure, I can help you with that. What day works?"}


def test_speculative_reply_is_dropped_when_the_caller_goes_on():
    c = Call(speculate=True)
    c.feed(SPEECH)
    c.quiet(12)
    (spec,) = c.stt()
    c.do(c.m.stt_result(spec.decode, A.Transcript("I would like to book", 0.01, -0.2, 1.2, 0.3), c.now))
    held = c.m.reply
    assert c.m.state is State.HOLDING
    c.feed(SPEECH[:20])                           # the caller was not finished
    assert c.m.state is State.LISTENING and c.m.reply is None and len(c.of(A.Cancel)) == 1
    assert c.m.token(held.id, "Sure. ", c.now) == []            # a late answer is dropped
    assert not [m for m in c.m.history if m["role"] == "user"]
    assert (State.HOLDING, State.LISTENING) in [(t.old, t.new) for t in c.m.transitions]
    assert [t.why for t in c.m.transitions if t.old is State.HOLDING] == ["caller went on"]


# -- barge-in ---------------------------------------------------------------------------------
def playing_reply(text="Sure, we have openings on Monday and Tuesday. Which one suits you best?", **cfg):
    c = Call(speculate=False, **cfg)
    c.feed(SPEECH)
    c.quiet(32)
    c.do(c.m.stt_result(c.stt()[-1].decode, HEARD, c.now))
    c.answer(text)
    c.quiet(30)                                   # the reply plays for 600 ms
    return c, text


def test_barge_in_flushes_the_playout_and_keeps_what_was_heard():
    c, text = playing_reply()
    assert c.m.state is State.PLAYING and len(c.sent) >= 29
    cancels = len(c.of(A.Cancel))
    c.feed(SPEECH[:12])                           # the caller starts talking over the agent: paused at once
    assert c.of(A.Flush) and not c.downlink and c.m.hold is not None
    assert len(c.of(A.Cancel)) == cancels and c.m.state is State.PLAYING      # not cancelled yet
    c.feed(SPEECH[12:70])                         # still talking (>= bargein_confirm): a barge-in
    assert len(c.of(A.Cancel)) == cancels + 1 and not c.downlink
    assert c.m.state is State.LISTENING and c.m.reply is None and not c.m.playout.active
    (cut,) = [t for t in c.turns("agent") if t.extra.get("interrupted")]
    assert cut.text == text
    heard = cut.extra["heard"]
    assert text.startswith(heard) and 0 < len(heard) < len(text)
    assert c.m.history[-1] == {"role": "assistant", "content": heard}
    assert [a.name for a in c.of(A.Metric) if a.name in ("bargein_latency", "interruptions")] == \
        ["bargein_latency", "interruptions"]
    (ev,) = [a for a in c.of(A.LogEvent) if a.name == "barge_in"]
    assert ev.fields["heard"] == heard and 0 <= ev.fields["latency"] < 0.2 and ev.fields["confirmed"] >= 0.8
    assert isinstance(c.of(A.ClearMark)[-1], A.ClearMark) and not c.of(A.ClearMark)[-1].time_only


def test_quiet_voice_while_the_agent_talks_is_not_a_barge_in():
    c, _ = playing_reply()
    for _ in range(20):                           # voiced by the VAD but under bargein_floor_dbfs: echo
        c.step(voiced=True, level=c.m.cfg["bargein_floor_dbfs"] - 6)
    assert not c.of(A.Flush) and c.m.state is State.PLAYING
    for _ in range(4):                            # the same, loud: the caller; the agent pauses
        c.step(voiced=True, level=-20.0)
    assert c.of(A.Flush) and c.m.state is State.PLAYING
    for _ in range(40):                           # and goes on talking: a barge-in
        c.step(voiced=True, level=-20.0)
    assert c.m.state is State.LISTENING


def test_dtmf_tones_are_not_speech():
    c = Call()
    n = RATE // 50
    t = np.arange(n) / RATE
    row, col = dtmf.LOW[0], dtmf.HIGH[0]                       # "1"
    tone = (6000 * (np.sin(2 * math.pi * row * t) + np.sin(2 * math.pi * col * t))).astype("<i2").tobytes()
    c.feed([tone] * 40 + [FRAME] * 40)
    assert c.vad.last_dtmf is None and not c.stt() and c.m.state is State.LISTENING and not c.m.ep.in_speech


def short_voice_over_the_agent(**cfg):
    c, text = playing_reply(**cfg)
    cancels, sent, stts = len(c.of(A.Cancel)), len(c.sent), len(c.stt())
    for _ in range(15):                           # 0.3 s of voice over the agent
        c.step(voiced=True)
    paused = len(c.sent)
    assert c.of(A.Flush) and c.m.state is State.PLAYING and paused - sent <= 4   # quiet within ~60 ms
    c.quiet(20)                                   # the caller is quiet again: short; its words are read
    (short,) = c.stt()[stts:]
    assert len(c.sent) == paused and c.m.hold is not None   # still paused meanwhile, nothing cancelled
    assert len(c.of(A.Cancel)) == cancels and c.m.state is State.PLAYING
    return c, text, short, cancels


def test_a_backchannel_pauses_the_agent_and_it_goes_on():
    c, text, short, cancels = short_voice_over_the_agent()
    paused = len(c.sent)
    c.do(c.m.stt_result(short.decode, A.Transcript("Mm-hmm, okay.", 0.1, -0.3, 0.4, 0.2), c.now))
    assert [a.name for a in c.of(A.LogEvent)].count("backchannel") == 1
    c.quiet(3)
    assert len(c.sent) > paused and c.m.hold is None        # the agent goes on where it stopped
    c.idle(12)
    assert len(c.of(A.Cancel)) == cancels and not [a for a in c.of(A.LogEvent) if a.name == "barge_in"]
    assert c.m.state is State.LISTENING and c.turns("agent")[-1].extra["heard"] == text
    assert len(c.turns("caller")) == 1            # the "mhm" is not a turn
    total = sum(len(split_frames(spoken(a.text, RATE), RATE)) for a in c.of(A.Synthesize))
    assert len(c.sent) == total                   # every frame of the reply went out, exactly once


def test_talking_on_after_a_short_pause_is_a_barge_in_and_the_agent_never_resumes():
    c, text, short, cancels = short_voice_over_the_agent()          # "Stop." ...
    sent = len(c.sent)
    for _ in range(45):                           # ... "I just want an appointment."
        c.step(voiced=True)
    assert len(c.sent) == sent and len(c.of(A.Cancel)) == cancels + 1 and c.m.state is State.LISTENING
    c.do(c.m.stt_result(short.decode, A.Transcript("Stop.", 0.1, -0.3, 0.4, 0.2), c.now))     # stale now
    assert len(c.turns("caller")) == 1 and len(c.sent) == sent


def test_an_unclear_short_word_does_not_resume_the_agent_while_the_caller_talks_on():
    c, text, short, cancels = short_voice_over_the_agent()
    sent = len(c.sent)
    for _ in range(8):                            # talking again when the transcript comes
        c.step(voiced=True)
    c.do(c.m.stt_result(short.decode, A.Transcript("", 0.9, -2.0, 0.3, 0.2), c.now))      # unclear
    assert c.m.hold is not None and not [a for a in c.of(A.LogEvent) if a.name == "backchannel"]
    for _ in range(40):
        c.step(voiced=True)
    assert len(c.sent) == sent and len(c.of(A.Cancel)) == cancels + 1       # never resumed; a barge-in


def test_a_short_answer_over_the_agent_takes_the_turn():
    c, text, short, cancels = short_voice_over_the_agent()
    c.do(c.m.stt_result(short.decode, A.Transcript("No, Tuesday.", 0.1, -0.3, 0.4, 0.2), c.now))
    assert len(c.of(A.Cancel)) == cancels + 1 and not c.downlink
    (cut,) = [t for t in c.turns("agent") if t.extra.get("interrupted")]
    assert cut.extra["bargein_latency"] < 0.1 and text.startswith(cut.extra["heard"])
    assert len(c.turns("caller")) == 1 and c.m.ep.in_speech           # the caller may go on
    c.quiet(12)                                   # the silence window closes: those words are the turn
    assert c.turns("caller")[-1].text == "No, Tuesday." and c.m.state is State.REPLYING
    assert len(c.stt()) == 2                      # no second decode of the same words
    assert c.m.history[-1] == {"role": "user", "content": "No, Tuesday."}


# Transcripts whisper tiny.en gave for backchannels on real calls and clips (tests/bench/bargein.py,
# issue 13): a hum or Piper's spelled-out "Mhm." ("em-aitch-em") comes back as words.
HUMS_AS_WORDS = [A.Transcript("and make them.", 0.164, -0.745, 0.9, 0.38),      # "Mhm." on a real call: cut it
                 A.Transcript("And make some.", 0.016, -0.495, 0.9, 0.57),      # the same, read with the prompt
                 A.Transcript("And Mm-hmm.", 0.017, -0.323, 0.9, 0.41),         # "Mm-hmm." (prompted, real call)
                 A.Transcript("and make sure", 0.164, -0.978, 0.9, 0.61),
                 A.Transcript("M-H-M.", 0.17, -0.36, 0.8, 0.3),
                 A.Transcript("Emmett.", 0.26, -0.35, 0.6, 0.3),                # a hum
                 A.Transcript("them.", 0.17, -0.55, 0.6, 0.3),                  # "Hmm."
                 A.Transcript("Thank you.", 0.3, -0.4, 0.6, 0.3)]               # whisper's stock hallucination


@pytest.mark.parametrize("heard", HUMS_AS_WORDS, ids=lambda t: t.text)
def test_a_hum_whisper_writes_as_words_lets_the_agent_go_on(heard):
    c, text, short, cancels = short_voice_over_the_agent()
    paused = len(c.sent)
    c.do(c.m.stt_result(short.decode, heard, c.now))
    c.quiet(3)
    assert len(c.sent) > paused and c.m.hold is None                # the agent goes on where it stopped
    c.idle(12)
    assert len(c.of(A.Cancel)) == cancels and not [a for a in c.of(A.LogEvent) if a.name == "barge_in"]
    assert len(c.turns("caller")) == 1 and c.turns("agent")[-1].extra["heard"] == text


@pytest.mark.parametrize("text,logprob", [("No.", -0.34), ("Wait.", -0.46), ("Stop.", -0.32), ("Hold on.", -0.17),
                                          ("What?", -0.22), ("No.", -0.85), ("I'm busy.", -0.14)])
def test_an_interrupting_word_over_the_agent_still_takes_the_turn(text, logprob):
    c, _, short, cancels = short_voice_over_the_agent()
    c.do(c.m.stt_result(short.decode, A.Transcript(text, 0.1, logprob, 0.6, 0.3), c.now))
    assert len(c.of(A.Cancel)) == cancels + 1 and c.m.hold is None
    c.quiet(12)
    assert c.turns("caller")[-1].text == text and c.m.state is State.REPLYING


def test_the_short_utterance_is_read_with_a_backchannel_prompt():
    from bridge.agent.bargein import SHORT_PROMPT
    c, _, short, _ = short_voice_over_the_agent()
    assert short.prompt == SHORT_PROMPT and "Mm-hmm" in SHORT_PROMPT
    assert [r.prompt for r in c.stt() if r is not short] == [""]       # the caller's turns: no prompt


GERMAN = {"backchannels": ["ja", "genau", "mhm", "alles klar"], "interrupt_words": ["nein", "stopp", "warte"],
          "short_prompt": "Mhm. Ja. Genau."}


@pytest.mark.parametrize("words,heard,cut", [
    (GERMAN, "Ja, genau.", False), (GERMAN, "Alles klar.", False), (GERMAN, "Nein.", True),
    (GERMAN, "Dienstag.", False), (GERMAN, "Ich möchte zahlen.", True),
    (None, "Ja.", True), (None, "Nein.", True), (None, "Mhm.", False)], ids=str)
def test_a_call_in_another_language_reads_a_short_utterance_with_its_own_words(words, heard, cut):
    """[languages.de] backchannels / interrupt_words / short_prompt: its callers' "Ja, genau." lets
    the agent go on and "Nein." cuts it; a language with no lists of its own takes any sure word as
    the turn (hums still go on), and whisper gets no English prompt."""
    cfg = {"language": "de", **({"short_words": words} if words else {})}
    c, _, short, cancels = short_voice_over_the_agent(**cfg)
    assert short.prompt == ("Mhm. Ja. Genau." if words else "")
    c.do(c.m.stt_result(short.decode, A.Transcript(heard, 0.1, -0.2, 0.6, 0.3), c.now))
    c.quiet(3)
    assert (len(c.of(A.Cancel)) == cancels + 1) is cut and (c.m.hold is None)
    assert (c.m.state is State.PLAYING) is not cut           # went on with the reply, or heard the caller


def test_english_is_unchanged_by_a_language_table_without_word_lists():
    from bridge.agent.bargein import ENGLISH, OTHER, short_words
    assert short_words({"language": "en"}) is ENGLISH and short_words({"language": "en-GB"}) is ENGLISH
    assert short_words({"language": "de"}) is OTHER and short_words({}) is ENGLISH
    en = short_words({"language": "en", "short_words": {"backchannels": ["cheers"]}})
    assert "cheers" in en.backchannels and "mhm" not in en.backchannels and en.interrupt == ENGLISH.interrupt


def slow_short_transcript():
    """A short utterance whose transcript takes longer than ``SHORT_WAIT`` (a loaded box)."""
    from bridge.agent.bargein import SHORT_WAIT
    c, text, short, cancels = short_voice_over_the_agent()     # paused 0.64 s so far, asked 0.2 s ago
    paused = len(c.sent)
    assert SHORT_WAIT <= 1.0
    c.quiet(55)                                 # 1.1 s more, no transcript: 1.74 s since the pause, 1.3 s since asked
    assert c.m.hold is None and len(c.sent) > paused           # the agent went on regardless
    (ev,) = [a for a in c.of(A.LogEvent) if a.name == "backchannel"]
    assert ev.fields["why"] == "stt_slow" and len(c.of(A.Cancel)) == cancels
    return c, text, short, cancels


def test_a_slow_transcript_does_not_keep_the_agent_paused_and_a_late_backchannel_changes_nothing():
    c, text, short, cancels = slow_short_transcript()
    c.do(c.m.stt_result(short.decode, A.Transcript("Mm-hmm.", 0.02, -0.1, 0.6, 1.5), c.now))
    c.idle(12)
    assert len(c.of(A.Cancel)) == cancels and c.m.state is State.LISTENING
    assert len(c.turns("caller")) == 1 and c.turns("agent")[-1].extra["heard"] == text
    total = sum(len(split_frames(spoken(a.text, RATE), RATE)) for a in c.of(A.Synthesize))
    assert len(c.sent) == total                   # every frame of the reply went out, exactly once


def test_a_slow_transcript_keeps_the_agent_paused_while_the_caller_talks_on_in_pieces():
    """ "Wait, [transcript asked] stop. [slow STT, quiet] I have ...": never resumed in the gaps."""
    c, text, short, cancels = short_voice_over_the_agent()
    sent = len(c.sent)
    for _ in range(8):                            # "stop." (voiced 0.46 s in all: not confirmed yet)
        c.step(voiced=True)
    c.quiet(55)                                   # 1.1 s quiet, the transcript not back: stay paused
    assert c.m.hold is not None and len(c.sent) == sent
    assert not [a for a in c.of(A.LogEvent) if a.name == "backchannel"]
    c.do(c.m.stt_result(short.decode, A.Transcript("Wait.", 0.02, -0.1, 0.6, 1.5), c.now))
    assert len(c.of(A.Cancel)) == cancels + 1 and len(c.sent) == sent     # cut, nothing played in between


def test_a_late_no_still_stops_the_agent_and_takes_the_turn():
    c, text, short, cancels = slow_short_transcript()
    c.do(c.m.stt_result(short.decode, A.Transcript("No.", 0.02, -0.1, 0.6, 1.5), c.now))
    assert len(c.of(A.Cancel)) == cancels + 1 and not c.downlink and not c.m.playout.active
    assert c.turns("caller")[-1].text == "No." and c.m.state is State.REPLYING
    (cut,) = [t for t in c.turns("agent") if t.extra.get("interrupted")]
    assert text.startswith(cut.extra["heard"])


# -- end of turn from the audio (the model faked at its boundary) ----------------------------
def model_call(**cfg):
    return Call(turn_model="smart-turn", **cfg)


def pause_until_asked(c, limit=30):
    """Quiet frames until the machine asks the end-of-turn model; returns the question and when."""
    before = len(c.of(A.ScoreTurn))
    for _ in range(limit):
        c.quiet(1)
        if len(c.of(A.ScoreTurn)) > before:
            return c.of(A.ScoreTurn)[-1], c.now
    raise AssertionError("the end-of-turn model was never asked")


def test_a_confident_complete_ends_the_turn_after_a_short_silence():
    c = model_call(speculate=True)
    c.feed(SPEECH)
    last_voice = c.voiced_at[-1]
    q, asked = pause_until_asked(c)
    assert 0.24 <= asked - last_voice <= 0.3 and len(c.of(A.ScoreTurn)) == 1
    assert q.pcm16k.endswith(b"".join([FRAME] * 5)) and len(q.pcm16k) > 0.8 * len(b"".join(SPEECH))
    (spec,) = c.stt()
    c.do(c.m.turn_score(q.decision, 0.93, 0.056, c.now))
    assert c.m.state is State.LISTENING and not c.turns()            # the transcript is not in yet
    c.do(c.m.stt_result(spec.decode, HEARD, c.now))                   # it is: the turn is over at once
    assert c.m.state is State.REPLYING and c.now - last_voice < 0.32
    (caller,) = c.turns("caller")
    assert caller.extra["end"] == "model" and caller.extra["turn_p"] == 0.93 and \
        caller.extra["turn_model_ms"] == 56.0
    assert not c.m.ep.in_speech and c.m.state is not State.DECODING
    c.answer()
    c.quiet(3)
    assert c.sent                                 # the held guess went out long before 0.6 s of quiet


def test_incomplete_waits_up_to_turn_max_silence_and_groups_of_digits_stay_one_turn():
    c = model_call(speculate=True, turn_max_silence=2.0)
    groups = [SPEECH[10:40], SPEECH[40:70], SPEECH[70:97]]
    read = ["4 1 5", "4 1 5 8 6 7", "4 1 5, 8 6 7, 2 3 9 0."]
    scores = [0.98, 0.2, 0.9]          # the model hears "four one five," as complete (seen on real calls)
    pauses = [1.7, 1.2]                # quiet after a partial number called "complete", then "incomplete"
    for i, g in enumerate(groups):
        c.feed(g)
        q, _ = pause_until_asked(c)
        decode = c.stt()[-1].decode
        c.do(c.m.stt_result(decode, A.Transcript(f"My number is {read[i]}", 0.01, -0.2, 1.0, 0.3), c.now))
        c.do(c.m.turn_score(q.decision, scores[i], 0.05, c.now))
        if i < len(pauses):
            c.quiet(round((pauses[i] - (c.now - c.voiced_at[-1])) / 0.02))   # a slow reader's pause
            assert not c.turns("caller") and c.m.ep.in_speech, i
    assert not c.turns("caller")                  # complete, ten digits: the digits window
    c.quiet(round((1.36 - (c.now - c.voiced_at[-1])) / 0.02))
    assert not c.turns("caller")
    c.quiet(3)
    (caller,) = c.turns("caller")
    assert caller.extra["end"] == "digits" and caller.text.startswith("My number is 4 1 5")
    assert 1.4 <= c.m.transitions[-1].at - c.voiced_at[-1] <= 1.421
    (final,) = [r for r in c.stt() if r.decode == c.stt()[-1].decode]
    assert len(final.pcm16k) >= len(b"".join(SPEECH[10:97]))          # one utterance: all three groups


def test_a_partial_number_called_complete_waits_turn_max_silence():
    c = model_call(speculate=True, turn_max_silence=2.0)
    c.feed(SPEECH)
    q, _ = pause_until_asked(c)
    c.do(c.m.stt_result(c.stt()[-1].decode, A.Transcript("My number is 415.", 0.01, -0.2, 1.0, 0.3), c.now))
    c.do(c.m.turn_score(q.decision, 0.98, 0.05, c.now))
    c.quiet(round((1.96 - (c.now - c.voiced_at[-1])) / 0.02))
    assert not c.turns("caller")                  # no reader pauses longer between groups
    c.quiet(4)
    (caller,) = c.turns("caller")
    assert caller.text == "My number is 415." and 2.0 <= c.m.transitions[-1].at - c.voiced_at[-1] <= 2.04


def test_digit_tail_counts_the_digits_a_transcript_ends_with():
    from bridge.agent.endturn import digit_tail
    assert digit_tail("My number is 415.") == 3
    assert digit_tail("My number is four one five, eight six seven,") == 6
    assert digit_tail("It's 415-867-2390") == 10
    assert digit_tail("I have 2 kids.") == 0 and digit_tail("") == 0 and digit_tail(None) == 0


def test_an_incomplete_turn_ends_at_turn_max_silence():
    c = model_call(speculate=False, turn_max_silence=1.5)
    c.feed(SPEECH)
    q, asked = pause_until_asked(c)
    c.do(c.m.turn_score(q.decision, 0.1, 0.05, c.now))
    c.quiet(round((1.45 - (c.now - c.voiced_at[-1])) / 0.02))
    assert c.m.state is State.LISTENING and c.m.ep.in_speech           # 0.6 s went by: not cut off
    c.quiet(4)
    assert c.m.state is State.DECODING and 1.5 <= c.m.transitions[-1].at - c.voiced_at[-1] <= 1.54
    c.do(c.m.stt_result(c.stt()[-1].decode, HEARD, c.now))
    (caller,) = c.turns("caller")
    assert caller.extra["end"] == "max" and caller.extra["turn_p"] == 0.1


@pytest.mark.parametrize("failure,window,end", [("error", 0.6, "silence"), ("silent", 2.0, "max")])
def test_without_a_decision_the_turn_ends_on_a_window(failure, window, end):
    c = model_call(speculate=False)
    c.feed(SPEECH)
    q, _ = pause_until_asked(c)
    if failure == "error":                        # no model: today's fixed window
        c.do(c.m.turn_failed(q.decision, "no end-of-turn model loaded", c.now))
    c.quiet(round((window - 0.02 - (c.now - c.voiced_at[-1])) / 0.02))
    assert c.m.state is State.LISTENING
    c.quiet(2)                                    # (no answer at all: up to turn_max_silence)
    assert c.m.state is State.DECODING and window <= c.m.transitions[-1].at - c.voiced_at[-1] <= window + 0.02
    c.do(c.m.stt_result(c.stt()[-1].decode, HEARD, c.now))
    (caller,) = c.turns("caller")
    assert caller.extra["end"] == end and caller.extra["turn_p"] is None
    assert caller.extra.get("turn_error") == ("no end-of-turn model loaded" if failure == "error" else None)
    assert c.m.turn_score(q.decision, 0.9, 0.05, c.now) == []        # a late answer is ignored


def test_voice_again_makes_the_question_stale_and_asks_anew():
    c = model_call(speculate=False)
    c.feed(SPEECH[:50])
    q1, _ = pause_until_asked(c)
    c.feed(SPEECH[50:])                           # the caller goes on before the answer
    assert c.m.turn_score(q1.decision, 0.99, 0.05, c.now) == [] and c.m.ep.in_speech
    q2, _ = pause_until_asked(c)
    assert q2.decision != q1.decision and len(q2.pcm16k) > len(q1.pcm16k)


# -- tools ------------------------------------------------------------------------------------
def held_tool_choice():
    c = Call(tools=True, filler_after=0.5, speculate=True)
    c.feed(SPEECH)
    c.quiet(12)
    c.do(c.m.stt_result(c.stt()[-1].decode, A.Transcript("How much do I owe on my bill?", 0.01, -0.2, 1.9, 0.3),
                        c.now))
    req = c.of(A.RequestReply)[-1]
    assert req.speculative and [t["name"] for t in req.params["tools"]] == ["lookup_invoices"]
    c.do(c.m.tool_chosen(req.reply, A.ToolChoice("lookup_invoices", {}, "tc_1"), c.now))
    c.do(c.m.reply_done(req.reply, 0.1, 0, c.now))
    assert c.m.state is State.HOLDING and not c.of(A.CallTool)           # no request on a guess
    return c, req


def test_a_held_tool_choice_runs_when_the_turn_stands_with_the_filler_if_slow():
    c, req = held_tool_choice()
    c.quiet(20)                                   # the turn ends with the same words: the guess stands
    (call,) = c.of(A.CallTool)
    assert call.reply == req.reply and call.choice.tool == "lookup_invoices" and c.m.state is State.TOOL
    c.idle(0.3)
    assert not [t for t in c.turns("agent") if t.extra.get("kind") == "tool_filler_text"]
    c.idle(0.3)                                   # past filler_after (0.5 s): "One moment"
    assert [t.extra.get("kind") for t in c.turns("agent")] == ["tool_filler_text"]
    c.do(c.m.tool_done(call.reply, call.choice, Outcome("lookup_invoices", say="You have 2 open invoices."),
                       c.now))
    assert c.of(A.AuditTool)[-1].audit == {"tool": "lookup_invoices", "status": "ok"}
    assert [a.type for a in c.of(A.Emit)] == ["tool_called"] and c.of(A.LogTool)[-1].status == "ok"
    assert [s.text for s in c.of(A.Synthesize)] == ["You have 2 open invoices."]
    c.synthesize()
    c.idle(6)
    assert c.m.state is State.LISTENING
    assert [m["role"] for m in c.m.history] == ["user", "assistant", "tool", "assistant"]
    assert [(t.old, t.new) for t in c.m.transitions] == [
        (State.LISTENING, State.HOLDING), (State.HOLDING, State.TOOL), (State.TOOL, State.REPLYING),
        (State.REPLYING, State.PLAYING), (State.PLAYING, State.LISTENING)]


def test_a_held_tool_choice_is_dropped_when_the_caller_goes_on():
    c, req = held_tool_choice()
    c.feed(SPEECH[:20])
    c.quiet(60)
    assert not c.of(A.CallTool) and c.of(A.Cancel)
    assert c.m.tool_chosen(req.reply, A.ToolChoice("lookup_invoices"), c.now) == []   # stale: ignored


def test_a_tool_that_is_down_gets_the_unavailable_and_fallback_lines():
    c, req = held_tool_choice()
    c.quiet(20)
    (call,) = c.of(A.CallTool)
    c.do(c.m.tool_done(call.reply, call.choice, Outcome("lookup_invoices", status="unavailable"), c.now))
    kinds = [t.extra.get("kind") for t in c.turns("agent")]
    assert kinds == ["tool_unavailable_text", "tool_fallback_text"] and c.m.state is State.PLAYING
    c.idle(2)
    assert c.m.state is State.LISTENING and c.m.history[-1]["content"] == \
        " ".join(c.m.cfg[k] for k in ("tool_unavailable_text", "tool_fallback_text"))


def test_async_tool_result_waits_for_the_caller_to_stop():
    c = Call(tools=True)
    for _ in range(10):
        c.step(voiced=True)                       # the caller is talking (a turn has started)
    assert c.m.ep.in_speech
    assert c.do(c.m.tool_result("pay_invoice_later", {"status": "confirmed"}, "Your payment is confirmed.",
                                c.now)) == []
    assert c.m.history[-1]["role"] == "system" and "confirmed" in c.m.history[-1]["content"]
    c.step(voiced=True)
    assert not c.of(A.Synthesize)                 # not over the caller
    c.quiet(28)
    assert not c.of(A.Synthesize)                 # the caller may still go on
    c.quiet(4)                                    # 600 ms of quiet: too short for a turn (noise), line free
    assert not c.stt()
    (say,) = c.of(A.Synthesize)
    assert say.text == "Your payment is confirmed." and c.m.state is State.REPLYING
    assert c.m.transitions[-1].why == "update from pay_invoice_later"


# -- timers -----------------------------------------------------------------------------------
def test_reprompt_once_then_idle_hang_up_after_the_goodbye_plays():
    c = Call(reprompt_after=8.0, hangup_after=25.0)
    c.do(c.m.answered(c.now))
    c.idle(7.98)
    assert not c.turns()
    c.idle(0.04)                                  # just past 8 s of quiet: "Are you still there?"
    (rep,) = c.turns()
    assert rep.extra["kind"] == "reprompt_text" and rep.text == c.m.cfg["reprompt_text"]
    assert [(a.name, a.label) for a in c.of(A.Metric)] == [("reprompts", "reprompt")]
    c.idle(0.02)
    assert c.of(A.Send)                           # and it goes out
    c.idle(16.0)
    assert len(c.turns()) == 1                    # once only
    assert not c.of(A.HangUp)
    c.idle(1.0)                                   # 25 s since the last activity: goodbye
    bye = c.turns()[-1]
    assert bye.extra["kind"] == "goodbye_text" and c.m.state is State.HANGING_UP
    assert [(a.name, a.label) for a in c.of(A.Metric)][-1] == ("reprompts", "hangup")
    assert not c.of(A.HangUp)                     # not over the goodbye
    c.idle(0.4)                                   # its 10 frames have played
    assert c.of(A.HangUp) == [A.HangUp("goodbye")] and c.m.state is State.ENDED
    assert [(t.old, t.new, t.why) for t in c.m.transitions] == [
        (State.LISTENING, State.HANGING_UP, "idle"), (State.HANGING_UP, State.ENDED, "goodbye played")]
    hang_at = c.m.transitions[-1].at
    assert 25.0 < c.m.transitions[0].at - T0 < 25.1 and hang_at - c.m.transitions[0].at < 0.3


def test_the_caller_speaking_restarts_the_timers():
    c = Call(reprompt_after=8.0, hangup_after=25.0, speculate=False)
    c.do(c.m.answered(c.now))
    c.idle(6.0)
    c.feed(SPEECH)
    c.quiet(32)                                   # a turn ends at about 8.6 s
    c.do(c.m.stt_result(c.stt()[-1].decode, A.Transcript("", 0.9, -2.0, 1.9, 0.3), c.now))  # unclear
    assert [t.extra.get("kind") for t in c.turns("agent")] == ["not_understood_text"]
    end = c.m.transitions[0].at                   # the caller's turn ended (LISTENING -> DECODING)
    assert c.m.transitions[0].new is State.DECODING and end - T0 > 8.0
    c.idle(end + 7.9 - c.now)
    assert [t.extra.get("kind") for t in c.turns("agent")] == ["not_understood_text"]   # no reprompt yet
    c.idle(0.2)
    kinds = [t.extra.get("kind") for t in c.turns("agent")]
    assert kinds == ["not_understood_text", "reprompt_text"]
    assert 8.0 < c.at[id(c.turns("agent")[-1])] - end <= 8.04


def test_goodbye_phrase_hangs_up_after_the_goodbye():
    c = Call(speculate=False)
    c.feed(SPEECH)
    c.quiet(32)
    c.do(c.m.stt_result(c.stt()[-1].decode, A.Transcript("Thanks, that's all. Goodbye.", 0.01, -0.2, 1.9, 0.3),
                        c.now))
    assert c.m.state is State.HANGING_UP and not c.of(A.RequestReply)
    c.idle(0.1)
    assert not c.of(A.HangUp)
    c.idle(0.3)
    assert c.of(A.HangUp) == [A.HangUp("goodbye")]


def test_engine_error_apologises_and_listens_again():
    c = Call(speculate=False)
    c.feed(SPEECH)
    c.quiet(32)
    c.do(c.m.stt_result(c.stt()[-1].decode, HEARD, c.now))
    req = c.of(A.RequestReply)[-1]
    c.do(c.m.reply_failed(req.reply, "inference process died", c.now))
    assert c.m.state is State.LISTENING and c.of(A.Cancel)
    assert [t.extra.get("kind") for t in c.turns("agent")] == ["apology_text"]
    assert c.m.reply_failed(req.reply, "again", c.now) == []       # only once per reply


# -- the machine's own rules -------------------------------------------------------------------
TURN = Path(__file__).resolve().parent.parent / "bridge" / "agent"


@pytest.mark.parametrize("module", ["turn.py", "turnstate.py", "actions.py", "endturn.py", "bargein.py"])
def test_the_machine_reads_no_clock_and_does_no_io(module):
    tree = ast.parse((TURN / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    banned = {"time", "datetime", "asyncio", "threading", "socket", "select", "subprocess", "queue", "os"}
    assert not imported & banned, f"{module} imports {imported & banned}"
    names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | \
        {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"monotonic", "perf_counter", "time_ns", "call_later", "get_running_loop", "open"}


def test_state_changes_only_through_the_one_setter():
    tree = ast.parse((TURN / "turn.py").read_text())
    machine = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TurnMachine")
    writers = set()
    for fn in machine.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            if any(isinstance(t, ast.Attribute) and t.attr == "state" for t in targets):
                writers.add(fn.name)
    assert writers == {"__init__", "_set"}


def test_every_transition_is_logged_with_its_time_and_reason(caplog):
    import logging
    caplog.set_level(logging.DEBUG, logger="trunkline.agent")
    c, _ = playing_reply()
    c.feed(SPEECH[:70])
    pairs = [(t.old, t.new) for t in c.m.transitions]
    assert pairs == [(State.LISTENING, State.DECODING), (State.DECODING, State.REPLYING),
                     (State.REPLYING, State.PLAYING), (State.PLAYING, State.LISTENING)]
    assert c.m.transitions[-1].why == "barge-in"
    assert all(a.at <= b.at for a, b in zip(c.m.transitions, list(c.m.transitions)[1:]))
    lines = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert lines == [f"call c1: {t.old.value} -> {t.new.value} ({t.why})" for t in c.m.transitions]
