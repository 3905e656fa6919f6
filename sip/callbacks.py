"""pjsua2 subclasses whose callbacks forward to the engine (engine thread only)."""
from __future__ import annotations

import contextlib
import logging
import os
import sys

from typing import Protocol

import pjsua2 as pj

from sip import events as ev

class Engine(Protocol):
    """The engine's callback side (``sip.engine.Engine``): what these subclasses forward to."""

    def _emit(self, event) -> None: ...
    def _on_incoming(self, acc, prm) -> None: ...
    def _on_state(self, call) -> None: ...
    def _on_media(self, call) -> None: ...
    def _on_dtmf(self, call, prm) -> None: ...
    def _on_xfer(self, call, prm) -> None: ...
    def _on_stream_destroyed(self, call, idx: int) -> None: ...

log = logging.getLogger("trunkline.sip")


class _LogWriter(pj.LogWriter):
    def write(self, entry):
        msg = entry.msg.rstrip()
        if entry.level <= 1:
            log.error("pjsip: %s", msg)
        elif entry.level == 2:
            log.warning("pjsip: %s", msg)
        else:
            log.debug("pjsip: %s", msg)


class _Account(pj.Account):
    def __init__(self, engine: Engine, trunk: str | None):
        super().__init__()
        self.engine = engine
        self.trunk = trunk

    def onIncomingCall(self, prm):
        self.engine._on_incoming(self, prm)

    def onIncomingSubscribe(self, prm):
        # A trunk never subscribes to a bridge's presence: refuse every SUBSCRIBE, so no
        # subscription is held and no NOTIFY goes to whatever Contact the sender named.
        prm.code = 403
        prm.reason = "Forbidden"

    def onRegState(self, prm):
        self.engine._emit(ev.Registration(self.trunk or "", prm.code, prm.reason,
                                          prm.code // 100 == 2 and prm.expiration > 0))


class _Call(pj.Call):
    """Forwards pjsua2 call callbacks to the engine, tagged with itself."""

    def __init__(self, engine: Engine, acc: _Account, call_id: int = pj.PJSUA_INVALID_ID):
        super().__init__(acc, call_id)
        self.engine = engine
        self.acc = acc

    def onCallState(self, prm):
        self.engine._on_state(self)

    def onCallMediaState(self, prm):
        self.engine._on_media(self)

    def onDtmfDigit(self, prm):
        self.engine._on_dtmf(self, prm)

    def onCallTransferRequest(self, prm):
        # An incoming REFER would make the cell INVITE whatever Refer-To names: outbound
        # calls are placed only by the operator (API, CLI, app transfers), never on the
        # caller's word (toll fraud through the trunk; issue 11).
        prm.statusCode = 403

    def onCallTransferStatus(self, prm):
        self.engine._on_xfer(self, prm)

    def onStreamDestroyed(self, prm):
        self.engine._on_stream_destroyed(self, prm.streamIdx)


@contextlib.contextmanager
def _quiet_stdout():
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
