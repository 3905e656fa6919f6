"""The local voice agent on a call: the adapter between the turn machine and the world.

One ``AgentApp`` per call, driven by the cell's 20 ms tick (``on_frames`` /
``on_tick``) and by replies from the inference process (callbacks posted on
the loop). All turn-taking lives in ``bridge.agent.turn.TurnMachine`` (see
there, and the README's "The voice agent"): this class runs the VAD on each
uplink frame, passes frames, ticks, model/TTS/tool answers and the time in,
and carries out the actions that come back: requests to the inference hub,
tool calls through the cell's ``ToolRunner`` (a task on the loop), audio onto
the call's downlink, turn records, events, metrics and the hang-up.

Clock reads happen here only: the tick's ``now`` comes from the cell, and a
callback from the hub or a tool reads ``clock()`` once when it arrives.
"""
from __future__ import annotations

import asyncio
import logging
import time

from ai.vad_silero import detector as vad_detector
from bridge.agent import outcome as call_outcome
from bridge.agent.actions import (Action, AuditTool, CallTool, Cancel, ClearMark, Emit, Flush, Frame, HangUp, Line,
                                  LogEvent, LogTool, LogTurn, MarkFrame, Metric, Release, RequestReply, RequestStt,
                                  ScoreTurn, Send, Synthesize, ToolChoice, Transcript)
from bridge.agent.profile import ProfiledCall
from bridge.agent.speakable import Speakable
from bridge.agent.tools.runner import CallContext, Outcome
from bridge.agent.turn import Reply, State, TurnMachine
from bridge.core import pii
from bridge.core.app import App
from bridge.core.logs import event
from media.resample import Resampler

log = logging.getLogger("trunkline.agent")


