"""Webhook delivery: signed, retried with backoff and jitter, dead-lettered.

Each POST carries ``Trunkline-Signature: t=<unix seconds>,v1=<hex>`` where
``v1 = HMAC-SHA256(secret, "<t>.<body>")``; ``verify_signature`` is the
receiver's helper. 2xx delivers; 408, 429, 5xx, timeouts and connection
errors are retried (up to ``base * 2**n`` seconds, capped, full jitter: ``bridge.core.backoff``);
any other 4xx stops at once (``failed``); after ``max_attempts`` the delivery
is ``dead`` and can be listed and replayed through the API. Deliveries are
rows in the store, so a restart picks up where it left off, and the loop runs
as its own task: a slow receiver never holds up a call.

The dispatcher's reads and writes of the store run on a thread of its own, on a connection of its
own: a write that waits for the database's lock (the cells of a box write the same file; another
process may hold it for seconds) never stops the event loop, which serves the API, the WebSocket
and /healthz. New events only queue their deliveries on the loop (``on_event``); the next round
writes them.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import aiohttp

from bridge.api.events import from_row, matches
from bridge.core.guarded_http import failure_class, guarded_session
from bridge.core.netguard import DEFAULT as DEFAULT_POLICY, Policy
from bridge.core import backoff
from bridge.records.store import Store

log = logging.getLogger("trunkline.webhooks")

# Deliveries in flight at once (all receivers together). It also bounds the keep-alive pool: the
# session never holds more connections to one receiver than were in flight at once. aiohttp reuses
# its idle connections oldest first, so after a backlog (a receiver back from an outage, the
# database locked for a while) the pool stays at that high-water mark while deliveries keep coming
# faster than one per 15 s (its keep-alive timeout) per pooled connection, and shrinks when they slow.
CONCURRENCY = 8
STALE_AFTER = 60.0      # s past the attempt timeout before a delivery left 'sending' is sent again


def sign(secret: str, ts: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def verify_signature(secret: str, header: str, body: bytes, tolerance: float = 300.0,
                     now: float | None = None) -> bool:
    """True if ``header`` (Trunkline-Signature) signs ``body`` with ``secret`` and is fresh;
    False (never an exception) for anything else: a malformed, non-ASCII or non-string header,
    a timestamp out of range, a body or secret of the wrong type."""
    try:
        if not isinstance(header, str) or not isinstance(secret, str) or len(header) > 4096:
            return False
        if isinstance(body, str):
            body = body.encode()
        if not isinstance(body, (bytes, bytearray, memoryview)):
            return False
        parts = dict(p.strip().split("=", 1) for p in header.split(","))
        t = parts["t"]
        if not (t.isascii() and t.isdigit() and len(t) <= 12):
            return False
        ts = int(t)
        if abs((time.time() if now is None else now) - ts) > tolerance:
            return False
        expected = sign(secret, ts, bytes(body)).split("v1=", 1)[1]
        given = parts.get("v1", "")
        if not given.isascii():
            return False
        return hmac.compare_digest(expected, given)
    except (ValueError, KeyError, TypeError, OverflowError, UnicodeError):
        return False


class WebhookDispatcher:
    def __init__(self, store: Store, metrics, max_attempts: int = 16, base_delay: float = 1.0,
                 max_delay: float = 300.0, timeout: float = 5.0, concurrency: int = CONCURRENCY,
                 guard: Policy = DEFAULT_POLICY, retry_for: float = 1800.0):
        self.store = store
        self.guard = guard                    # the SSRF guard: where deliveries may connect
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        # a delivery is dead after max_attempts AND retry_for seconds since it was made: the jittered
        # waits of 16 attempts can add up to less than a 10-minute outage of the receiver
        self.retry_for = retry_for
        self.sem = asyncio.Semaphore(concurrency)
        self.wake = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._hooks: list[dict] | None = None
        self._inflight: set[str] = set()
        self._new: list[tuple[str, int]] = []          # (webhook id, event seq) not written yet
        self._sending: set[asyncio.Task] = set()       # deliveries in flight
        self._io: ThreadPoolExecutor | None = None      # the one thread that uses self._db
        self._db: Store | None = None

    async def _q(self, fn, *args):
        """``fn(store, *args)`` on the dispatcher's own thread and connection."""
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix="webhooks-db")
        if self._db is None:
            self._db = await asyncio.get_running_loop().run_in_executor(
                self._io, Store, os.path.dirname(self.store.path), os.path.basename(self.store.path))
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, self._db, *args)

    def hooks_changed(self) -> None:
        self._hooks = None

    def has_hooks(self) -> bool:
        if self._hooks is None:
            self._hooks = self.store.webhooks()
        return bool(self._hooks)

    def on_event(self, event: dict) -> None:
        if self._hooks is None:
            self._hooks = self.store.webhooks()
        created = False
        for wh in self._hooks:
            if matches(wh["topics"], event):
                self._new.append((wh["id"], event["seq"]))
                created = True
        if created:
            self.wake.set()

    async def start(self) -> None:
        await self._q(lambda db: db.db.execute("UPDATE deliveries SET status = 'pending' WHERE status = 'sending'"))
        self.session = guarded_session(self.guard, metric=getattr(self.metrics, "outbound_refused", None),
                                       use="webhook", timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for t in list(self._sending):                  # attempts in flight: their rows stay 'sending'
            t.cancel()                                 # and go out again after a restart
        await asyncio.gather(*self._sending, return_exceptions=True)
        if self.session:
            await self.session.close()
        if self._io is not None:
            if self._new:                                   # queued, not written yet: keep them
                try:
                    await self._q(self._write_new, self._new)
                    self._new = []
                except sqlite3.OperationalError as exc:
                    log.warning("webhook dispatcher: %d deliveries not written at stop: %s", len(self._new), exc)
            if self._db is not None:
                await asyncio.get_running_loop().run_in_executor(self._io, self._db.close)
            self._io.shutdown(wait=True)
            self._io, self._db = None, None

    @staticmethod
    def _write_new(db: Store, new: list[tuple[str, int]]) -> None:
        """All or nothing: a batch that fails is queued again whole, never written twice."""
        if not new:
            return
        db.db.execute("BEGIN IMMEDIATE")
        try:
            for wid, seq in new:
                db.add_delivery(wid, seq)
            db.db.execute("COMMIT")
        except BaseException:
            db.db.execute("ROLLBACK")
            raise

    def replay(self, did: str) -> dict | None:
        d = self.store.delivery(did)
        if d is None:
            return None
        self.store.update_delivery(did, status="pending", attempts=0, next_at=time.time(), last_error=None)
        self.wake.set()
        return self.store.delivery(did)

    async def _run(self) -> None:
        while True:
            try:
                await self._round()
            except sqlite3.OperationalError as exc:
                # another process held the write lock past the store's busy timeout: the dispatcher
                # must outlive it (this loop ending stopped every delivery until a restart)
                log.warning("webhook dispatcher: %s; trying again in 1 s", exc)
                await asyncio.sleep(1.0)

    def _scan(self, db: Store, now: float, new: list[tuple[str, int]]) -> tuple[list[dict], float]:
        """(On the dispatcher's thread.) Write the queued deliveries, put right what a clock step or a
        lost outcome left, and return what is due now and the time until the next one is."""
        self._write_new(db, new)
        new.clear()                                 # written: not to be queued again if what follows fails
        # retries are scheduled on the wall clock (they outlive a restart); no retry is ever set
        # further ahead than max_delay, so one that is was set before the clock stepped back
        # (an NTP correction): it would otherwise wait out the step, an hour for an hour
        moved = db.pull_forward_deliveries(now + self.max_delay + 1.0, now)
        if moved:
            log.warning("%d webhook deliveries were due further ahead than max_delay (%.0f s): the wall "
                        "clock went back; they are due now", moved, self.max_delay)
        # an attempt lasts at most `timeout`: one still 'sending' long after had its outcome lost
        # (a lock past the busy timeout); it is sent again rather than left until a restart
        stale = db.requeue_stale_deliveries(now - self.timeout - STALE_AFTER, now)
        if stale:
            log.warning("%d webhook deliveries were left 'sending' (their outcome was not written); "
                        "sending them again", stale)
        due = db.due_deliveries(now)
        row = db._one("SELECT MIN(next_at) AS n FROM deliveries WHERE status = 'pending'")
        return due, (5.0 if not row or row["n"] is None else max(0.01, min(5.0, row["n"] - time.time())))

    async def _round(self) -> None:
        """Start what is due, then wait until woken or the next retry is due."""
        self.wake.clear()
        new, self._new = self._new, []
        try:
            due, wait = await self._q(self._scan, time.time(), new)
        except sqlite3.OperationalError:
            self._new[:0] = new                     # not written (all or nothing): the next round tries again
            raise
        for d in due:
            if d["id"] not in self._inflight:
                self._inflight.add(d["id"])
                task = asyncio.create_task(self._deliver(d))
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
        try:
            await asyncio.wait_for(self.wake.wait(), wait)
        except asyncio.TimeoutError:
            pass

    async def _deliver(self, d: dict) -> None:
        try:
            async with self.sem:
                await self._attempt(d)
        except Exception:  # noqa: BLE001
            log.exception("webhook delivery %s crashed", d["id"])
        finally:
            self._inflight.discard(d["id"])

    async def _update(self, did: str, **fields) -> None:
        await self._q(lambda db: db.update_delivery(did, **fields))

    async def _attempt(self, d: dict) -> None:
        wh, row = await self._q(lambda db: (db.webhook(d["webhook_id"]), db.event(d["event_seq"])))
        if wh is None or row is None:
            await self._update(d["id"], status="failed", last_error="webhook or event gone")
            return
        if not await self._q(lambda db: db.claim_delivery(d["id"])):
            return
        body = json.dumps(from_row(row)).encode()
        ts = int(time.time())
        headers = {"Content-Type": "application/json", "Trunkline-Signature": sign(wh["secret"], ts, body),
                   "Trunkline-Event-Id": row["id"], "Trunkline-Delivery-Id": d["id"], "User-Agent": "Trunkline"}
        attempts = d["attempts"] + 1
        status, error = None, None
        try:
            # no redirects: a 3xx is a failed delivery (it could point anywhere)
            async with self.session.post(wh["url"], data=body, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                await resp.content.read(64 * 1024)      # never stored: the API says only "HTTP <status>"
        except (asyncio.TimeoutError, aiohttp.ClientError, ValueError) as exc:
            error = failure_class(exc)      # a class of failure, never an address or a body
        if error in ("refused address", "redirect refused", "invalid URL") or (
                status is not None and 300 <= status < 400):
            error = error or "redirect refused"
            await self._update(d["id"], status="failed", attempts=attempts, last_status=status,
                                last_error=error)
            self.metrics.webhook_deliveries.labels("failed").inc()
            log.warning("webhook delivery %s failed: %s", d["id"], error)
            return
        if status is not None and 200 <= status < 300:
            await self._update(d["id"], status="delivered", attempts=attempts, last_status=status,
                                last_error=None)
            self.metrics.webhook_deliveries.labels("delivered").inc()
            return
        retry = status is None or status >= 500 or status in (408, 429)
        if not retry:
            await self._update(d["id"], status="failed", attempts=attempts, last_status=status,
                                last_error=f"HTTP {status}")
            self.metrics.webhook_deliveries.labels("failed").inc()
            return
        if attempts >= self.max_attempts and time.time() - d["created"] >= self.retry_for:
            await self._update(d["id"], status="dead", attempts=attempts, last_status=status,
                                last_error=error or f"HTTP {status}")
            self.metrics.webhook_deliveries.labels("dead").inc()
            log.warning("webhook delivery %s to webhook %s dead after %d attempts", d["id"], wh["id"], attempts)
            return
        delay = backoff.delay(attempts - 1, self.base_delay, self.max_delay)
        await self._update(d["id"], status="pending", attempts=attempts, last_status=status,
                                   last_error=error or f"HTTP {status}", next_at=time.time() + delay)
        self.metrics.webhook_deliveries.labels("retried").inc()
        self.wake.set()
