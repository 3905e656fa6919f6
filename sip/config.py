"""What the SIP engine is told: listen address, media, codecs, capacity, trunks."""
from __future__ import annotations

from dataclasses import dataclass, field

PJSUA_SLOTS = 4
MAX_CAPACITY = PJSUA_SLOTS - 1

DEFAULT_CODECS = ("PCMU/8000", "PCMA/8000", "G722/16000")


@dataclass
class TrunkSpec:
    name: str
    address: str = ""                 # sip:host[:port] the trunk sends from / we send to
    allow: list[str] = field(default_factory=list)
    username: str = ""
    password: str = ""
    realm: str = ""                   # digest realm; required with credentials (never "*")
    register: bool = False
    expires: int = 300
    proxy: str = ""                   # send through this SIP front instead of straight to ``address``
    addresses: list[str] = field(default_factory=list)   # ordered, for outbound failover (first = ``address``)
    cps: float = 0.0                  # outbound call attempts per second the carrier takes (0: no limit)
    max_calls: int = 0                # outbound calls at once through this trunk (0: no limit)
    failover_timeout: float = 8.0     # no 180/183 by then: the next address (only when there is one)
    caller_id: str = ""               # the From user of outbound calls (the number the callee sees)
    caller_ids: list[str] = field(default_factory=list)   # further numbers a call may present
    from_domain: str = ""             # the From host (default: public_address, else the trunk's host)
    asserted_identity: bool = False   # P-Asserted-Identity (RFC 3325) with the caller's number too


@dataclass
class EngineConfig:
    host: str = "127.0.0.1"
    port: int = 5060
    public_address: str = ""          # SIP: Via/Contact/From host (sip.public_address)
    media_public_address: str = ""    # SDP c=/o= (sip.media_public_address; "": public_address)
    rtp_host: str = ""                # the address RTP binds ("": host; a cell behind the front: the box's)
    user_agent: str = "Trunkline"
    rtp_low: int = 10000
    rtp_high: int = 10999
    clock_rate: int = 16000
    codecs: tuple[str, ...] = DEFAULT_CODECS
    capacity: int = MAX_CAPACITY
    retry_after: int = 5
    answer_delay: float = 0.0
    rtp_timeout: float = 30.0         # 0 disables
    stats_interval: float = 1.0
    trunks: list[TrunkSpec] = field(default_factory=list)
    realtime_clock: bool = True
    jitter_init_ms: int = 40          # pjmedia's jitter buffer: first and least prefetch, most (ms; -1:
    jitter_min_ms: int = 40           # pjmedia's default, which gives up ~20 % of frames to 30 ms of jitter)
    jitter_max_ms: int = -1
    log_level: int = 1
    uplink_frames: int = 250
    downlink_frames: int = 1500
    tcp: bool = True                  # False behind the front (UDP only) and by default on a public address
    require_guard: bool = False       # refuse to start when the source guard cannot calibrate (sip/guard.py)
    proxy_port: int = 0               # sip.trusted_proxy_port: the front's source port (0: any)
    allowed_destinations: tuple[str, ...] = ()   # sip.allowed_destinations (see sip.uri.check_destination)
    fixed_destinations: tuple[str, ...] = ()     # operator-configured transfer targets, always allowed


class EngineError(RuntimeError):
    pass
