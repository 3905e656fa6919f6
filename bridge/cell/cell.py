"""A cell: one process, one SIP engine, at most 3 calls, one asyncio loop.

Threads and hand-offs:
- the SIP engine thread owns pjsua2 and posts events here with
  ``call_soon_threadsafe`` (a few per call, never per frame);
- pjmedia's clock thread moves frames through each call's ``CallMedia``;
- this loop runs a 20 ms tick that drains every call's uplink into its app
  and serves HTTP. An app that raises ends its own call only;
- the durable writer thread (``bridge/records/writer.py``) persists what the
  loop enqueues (call rows, transcripts, events, JSONL records): no disk
  write on the tick.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
import os
import signal
import time
from dataclasses import replace
from typing import Any, Callable

from bridge.core import pii
from bridge.cell.apps import make_app
from bridge.api.events import EventBus, Tailer
from bridge.api.services import Services
from bridge.records.store import Store
from bridge.api.webhooks import WebhookDispatcher
from bridge.core.config import CODEC_IDS, Config
from bridge.core.logs import event
from bridge.core.metrics import Metrics
from bridge.core.states import CallState
from bridge.records.journal import CallRecords
from bridge.records import writer as records_writer
from bridge.records.recording import Recordings
from bridge.cell.session import Session
from bridge.api.bot import BotApp
from bridge.api.stream_manager import StreamManager
from bridge.api.streams import MediaStream
from bridge.core import numbers as number_routes
from sip import commands as cmd
from sip import events as ev
from sip.engine import Engine, EngineConfig
from sip.uri import user_part
from bridge.core.handoff import targets as handoff_targets

log = logging.getLogger("trunkline.cell")
ENDED_KEPT = 64
calls_log = logging.getLogger("trunkline.call")

TICK = 0.020


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _sip_tcp(sip: dict, host: str) -> bool:
    """sip.tcp: "auto" is UDP only. pjsip's select() ioqueue in the wheel holds 64 sockets, and a
    closed connection keeps its slot for 500 ms: idle connections lock TCP trunks out, and a burst
    of short connections (found by the fuzzer, ~110-300 of them) aborts the process on an assertion.
    TCP trunks go through the front (Kamailio speaks UDP to cells); "on" is an operator's opt-in."""
    del host
    return sip["tcp"] == "on"


def engine_config(cfg: Config) -> EngineConfig:
    sip, media = cfg.raw["sip"], cfg.raw["media"]
    host, _, port = sip["listen"].rpartition(":")
    lo, _, hi = media["rtp_ports"].partition("-")
    return EngineConfig(
        host=host.strip("[]"), port=int(port), public_address=sip["public_address"],
        media_public_address=sip["media_public_address"], rtp_host=os.environ.get("TRUNKLINE_CELL_RTP_HOST", ""),
        user_agent=sip["user_agent"], rtp_low=int(lo), rtp_high=int(hi),
        clock_rate=cfg.clock_rate, codecs=tuple(CODEC_IDS[c.upper()] for c in sip["codecs"]),
        capacity=sip["capacity"], retry_after=sip["retry_after"], answer_delay=sip["answer_delay"],
        rtp_timeout=sip["rtp_timeout"], realtime_clock=media["realtime_clock"], log_level=sip["log_level"],
        jitter_init_ms=media["jitter_init_ms"], jitter_min_ms=media["jitter_min_ms"], jitter_max_ms=media["jitter_max_ms"],
        tcp=_sip_tcp(sip, host.strip("[]")),
        require_guard=sip["require_guard"] == "on" or (sip["require_guard"] == "auto" and not _loopback(host.strip("[]"))),
        proxy_port=sip["trusted_proxy_port"],
        allowed_destinations=tuple(sip["allowed_destinations"]),
        fixed_destinations=(tuple(cfg.raw["app"]["dtmf_transfer"].values())       # operator-configured targets
                            + handoff_targets(cfg.raw.get("transfer", {}))),
        # behind the front (TRUNKLINE_CELL) the front registers the trunks (uac_reg), never a cell
        trunks=[replace(t, register=t.register and "TRUNKLINE_CELL" not in os.environ,
                        proxy=sip["outbound_proxy"]) for t in cfg.trunks],
    )


