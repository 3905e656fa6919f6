"""The voice agent's turn-taking, sans I/O: inputs plus ``now`` in, actions out.

``TurnMachine`` is fed by ``AgentApp`` (``bridge.agent.app``), in the style of
aioquic's ``QuicConnection``: every input method takes the time it happened
(``now``; the machine never reads a clock) and returns the list of
``bridge.agent.actions`` to carry out, in order. It owns the endpointer, the
playout (what is queued, what the caller heard), the dialogue history and the
reply being produced; it does no I/O and knows nothing of asyncio, the
inference process or the tool runner.

Inputs: ``answered``; ``frame`` (uplink frame with its VAD verdict) and
``tick`` (every 20 ms), both with a ``Line`` snapshot of the downlink;
``stt_result``/``interim_result``/``*_failed``; ``turn_score``/``turn_failed``
(the end-of-turn model, see ``bridge.agent.endturn``); ``token``, ``reply_done``,
``reply_failed``, ``tool_chosen`` (model); ``speech_audio``/``speech_done``
(TTS); ``tool_done`` and ``tool_result`` (tools); ``ended``.

States (``State``), changed only through ``_set`` which logs each transition:

- LISTENING: no reply in progress (the caller may be talking);
- DECODING: the caller's turn ended, its transcript is awaited;
- HOLDING: a speculative reply is made during a pause, its audio kept back;
- REPLYING: the reply is being generated and synthesized (audio plays as it comes);
- TOOL: the reply waits for a tool call;
- PLAYING: the reply is complete, its last audio is playing out;
- HANGING_UP: the goodbye plays; the call is hung up when it has played;
- ENDED.

Timers are deadlines compared with ``now`` on ``tick``: reprompt and idle
hang-up (``last_activity``), and the tool filler line (``Reply.filler_at``).

The caller talking over the agent first *pauses* its audio (``hold``) and only
a confirmed barge-in cancels the reply; a backchannel lets it go on
(``bridge.agent.bargein``).
"""
from __future__ import annotations

import itertools
import logging
import re
from collections import deque
from typing import Any, Mapping

from ai.text import SentenceCutter, clean_for_speech
from bridge.agent.actions import (Action, Cancel, ClearMark, Emit, Frame, HangUp, Line, LogEvent, LogTurn,
                                  MarkFrame, Metric, Release, RequestReply, RequestStt, ScoreTurn, Send, Synthesize,
                                  Transcript)
from bridge.agent.bargein import BargeIn, Hold, OnsetCounter, RewindPlayout, Short
from bridge.agent.dialog import Dialog
from bridge.agent.endturn import TurnEnd, TurnEndConfig, digit_tail
from bridge.agent.toolturns import ToolTurns
from bridge.agent.turnstate import (AT_REST, RELEASED, Decode, Reply, State, Timings, Transition,  # noqa: F401
                                    Update, _Collect)
from media.endpoint import EndpointConfig, Endpointer

log = logging.getLogger("trunkline.agent")

PREROLL_FRAMES = 15          # 300 ms of audio kept from before speech was detected
TURN_MODEL_BYTES = 8 * 16000 * 2     # the end-of-turn model looks at the last 8 s


