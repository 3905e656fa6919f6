"""The durable writer: records leave the 20 ms tick, in order, committed before anyone is told.

The unit tests drive a real Writer (its own thread and SQLite connection) on a real
event loop; the "slow disk" is the test hook ``TL_TEST_SLOW_DISK`` (every
durable write waits while a flag file exists). The cell test stalls a real cell's
writer during a real echo call and checks that the echo keeps its 20 ms cadence.
"""
import asyncio
import os
import json
import logging
import math
import signal
import sqlite3
import threading
import time

import numpy as np
import pytest

from bridge.api.events import EventBus, Tailer
from bridge.core.metrics import Metrics
from bridge.records import slowdisk
from bridge.records.journal import CallRecords
from bridge.records.store import Store
from bridge.records.writer import Writer
from media import g711
from support import Api, RtpPeer, create_key, sipp


@pytest.fixture
def slow_disk(tmp_path, monkeypatch):
    """A flag file: while it exists, every durable write of this process waits."""
    flag = tmp_path / "stall"
    monkeypatch.setenv(slowdisk.ENV, str(flag))
    yield flag
    flag.unlink(missing_ok=True)


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_records_persist_in_order_and_events_are_told_after_their_commit(tmp_path, slow_disk):
    async def main():
        loop = asyncio.get_running_loop()
        metrics = Metrics()
        store = Store(str(tmp_path))
        writer = Writer(str(tmp_path), metrics)
        writer.start(loop)
        bus = EventBus(store, metrics, writer)
        told: list[tuple[int, bool]] = []
        bus.on_stored = lambda seq: told.append((seq, threading.current_thread() is threading.main_thread()))
        turns = CallRecords(str(tmp_path), name="turns.jsonl", writer=writer)
        slow_disk.touch()                                  # the disk stalls
        t0 = time.monotonic()
        for i in range(200):
            bus.publish("dtmf_received", "c1", {"digit": str(i % 10), "i": i})
            turns.append({"event": "turn", "i": i})
        enqueue = time.monotonic() - t0
        await asyncio.sleep(0.3)
        assert enqueue < 0.2, f"enqueueing 400 records took {enqueue:.3f}s with the disk stalled"
        assert store.events_since(0) == [] and told == []           # nobody told before the commit
        assert not await writer.settled(0.1)                        # an API read would not wait for ever
        path = tmp_path / "turns.jsonl"              # at most the first batch, written and stuck in fsync
        assert not path.exists() or len(path.read_text().splitlines()) < 200
        assert metrics.record_queue._value.get() > 0
        slow_disk.unlink()                                  # the disk is back
        assert await writer.settled(5.0)
        assert len(store.events_since(0)) == 200                   # settled: all of it is readable now
        await _until(lambda: len(told) == 200)
        rows = store.events_since(0)
        assert [json.loads(r["data"])["data"]["i"] for r in rows] == list(range(200))
        assert [s for s, _ in told] == [r["seq"] for r in rows]   # told in commit order ...
        assert all(on_loop for _, on_loop in told)                 # ... on the loop's thread
        assert [json.loads(r["data"])["call_seq"] for r in rows] == list(range(1, 201))
        await loop.run_in_executor(None, writer.flush)
        lines = [json.loads(x) for x in (tmp_path / "turns.jsonl").read_text().splitlines()]
        assert [x["i"] for x in lines] == list(range(200))
        assert writer.close() and metrics.records_dropped._value.get() == 0
        store.close()
    _run(main())


