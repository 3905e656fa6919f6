"""The SIP engine: one pjsua2 Endpoint, owned by one thread.

Everything pjsua2 happens in ``Engine._thread`` (``threadCnt=0``, polled with
``libHandleEvents``) except the frame callbacks, which pjmedia's clock thread
runs on the pooled ports. Other threads talk to the engine only through
``submit(command)`` and receive events through the ``on_event`` callback.

Idle cost: the bridge clock stops a second after the last call, and with no
call the loop blocks in ``libHandleEvents`` for up to IDLE_POLL_MS (pjsip's own
timers still fire on time: pjsip shortens the wait to the next one). ``submit``
wakes a blocked loop with a CRLFCRLF keep-alive datagram to the engine's own UDP
socket (RTP has its own ioqueue and worker, so only this thread reads it).

Capacity: the wheel allows 4 pjsua calls. One slot is always kept free so a
call over capacity can still be answered ``503`` with ``Retry-After`` (pjsua
itself would answer ``486`` when every slot is taken), so a cell holds 3.
"""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import replace
from types import MappingProxyType
from typing import Callable

import pjsua2 as pj

from media.callmedia import CallMedia
from sip import commands as cmd
from sip import events as ev
from sip.acl import SourceFilter, split_hostport
from sip.callbacks import _Account, _Call
from sip.config import MAX_CAPACITY, PJSUA_SLOTS, EngineConfig, EngineError, TrunkSpec  # noqa: F401 (re-exported)
from sip.legs import _Leg
from sip.outbound import OutboundCalls
from sip.slots import SlotsAndPorts
from sip.setup import BUSY_POLL_MS, PJSUA_ACCOUNTS, SND_IDLE_CLOSE, EndpointSetup  # noqa: F401 (re-exported)
from sip.headers import parse as parse_headers
from sip.stats import read_quality

NO_MEDIA_GRACE = 5.0       # seconds a confirmed call may go without any audio stream
IDLE_POLL_MS = 1000        # ... with no call: a command wakes it at once (``_wake``), pjsip timers cap it
STEADY_POLL_MS = 100       # ... with calls up and nothing of the loop's own due (stats: once a second)
WAKE_DATAGRAM = b"\r\n\r\n" # a SIP keep-alive: pjsip's UDP transport drops it before parsing
log = logging.getLogger("trunkline.sip")


def _answered_end_reason(status: int, text: str) -> str:
    """Why an answered call ended that nobody here hung up. A BYE from the far end leaves 200;
    anything else means pjsip ended the dialog itself (with a BYE carrying ``Reason: SIP;cause=``):
    the session timer (RFC 4028) expired without a refresh from the far end (408 "No session
    refresh received."), or an in-dialog request of ours - a session refresh - got 481/408 (RFC
    3261 12.2.1.2: the far end lost the call)."""
    if status == pj.PJSIP_SC_OK or not status:
        return "remote bye"
    if status == pj.PJSIP_SC_REQUEST_TIMEOUT and "refresh" in (text or "").lower():
        return "session expired"
    return f"call lost {status}"


