"""Durable call records: one JSON line per finished call in DATA_DIR/calls.jsonl.

A write that fails (full disk, read-only mount) is logged and counted and the
record is kept in memory to retry with the next write; calls go on.
"""
from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("trunkline.records")


class CallRecords:
    def __init__(self, data_dir: str, on_error=None):
        self.path = os.path.join(data_dir, "calls.jsonl")
        self.pending: list[str] = []
        self.on_error = on_error

    def append(self, record: dict) -> bool:
        self.pending.append(json.dumps(record, default=str) + "\n")
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
