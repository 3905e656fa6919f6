"""SQLite records (WAL): calls, transcripts, events, webhooks and their
deliveries, API keys, idempotent results, number routing, recording metadata
(the rows; ``bridge/records/recording.py`` owns their queries).

An event is committed before anyone is sent it (subscribers follow the
table), so a killed process loses no event it had told anyone about (WAL with
``synchronous=NORMAL``: a committed transaction survives the process being
killed; only an OS crash or power loss can take the last ones). All cells of a
box share one database file; SQLite's locking serialises their writes.

In a cell, the records written during calls (call rows, transcripts, events)
are committed by the durable writer (``bridge/records/writer.py``) on its own
thread and connection, off the 20 ms tick; everything else (API keys, webhooks,
numbers, reads) runs on the event-loop thread and commits before it goes on.
A call row handed to the writer is visible to ``get_call``/``list_calls`` at
once (``stage_call``) until its commit lands.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import time

from bridge.records import slowdisk

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, scope TEXT NOT NULL, hash TEXT NOT NULL,
    created REAL NOT NULL, revoked REAL, last_used REAL);
CREATE TABLE IF NOT EXISTS calls (
    id TEXT PRIMARY KEY, direction TEXT, from_uri TEXT, to_uri TEXT, trunk TEXT, app TEXT,
    state TEXT, codec TEXT, created REAL, answered REAL, ended REAL, result TEXT, reason TEXT,
    quality TEXT, cell TEXT);
CREATE TABLE IF NOT EXISTS transcripts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, call_id TEXT NOT NULL, transcribe_id TEXT,
    direction TEXT NOT NULL, text TEXT NOT NULL, at REAL NOT NULL, extra TEXT);
CREATE INDEX IF NOT EXISTS transcripts_call ON transcripts(call_id, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, type TEXT NOT NULL, call_id TEXT,
    at REAL NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_call ON events(call_id, seq);
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY, url TEXT NOT NULL, secret TEXT NOT NULL, topics TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY, webhook_id TEXT NOT NULL, event_seq INTEGER NOT NULL, status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, last_status INTEGER, last_error TEXT, next_at REAL,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS deliveries_status ON deliveries(status, next_at);
CREATE TABLE IF NOT EXISTS idempotency (
    key_id TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL, status INTEGER NOT NULL,
    body TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (key_id, key));
CREATE TABLE IF NOT EXISTS numbers (number TEXT PRIMARY KEY, app TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS recordings (
    id TEXT PRIMARY KEY, call_id TEXT NOT NULL, status TEXT NOT NULL, format TEXT NOT NULL,
    rate INTEGER NOT NULL, key_id TEXT NOT NULL, path TEXT NOT NULL, started REAL NOT NULL, ended REAL,
    duration REAL, bytes INTEGER, paused TEXT, reason TEXT, error TEXT, complete INTEGER,
    started_by TEXT, cell TEXT);
CREATE INDEX IF NOT EXISTS recordings_call ON recordings(call_id, started);
"""

