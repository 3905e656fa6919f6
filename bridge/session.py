"""One call as the application sees it: its media hand-off, app and timers."""
from __future__ import annotations

import logging
import time

from sip import commands as cmd

log = logging.getLogger("trunkline.call")


class Session:
    def __init__(self, cell, offered):
        self.cell = cell
        self.call_id = offered.call_id
        self.direction = offered.direction
        self.from_uri = offered.from_uri
        self.to_uri = offered.to_uri
        self.source = offered.source
        self.trunk = offered.trunk
        self.media = offered.media
        self.started = time.monotonic()
        self.answered_at: float | None = None
        self.codec = ""
        self.app = None
        self.dtmf = ""
        self.ending = False
        self._dropped = (0, 0)

    def hangup(self, reason: str, status: int = 0) -> None:
        if self.ending:
            return
        self.ending = True
        self.cell.engine.submit(cmd.Hangup(self.call_id, status, reason))

    def transfer(self, target: str) -> None:
        log.info("transfer", extra={"fields": {"event": "transfer", "call_id": self.call_id, "target": target}})
        self.cell.engine.submit(cmd.Transfer(self.call_id, target))

    def drops(self) -> tuple[int, int]:
        """Newly dropped (uplink, downlink) frames since the last call."""
        up, down = self.media.uplink.dropped, self.media.downlink.dropped
        last_up, last_down = self._dropped
        self._dropped = (up, down)
        return up - last_up, down - last_down
