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

At rest, what a caller said or keyed is sealed (``bridge/records/cipher.py``):
the parties of a call row (``from_uri``/``to_uri``), transcript text and
extras, event data, webhook secrets and idempotent response bodies. Call ids,
states and timings stay in clear for operations; ``caller_ref`` (a keyed
hash) finds a caller's rows for an erasure. Every read here returns
plaintext; a value whose caller was erased reads as ``None`` (``"{}"`` for
event data). Rows written before encryption are read as they are.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import time
from pathlib import Path

from bridge.records import slowdisk
from bridge.core.keys import KeyRingError
from bridge.records.cipher import caller_of, is_sealed, vault_for

AUDIT_KEEP_MIN = 86400.0    # seconds: as audit.KEEP_MIN_DAYS (its trigger refuses younger deletions)

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
CREATE TABLE IF NOT EXISTS erasures (
    id TEXT PRIMARY KEY, at REAL NOT NULL, by TEXT NOT NULL, caller_hash TEXT NOT NULL, counts TEXT NOT NULL);
"""

CALL_COLUMNS = ("id", "direction", "from_uri", "to_uri", "trunk", "app", "state", "codec", "created",
                "answered", "ended", "result", "reason", "cell", "quality", "sip")


def _statements(script: str) -> list[str]:
    """The statements of a schema script, one by one (``executescript`` would commit around them)."""
    out, cur = [], ""
    for line in script.splitlines(keepends=True):
        cur += line
        if sqlite3.complete_statement(cur):
            out.append(cur.strip())
            cur = ""
    assert not cur.strip(), "schema ends mid-statement"
    return out


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
        self.db.execute("PRAGMA secure_delete=ON")       # deleted rows (retention, erasure) are zeroed on disk
        # Cells of a box migrate the same file at the same moment: schema and column checks run in one
        # write transaction, so the second process sees the first one's columns instead of adding them again.
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _statements(SCHEMA):
                self.db.execute(stmt)
            cols = {r[1] for r in self.db.execute("PRAGMA table_info(calls)")}
            if "cell" not in cols:                                # databases from before multi-cell
                self.db.execute("ALTER TABLE calls ADD COLUMN cell TEXT")
            if "caller_ref" not in cols:                          # databases from before sealed records
                self.db.execute("ALTER TABLE calls ADD COLUMN caller_ref TEXT")
            if "outcome" not in cols:                             # databases from before call outcomes
                self.db.execute("ALTER TABLE calls ADD COLUMN outcome TEXT")
            if "sip" not in cols:              # carrier headers, trunk addresses (sealed JSON, like the parties)
                self.db.execute("ALTER TABLE calls ADD COLUMN sip TEXT")
            self.db.execute("CREATE INDEX IF NOT EXISTS calls_caller ON calls(caller_ref)")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self._vault = None
        try:            # now, outside any transaction: making it writes (its tables, its HMAC key)
            self._vault = vault_for(self.path)
        except KeyRingError:
            pass        # a store used only for API keys needs no records key ring; sealing says why
        self.unsaved_calls: dict[str, dict] = {}     # call rows handed to the writer, not yet committed
        self.erased = 0                  # erasures committed through this store (a reader in flight reads again)

    @property
    def vault(self):
        """What seals and opens what callers said (``bridge/records/cipher.py``); ``KeyRingError`` when
        the records' key ring is missing a key they need."""
        if self._vault is None:
            self._vault = vault_for(self.path)
        return self._vault

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
        cols = CALL_COLUMNS + ("caller_ref",)
        self.vault.flush_pending(self.db)          # keys the loop made, with (or before) what they seal
        ref = self.vault.bind_call(call["id"], caller_of(call), self.db)
        if ref is not None:
            self.vault.touch(ref, self.db)
        vals = [call.get(c) for c in CALL_COLUMNS] + [ref]
        vals[CALL_COLUMNS.index("quality")] = json.dumps(call["quality"]) if call.get("quality") is not None \
            else None
        i = CALL_COLUMNS.index("sip")
        vals[i] = json.dumps(vals[i]) if vals[i] else None
        for c in ("from_uri", "to_uri", "sip"):
            i = CALL_COLUMNS.index(c)
            vals[i] = self.vault.seal(vals[i], call["id"], self.db)
        slowdisk.stall()
        self.db.execute(f"INSERT INTO calls ({','.join(cols)}) VALUES ({','.join('?' * len(cols))}) "
                        f"ON CONFLICT(id) DO UPDATE SET " + ",".join(f"{c}=excluded.{c}" for c in cols[1:]), vals)

    def stage_call(self, call: dict) -> dict:
        """A call row about to be upserted by the writer: reads see it from now on.
        Returns the staged row, to pass to ``call_saved`` once it is committed."""
        row = {c: call.get(c) for c in CALL_COLUMNS}
        # its caller's key, before anything is sealed; a new caller's key is made in memory and
        # committed by the writer (this runs on the loop, which must never wait on the database)
        self.vault.bind_call(row["id"], caller_of(row), self.db, defer=True)
        self.unsaved_calls[row["id"]] = row
        return row

    def _open_call(self, row: dict | None) -> dict | None:
        if row is None:
            return None
        row.pop("caller_ref", None)
        for c in ("from_uri", "to_uri"):
            row[c] = self.vault.open(row[c])
        sip = self.vault.open(row.get("sip"))
        try:
            row["sip"] = json.loads(sip) if sip else None
        except (TypeError, ValueError):       # sealed with a key no longer in the ring
            row["sip"] = None
        if row.get("outcome") is not None:       # summary, disposition, intent (sealed JSON)
            row["outcome"] = self.vault.open_json(row["outcome"])
        return row

    def set_call_outcome(self, call_id: str, outcome: dict) -> None:
        """What came of an ended call (what the caller wanted, in words: sealed like the transcript)."""
        slowdisk.stall()
        self.db.execute("UPDATE calls SET outcome = ? WHERE id = ?",
                        (self.vault.seal(json.dumps(outcome), call_id, self.db), call_id))

    def call_saved(self, row: dict) -> None:
        """The writer committed ``row`` (unless a newer one is staged, reads go to the table again)."""
        if self.unsaved_calls.get(row["id"]) is row:
            del self.unsaved_calls[row["id"]]

    def get_call(self, call_id: str) -> dict | None:
        staged = self.unsaved_calls.get(call_id)
        if staged is not None:
            return dict(staged)
        row = self._open_call(self._one("SELECT * FROM calls WHERE id = ?", call_id))
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
            self._open_call(r)
            r["quality"] = json.loads(r["quality"]) if r["quality"] else None
        if self.unsaved_calls:
            staged = [dict(r) for r in self.unsaved_calls.values()
                      if state is None or (r["ended"] is None) == (state == "active")]
            rows = [r for r in rows if r["id"] not in self.unsaved_calls] + staged
            rows.sort(key=lambda r: r["created"] or 0, reverse=True)
        return rows[:limit]

    def outbound_load(self, trunk: str, since: float) -> tuple[int, list[float]]:
        """Outbound calls through ``trunk`` (every cell of a box: they share this file, plus rows this
        process has staged): how many are live, and the creation times of those made since ``since``."""
        rows = {r["id"]: r for r in self._all(
            "SELECT id, ended, created FROM calls WHERE trunk = ? AND direction = 'outbound' "
            "AND (ended IS NULL OR created >= ?)", trunk, since)}
        for r in list(self.unsaved_calls.values()):
            if r.get("trunk") == trunk and r.get("direction") == "outbound":
                rows[r["id"]] = r
        active = sum(1 for r in rows.values() if r["ended"] is None)
        return active, sorted(r["created"] for r in rows.values() if (r["created"] or 0) >= since)

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
        def seal(v):
            return self.vault.seal(v, call_id, self.db)
        cur = self.db.execute("INSERT INTO transcripts (call_id, transcribe_id, direction, text, at, extra) "
                              "VALUES (?,?,?,?,?,?)", (call_id, transcribe_id, direction, seal(text),
                                                       time.time() if at is None else at,
                                                       seal(json.dumps(extra)) if extra else None))
        return cur.lastrowid

    def transcript(self, call_id: str) -> list[dict]:
        rows = self._all("SELECT seq, transcribe_id, direction, text, at, extra FROM transcripts "
                         "WHERE call_id = ? ORDER BY seq", call_id)
        for r in rows:
            r["text"] = self.vault.open(r["text"])
            r["extra"] = json.loads(self.vault.open(r["extra"]) or "null") if r["extra"] else None
        return rows

    # -- events -------------------------------------------------------------------------
    def add_event(self, eid: str, etype: str, call_id: str | None, at: float, data: dict | str) -> int:
        """``data`` as a dict, or already as its JSON text."""
        slowdisk.stall()
        text = data if isinstance(data, str) else json.dumps(data)
        cur = self.db.execute("INSERT INTO events (id, type, call_id, at, data) VALUES (?,?,?,?,?)",
                              (eid, etype, call_id, at, self.vault.seal(text, call_id, self.db)))
        return cur.lastrowid

    def _open_event(self, row: dict | None) -> dict | None:
        if row is not None:
            row["data"] = open_event_data(self.vault, row["data"])
        return row

    def events_since(self, seq: int, limit: int = 10000) -> list[dict]:
        return [self._open_event(r) for r in self._all("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                                                       seq, limit)]

    def event(self, seq: int) -> dict | None:
        return self._open_event(self._one("SELECT * FROM events WHERE seq = ?", seq))

    def last_event_seq(self) -> int:
        row = self._one("SELECT MAX(seq) AS m FROM events")
        return row["m"] or 0

    # -- webhooks -----------------------------------------------------------------------
    def add_webhook(self, url: str, topics: list[str], secret: str) -> dict:
        wid = new_id("wh")
        self.db.execute("INSERT INTO webhooks (id, url, secret, topics, created) VALUES (?,?,?,?,?)",
                        (wid, url, self.vault.seal(secret), json.dumps(topics), time.time()))
        return self.webhook(wid)

    def webhook(self, wid: str) -> dict | None:
        row = self._one("SELECT * FROM webhooks WHERE id = ?", wid)
        if row:
            row["topics"] = json.loads(row["topics"])
            row["secret"] = self.vault.open(row["secret"])
        return row

    def webhooks(self) -> list[dict]:
        rows = self._all("SELECT * FROM webhooks ORDER BY created")
        for r in rows:
            r["topics"] = json.loads(r["topics"])
            r["secret"] = self.vault.open(r["secret"])
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

    def pull_forward_deliveries(self, beyond: float, now: float) -> int:
        """Pending deliveries due after ``beyond`` (later than any retry is ever scheduled: the wall
        clock went back since) become due at ``now``; returns how many."""
        return self.db.execute("UPDATE deliveries SET next_at = ? WHERE status = 'pending' AND next_at > ?",
                               (now, beyond)).rowcount

    def due_deliveries(self, now: float) -> list[dict]:
        return self._all("SELECT * FROM deliveries WHERE status = 'pending' AND next_at <= ? ORDER BY next_at",
                         now)

    def requeue_stale_deliveries(self, before: float, now: float) -> int:
        """Deliveries still 'sending' since before ``before`` (their outcome could not be written:
        the database was locked past the busy timeout) are due again at ``now``, as after a
        restart (at least once); returns how many."""
        return self.db.execute("UPDATE deliveries SET status = 'pending', next_at = ?, updated = ? WHERE "
                               "status = 'sending' AND updated < ?", (now, now, before)).rowcount

    def claim_delivery(self, did: str) -> bool:
        """Take a pending delivery for sending; False if another process took it."""
        return self.db.execute("UPDATE deliveries SET status = 'sending', updated = ? WHERE id = ? AND "
                               "status = 'pending'", (time.time(), did)).rowcount == 1

    # -- idempotency ------------------------------------------------------------------------
    def idempotent(self, key_id: str, key: str) -> dict | None:
        row = self._one("SELECT * FROM idempotency WHERE key_id = ? AND key = ?", key_id, key)
        if row is not None:
            row["body"] = self.vault.open(row["body"])
            if row["body"] is None:                 # sealed with a key no longer in the ring
                return None
        return row

    def remember(self, key_id: str, key: str, fingerprint: str, status: int, body: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO idempotency (key_id, key, fingerprint, status, body, created) "
                        "VALUES (?,?,?,?,?,?)", (key_id, key, fingerprint, status, self.vault.seal(body),
                                                 time.time()))

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
        out["caller_keys"] = self.vault.expire(older_than, self.db)    # what is left of them anywhere becomes unreadable
        try:       # the access audit (bridge/records/audit.py) refuses to lose rows younger than a day
            out["access_audit"] = self.db.execute("DELETE FROM access_audit WHERE at < ?",
                                                  (min(older_than, time.time() - AUDIT_KEEP_MIN),)).rowcount
        except sqlite3.OperationalError:                                # no audit kept here yet
            out["access_audit"] = 0
        return out

    # -- erasure ------------------------------------------------------------------------------------
    def caller_calls(self, number: str) -> list[str]:
        """The ids of every call row whose remote party is ``number`` (also rows from before sealing)."""
        ref = self.vault.ref(number)
        ids = [r["id"] for r in self._all("SELECT id FROM calls WHERE caller_ref = ?", ref)]
        from bridge.records.cipher import normalize_number
        want = normalize_number(number)
        for r in self._all("SELECT id, direction, from_uri, to_uri FROM calls WHERE caller_ref IS NULL"):
            if not is_sealed(r["from_uri"]) and caller_of(r) == want:
                ids.append(r["id"])
        return ids

    def erase_caller(self, number: str, by: str) -> dict:
        """Delete every row about a caller and their key (crypto-shredding what is left elsewhere:
        JSONL journals, backups). Records the erasure with the number only as a keyed hash.
        Returns the counts and the recording files to delete (``paths``)."""
        ref = self.vault.ref(number)
        ids = self.caller_calls(number)
        counts = {"calls": 0, "transcripts": 0, "events": 0, "deliveries": 0, "recordings": 0}
        paths: list[str] = []
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                q = ",".join("?" * len(part))
                paths += [r["path"] for r in self._all(f"SELECT path FROM recordings WHERE call_id IN ({q})", *part)]
                counts["recordings"] += self.db.execute(f"DELETE FROM recordings WHERE call_id IN ({q})",
                                                        part).rowcount
                counts["deliveries"] += self.db.execute(
                    f"DELETE FROM deliveries WHERE event_seq IN (SELECT seq FROM events WHERE call_id IN ({q}))",
                    part).rowcount
                for table in ("transcripts", "events"):
                    counts[table] += self.db.execute(f"DELETE FROM {table} WHERE call_id IN ({q})", part).rowcount
                counts["calls"] += self.db.execute(f"DELETE FROM calls WHERE id IN ({q})", part).rowcount
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.erased += 1
        counts["caller_keys"] = self.vault.erase(ref, self.db)
        eid = new_id("era")
        self.db.execute("INSERT INTO erasures (id, at, by, caller_hash, counts) VALUES (?,?,?,?,?)",
                        (eid, time.time(), by, ref, json.dumps(counts)))
        return {"id": eid, "counts": counts, "call_ids": ids, "paths": paths, "caller_hash": ref}

    def erasures(self, limit: int = 100) -> list[dict]:
        rows = self._all("SELECT * FROM erasures ORDER BY at DESC LIMIT ?", limit)
        for r in rows:
            r["counts"] = json.loads(r["counts"])
        return rows


def open_event_data(vault, data) -> str:
    """An event's ``data`` column as its JSON text (``"{}"`` when it cannot be opened)."""
    text = vault.open(data)
    return "{}" if text is None else text


class EventReader:
    """Reads stored events, their data opened, on a read-only connection of its own, in the thread
    that made it (the event tailer's reader thread keeps one for its life; ``read_events`` makes one
    per call)."""

    def __init__(self, path: str):
        self.path = path
        # a URI, so the path is escaped: a directory named "a#b" or "x%41" must not become another file
        self.db = sqlite3.connect(Path(os.path.abspath(path)).as_uri() + "?mode=ro", uri=True, timeout=15.0)
        self.db.row_factory = sqlite3.Row

    def read(self, since: int, limit: int) -> list[dict]:
        rows = [dict(r) for r in self.db.execute("SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                                                 (since, limit)).fetchall()]
        vault = vault_for(self.path)
        for r in rows:
            r["data"] = open_event_data(vault, r["data"])
        return rows

    def close(self) -> None:
        self.db.close()


def read_events(path: str, since: int, limit: int) -> list[dict]:
    """Stored events after ``since`` on a read-only connection of its own (for a worker thread),
    their data opened."""
    reader = EventReader(path)
    try:
        return reader.read(since, limit)
    finally:
        reader.close()
