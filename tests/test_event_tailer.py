"""The event tailer (bridge/api/events.py ``Tailer``) reads new events off the cell's loop and
hands them to its listeners on the loop, in order; with nothing new it does not leave the loop."""
import asyncio
import threading
import time

from bridge.api import events
from bridge.records.store import Store, new_id


def test_new_events_are_read_in_a_thread_and_delivered_on_the_loop_in_order(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    tailer = events.Tailer(store)
    reads, got = [], []
    real = events.read_events

    def spying(path, since, limit):
        reads.append((threading.current_thread() is threading.main_thread(), since))
        return real(path, since, limit)

    monkeypatch.setattr(events, "read_events", spying)
    tailer.subscribe(lambda ev: got.append((ev["seq"], ev["data"]["i"], threading.current_thread().name)))

    async def scenario():
        assert await tailer.poll() == 0 and reads == []          # nothing new: the loop only looked
        for i in range(5):
            store.add_event(new_id("evt"), "call_hangup", None, time.time(), {"data": {"i": i}})
        assert await tailer.poll() == 5
        assert await tailer.poll() == 0
        store.add_event(new_id("evt"), "call_hangup", None, time.time(), {"data": {"i": 5}})
        assert await tailer.poll() == 1

    asyncio.run(scenario())
    assert reads == [(False, 0), (False, 5)], "rows are read (and their data opened) off the loop, from the last seq"
    assert [g[:2] for g in got] == [(n + 1, n) for n in range(6)]
    assert {g[2] for g in got} == {threading.main_thread().name}, "listeners run on the loop"
