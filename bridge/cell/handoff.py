"""Handoff to a person, the cell's side: blind (REFER) and attended transfers of an agent call.

The agent's ``transfer`` tool (``bridge.agent.tools.transfer``) calls
``Handoff.request``; from then on the ``Handoff`` is the caller's app, wrapping
the agent, and runs on the cell's 20 ms tick:

PENDING   the agent says its line ("let me put you through"); frames still go to the agent.
          Once it has finished (or after ``MAX_WAIT``) the agent is paused (its model requests cancelled):
REFERRED  blind: a REFER to the destination; the final NOTIFY's 2xx is ``call_transferred`` (the
          engine then ends our call), anything else is a failure.
DIALING   attended: an outbound call to the destination (``MakeCall(app="handoff")``, its session's app
          is a ``LegApp``); the caller hears a ringback tone. No answer within ``ring_timeout``, a
          rejection or an error is a failure.
WHISPER   the person answered: they hear the whisper (TTS of ``whisper_text`` with the model's summary)
          while the caller still hears the ringback.
BRIDGED   each call's frames go to the other's downlink, tick by tick; ``call_transferred``. When
          either side hangs up the other is hung up too.

In a box of cells (``sip.outbound_proxy``: the Kamailio front) the attended leg goes out through
the front like any call a cell places: through the destination's trunk or, without one, the trunk
whose address or allow-list holds the destination's host (``leg_trunk``); when there is none the
transfer fails at once with reason ``unreachable`` (the front would refuse the leg anyway).

A failure publishes ``transfer_failed {destination, reason}`` and gives the caller back to the agent,
which says ``no_answer_text`` (as an async tool result: the model also reads what happened).
Events are on the caller's call. No engine change: only ``MakeCall``, ``Transfer`` and ``Hangup``.
"""
from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import math
import time
from array import array
from functools import lru_cache

from bridge.agent.turnstate import AT_REST
from bridge.api.base import ApiError
from bridge.api.trunklimits import TrunkLimits
from bridge.core.app import App
from bridge.core.handoff import Destination
from bridge.core.logs import event
from sip import commands as cmd
from sip.uri import host_port

log = logging.getLogger("trunkline.call")

NAME = "transfer"
MAX_WAIT = 15.0          # the longest the agent's line may delay the handoff
WHISPER_MAX = 20.0       # the longest a whisper may take before the caller is put through anyway
PREBUFFER = 5            # frames queued ahead of the media clock (ringback, whisper)
ORPHAN_AFTER = 5.0       # a handoff leg nobody claimed is hung up after this


class Phase(enum.Enum):
    IDLE = "idle"
    PENDING = "pending"
    REFERRED = "referred"
    DIALING = "dialing"
    WHISPER = "whisper"
    BRIDGED = "bridged"
    DONE = "done"


def failure_reason(status: int) -> str:
    """A failed leg's SIP status as a ``transfer_failed`` reason."""
    if status in (486, 600):
        return "busy"
    if status in (603, 403):
        return "declined"
    if status in (0, 408, 480, 487):
        return "no_answer"
    return "rejected"


@lru_cache(maxsize=4)
def ringback(rate: int) -> tuple[bytes, ...]:
    """One 6 s cadence of ringback (440 + 480 Hz, 2 s on, 4 s off) as 20 ms frames at ``rate``."""
    n = rate // 50
    on = 2 * 50
    frames = []
    silence = bytes(2 * n)
    for i in range(300):
        if i >= on:
            frames.append(silence)
            continue
        w = 2 * math.pi / rate
        samples = array("h", (int(3000 * (math.sin(w * 440 * t) + math.sin(w * 480 * t)))
                              for t in range(i * n, (i + 1) * n)))
        frames.append(samples.tobytes())
    return tuple(frames)


