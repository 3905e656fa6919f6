"""Call slots and pooled media ports, as a part of the engine (a base class of ``sip.engine.Engine``).

The wheel has 4 pjsua call slots and pjsua hands a freed slot to the next call at once, so
the engine keys its legs by slot (``_seat``) and ends a leg whose slot was reused before it
heard the call end (``_drop_leg``); it keeps an ended call's pjsua2 object until its slot is
free (``_release_dead``: the object's destructor would hang up the slot's new call). Each call's
audio goes through a pooled ``FramePort`` (``_take_port``, which reclaims ports no live call
holds), linked both ways to the call's stream (``_connect``/``_disconnect``). Engine thread only."""
from __future__ import annotations

import logging
import time

import pjsua2 as pj

from sip import events as ev
from sip.callbacks import _Call
from sip.legs import _Leg
from sip.port import FramePort
from sip.stats import read_quality

log = logging.getLogger("trunkline.sip")


class SlotsAndPorts:
    """Needs the engine's ``legs``, ``by_call_id``, ``_abandoned``, ``_dead``, ``pool``, ``ep`` and ``_emit``."""

    def _connect(self, leg: _Leg, call: _Call, idx: int) -> None:
        aud = call.getAudioMedia(idx)
        if leg.aud is not None and leg.med_idx == idx and leg.aud.getPortId() == aud.getPortId():
            return
        if leg.port is None:
            leg.port = self._take_port(leg)
        leg.aud, leg.med_idx = aud, idx
        leg.had_media = True
        aud.startTransmit(leg.port)
        leg.port.startTransmit(aud)
        try:
            leg.quality = read_quality(call, idx)
        except pj.Error:
            pass
        leg.last_rx_change = time.monotonic()

    def _disconnect(self, leg: _Leg) -> None:
        if leg.port is not None and leg.aud is not None:
            for a, b in ((leg.aud, leg.port), (leg.port, leg.aud)):
                try:
                    a.stopTransmit(b)
                except pj.Error:
                    pass
        leg.aud = None

    def _seat(self, call_index: int, leg: _Leg) -> None:
        """Key ``leg`` by its pjsua call index. A leg still there belongs to a call pjsua has
        already let go of (its slot reused before we saw it end): release its media port and end
        it here, or the port is lost for good and the call never ends for the app (the soak saw a
        cell run out of media ports this way and refuse every call after)."""
        old = self.legs.get(call_index)
        if old is not None and old is not leg:
            (log.warning if old.admitted else log.debug)(
                "call %s: pjsua reused its slot for %s before it ended here; ending it", old.call_id, leg.call_id)
            self._drop_leg(old, call_index)
        self.legs[call_index] = leg

    def _drop_leg(self, leg: _Leg, call_index: int) -> None:
        self._dead.append(leg.call)         # its slot is another call's now: never destroyed while it is
        self._disconnect(leg)
        if leg.port is not None:
            self.pool.give(leg.port)
            leg.port = None
        if self.legs.get(call_index) is leg:
            del self.legs[call_index]
        if self.by_call_id.get(leg.call_id) is leg:
            del self.by_call_id[leg.call_id]
        if leg.admitted:
            self._emit(ev.CallEnded(leg.call_id, leg.direction, 0, leg.end_reason or "lost", leg.answered,
                                    0.0, leg.quality, None))

    def _slot_taken(self, call: _Call) -> bool:
        """Whether ``call``'s pjsua slot now holds another call (pjsua reused it after ``call`` ended)."""
        idx = call.getId()
        if idx == pj.PJSUA_INVALID_ID:
            return False
        leg = self.legs.get(idx)
        other = self._abandoned.get(idx)
        return (call.isActive() or (leg is not None and leg.call is not call)
                or (other is not None and other is not call))

    def _release_dead(self) -> None:
        """Drop our last reference to ended calls, but only to those whose pjsua slot is free.

        pjsua2's ``Call`` destructor acts on the slot *index* it was created for: it clears that
        slot's user data and hangs up whatever call is active there. pjsua hands a freed slot to
        the next call at once (4 slots, 3 calls a cell), so destroying an ended call's wrapper
        after its slot was reused (an INVITE read in the same ``libHandleEvents`` as the BYE)
        hung up the new call (603 before it was answered, a BYE just after) and cut it off from
        its callbacks: the engine never saw it end, and ending that stale leg when its slot came
        round again did the same to the next call. A wrapper whose slot is taken waits here until
        the slot is free again (the call in it ended), then goes."""
        keep = [c for c in self._dead if self._slot_taken(c)]
        self._dead.clear()
        self._dead.extend(keep)

    def _take_port(self, leg: _Leg) -> FramePort:
        """A free pooled port; one no live leg holds is reclaimed first if none is free (and said)."""
        if not self.pool.free:
            held = {id(x.port) for x in self.legs.values() if x.port is not None}
            lost = [p for p in self.pool.ports if id(p) not in held and p not in self.pool.free]
            for p in lost:
                self._unlink(p)
                self.pool.give(p)
            if lost:
                log.warning("reclaimed %d media port(s) that no call held", len(lost))
        return self.pool.take(leg.media)

    def _unlink(self, port: FramePort) -> None:
        """Break every conference link to and from ``port``."""
        try:
            pid = port.getPortId()
            for m in self.ep.mediaEnumPorts2():
                if m.getPortId() == pid:
                    continue
                if pid in m.getPortInfo().listeners:
                    m.stopTransmit(port)
                if m.getPortId() in port.getPortInfo().listeners:
                    port.stopTransmit(m)
        except pj.Error as exc:
            log.warning("unlinking a reclaimed media port: %s", exc.info())
