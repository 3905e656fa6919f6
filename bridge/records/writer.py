"""The durable writer: a cell's records are persisted here, off the 20 ms tick.

The tick (and the engine-event handlers on the same loop) only *enqueue*:
``sql(run, ...)`` for a SQLite write (a call row, a transcript line, an
event) and ``line(journal, text)`` for a JSONL line (calls.jsonl,
turns.jsonl). One thread per cell, with its own SQLite connection, takes
them in order and persists them: JSONL lines appended with one fsync per
batch and file, SQL jobs committed together in one transaction per batch.
When a SQL job has a ``on_done`` (the event bus uses it), it is called back
*on the event loop* with the job's result once the commit is done: nobody
is told of an event before its row is committed.

Why a thread and not an asyncio task: the work is blocking (fsync, SQLite
commits) so a task would need an executor anyway; a dedicated thread keeps
strict order without per-job hand-offs, never competes with the loop's
default executor, and a stalled disk stalls only this thread.

Order: SQL jobs commit in the order they were enqueued, JSONL lines are
appended in order per file. The two sinks are independent: a failing journal
file does not hold up SQLite, and the reverse.

Failures (full disk, read-only mount, a locked database) never stop a call:
a failing JSONL write keeps its lines in the journal to retry with the next
write (as before the writer); a failing SQL job is counted
(``trunkline_record_write_errors_total``), logged and *held*, with every SQL
job after it, and retried with backoff (0.2 s doubling to 5 s) until the
database takes writes again. A job the database rejects for good (not an
``OperationalError``) is given up: counted and logged in full.

The queue is bounded (``CAPACITY`` records queued, and as many held for
retry). The tick never blocks on it: blocking would stall every call's audio
in the cell, which is the failure this writer exists to remove, and spilling
to memory without bound trades it for the process being killed. So when it
is full the *oldest* record is dropped, counted
(``trunkline_records_dropped_total``) and written in full to the log at
ERROR (already PII-masked), so nothing is lost silently and it can be
recovered from the log (sealed: a SQL record is logged as one sealed value
with its call's caller key, a JSONL line is already sealed, so no words reach
the log). ``trunkline_record_queue_depth`` shows the backlog
long before that (10 000 records is minutes of a full cell's records).

``close()`` (the cell's clean stop, after its SIGTERM drain) writes
everything still queued, retries what is held once more, and logs in full
whatever the disk still refuses.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from bridge.records.store import Store

log = logging.getLogger("trunkline.records")

CAPACITY = 10_000
BATCH = 256
SPILL_MAX = 10_000           # dropped records waiting to be logged by the spill thread
RETRY_FIRST = 0.2
RETRY_MAX = 5.0
INLINE_ENV = "TL_TEST_INLINE_WRITES"   # tests only: write on the caller's thread (the old path)


class Journal(Protocol):
    """What the writer needs of a JSONL journal (``bridge.records.journal.CallRecords``)."""
    path: str
    pending: list[str]

    def write(self, lines: list[str]) -> bool: ...


@dataclass
class SqlJob:
    run: Callable[[Store], Any]            # does the write on the writer's connection, returns e.g. a rowid
    what: str                              # for the log: "event call_hangup", "transcript", "call"
    record: dict                           # what is written, logged in full if it has to be given up
    on_done: Callable[[Any], None] | None = None   # called on the loop with run's result after the commit
    attempts: int = 0


@dataclass
class LineJob:
    journal: Journal
    line: str


def _retryable(exc: BaseException) -> bool:
    """Disk full, read-only, locked, I/O error: the same write can succeed later."""
    return isinstance(exc, (sqlite3.OperationalError, OSError))


def _spill(job: SqlJob | LineJob, why: str, vault=None) -> None:
    """A record given up: logged in full (sealed) so that it is not lost silently."""
    if isinstance(job, SqlJob):
        text = json.dumps(job.record, default=str)
        if vault is not None:
            call_id = job.record.get("call_id") or job.record.get("id") if isinstance(job.record, dict) else None
            try:
                text = vault.seal(text, call_id if isinstance(call_id, str) else None)
            except Exception:  # noqa: BLE001 - never log the words, even when sealing fails
                text = "(cannot be sealed; not logged)"
        log.error("record given up (%s): %s %s", why, job.what, text)
    else:
        log.error("record given up (%s): %s %s", why, job.journal.path, job.line.rstrip("\n"))


class Writer:
    """One per cell: ``start(loop)``, then ``sql``/``line`` from the loop, ``close()`` at the end."""

    def __init__(self, data_dir: str, metrics=None, capacity: int = CAPACITY):
        self.store = Store(data_dir)          # the writer's own connection: the loop's is never held
        self.metrics = metrics
        self.capacity = capacity
        self.dropped = 0
        self.queued = 0                       # records handed over so far (the loop's count)
        self.finished = 0                     # ... and written or given up (the writer thread's count)
        self._skipped = 0                     # ... and dropped from a full queue (the loop's count)
        self._queue: deque[SqlJob | LineJob] = deque()
        self._cond = threading.Condition()
        self._spill_q: deque[tuple[SqlJob | LineJob, str]] = deque()   # dropped on the loop, logged off it
        self._spill_wake = threading.Event()
        self._spill_lost = 0
        self._busy = False                    # a batch is being written ...
        self._inflight: list[SqlJob | LineJob] = []   # ... this one
        self._closing = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # owned by the writer thread:
        self._held: deque[SqlJob] = deque()   # SQL jobs waiting for the database to take writes again
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST
        self._journals: dict[int, Journal] = {}

    # -- the loop's side: never blocks on I/O ---------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="records-writer", daemon=True)
        self._thread.start()
        threading.Thread(target=self._spiller, name="records-spill", daemon=True).start()

    def sql(self, run: Callable[[Store], Any], what: str, record: dict,
            on_done: Callable[[Any], None] | None = None) -> None:
        self._put(SqlJob(run, what, record, on_done))

    def line(self, journal: Journal, line: str) -> None:
        self._put(LineJob(journal, line))

    def _put(self, job: SqlJob | LineJob) -> None:
        with self._cond:
            if self._closed:
                self._drop_later(job, "writer stopped")
                return
            if len(self._queue) >= self.capacity:
                self._drop_later(self._queue.popleft(), "queue full")
                self._skipped += 1
            self._queue.append(job)
            self.queued += 1
            depth = len(self._queue) + len(self._held)
            self._cond.notify()
        self._gauge(depth)

    def pending(self) -> int:
        """Records queued or held for retry (approximate: read without the writer's lock)."""
        return len(self._queue) + len(self._held) + int(self._busy)

    async def settled(self, timeout: float = 0.5) -> bool:
        """On the loop: wait (at most ``timeout``) until every record handed over before this call is
        written or given up, so that an API read sees what the cell has already done. With a stalled
        or failing disk it gives up after ``timeout`` and the read shows what is committed."""
        target = self.queued
        deadline = time.monotonic() + timeout
        while self.finished + self._skipped < target:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.002)
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything queued so far has been tried (held jobs may remain). Not on the loop."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 15.0) -> bool:
        """Write what is queued, retry what is held once more, stop. Blocking: run it off the loop.
        False if the thread did not finish in time (a disk hung for good): then every record it had
        has is given up here (counted and logged in full), as the process is about to exit."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        done = True
        if self._thread is not None:
            self._thread.join(timeout)
            done = not self._thread.is_alive()
            if not done:
                log.error("records writer did not finish within %.0fs (%d records still pending)",
                          timeout, self.pending())
                with self._cond:
                    self._closed = True
                    left: list = self._inflight + list(self._queue)
                    self._queue.clear()
                try:
                    left += list(self._held)       # the writer thread's, but it is stuck in the disk
                except RuntimeError:               # it moved after all: it will log its own at the end
                    pass
                for job in left:
                    self._drop(job, "disk still stalled at stop")
        else:                                  # never started: write on this thread
            self._run()
        return done

    def _drop_later(self, job: SqlJob | LineJob, why: str) -> None:
        """On the loop, lock held: count the dropped record now and leave the logging to the spill
        thread: with a stalled disk, stderr (journald) may block too, and the loop must never wait
        on it. If even the spill is SPILL_MAX behind, the record is only counted."""
        if self._thread is None:               # not started: no loop to protect
            self._drop(job, why)
            return
        self.dropped += 1
        if self.metrics is not None:
            self.metrics.records_dropped.inc()
        if len(self._spill_q) >= SPILL_MAX:
            self._spill_lost += 1
        else:
            self._spill_q.append((job, why))
        self._spill_wake.set()

    def _spiller(self) -> None:
        while True:
            self._spill_wake.wait()
            self._spill_wake.clear()
            while self._spill_q:
                job, why = self._spill_q.popleft()
                _spill(job, why, getattr(self.store, "vault", None))
            lost, self._spill_lost = self._spill_lost, 0
            if lost:
                log.error("%d dropped records were not logged either (the log is behind too)", lost)

    def _drop(self, job: SqlJob | LineJob, why: str) -> None:
        self.dropped += 1
        if self.metrics is not None:
            self.metrics.records_dropped.inc()
        _spill(job, why, getattr(self.store, "vault", None))

    def _gauge(self, depth: int) -> None:
        if self.metrics is not None:
            self.metrics.record_queue.set(depth)

    # -- the writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing and not self._retry_due():
                    self._cond.wait(max(0.0, self._retry_at - time.monotonic()) if self._held else None)
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                last = self._closing and not self._queue
                self._busy = True
                self._inflight = batch
            try:
                self._write(batch, final=last)
            except Exception:  # noqa: BLE001 - the writer must outlive any one bad batch
                log.exception("records writer")
            with self._cond:
                self._busy = False
                self._inflight = []
                depth = len(self._queue) + len(self._held)
                self._cond.notify_all()
            self._gauge(depth)
            if last:
                break
        with self._cond:
            self._closed = True                # from now on a late record is logged, not queued
            rest = list(self._queue)
            self._queue.clear()
        if rest:
            self._write(rest, final=True)
        self._give_up_remaining()
        self.store.close()

    def _retry_due(self) -> bool:
        return bool(self._held) and time.monotonic() >= self._retry_at

    def _write(self, batch: list[SqlJob | LineJob], final: bool = False) -> None:
        if any(isinstance(j, LineJob) for j in batch) and self.store.vault.has_pending():
            try:                              # journal lines may be sealed with keys made on the loop
                self._transaction([])
            except sqlite3.Error as exc:      # kept in memory; tried again with the next batch
                log.warning("caller keys not written yet: %s", exc)
        lines: dict[int, list[str]] = {}
        sql: list[SqlJob] = []
        for job in batch:
            if isinstance(job, LineJob):
                self._journals.setdefault(id(job.journal), job.journal)
                lines.setdefault(id(job.journal), []).append(job.line)
            else:
                sql.append(job)
        for key, ls in lines.items():
            self._journals[key].write(ls)     # a failure keeps the lines in the journal, logged and counted
            self.finished += len(ls)
        if self._held:
            for job in sql:                   # behind the held ones, in order
                self._hold(job)
            if final or self._retry_due():
                held = list(self._held)
                self._held.clear()
                self._commit(held)
        elif sql:
            self._commit(sql)
        if final:
            for journal in self._journals.values():
                if journal.pending:
                    journal.write([])

    def _transaction(self, jobs: list[SqlJob]) -> list:
        db = self.store.db
        db.execute("BEGIN IMMEDIATE")
        try:
            keys = self.store.vault.flush_pending(db)   # caller keys made on the loop, before what they seal
            out = [job.run(self.store) for job in jobs]
            keys += self.store.vault.flush_pending(db)
            db.execute("COMMIT")
            self.store.vault.settle_pending(keys)
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        return out

    def _commit(self, jobs: list[SqlJob]) -> None:
        try:
            results = self._transaction(jobs)
        except Exception:  # noqa: BLE001 - find the job that fails, one at a time
            results = None
        if results is not None:
            for job, res in zip(jobs, results):
                self._done(job, res)
            self._retry_delay = RETRY_FIRST
            return
        for i, job in enumerate(jobs):
            try:
                res = self._transaction([job])[0]
            except Exception as exc:  # noqa: BLE001
                if not _retryable(exc):
                    if self.metrics is not None and job.attempts == 0:
                        self.metrics.record_errors.inc()
                    self._drop(job, f"rejected by the database: {exc}")
                    self.finished += 1
                    continue
                self._failed(jobs[i:], exc)
                return
            self._done(job, res)
        self._retry_delay = RETRY_FIRST

    def _failed(self, rest: list[SqlJob], exc: BaseException) -> None:
        fresh = sum(1 for j in rest if j.attempts == 0)
        for job in rest:
            job.attempts += 1
        if self.metrics is not None and fresh:
            self.metrics.record_errors.inc(fresh)
        self._held.extendleft(reversed(rest))
        while len(self._held) > self.capacity:
            self._drop(self._held.popleft(), "held too long")
            self.finished += 1
        (log.error if self._retry_delay == RETRY_FIRST else log.warning)(
            "cannot store %d records in %s: %s (kept in memory, retry in %.1fs)",
            len(self._held), self.store.path, exc, self._retry_delay)
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)

    def _hold(self, job: SqlJob) -> None:
        if len(self._held) >= self.capacity:
            self._drop(self._held.popleft(), "held too long")
            self.finished += 1
        self._held.append(job)

    def _done(self, job: SqlJob, result: Any) -> None:
        self.finished += 1
        if job.on_done is None:
            return
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(job.on_done, result)
        except RuntimeError:                   # the loop is closed: the process is exiting
            pass

    def _give_up_remaining(self) -> None:
        for job in self._held:
            self._drop(job, "database still failing at stop")
        self._held.clear()
        for journal in self._journals.values():
            for line in journal.pending:
                self._drop(LineJob(journal, line), "journal still failing at stop")


class InlineWriter:
    """The same interface, written at once on the caller's thread: for tools and tests that use a
    store or journal directly (no loop, no cell). A failing SQL write is logged and counted."""

    def __init__(self, store: Store, metrics=None):
        self.store = store
        self.metrics = metrics
        self.dropped = 0

    def start(self, loop=None) -> None:
        pass

    def sql(self, run: Callable[[Store], Any], what: str, record: dict,
            on_done: Callable[[Any], None] | None = None) -> None:
        try:
            result = run(self.store)
        except Exception:  # noqa: BLE001 - a full disk must not stop the call
            log.exception("could not store %s", what)
            if self.metrics is not None:
                self.metrics.record_errors.inc()
            return
        if on_done is not None:
            on_done(result)

    def line(self, journal: Journal, line: str) -> None:
        journal.write([line])

    def pending(self) -> int:
        return 0

    async def settled(self, timeout: float = 0.0) -> bool:
        return True

    def flush(self, timeout: float = 0.0) -> bool:
        return True

    def close(self, timeout: float = 0.0) -> bool:
        return True


def for_cell(data_dir: str, store: Store, metrics=None) -> Writer | InlineWriter:
    """The cell's writer (``TL_TEST_INLINE_WRITES=1``, for tests only, restores the old
    inline path so a test can show what the writer protects the tick from)."""
    if os.environ.get(INLINE_ENV) == "1":
        return InlineWriter(store, metrics)
    return Writer(data_dir, metrics)
