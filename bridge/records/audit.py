"""The access audit: who read what through the API, append-only, in the shared SQLite file.

Every API read of a caller's words or media (a transcript, an event replay, a
recording download, an export) and every erasure appends one row: the API key
id, the route (its template, e.g. ``GET /v1/calls/{call_id}/transcript``, never
the concrete path), the object (a call, recording or event range id), the time
and the source address. A caller's number is never stored: an object naming a
caller is ``caller:`` plus a keyed hash (``caller_ref``), so the audit holds
no words, digits or numbers in clear (the hash is the records' own, keyed by the
key ring: ``bridge/records/cipher.py``).

Rows are appended on a thread of the trail's own, with its own SQLite
connection (the event loop only enqueues, as with ``bridge/records/writer.py``).
The table refuses UPDATE, and DELETE of rows younger than ``KEEP_MIN_DAYS``
(triggers in the database): rows go only by age, through ``purge``.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass

from bridge.records.cipher import vault_for

log = logging.getLogger("trunkline.audit")

KEEP_MIN_DAYS = 1          # audit rows younger than this cannot be deleted at all
CAPACITY = 10_000          # rows queued before the oldest is dropped (logged at ERROR)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS access_audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, key_id TEXT NOT NULL, route TEXT NOT NULL,
    object TEXT, source TEXT, cell TEXT);
CREATE INDEX IF NOT EXISTS access_audit_at ON access_audit(at);
CREATE TRIGGER IF NOT EXISTS access_audit_no_update BEFORE UPDATE ON access_audit
BEGIN SELECT RAISE(ABORT, 'the access audit is append-only'); END;
CREATE TRIGGER IF NOT EXISTS access_audit_no_delete BEFORE DELETE ON access_audit
WHEN OLD.at > CAST(strftime('%s', 'now') AS REAL) - {KEEP_MIN_DAYS * 86400}
BEGIN SELECT RAISE(ABORT, 'the access audit is append-only'); END;
"""


@dataclass(frozen=True)
class Access:
    """One audited access."""
    key_id: str
    route: str                 # "GET /v1/calls/{call_id}/transcript"
    object: str | None         # "call_...", "rec_...", "events>42", "caller:ab12..."
    source: str | None         # the peer address of the request
    at: float
    cell: str | None = None


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=15.0)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA busy_timeout=15000")
    return db


class AuditTrail:
    """Appends accesses on its own thread; lists and purges on the caller's thread."""

    def __init__(self, db_path: str, cell: str | None = None, capacity: int = CAPACITY):
        self.path = db_path
        self.cell = cell
        self.capacity = capacity
        self.dropped = 0
        self._read = _connect(db_path)
        self._read.executescript(SCHEMA)
        self._queue: deque[Access] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="access-audit", daemon=True)
        self._thread.start()

    # -- writing ---------------------------------------------------------------------------
    def caller_ref(self, number: str) -> str:
        """The audit's name for a caller: ``caller:`` and the records' keyed hash of the number (the
        vault's ``ref``, as in the erasures table and the calls' ``caller_ref``), never the number."""
        return "caller:" + vault_for(self.path).ref(number)

    def record(self, key_id: str, route: str, obj: str | None, source: str | None,
               at: float | None = None) -> None:
        """Enqueue one access (never blocks on the disk)."""
        acc = Access(key_id, route, obj, source, time.time() if at is None else at, self.cell)
        with self._cond:
            if self._closing:
                log.error("access not audited (trail closed): %s", acc)
                return
            if len(self._queue) >= self.capacity:
                lost = self._queue.popleft()
                self.dropped += 1
                log.error("access audit queue full, row written only here: %s", lost)
            self._queue.append(acc)
            self._pending += 1
            self._cond.notify()

    def flush(self, timeout: float = 5.0) -> bool:
        """Block until every access enqueued so far is committed (not on the event loop)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    async def settled(self, timeout: float = 2.0) -> bool:
        import asyncio
        return await asyncio.to_thread(self.flush, timeout)

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._read.close()

    def _run(self) -> None:
        db = _connect(self.path)
        delay = 0.2
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if not self._queue and self._closing:
                        return
                    batch = list(self._queue)
                try:
                    db.execute("BEGIN IMMEDIATE")
                    db.executemany("INSERT INTO access_audit (at, key_id, route, object, source, cell) "
                                   "VALUES (?,?,?,?,?,?)",
                                   [(a.at, a.key_id, a.route, a.object, a.source, a.cell) for a in batch])
                    db.execute("COMMIT")
                except sqlite3.Error as exc:
                    try:
                        db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                    log.error("cannot append %d access audit rows: %s (retry in %.1fs)", len(batch), exc, delay)
                    if self._closing:
                        for a in batch:
                            log.error("access not audited: %s", a)
                        with self._cond:
                            for _ in batch:
                                self._queue.popleft()
                            self._pending -= len(batch)
                            self._cond.notify_all()
                        continue
                    time.sleep(delay)
                    delay = min(5.0, delay * 2)
                    continue
                delay = 0.2
                with self._cond:
                    for _ in batch:
                        self._queue.popleft()
                    self._pending -= len(batch)
                    self._cond.notify_all()
        finally:
            db.close()

    # -- reading -----------------------------------------------------------------------------
    def rows(self, after: int = 0, limit: int = 100, key_id: str | None = None,
             obj: str | None = None) -> list[dict]:
        """Rows after ``after`` (a seq), oldest first; filtered by key id and/or object."""
        sql, args = "SELECT * FROM access_audit WHERE seq > ?", [after]
        if key_id:
            sql += " AND key_id = ?"
            args.append(key_id)
        if obj:
            sql += " AND object = ?"
            args.append(obj)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return [dict(r) for r in self._read.execute(sql, args).fetchall()]

    def purge(self, older_than: float) -> int:
        """Delete rows older than ``older_than`` (never younger than ``KEEP_MIN_DAYS``)."""
        floor = time.time() - KEEP_MIN_DAYS * 86400
        return self._read.execute("DELETE FROM access_audit WHERE at < ?",
                                  (min(older_than, floor),)).rowcount


def open_trail(data_dir: str, cell: str | None = None, name: str = "trunkline.db") -> AuditTrail:
    os.makedirs(data_dir, exist_ok=True)
    return AuditTrail(os.path.join(data_dir, name), cell)
