"""The event WebSocket (``GET /v1/ws``), a part of ``bridge.api.routes.Api``: subscribe to topics,
replay what was missed from the store in pages read off the event loop (it also runs the 20 ms
media tick), then follow live events. Expects ``self.auth``, ``self.limiter``, ``self.services``,
``self.store`` and ``self.audited`` from the ``Api`` it is mixed into."""
from __future__ import annotations

import asyncio
import time

from aiohttp import WSMsgType, web

from bridge.api.base import ApiError, error_response, parse_json
from bridge.api.events import from_row, matches, valid_topic

MAX_TOPICS = 50               # topics per webhook or WebSocket subscription
REPLAY_PAGE = 500             # events read per page when a subscription replays (in a thread)
REPLAY_MAX = 100000           # events one subscribe may replay


def read_events(path: str, since: int, limit: int) -> list[dict]:
    """Stored events after ``since`` on a connection of its own (run in a worker thread), opened."""
    from bridge.records.store import read_events as stored_events     # event data is sealed at rest
    return stored_events(path, since, limit)


class EventSocket:
    async def websocket(self, request: web.Request) -> web.StreamResponse:
        try:
            key = self.auth(request, "read")
        except ApiError as e:
            return error_response(e.status, e.code, e.message, headers=e.headers)
        ws = web.WebSocketResponse(heartbeat=None, max_msg_size=64 * 1024)
        await ws.prepare(request)
        topics: set[str] = set()
        queue: asyncio.Queue = asyncio.Queue(maxsize=5000)
        last_sent = 0
        overflow = False
        live = asyncio.Event()        # cleared while a replay runs: live events wait in the queue,
        live.set()                    # so the replay's older events are never skipped for a newer one

        def listener(event: dict) -> None:
            nonlocal overflow
            if topics and matches(topics, event):
                try:
                    queue.put_nowait(event)
                except asyncio.QueueFull:
                    overflow = True

        async def sender():
            nonlocal last_sent
            interval = self.services.cfg.raw["http"]["ws_heartbeat"]
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), interval)
                except asyncio.TimeoutError:
                    await ws.send_json({"type": "heartbeat", "seq": last_sent, "time": time.time()})
                    continue
                await live.wait()
                if overflow:
                    await ws.close(code=4008, message=b"consumer too slow; reconnect with since")
                    return
                if event["seq"] > last_sent:
                    last_sent = event["seq"]
                    await ws.send_json({"type": "event", "event": event})

        self.services.tailer.subscribe(listener)
        send_task = asyncio.create_task(sender())
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    m = parse_json(msg.data, "message")
                    kind = m["type"]
                except (ApiError, KeyError, TypeError, IndexError):
                    await ws.send_json({"type": "error", "code": "invalid_message", "message": "expected JSON with a type"})
                    continue
                if kind in ("subscribe", "unsubscribe"):
                    new = m.get("topics")
                    if not isinstance(new, list) or not all(isinstance(t, str) and valid_topic(t) for t in new):
                        await ws.send_json({"type": "error", "code": "invalid_field", "field": "topics",
                                            "message": "topics: list of '*', 'call:<id>', 'event:<type>'"})
                        continue
                    if kind == "unsubscribe":
                        topics.difference_update(new)
                        await ws.send_json({"type": "unsubscribed", "topics": sorted(topics)})
                        continue
                    if len(topics | set(new)) > MAX_TOPICS:
                        self.services.metrics.api_limited.labels("ws_topics").inc()
                        await ws.send_json({"type": "error", "code": "too_many_topics", "field": "topics",
                                            "message": f"at most {MAX_TOPICS} topics per connection"})
                        continue
                    topics.update(new)
                    since = m.get("since")
                    if isinstance(since, int) and not isinstance(since, bool) and since >= 0:
                        wait = self.limiter.take(key["id"])        # a replay costs like a request
                        if wait:
                            self.services.metrics.api_limited.labels("api_rate").inc()
                            await ws.send_json({"type": "error", "code": "rate_limited", "retry_after": wait,
                                                "message": "too many requests with this key (http.rate_limit)"})
                            continue
                        self.audited(request, f"events>{since}", key)
                        # replay from the store what was missed, in pages read off the event loop
                        # (it also runs the 20 ms media tick); live events queue meanwhile
                        cursor, left = since, REPLAY_MAX
                        live.clear()
                        while left > 0:
                            rows = await asyncio.to_thread(read_events, self.store.path, cursor,
                                                           min(REPLAY_PAGE, left))
                            for row in rows:
                                ev = from_row(row)
                                if matches(new, ev) and ev["seq"] > last_sent:
                                    last_sent = ev["seq"]
                                    await ws.send_json({"type": "event", "event": ev})
                            if len(rows) < min(REPLAY_PAGE, left):
                                break
                            cursor, left = rows[-1]["seq"], left - len(rows)
                        live.set()
                    await ws.send_json({"type": "subscribed", "topics": sorted(topics), "seq": last_sent})
                elif kind == "ping":
                    await ws.send_json({"type": "pong", "seq": last_sent})
                else:
                    await ws.send_json({"type": "error", "code": "unknown_type", "message": f"unknown type {kind!r}"})
        finally:
            self.services.tailer.unsubscribe(listener)
            send_task.cancel()
            # a sender that already failed (the client went away mid-send) is collected here, so its
            # error is neither lost nor logged as "Task exception was never retrieved" (seen in the soak)
            await asyncio.gather(send_task, return_exceptions=True)
        return ws
