"""Commands for the SIP engine. Each carries a Future the engine resolves."""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field


@dataclass
class Command:
    future: Future = field(default_factory=Future, init=False, repr=False, compare=False)


@dataclass
class Hangup(Command):
    call_id: str
    status: int = 0         # 0: BYE if answered, else 603 Decline
    reason: str = "local hangup"


@dataclass
class Transfer(Command):
    """Blind transfer: send REFER to the peer with Refer-To ``target``."""
    call_id: str
    target: str


@dataclass
class SendDtmf(Command):
    call_id: str
    digits: str


@dataclass
class MakeCall(Command):
    """Place an outbound call; the future resolves to the new call_id."""
    uri: str
    trunk: str | None = None
    app: str | None = None          # echoed in CallOffered so the application knows what to run
    caller_id: str = ""             # the number presented (checked against the trunk's; "": its caller_id)
    withhold: bool = False          # From anonymous, the number only in P-Asserted-Identity (Privacy: id)


@dataclass
class SetDraining(Command):
    """Refuse (``True``) or take again (``False``) new calls; the engine publishes a ``CallsSnapshot``."""
    draining: bool = True


@dataclass
class Shutdown(Command):
    pass