def test_tailer_hears_an_event_only_once_it_is_committed(tmp_path, slow_disk):
    async def main():
        store = Store(str(tmp_path))
        writer = Writer(str(tmp_path))
        writer.start(asyncio.get_running_loop())
        bus = EventBus(store, None, writer)
        tailer = Tailer(store, interval=5.0)               # only the commit callback can make it fast
        bus.on_stored = tailer.wake
        heard = []
        tailer.subscribe(heard.append)
        task = asyncio.create_task(tailer.run())
        await asyncio.sleep(0.05)
        slow_disk.touch()
        bus.publish("call_ringing", "c9", {"from": "a"})
        await asyncio.sleep(0.5)
        assert heard == []
        slow_disk.unlink()
        t0 = time.monotonic()
        await _until(lambda: heard, 3.0)
        assert time.monotonic() - t0 < 1.0                 # woken by the commit, not by the 5 s poll
        assert heard[0]["type"] == "call_ringing" and store.event(heard[0]["seq"]) is not None
        task.cancel()
        writer.close()
        store.close()
    _run(main())


def test_transcript_line_is_committed_before_its_event(tmp_path):
    from types import SimpleNamespace
    from bridge.cell.session import Session

    async def main():
        store = Store(str(tmp_path))
        writer = Writer(str(tmp_path))
        writer.start(asyncio.get_running_loop())
        bus = EventBus(store, Metrics(), writer)
        seen = []

        def on_stored(seq):          # when the event is committed, its transcript line already is
            seen.append((json.loads(store.event(seq)["data"])["data"]["message"],
                         [r["text"] for r in store.transcript("c1")]))
        bus.on_stored = on_stored
        services = SimpleNamespace(store=store, bus=bus, metrics=bus.metrics)
        s = Session(services, SimpleNamespace(call_id="c1", direction="inbound", from_uri="", to_uri="",
                                              source="", trunk=None, media=None))
        for i in range(20):
            s.record_transcript("in", f"line {i}")
        await _until(lambda: len(seen) == 20)
        for i, (message, lines) in enumerate(seen):
            assert message == f"line {i}" and f"line {i}" in lines
        writer.close()
        store.close()
    _run(main())


def test_a_failing_database_keeps_records_and_retries_them_in_order(tmp_path):
    async def main():
        metrics = Metrics()
        store = Store(str(tmp_path))
        writer = Writer(str(tmp_path), metrics)
        writer.store.db.execute("PRAGMA query_only = 1")   # writes fail: "attempt to write a readonly database"
        writer.start(asyncio.get_running_loop())
        bus = EventBus(store, metrics, writer)
        for i in range(5):
            bus.publish("dtmf_received", "c1", {"i": i})
        await _until(lambda: metrics.record_errors._value.get() == 5)
        await asyncio.sleep(0.5)                            # a few retries: still counted once each
        assert metrics.record_errors._value.get() == 5 and store.events_since(0) == []
        assert writer.pending() == 5
        writer.store.db.execute("PRAGMA query_only = 0")   # the disk is writable again
        bus.publish("dtmf_received", "c1", {"i": 5})       # queued behind the held ones
        await _until(lambda: len(store.events_since(0)) == 6)
        assert [json.loads(r["data"])["data"]["i"] for r in store.events_since(0)] == list(range(6))
        assert metrics.records_dropped._value.get() == 0
        writer.close()
        store.close()
    _run(main())


def test_a_record_the_database_rejects_for_good_is_given_up_loudly(tmp_path, caplog):
    async def main():
        metrics = Metrics()
        store = Store(str(tmp_path))
        writer = Writer(str(tmp_path), metrics)
        writer.start(asyncio.get_running_loop())

        def bad(st):
            raise sqlite3.IntegrityError("no such thing")
        writer.sql(bad, "test record", {"x": 1})
        EventBus(store, metrics, writer).publish("dtmf_received", "c1", {"i": 1})
        await _until(lambda: len(store.events_since(0)) == 1)     # the good one behind it is not held up
        assert metrics.records_dropped._value.get() == 1 and metrics.record_errors._value.get() == 1
        writer.close()
        store.close()
    with caplog.at_level(logging.ERROR, "trunkline.records"):
        _run(main())
    assert any("record given up" in r.getMessage() and '{"x": 1}' in _opened(tmp_path, r.getMessage())
               for r in caplog.records)


