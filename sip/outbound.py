"""Outbound calls, as a part of the engine (a base class of ``sip.engine.Engine``): placing a
call through a trunk after the toll-fraud guard, and failing it over along the trunk's
``addresses`` when an attempt gets ``408``/``503``, a transport error, or no 180/183 within the
trunk's ``failover_timeout``. Runs on the engine thread; the failed-over attempt is placed from
the loop (``_failover_due``), never inside a pjsua callback."""
from __future__ import annotations

import logging
import time
from dataclasses import replace

import pjsua2 as pj

from media.callmedia import CallMedia
from sip import commands as cmd
from sip import events as ev
from sip.callbacks import _Call
from sip.config import EngineError
from sip.headers import clean as clean_header
from sip.legs import _Leg, _Outbound
from sip.uri import DestinationPolicy, _number_uri, _uri_host, caller_identity, check_destination, trunk_of

FAILOVER_STATUSES = (408, 503)   # a final answer that moves an outbound call to the trunk's next address
log = logging.getLogger("trunkline.sip")


class OutboundCalls:
    """Needs the engine's ``cfg``, ``accounts``, ``legs``, ``by_call_id``, ``_abandoned``, ``draining``,
    ``active_calls``, ``_seat``, ``_emit`` and ``_publish_snapshot``."""

    def _make_call(self, c: cmd.MakeCall) -> str:
        if self.draining:
            raise EngineError("cell is draining")
        if self.active_calls >= self.cfg.capacity:
            raise EngineError("cell is full")
        if c.trunk is not None and c.trunk not in self.accounts:
            raise EngineError(f"unknown or unroutable trunk: {c.trunk}")
        self._check_destination(c.uri, c.trunk)
        spec = next((t for t in self.cfg.trunks if t.name == c.trunk), None)
        if c.caller_id and (spec is None or c.caller_id not in (spec.caller_id, *spec.caller_ids)):
            raise EngineError(f"caller id {c.caller_id!r} is not one of trunk {c.trunk!r}'s numbers")
        if c.withhold and not (c.caller_id or (spec is not None and spec.caller_id)):
            raise EngineError("withholding the caller id needs a number to assert to the carrier")
        plan = None
        if spec is not None and len(spec.addresses) > 1:
            plan = _Outbound(c.uri.strip(), spec.name, tuple(spec.addresses), spec.failover_timeout,
                             caller_id=c.caller_id, withhold=c.withhold)
        failed: list[ev.CallAttemptFailed] = []
        while True:
            try:
                call = self._dial(c.uri.strip(), c.trunk, plan, c.caller_id, c.withhold)
                break
            except pj.Error as exc:         # e.g. no transport to that address: the next one, if any
                if plan is None or not plan.next_address:
                    raise EngineError(f"cannot place the call: {exc.info()}") from None
                failed.append(ev.CallAttemptFailed("", plan.address, 503, f"transport error: {exc.reason}",
                                                   plan.next_address))
                plan.index += 1
        info = call.getInfo()
        media = CallMedia(self.cfg.clock_rate, self.cfg.uplink_frames, self.cfg.downlink_frames)
        leg = _Leg(call, info.callIdString, "outbound", c.trunk, media, admitted=True, outbound=plan)
        self._seat(info.id, leg)
        self.by_call_id[leg.call_id] = leg
        self._emit(ev.CallOffered(leg.call_id, "outbound", info.localUri, info.remoteUri, "", c.trunk, media, c.app))
        for f in failed:
            self._emit(replace(f, call_id=leg.call_id))
        self._publish_snapshot(time.monotonic())
        return leg.call_id

    def _dial(self, target: str, trunk: str | None, plan: _Outbound | None, caller_id: str = "",
              withhold: bool = False) -> _Call:
        """INVITE ``target`` through ``trunk`` (at the plan's current address, with that address's
        account and route), presenting ``caller_id`` (or the trunk's); raises ``pj.Error`` when
        pjsua cannot send it."""
        key = trunk if plan is None or plan.index == 0 else f"{trunk}#{plan.index}"
        acc = self.accounts[key] if trunk is not None else self.accounts[None]
        uri = target                        # checked: no parameters but transport/user, no headers
        if not uri.lower().startswith(("sip:", "sips:", "tel:")):
            uri = _number_uri(uri, trunk, self.cfg) if plan is None else f"sip:{uri}@{_uri_host(plan.address)}"
        if trunk is not None:
            spec, user = next((t for t in self.cfg.trunks if t.name == trunk), None), ""
        else:                   # a URI: the trunk at its address (if any) says who the call is from
            policy = DestinationPolicy.of(self.cfg.allowed_destinations, self.cfg.fixed_destinations, self.cfg.trunks)
            at = trunk_of(uri, None, policy)
            spec, user = next((t for t in self.cfg.trunks if t.name == at), None), "trunkline"
            user = "" if self.cfg.public_address or self.cfg.media_public_address else user
        ident = caller_identity(spec, caller_id, withhold, self.cfg.public_address,
                                plan.address if plan is not None else (spec.address if spec and spec.address else uri),
                                user)
        op = pj.CallOpParam(True)
        if ident.from_uri:
            op.txOption.localUri = ident.from_uri
        for name, value in ident.headers:
            h = pj.SipHeader()
            h.hName, h.hValue = name, value
            op.txOption.headers.append(h)
        call = _Call(self, acc)
        call.makeCall(uri, op)
        if plan is not None:
            plan.deadline = time.monotonic() + plan.timeout
        return call

    def _fail_over(self, leg: _Leg, status: int, reason: str) -> bool:
        """The current attempt of an outbound call failed (``status``): record it and, when the
        trunk has another address, move the call there (placed from the loop). False: the call ends."""
        plan = leg.outbound
        if plan is None or leg.answered or leg.end_reason:
            return False
        if status not in FAILOVER_STATUSES:
            return False
        reason = clean_header(reason)[:128]         # the far end's reason phrase: untrusted text
        self._emit(ev.CallAttemptFailed(leg.call_id, plan.address, status, reason, plan.next_address))
        if not plan.next_address:
            return False
        log.info("call %s: %s at %s, trying %s", leg.call_id, status, plan.address, plan.next_address)
        plan.index += 1
        plan.retry, plan.deadline = True, None
        self.legs[f"failover:{leg.call_id}"] = leg      # still counted (capacity, snapshot) until placed
        self.by_call_id[leg.call_id] = leg
        return True

    def _failover_due(self, leg: _Leg, now: float) -> None:
        """From the loop: place a failed-over attempt, or give up on one that got no 180/183 in time."""
        plan = leg.outbound
        if plan is None:
            return
        if plan.deadline is not None and (now >= plan.deadline or leg.end_reason) and not leg.answered:
            plan.deadline = None                # (hung up before any 180/183: end it now, not at the deadline)
            old = leg.call
            try:
                old_id = old.getId()
                self.legs.pop(old_id, None)
                self._abandoned[old_id] = old      # pjsua ends it (at once if nothing came back, else CANCEL)
                old.hangup(pj.CallOpParam())
            except pj.Error as exc:
                log.debug("giving up attempt of %s: %s", leg.call_id, exc.info())
            if not self._fail_over(leg, 408, f"no provisional response in {plan.timeout:g} s"):
                self._end_unplaced(leg, 487 if leg.end_reason else 408, leg.end_reason or "failed 408")
            return
        key = f"failover:{leg.call_id}"
        if not plan.retry or self.legs.get(key) is not leg:
            return
        plan.retry = False
        del self.legs[key]
        if leg.end_reason:                  # hung up while between addresses
            self._end_unplaced(leg, 487, leg.end_reason)
            return
        while True:
            try:
                leg.call = self._dial(plan.target, plan.trunk, plan, plan.caller_id, plan.withhold)
                self.legs[leg.call.getId()] = leg
                return
            except pj.Error as exc:
                if not self._fail_over(leg, 503, f"transport error: {exc.reason}"):
                    self._end_unplaced(leg, 503, "failed 503")
                    return
                del self.legs[key]
                plan.retry = False

    def _end_unplaced(self, leg: _Leg, status: int, reason: str) -> None:
        """An outbound call that ends with no pjsua call of its own left (every address failed)."""
        for k in [k for k, v in self.legs.items() if v is leg]:
            del self.legs[k]
        if self.by_call_id.get(leg.call_id) is leg:
            del self.by_call_id[leg.call_id]
        self._emit(ev.CallEnded(leg.call_id, leg.direction, status, reason, False, 0.0, leg.quality, None))
        self._publish_snapshot(time.monotonic())

    def _check_destination(self, target: str, trunk: str | None) -> None:
        """The last guard against toll fraud: the same rule the API applies."""
        policy = DestinationPolicy.of(self.cfg.allowed_destinations, self.cfg.fixed_destinations, self.cfg.trunks)
        refusal = check_destination(target, trunk, policy)
        if refusal:
            raise EngineError(refusal)
