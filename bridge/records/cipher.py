"""Sealed values: what a caller said or keyed, encrypted field by field at rest.

A sealed value is text, so it fits the same SQLite column or JSON field the
plaintext used to::

    tl1:<key ref>:<base64url(nonce (12) | AES-256-GCM ciphertext + tag)>

- ``key ref`` is ``k.<ring key id>`` for values that belong to no caller
  (webhook secrets, idempotent responses, events of no call): the AES key is
  HKDF-SHA256 of that key-ring key, so rotating the ring works as it does for
  recordings (new values under ``current``, old ones readable while their key
  stays in the ring).
- or ``c.<caller key id>`` for everything about one caller (the remote party
  of a call: From for inbound, To for outbound). Each caller has a random
  AES-256 key in the ``caller_keys`` table, stored *wrapped* (AES-GCM) by the
  key ring. Erasing a caller deletes that row: every value sealed for them, in
  the database, in the append-only JSONL journals and in any backup, can no
  longer be opened (crypto-shredding). Opening such a value gives ``None``.
- The associated data is ``tl1:<key ref>``: a value cannot be moved to another
  key. Values without the ``tl1:`` prefix are rows written before encryption
  and are returned as they are (a format change reads old rows too).

Callers are found by a keyed hash (``ref``: HMAC-SHA256 with a random key kept
wrapped in ``vault_keys``), never by the number in clear. Opening a
``c.`` value reads its caller key from the database each time (no cache), so an
erasure made by another process takes effect at once.

One ``Vault`` per database file and process (``vault_for``), shared by the
loop's store and the durable writer's, thread-safe. A store passes its own
connection (``db``) to what may write (a new caller key, ``touch``, erasure):
inside the writer's transaction a second connection would wait on its lock.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bridge.core import keys as keyring
from bridge.core.keys import KeyRing, KeyRingError
from sip.uri import user_part

log = logging.getLogger("trunkline.records")

PREFIX = "tl1:"
NONCE = 12
VAULT_SCHEMA = """
CREATE TABLE IF NOT EXISTS vault_keys (
    name TEXT PRIMARY KEY, key_id TEXT NOT NULL, wrapped BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS caller_keys (
    id TEXT PRIMARY KEY, ref TEXT NOT NULL, key_id TEXT NOT NULL, wrapped BLOB NOT NULL,
    created REAL NOT NULL, used REAL NOT NULL);
CREATE INDEX IF NOT EXISTS caller_keys_ref ON caller_keys(ref);
"""
# call id -> caller key, for the calls this process writes (a miss reads the call's row). Each
# entry holds an AESGCM whose native state (~2.5 KB, outside Python's heap) stays until evicted:
# at 4096 a cell's RSS grew ~2.5 KB a call for its first 4096 calls (~10 MB, the soak's "growth").
_CALLS_KEPT = 256


class VaultError(ValueError):
    pass


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def normalize_number(number: str) -> str:
    """The caller's identity: the user part of a URI (or the text as given), digits only when it is a
    phone number (``+1 (555) 123-4567`` and ``sip:15551234567@host`` are the same caller)."""
    s = (number or "").strip()
    if ":" in s or "<" in s:
        s = user_part(s) or s
    if re.fullmatch(r"[+0-9 ().\-]+", s) and re.search(r"[0-9]", s):
        return re.sub(r"[^0-9]", "", s)
    return s.lower()


def caller_of(call: dict) -> str:
    """The remote party of a call row (From for inbound calls, To for outbound ones)."""
    uri = call.get("to_uri") if call.get("direction") == "outbound" else call.get("from_uri")
    return normalize_number(uri or "")


def is_sealed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


class Vault:
    def __init__(self, path: str, ring: KeyRing):
        self.path = path
        self.ring = ring
        self._lock = threading.RLock()          # the in-memory maps only
        self._dblock = threading.Lock()         # the vault's own connection
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=15.0)
        self._db.execute("PRAGMA busy_timeout=15000")
        self._db.executescript(VAULT_SCHEMA)
        self._derived: dict[tuple[str, str], AESGCM] = {}
        self._calls: OrderedDict[str, tuple[str, str, AESGCM] | None] = OrderedDict()
        self._warned: set[str] = set()
        # caller keys made on the event loop and not yet committed by the cell's writer:
        # id -> (ref, key id, wrapped, created, raw). A ref may end up with several keys
        # (two cells meeting a new caller at once): each value names the key it was sealed with.
        self._pending: dict[str, tuple[str, str, bytes, float, bytes]] = {}
        self._ref_key = self._vault_key("ref")
        self.rewrap()

    # -- keys ---------------------------------------------------------------------------------------
    def _ring_aead(self, kid: str, purpose: str) -> AESGCM:
        k = (kid, purpose)
        if k not in self._derived:
            hk = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                      info=f"trunkline records v1 {purpose} {kid}".encode())
            self._derived[k] = AESGCM(hk.derive(self.ring.key(kid)))
        return self._derived[k]

    def _wrap(self, raw: bytes, aad: bytes) -> tuple[str, bytes]:
        nonce = os.urandom(NONCE)
        kid = self.ring.current
        return kid, nonce + self._ring_aead(kid, "wrap").encrypt(nonce, raw, aad)

    def _unwrap(self, kid: str, blob: bytes, aad: bytes) -> bytes:
        return self._ring_aead(kid, "wrap").decrypt(blob[:NONCE], blob[NONCE:], aad)

    def _vault_key(self, name: str) -> bytes:
        with self._dblock:
            row = self._db.execute("SELECT key_id, wrapped FROM vault_keys WHERE name = ?", (name,)).fetchone()
            if row is None:
                kid, blob = self._wrap(os.urandom(32), b"vault:" + name.encode())
                self._db.execute("INSERT OR IGNORE INTO vault_keys (name, key_id, wrapped, created) VALUES "
                                 "(?,?,?,?)", (name, kid, blob, time.time()))
                row = self._db.execute("SELECT key_id, wrapped FROM vault_keys WHERE name = ?", (name,)).fetchone()
        try:
            return self._unwrap(row[0], row[1], b"vault:" + name.encode())
        except KeyRingError:
            raise KeyRingError(f"the records in {self.path} are keyed with key {row[0]!r}, which is not in the "
                               f"key ring; keep old keys in the ring until their data is gone") from None
        except InvalidTag:
            raise KeyRingError(f"the records key of {self.path} does not authenticate with key {row[0]!r} "
                               f"(a different key under the same id?)") from None

    def rewrap(self) -> int:
        """Wrap every caller key and vault key under the current ring key (after a rotation). Keys whose
        ring key is gone are left as they are. Returns how many were re-wrapped."""
        n = 0
        cur = self.ring.current
        with self._dblock:
            for table, col in (("caller_keys", "id"), ("vault_keys", "name")):
                rows = self._db.execute(f"SELECT {col}, key_id, wrapped FROM {table} WHERE key_id != ?",
                                        (cur,)).fetchall()
                for name, kid, blob in rows:
                    if kid not in self.ring:
                        continue
                    aad = (b"caller:" if table == "caller_keys" else b"vault:") + name.encode()
                    try:
                        raw = self._unwrap(kid, blob, aad)
                    except InvalidTag:
                        continue
                    nkid, nblob = self._wrap(raw, aad)
                    self._db.execute(f"UPDATE {table} SET key_id = ?, wrapped = ? WHERE {col} = ? AND key_id = ?",
                                     (nkid, nblob, name, kid))
                    n += 1
        if n:
            log.info("re-wrapped %d record keys under key %s", n, cur)
        return n

    def ref(self, number: str) -> str:
        """A caller's keyed hash (HMAC-SHA256): how rows find their caller without the number in clear."""
        return hmac.new(self._ref_key, normalize_number(number).encode(), hashlib.sha256).hexdigest()

    @contextmanager
    def _conn(self, db=None) -> Iterator[sqlite3.Connection]:
        """The caller's connection as is, or the vault's own under its lock (held for one statement
        group, never while ``_lock`` is: no lock order to get wrong)."""
        if db is not None:
            yield db
            return
        with self._dblock:
            yield self._db

    def _caller_key(self, ref: str, create: bool = True, db=None, defer: bool = False) -> tuple[str, AESGCM] | None:
        with self._conn(db) as conn:
            row = conn.execute("SELECT id, key_id, wrapped FROM caller_keys WHERE ref = ? ORDER BY created LIMIT 1",
                               (ref,)).fetchone()
            if row is None:
                with self._lock:
                    waiting = next(((cid, p) for cid, p in self._pending.items() if p[0] == ref), None)
                if waiting is not None:
                    return waiting[0], AESGCM(waiting[1][4])
                if not create:
                    return None
                if defer:       # on the loop: no write here (a stalled writer holds the database)
                    cid, raw = secrets.token_hex(8), os.urandom(32)
                    kid, blob = self._wrap(raw, b"caller:" + cid.encode())
                    with self._lock:
                        self._pending[cid] = (ref, kid, blob, time.time(), raw)
                    return cid, AESGCM(raw)
                now = time.time()
                cid = secrets.token_hex(8)
                kid, blob = self._wrap(os.urandom(32), b"caller:" + cid.encode())
                conn.execute("INSERT OR IGNORE INTO caller_keys (id, ref, key_id, wrapped, created, used) "
                             "VALUES (?,?,?,?,?,?)", (cid, ref, kid, blob, now, now))
                row = conn.execute("SELECT id, key_id, wrapped FROM caller_keys WHERE ref = ? ORDER BY created "
                                   "LIMIT 1", (ref,)).fetchone()
        return row[0], AESGCM(self._unwrap(row[1], row[2], b"caller:" + row[0].encode()))

    def has_pending(self) -> bool:
        return bool(self._pending)

    def flush_pending(self, db) -> list[str]:
        """Write the caller keys made on the loop (writer thread, inside its transaction);
        returns their ids for ``settle_pending`` once that transaction is committed."""
        with self._lock:
            items = list(self._pending.items())
        for cid, (ref, kid, blob, created, _raw) in items:
            db.execute("INSERT OR IGNORE INTO caller_keys (id, ref, key_id, wrapped, created, used) "
                       "VALUES (?,?,?,?,?,?)", (cid, ref, kid, blob, created, created))
        return [cid for cid, _ in items]

    def settle_pending(self, cids: list[str]) -> None:
        """Those keys are committed: the table holds them now."""
        with self._lock:
            for cid in cids:
                self._pending.pop(cid, None)

    def touch(self, ref: str, db=None) -> None:
        """The caller's key was used now (retention keeps it); called by the writer, off the tick."""
        with self._conn(db) as conn:
            conn.execute("UPDATE caller_keys SET used = ? WHERE ref = ?", (time.time(), ref))

    def _caller_key_by_id(self, cid: str) -> AESGCM | None:
        with self._lock:
            waiting = self._pending.get(cid)
        if waiting is not None:
            return AESGCM(waiting[4])
        with self._conn() as conn:
            row = conn.execute("SELECT key_id, wrapped FROM caller_keys WHERE id = ?", (cid,)).fetchone()
        if row is None:
            return None                         # erased (or expired by retention)
        return AESGCM(self._unwrap(row[0], row[1], b"caller:" + cid.encode()))

    def _remember(self, call_id: str, known) -> None:
        with self._lock:
            self._calls[call_id] = known
            while len(self._calls) > _CALLS_KEPT:
                self._calls.popitem(last=False)

    def bind_call(self, call_id: str, number: str, db=None, defer: bool = False) -> str | None:
        """Seal this call's values with its caller's key from now on; returns the caller ref.
        Looked up in the database (never a cache): a caller erased elsewhere gets a new key.
        A read on the loop, once per call; a write only the first time a caller is ever seen."""
        if not number:
            return None
        with self._lock:
            known = self._calls.get(call_id)
        if known is not None:
            return known[0]
        ref = self.ref(number)
        got = self._caller_key(ref, db=db, defer=defer)
        self._remember(call_id, (ref, got[0], got[1]))
        return ref

    def _for_call(self, call_id: str | None, db=None) -> tuple[str, AESGCM]:
        if call_id:
            with self._lock:
                known = self._calls.get(call_id, False)
            if known is False:                 # a call this process did not start: its row knows the caller
                with self._conn(db) as conn:
                    has = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'calls'").fetchone()
                    row = conn.execute("SELECT caller_ref FROM calls WHERE id = ?", (call_id,)).fetchone() \
                        if has else None
                known = None
                if row and row[0]:
                    cid, aead = self._caller_key(row[0], db=db)
                    known = (row[0], cid, aead)
                self._remember(call_id, known)
            if known is not None:
                return "c." + known[1], known[2]
        kid = self.ring.current
        return "k." + kid, self._ring_aead(kid, "value")

    def forget(self, ref: str) -> None:
        with self._lock:
            for cid in [cid for cid, p in self._pending.items() if p[0] == ref]:
                del self._pending[cid]
            for k in [k for k, v in self._calls.items() if v is not None and v[0] == ref]:
                del self._calls[k]

    # -- values --------------------------------------------------------------------------------------
    def seal(self, text: str | None, call_id: str | None = None, db=None) -> str | None:
        """``text`` sealed with its call's caller key (or the ring's current key)."""
        if text is None:
            return None
        kref, aead = self._for_call(call_id, db)
        nonce = os.urandom(NONCE)
        head = PREFIX + kref
        return f"{head}:{_b64e(nonce + aead.encrypt(nonce, text.encode(), head.encode()))}"

    def open(self, value: Any) -> Any:
        """The plaintext of a sealed value; anything not sealed as is; ``None`` when it cannot be opened
        (its caller was erased, or its ring key is no longer configured)."""
        if not is_sealed(value):
            return value
        try:
            _, kref, body = value.split(":", 2)
            kind, _, ident = kref.partition(".")
            if kind == "c":
                aead = self._caller_key_by_id(ident)
            elif kind == "k":
                aead = self._ring_aead(ident, "value")
            else:
                return None
            if aead is None:
                return None
            raw = _b64d(body)
            return aead.decrypt(raw[:NONCE], raw[NONCE:], (PREFIX + kref).encode()).decode()
        except KeyRingError as exc:
            if str(exc) not in self._warned:
                self._warned.add(str(exc))
                log.warning("a sealed record cannot be opened: %s", exc)
            return None
        except (ValueError, InvalidTag):
            return None

    def seal_json(self, obj: Any, call_id: str | None = None, db=None) -> str:
        return self.seal(json.dumps(obj, default=str), call_id, db)

    def open_json(self, value: Any, default: Any = None) -> Any:
        text = self.open(value)
        if text is None:
            return default
        try:
            return json.loads(text)
        except ValueError:
            return default

    def erase(self, ref: str, db=None) -> int:
        """Delete a caller's key: everything sealed for them is unreadable from now on."""
        with self._conn(db) as conn:
            n = conn.execute("DELETE FROM caller_keys WHERE ref = ?", (ref,)).rowcount
        self.forget(ref)
        return n

    def expire(self, older_than: float, db=None) -> int:
        """Delete caller keys unused since ``older_than`` and no longer named by a call row."""
        with self._conn(db) as conn:
            has = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'calls'").fetchone()
            cond = "used < ?" + (" AND ref NOT IN (SELECT caller_ref FROM calls WHERE caller_ref IS NOT NULL)"
                                 if has else "")
            refs = [r[0] for r in conn.execute(f"SELECT ref FROM caller_keys WHERE {cond}", (older_than,))]
            for ref in refs:
                conn.execute("DELETE FROM caller_keys WHERE ref = ?", (ref,))
        for ref in refs:
            self.forget(ref)
        return len(refs)

    def close(self) -> None:
        with self._dblock:
            self._db.close()


_VAULTS: dict[str, Vault] = {}
_VAULTS_LOCK = threading.Lock()


def vault_for(db_path: str) -> Vault:
    """The process's vault of a database file (its key ring from ``bridge.core.keys.records_keyring``)."""
    path = os.path.realpath(db_path)
    with _VAULTS_LOCK:
        v = _VAULTS.get(path)
        ring = keyring.records_keyring(os.path.dirname(path))
        if v is None or v.ring is not ring:
            v = _VAULTS[path] = Vault(path, ring)
        return v


def reset() -> None:
    """Forget every vault and records key ring of this process (tests; after the key sources changed)."""
    keyring.reset_records()
    with _VAULTS_LOCK:
        for v in _VAULTS.values():
            try:
                v.close()
            except sqlite3.Error:
                pass
        _VAULTS.clear()