def _opened(data_dir, message: str) -> str:
    """A given-up record as logged: sealed (no words in the log), opened with the records key."""
    from bridge.records.cipher import vault_for
    return vault_for(os.path.join(str(data_dir), "trunkline.db")).open(message.rsplit(" ", 1)[-1]) or ""


def test_full_queue_drops_the_oldest_counted_and_logged_never_blocks(tmp_path, slow_disk, caplog):
    async def main():
        metrics = Metrics()
        store = Store(str(tmp_path))
        writer = Writer(str(tmp_path), metrics, capacity=10)
        writer.start(asyncio.get_running_loop())
        bus = EventBus(store, metrics, writer)
        slow_disk.touch()
        bus.publish("dtmf_received", "c1", {"i": -1})       # taken by the writer, stalled in its commit
        await asyncio.sleep(0.2)
        for i in range(15):
            bus.publish("dtmf_received", "c1", {"i": i})
        assert metrics.records_dropped._value.get() == 5
        slow_disk.unlink()
        await asyncio.get_running_loop().run_in_executor(None, writer.close)
        assert [json.loads(r["data"])["data"]["i"] for r in store.events_since(0)] == [-1, *range(5, 15)]
        store.close()
    with caplog.at_level(logging.ERROR, "trunkline.records"):
        _run(main())
    given_up = [_opened(tmp_path, r.getMessage()) for r in caplog.records
                if "record given up (queue full)" in r.getMessage()]
    assert len(given_up) == 5 and all('\\"i\\": %d' % i in m for i, m in zip(range(5), given_up))


def test_close_writes_everything_queued(tmp_path, slow_disk):
    async def main():
        store = Store(str(tmp_path))
        writer = Writer(str(tmp_path))
        writer.start(asyncio.get_running_loop())
        bus = EventBus(store, None, writer)
        calls = CallRecords(str(tmp_path), writer=writer)
        slow_disk.touch()
        for i in range(50):
            bus.publish("dtmf_received", "c1", {"i": i})
            calls.append({"i": i})
        threading.Timer(0.5, slow_disk.unlink).start()      # the disk comes back during the stop
        assert await asyncio.get_running_loop().run_in_executor(None, writer.close)
        assert len(store.events_since(0)) == 50
        assert len((tmp_path / "calls.jsonl").read_text().splitlines()) == 50
        store.close()
    _run(main())


def test_close_on_a_disk_hung_for_good_gives_up_loudly(tmp_path, slow_disk, caplog):
    async def main():
        metrics = Metrics()
        store = Store(str(tmp_path))
        writer = Writer(str(tmp_path), metrics)
        writer.start(asyncio.get_running_loop())
        bus = EventBus(store, metrics, writer)
        slow_disk.touch()
        for i in range(5):
            bus.publish("dtmf_received", "c1", {"i": i})
        await asyncio.sleep(0.2)                            # stuck in the disk
        assert not await asyncio.get_running_loop().run_in_executor(None, writer.close, 0.3)
        assert metrics.records_dropped._value.get() == 5
        store.close()
    with caplog.at_level(logging.ERROR, "trunkline.records"):
        _run(main())
    assert sum("disk still stalled at stop" in r.getMessage() for r in caplog.records) == 5


# -- a real cell: the writer stalls, the echo does not ----------------------------------------------

def _echo_gaps(peer: RtpPeer, start: float, end: float) -> float:
    """The longest time between two echoed packets carrying the tone, within [start, end]."""
    loud = [t for t, pt, _, p in peer.received if pt == 0 and start <= t <= end and
            np.abs(np.frombuffer(g711.ulaw_decode(p), "<i2")).mean() > 1500]
    assert len(loud) > 50, f"only {len(loud)} echoed packets came back"
    return float(np.max(np.diff([start, *loud, end])))