class AgentApp(ProfiledCall, App):       # ProfiledCall: the call's profile, context and language
    name = "agent"

    def __init__(self, session, hub, cfg: dict, metrics, turns, tools=None, tool_settings: dict | None = None,
                 clock=time.monotonic):
        super().__init__(session)
        self.hub = hub
        self.cfg = cfg
        self.metrics = metrics
        self.turns = turns
        self.clock = clock
        self.rate = session.media.rate
        self.vad = vad_detector(cfg.get("vad", "webrtc"), self.rate, cfg["vad_mode"])
        self.to16k = None if self.rate == 16000 else Resampler(self.rate, 16000)
        self.tools = tools
        self.call_key = session.call_id
        if tools is not None:
            self.tool_ctx = CallContext(session.call_id, session.from_uri, session.to_uri,
                                        context=dict(getattr(session, "context", None) or {}))
        self.outcome: call_outcome.CallOutcome | None = None    # what came of the call, once it has ended
        self.machine = TurnMachine(cfg, hub.canned, tools, tool_settings, call_id=session.call_id, now=clock())

    # -- views (tests, the API) ---------------------------------------------------------
    @property
    def history(self) -> list[dict]:
        return self.machine.history

    @property
    def reply(self) -> Reply | None:
        return self.machine.reply

    @property
    def state(self) -> State:
        return self.machine.state

    @property
    def playout(self):
        return self.machine.playout

    # -- App hooks ----------------------------------------------------------------------
    def on_answered(self) -> None:
        self.hub.joined(self.call_key)              # left in on_end
        if self.hold_answer():           # the call's own greeting is still being rendered
            return
        self._run(self.machine.answered(self.clock()))

    def on_frames(self, frames, now):
        for t, pcm in frames:
            pcm16 = pcm if self.to16k is None else self.to16k.process(pcm)
            voiced = self.vad.is_speech(pcm)          # energy-gated, DTMF vetoed
            self._run(self.machine.frame(Frame(t, pcm16, voiced, self.vad.last_level), now, self._line()))

    def on_tick(self, now):
        self._run(self.machine.tick(now, self._line()))

    def on_end(self) -> None:
        self.hub.left(self.call_key)
        self._run(self.machine.ended(self.clock()))
        if self.cfg.get("call_summary", True):
            self._summarize()

    def on_dtmf(self, digit: str) -> None:
        if self.tools is not None:
            self.tool_ctx.evidence.dtmf(digit)          # ids keyed by the caller may be used by tools

    def on_tool_result(self, tool: str, result: dict, say: str | None) -> None:
        """An async tool result for this call (from the API's callback route)."""
        if self.tools is not None:
            self.tool_ctx.evidence.tool_result(result)
        self._run(self.machine.tool_result(tool, result, say, self.clock()))

    def _line(self) -> Line:
        media = self.session.media
        return Line(media.queued_out(), media.mark_time, self.hub.stt_backlog(), self.hub.model_calls())

    # -- carrying out actions --------------------------------------------------------------
    def _run(self, actions: list[Action]) -> None:
        for a in actions:
            self._do(a)

    def _do(self, a: Action) -> None:
        media, session = self.session.media, self.session
        match a:
            case Send(frames=frames):
                for f in frames:
                    media.downlink.push(f)
            case Flush():
                media.flush_out()
            case MarkFrame(pcm=pcm):
                media.mark_frame(pcm)
            case ClearMark(time_only=time_only):
                if not time_only:
                    media.mark = None
                media.mark_time = None
            case RequestStt() | RequestReply() | ScoreTurn() | Synthesize() | Cancel() | Release():
                self._to_hub(a)
            case CallTool():
                self._call_tool(a)
            case HangUp(reason=reason):
                session.hangup(reason)
            case LogTurn():
                self._log_turn(a)
            case LogTool():
                self.turns.append({"event": "tool", "at": time.time(), "call_id": session.call_id, "turn": a.turn,
                                   "role": "tool", "tool": a.tool, "status": a.status, "kind": a.kind,
                                   "seconds": a.seconds})
            case AuditTool(audit=audit):
                session.tool_calls.append(audit)
            case Emit(type=etype, data=data):
                session.emit(etype, data)
            case LogEvent(name=name, fields=fields):
                event(log, name, **fields)
            case Metric():
                m = getattr(self.metrics, a.name)
                if a.label is not None:
                    m = m.labels(a.label)
                if a.count:
                    m.inc()
                else:
                    m.observe(a.value)
            case _:
                raise TypeError(f"unknown agent action {a!r}")

    def _log_turn(self, a: LogTurn) -> None:
        rec = {"call_id": self.session.call_id, "turn": a.turn, "role": a.role, "text": a.text, **a.extra}
        self.turns.append({"event": "turn", "at": time.time(), **rec})
        event(log, "turn", **rec)
        if a.role == "caller" and a.text and self.tools is not None and not a.extra.get("unclear"):
            self.tool_ctx.evidence.caller(a.text)        # what the caller said may be used by tools
        said = a.text if a.role == "caller" else a.extra.get("heard", a.text)
        if said:
            self.session.record_transcript("in" if a.role == "caller" else "out", said, None,
                                           {k: v for k, v in a.extra.items() if k != "heard"} or None)

    # -- the inference hub (its callbacks feed the machine) ----------------------------------
    def _to_hub(self, a: Action) -> None:
        hub, key, m = self.hub, self.call_key, self.machine
        match a:
            case RequestStt(decode=d, pcm16k=pcm, interim=True):
                hub.stt(key, pcm, True, lambda *res: self._run(m.interim_result(d, Transcript(*res), self.clock())),
                        on_error=lambda msg: self._run(m.interim_failed(d, self.clock())), **self.stt_args)
            case RequestStt(decode=d, pcm16k=pcm):
                hub.stt(key, pcm, False, lambda *res: self._run(m.stt_result(d, Transcript(*res), self.clock())),
                        on_error=lambda msg: self._run(m.stt_failed(d, msg, self.clock())), **self.stt_args,
                        **({"prompt": a.prompt} if a.prompt else {}))
            case RequestReply(reply=None):                 # warm-up: nobody listens to the answer
                hub.llm(key, a.messages, a.params, on_token=lambda tok: None, on_done=lambda *_: None,
                        on_error=lambda msg: None)
            case RequestReply(reply=r):
                # Only speakable text reaches the machine (and so TTS and the history): no markup.
                sp = Speakable(self.cfg.get("markup_fallback_text", ""))

                def said(text: str) -> None:
                    if text:
                        self._run(m.token(r, text, self.clock()))

                def chose(choice: dict) -> None:
                    sp.chose_tool()
                    self._run(m.tool_chosen(r, ToolChoice.of(choice), self.clock()))

                def done(secs: float, n: int) -> None:
                    said(sp.finish())
                    if sp.dropped:
                        event(log, "markup_dropped", call_id=self.session.call_id, pieces=len(sp.dropped))
                    self._run(m.reply_done(r, secs, n, self.clock()))
                hub.llm(key, a.messages, a.params, on_token=lambda tok: said(sp.feed(tok)), on_done=done,
                        on_error=lambda msg: self._run(m.reply_failed(r, msg, self.clock())), on_tool=chose)
            case ScoreTurn(decision=d, pcm16k=pcm):
                hub.turn(key, pcm, lambda p, secs: self._run(m.turn_score(d, p, secs, self.clock())),
                         on_error=lambda msg: self._run(m.turn_failed(d, msg, self.clock())))
            case Synthesize():
                self._synthesize(a)
            case Cancel():
                hub.cancel(key)
            case Release():
                hub.release(key)

    def _synthesize(self, a: Synthesize) -> None:
        m = self.machine
        audio = {"seconds": 0.0}

        def on_pcm(pcm, rate):
            audio["seconds"] += len(pcm) / 2 / rate
            if m.is_current(a.reply):
                self._run(m.speech_audio(a.reply, a.seq, self.hub.to_frames(pcm, rate), self.clock()))

        def on_done(secs):
            if audio["seconds"]:
                self.metrics.rtf.labels("tts").observe(secs / audio["seconds"])
            self._run(m.speech_done(a.reply, self.clock()))

        self.hub.tts(self.call_key, a.text, on_pcm, on_done=on_done,
                     on_error=lambda msg: self._run(m.reply_failed(a.reply, msg, self.clock())), **self.tts_args)

    # -- tools -----------------------------------------------------------------------------
    def _call_tool(self, a: CallTool) -> None:
        c = a.choice
        self.session.emit("intent_detected", {"intent": c.tool, "tool": c.tool, "tool_call_id": c.id})
        task = asyncio.ensure_future(self.tools.call(self.tool_ctx, c.tool, c.arguments, c.id))
        task.add_done_callback(lambda t: self._tool_done(a, t))

    def _tool_done(self, a: CallTool, task: asyncio.Task) -> None:
        c = a.choice
        try:
            o = task.result()
        except Exception as exc:  # noqa: BLE001 - a bug in a tool path must not end the call
            log.exception("tool %s failed on call %s", c.tool, self.session.call_id)
            o = Outcome(c.tool, c.id or "tc_error", "error", f"internal error: {exc}", kind="internal")
        self._run(self.machine.tool_done(a.reply, c, o, self.clock()))

    # -- the call's outcome ------------------------------------------------------------------
    def _transferred(self) -> bool:
        s = self.session
        if getattr(s, "transferred_to", None):
            return True
        services = getattr(s, "services", None)
        keys = services.cfg.raw["app"]["dtmf_transfer"] if services is not None else {}
        return any(d in keys for d in getattr(s, "dtmf", ""))

    def _summarize(self) -> None:
        """Ask the model what came of the call (in the inference process; the loop only parses the answer)."""
        facts = call_outcome.facts_of(self.history, self._transferred(), self.cfg.get("tool_fallback_text", ""))
        history = list(self.history)

        def later(o: call_outcome.CallOutcome) -> None:
            try:
                asyncio.get_running_loop().call_soon(self._outcome, o)    # after call_hangup
            except RuntimeError:
                self._outcome(o)
        try:
            call_outcome.summarize(self.hub, self.call_key + ":outcome", history, facts, later)
        except Exception:  # noqa: BLE001 - a summary must never hurt the call's cleanup
            log.exception("call summary failed on call %s", self.session.call_id)

    def _outcome(self, o: call_outcome.CallOutcome) -> None:
        self.outcome = o
        data = pii.mask(o.as_dict())
        s = self.session
        event(log, "call_summary", call_id=s.call_id, disposition=o.disposition, source=o.source)
        services = getattr(s, "services", None)
        if services is not None:
            cid = s.call_id
            services.bus.writer.sql(lambda st: st.set_call_outcome(cid, data), "call outcome",
                                    {"call_id": cid, "outcome": data})
        s.emit("call_summary", data)