class LegApp(App):
    """The app of the call to the person (``MakeCall(app="handoff")``): its frames go to the caller
    once bridged; it tells its ``owner`` (the caller's ``Handoff``) when it ends."""
    name = "handoff"

    def __init__(self, session, clock=time.monotonic):
        super().__init__(session)
        self.owner: Handoff | None = None
        self.ended: tuple[int, str] | None = None      # (SIP status, reason) once over
        self.failed = False                             # over because this app broke
        self.born = clock()

    def on_frames(self, frames, now):
        o = self.owner
        if o is not None and o.phase is Phase.BRIDGED:
            push = o.session.media.downlink.push
            for _, pcm in frames:
                push(pcm)

    def on_tick(self, now):
        if self.owner is None and now - self.born > ORPHAN_AFTER:
            self.session.hangup("handoff leg without a caller")

    def on_call_ended(self, status: int, reason: str) -> None:
        self.ended = (status, reason)

    def on_end(self):
        if self.ended is None:
            self.ended = (0, "ended")
        if self.owner is not None:
            self.owner.leg_ended(self)

    def on_failed(self):
        """This leg's app broke (its call is being hung up): the caller must not stay bridged to it,
        and a transfer still dialing or whispering fails with reason ``error``."""
        self.failed = True
        if self.ended is None:
            self.ended = (0, "app error")
        self.on_end()