def _stalled_call(cell_factory, tmp_path, env: dict, probe: bool = True) -> dict:
    flag = tmp_path / "stall"
    cell = cell_factory("[media]\nclock_rate = 8000\n", env={slowdisk.ENV: str(flag), **env})
    api = Api(cell, create_key(cell.data, "read"))
    peer = RtpPeer(cell.ports["rtp_peer"])
    out: dict = {}
    try:
        call_a = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "7500", local_port=cell.ports["sipp"],
                      rtpport=cell.ports["rtp_peer"], background=True)
        peer.wait_remote()
        t = np.arange(160) / 8000
        tone = g711.ulaw_encode((8000 * np.sin(2 * math.pi * 500 * t)).astype("<i2").tobytes())
        call_b = None
        start = time.monotonic()
        for i in range(300):                               # 6 s of tone, paced at 20 ms
            if i == 75:                                    # 1.5 s in: the disk stalls for 3 s ...
                flag.touch()
                out["stall"] = (time.monotonic(), time.monotonic() + 3.0)
            if i == 85:                                    # ... while another call comes and goes
                call_b = sipp("call_pcmu.xml", cell.sip, tmp_path / "b", "-d", "300",
                              local_port=cell.ports["sipp"] + 1, background=True)
            if i == 160 and probe:            # (with inline writes the API would hang until the disk is back)
                # during the stall: the API still sees call B, but nobody was told of its events
                def look(call_b=call_b):
                    out["b_done"] = call_b.poll() is not None
                    got = api.get("/v1/events?since=0")     # waits 0.5 s for the writer, then reads
                    assert got[0] == 200, got
                    out["events_during"] = [e["type"] for e in got[1]["events"]]
                    out["calls_during"] = {c["id"]: c for c in api.get("/v1/calls")[1]["calls"]}
                    out["jsonl_during"] = (cell.data / "calls.jsonl").exists()
                prober = threading.Thread(target=look)
                prober.start()
            if i == 225:
                if probe:
                    prober.join(2)
                flag.unlink()
                out["stall"] = (out["stall"][0], time.monotonic())
            peer.send(tone)
            while time.monotonic() < start + (i + 1) * 0.020:
                peer._recv_once()
        peer.collect(0.3)
        out["max_echo_gap"] = _echo_gaps(peer, start + 0.5, start + 6.0)
        print("max echo gap %.3f s" % out["max_echo_gap"])
        assert call_a.wait(20) == 0 and call_b.wait(20) == 0
        ended = cell.wait_event("call_ended", 2)
        out["ended"] = ended
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(api.get("/v1/events?since=0")[1]["events"]) < 6:
            time.sleep(0.1)
        out["events_after"] = [(e["type"], e["call_id"]) for e in api.get("/v1/events?since=0")[1]["events"]]
        out["calls_after"] = {c["id"]: c for c in api.get("/v1/calls")[1]["calls"]}
        out["jsonl_after"] = [json.loads(x) for x in (cell.data / "calls.jsonl").read_text().splitlines()]
        out["metrics"] = cell.metrics()
    finally:
        peer.close()
        flag.unlink(missing_ok=True)
    assert cell.stop() == 0
    return out


@pytest.mark.slow
@pytest.mark.sample
def test_stalled_writer_leaves_the_echo_on_time(cell_factory, tmp_path):
    (tmp_path / "b").mkdir()
    out = _stalled_call(cell_factory, tmp_path, {})
    # the disk stalled for 3 s; the echo never stopped for more than a few frames
    assert out["max_echo_gap"] < 0.25, out["max_echo_gap"]
    m = out["metrics"]
    assert m["trunkline_media_frame_gaps_total"] == 0
    assert m.get('trunkline_media_frames_dropped_total{direction="uplink"}', 0) == 0
    assert m["trunkline_records_dropped_total"] == 0 and m["trunkline_record_write_errors_total"] == 0
    for e in out["ended"]:
        assert e["result"] == "answered" and e["frame_gaps"] == 0
    # call B came and went during the stall: the API saw its row, nobody was told of its events,
    # and its calls.jsonl line was not written yet ...
    assert out["b_done"]
    b_id = next(e["call_id"] for e in out["ended"] if e["duration"] < 2)
    assert out["calls_during"][b_id]["state"] == "ended"
    assert not any(out["calls_during"][c]["ended"] for c in out["calls_during"] if c != b_id)
    assert out["events_during"] == ["call_ringing", "call_progressing"]        # call A's, from before
    assert not out["jsonl_during"]
    # ... and all of it appeared, in order, once the disk was back
    b_events = [t for t, c in out["events_after"] if c == b_id]
    assert b_events == ["call_ringing", "call_progressing", "call_hangup"]
    assert out["calls_after"][b_id]["state"] == "ended" and out["calls_after"][b_id]["result"] == "answered"
    assert [r["call_id"] for r in out["jsonl_after"]] == [e["call_id"] for e in out["ended"]]


