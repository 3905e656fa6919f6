"""The event tailer (bridge/api/events.py ``Tailer``) reads new events off the cell's loop, in a
thread of its own, and hands them to its listeners on the loop, in order; with nothing new it does
not leave the loop; a caller erased while a read was in flight is read again, not handed out."""
import asyncio
import os
import threading
import time

from bridge.api import events
from bridge.records.store import EventReader, Store, new_id, read_events


def add(store, i, call_id=None):
    store.add_event(new_id("evt"), "call_hangup", call_id, time.time(), {"data": {"i": i}})


class Spy(EventReader):
    reads: list = []
    before_return = None

    def read(self, since, limit):
        rows = super().read(since, limit)
        Spy.reads.append((threading.current_thread().name, since))
        if Spy.before_return is not None:
            Spy.before_return()
        return rows


def tailer_with_spy(store, monkeypatch):
    Spy.reads, Spy.before_return = [], None
    monkeypatch.setattr(events, "EventReader", Spy)
    tailer = events.Tailer(store)
    got = []
    tailer.subscribe(lambda ev: got.append((ev["seq"], ev["data"].get("i"), threading.current_thread().name)))
    return tailer, got


def test_new_events_are_read_in_its_thread_and_delivered_on_the_loop_in_order(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    tailer, got = tailer_with_spy(store, monkeypatch)

    async def scenario():
        assert await tailer.poll() == 0 and Spy.reads == []      # nothing new: the loop only looked
        for i in range(5):
            add(store, i)
        assert await tailer.poll() == 5
        assert await tailer.poll() == 0
        add(store, 5)
        assert await tailer.poll() == 1

    asyncio.run(scenario())
    assert [since for _, since in Spy.reads] == [0, 5], "read from the last seq handed out"
    assert {name for name, _ in Spy.reads} == {"event-tailer_0"}, "in the tailer's own thread, not the loop's pool"
    assert [g[:2] for g in got] == [(n + 1, n) for n in range(6)]
    assert {g[2] for g in got} == {threading.main_thread().name}, "listeners run on the loop"


def test_a_caller_erased_during_a_read_is_read_again_and_not_handed_out(tmp_path, monkeypatch):
    store = Store(str(tmp_path))
    store.upsert_call({"id": "c-erased", "direction": "inbound", "from_uri": "sip:+15550001111@pbx",
                       "to_uri": "sip:100@trunkline", "created": time.time(), "state": "ended"})
    add(store, 0, "c-erased")
    add(store, 1)
    tailer, got = tailer_with_spy(store, monkeypatch)
    tailer.last = 0

    def erase_once():                     # the erasure commits (on the loop) while the thread has read
        Spy.before_return = None
        result = store.erase_caller("+15550001111", "test")
        assert result["counts"]["events"] == 1

    Spy.before_return = erase_once
    asyncio.run(tailer.poll())
    assert len(Spy.reads) == 2, "read again after the erasure"
    assert [g[1] for g in got] == [1], "only the other caller's event is handed out"


def test_a_data_directory_with_uri_characters_in_its_name(tmp_path):
    d = tmp_path / "tl rev#1%41?x"
    store = Store(str(d))
    add(store, 7)
    assert [r["seq"] for r in read_events(store.path, 0, 10)] == [1]
    assert sorted(os.listdir(tmp_path)) == [d.name], "no other database file was made beside it"