class Cell:
    def __init__(self, cfg: Config, metrics: Metrics | None = None):
        self.cfg = cfg
        pii.configure(cfg.raw["pii"]["mask_cards"], cfg.raw["pii"]["patterns"], cfg.raw["pii"]["show_dtmf"])
        self.metrics = metrics or Metrics()
        self.metrics.capacity.set(cfg.raw["sip"]["capacity"])
        self.sessions: dict[str, Session] = {}
        self.ready = False
        self.draining = False
        self.stopped = asyncio.Event()
        self.engine_failed: str | None = None
        os.makedirs(cfg.data_dir, exist_ok=True)
        self.records = CallRecords(cfg.data_dir, on_error=self.metrics.record_errors.inc)
        self.turns = CallRecords(cfg.data_dir, on_error=self.metrics.record_errors.inc, name="turns.jsonl")
        self.hub = None                          # the inference process (agent and API speech)
        self.tools = None                        # the business API tools the agent may call
        if cfg.toolbox is not None and cfg.toolbox.tools:
            from bridge.agent.tools.runner import ToolRunner
            base = cfg.raw["tools"]["callback_base_url"] or "http://" + cfg.raw["http"]["listen"].replace(
                "0.0.0.0:", "127.0.0.1:")
            self.tools = ToolRunner(cfg.toolbox, cfg.raw["tools"], self.metrics, callback_base=base,
                                    mask=pii.mask, guard=cfg.outbound)     # card numbers and configured patterns out of audits
        self.store = Store(cfg.data_dir)
        # the durable writer: call rows, transcripts, events and JSONL records are persisted off the tick
        self.writer = records_writer.for_cell(cfg.data_dir, self.store, self.metrics)
        self.records.writer = self.turns.writer = self.writer
        self.cell_id = os.environ.get("TRUNKLINE_CELL", "0")
        closed = self.store.close_open_calls("bridge restarted", self.cell_id)
        if closed:
            log.warning("closed %d call records left open by an earlier run", closed)
        for number, app in cfg.raw["numbers"].items():
            self.store.set_number(number, number_routes.encode(number_routes.check_route(app)))
        self.bus = EventBus(self.store, self.metrics, self.writer)
        w = cfg.raw["webhooks"]
        self.webhooks = WebhookDispatcher(self.store, self.metrics, w["max_attempts"], w["base_delay"],
                                          w["max_delay"], w["timeout"], guard=cfg.outbound,
                                          retry_for=w["retry_for"])
        self.tailer = Tailer(self.store)
        self.bus.on_stored = self.tailer.wake        # an event committed: tell its subscribers now
        if w["dispatch"]:
            self.tailer.subscribe(self.webhooks.on_event)
        self.tailer.wanted = lambda: len(self.tailer.listeners) > int(w["dispatch"]) or (
            w["dispatch"] and self.webhooks.has_hooks())
        self._calls_waiting = asyncio.Event()
        self._tail_task: asyncio.Task | None = None
        self.engine = Engine(engine_config(cfg), self._post_event)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_task: asyncio.Task | None = None
        # the last ENDED_KEPT ended calls (`trunkline call` reads the first; a list grew by one
        # CallEnded, its Quality and timing, per call for the cell's whole life)
        self.ended: deque[ev.CallEnded] = deque(maxlen=ENDED_KEPT)
        self.snapshot = ev.CallsSnapshot(0)      # the engine's latest live view (never read from the engine)
        # what the API, the sessions, streams and recordings use of this cell
        self.services = Services(cfg=cfg, store=self.store, metrics=self.metrics, tailer=self.tailer,
                                 webhooks=self.webhooks, cell_id=self.cell_id, bus=self.bus, calls=self.sessions,
                                 submit=self.engine.submit, make_call=self.make_call,
                                 live_quality=self.live_quality, hub=self.hub, tools=self.tools)
        self.streams = StreamManager(self.services)       # media streams (WebSocket audio taps)
        self.recordings = Recordings(self.services)       # encrypted call recordings (audio taps)
        self.services.streams, self.services.recordings = self.streams, self.recordings
        # the engine's events, by type (an event with no handler here is ignored)
        self._handlers: dict[type, Callable[[Any], None]] = {
            ev.CallOffered: self._ev_CallOffered, ev.CallAnswered: self._ev_CallAnswered,
            ev.CallRejected: self._ev_CallRejected, ev.CallHold: self._ev_CallHold, ev.Dtmf: self._ev_Dtmf,
            ev.TransferStatus: self._ev_TransferStatus, ev.Registration: self._ev_Registration,
            ev.EngineStopped: self._ev_EngineStopped, ev.CallEnded: self._ev_CallEnded,
            ev.CallsSnapshot: self._ev_CallsSnapshot, ev.CallAttemptFailed: self._ev_CallAttemptFailed,
        }
        self._rec_task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Load the models (agent app), then start SIP. Raises EngineLoadError / EngineError."""
        self._loop = asyncio.get_running_loop()
        self.writer.start(self._loop)
        self._purge()
        self._tail_task = asyncio.create_task(self.tailer.run(), name="event-tailer")
        self._rec_task = asyncio.create_task(self.recordings.run_retention(), name="recording-retention")
        if self.cfg.raw["webhooks"]["dispatch"]:
            await self.webhooks.start()
        if self.tools is not None:
            await self.tools.start()
        if self.cfg.needs_models():
            from bridge.agent.hub import AiHub
            self.hub = AiHub(self.cfg, self.metrics, self.cfg.clock_rate)
            self.services.hub = self.hub
            try:
                await self.hub.start()
                if "agent" in self.cfg.apps():      # the agent's VAD session, loaded now and off the loop
                    from ai import vad_silero
                    await self._loop.run_in_executor(None, vad_silero.warm, self.cfg.raw["agent"]["vad"])
            except BaseException:
                await self.hub.stop()
                await self.webhooks.stop()
                raise
        try:
            await self._loop.run_in_executor(None, self.engine.start)
        except BaseException:
            if self.hub is not None:
                await self.hub.stop()
            await self.webhooks.stop()
            raise
        self._tick_task = asyncio.create_task(self._ticker(), name="cell-tick")
        self.ready = True

    async def drain(self, timeout: float | None = None) -> None:
        """Refuse new calls (503), let live ones finish, then hang up the rest."""
        timeout = self.cfg.raw["drain_timeout"] if timeout is None else timeout
        self.draining = True
        try:                                     # the engine refuses new calls from now on (503)
            await asyncio.wait_for(asyncio.wrap_future(self.engine.submit(cmd.SetDraining(True))), 5)
        except Exception as exc:  # noqa: BLE001 - an engine that is gone takes no calls anyway
            log.warning("could not tell the SIP engine to drain: %s", exc)
        self.metrics.draining.set(1)
        event(log, "drain_started", calls=len(self.sessions), timeout=timeout)
        deadline = time.monotonic() + timeout
        while self.sessions and time.monotonic() < deadline and self.engine.alive():
            await asyncio.sleep(0.1)
        for s in list(self.sessions.values()):
            s.hangup("drain timeout")
        deadline = time.monotonic() + 5
        while self.sessions and time.monotonic() < deadline and self.engine.alive():
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.ready = False
        await self.streams.close()
        if self._tick_task:
            self._tick_task.cancel()
            try:
                await self._tick_task
            except asyncio.CancelledError:
                pass
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)
        if self.hub is not None:
            await self.hub.stop()
        if self.tools is not None:
            await self.tools.close()
        await self.webhooks.stop()
        if self._tail_task:
            self._tail_task.cancel()
        if self._rec_task:
            self._rec_task.cancel()
        if getattr(self, "_retention_task", None):
            self._retention_task.cancel()
        self.recordings.stop_all("cell stopped")
        await asyncio.get_running_loop().run_in_executor(None, self.writer.close)   # nothing queued is lost
        self.store.close()
        self.stopped.set()

    def _purge(self) -> None:
        """Retention now, then periodically while the cell runs (``bridge/records/lifecycle.py``)."""
        from bridge.records.lifecycle import Retention
        self.retention = Retention(self.store, self.cfg.data_dir, self.cfg.raw["records"]["retention_days"],
                                   self.recordings, self.metrics)
        self.retention.run_once()
        self._retention_task = asyncio.create_task(self.retention.run(), name="records-retention")

    async def make_call(self, uri: str, trunk: str | None = None, app: str | None = None, caller_id: str = "",
                        withhold: bool = False) -> str:
        fut = self.engine.submit(cmd.MakeCall(uri, trunk, app, caller_id, withhold))
        return await asyncio.wrap_future(fut)

    # -- events from the engine thread ---------------------------------------
    def _post_event(self, e) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_event, e)

    def _on_event(self, e) -> None:
        handler = self._handlers.get(type(e))
        if handler is not None:
            handler(e)

    def _ev_CallsSnapshot(self, e: ev.CallsSnapshot) -> None:
        """The engine's live view: active calls and quality for /metrics and the API."""
        self.snapshot = e
        self.metrics.calls_active.set(e.active_calls)
        for call_id, q in e.quality.items():        # a codec the answer did not name yet
            s = self.sessions.get(call_id)
            if s is not None and s.answered_at and not s.codec and q.codec:
                s.codec = q.codec

    def live_quality(self, call_id: str):
        """The latest quality the engine published for a live call (``None`` if none yet)."""
        return self.snapshot.quality.get(call_id)

    def _ev_CallOffered(self, e: ev.CallOffered) -> None:
        self._calls_waiting.set()
        s = Session(self.services, e)
        self.sessions[e.call_id] = s
        route = e.app or self.app_for(e.to_uri)
        s.app_name = number_routes.app_name(route)
        event(calls_log, "call_offered", call_id=e.call_id, direction=e.direction,
              **{"from": e.from_uri}, to=e.to_uri, source=e.source, trunk=e.trunk, app=s.app_name,
              sip_headers=sorted(s.sip_headers))           # names only: the values are caller data
        self._record(s)
        s.emit("call_ringing", {"direction": e.direction, "from": e.from_uri, "to": e.to_uri, "app": s.app_name,
                                **({"sip_headers": s.sip_headers} if s.sip_headers else {})})
        try:
            # the api app runs without models too (media streams); its transcribes/speakings need them
            if s.app_name == "agent" and self.hub is None:
                raise RuntimeError(f"app {s.app_name!r} needs the models, which this cell did not load")
            if s.app_name == "stream":            # a number routed straight to a bot
                h = self.cfg.raw["http"]          # where the bot hangs up (the route's api_base wins)
                base = ("https://" if h["tls_cert"] else "http://") + h["listen"].replace("0.0.0.0:", "127.0.0.1:")
                s.app = BotApp(s, self.streams, number_routes.decode(route), base)
            else:
                s.app = make_app(s.app_name, s, self)
            s.app.on_start()
        except Exception as exc:  # noqa: BLE001 - a bad app/prompt ends this call only
            self._app_failed(s, exc)

    def _ev_CallAnswered(self, e: ev.CallAnswered) -> None:
        s = self.sessions.get(e.call_id)
        if s is None:
            return
        s.answered_at = time.monotonic()
        s.codec = e.codec or self._codec_of(e.call_id)
        s.state = CallState.PROGRESSING
        s.address = e.address
        event(calls_log, "call_answered", call_id=e.call_id, codec=s.codec)
        self._record(s)
        s.emit("call_progressing", {"codec": s.codec, **({"address": e.address} if e.address else {})})
        self.recordings.on_answered(s)
        for sp in s.speakings.values():
            sp.activate()
        if s.app is not None:
            try:
                s.app.on_answered()
            except Exception as exc:  # noqa: BLE001
                self._app_failed(s, exc)

    def _ev_CallRejected(self, e: ev.CallRejected) -> None:
        self.metrics.sip_rejected.labels(e.reason).inc()
        self.metrics.calls_total.labels("inbound", "rejected").inc()
        event(calls_log, "call_rejected", source=e.source, **{"from": e.from_uri}, to=e.to_uri,
              status=e.status, reason=e.reason)

    def _ev_CallAttemptFailed(self, e: ev.CallAttemptFailed) -> None:
        event(calls_log, "call_failover", call_id=e.call_id, address=e.address, status=e.status, next=e.next_address)
        s = self.sessions.get(e.call_id)
        if s is not None:
            s.attempt_failed(e.address, e.status, e.reason, e.next_address)
            self._record(s)

    def _ev_CallHold(self, e: ev.CallHold) -> None:
        event(calls_log, "call_hold" if e.held else "call_unhold", call_id=e.call_id)

    def _ev_Dtmf(self, e: ev.Dtmf) -> None:
        self.metrics.dtmf.labels(e.method).inc()
        s = self.sessions.get(e.call_id)
        # A digit typed while the recording is paused (a PCI moment) stays out of logs, events and records.
        shown = pii.dtmf(e.digit, s is not None and self.recordings.on_dtmf(s, e.digit, e.duration_ms))
        event(calls_log, "dtmf", call_id=e.call_id, digit=shown, method=e.method, duration_ms=e.duration_ms)
        if s is None:
            return
        s.dtmf += shown
        s.emit("dtmf_received", {"digit": shown, "method": e.method, "duration_ms": e.duration_ms,
                                 **({"masked": True} if shown != e.digit else {})})
        for tap in s.taps:      # a Twilio stream the API added: the digit when events show it
            if isinstance(tap, MediaStream) and not tap.bot and shown == e.digit:
                tap.on_dtmf(shown)
        target = self.cfg.raw["app"]["dtmf_transfer"].get(e.digit)
        if target:
            s.transfer(target)
        elif s.app is not None:
            try:
                s.app.on_dtmf(e.digit)
            except Exception as exc:  # noqa: BLE001
                self._app_failed(s, exc)

    def _ev_TransferStatus(self, e: ev.TransferStatus) -> None:
        event(calls_log, "transfer_status", call_id=e.call_id, status=e.status, reason=e.reason, final=e.final)
        s = self.sessions.get(e.call_id)
        hook = getattr(s.app, "on_transfer_status", None) if s is not None else None
        if hook is not None:                     # an agent's blind handoff (bridge/cell/handoff.py)
            hook(e.status, e.reason, e.final)

    def _ev_Registration(self, e: ev.Registration) -> None:
        event(log, "registration", trunk=e.trunk, status=e.status, reason=e.reason, registered=e.registered)

    def _ev_EngineStopped(self, e: ev.EngineStopped) -> None:
        if e.error:
            self.engine_failed = e.error
            log.error("SIP engine stopped: %s", e.error)
            self.stopped.set()

    def _ev_CallEnded(self, e: ev.CallEnded) -> None:
        s = self.sessions.pop(e.call_id, None)
        if self.hub is not None:
            self.hub.left(e.call_id)        # also when its agent failed and was dropped without on_end
        if s is not None:
            self._flush_timing(s)
            if s.app is not None:
                try:
                    hook = getattr(s.app, "on_call_ended", None)    # a handoff leg wants the SIP status
                    if hook is not None:
                        hook(e.status, e.reason)
                    s.app.on_end()
                except Exception:  # noqa: BLE001
                    log.exception("app cleanup failed on call %s", e.call_id)
            for tap in list(s.taps):                  # streams/recordings end before call_hangup
                ended = getattr(tap, "call_ended", None)
                if ended is not None:
                    try:
                        ended()
                    except Exception:  # noqa: BLE001
                        log.exception("audio tap cleanup failed on call %s", e.call_id)
        result = "answered" if e.answered else ("cancelled" if e.reason == "cancelled" else "failed")
        self.metrics.calls_total.labels(e.direction, result).inc()
        q = e.quality
        if e.answered:
            self.metrics.duration.observe(e.duration)
            if q.rx_packets:
                self.metrics.mos.observe(q.mos)
                self.metrics.jitter.observe(q.rx_jitter_ms / 1000)
                self.metrics.loss.observe(q.loss_ratio)
                self.metrics.late.observe(q.late_ratio)
        timing = e.timing
        rec = {
            "call_id": e.call_id, "direction": e.direction, "result": result, "reason": e.reason,
            "status": e.status, "duration": round(e.duration, 3),
            "from": s.from_uri if s else "", "to": s.to_uri if s else "", "trunk": s.trunk if s else None,
            "source": s.source if s else "", "dtmf": s.dtmf if s else "",
            "codec": q.codec, "mos": round(q.mos, 2) if q.rx_packets else None,
            "jitter_ms": round(q.rx_jitter_ms, 2), "loss": round(q.loss_ratio, 4), "late": round(q.late_ratio, 4),
            "rtt_ms": q.rtt_ms, "rx_packets": q.rx_packets, "tx_packets": q.tx_packets,
            "frames": timing.frames if timing else 0,
            "frame_rate": round(timing.rate, 2) if timing else 0.0,
            "frame_p99_ms": round(timing.p99 * 1000, 2) if timing else None,
            "frame_gaps": timing.gaps if timing else 0,
            "media_errors": s.media.errors if s else 0,
        }
        if s is not None and s.tool_calls:
            rec["tools"] = s.tool_calls            # the audit of every tool call this call made
        if s is not None and self.tools is not None:
            self.tools.forget_call(e.call_id)
        self.ended.append(e)
        event(calls_log, "call_ended", **rec)
        if s is not None:
            s.state = CallState.ENDED
            self._record(s, ended=s.wall(time.monotonic()), result=result, reason=e.reason,
                         quality=q.as_dict() if q.rx_packets else None, codec=q.codec or s.codec)
            self.bus.publish("call_hangup", e.call_id, {"reason": e.reason, "result": result, "status": e.status,
                                                        "duration": round(e.duration, 3),
                                                        "quality": q.as_dict() if q.rx_packets else None})
            self.bus.forget_call(e.call_id)
        self.records.append({"event": "call_ended", "ended_at": time.time(), **rec})

    # -- records and routing --------------------------------------------------------------
    def app_for(self, to_uri: str) -> str:
        """The route for an inbound call, as stored (``bridge.core.numbers``): by the dialled
        number (user part of To), else the default app."""
        user = user_part(to_uri)
        numbers = self.store.numbers()
        return numbers.get(user) or numbers.get(user.lstrip("+")) or self.cfg.app

    def _codec_of(self, call_id: str) -> str:
        q = self.live_quality(call_id)
        return q.codec if q else ""

    def _record(self, s: Session, **fields) -> None:
        row = {"id": s.call_id, "direction": s.direction, "from_uri": s.from_uri, "to_uri": s.to_uri,
               "trunk": s.trunk, "app": s.app_name, "state": s.state, "codec": s.codec,
               "created": s.created, "answered": s.answered_wall, "cell": self.cell_id, "sip": s.sip_record(),
               **fields}
        staged = self.store.stage_call(row)          # the API sees it now; the writer commits it
        self.writer.sql(lambda st: st.upsert_call(staged), f"call {s.call_id}", staged,
                        lambda _: self.store.call_saved(staged))

    # -- the 20 ms tick ----------------------------------------------------------
    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        max_duration = self.cfg.raw["app"]["max_duration"]
        while True:
            if not self.sessions:                      # idle cell: no 50 Hz wake-ups
                self._calls_waiting.clear()
                await self._calls_waiting.wait()
                next_at = loop.time()
            next_at += TICK
            delay = next_at - loop.time()
            if delay < -0.2:               # fell far behind (suspended?): resync
                next_at = loop.time()
            await asyncio.sleep(max(0.0, delay))
            now = time.monotonic()
            for s in list(self.sessions.values()):
                frames = s.media.uplink.drain()
                if s.taps:
                    self._feed_taps(s, frames, now)
                if s.app is None or s.ending:
                    continue
                try:
                    if frames:
                        s.app.on_frames(frames, now)
                    s.app.on_tick(now)
                except Exception as exc:  # noqa: BLE001
                    self._app_failed(s, exc)
                if max_duration and s.answered_at and now - s.answered_at > max_duration:
                    s.hangup("max duration")
            self._flush_all_timing()

    def _feed_taps(self, s: Session, inbound: list, now: float) -> None:
        """Both legs of this tick to every tap; a failing tap is removed, never the call."""
        outbound = s.media.sent.drain()
        for tap in list(s.taps):
            try:
                tap.on_audio(inbound, outbound, now)
            except Exception as exc:  # noqa: BLE001
                self.metrics.app_errors.inc()
                log.error("audio tap %s failed on call %s: %s", type(tap).__name__, s.call_id, exc,
                          exc_info=exc, extra={"fields": {"call_id": s.call_id}})
                s.remove_tap(tap)
                closer = getattr(tap, "failed", None)
                if closer is not None:
                    try:
                        closer(exc)
                    except Exception:  # noqa: BLE001
                        log.exception("tap cleanup failed")

    def _flush_all_timing(self) -> None:
        for s in self.sessions.values():
            self._flush_timing(s)

    def _flush_timing(self, s: Session) -> None:
        observe = self.metrics.frame_interval.observe
        gap = 0
        for d in s.media.rx_timer.take_intervals():
            observe(d)
            if d > 0.040:
                gap += 1
        if gap:
            self.metrics.frame_gaps.inc(gap)
        up, down = s.drops()
        if up:
            self.metrics.frames_dropped.labels("uplink").inc(up)
        if down:
            self.metrics.frames_dropped.labels("downlink").inc(down)

    def _app_failed(self, s: Session, exc: BaseException) -> None:
        self.metrics.app_errors.inc()
        log.error("app failed on call %s: %s", s.call_id, exc, exc_info=exc,
                  extra={"fields": {"call_id": s.call_id}})
        app, s.app = s.app, None
        if app is not None:                 # None: the app failed to start
            try:
                app.on_failed()             # e.g. a transfer's call to a person goes with the caller's
            except Exception:  # noqa: BLE001
                log.exception("cleanup of the failed app on call %s", s.call_id)
        for r in [*s.transcribers.values(), *s.speakings.values()]:
            try:
                r.stop()                    # the API's transcribes and speakings: their queued model work goes
            except Exception:  # noqa: BLE001
                log.exception("stopping %s on call %s", type(r).__name__, s.call_id)
        if self.hub is not None:
            self.hub.release(s.call_id)     # no on_end will: the model's state for the call goes now
            self.hub.left(s.call_id)
        s.hangup("app error", 500 if not s.answered_at else 0)


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