CALL_COLUMNS = ("id", "direction", "from_uri", "to_uri", "trunk", "app", "state", "codec", "created",
                "answered", "ended", "result", "reason", "cell", "quality")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def _hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Store:
    def __init__(self, data_dir: str, name: str = "trunkline.db"):
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, name)
        # Cells of a box open this file at the same moment: wait on locks, never fail on them.
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=15.0)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout=15000")
        # Switching to WAL takes an exclusive lock and does not wait on busy: retry it.
        deadline = time.monotonic() + 15.0
        while self.db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(calls)")}
        if "cell" not in cols:                                    # databases from before multi-cell
            self.db.execute("ALTER TABLE calls ADD COLUMN cell TEXT")
        self.unsaved_calls: dict[str, dict] = {}     # call rows handed to the writer, not yet committed

    def close(self) -> None:
        self.db.close()

    def _one(self, sql: str, *args):
        row = self.db.execute(sql, args).fetchone()
        return dict(row) if row else None

    def _all(self, sql: str, *args) -> list[dict]:
        return [dict(r) for r in self.db.execute(sql, args).fetchall()]

    # -- API keys ------------------------------------------------------------------
    def create_key(self, name: str, scope: str) -> tuple[str, str]:
        """Returns (key id, the secret key). Only the hash is stored."""
        kid = new_id("key")
        secret = f"tl_{kid[4:]}_{secrets.token_urlsafe(24)}"
        self.db.execute("INSERT INTO api_keys (id, name, scope, hash, created) VALUES (?,?,?,?,?)",
                        (kid, name, scope, _hash_key(secret), time.time()))
        return kid, secret

    def check_key(self, secret: str) -> dict | None:
        parts = secret.split("_")
        if len(parts) < 3 or parts[0] != "tl":
            return None
        row = self._one("SELECT * FROM api_keys WHERE id = ? AND revoked IS NULL", "key_" + parts[1])
        if row is None or not secrets.compare_digest(row["hash"], _hash_key(secret)):
            return None
        return row

    def list_keys(self) -> list[dict]:
        return self._all("SELECT id, name, scope, created, revoked FROM api_keys ORDER BY created")

    def revoke_key(self, kid: str) -> bool:
        cur = self.db.execute("UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), kid))
        return cur.rowcount == 1

    # -- calls -----------------------------------------------------------------------
    def upsert_call(self, call: dict) -> None:
        cols = CALL_COLUMNS
        vals = [call.get(c) for c in cols]
        vals[-1] = json.dumps(call["quality"]) if call.get("quality") is not None else None
        slowdisk.stall()
        self.db.execute(f"INSERT INTO calls ({','.join(cols)}) VALUES ({','.join('?' * len(cols))}) "
                        f"ON CONFLICT(id) DO UPDATE SET " + ",".join(f"{c}=excluded.{c}" for c in cols[1:]), vals)

    def stage_call(self, call: dict) -> dict:
        """A call row about to be upserted by the writer: reads see it from now on.
        Returns the staged row, to pass to ``call_saved`` once it is committed."""
        row = {c: call.get(c) for c in CALL_COLUMNS}
        self.unsaved_calls[row["id"]] = row
        return row

    def call_saved(self, row: dict) -> None:
        """The writer committed ``row`` (unless a newer one is staged, reads go to the table again)."""
        if self.unsaved_calls.get(row["id"]) is row:
            del self.unsaved_calls[row["id"]]

    def get_call(self, call_id: str) -> dict | None:
        staged = self.unsaved_calls.get(call_id)
        if staged is not None:
            return dict(staged)
        row = self._one("SELECT * FROM calls WHERE id = ?", call_id)
        if row and row["quality"]:
            row["quality"] = json.loads(row["quality"])
        return row

    def list_calls(self, state: str | None, limit: int) -> list[dict]:
        n = limit + len(self.unsaved_calls)
        if state == "active":
            rows = self._all("SELECT * FROM calls WHERE ended IS NULL ORDER BY created DESC LIMIT ?", n)
        elif state == "ended":
            rows = self._all("SELECT * FROM calls WHERE ended IS NOT NULL ORDER BY created DESC LIMIT ?", n)
        else:
            rows = self._all("SELECT * FROM calls ORDER BY created DESC LIMIT ?", n)
        for r in rows:
            r["quality"] = json.loads(r["quality"]) if r["quality"] else None
        if self.unsaved_calls:
            staged = [dict(r) for r in self.unsaved_calls.values()
                      if state is None or (r["ended"] is None) == (state == "active")]
            rows = [r for r in rows if r["id"] not in self.unsaved_calls] + staged
            rows.sort(key=lambda r: r["created"] or 0, reverse=True)
        return rows[:limit]

    def close_open_calls(self, reason: str, cell: str) -> int:
        """A cell's calls left open by a crash are closed when it starts again."""
        cur = self.db.execute("UPDATE calls SET ended = ?, state = 'ended', result = COALESCE(result, 'failed'), "
                              "reason = COALESCE(reason, ?) WHERE ended IS NULL AND (cell = ? OR cell IS NULL)",
                              (time.time(), reason, cell))
        return cur.rowcount

    # -- transcripts -------------------------------------------------------------------
    def add_transcript(self, call_id: str, direction: str, text: str, transcribe_id: str | None = None,
                       extra: dict | None = None, at: float | None = None) -> int:
        slowdisk.stall()
        cur = self.db.execute("INSERT INTO transcripts (call_id, transcribe_id, direction, text, at, extra) "
                              "VALUES (?,?,?,?,?,?)", (call_id, transcribe_id, direction, text,
                                                       time.time() if at is None else at,
                                                       json.dumps(extra) if extra else None))
        return cur.lastrowid

    def transcript(self, call_id: str) -> list[dict]:
        rows = self._all("SELECT seq, transcribe_id, direction, text, at, extra FROM transcripts "
                         "WHERE call_id = ? ORDER BY seq", call_id)
        for r in rows:
            r["extra"] = json.loads(r["extra"]) if r["extra"] else None
        return rows

    # -- events -------------------------------------------------------------------------
    def add_event(self, eid: str, etype: str, call_id: str | None, at: float, data: dict | str) -> int:
        """``data`` as a dict, or already as its JSON text."""
        slowdisk.stall()
        cur = self.db.execute("INSERT INTO events (id, type, call_id, at, data) VALUES (?,?,?,?,?)",
                              (eid, etype, call_id, at, data if isinstance(data, str) else json.dumps(data)))
        return cur.lastrowid

    def events_since(self, seq: int, limit: int = 10000) -> list[dict]:
        return self._all("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", seq, limit)

    def event(self, seq: int) -> dict | None:
        return self._one("SELECT * FROM events WHERE seq = ?", seq)

    def last_event_seq(self) -> int:
        row = self._one("SELECT MAX(seq) AS m FROM events")
        return row["m"] or 0

    # -- webhooks -----------------------------------------------------------------------
    def add_webhook(self, url: str, topics: list[str], secret: str) -> dict:
        wid = new_id("wh")
        self.db.execute("INSERT INTO webhooks (id, url, secret, topics, created) VALUES (?,?,?,?,?)",
                        (wid, url, secret, json.dumps(topics), time.time()))
        return self.webhook(wid)

    def webhook(self, wid: str) -> dict | None:
        row = self._one("SELECT * FROM webhooks WHERE id = ?", wid)
        if row:
            row["topics"] = json.loads(row["topics"])
        return row

    def webhooks(self) -> list[dict]:
        rows = self._all("SELECT * FROM webhooks ORDER BY created")
        for r in rows:
            r["topics"] = json.loads(r["topics"])
        return rows

    def delete_webhook(self, wid: str) -> bool:
        return self.db.execute("DELETE FROM webhooks WHERE id = ?", (wid,)).rowcount == 1

    def add_delivery(self, webhook_id: str, event_seq: int) -> str:
        did = new_id("dlv")
        now = time.time()
        self.db.execute("INSERT INTO deliveries (id, webhook_id, event_seq, status, next_at, created, updated) "
                        "VALUES (?,?,?,'pending',?,?,?)", (did, webhook_id, event_seq, now, now, now))
        return did

    def update_delivery(self, did: str, **fields) -> None:
        fields["updated"] = time.time()
        self.db.execute(f"UPDATE deliveries SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                        (*fields.values(), did))

    def delivery(self, did: str) -> dict | None:
        return self._one("SELECT * FROM deliveries WHERE id = ?", did)

    def deliveries(self, status: str | None = None, limit: int = 100) -> list[dict]:
        if status:
            return self._all("SELECT * FROM deliveries WHERE status = ? ORDER BY created DESC LIMIT ?", status, limit)
        return self._all("SELECT * FROM deliveries ORDER BY created DESC LIMIT ?", limit)

    def due_deliveries(self, now: float) -> list[dict]:
        return self._all("SELECT * FROM deliveries WHERE status = 'pending' AND next_at <= ? ORDER BY next_at",
                         now)

    def claim_delivery(self, did: str) -> bool:
        """Take a pending delivery for sending; False if another process took it."""
        return self.db.execute("UPDATE deliveries SET status = 'sending', updated = ? WHERE id = ? AND "
                               "status = 'pending'", (time.time(), did)).rowcount == 1

    # -- idempotency ------------------------------------------------------------------------
    def idempotent(self, key_id: str, key: str) -> dict | None:
        return self._one("SELECT * FROM idempotency WHERE key_id = ? AND key = ?", key_id, key)

    def remember(self, key_id: str, key: str, fingerprint: str, status: int, body: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO idempotency (key_id, key, fingerprint, status, body, created) "
                        "VALUES (?,?,?,?,?,?)", (key_id, key, fingerprint, status, body, time.time()))

    # -- numbers ---------------------------------------------------------------------------------
    def numbers(self) -> dict[str, str]:
        return {r["number"]: r["app"] for r in self._all("SELECT number, app FROM numbers ORDER BY number")}

    def set_number(self, number: str, app: str) -> None:
        self.db.execute("INSERT INTO numbers (number, app, updated) VALUES (?,?,?) "
                        "ON CONFLICT(number) DO UPDATE SET app = excluded.app, updated = excluded.updated",
                        (number, app, time.time()))

    def delete_number(self, number: str) -> bool:
        return self.db.execute("DELETE FROM numbers WHERE number = ?", (number,)).rowcount == 1

    # -- retention ----------------------------------------------------------------------------------
    def purge(self, older_than: float) -> dict:
        out = {}
        for table, col in (("events", "at"), ("transcripts", "at"), ("deliveries", "created"),
                           ("idempotency", "created")):
            out[table] = self.db.execute(f"DELETE FROM {table} WHERE {col} < ?", (older_than,)).rowcount
        out["calls"] = self.db.execute("DELETE FROM calls WHERE ended IS NOT NULL AND ended < ?",
                                       (older_than,)).rowcount
        return out
