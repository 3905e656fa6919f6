"""One call as the application sees it: its media hand-off, app and timers."""
from __future__ import annotations

import logging
import time

from bridge.core import pii
from sip import commands as cmd
from sip.headers import CarrierHeaders

log = logging.getLogger("trunkline.call")


class Session:
    def __init__(self, services, offered):
        self.services = services          # the cell's bridge.api.services.Services: bus, store, metrics, engine
        self.call_id = offered.call_id
        self.direction = offered.direction
        self.from_uri = offered.from_uri
        self.to_uri = offered.to_uri
        self.source = offered.source
        self.trunk = offered.trunk
        self.media = offered.media
        self.started = time.monotonic()
        self.created = time.time()
        self.answered_at: float | None = None
        self.codec = ""
        self.app = None
        self.dtmf = ""
        self.ending = False
        self._dropped = (0, 0)
        self.app_name = ""
        self.state = "ringing"
        self.transcribers: dict = {}
        self.speakings: dict = {}
        self.speak_generation = 0
        self.tool_calls: list[dict] = []   # audit records of the tool calls made on this call
        self.taps: list = []          # audio consumers: recordings, media streams
        # carrier headers of an inbound INVITE (name -> values) and what they give the call's context
        self.sip_headers: dict[str, list[str]] = {k: list(v) for k, v in getattr(offered, "headers", {}).items()}
        self.context: dict[str, str] = CarrierHeaders(self.sip_headers).context()
        self.api_context: dict[str, str] = {}      # POST /v1/calls {context} (kept in the call record)
        self.profile = ""             # POST /v1/calls {profile, language}: the agent's profile and language
        self.language = ""
        self.address = ""             # outbound through a trunk: the address that answered
        self.failed_addresses: list[dict] = []     # outbound: the trunk addresses that failed, in order
        self.asserted = ""            # outbound, caller ID withheld: the number asserted to the carrier

    def set_context(self, values: dict[str, str]) -> None:
        """Context given with the call (``POST /v1/calls {context}``, checked there), over the headers'."""
        self.api_context = dict(values)
        self.context.update(values)

    def sip_record(self) -> dict | None:
        """What the call record keeps of SIP beyond the parties, and the context the API gave the call
        (sealed at rest with them; the headers' context is theirs), or None."""
        if not (self.sip_headers or self.address or self.failed_addresses or self.api_context or self.asserted):
            return None
        return {"headers": self.sip_headers, "address": self.address or None, "failed": self.failed_addresses,
                **({"context": dict(self.api_context)} if self.api_context else {}),
                **({"asserted_identity": self.asserted} if self.asserted else {})}

    def attempt_failed(self, address: str, status: int, reason: str, next_address: str) -> None:
        """An outbound attempt at one trunk address failed: remember it, tell subscribers."""
        self.failed_addresses.append({"address": address, "status": status, "reason": reason})
        self.emit("call_failover", {"address": address, "status": status, "reason": reason,
                                    "next_address": next_address or None})

    def add_tap(self, tap) -> None:
        """``tap.on_audio(inbound, outbound, now)`` gets every tick's frames of both legs:
        inbound ``[(t, pcm)]`` from the caller, outbound ``[(t, pcm or None)]`` as sent."""
        if tap not in self.taps:
            self.taps.append(tap)
        self.media.tap_out = True

    def remove_tap(self, tap) -> None:
        if tap in self.taps:
            self.taps.remove(tap)
        if not self.taps:
            self.media.tap_out = False
            self.media.sent.clear()

    def wall(self, mono: float) -> float:
        """The wall-clock time of monotonic time ``mono`` on this call's own timeline (its creation's
        wall time plus monotonic seconds since): the record's times keep their true distances when
        the wall clock is stepped mid-call (an NTP correction), so ended - answered is the talk time."""
        return self.created + (mono - self.started)

    @property
    def answered_wall(self) -> float | None:
        return self.wall(self.answered_at) if self.answered_at else None

    def emit(self, etype: str, data: dict) -> None:
        """Publish an event about this call on the bus (stored, then sent)."""
        self.services.bus.publish(etype, self.call_id, data)

    def record_transcript(self, direction: str, text: str, transcribe_id: str | None = None,
                          extra: dict | None = None) -> None:
        """Store a line of the call's transcript and publish ``transcript_created``: both go to the
        bus's durable writer, in that order, so the line is committed before the event is."""
        text, extra = pii.mask_text(text), pii.mask(extra)      # card numbers are never stored
        call_id, at = self.call_id, time.time()
        self.services.bus.writer.sql(
            lambda st: st.add_transcript(call_id, direction, text, transcribe_id, extra, at), "transcript",
            {"call_id": call_id, "direction": direction, "text": text, "transcribe_id": transcribe_id,
             "extra": extra, "at": at})
        data = {"direction": direction, "message": text}
        if transcribe_id:
            data["transcribe_id"] = transcribe_id
        self.emit("transcript_created", data)

    def heard_out(self, text: str) -> None:
        """Text the caller has just heard from us (for outbound transcription)."""
        for tr in self.transcribers.values():
            tr.spoken(text)

    def hangup(self, reason: str, status: int = 0) -> None:
        if self.ending:
            return
        self.ending = True
        self.services.submit(cmd.Hangup(self.call_id, status, reason))

    def transfer(self, target: str) -> None:
        log.info("transfer", extra={"fields": {"event": "transfer", "call_id": self.call_id, "target": target}})
        self.services.submit(cmd.Transfer(self.call_id, target))

    def drops(self) -> tuple[int, int]:
        """Newly dropped (uplink, downlink) frames since the last call."""
        up, down = self.media.uplink.dropped, self.media.downlink.dropped
        last_up, last_down = self._dropped
        self._dropped = (up, down)
        return up - last_up, down - last_down
