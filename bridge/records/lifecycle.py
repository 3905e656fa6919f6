"""How long records live: retention of every table and file, and erasure of one caller.

Retention (``records.retention_days``): events, transcripts, deliveries,
idempotent results and ended calls older than the period are deleted, the
caller keys nobody used since then are deleted (what is left of their values
anywhere, backups included, becomes unreadable), and the JSONL journals are
rewritten without their older lines. ``Retention.run`` does it at start and
then periodically while the cell runs (hourly, sooner for short periods), and
counts what it removed in ``trunkline_records_purged_total{kind}``.
Recordings keep their own period (``recordings.retention_days``) and are
purged on the same round.

Erasure (``erase_caller``): every row about one caller (their calls,
transcripts, events and deliveries, recordings rows and files) is deleted,
their caller key is deleted (crypto-shredding the sealed values in the
append-only journals and in backups), their journal lines are removed, and
the erasure is recorded (who, when, counts) with the number only as a keyed
hash.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time

from bridge.core.logs import event
from bridge.records.journal import CallRecords, record_time
from bridge.records.store import Store

log = logging.getLogger("trunkline.records")

JOURNALS = ("calls.jsonl", "turns.jsonl")


def purged_counter(metrics):
    """``trunkline_records_purged_total{kind}`` on a cell's metrics (created on first use)."""
    if metrics is None:
        return None
    c = getattr(metrics, "records_purged", None)
    if c is None:
        from prometheus_client import Counter
        c = Counter("trunkline_records_purged", "Records removed by retention, by kind (table, journal, "
                    "recordings, caller_keys)", ["kind"], registry=metrics.registry)
        metrics.records_purged = c
    return c


def purge_journals(data_dir: str, older_than: float) -> int:
    n = 0
    for name in JOURNALS:
        n += CallRecords(data_dir, name=name).rewrite(
            lambda rec: (record_time(rec) or older_than) < older_than)
    return n


def erase_caller(store: Store, data_dir: str, number: str, by: str) -> dict:
    """Erase everything about ``number`` (see the module doc). Returns the erasure record:
    ``{"id", "at", "by", "caller_hash", "counts"}``."""
    res = store.erase_caller(number, by)
    counts = res["counts"]
    counts["recording_files"] = 0
    for path in res["paths"]:
        try:
            os.unlink(path)
            counts["recording_files"] += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("erasure %s: cannot delete a recording file: %s", res["id"], exc.strerror)
    ids = set(res["call_ids"])
    counts["journal_lines"] = 0
    if ids:
        for name in JOURNALS:
            counts["journal_lines"] += CallRecords(data_dir, name=name).rewrite(
                lambda rec: rec.get("call_id") in ids)
    store.db.execute("UPDATE erasures SET counts = ? WHERE id = ?", (json.dumps(counts), res["id"]))
    row = store._one("SELECT * FROM erasures WHERE id = ?", res["id"])
    row["counts"] = counts
    event(log, "caller_erased", erasure_id=row["id"], by=by, **counts)
    return row


class Retention:
    """A cell's retention: ``run_once`` now, ``run`` forever (cancel it to stop)."""

    def __init__(self, store: Store, data_dir: str, days: float, recordings=None, metrics=None):
        self.store = store                     # the loop's: used by run_once on the loop only
        self.data_dir = data_dir
        self.days = days
        self.recordings = recordings
        self.counter = purged_counter(metrics)
        self._own: Store | None = None         # the periodic rounds' own connection, in a worker thread

    @property
    def every(self) -> float:
        return min(3600.0, max(1.0, self.days * 86400 / 4))

    def _purge(self, store: Store, now: float) -> dict:
        cutoff = now - self.days * 86400
        removed = store.purge(cutoff)
        removed["journal_lines"] = purge_journals(self.data_dir, cutoff)
        return removed

    def _count(self, removed: dict) -> None:
        if self.counter is not None:
            for kind, n in removed.items():
                if n and kind != "recordings":            # Recordings.purge counts its own
                    self.counter.labels(kind).inc(n)
        if any(removed.values()):
            event(log, "records_purged", **removed)

    def run_once(self, now: float | None = None) -> dict:
        """One round on the calling thread with the loop's store (at start)."""
        self.store.vault            # a key ring missing the records' keys stops the start, not a call
        removed = self._purge(self.store, now or time.time()) if self.days else {}
        if self.recordings is not None:
            removed["recordings"] = self.recordings.purge()
        self._count(removed)
        return removed

    def _in_thread(self) -> dict:
        if self._own is None:
            self._own = Store(self.data_dir)
        return self._purge(self._own, time.time())

    async def run(self) -> None:
        """Purge periodically while the cell runs (database and journals off the loop)."""
        if not self.days:
            return
        try:
            while True:
                await asyncio.sleep(self.every)
                try:
                    removed = await asyncio.to_thread(self._in_thread)
                    if self.recordings is not None:
                        removed["recordings"] = self.recordings.purge()
                    self._count(removed)
                except Exception:  # noqa: BLE001 - e.g. the database is locked for a moment
                    log.exception("records retention")
        finally:
            if self._own is not None:
                own, self._own = self._own, None
                own.close()
