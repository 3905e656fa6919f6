"""The event bus: every event is numbered and stored before anyone sees it.

Event JSON (the same on the WebSocket, in webhooks and in the store)::

    {"seq": 42, "id": "evt_...", "type": "transcript_created", "call_id": "...",
     "call_seq": 7, "timestamp": "2026-11-22T04:30:00.123Z", "data": {...}}

``seq`` is the bus sequence: strictly increasing with no gaps on the bus, so a
subscriber that reconnects with the last ``seq`` it saw is replayed everything
it missed; ``call_seq`` counts the events of one call from 1.

Topics: ``*`` (everything), ``call:<call_id>``, ``event:<type>``.

Publishing hands the event to the cell's durable writer (off the 20 ms
tick); subscribers follow the committed table (``Tailer``), so nobody hears of
an event before its row is committed. The writer calls back on the loop after
each commit (``EventBus.on_stored``) and the cell uses that to wake its tailer.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from bridge.core import pii
from bridge.records.store import EventReader, Store, new_id
from bridge.records.writer import InlineWriter

log = logging.getLogger("trunkline.events")

EVENT_TYPES = (
    "call_ringing", "call_progressing", "call_hangup", "dtmf_received",
    "transcribe_started", "transcribe_stopped",
    "transcribe_speech_started", "transcribe_speech_interim", "transcribe_speech_ended", "transcript_created",
    "speaking_started", "speaking_stopped", "turn_latency",
    "recording_started", "recording_paused", "recording_resumed", "recording_stopped",
    "stream_started", "stream_reconnecting", "stream_stopped", "stream_failed",
    "tool_called", "tool_result",
    "intent_detected", "call_summary",
    "call_failover",
    "call_transferred", "transfer_failed",
)


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def matches(topics, event: dict) -> bool:
    for t in topics:
        if t == "*" or t == f"call:{event.get('call_id')}" or t == f"event:{event['type']}":
            return True
    return False


def valid_topic(t: str) -> bool:
    return t == "*" or (t.startswith("call:") and len(t) > 5) or (t.startswith("event:") and t[6:] in EVENT_TYPES)


def from_row(row: dict) -> dict:
    body = json.loads(row["data"])
    return {"seq": row["seq"], "id": row["id"], "type": row["type"], "call_id": row["call_id"],
            "call_seq": body.get("call_seq"), "timestamp": iso(row["at"]), "data": body.get("data", {})}


class Tailer:
    """Follows the events table (which every cell of a box writes) and hands each
    new event, in ``seq`` order, to its listeners: the WebSocket connections and
    the webhook dispatcher. Polling the shared store is what makes one box-wide,
    gapless stream out of many cell processes. Each poll first looks at the newest ``seq`` on the loop
    (an index read, ~3 us: polling stays cheap while nothing happens); new events are read, and their
    sealed data opened, in the tailer's own thread on a read-only connection it keeps
    (``EventReader``; not the loop's shared executor, which replays and API reads may fill), so a
    burst of events never holds up the cell's loop. The listeners run on the loop, in ``seq`` order.
    A caller erased through this store while a read was in flight is read again, so nothing of theirs
    is handed out after the erasure returned."""

    def __init__(self, store: Store, interval: float = 0.05):
        self.store = store
        self.interval = interval
        self.listeners: list[Callable[[dict], None]] = []
        self.last = store.last_event_seq()
        self.wanted: Callable[[], bool] = lambda: bool(self.listeners)
        self._wake = None      # an asyncio.Event once running: set when this process committed an event
        self._pool: ThreadPoolExecutor | None = None     # the reader's one thread (started with the first read)
        self._reader: EventReader | None = None          # owned by that thread

    def wake(self, *_) -> None:
        """Poll now rather than at the next interval (called on the loop after a commit)."""
        if self._wake is not None:
            self._wake.set()

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()

    def subscribe(self, fn: Callable[[dict], None]) -> None:
        self.listeners.append(fn)

    def unsubscribe(self, fn: Callable[[dict], None]) -> None:
        if fn in self.listeners:
            self.listeners.remove(fn)

    def _read(self, since: int, limit: int) -> list[dict]:
        if self._reader is None:
            self._reader = EventReader(self.store.path)
        return self._reader.read(since, limit)

    async def poll(self) -> int:
        if self.store.last_event_seq() <= self.last:     # nothing new: one look at the index (~3 us)
            return 0
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="event-tailer")
        loop = asyncio.get_running_loop()
        for _ in range(3):
            erased = self.store.erased
            rows = await loop.run_in_executor(self._pool, self._read, self.last, 1000)
            if self.store.erased == erased:
                break
        else:
            return 0                                     # erasures kept coming: the next poll reads again
        for row in rows:
            if row["seq"] <= self.last:                  # already handed out (a second poller)
                continue
            ev = from_row(row)
            self.last = ev["seq"]
            for fn in list(self.listeners):
                try:
                    fn(ev)
                except Exception:  # noqa: BLE001
                    log.exception("event listener failed")
        return len(rows)

    async def run(self) -> None:
        self._wake = asyncio.Event()
        while True:
            try:
                if not self.wanted():
                    # nobody is listening (no WebSocket, no webhook): just keep up, cheaply
                    self.last = self.store.last_event_seq()
                    await asyncio.sleep(0.5)
                elif await self.poll() < 1000:
                    await self._pause(self.interval)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - e.g. the database is locked for a moment
                log.exception("event tailer")
                await asyncio.sleep(1.0)


class EventBus:
    """Publishing = committing to the store, through ``writer`` (the cell's durable writer; without
    one, at once on the caller's thread). Subscribers follow the store (``Tailer``)."""

    def __init__(self, store: Store, metrics=None, writer=None):
        self.store = store
        self.metrics = metrics
        self.writer = writer if writer is not None else InlineWriter(store, metrics)
        self.call_seq: dict[str, int] = defaultdict(int)
        self.ended_seq: dict[str, int] = {}      # calls forgotten lately: events after the end go on counting
        self.on_stored: Callable[[int], None] | None = None     # on the loop, with the seq, after the commit

    def publish(self, etype: str, call_id: str | None, data: dict) -> None:
        """Number the event and hand it to the writer; it is stored (and only then sent) in order."""
        assert etype in EVENT_TYPES, etype
        data = pii.mask(data)          # card numbers and [pii] patterns never reach the store or a webhook
        at = time.time()
        eid = new_id("evt")
        cseq = None
        if call_id and call_id not in self.call_seq and call_id in self.ended_seq:
            self.ended_seq[call_id] += 1                 # e.g. call_summary, after call_hangup
            cseq = self.ended_seq[call_id]
        elif call_id:
            self.call_seq[call_id] += 1
            cseq = self.call_seq[call_id]
        try:
            body = json.dumps({"call_seq": cseq, "data": data})  # serialised now: the caller may reuse data
        except (TypeError, ValueError):
            log.exception("could not store event %s", etype)
            if self.metrics:
                self.metrics.record_errors.inc()
            return
        self.writer.sql(lambda st: st.add_event(eid, etype, call_id, at, body), f"event {etype}",
                        {"id": eid, "type": etype, "call_id": call_id, "at": at, "data": body}, self._stored)

    async def settled(self, timeout: float = 0.5) -> bool:
        """Before an API read: wait (briefly) for what this process has published to be committed."""
        return await self.writer.settled(timeout)

    def _stored(self, seq: int) -> None:
        if self.on_stored is not None:
            self.on_stored(seq)

    def forget_call(self, call_id: str) -> None:
        n = self.call_seq.pop(call_id, None)
        if n:
            self.ended_seq[call_id] = n
            while len(self.ended_seq) > 1000:
                del self.ended_seq[next(iter(self.ended_seq))]
