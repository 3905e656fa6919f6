"""Plain events the SIP engine emits. No pjsua2 objects ever leave ``sip/``."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from media.callmedia import CallMedia
from media.frames import TimingSummary
from media.quality import Quality


@dataclass(frozen=True)
class CallOffered:
    """An accepted INVITE (or an outbound call being placed)."""
    call_id: str            # SIP Call-ID: stable, unique, shown in logs
    direction: str          # "inbound" | "outbound"
    from_uri: str
    to_uri: str
    source: str             # ip:port the INVITE came from ("" for outbound)
    trunk: str | None
    media: CallMedia = field(compare=False, repr=False)
    app: str | None = None          # set for outbound calls placed with MakeCall(app=...)
    # carrier headers of an inbound INVITE (sip.headers.parse: P-Asserted-Identity, Diversion,
    # Remote-Party-ID, X-*), canonical name -> values; untrusted, bounded and cleaned
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}), compare=False)


@dataclass(frozen=True)
class CallRejected:
    source: str
    from_uri: str
    to_uri: str
    status: int
    reason: str             # untrusted | full | draining


@dataclass(frozen=True)
class CallAnswered:
    call_id: str
    codec: str
    clock_rate: int
    address: str = ""       # outbound through a trunk: the trunk address that answered


@dataclass(frozen=True)
class CallAttemptFailed:
    """An outbound call's attempt at one of its trunk's addresses failed (503, 408, no
    provisional response in time, transport error); ``next_address`` is tried now ("" when
    none is left and the call ends)."""
    call_id: str
    address: str
    status: int
    reason: str
    next_address: str = ""


@dataclass(frozen=True)
class CallHold:
    call_id: str
    held: bool              # True while the peer has put us on hold


@dataclass(frozen=True)
class Dtmf:
    call_id: str
    digit: str
    method: str             # rfc4733 | info
    duration_ms: int


@dataclass(frozen=True)
class TransferStatus:
    call_id: str
    status: int
    reason: str
    final: bool


@dataclass(frozen=True)
class CallEnded:
    call_id: str
    direction: str
    status: int             # last SIP status of the dialog
    reason: str             # why it ended: "remote bye", "local hangup", "rtp timeout", ...
    answered: bool
    duration: float         # connected seconds
    quality: Quality
    timing: TimingSummary | None


@dataclass(frozen=True)
class Registration:
    trunk: str
    status: int
    reason: str
    registered: bool


@dataclass(frozen=True)
class EngineStopped:
    error: str | None = None


@dataclass(frozen=True)
class CallsSnapshot:
    """The engine's live view, published on its stats interval, when a call starts or ends and when
    draining changes. The only way other threads learn the engine's state: they keep the latest one
    and never read the engine's own structures."""
    active_calls: int                       # calls admitted and not yet ended (what ``capacity`` counts)
    quality: Mapping[str, Quality] = field(default_factory=lambda: MappingProxyType({}))   # call_id -> copy
    draining: bool = False                  # the engine refuses new calls (503)
    at: float = 0.0                         # time.monotonic() when taken
