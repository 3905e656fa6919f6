"""Durable records: one JSON line per finished call (DATA_DIR/calls.jsonl) or
per conversation turn (DATA_DIR/turns.jsonl), fsynced as they are written.

``append`` masks and serialises the record at once (a snapshot: the caller may
change its dicts afterwards). With a ``writer`` (a cell's durable writer,
``bridge/records/writer.py``) the line is handed over and written and fsynced
on the writer's thread, off the 20 ms tick; without one it is written inline.

At rest a line keeps in clear only what operations need: the event name, call
id, role, result, numbers (timings, counts, quality) and a few enumerations
(``CLEAR``). Everything else (who called, what was said or keyed, tool
arguments) is one sealed value under ``"sealed"``, with the call's caller key
(``bridge/records/cipher.py``): erasing the caller makes it unreadable.
``read`` gives the records back whole; ``rewrite`` drops lines (retention,
erasure) under the journal's lock, which ``write`` takes too, so a cell's
append is never lost to another's rewrite.

A write that fails (full disk, read-only mount) is logged and counted and the
record is kept in memory to retry with the next write (and once more when the
writer stops); calls go on.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
from contextlib import contextmanager
from typing import Callable, Iterator

from bridge.core import pii
from bridge.records import slowdisk
from bridge.records.cipher import is_sealed, vault_for

log = logging.getLogger("trunkline.records")

CLEAR = frozenset({"event", "call_id", "role", "turn", "result", "reason", "direction", "codec", "status",
                   "kind", "tool", "app", "trunk", "cell"})
SEALED = "sealed"


def seal_record(record: dict, vault) -> dict:
    """What of ``record`` stays in clear, plus everything else sealed under ``"sealed"``."""
    clear, secret = {}, {}
    for k, v in record.items():
        if (k in CLEAR and (v is None or isinstance(v, str) and len(v) <= 64)) or \
                isinstance(v, (int, float, bool)) or v is None:
            clear[k] = v
        else:
            secret[k] = v
    if secret:
        clear[SEALED] = vault.seal_json(secret, record.get("call_id"))
    return clear


def open_record(record: dict, vault) -> dict:
    """A journal line's record whole again; ``"erased": true`` instead when its caller's key is gone."""
    sealed = record.get(SEALED)
    if not is_sealed(sealed):
        return record
    out = {k: v for k, v in record.items() if k != SEALED}
    secret = vault.open_json(sealed)
    if secret is None:
        out["erased"] = True
    else:
        out.update(secret)
    return out


class CallRecords:
    def __init__(self, data_dir: str, on_error=None, name: str = "calls.jsonl", writer=None):
        self.path = os.path.join(data_dir, name)
        self.data_dir = data_dir
        self.pending: list[str] = []     # lines not yet on disk; touched only by the writing thread
        self.on_error = on_error
        self.writer = writer
        self._vault = None

    @property
    def vault(self):
        if self._vault is None:
            self._vault = vault_for(os.path.join(self.data_dir, "trunkline.db"))
        return self._vault

    def append(self, record: dict) -> bool:
        """Write (or hand to the writer) one record. False if an inline write failed."""
        masked = pii.mask(record)                                    # no card numbers, even sealed
        line = json.dumps(seal_record(json.loads(json.dumps(masked, default=str)), self.vault)) + "\n"
        if self.writer is not None:
            self.writer.line(self, line)
            return True
        return self.write([line])

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def write(self, lines: list[str]) -> bool:
        """Append ``lines`` (and any kept from a failed write) with one fsync."""
        self.pending.extend(lines)
        if not self.pending:
            return True
        try:
            with self._locked(), open(self.path, "a", encoding="utf-8") as f:
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

    def read(self) -> Iterator[dict]:
        """Every record in the file, opened (see ``open_record``); lines that are not JSON are skipped."""
        if not os.path.isfile(self.path):
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
        except FileNotFoundError:
            return
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield open_record(rec, self.vault)

    def rewrite(self, drop: Callable[[dict], bool]) -> int:
        """Remove the lines whose (still sealed) record ``drop`` says to; atomically (a new file renamed
        over the old one, fsynced). Returns how many lines were removed."""
        if not os.path.isfile(self.path):          # absent, or not a regular file (never rewrite a device)
            return 0
        with self._locked():
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
            keep, removed = [], 0
            for line in lines:
                try:
                    rec = json.loads(line)
                except ValueError:
                    keep.append(line)
                    continue
                if isinstance(rec, dict) and drop(rec):
                    removed += 1
                else:
                    keep.append(line)
            if removed:
                tmp = self.path + ".tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write("".join(keep))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
        return removed


def record_time(rec: dict) -> float | None:
    """When a journal record was written (``at``, ``ended_at``)."""
    for k in ("at", "ended_at"):
        v = rec.get(k)
        if isinstance(v, (int, float)):
            return float(v)
    return None
