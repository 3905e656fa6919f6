"""The box supervisor's descriptors after faults (issue 14: "the supervisor's FDs step up at faults").

What the soak saw (+6-7 sockets, "one more SQLite connection") is two high-water marks, both bounded:

- The webhook dispatcher's keep-alive pool: after a backlog (the receiver back from an outage, the
  database locked for a while) up to ``CONCURRENCY`` deliveries go out at once, each on a connection
  of its own; aiohttp reuses idle connections oldest first, so under steady deliveries every pooled
  connection stays in use and the pool keeps that size (it shrinks only when deliveries slow down).
  It never exceeds the deliveries in flight, however many faults come.
- SQLite keeps the descriptor of a closed connection's database file open for reuse while another
  connection of the process holds a lock on it (a WAL connection always does): the event replay's
  read-only connection (``read_events``) leaves one such descriptor, reused by the next replay.

These tests pin both bounds on the objects themselves (loopback, a real store, a real aiohttp
receiver), and the soak harness's verdict that counts the pool apart (``tests/bench/soak.py``).
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))


def _inodes(pid: str = "self") -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def client_connections(port: int) -> int:
    """This process's established TCP connections to ``port`` on loopback (its client side only)."""
    mine = _inodes()
    n = 0
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            f = line.split()
            if f[9] in mine and f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == port:
                n += 1
    return n


def db_descriptors(path: str) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                n += 1
        except OSError:
            pass
    return n