class Handoff(App):
    """One call's handoff to a person (see the module's docstring)."""
    name = "agent"            # the call's app is still the agent as far as records go

    def __init__(self, session, settings: dict, hub=None, clock=time.monotonic):
        super().__init__(session)
        self.settings = settings                  # the [transfer] section
        self.hub = hub
        self.clock = clock
        self.agent = None                         # the AgentApp, while it is wrapped
        self.phase = Phase.IDLE
        self.dest: Destination | None = None
        self.summary = ""
        self.deadline = 0.0
        self.leg_id: str | None = None
        self.leg: LegApp | None = None
        self.ring = 0
        self.whisper: list[bytes] = []
        self.whisper_done = False
        self.whispered = False                    # a whisper was asked of the hub (released when over)
        self.transfers = 0

    def __getattr__(self, name):                  # history, outcome, on_tool_result, ...: the agent's
        agent = self.__dict__.get("agent")
        if agent is None:
            raise AttributeError(name)
        return getattr(agent, name)

    # -- from the transfer tool ---------------------------------------------------------
    def request(self, dest: Destination, summary: str) -> str | None:
        """Start handing the caller to ``dest`` once the agent's line is said; None, or why not."""
        s = self.session
        if self.phase is not Phase.IDLE:
            return "a transfer is already under way"
        if s.ending or s.app is None:
            return "the call is ending"
        self.agent = s.app
        s.app = self
        self.dest, self.summary = dest, summary
        self.phase = Phase.PENDING
        self.deadline = self.clock() + MAX_WAIT
        event(log, "transfer_requested", call_id=s.call_id, destination=dest.name, mode=dest.mode)
        return None

    # -- App hooks (the cell's tick) -------------------------------------------------------
    def on_frames(self, frames, now):
        if self.phase is Phase.PENDING:
            self.agent.on_frames(frames, now)
        elif self.phase is Phase.BRIDGED and self.leg is not None and self.leg.ended is None:
            push = self.leg.session.media.downlink.push
            for _, pcm in frames:
                push(pcm)
        # otherwise the caller is on hold: their audio goes nowhere

    def on_tick(self, now):
        p = self.phase
        if p is Phase.PENDING:
            self.agent.on_tick(now)
            if self._agent_done() or now > self.deadline:
                self._begin(now)
        elif p is Phase.REFERRED:
            if now > self.deadline:
                self._fail("no_answer")
        elif p is Phase.DIALING:
            self._ringback()
            self._dialing(now)
        elif p is Phase.WHISPER:
            self._ringback()
            self._whispering(now)

    def on_dtmf(self, digit: str) -> None:
        if self.agent is not None:
            self.agent.on_dtmf(digit)

    def on_transfer_status(self, status: int, reason: str, final: bool) -> None:
        """The REFER's progress (NOTIFY sipfrag) from the engine."""
        if self.phase is not Phase.REFERRED or not final:
            return
        if 200 <= status < 300:
            self.phase = Phase.DONE
            self._transferred()         # the engine ends our call now
        else:
            self._fail(failure_reason(status) if status >= 400 else "rejected", status)

    def on_end(self):
        """The caller's call is over: the person's too, and the agent's cleanup (summary, release)."""
        if self.phase in (Phase.PENDING, Phase.DIALING, Phase.WHISPER, Phase.REFERRED):
            self._event("transfer_failed", reason="caller_hung_up")
        self.phase = Phase.DONE
        self._end_whisper()
        self._hangup_leg("caller hung up")
        agent, self.agent = self.agent, None
        if agent is not None:
            agent.on_end()

    def on_failed(self):
        """The caller's side broke (the cell hangs the caller up): the person's call goes too,
        instead of staying up bridged to nobody."""
        if self.phase in (Phase.PENDING, Phase.DIALING, Phase.WHISPER, Phase.REFERRED):
            self._event("transfer_failed", reason="error")
        self.phase = Phase.DONE
        self._end_whisper()
        self._hangup_leg("transfer failed")

    # -- the steps ---------------------------------------------------------------------------
    def _agent_done(self) -> bool:
        a = self.agent
        return a.state in AT_REST and not a.machine.speaking() and self.session.media.queued_out() == 0

    def _begin(self, now: float) -> None:
        """The agent has said its line: pause it and move the call."""
        s, d = self.session, self.dest
        if self.hub is not None:
            self.hub.cancel(s.call_id)            # late model answers for the paused agent are dropped
            self.hub.left(s.call_id)              # and it needs no decodes (back in ``_fail``)
        s.media.flush_out()
        self.transfers += 1
        if d.mode == "blind":
            self.phase = Phase.REFERRED
            self.deadline = now + 2 * self.settings["ring_timeout"] + 10
            fut = asyncio.wrap_future(s.services.submit(cmd.Transfer(s.call_id, d.to)))
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() is None or
                                  (self.phase is Phase.REFERRED and self._fail("failed", detail=str(f.exception()))))
            event(log, "transfer", call_id=s.call_id, target=d.to, mode="blind", destination=d.name)
            return
        trunk, unreachable = leg_trunk(d, getattr(s.services, "cfg", None))
        if unreachable:                          # behind the front: no trunk lets this leg out
            self.phase = Phase.DIALING
            self._fail("unreachable", detail=unreachable)
            return
        over = _trunk_over_limit(s.services, trunk)
        if over:                                 # the carrier's cps / max_calls hold for our own legs too
            self.phase = Phase.DIALING
            self._fail("unavailable", detail=over)
            return
        self.phase = Phase.DIALING
        self.deadline = now + self.settings["ring_timeout"]
        self.ring = 0
        task = asyncio.ensure_future(s.services.make_call(d.to, trunk, "handoff"))
        attempt = self.transfers
        task.add_done_callback(lambda t: self._dialed(t, attempt))
        event(log, "transfer", call_id=s.call_id, target=d.to, mode="attended", destination=d.name,
              **({"trunk": trunk} if trunk else {}))

    def _dialed(self, task: asyncio.Task, attempt: int) -> None:
        current = self.phase is Phase.DIALING and attempt == self.transfers
        if task.cancelled() or task.exception() is not None:
            if current:
                self._fail("unavailable", detail=str(task.exception()) if not task.cancelled() else "cancelled")
            return
        leg_id = task.result()
        leg = self.session.services.calls.get(leg_id)
        if current:
            self.leg_id = leg_id
        app = getattr(leg, "app", None)
        if not isinstance(app, LegApp):         # ended already (its CallEnded came first)
            if current:
                self._fail("rejected")
            return
        if not current:                          # the caller hung up or the ring time ran out meanwhile
            leg.hangup("transfer abandoned")
            return
        self.leg = app
        app.owner = self

    def _dialing(self, now: float) -> None:
        leg = self.leg
        if leg is not None and leg.ended is not None:
            self._fail("error" if leg.failed else failure_reason(leg.ended[0]), leg.ended[0])
        elif leg is not None and leg.session.answered_at:
            self._answered(now)
        elif now > self.deadline:
            self._fail("no_answer", leg_reason="no answer")

    def _answered(self, now: float) -> None:
        self.phase = Phase.WHISPER
        self.deadline = now + WHISPER_MAX
        text = self.settings["whisper_text"].replace("{summary}", self.summary or self.dest.description)
        text = text.replace("{destination}", self.dest.name).strip()
        if not (self.settings["whisper"] and text and self.hub is not None):
            self.whisper_done = True
            return
        self.whisper, self.whisper_done = [], False

        def on_pcm(pcm, rate):
            self.whisper.extend(self.hub.to_frames(pcm, rate))

        def done(*_):
            self.whisper_done = True
        self.whispered = True
        self.hub.tts(self._whisper_key(), text, on_pcm, on_done=done, on_error=done)

    def _whisper_key(self) -> str:
        return f"{self.session.call_id}:whisper"

    def _end_whisper(self) -> None:
        """Drop what is left of the whisper in the inference process (and its bookkeeping there)."""
        if self.whispered and self.hub is not None:
            self.whispered = False
            self.hub.release(self._whisper_key())

    def _whispering(self, now: float) -> None:
        leg = self.leg
        if leg.ended is not None:                 # the person hung up on the whisper
            self._fail("error" if leg.failed else "declined", leg.ended[0])
            return
        media = leg.session.media
        while self.whisper and media.queued_out() < PREBUFFER:
            media.downlink.push(self.whisper.pop(0))
        if (self.whisper_done and not self.whisper and media.queued_out() == 0) or now > self.deadline:
            self._bridge()

    def _bridge(self) -> None:
        self._end_whisper()
        self.whisper = []
        self.session.media.flush_out()            # the ringback stops
        self.leg.session.media.flush_out()
        self.phase = Phase.BRIDGED
        self._transferred()

    def _transferred(self) -> None:
        s, d = self.session, self.dest
        s.transferred_to = d.name                # the call's outcome: transferred
        data = {"destination": d.name, "mode": d.mode}
        if self.leg_id:
            data["transfer_call_id"] = self.leg_id
        s.emit("call_transferred", data)
        event(log, "call_transferred", call_id=s.call_id, **data)

    def leg_ended(self, leg: LegApp) -> None:
        """The person's call is over (the cell's ``CallEnded``)."""
        if leg is not self.leg:
            return
        if self.phase is Phase.BRIDGED:
            self.phase = Phase.DONE
            self.session.hangup("transfer ended")
        # DIALING / WHISPER see ``leg.ended`` on the next tick

    def _hangup_leg(self, reason: str) -> None:
        leg = self.leg
        if leg is not None and leg.ended is None:
            leg.session.hangup(reason)

    def _ringback(self) -> None:
        media = self.session.media
        tone = ringback(media.rate)
        while media.queued_out() < PREBUFFER:
            media.downlink.push(tone[self.ring % len(tone)])
            self.ring += 1

    def _fail(self, reason: str, status: int | None = None, detail: str = "",
              leg_reason: str = "transfer failed") -> None:
        """Back to the agent, which tells the caller; ``transfer_failed``."""
        s, d = self.session, self.dest
        self._end_whisper()
        if self.leg is not None:
            self._hangup_leg(leg_reason)
            self.leg.owner = None
        self.leg, self.leg_id, self.whisper = None, None, []
        s.media.flush_out()
        self._event("transfer_failed", reason=reason, **({"status": status} if status else {}))
        if detail:
            log.warning("transfer of call %s to %s failed: %s", s.call_id, d.name, detail)
        self.phase = Phase.IDLE
        agent, self.agent = self.agent, None
        if s.app is self:
            s.app = agent
        if agent is not None and not s.ending:
            if self.hub is not None:
                self.hub.joined(s.call_id)        # the agent has the call again
            agent.on_tool_result(NAME, {"status": "failed", "destination": d.name, "reason": reason},
                                 self.settings["no_answer_text"] or None)

    def _event(self, etype: str, **fields) -> None:
        s, d = self.session, self.dest
        data = {"destination": d.name, "mode": d.mode, **fields}
        s.emit(etype, data)
        event(log, etype, call_id=s.call_id, **data)


