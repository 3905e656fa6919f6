"""What the engine keeps per call: ``_Leg`` (one live call) and ``_Outbound`` (an outbound call's
route through its trunk's addresses). Plain records, used from the engine thread only."""
from __future__ import annotations

from dataclasses import dataclass, field

import pjsua2 as pj

from media.callmedia import CallMedia
from media.quality import Quality
from sip.callbacks import _Call
from sip.port import FramePort


@dataclass
class _Outbound:
    """An outbound call's route through its trunk: the addresses in order, and where it is."""
    target: str                       # what was dialled (a number, or a URI)
    trunk: str
    addresses: tuple[str, ...]
    timeout: float                    # seconds to wait for 180/183 before the next address
    index: int = 0
    deadline: float | None = None     # no provisional response by then: the next address
    retry: bool = False               # the attempt ended with a failover status: place the next now
    caller_id: str = ""               # what every attempt presents (MakeCall's)
    withhold: bool = False

    @property
    def address(self) -> str:
        return self.addresses[self.index] if self.addresses else ""

    @property
    def next_address(self) -> str:
        return self.addresses[self.index + 1] if self.index + 1 < len(self.addresses) else ""


@dataclass
class _Leg:
    """What the engine knows of one live call."""
    call: _Call
    call_id: str
    direction: str
    trunk: str | None
    media: CallMedia | None
    admitted: bool                    # False for calls answered 403/503
    answer_at: float | None = None
    answered: bool = False
    port: FramePort | None = None
    aud: pj.AudioMedia | None = None
    med_idx: int = -1
    held: bool = False
    quality: Quality = field(default_factory=Quality)
    last_rx_pkts: int = -1
    last_rx_change: float = 0.0
    end_reason: str = ""
    transfer_pending: bool = False
    refusal: tuple[int, dict] | None = None   # final answer owed, sent after onIncomingCall returns
    confirmed_at: float | None = None          # when the call was confirmed (ACKed)
    had_media: bool = False                    # an audio stream was ever connected
    outbound: _Outbound | None = None          # an outbound call through a trunk: its failover route
