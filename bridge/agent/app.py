"""The local voice agent: caller speech -> STT -> LLM -> TTS -> back into the call.

One ``AgentApp`` per call, driven by the cell's 20 ms tick (``on_frames`` /
``on_tick``) and by replies from the inference process (callbacks posted on
the loop). Turn-taking:

- every uplink frame goes through the VAD (energy-gated, DTMF vetoed) and the
  endpointer; while the agent speaks, only frames louder than
  ``bargein_floor_dbfs`` count, so its own echo cannot open a turn;
- on a short pause the utterance so far is decoded speculatively and, when
  ``speculate`` is on, the reply is generated and synthesized but held back;
  if the silence window then closes with no new voice, the held audio plays at
  once; if the caller goes on, it is cancelled;
- the caller starting to speak while the agent is talking (or thinking) is a
  barge-in: the downlink is flushed, the running generation cancelled, and
  the history keeps only the words the caller heard.

Tools: when the operator declared tools, a turn whose words match some of
them offers those to the model; if it picks one, the call goes out through
the cell's ``ToolRunner`` (never for a speculative reply: a payment must not
be made on a guess), the filler line plays if the API is slow, and the
answer is the tool's ``say`` line or a further model round that reads the
result. A tool that is down (breaker open, retries spent, quota) gets the
"can't do that right now" and fallback lines. Results that arrive later
(async tools) are spoken when the caller is not talking.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field

from ai.text import SentenceCutter, clean_for_speech
from bridge.core.app import App
from bridge.agent.dialog import Dialog
from bridge.core.logs import event
from bridge.agent.tools.runner import CallContext, Outcome
from media.endpoint import EndpointConfig, Endpointer
from media.playout import Playout
from media.resample import Resampler
from media.vad import VoiceDetector

log = logging.getLogger("trunkline.agent")

PREROLL_FRAMES = 15          # 300 ms of audio kept from before speech was detected
_NUMBERISH = re.compile(r"(\d|\b(zero|oh|one|two|three|four|five|six|seven|eight|nine)\b)[\s.,-]*$", re.I)


@dataclass
class Reply:
    """One agent turn being produced."""
    turn: int
    user_text: str
    last_voice: float               # rx time of the caller's last voiced frame
    held: bool                      # speculative: audio is kept back until the turn really ends
    llm_rid: int | None = None
    llm_done: bool = False
    tts_pending: int = 0
    sentences: list[str] = field(default_factory=list)
    held_segments: list[tuple[str, list[bytes]]] = field(default_factory=list)
    cutter: SentenceCutter = field(default_factory=SentenceCutter)
    llm_at: float = 0.0
    first_token_at: float | None = None
    tts_at: float | None = None
    first_audio_at: float | None = None
    marked: bool = False
    failed: bool = False
    stt_seconds: float = 0.0
    rounds: int = 0                 # model rounds that ended in a tool call
    tool_busy: bool = False         # a tool request is out
    pending_tool: dict | None = None    # chosen while held (speculative): runs only if the turn stands
    filler: object = None           # the filler line's timer


class AgentApp(App):
    name = "agent"

    def __init__(self, session, hub, cfg: dict, metrics, turns, tools=None, tool_settings: dict | None = None):
        super().__init__(session)
        self.hub = hub
        self.cfg = cfg
        self.metrics = metrics
        self.turns = turns
        self.rate = session.media.rate
        self.vad = VoiceDetector(self.rate, cfg["vad_mode"])
        self.ep = Endpointer(EndpointConfig(min_speech=cfg["min_speech"], pause=cfg["pause"],
                                            silence=cfg["silence"], min_utterance=cfg["min_utterance"]))
        self.to16k = None if self.rate == 16000 else Resampler(self.rate, 16000)
        self.playout = Playout(ahead=3)
        self.tools = tools
        self.tool_settings = tool_settings or {}
        self.dialog = Dialog(cfg, self.tool_settings, tools)
        self.history = self.dialog.history
        self.updates: list[tuple[str, dict, str | None]] = []     # async tool results not yet spoken
        if tools is not None:
            self.tool_ctx = CallContext(session.call_id, session.from_uri, session.to_uri)
        self.preroll: list[bytes] = []
        self.utterance: list[bytes] = []
        self.turn_no = 0
        self.reply: Reply | None = None
        self.spec: dict | None = None            # speculative decode: {"rid", "frames", "result", "voiced_after"}
        self.last_activity = time.monotonic()
        self.last_interim = 0.0
        self.interim_busy = False
        self.reprompted = False
        self.hangup_after_playout = False
        self.speaking_started: float | None = None
        self.call_key = session.call_id

    # -- helpers ----------------------------------------------------------------
    def _say_canned(self, key: str, turn_text: str | None = None) -> None:
        frames = self.hub.canned.get(key)
        text = self.cfg[key]
        if frames:
            self.playout.add(text, list(frames), turn=-1)
            self._log_turn("agent", turn_text or text, heard=text, kind=key)

    def _log_turn(self, role: str, text: str, **extra) -> None:
        rec = {"call_id": self.session.call_id, "turn": self.turn_no, "role": role, "text": text, **extra}
        self.turns.append({"event": "turn", "at": time.time(), **rec})
        event(log, "turn", **rec)
        said = text if role == "caller" else extra.get("heard", text)
        if said:
            self.session.record_transcript("in" if role == "caller" else "out", said, None,
                                           {k: v for k, v in extra.items() if k != "heard"} or None)

    def _speaking(self) -> bool:
        return self.playout.active or self.session.media.queued_out() > 0

    # -- App hooks ----------------------------------------------------------------
    def on_answered(self) -> None:
        if self.cfg["greeting"]:
            self._say_canned("greeting")
            self.history.append({"role": "assistant", "content": self.cfg["greeting"]})
        self.last_activity = time.monotonic()
        # Evaluate the system prompt (and greeting) now, while the greeting plays, so the
        # first real turn finds them in this conversation's KV cache.
        self.hub.llm(self.call_key, self._messages([]), {"max_tokens": 1},
                     on_token=lambda tok: None, on_done=lambda *a: None, on_error=lambda msg: None)

    def _messages(self, extra: list[dict]) -> list[dict]:
        return self.dialog.messages(extra)

    def on_end(self) -> None:
        self.hub.release(self.call_key)
        if self.reply is not None and self.reply.filler is not None:
            self.reply.filler.cancel()

    def on_frames(self, frames, now):
        for t, pcm in frames:
            self._frame(t, pcm)

    def _frame(self, t: float, pcm: bytes) -> None:
        pcm16 = pcm if self.to16k is None else self.to16k.process(pcm)
        voiced = self.vad.is_speech(pcm)
        speaking = self._speaking() or (self.reply is not None and not self.reply.held)
        if voiced and speaking and self.vad.last_level < self.cfg["bargein_floor_dbfs"]:
            voiced = False                       # quiet voice while we talk: echo or noise
        was_in_speech = self.ep.in_speech
        ev = self.ep.push(voiced, t)
        if self.ep.in_speech or ev in ("end", "noise"):
            if not was_in_speech and ev == "start":
                self.utterance = self.preroll[:]
            self.utterance.append(pcm16)
        else:
            self.preroll.append(pcm16)
            if len(self.preroll) > PREROLL_FRAMES:
                del self.preroll[0]
        if voiced and self.spec is not None and self.ep.in_speech and self.ep.last_voiced == t:
            self._caller_resumed()
        if ev == "start":
            self.last_activity = t
            if speaking:
                self._barge_in(onset=self.ep.speech_started or t)
        elif ev == "pause":
            self._speculate()
        elif ev == "end":
            self._end_of_turn()
        elif ev == "noise":
            self.utterance = []
            self.spec = None
        if self.ep.in_speech and self.cfg["interim_every"] and self.spec is None and not self.interim_busy and \
                self.hub.stt_backlog() == 0 and \
                self.ep.last_voiced == t and \
                t - max(self.last_interim, self.ep.speech_started or t) >= self.cfg["interim_every"]:
            # Interim transcripts only while the caller talks, one at a time, and only when
            # the STT engine is idle: end-of-turn decodes (any call's) are what is urgent.
            self.last_interim = t
            self.interim_busy = True
            self.hub.stt(self.call_key, b"".join(self.utterance), True, self._on_interim,
                         on_error=lambda msg: setattr(self, "interim_busy", False))

    def on_tick(self, now):
        media = self.session.media
        self.playout.fill(media.downlink, media.queued_out())
        r = self.reply
        if r is not None and not r.marked and media.mark_time is not None and r.first_audio_at is not None:
            r.marked = True
            v2v = media.mark_time - r.last_voice
            self.metrics.turn_latency.labels("voice_to_voice").observe(v2v)
            event(log, "voice_to_voice", call_id=self.session.call_id, turn=r.turn, seconds=round(v2v, 3))
            self.session.emit("turn_latency", {"turn": r.turn, "voice_to_voice": round(v2v, 3),
                                               "stt": round(r.stt_seconds, 3),
                                               "llm_first_token": round((r.first_token_at or r.llm_at) - r.llm_at, 3),
                                               "tts_first_audio": round(r.first_audio_at - (r.tts_at or r.first_audio_at), 3)})
        if r is not None and not r.held and (r.llm_done or r.failed) and r.tts_pending == 0 and not self.playout.active \
                and media.queued_out() == 0 and not r.tool_busy:
            self._reply_finished(r)
        if self.updates and self.reply is None and not self._speaking() and not self.ep.in_speech:
            self._speak_update(*self.updates.pop(0))
        if self.hangup_after_playout and not self._speaking():
            self.hangup_after_playout = False
            self.session.hangup("goodbye")
            return
        idle = not self._speaking() and self.reply is None and not self.ep.in_speech
        if idle and self.cfg["hangup_after"] and now - self.last_activity > self.cfg["hangup_after"]:
            self.metrics.reprompts.labels("hangup").inc()
            self._say_canned("goodbye_text")
            self.hangup_after_playout = True
            self.last_activity = now
        elif idle and self.cfg["reprompt_after"] and not self.reprompted and \
                now - self.last_activity > self.cfg["reprompt_after"]:
            self.reprompted = True
            self.metrics.reprompts.labels("reprompt").inc()
            self._say_canned("reprompt_text")

    # -- turn handling --------------------------------------------------------------
    def _on_interim(self, text, no_speech, logprob, audio_s, secs) -> None:
        self.interim_busy = False
        if text and no_speech < 0.6:
            event(log, "transcript_interim", call_id=self.session.call_id, text=text)

    def _speculate(self) -> None:
        spec = {"frames": len(self.utterance), "result": None, "sent_at": time.monotonic()}
        self.spec = spec
        spec["rid"] = self.hub.stt(self.call_key, b"".join(self.utterance), False,
                                   lambda *res: self._on_spec_stt(spec, res), on_error=self._engine_error)

    def _on_spec_stt(self, spec: dict, res) -> None:
        if self.spec is not spec:
            return
        spec["result"] = res
        text = res[0]
        if _NUMBERISH.search(text or ""):
            self.ep.extend(self.cfg["digits_extra"])      # reading digits one by one: wait longer
        if self.ep.in_speech and self.cfg["speculate"] and self.reply is None and not self._unclear(res):
            self._start_reply(text, held=True, stt_seconds=res[4])
        elif not self.ep.in_speech:
            self._finalize(res)

    def _caller_resumed(self) -> None:
        """Voice after a speculative pause: the turn is not over."""
        self.spec = None
        if self.reply is not None and self.reply.held:
            self.hub.cancel(self.call_key)
            self.reply = None

    def _end_of_turn(self) -> None:
        self.last_activity = time.monotonic()
        self.reprompted = False
        spec = self.spec
        if spec is not None and spec["result"] is not None:
            self._finalize(spec["result"])
        elif spec is None:
            spec = {"frames": len(self.utterance), "result": None, "sent_at": time.monotonic()}
            self.spec = spec
            spec["rid"] = self.hub.stt(self.call_key, b"".join(self.utterance), False,
                                       lambda *res: self._on_spec_stt(spec, res), on_error=self._engine_error)
        # else: the speculative decode is still running; it finalizes when it lands
        self.utterance = []

    def _unclear(self, res) -> bool:
        text, no_speech, logprob = res[0], res[1], res[2]
        return not text.strip() or no_speech > 0.6 or logprob < -1.0

    def _finalize(self, res) -> None:
        spec, self.spec = self.spec, None
        text, no_speech, logprob, audio_s, secs = res
        end_wait = time.monotonic() - (spec["sent_at"] if spec else time.monotonic())
        self.metrics.turn_latency.labels("stt").observe(secs)
        if audio_s:
            self.metrics.rtf.labels("stt").observe(secs / audio_s)
        self.turn_no += 1
        if self._unclear(res):
            self._log_turn("caller", text, unclear=True, no_speech_prob=round(no_speech, 3))
            self.metrics.reprompts.labels("not_understood").inc()
            if self.reply is not None:
                self.hub.cancel(self.call_key)
                self.reply = None
            self._say_canned("not_understood_text")
            return
        self._log_turn("caller", text, stt_seconds=round(secs, 3), stt_wait=round(end_wait, 3))
        self.history.append({"role": "user", "content": text})
        words = set(re.findall(r"[a-z']+", text.lower()))
        if any(set(p.split()) <= words for p in self.cfg["goodbye_phrases"]):
            if self.reply is not None:
                self.hub.cancel(self.call_key)
                self.reply = None
            self._say_canned("goodbye_text")
            self.hangup_after_playout = True
            return
        r = self.reply
        if r is not None and r.held and r.user_text == text:
            r.held = False                         # the speculative reply stands: release its audio
            r.turn = self.turn_no
            for sentence, frames in r.held_segments:
                self.playout.add(sentence, frames, r.turn)
            r.held_segments.clear()
            if r.pending_tool is not None:
                choice, r.pending_tool = r.pending_tool, None
                self._run_tool(r, choice)
            return
        if r is not None:
            self.hub.cancel(self.call_key)
        self._start_reply(text, held=False, stt_seconds=secs)

    def _start_reply(self, text: str, held: bool, stt_seconds: float) -> None:
        last_voice = self.ep.last_voiced or time.monotonic()
        r = Reply(self.turn_no, text, last_voice, held, stt_seconds=stt_seconds)
        r.llm_at = time.monotonic()
        self.playout.take_heard()                 # heard-text accounting starts with this reply
        self.reply = r
        self._model_round(r, [{"role": "user", "content": text}] if held else [])

    def _model_round(self, r: Reply, extra: list[dict]) -> None:
        """Ask the model for the next part of reply ``r`` (offering tools while rounds are left)."""
        params = {"max_tokens": self.cfg["max_reply_tokens"], "temperature": self.cfg["temperature"],
                  "repeat_penalty": self.cfg["repeat_penalty"],
                  "tools": self.dialog.tools_for(r.user_text, r.rounds) if r.user_text else []}
        r.llm_done = False
        r.cutter = SentenceCutter()
        r.llm_rid = self.hub.llm(self.call_key, self._messages(extra), params,
                                 on_token=lambda tok: self._on_token(r, tok),
                                 on_done=lambda secs, n: self._on_llm_done(r, secs, n),
                                 on_error=lambda msg: self._reply_error(r, msg),
                                 on_tool=lambda choice: self._on_tool(r, choice))

    # -- tools ------------------------------------------------------------------------
    def _on_tool(self, r: Reply, choice: dict) -> None:
        if r is not self.reply or self.tools is None:
            return
        r.tool_busy = True                         # keeps the reply open until the tool answers
        if r.held:
            r.pending_tool = choice                # run it only if the caller really finished
            return
        self._run_tool(r, choice)

    def _run_tool(self, r: Reply, choice: dict) -> None:
        r.tool_busy = True
        r.rounds += 1
        spec = self.tools.specs.get(choice.get("tool"))
        after = self.tool_settings.get("filler_after", 1.0)
        if spec is not None and spec.filler and after:
            r.filler = asyncio.get_running_loop().call_later(after, self._filler, r)
        task = asyncio.ensure_future(self.tools.call(self.tool_ctx, choice.get("tool", ""), choice.get("arguments"),
                                                     choice.get("id")))
        task.add_done_callback(lambda t: self._tool_done(r, choice, t))

    def _filler(self, r: Reply) -> None:
        r.filler = None
        if r is self.reply and r.tool_busy and not self._speaking() and not self.ep.in_speech:
            self._say_canned("tool_filler_text")

    def _tool_done(self, r: Reply, choice: dict, task: asyncio.Task) -> None:
        if r.filler is not None:
            r.filler.cancel()
            r.filler = None
        try:
            o = task.result()
        except Exception as exc:  # noqa: BLE001 - a bug in a tool path must not end the call
            log.exception("tool %s failed on call %s", choice.get("tool"), self.session.call_id)
            o = Outcome(str(choice.get("tool")), choice.get("id") or "tc_error", "error", f"internal error: {exc}",
                        kind="internal")
        self.dialog.add_tool(o, choice.get("arguments"))
        self.session.tool_calls.append(o.audit)
        self.session.emit("tool_called", {k: o.audit.get(k) for k in (
            "tool_call_id", "tool", "status", "kind", "http_status", "attempts", "seconds", "args", "result")})
        self._log_tool(o)
        if r is not self.reply:                    # barged in meanwhile: the result is in the history
            return
        r.tool_busy = False
        if o.status in ("unavailable", "quota", "error"):
            r.llm_done = True
            for key in ("tool_unavailable_text", "tool_fallback_text"):
                self._say_canned(key)
                r.sentences.append(self.cfg[key])
            return
        if o.say:
            self._say_line(r, o.say)
            return
        self._model_round(r, [])

    def _say_line(self, r: Reply, text: str) -> None:
        """Reply ``r`` is this fixed line (a tool's ``say``), sentence by sentence, no model round."""
        r.llm_done = True
        for sentence in [*r.cutter.feed(text + " "), *r.cutter.flush()]:
            self._speak(r, sentence)

    def _log_tool(self, o) -> None:
        rec = {"call_id": self.session.call_id, "turn": self.turn_no, "role": "tool", "tool": o.tool,
               "status": o.status, "kind": o.kind, "seconds": o.seconds}
        self.turns.append({"event": "tool", "at": time.time(), **rec})

    def on_tool_result(self, tool: str, result: dict, say: str | None) -> None:
        """An async tool result for this call: into the history now, spoken when the line is free."""
        self.dialog.add_update(tool, result)
        self.updates.append((tool, result, say))

    def _speak_update(self, tool: str, result: dict, say: str | None) -> None:
        r = Reply(self.turn_no, "", time.monotonic(), held=False)
        r.llm_at = time.monotonic()
        self.playout.take_heard()
        self.reply = r
        if say:
            self._say_line(r, say)
        else:
            self._model_round(r, [])

    def _on_token(self, r: Reply, tok: str) -> None:
        if r is not self.reply:
            return
        if r.first_token_at is None:
            r.first_token_at = time.monotonic()
            self.metrics.turn_latency.labels("llm_first_token").observe(r.first_token_at - r.llm_at)
        for sentence in r.cutter.feed(tok):
            self._speak(r, sentence)

    def _on_llm_done(self, r: Reply, secs: float, ntok: int) -> None:
        if r is not self.reply:
            return
        for sentence in r.cutter.flush():
            self._speak(r, sentence)
        r.llm_done = True
        if ntok and secs:
            self.metrics.llm_tokens_per_second.observe(ntok / secs)

    def _speak(self, r: Reply, sentence: str) -> None:
        sentence = clean_for_speech(sentence)
        if not sentence:
            return
        r.sentences.append(sentence)
        r.tts_pending += 1
        if r.tts_at is None:
            r.tts_at = time.monotonic()
        state = {"first": True, "audio_s": 0.0}

        def on_pcm(pcm, rate):
            state["audio_s"] += len(pcm) / 2 / rate
            if r is not self.reply:
                return
            if r.first_audio_at is None:
                r.first_audio_at = time.monotonic()
                self.metrics.turn_latency.labels("tts_first_audio").observe(r.first_audio_at - r.tts_at)
            frames = self.hub.to_frames(pcm, rate)
            if not frames:
                return
            text = sentence if state["first"] else ""
            state["first"] = False
            if r.held:
                r.held_segments.append((text, frames))
            else:
                self.playout.add(text, frames, r.turn)
            if not r.marked and self.session.media.mark is None and self.session.media.mark_time is None:
                self.session.media.mark_frame(frames[0])

        def on_done(secs):
            if state["audio_s"]:
                self.metrics.rtf.labels("tts").observe(secs / state["audio_s"])
            if r is self.reply:
                r.tts_pending -= 1

        self.hub.tts(self.call_key, sentence, on_pcm, on_done=on_done, on_error=lambda m: self._reply_error(r, m))

    def _reply_finished(self, r: Reply) -> None:
        self.reply = None
        self.playout.take_heard()
        text = " ".join(r.sentences)
        if text:
            self.history.append({"role": "assistant", "content": text})
        self._log_turn("agent", text, heard=text, interrupted=False,
                       llm_first_token=round((r.first_token_at or r.llm_at) - r.llm_at, 3),
                       tts_first_audio=round((r.first_audio_at or 0) - (r.tts_at or 0), 3) if r.tts_at else None)
        self.session.media.mark_time = None
        self.last_activity = time.monotonic()

    def _reply_error(self, r: Reply, msg: str) -> None:
        if r is not self.reply:
            return
        r.failed = True
        self._engine_error(msg)

    def _engine_error(self, msg: str) -> None:
        log.warning("call %s: engine error, apologising: %s", self.session.call_id, msg)
        if self.reply is not None:
            self.hub.cancel(self.call_key)
            self.reply = None
        self.spec = None
        self._say_canned("apology_text")

    def _barge_in(self, onset: float) -> None:
        media = self.session.media
        cleared = media.flush_out()
        heard = self.playout.flush(cleared)
        now = time.monotonic()
        self.metrics.bargein_latency.observe(max(0.0, now - onset))
        self.metrics.interruptions.inc()
        r = self.reply
        if r is not None:
            self.hub.cancel(self.call_key)
            self.reply = None
        media.mark = None
        media.mark_time = None
        if r is not None or heard.text:
            spoken = " ".join(r.sentences) if r is not None else heard.text
            if heard.text:
                self.history.append({"role": "assistant", "content": heard.text})
            self._log_turn("agent", spoken, heard=heard.text, interrupted=True,
                           bargein_latency=round(now - onset, 3))
        event(log, "barge_in", call_id=self.session.call_id, heard=heard.text, latency=round(now - onset, 3))