def leg_trunk(dest: Destination, cfg) -> tuple[str | None, str]:
    """The trunk an attended leg to ``dest`` is placed through, and "" -- or (None, why it cannot be).

    A single cell: the destination's own ``trunk``, maybe none (straight from the cell), as before.
    A cell behind the Kamailio front (``sip.outbound_proxy``, set for every cell of a box) reaches
    nobody directly: its calls must go through the front, which lets them out only to a trunk's
    address or a host in a trunk's allow-list (route TRUNKDEST), and answers anything else 403. A
    pjsua call with no trunk would leave from the cell's own (internal) socket instead, past the
    front. So there a SIP URI must be one the front lets out, and goes through the destination's
    trunk or else the first trunk whose address (host, and port when the address names one) or
    allow-list holds its host, in the front's order; a number or ``tel:`` URI needs the
    destination's trunk. Otherwise the reason, and nothing is dialled."""
    if cfg is None or not cfg.raw["sip"].get("outbound_proxy"):
        return dest.trunk, ""
    scheme, _, rest = dest.to.partition(":")
    if scheme.lower() not in ("sip", "sips") or not rest:
        if dest.trunk:
            return dest.trunk, ""
        return None, (f"{dest.name}: behind the front a number or tel: URI needs the destination's trunk "
                      f"([transfer] destinations.{dest.name}.trunk)")
    host, port = host_port(rest.split(";", 1)[0].split("@")[-1])
    found = _front_trunk(host, port, [t for t in cfg.trunks if t.name != "proxy"])   # "proxy": the front itself
    if found is None:
        return None, (f"{dest.name}: the front lets a cell's calls out only to a trunk's address or allow-list, "
                      f"and no [[trunks]] entry holds {host}{f':{port}' if port else ''} (add one)")
    if dest.trunk and dest.trunk != found:
        # the front would treat the leg as trunk ``found`` (its transport, SRTP, dialog) while pjsua
        # answered challenges with ``dest.trunk``'s credentials, sent to that other trunk's host
        return None, (f"{dest.name}: its trunk is {dest.trunk!r} but the front sends {host} to trunk "
                      f"{found!r}: name that trunk, or a URI at {dest.trunk!r}'s address")
    return found, ""