class TurnMachine(BargeIn, ToolTurns):
    def __init__(self, cfg: dict, canned: Mapping[str, list[bytes]], tools: Any = None,
                 tool_settings: dict | None = None, call_id: str = "", now: float = 0.0):
        self.cfg = cfg
        self.canned = canned                   # phrase key -> call-rate frames (rendered at start)
        self.tools = tools                     # anything with ``specs`` (name -> ToolSpec), or None
        self.tool_settings = tool_settings or {}
        self.call_id = call_id
        self.dialog = Dialog(cfg, self.tool_settings, tools)
        self.ep = Endpointer(EndpointConfig(min_speech=cfg["min_speech"], pause=cfg["pause"],
                                            silence=cfg["silence"], min_utterance=cfg["min_utterance"]))
        self.playout = RewindPlayout(ahead=3)
        self.turn_end = TurnEnd(TurnEndConfig.of(cfg))
        self.onset = OnsetCounter(cfg.get("bargein_onset", 0.06))
        self.hold: Hold | None = None           # the agent's audio paused for the caller's voice
        self.short: Short | None = None         # a short utterance over the agent, being transcribed
        self.late: Short | None = None          # one the agent went on without (STT slow): its words may still cut
        self.state = State.LISTENING
        self.transitions: deque[Transition] = deque(maxlen=500)
        self.reply: Reply | None = None
        self.decode: Decode | None = None
        self.updates: list[Update] = []        # async tool results not yet spoken
        self.preroll: list[bytes] = []
        self.utterance: list[bytes] = []
        self.turn_no = 0
        self.last_activity = now
        self.reprompted = False
        self.last_interim = 0.0
        self.interim_busy = False
        self._ids = itertools.count(1)
        self._queued = 0                       # frames in the downlink (last snapshot + what we pushed)
        self._stt_backlog = 0
        self._model_calls = 1
        self._mark_out = False                 # a frame is marked and not seen sent
        self._mark_time: float | None = None
        self._out: list[Action] = []

    # -- the one state setter ---------------------------------------------------------
    def _set(self, new: State, why: str, now: float) -> None:
        if new is self.state:
            return
        self.transitions.append(Transition(now, self.state, new, why))
        log.debug("call %s: %s -> %s (%s)", self.call_id, self.state.value, new.value, why)
        self.state = new

    def _rest(self, why: str, now: float) -> None:
        """No reply any more: back to waiting for the caller (or for their transcript)."""
        if self.state in (State.HANGING_UP, State.ENDED):
            return
        self._set(State.DECODING if self.decode is not None and self.decode.turn_over else State.LISTENING, why, now)

    # -- helpers ------------------------------------------------------------------------
    @property
    def history(self) -> list[dict]:
        return self.dialog.history

    def _act(self, *actions: Action) -> None:
        self._out.extend(actions)

    def _take(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _see(self, line: Line) -> None:
        self._queued = line.queued_out
        self._stt_backlog = line.stt_backlog
        self._model_calls = line.model_calls
        if line.mark_time is not None:
            self._mark_out = False
        self._mark_time = line.mark_time

    def speaking(self) -> bool:
        return self.playout.active or self._queued > 0

    def is_current(self, reply: int | None) -> bool:
        return self.reply is not None and self.reply.id == reply

    def _current(self, reply: int | None) -> Reply | None:
        return self.reply if self.is_current(reply) else None

    def _say_canned(self, key: str, turn_text: str | None = None) -> None:
        frames = self.canned.get(key)
        text = self.cfg[key]
        if frames:
            self.playout.add(text, list(frames), turn=-1)
            self._act(LogTurn(self.turn_no, "agent", turn_text or text, {"heard": text, "kind": key}))

    def _cancel_reply(self) -> None:
        if self.reply is not None:
            self._act(Cancel())
            self.reply = None

    # -- inputs: the call -------------------------------------------------------------
    def answered(self, now: float) -> list[Action]:
        if self.cfg["greeting"]:
            self._say_canned("greeting")
            self.history.append({"role": "assistant", "content": self.cfg["greeting"]})
        self.last_activity = now
        # Evaluate the system prompt (and greeting) now, while the greeting plays, so the
        # first real turn finds them in this conversation's KV cache.
        self._act(RequestReply(None, self.dialog.messages([]), {"max_tokens": 1}))
        return self._take()

    def ended(self, now: float) -> list[Action]:
        self.reply = None
        self.hold = None
        self._set(State.ENDED, "call ended", now)
        self._act(Release())
        return self._take()

    def frame(self, f: Frame, now: float, line: Line) -> list[Action]:
        """One uplink frame (in arrival order)."""
        self._see(line)
        if self.state is State.ENDED:
            return []
        voiced = f.voiced
        speaking = self.speaking() or self.state in RELEASED
        if voiced and speaking and f.level_dbfs < self.cfg["bargein_floor_dbfs"]:
            voiced = False                       # quiet voice while we talk: echo or noise
        if self.onset.push(voiced, f.t) and speaking and self.hold is None:
            self._pause_for_caller(self.onset.first or f.t, now)
        ep = self.ep
        was_in_speech = ep.in_speech
        ev = ep.push(voiced, f.t)
        if ep.in_speech or ev in ("end", "noise"):
            if not was_in_speech and ev == "start":
                self.utterance = self.preroll[:]
            self.utterance.append(f.pcm16k)
        else:
            self.preroll.append(f.pcm16k)
            if len(self.preroll) > PREROLL_FRAMES:
                del self.preroll[0]
        if self.hold is not None:
            ev = self._held(ev, voiced, f.t, now)
        if voiced and ep.in_speech:
            self.turn_end.reset()                # (again) talking: any end-of-turn question is stale
        if voiced and self.decode is not None and ep.in_speech and ep.last_voiced == f.t:
            self._caller_resumed(now)
        if ev == "start":
            self.last_activity = f.t
            if speaking and self.hold is None:
                self._pause_for_caller(ep.speech_started or f.t, now)
        elif ev == "pause":
            self._speculate(now)
        elif ev == "end":
            self._end_of_turn(now)
        elif ev == "noise":
            self.utterance = []
            self.decode = None
            if self.state is State.DECODING:
                self._set(State.LISTENING, "noise", now)
        if ev is None and not voiced and ep.in_speech and self.hold is None and \
                self.state not in (State.HANGING_UP, State.ENDED) and \
                self.turn_end.should_ask(f.t - (ep.last_voiced or f.t), ep.voiced_time, self.cfg["min_utterance"]):
            d = self.turn_end.ask(next(self._ids), now)
            self.ep.extend(self.turn_end.stretch())  # from now on the machine ends the turn (or turn_max_silence)
            self._act(ScoreTurn(d.id, b"".join(self.utterance)[-TURN_MODEL_BYTES:]))
        elif ev is None and not voiced and ep.in_speech and self.turn_end.decision is not None:
            window = self._fixed_window()
            if window is not None and f.t - (ep.last_voiced or f.t) >= window:
                ep.reset()
                self._end_of_turn(now, "digits" if self.turn_end.digits else "silence")
        if ep.in_speech and self.cfg["interim_every"] and self.decode is None and not self.interim_busy and \
                self._stt_backlog == 0 and self._model_calls <= 1 and ep.last_voiced == f.t and \
                f.t - max(self.last_interim, ep.speech_started or f.t) >= self.cfg["interim_every"]:
            # Interim transcripts only while the caller talks, one at a time, only when the STT
            # engine is idle, and only while this is the cell's one call being transcribed: a decode
            # runs to its end, so an interim started just before another call's caller stops holds
            # that call's reply back by up to a whole decode (~0.3 s). End-of-turn decodes are
            # what is urgent; interims are a live view.
            self.last_interim = f.t
            self.interim_busy = True
            self._act(RequestStt(next(self._ids), b"".join(self.utterance), interim=True))
        return self._take()

    def tick(self, now: float, line: Line) -> list[Action]:
        """Every 20 ms: top the downlink up, measure, finish replies, run the timers."""
        self._see(line)
        if self.state is State.ENDED:
            return []
        out = _Collect()
        if self.hold is None:                    # paused for the caller's voice: nothing goes out
            self._queued += self.playout.fill(out, self._queued)
        if out.frames:
            self._act(Send(out.frames))
        r = self.reply
        if r is not None and not r.timings.measured and self._mark_time is not None and \
                r.timings.first_audio_at is not None:
            self._voice_to_voice(r)
        if self.state is State.PLAYING and not self.speaking():
            self._reply_finished(r, now)
        if self.state is State.TOOL and r.filler_at is not None and now >= r.filler_at:
            r.filler_at = None
            if not self.speaking() and not self.ep.in_speech:
                self._say_canned("tool_filler_text")
        if self.updates and self.state in AT_REST and not self.speaking() and not self.ep.in_speech:
            self._speak_update(self.updates.pop(0), now)
        if self.state is State.HANGING_UP and not self.speaking():
            self._act(HangUp("goodbye"))
            self._set(State.ENDED, "goodbye played", now)
            return self._take()
        idle = self.state in AT_REST and not self.speaking() and not self.ep.in_speech
        if idle and self.cfg["hangup_after"] and now - self.last_activity > self.cfg["hangup_after"]:
            self._act(Metric("reprompts", label="hangup", count=True))
            self._say_canned("goodbye_text")
            self._set(State.HANGING_UP, "idle", now)
            self.last_activity = now
        elif idle and self.cfg["reprompt_after"] and not self.reprompted and \
                now - self.last_activity > self.cfg["reprompt_after"]:
            self.reprompted = True
            self._act(Metric("reprompts", label="reprompt", count=True))
            self._say_canned("reprompt_text")
        return self._take()

    def _voice_to_voice(self, r: Reply) -> None:
        t = r.timings
        t.measured = True
        v2v = self._mark_time - r.last_voice
        self._act(Metric("turn_latency", v2v, "voice_to_voice"),
                  LogEvent("voice_to_voice", {"call_id": self.call_id, "turn": r.turn, "seconds": round(v2v, 3)}),
                  Emit("turn_latency", {"turn": r.turn, "voice_to_voice": round(v2v, 3),
                                        "stt": round(r.stt_seconds, 3),
                                        "llm_first_token": round(t.llm_first_token(), 3),
                                        "tts_first_audio": round(t.first_audio_at - (t.tts_at or t.first_audio_at),
                                                                 3)}))

    # -- turn handling --------------------------------------------------------------------
    def _speculate(self, now: float) -> None:
        if self.state in (State.HANGING_UP, State.ENDED):
            return
        d = self.decode = Decode(next(self._ids), len(self.utterance), now)
        self._act(RequestStt(d.id, b"".join(self.utterance)))

    def _caller_resumed(self, now: float) -> None:
        """Voice after a speculative pause (or before the transcript came): the turn is not over."""
        self.decode = None
        if self.state is State.HOLDING:
            self._cancel_reply()
            self._set(State.LISTENING, "caller went on", now)
        elif self.state is State.DECODING:
            self._set(State.LISTENING, "caller went on", now)

    def _end_of_turn(self, now: float, how: str = "silence") -> None:
        self.last_activity = now
        self.reprompted = False
        self.turn_end.ended(how)
        if self.state in (State.HANGING_UP, State.ENDED):
            self.utterance = []
            self.decode = None
            return
        d = self.decode
        if d is not None and d.result is not None:
            self._finalize(d.result, now)
        elif d is None:
            d = self.decode = Decode(next(self._ids), len(self.utterance), now, turn_over=True)
            self._set(State.DECODING, "end of turn", now)
            self._act(RequestStt(d.id, b"".join(self.utterance)))
        else:                                  # the speculative decode is still running; it finalizes
            d.turn_over = True
            self._set(State.DECODING, "end of turn", now)
        self.utterance = []

    def stt_result(self, decode: int, t: Transcript, now: float) -> list[Action]:
        if self._is_short(decode):
            self._short_result(decode, t, now)
            return self._take()
        d = self.decode
        if d is None or d.id != decode or self.state in (State.HANGING_UP, State.ENDED):
            return []
        d.result = t
        if digit_tail(t.text):
            self.ep.extend(self.cfg["digits_extra"])      # reading digits one by one: wait longer
        if self.ep.in_speech and self.cfg["speculate"] and self.state is State.LISTENING and not t.unclear:
            self._start_reply(t.text, True, t.seconds, now)
        elif not self.ep.in_speech:
            self._finalize(t, now)
        self._commit_if_complete(now)
        return self._take()

    # -- inputs: the end-of-turn model ------------------------------------------------------
    def turn_score(self, decision: int, probability: float, seconds: float, now: float) -> list[Action]:
        """The model's P(the caller's turn is complete) for question ``decision``."""
        d = self.turn_end.current(decision)
        if d is None or self.state in (State.HANGING_UP, State.ENDED):
            return []
        if self.turn_end.answer(d, probability, seconds, now):
            self._commit_if_complete(now)
        return self._take()                      # "not finished": the endpointer waits up to turn_max_silence

    def _fixed_window(self) -> float | None:
        """The quiet that ends this pause when the model cannot (``TurnEnd.window``)."""
        t = self.decode.result if self.decode is not None else None
        return self.turn_end.window(t.text if t is not None else None)

    def turn_failed(self, decision: int, msg: str, now: float) -> list[Action]:
        """No decision (no model, worker down): the fixed silence window ends this turn."""
        d = self.turn_end.current(decision)
        if d is not None:
            d.error = msg[:200]
        return []

    def _commit_if_complete(self, now: float) -> None:
        """End the turn now if the model said "complete" and the (speculative) transcript is in and
        does not end in a digit; the reply could not start before the transcript anyway."""
        if not self.turn_end.complete or not self.ep.in_speech or self.hold is not None or \
                self.state in (State.HANGING_UP, State.ENDED):
            return
        d = self.decode
        if d is None:                            # (turn_min_silence < pause) the transcript is needed
            self._speculate(now)
            return
        if d.result is None or digit_tail(d.result.text):
            return
        self.ep.reset()
        self._end_of_turn(now, "model")

    def stt_failed(self, decode: int, msg: str, now: float) -> list[Action]:
        if self._is_short(decode):
            self._short_failed(decode)           # a short utterance we could not read: the agent goes on
            return self._take()
        self._engine_error(msg, now)
        return self._take()

    def interim_result(self, decode: int, t: Transcript, now: float) -> list[Action]:
        self.interim_busy = False
        if t.text and t.no_speech < 0.6:
            self._act(LogEvent("transcript_interim", {"call_id": self.call_id, "text": t.text}))
        return self._take()

    def interim_failed(self, decode: int, now: float) -> list[Action]:
        self.interim_busy = False
        return []

    def _finalize(self, t: Transcript, now: float) -> None:
        d, self.decode = self.decode, None
        end_wait = now - (d.sent_at if d else now)
        self._act(Metric("turn_latency", t.seconds, "stt"))
        if t.audio_s:
            self._act(Metric("rtf", t.seconds / t.audio_s, "stt"))
        self.turn_no += 1
        if t.unclear:
            self._act(LogTurn(self.turn_no, "caller", t.text, {"unclear": True,
                                                                "no_speech_prob": round(t.no_speech, 3),
                                                                **self.turn_end.fields()}),
                      Metric("reprompts", label="not_understood", count=True))
            self._cancel_reply()
            self._rest("not understood", now)
            self._say_canned("not_understood_text")
            return
        text = t.text
        self._act(LogTurn(self.turn_no, "caller", text, {"stt_seconds": round(t.seconds, 3),
                                                          "stt_wait": round(end_wait, 3), **self.turn_end.fields()}))
        self.history.append({"role": "user", "content": text})
        words = set(re.findall(r"[a-z']+", text.lower()))
        if any(set(p.split()) <= words for p in self.cfg["goodbye_phrases"]):
            self._cancel_reply()
            self._say_canned("goodbye_text")
            self._set(State.HANGING_UP, "caller said goodbye", now)
            return
        r = self.reply
        if r is not None and self.state is State.HOLDING and r.user_text == text:
            self._release(r, now)              # the speculative reply stands
            return
        if r is not None:
            self._act(Cancel())
        self._start_reply(text, False, t.seconds, now)

    def _release(self, r: Reply, now: float) -> None:
        r.turn = self.turn_no
        for sentence, frames in r.held:
            self.playout.add(sentence, frames, r.turn)
        r.held.clear()
        if r.pending_tool is not None:
            choice, r.pending_tool = r.pending_tool, None
            self._run_tool(r, choice, now)
        else:
            self._set(State.PLAYING if r.composed else State.REPLYING, "speculative reply stands", now)

    def _start_reply(self, text: str, held: bool, stt_seconds: float, now: float) -> None:
        r = Reply(next(self._ids), self.turn_no, text, self.ep.last_voiced or now, Timings(now),
                  stt_seconds=stt_seconds)
        self.playout.take_heard()                 # heard-text accounting starts with this reply
        self.reply = r
        self._set(State.HOLDING if held else State.REPLYING, "speculative reply" if held else "reply", now)
        self._model_round(r, [{"role": "user", "content": text}] if held else [])

    def _model_round(self, r: Reply, extra: list[dict]) -> None:
        """Ask the model for the next part of reply ``r`` (offering tools while rounds are left)."""
        params = {"max_tokens": self.cfg["max_reply_tokens"], "temperature": self.cfg["temperature"],
                  "repeat_penalty": self.cfg["repeat_penalty"],
                  "tools": self.dialog.tools_for(r.user_text, r.rounds) if r.user_text else []}
        r.llm_done = False
        r.cutter = SentenceCutter()
        self._act(RequestReply(r.id, self.dialog.messages(extra), params,
                               speculative=self.state is State.HOLDING))

    # -- inputs: the model ----------------------------------------------------------------
    def token(self, reply: int, tok: str, now: float) -> list[Action]:
        r = self._current(reply)
        if r is None:
            return []
        if r.timings.first_token_at is None:
            r.timings.first_token_at = now
            self._act(Metric("turn_latency", now - r.timings.llm_at, "llm_first_token"))
        for sentence in r.cutter.feed(tok):
            self._speak(r, sentence, now)
        return self._take()

    def reply_done(self, reply: int, seconds: float, tokens: int, now: float) -> list[Action]:
        r = self._current(reply)
        if r is None:
            return []
        for sentence in r.cutter.flush():
            self._speak(r, sentence, now)
        r.llm_done = True
        if tokens and seconds:
            self._act(Metric("llm_tokens_per_second", tokens / seconds))
        self._composed(r, now)
        return self._take()

    def reply_failed(self, reply: int, msg: str, now: float) -> list[Action]:
        if self._current(reply) is None:
            return []
        self._engine_error(msg, now)
        return self._take()

    def _composed(self, r: Reply, now: float) -> None:
        if self.state is State.REPLYING and r.composed:
            self._set(State.PLAYING, "reply complete", now)

    def _speak(self, r: Reply, sentence: str, now: float) -> None:
        sentence = clean_for_speech(sentence)
        if not sentence:
            return
        r.sentences.append(sentence)
        r.tts_pending += 1
        if r.timings.tts_at is None:
            r.timings.tts_at = now
        seq = next(self._ids)
        r.first_text[seq] = sentence
        self._act(Synthesize(r.id, seq, sentence))

    def _say_line(self, r: Reply, text: str, now: float) -> None:
        """Reply ``r`` is this fixed line (a tool's ``say``), sentence by sentence, no model round."""
        r.llm_done = True
        for sentence in [*r.cutter.feed(text + " "), *r.cutter.flush()]:
            self._speak(r, sentence, now)

    # -- inputs: speech synthesis -----------------------------------------------------------
    def speech_audio(self, reply: int, seq: int, frames: list[bytes], now: float) -> list[Action]:
        """Call-rate frames of sentence ``seq`` (in order; the first chunk carries its text)."""
        r = self._current(reply)
        if r is None:
            return []
        t = r.timings
        if t.first_audio_at is None:
            t.first_audio_at = now
            self._act(Metric("turn_latency", now - t.tts_at, "tts_first_audio"))
        if not frames:
            return self._take()
        text = r.first_text.pop(seq, "")
        if self.state is State.HOLDING:
            r.held.append((text, frames))
        else:
            self.playout.add(text, frames, r.turn)
        if not t.measured and not self._mark_out and self._mark_time is None:
            self._mark_out = True
            self._act(MarkFrame(frames[0]))
        return self._take()

    def speech_done(self, reply: int, now: float) -> list[Action]:
        r = self._current(reply)
        if r is None:
            return []
        r.tts_pending -= 1
        self._composed(r, now)
        return self._take()

    # -- endings --------------------------------------------------------------------------------
    def _reply_finished(self, r: Reply, now: float) -> None:
        self.reply = None
        self.playout.take_heard()
        text = " ".join(r.sentences)
        if text:
            self.history.append({"role": "assistant", "content": text})
        t = r.timings
        self._act(LogTurn(self.turn_no, "agent", text, {
            "heard": text, "interrupted": False, "llm_first_token": round(t.llm_first_token(), 3),
            "tts_first_audio": round((t.first_audio_at or 0) - (t.tts_at or 0), 3) if t.tts_at else None}),
            ClearMark(time_only=True))
        self._mark_time = None
        self.last_activity = now
        self._rest("reply played", now)

    def _engine_error(self, msg: str, now: float) -> None:
        log.warning("call %s: engine error, apologising: %s", self.call_id, msg)
        self._cancel_reply()
        self.decode = None
        self._rest("engine error", now)
        self._say_canned("apology_text")
