"""Durable records: one JSON line per finished call (DATA_DIR/calls.jsonl) or
per conversation turn (DATA_DIR/turns.jsonl), fsynced as they are written.

A write that fails (full disk, read-only mount) is logged and counted and the
record is kept in memory to retry with the next write; calls go on.
"""
from __future__ import annotations

import json
import logging
import os

from bridge.core import pii
log = logging.getLogger("trunkline.records")


class CallRecords:
    def __init__(self, data_dir: str, on_error=None, name: str = "calls.jsonl"):
        self.path = os.path.join(data_dir, name)
        self.pending: list[str] = []
        self.on_error = on_error

    def append(self, record: dict) -> bool:
        self.pending.append(json.dumps(pii.mask(record), default=str) + "\n")    # no card numbers on disk
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(self.pending))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            log.error("cannot write call record to %s: %s (%d kept in memory)",
                      self.path, exc.strerror, len(self.pending))
            if self.on_error:
                self.on_error()
            return False
        self.pending.clear()
        return True