def _front_trunk(host: str, port: int | None, trunks) -> str | None:
    """The trunk the front's route TRUNKDEST lets a request to ``host:port`` out to: the first whose
    address matches (host, and port when the address names one; 5060 when the URI names none),
    else the first whose allow-list holds the host (an IP literal); None when the front refuses it."""
    for t in trunks:
        for address in (t.addresses or [t.address]):
            if not address:
                continue
            a = address.split(":", 1)[1] if address.lower().startswith(("sip:", "sips:")) else address
            th, tp = host_port(a.split(";", 1)[0].split("@")[-1])
            if th == host and (tp is None or tp == (port or 5060)):
                return t.name
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    for t in trunks:
        if any(ip in ipaddress.ip_network(c, strict=False) for c in t.allow):
            return t.name
    return None


def _trunk_over_limit(services, trunk: str | None) -> str:
    """Why an attended leg through ``trunk`` may not be placed now (its ``cps``/``max_calls``, counted
    from the call store as ``POST /v1/calls`` does), or ""."""
    store = getattr(services, "store", None)
    cfg = getattr(services, "cfg", None)
    if trunk is None or store is None or cfg is None:
        return ""
    try:
        with TrunkLimits(cfg.trunks, store).placing(trunk):
            return ""
    except ApiError as exc:
        return exc.message