@pytest.mark.slow
def test_inline_writes_on_a_stalled_disk_stop_the_echo(cell_factory, tmp_path):
    """The same call with the old inline path (TL_TEST_INLINE_WRITES=1): the stall stops
    the tick, so the echo stops with it. This is what the writer is for, and it shows that the
    test above can fail."""
    (tmp_path / "b").mkdir()
    out = _stalled_call(cell_factory, tmp_path, {"TL_TEST_INLINE_WRITES": "1"}, probe=False)
    assert out["max_echo_gap"] > 1.5, out["max_echo_gap"]


def test_sigterm_writes_what_a_stalled_disk_held_back(cell_factory, tmp_path):
    """A clean stop waits for the writer: records queued behind a stalled disk are all written."""
    flag = tmp_path / "stall"
    cell = cell_factory(env={slowdisk.ENV: str(flag)})
    flag.touch()
    res = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "300", local_port=cell.ports["sipp"])
    assert res.returncode == 0
    call_id = cell.wait_event("call_ended")[0]["call_id"]
    assert not (cell.data / "calls.jsonl").exists()
    cell.proc.send_signal(signal.SIGTERM)
    threading.Timer(1.5, flag.unlink).start()               # the disk comes back while the cell stops
    assert cell.proc.wait(30) == 0
    lines = [json.loads(x) for x in (cell.data / "calls.jsonl").read_text().splitlines()]
    assert [x["call_id"] for x in lines] == [call_id]
    store = Store(str(cell.data))
    try:
        assert [e["type"] for e in store.events_since(0)] == ["call_ringing", "call_progressing", "call_hangup"]
        assert store.get_call(call_id)["result"] == "answered"
    finally:
        store.close()


def test_dropping_never_waits_for_a_blocked_log(tmp_path, slow_disk):
    """With the disk stalled, stderr (journald on the same disk) may block too: a full queue's
    drops are counted on the loop and logged by the spill thread, so publishing never waits."""
    release = threading.Event()

    class Blocked(logging.Handler):
        def emit(self, record):
            release.wait(10)

    handler = Blocked(logging.ERROR)
    logging.getLogger("trunkline.records").addHandler(handler)

    async def main():
        metrics = Metrics()
        store = Store(str(tmp_path))
        writer = Writer(str(tmp_path), metrics, capacity=4)
        writer.start(asyncio.get_running_loop())
        bus = EventBus(store, metrics, writer)
        slow_disk.touch()
        bus.publish("dtmf_received", "c1", {"i": -1})
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        for i in range(12):
            bus.publish("dtmf_received", "c1", {"i": i})
        took = time.monotonic() - t0
        dropped = metrics.records_dropped._value.get()
        release.set()
        slow_disk.unlink()
        await asyncio.get_running_loop().run_in_executor(None, writer.close)
        store.close()
        return took, dropped

    try:
        took, dropped = _run(main())
    finally:
        release.set()
        logging.getLogger("trunkline.records").removeHandler(handler)
    assert dropped == 8
    assert took < 1.0, f"publishing waited {took:.2f}s for the log"
