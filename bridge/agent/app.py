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

from bridge.agent.actions import (Action, AuditTool, CallTool, Cancel, ClearMark, Emit, Flush, Frame, HangUp, Line,
                                  LogEvent, LogTool, LogTurn, MarkFrame, Metric, Release, RequestReply, RequestStt,
                                  Send, Synthesize, ToolChoice, Transcript)
from bridge.agent.tools.runner import CallContext, Outcome
from bridge.agent.turn import Reply, State, TurnMachine
from bridge.core.app import App
from bridge.core.logs import event
from media.resample import Resampler
from media.vad import VoiceDetector

log = logging.getLogger("trunkline.agent")


class AgentApp(App):
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
        self.vad = VoiceDetector(self.rate, cfg["vad_mode"])
        self.to16k = None if self.rate == 16000 else Resampler(self.rate, 16000)
        self.tools = tools
        self.call_key = session.call_id
        if tools is not None:
            self.tool_ctx = CallContext(session.call_id, session.from_uri, session.to_uri)
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
        self._run(self.machine.answered(self.clock()))

    def on_frames(self, frames, now):
        for t, pcm in frames:
            pcm16 = pcm if self.to16k is None else self.to16k.process(pcm)
            voiced = self.vad.is_speech(pcm)          # energy-gated, DTMF vetoed
            self._run(self.machine.frame(Frame(t, pcm16, voiced, self.vad.last_level), now, self._line()))

    def on_tick(self, now):
        self._run(self.machine.tick(now, self._line()))

    def on_end(self) -> None:
        self._run(self.machine.ended(self.clock()))

    def on_tool_result(self, tool: str, result: dict, say: str | None) -> None:
        """An async tool result for this call (from the API's callback route)."""
        self._run(self.machine.tool_result(tool, result, say, self.clock()))

    def _line(self) -> Line:
        media = self.session.media
        return Line(media.queued_out(), media.mark_time, self.hub.stt_backlog())

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
            case RequestStt() | RequestReply() | Synthesize() | Cancel() | Release():
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
                        on_error=lambda msg: self._run(m.interim_failed(d, self.clock())))
            case RequestStt(decode=d, pcm16k=pcm):
                hub.stt(key, pcm, False, lambda *res: self._run(m.stt_result(d, Transcript(*res), self.clock())),
                        on_error=lambda msg: self._run(m.stt_failed(d, msg, self.clock())))
            case RequestReply(reply=None):                 # warm-up: nobody listens to the answer
                hub.llm(key, a.messages, a.params, on_token=lambda tok: None, on_done=lambda *_: None,
                        on_error=lambda msg: None)
            case RequestReply(reply=r):
                hub.llm(key, a.messages, a.params,
                        on_token=lambda tok: self._run(m.token(r, tok, self.clock())),
                        on_done=lambda secs, n: self._run(m.reply_done(r, secs, n, self.clock())),
                        on_error=lambda msg: self._run(m.reply_failed(r, msg, self.clock())),
                        on_tool=lambda choice: self._run(m.tool_chosen(r, ToolChoice.of(choice), self.clock())))
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
                     on_error=lambda msg: self._run(m.reply_failed(a.reply, msg, self.clock())))

    # -- tools -----------------------------------------------------------------------------
    def _call_tool(self, a: CallTool) -> None:
        c = a.choice
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
