"""Durable records: one JSON line per finished call (DATA_DIR/calls.jsonl) or
per conversation turn (DATA_DIR/turns.jsonl), fsynced as they are written.

``append`` masks and serialises the record at once (a snapshot: the caller may
change its dicts afterwards). With a ``writer`` (a cell's durable writer,
``bridge/records/writer.py``) the line is handed over and written and fsynced
on the writer's thread, off the 20 ms tick; without one it is written inline.

A write that fails (full disk, read-only mount) is logged and counted and the
record is kept in memory to retry with the next write (and once more when the
writer stops); calls go on.
"""
from __future__ import annotations

import json
import logging
import os

from bridge.core import pii
from bridge.records import slowdisk

log = logging.getLogger("trunkline.records")


class CallRecords:
    def __init__(self, data_dir: str, on_error=None, name: str = "calls.jsonl", writer=None):
        self.path = os.path.join(data_dir, name)
        self.pending: list[str] = []     # lines not yet on disk; touched only by the writing thread
        self.on_error = on_error
        self.writer = writer

    def append(self, record: dict) -> bool:
        """Write (or hand to the writer) one record. False if an inline write failed."""
        line = json.dumps(pii.mask(record), default=str) + "\n"    # no card numbers on disk
        if self.writer is not None:
            self.writer.line(self, line)
            return True
        return self.write([line])

    def write(self, lines: list[str]) -> bool:
        """Append ``lines`` (and any kept from a failed write) with one fsync."""
        self.pending.extend(lines)
        if not self.pending:
            return True
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(self.pending))
                f.flush()
                slowdisk.stall()
                os.fsync(f.fileno())
        except OSError as exc:
            log.error("cannot write call record to %s: %s (%d kept in memory)",
                      self.path, exc.strerror, len(self.pending))
            if self.on_error:
                for _ in lines:
                    self.on_error()
            return False
        self.pending.clear()
        return True