class Engine(EndpointSetup, OutboundCalls, SlotsAndPorts):
    def __init__(self, config: EngineConfig, on_event: Callable[[object], None]):
        if not 1 <= config.capacity <= MAX_CAPACITY:
            raise EngineError(f"capacity must be 1..{MAX_CAPACITY} (pjsua has {PJSUA_SLOTS} call slots, one is held back for 503)")
        self.cfg = config
        self._emit_cb = on_event
        self._cmds: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sip-engine", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.draining = False                 # engine thread only: set by cmd.SetDraining
        self._published_active = 0            # active calls in the last CallsSnapshot
        self.legs: dict[int, _Leg] = {}       # pjsua call index -> leg
        self.by_call_id: dict[str, _Leg] = {}
        self._dead: list[_Call] = []
        # the front's trunk ("proxy", from sip.trusted_proxies) may also be bound to a source port
        self.filters = [(t.name, SourceFilter(t.allow), config.proxy_port if t.name == "proxy" else 0)
                        for t in config.trunks if t.allow]
        self.fast_copy = False
        self._idle_wait = False               # the engine thread is (about to be) blocked in a long wait
        self._wake_sock: socket.socket | None = None
        self._wake_to: tuple | None = None
        self.wakes = 0                        # keep-alives sent to wake an idle engine (tests, figures)

    # -- public API (any thread) -------------------------------------------
    def start(self, timeout: float = 15.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise EngineError("SIP engine did not start in time")
        if self._error is not None:
            raise EngineError(str(self._error)) from self._error

    def submit(self, command: cmd.Command):
        if not self._thread.is_alive():
            command.future.set_exception(EngineError("SIP engine is not running"))
        else:
            self._cmds.put(command)
            if self._idle_wait:               # set before the engine's last look at the queue
                self._wake()
        return command.future

    def _wake(self) -> None:
        """Cut an idle engine's long ``libHandleEvents`` short: a CRLFCRLF keep-alive to its own
        SIP UDP socket (any thread). pjsip reads and discards it; the guard never sees it."""
        sock, to = self._wake_sock, self._wake_to
        if sock is None or to is None:
            return
        try:
            sock.sendto(WAKE_DATAGRAM, to)
            self.wakes += 1
        except OSError as exc:        # the engine still sees the command within IDLE_POLL_MS
            log.debug("could not wake the SIP engine: %s", exc)

    def stop(self, timeout: float = 15.0) -> None:
        if self._thread.is_alive():
            self.submit(cmd.Shutdown())
            self._thread.join(timeout)

    def trunk_for(self, source: str) -> str | None:
        """Name of the first trunk whose allow-list covers ``source`` ("ip:port"; the port
        counts for a trunk bound to one)."""
        for name, f, port in self.filters:
            if f.allows(source) and (not port or split_hostport(source)[1] == port):
                return name
        return None

    @property
    def active_calls(self) -> int:
        """Admitted calls (engine thread only; others keep the latest ``ev.CallsSnapshot``)."""
        return sum(1 for leg in list(self.legs.values()) if leg.admitted)

    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def guard_state(self) -> str:
        """The SIP source guard: "on", "off" (not started) or "failed" (set once at start)."""
        guard = getattr(self, "guard", None)
        return guard.state if guard is not None else "off"

    # -- engine thread -------------------------------------------------------
    def _emit(self, event) -> None:
        try:
            self._emit_cb(event)
        except Exception:  # noqa: BLE001
            log.exception("event handler failed for %s", type(event).__name__)

    def _run(self) -> None:
        try:
            self._start_lib()
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
            self._ready.set()
            self._destroy()
            return
        self._ready.set()
        error = None
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001
            log.exception("SIP engine loop failed")
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._destroy()
            self._emit(ev.EngineStopped(error))

    def _idle(self) -> bool:
        """No call, nothing owed: the loop may block until a packet, a pjsip timer or a command."""
        return (not self.legs and not self._dead and not self._published_active
                and self._wake_sock is not None)

    def _due_soon(self) -> bool:
        """Work the loop itself owes on time (pjsip's timers are pjsip's): an answer delay, a
        refusal to send, an outbound attempt's deadline or failover, a dead call to release."""
        if self._dead:
            return True
        for leg in self.legs.values():
            if leg.answer_at is not None or leg.refusal is not None:
                return True
            plan = leg.outbound
            if plan is not None and (plan.deadline is not None or plan.retry):
                return True
        return False

    def _poll(self) -> None:
        """One wait for pjsip's events. With nothing of its own due the loop blocks long (no call:
        IDLE_POLL_MS; calls up: STEADY_POLL_MS, their RTP is on pjmedia's worker, not here), and
        ``submit`` wakes it for a command; else it looks again after BUSY_POLL_MS. (Calls up, it
        polled every 10 ms: ~1.5 % of a core per cell with calls, a cell's fixed cost.)"""
        if self._wake_sock is None or self._due_soon():
            self.ep.libHandleEvents(BUSY_POLL_MS)
            return
        wait = IDLE_POLL_MS if self._idle() else STEADY_POLL_MS
        self._idle_wait = True            # from here on submit() wakes us ...
        try:
            if self._cmds.empty():        # ... so a command queued before this line is seen here
                self.ep.libHandleEvents(wait)
        finally:
            self._idle_wait = False

    def _loop(self) -> None:
        next_stats = time.monotonic() + self.cfg.stats_interval
        while True:
            self._poll()
            if self._drain_commands():
                return
            now = time.monotonic()
            self._answer_due(now)
            if now >= next_stats:
                next_stats = now + self.cfg.stats_interval
                self._poll_stats(now)
                if self.legs or self._published_active:     # an idle engine does not wake the loop
                    self._publish_snapshot(now)
            if self._dead:
                self._release_dead()

    def _drain_commands(self) -> bool:
        while True:
            try:
                c = self._cmds.get_nowait()
            except queue.Empty:
                return False
            if isinstance(c, cmd.Shutdown):
                c.future.set_result(None)
                return True
            if c.future.set_running_or_notify_cancel():
                try:
                    c.future.set_result(self._execute(c))
                except Exception as exc:  # noqa: BLE001
                    c.future.set_exception(exc)

    def _leg(self, call_id: str) -> _Leg:
        leg = self.by_call_id.get(call_id)
        if leg is None:
            raise KeyError(f"no such call: {call_id}")
        return leg

    def _execute(self, c: cmd.Command):
        if isinstance(c, cmd.Hangup):
            leg = self._leg(c.call_id)
            leg.end_reason = leg.end_reason or c.reason
            prm = pj.CallOpParam()
            prm.statusCode = c.status or (pj.PJSIP_SC_OK if leg.answered else pj.PJSIP_SC_DECLINE)
            leg.call.hangup(prm)
            return None
        if isinstance(c, cmd.Transfer):
            leg = self._leg(c.call_id)
            if not leg.answered:
                raise EngineError("call is not answered")
            self._check_destination(c.target, None)
            leg.transfer_pending = True
            leg.call.xfer(c.target.strip(), pj.CallOpParam(True))
            return None
        if isinstance(c, cmd.SendDtmf):
            leg = self._leg(c.call_id)
            prm = pj.CallSendDtmfParam()
            prm.digits = c.digits
            prm.method = pj.PJSUA_DTMF_METHOD_RFC2833
            leg.call.sendDtmf(prm)
            return None
        if isinstance(c, cmd.MakeCall):
            return self._make_call(c)
        if isinstance(c, cmd.SetDraining):
            self.draining = c.draining
            self._publish_snapshot(time.monotonic())
            return None
        raise EngineError(f"unknown command {type(c).__name__}")

    # -- pjsua2 callbacks (engine thread) ----------------------------------
    def _on_incoming(self, acc: _Account, prm) -> None:
        call = _Call(self, acc, prm.callId)
        info = call.getInfo()
        source = prm.rdata.srcAddress
        reason = None
        status = 0
        trunk = self.trunk_for(source)
        if trunk is None:
            reason, status = "untrusted", pj.PJSIP_SC_FORBIDDEN
        elif self.draining:
            reason, status = "draining", pj.PJSIP_SC_SERVICE_UNAVAILABLE
        elif self.active_calls >= self.cfg.capacity:
            reason, status = "full", pj.PJSIP_SC_SERVICE_UNAVAILABLE
        if reason:
            # The final answer is sent from the loop, after this callback has returned:
            # answering an INVITE without SDP with a final status from inside
            # onIncomingCall ends and resets the call at once, and pjsua2 then frees the
            # already-freed cloned rdata (pjsip_rx_data_free_cloned: Assertion 'rdata'
            # failed), aborting the process. One packet from anywhere did that.
            extra = {"Retry-After": str(self.cfg.retry_after)} if status == pj.PJSIP_SC_SERVICE_UNAVAILABLE else {}
            leg = _Leg(call, info.callIdString, "inbound", trunk, None, admitted=False, end_reason=reason,
                       refusal=(status, extra))
            self._seat(info.id, leg)
            self._emit(ev.CallRejected(source, info.remoteUri, info.localUri, status, reason))
            return
        try:                                # carrier headers (trusted source only): bounded, cleaned
            found = parse_headers(prm.rdata.wholeMsg)
        except Exception:  # noqa: BLE001 - never lose a call over its headers
            log.exception("call %s: could not read the INVITE's headers", info.callIdString)
            found = None
        if found is not None and found.front_trunk and self._from_front(source):
            trunk = self._front_trunk(found.front_trunk) or trunk
        media = CallMedia(self.cfg.clock_rate, self.cfg.uplink_frames, self.cfg.downlink_frames)
        leg = _Leg(call, info.callIdString, "inbound", trunk, media, admitted=True)
        self._seat(info.id, leg)
        self.by_call_id[leg.call_id] = leg
        self._answer(call, pj.PJSIP_SC_RINGING)
        leg.answer_at = time.monotonic() + self.cfg.answer_delay
        if found is not None and found.dropped:
            log.info("call %s: %d carrier header values over the limit dropped", leg.call_id, found.dropped)
        headers = MappingProxyType({k: tuple(v) for k, v in found.values.items()}) if found else MappingProxyType({})
        self._emit(ev.CallOffered(leg.call_id, "inbound", info.remoteUri, info.localUri, source, trunk, media,
                                  headers=headers))
        self._publish_snapshot(time.monotonic())
        self._answer_due(time.monotonic())

    def _from_front(self, source: str) -> bool:
        """Sent by the box's front (the "proxy" trunk: sip.trusted_proxies and the front's port)."""
        return any(name == "proxy" and f.allows(source) and (not port or split_hostport(source)[1] == port)
                   for name, f, port in self.filters)

    def _front_trunk(self, tag: str) -> str | None:
        """The configured trunk the front named for a call it relayed (``t<index>`` in the order of
        ``[[trunks]]``, bridge/box/kamailio.py): behind the front every call comes from the front's
        address, which names no trunk."""
        names = [t.name for t in self.cfg.trunks if t.name != "proxy"]
        if len(tag) > 1 and tag[0] == "t" and tag[1:].isdigit() and int(tag[1:]) < len(names):
            return names[int(tag[1:])]
        return None

    def _answer(self, call: _Call, status: int, headers: dict[str, str] | None = None) -> None:
        """Answer with ``status``; every response names the product, never a version."""
        op = pj.CallOpParam(True)
        op.statusCode = status
        for name, value in {"Server": self.cfg.user_agent, **(headers or {})}.items():
            h = pj.SipHeader()
            h.hName, h.hValue = name, value
            op.txOption.headers.append(h)
        call.answer(op)

    def _answer_due(self, now: float) -> None:
        for leg in list(self.legs.values()):
            if leg.outbound is not None:
                self._failover_due(leg, now)
            if leg.refusal is not None:
                status, extra = leg.refusal
                leg.refusal = None
                try:
                    self._answer(leg.call, status, extra)
                except pj.Error as exc:      # the caller gave up first
                    log.debug("refusing %s failed: %s", leg.call_id, exc.info())
            if leg.answer_at is not None and now >= leg.answer_at:
                leg.answer_at = None
                try:
                    self._answer(leg.call, pj.PJSIP_SC_OK)
                except pj.Error as exc:      # e.g. CANCELled meanwhile
                    log.debug("answer %s failed: %s", leg.call_id, exc.info())

    def _on_state(self, call: _Call) -> None:
        info = call.getInfo()
        if self._abandoned.get(info.id) is call:          # an attempt failover gave up on
            if info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
                self._dead.append(self._abandoned.pop(info.id))
            return
        leg = self.legs.get(info.id)
        if leg is None or leg.call is not call:
            return
        if leg.outbound is not None and info.state in (pj.PJSIP_INV_STATE_EARLY, pj.PJSIP_INV_STATE_CONNECTING):
            leg.outbound.deadline = None                  # 180/183 (or an answer): this address is alive
        if info.state == pj.PJSIP_INV_STATE_CONFIRMED and leg.admitted and not leg.answered:
            leg.answered = True
            leg.confirmed_at = time.monotonic()
            if leg.outbound is not None:
                leg.outbound.deadline = None
            self._emit(ev.CallAnswered(leg.call_id, leg.quality.codec, leg.quality.clock_rate,
                                       leg.outbound.address if leg.outbound is not None else ""))
            self._publish_snapshot(time.monotonic())
        elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self._on_disconnected(leg, info)

    def _on_media(self, call: _Call) -> None:
        info = call.getInfo()
        leg = self.legs.get(info.id)
        if leg is None or leg.media is None or leg.call is not call:      # (a call whose slot was reused)
            return
        for mi in info.media:
            if mi.type != pj.PJMEDIA_TYPE_AUDIO:
                continue
            held = mi.status == pj.PJSUA_CALL_MEDIA_REMOTE_HOLD
            if mi.status in (pj.PJSUA_CALL_MEDIA_ACTIVE, pj.PJSUA_CALL_MEDIA_REMOTE_HOLD):
                self._connect(leg, call, mi.index)
            if held != leg.held:
                leg.held = held
                self._emit(ev.CallHold(leg.call_id, held))
            break

    def _on_dtmf(self, call: _Call, prm) -> None:
        leg = self.legs.get(call.getId())
        if leg is None:
            return
        method = "info" if prm.method == pj.PJSUA_DTMF_METHOD_SIP_INFO else "rfc4733"
        duration = int(prm.duration)
        self._emit(ev.Dtmf(leg.call_id, prm.digit, method, duration if 0 <= duration < 600_000 else 0))

    def _on_xfer(self, call: _Call, prm) -> None:
        leg = self.legs.get(call.getId())
        if leg is None:
            return
        self._emit(ev.TransferStatus(leg.call_id, prm.statusCode, prm.reason, prm.finalNotify))
        if prm.finalNotify:
            leg.transfer_pending = False
            prm.cont = False
            if prm.statusCode // 100 == 2:
                leg.end_reason = "transferred"
                op = pj.CallOpParam()
                call.hangup(op)

    def _on_stream_destroyed(self, call: _Call, idx: int) -> None:
        leg = self.legs.get(call.getId())
        if leg is None or idx != leg.med_idx or leg.call is not call:
            return
        self._refresh_quality(leg)
        self._disconnect(leg)

    def _refresh_quality(self, leg: _Leg) -> None:
        try:
            leg.quality = read_quality(leg.call, leg.med_idx, leg.quality)
        except pj.Error:
            pass

    def _on_disconnected(self, leg: _Leg, info) -> None:
        if leg.aud is not None:
            self._refresh_quality(leg)
            self._disconnect(leg)
        if leg.port is not None:
            self.pool.give(leg.port)
            leg.port = None
        self.legs.pop(info.id, None)
        if self.by_call_id.get(leg.call_id) is leg:
            del self.by_call_id[leg.call_id]
        self._dead.append(leg.call)
        if not leg.admitted:
            return
        if (leg.outbound is not None and not leg.answered
                and self._fail_over(leg, info.lastStatusCode, info.lastReason or str(info.lastStatusCode))):
            return                          # placed again at the trunk's next address (from the loop)
        reason = leg.end_reason
        if not reason:
            if not leg.answered:
                reason = "cancelled" if info.role == pj.PJSIP_ROLE_UAS else f"failed {info.lastStatusCode}"
            else:
                reason = _answered_end_reason(info.lastStatusCode, info.lastReason)
        self._emit(ev.CallEnded(
            leg.call_id, leg.direction, info.lastStatusCode, reason, leg.answered,
            float(info.connectDuration.sec) + info.connectDuration.msec / 1000.0,
            leg.quality, leg.media.rx_timer.summary() if leg.media and leg.media.rx_timer.count else None))
        self._publish_snapshot(time.monotonic())

    def _poll_stats(self, now: float) -> None:
        for leg in list(self.legs.values()):
            if leg.aud is None:
                self._hangup_if_mediless(leg, now)
                continue
            self._refresh_quality(leg)
            if leg.quality.rx_packets != leg.last_rx_pkts or leg.held:
                leg.last_rx_pkts = leg.quality.rx_packets
                leg.last_rx_change = now
            elif self.cfg.rtp_timeout and now - leg.last_rx_change > self.cfg.rtp_timeout and leg.answered:
                log.info("call %s: no RTP for %.0f s, hanging up", leg.call_id, now - leg.last_rx_change)
                leg.end_reason = "rtp timeout"
                leg.last_rx_change = now
                try:
                    leg.call.hangup(pj.CallOpParam())
                except pj.Error as exc:
                    log.warning("hangup after RTP timeout failed: %s", exc.info())

    def _hangup_if_mediless(self, leg: _Leg, now: float) -> None:
        """A call confirmed with no audio ever negotiated (a late-offer INVITE ACKed without an SDP
        answer, as SIPVicious does) would hold its slot until ``app.max_duration``: the RTP timeout
        only watches streams that exist. End it after NO_MEDIA_GRACE seconds."""
        if (leg.admitted and leg.answered and not leg.had_media and leg.confirmed_at is not None
                and now - leg.confirmed_at > NO_MEDIA_GRACE and leg.end_reason != "no media"):
            log.info("call %s: confirmed without audio for %.0f s, hanging up", leg.call_id, now - leg.confirmed_at)
            leg.end_reason = "no media"
            try:
                leg.call.hangup(pj.CallOpParam())
            except pj.Error as exc:
                log.warning("hangup of a call without media failed: %s", exc.info())

    def _publish_snapshot(self, now: float) -> None:
        """Tell the application the live view (``ev.CallsSnapshot``): copies, never the legs themselves."""
        admitted = [leg for leg in self.legs.values() if leg.admitted]
        quality = {leg.call_id: replace(leg.quality) for leg in admitted}
        self._published_active = len(admitted)
        self._emit(ev.CallsSnapshot(len(admitted), MappingProxyType(quality), self.draining, now))

    def _destroy(self) -> None:
        ep = getattr(self, "ep", None)
        if ep is None:
            return
        try:
            if self.legs:
                ep.hangupAllCalls()
                deadline = time.monotonic() + 3.0
                while self.legs and time.monotonic() < deadline:
                    ep.libHandleEvents(10)
            for leg in list(self.legs.values()):
                self._disconnect(leg)
            self.legs.clear()
            self.by_call_id.clear()
            self._dead.clear()
            getattr(self, "_abandoned", {}).clear()
            for acc in getattr(self, "accounts", {}).values():
                try:
                    acc.shutdown()
                except pj.Error:
                    pass
            self.accounts = {}
            pool = getattr(self, "pool", None)
            if pool is not None:
                pool.close()
                self.pool = None
            import gc
            gc.collect()
            ep.libDestroy()
        except pj.Error as exc:
            log.error("pjsua shutdown: %s", exc.info())
        finally:
            self.ep = None
            sock, self._wake_sock = self._wake_sock, None
            if sock is not None:
                sock.close()