class Receiver:
    """A webhook receiver on loopback (real aiohttp, on the test's loop) that answers slowly
    enough for deliveries to overlap, and remembers every client port it served."""

    def __init__(self, delay: float = 0.05):
        self.delay = delay
        self.peers: set[int] = set()
        self.inflight = 0
        self.most = 0
        self.got = 0
        self.status = 204

    async def start(self) -> int:
        from aiohttp import web

        async def hook(request):
            self.peers.add(request.transport.get_extra_info("peername")[1])
            self.inflight += 1
            self.most = max(self.most, self.inflight)
            try:
                await request.read()
                await asyncio.sleep(self.delay)
            finally:
                self.inflight -= 1
            self.got += 1
            return web.Response(status=self.status)
        app = web.Application()
        app.router.add_post("/hook", hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port


async def _dispatcher_with_backlogs(tmp_path, bursts: int, per_burst: int, quiet: float = 0.0):
    """A real dispatcher and store, ``bursts`` backlogs of ``per_burst`` deliveries each (all due at
    once, as after an outage); the pool size (our client connections) after each, then after
    ``quiet`` seconds without deliveries, then after ``stop``."""
    from bridge.api.webhooks import WebhookDispatcher
    from bridge.core.metrics import Metrics
    from bridge.core.netguard import Policy
    from bridge.records.store import Store, new_id

    store = Store(str(tmp_path))
    rx = Receiver()
    port = await rx.start()
    d = WebhookDispatcher(store, Metrics(), guard=Policy.parse(["127.0.0.1/32"]))
    await d.start()
    wh = store.add_webhook(f"http://127.0.0.1:{port}/hook", ["*"], "s3cret")
    sizes = []
    try:
        for b in range(bursts):
            for _ in range(per_burst):
                seq = store.add_event(new_id("evt"), "call_hangup", None, time.time(), {})
                store.add_delivery(wh["id"], seq)
            d.wake.set()
            deadline = time.monotonic() + 60
            while rx.got < (b + 1) * per_burst and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert rx.got == (b + 1) * per_burst, f"burst {b}: {rx.got} deliveries"
            await asyncio.sleep(0.1)           # the last responses released to the pool
            sizes.append(client_connections(port))
        if quiet:
            await asyncio.sleep(quiet)
            sizes.append(client_connections(port))
    finally:
        await d.stop()
        await asyncio.sleep(0.1)
        after_stop = client_connections(port)
        await rx.runner.cleanup()
        store.close()
    return sizes, after_stop, rx


def test_webhook_pool_stays_bounded_across_backlogs(tmp_path):
    """Three backlogs in a row (three faults): the pool widens at the first one (the soak's step),
    never past the deliveries in flight, and the later ones reuse the same connections."""
    from bridge.api.webhooks import CONCURRENCY

    sizes, after_stop, rx = asyncio.run(_dispatcher_with_backlogs(tmp_path, bursts=3, per_burst=40))
    assert sizes[0] > 1, f"a backlog should go out over several connections at once: {sizes}"
    assert max(sizes) <= CONCURRENCY and rx.most <= CONCURRENCY, (sizes, rx.most)
    # the same connections served all three backlogs: none was added for a later fault
    assert len(rx.peers) <= CONCURRENCY, sorted(rx.peers)
    assert after_stop == 0, "stop() must close the dispatcher's connections"


@pytest.mark.slow
def test_webhook_pool_shrinks_when_deliveries_stop(tmp_path):
    """After a backlog and no deliveries for longer than aiohttp's keep-alive timeout (15 s; its
    cleanup runs every 15 s), the idle connections are closed: nothing is held for good."""
    sizes, _, _ = asyncio.run(_dispatcher_with_backlogs(tmp_path, bursts=1, per_burst=40, quiet=33.0))
    assert sizes[0] > 1 and sizes[-1] == 0, sizes


def test_event_replays_leave_at_most_one_database_descriptor(tmp_path):
    """Each replay page opens (and closes) a read-only connection; SQLite keeps a closed
    connection's file descriptor for the next one while the store's connection holds its lock,
    so replays after the first add nothing, and concurrent ones add at most one each, reused after."""
    from bridge.records.store import Store, new_id, read_events

    store = Store(str(tmp_path))
    for i in range(5):
        store.add_event(new_id("evt"), "call_hangup", None, time.time(), {"i": i})
    base = db_descriptors(store.path)
    assert len(read_events(store.path, 0, 10)) == 5
    first = db_descriptors(store.path)
    for _ in range(30):
        read_events(store.path, 0, 10)
    assert db_descriptors(store.path) == first <= base + 1, (base, first, db_descriptors(store.path))
    # two replays at once (two WebSocket clients resuming together), then many one by one
    start = threading.Barrier(3)
    threads = [threading.Thread(target=lambda: (start.wait(), read_events(store.path, 0, 10))) for _ in range(2)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join(10)
    after_two = db_descriptors(store.path)
    for _ in range(30):
        read_events(store.path, 0, 10)
    assert db_descriptors(store.path) == after_two <= first + 2, (first, after_two, db_descriptors(store.path))
    store.close()


def _samples(fds: list[int], pool: list[int]) -> list[dict]:
    return [{"t": 5.0 * i, "procs": {"supervisor": {"rss_kb": 50000, "pss_kb": 30000, "fds": f, "threads": 3,
                                                    "cpu_s": 0.1 * i, "pids": [42], "pool_fds": p}}}
            for i, (f, p) in enumerate(zip(fds, pool))]


def _soak_verdict(fds, pool):
    import soak
    s = soak.Soak(duration=120, interval=5, cells=2, tmp=Path("/nonexistent"))
    s.samples = _samples(fds, pool)
    g = s._growth(warmup=30.0)["supervisor"]
    grew = g["fds"]["to"] - g["fds"]["from"] > max(4, 0.05 * g["fds"]["from"])
    return grew, s._pool_problems(), g


def test_soak_verdict_counts_the_webhook_pool_apart():
    """The harness's verdict: the pool's step is no FD growth, but the pool past its bound is a
    problem, and any other step (a socket or a connection that is not the pool) still is growth."""
    from bridge.api.webhooks import CONCURRENCY
    n, at = 25, 15                                     # samples every 5 s; a fault at 75 s
    steady = [20] * at + [20 + 7] * (n - at)           # +7 at the fault: all of it the webhook pool
    pool = [1] * at + [8] * (n - at)
    grew, probs, g = _soak_verdict(steady, pool)
    assert not grew and probs == [] and g["webhook_pool"]["max"] == 8, g
    grew, probs, _ = _soak_verdict(steady, [1] * n)   # the same step, not the pool
    assert grew and probs == []
    over = [1] * at + [CONCURRENCY + 1] * (n - at)
    grew, probs, _ = _soak_verdict([19 + p for p in over], over)              # the pool past its bound
    assert not grew and probs and "webhook connections reached" in probs[0]


def test_fd_targets_names_sockets_by_peer():
    """``fd_targets`` tells the webhook pool from other sockets (what the verdict counts apart)."""
    import socket
    import soak
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    try:
        kinds = soak.fd_targets(os.getpid(), remote={port: "webhook"}, local={port: "api client"})
        assert kinds.get("socket:webhook") == 1 and kinds.get("socket:api client") == 1, kinds
        assert kinds.get("socket:listen", 0) >= 1, kinds
    finally:
        for s in (cli, conn, srv):
            s.close()


def test_dispatcher_outlives_a_lock_longer_than_its_busy_timeout(tmp_path):
    """Found on the way: the dispatcher's loop writes (it pulls retries forward, claims deliveries)
    on the event loop; a write lock held by another process for longer than the store's busy
    timeout (15 s; shortened here) raised out of that loop and ended webhook delivery for good,
    until a restart. It now waits and goes on."""
    import sqlite3
    from bridge.api.webhooks import WebhookDispatcher
    from bridge.core.metrics import Metrics
    from bridge.core.netguard import Policy
    from bridge.records.store import Store, new_id

    async def run():
        store = Store(str(tmp_path))
        store.db.execute("PRAGMA busy_timeout=100")        # as if 15 s had passed
        rx = Receiver(delay=0.0)
        port = await rx.start()
        d = WebhookDispatcher(store, Metrics(), guard=Policy.parse(["127.0.0.1/32"]))
        await d.start()
        await d._q(lambda db: db.db.execute("PRAGMA busy_timeout=100"))     # its own connection's
        wh = store.add_webhook(f"http://127.0.0.1:{port}/hook", ["*"], "s3cret")
        locked, release = threading.Event(), threading.Event()

        def hold():                                          # another writer (the soak's db_locked)
            db = sqlite3.connect(store.path, timeout=10, isolation_level=None)
            db.execute("BEGIN IMMEDIATE")
            locked.set()
            release.wait(10)
            db.execute("COMMIT")
            db.close()
        holder = threading.Thread(target=hold)
        holder.start()
        try:
            await asyncio.to_thread(locked.wait, 10)
            for _ in range(3):                               # the dispatcher's loop meets the lock
                d.wake.set()
                await asyncio.sleep(0.3)
            release.set()
            await asyncio.to_thread(holder.join, 10)
            seq = store.add_event(new_id("evt"), "call_hangup", None, time.time(), {})
            store.add_delivery(wh["id"], seq)
            d.wake.set()
            deadline = time.monotonic() + 10
            while rx.got < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            release.set()
            died = d._task.done()
            if died:                                         # (its error retrieved, not logged at exit)
                assert isinstance(d._task.exception(), sqlite3.OperationalError)
                await d.session.close()
            else:
                await d.stop()
            await rx.runner.cleanup()
            store.close()
        return rx.got, died
    got, died = asyncio.run(run())
    assert not died, "the dispatcher's loop ended on the lock"
    assert got == 1, "nothing was delivered after the lock"


def test_a_delivery_whose_outcome_was_lost_is_sent_again(tmp_path):
    """A delivery left 'sending' (its POST went out, then writing the outcome failed on a lock past
    the busy timeout) is sent again once it is older than an attempt can be, not left until a
    restart; one claimed a moment ago is not touched."""
    from bridge.api.webhooks import STALE_AFTER, WebhookDispatcher
    from bridge.core.metrics import Metrics
    from bridge.core.netguard import Policy
    from bridge.records.store import Store, new_id

    async def main():
        store = Store(str(tmp_path))
        rx = Receiver(delay=0.0)
        port = await rx.start()
        wh = store.add_webhook(f"http://127.0.0.1:{port}/hook", ["*"], "s3cret")
        lost, fresh = (store.add_delivery(wh["id"], store.add_event(new_id("evt"), "call_hangup", None,
                                                                     time.time(), {})) for _ in range(2))
        for did in (lost, fresh):
            assert store.claim_delivery(did)
        store.db.execute("UPDATE deliveries SET updated = ? WHERE id = ?", (time.time() - 5.0 - STALE_AFTER - 1, lost))
        d = WebhookDispatcher(store, Metrics(), guard=Policy.parse(["127.0.0.1/32"]), timeout=5.0)
        d.session = None
        try:
            import aiohttp
            d.session = aiohttp.ClientSession()
            task = asyncio.create_task(d._run())
            deadline = time.monotonic() + 10
            while store.delivery(lost)["status"] != "delivered" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            task.cancel()
            return store.delivery(lost), store.delivery(fresh), rx.got
        finally:
            if d.session is not None:
                await d.session.close()
            await rx.runner.cleanup()
            store.close()

    lost, fresh, got = asyncio.run(main())
    assert lost["status"] == "delivered" and got == 1, (lost, got)
    assert fresh["status"] == "sending", fresh


def test_a_locked_database_never_stops_the_event_loop(tmp_path):
    """The dispatcher writes on a thread and connection of its own: while another process holds
    the database's write lock (2 s here; the cells of a box write the same file), the loop that
    serves the API, the WebSocket and /healthz keeps running, events queue their deliveries, and
    they are written and delivered once the lock is gone."""
    import sqlite3
    from bridge.api.webhooks import WebhookDispatcher
    from bridge.core.metrics import Metrics
    from bridge.core.netguard import Policy
    from bridge.records.store import Store, new_id

    async def run():
        store = Store(str(tmp_path))
        rx = Receiver(delay=0.0)
        port = await rx.start()
        d = WebhookDispatcher(store, Metrics(), guard=Policy.parse(["127.0.0.1/32"]))
        await d.start()
        store.add_webhook(f"http://127.0.0.1:{port}/hook", ["*"], "s3cret")
        seqs = [store.add_event(new_id("evt"), "call_hangup", None, time.time(), {}) for _ in range(3)]
        locked = threading.Event()

        def hold():                                           # another writer, for 2 s
            db = sqlite3.connect(store.path, timeout=10, isolation_level=None)
            db.execute("BEGIN IMMEDIATE")
            locked.set()
            time.sleep(2.0)
            db.execute("COMMIT")
            db.close()
        gaps = []

        async def heartbeat(seconds):                         # the loop's own, through the lock
            last = time.monotonic()
            end = last + seconds
            while time.monotonic() < end:
                await asyncio.sleep(0.02)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
        beat = asyncio.create_task(heartbeat(3.0))            # from before the lock to after it
        await asyncio.sleep(0.1)
        holder = threading.Thread(target=hold)
        holder.start()
        try:
            await asyncio.to_thread(locked.wait, 10)
            for seq in seqs:                                  # the tailer hands new events over:
                d.on_event({"seq": seq, "type": "call_hangup", "call_id": None})    # the dispatcher wakes
            await beat
            deadline = time.monotonic() + 15
            while rx.got < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await asyncio.to_thread(holder.join, 10)
            await d.stop()
            await rx.runner.cleanup()
            statuses = [r["status"] for r in store.deliveries()]
            store.close()
        return max(gaps), rx.got, statuses
    worst, got, statuses = asyncio.run(run())
    assert worst < 1.0, f"the event loop stopped for {worst:.2f} s while the database was locked"
    assert got == 3 and statuses == ["delivered"] * 3, (got, statuses)


def test_a_delivery_is_dead_only_after_its_attempts_and_its_retry_window(tmp_path):
    """The hour-long soak lost one webhook: full-jitter waits made 16 attempts add up to less than
    the receiver's 10-minute outage, and the delivery was dead before the receiver came back. A
    delivery is now dead only after ``max_attempts`` and ``retry_for`` seconds since it was made
    (here 2 attempts and 1.5 s; the default is 16 and 30 minutes); until then it is retried."""
    from bridge.api.webhooks import WebhookDispatcher
    from bridge.core.metrics import Metrics
    from bridge.core.netguard import Policy
    from bridge.records.store import Store, new_id

    async def run():
        store = Store(str(tmp_path))
        rx = Receiver(delay=0.0)
        rx.status = 503                                   # the receiver is down
        port = await rx.start()
        d = WebhookDispatcher(store, Metrics(), max_attempts=2, base_delay=0.01, max_delay=0.05,
                              guard=Policy.parse(["127.0.0.1/32"]), retry_for=1.5)
        await d.start()
        wh = store.add_webhook(f"http://127.0.0.1:{port}/hook", ["*"], "s3cret")
        did = store.add_delivery(wh["id"], store.add_event(new_id("evt"), "call_hangup", None, time.time(), {}))
        made = time.monotonic()
        d.wake.set()
        try:
            while rx.got < 4 and time.monotonic() - made < 1.0:
                await asyncio.sleep(0.02)
            early = dict(store.delivery(did))
            while store.delivery(did)["status"] != "dead" and time.monotonic() - made < 10:
                await asyncio.sleep(0.05)
            return early, dict(store.delivery(did)), time.monotonic() - made
        finally:
            await d.stop()
            await rx.runner.cleanup()
            store.close()
    early, late, after = asyncio.run(run())
    assert early["status"] in ("pending", "sending") and early["attempts"] >= 3, early   # past max_attempts
    assert late["status"] == "dead" and after >= 1.5, (late, after)
