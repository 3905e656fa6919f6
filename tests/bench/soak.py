"""Soak: a box of cells under steady traffic for DURATION seconds, with faults injected at
known times, sampled from /proc every INTERVAL seconds.

    make soak DURATION=3600            # the full run (README: "Soak")
    python tests/bench/soak.py --duration 120 --interval 5 --cells 3   # what `make test` samples

What runs (all on 127.0.0.1, bounded, stops by itself):
- ``trunkline serve --cells N`` (echo app, recordings on, sealed records) behind its Kamailio front.
- Traffic through the front at ~80 % of the box's call slots (3 per cell): long calls
  (SIPp ``bench_pcap.xml``: ~19 s of real speech RTP each), short ones (SIPp's built-in
  ``uac``, 2 s, no media) and agent calls, one at a time (``agent_speech.xml`` to a number
  routed to the agent app, with the bundled models loaded in every cell's inference process:
  ~21 s, two spoken turns), each SIPp run writing its counters every second (``-trace_stat``).
  ``--no-agent``: echo traffic only, models not loaded.
- API clients on the box API: an event WebSocket that drops and resumes (``since``) every
  20 s, a webhook receiver (signed POSTs, all ``call_ended`` events), and a media-stream tap on
  every agent call (both directions, read through the box's relay until the bridge stops it).
- Faults at fixed fractions of the run, each with the effect the soak checks:
  ``webhook_down`` (receiver gone; deliveries retried, none lost), ``kill_cell`` (kill -9; the
  supervisor restarts it, new calls recover), ``kill_inference`` (kill -9 of the inference
  process of the cell with a live agent call; the cell and the call stay up, the cell starts a
  new one, later agent calls get turns), ``stop_cell`` (SIGSTOP 5 s; the front fails
  over, the cell resumes), ``kill_front`` (kill -9 of Kamailio; restarted), ``db_locked``
  (another process holds the SQLite write lock for 5 s), ``disk_full`` (root only: the data
  directory is a small tmpfs, filled for 30 s; records kept in memory and written after).
- Samples per process (supervisor, each cell, Kamailio's processes together): RSS, PSS, open
  FDs, threads, CPU; the SQLite file + WAL size and the data directory's size.

Checks (``verdict``): every process alive at the end; growth after warm-up < 5 % (RSS; PSS is
reported, since it also moves when a sibling sharing its pages dies or is forked again; FDs and
threads within max(5 %, 4)) for every process over its last life, after its own warm-up; the
supervisor's FDs counted without its keep-alive connections to the webhook receiver, which step
up after a backlog of deliveries and stay at that high-water mark while deliveries keep coming,
and are bounded instead: never more than ``bridge.api.webhooks.CONCURRENCY``, the deliveries in
flight at once; the kinds of its descriptors are in ``supervisor_fds``, sockets by what they
connect to); no failed call outside a fault's window; every answered call has its ``call_ended``
record in the store, the WebSocket saw every stored ``call_ended`` event, and the webhook
receiver got every one of them (after the receiver came back); every ``transcript_created``
event has its transcript row and reached the WebSocket; every answered agent call outside a
cell fault's window has a caller turn and an agent turn stored, a ``call_summary`` event and a
clean media stream (``start`` first, ``stop`` with reason ``call_ended`` last, no gap in
``sequence_number``, audio both ways).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support import Api, BoxProcess, build_clockstep, create_key, serve_on_loopback, sipp, step_clock  # noqa: E402

from bridge.api.webhooks import CONCURRENCY as WEBHOOK_CONCURRENCY  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
AGENT_NUMBER = "15550009000"        # routed to the agent app (the soak's share of agent calls)
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# -- /proc -----------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def children(root: int) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            st = _read(f"/proc/{p}/stat")
            if st:
                try:
                    kids.setdefault(int(st.rsplit(")", 1)[1].split()[1]), []).append(int(p))
                except (IndexError, ValueError):
                    pass
    return kids


def proc_sample(pid: int) -> dict | None:
    status = _read(f"/proc/{pid}/status")
    if not status:
        return None
    rss = re.search(r"VmRSS:\s+(\d+)", status)
    thr = re.search(r"Threads:\s+(\d+)", status)
    pss = re.search(r"^Pss:\s+(\d+)", _read(f"/proc/{pid}/smaps_rollup"), re.M)
    st = _read(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = 0
    return {"rss_kb": int(rss.group(1)) if rss else 0, "pss_kb": int(pss.group(1)) if pss else 0,
            "fds": fds, "threads": int(thr.group(1)) if thr else 0,
            "cpu_s": (int(st[11]) + int(st[12])) / TICKS if len(st) > 12 else 0.0}


def cmdline(pid: int) -> str:
    return _read(f"/proc/{pid}/cmdline").replace("\0", " ")


def roles(box_pid: int, cell_pids: dict[int, int] | None = None) -> dict[str, list[int]]:
    """The box's processes by role: supervisor, cellN (``cell_pids``: pid -> index, from the box
    API; else the TRUNKLINE_CELL of a cell started by exec), kamailio (all of Kamailio's
    processes), zygote (the process cells are forked from), inferenceN (cell N's inference
    process) and the cells' other workers."""
    kids = children(box_pid)
    out: dict[str, list[int]] = {"supervisor": [box_pid]}
    todo = [(k, "supervisor") for k in kids.get(box_pid, [])]
    while todo:
        p, parent = todo.pop()
        cl = cmdline(p)
        m = re.search(r"(?:^|\0)TRUNKLINE_CELL=(\d+)(?:\0|$)", _read(f"/proc/{p}/environ"))
        if "kamailio" in cl.split(" ")[0]:
            role = "kamailio"
        elif "-m ai.worker" in cl and parent.startswith("cell"):
            role = "inference" + parent[4:]          # a cell's inference process (STT, LLM, TTS)
        elif cell_pids is not None and p in cell_pids:
            role = f"cell{cell_pids[p]}"
        elif cell_pids is None and m:
            role = f"cell{m.group(1)}"
        elif "rtpengine" in cl.split(" ")[0]:
            role = "rtpengine"
        elif "bridge" in cl:
            role = "zygote" if "zygote" in cl else f"worker:{p}"
        else:
            role = "other"
        out.setdefault(role, []).append(p)
        todo += [(k, role) for k in kids.get(p, [])]
    return out


def dir_kb(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks // 2
            except OSError:
                pass
    return total


# -- SIPp counters ---------------------------------------------------------------------------
def failures(stat_csv: Path) -> list[tuple[float, int]]:
    """(unix time, new failed calls in that period) from SIPp's ``-trace_stat`` file."""
    if not stat_csv.exists():
        return []
    rows = [r.split(";") for r in stat_csv.read_text(errors="replace").splitlines() if r.strip()]
    if len(rows) < 2:
        return []
    head = rows[0]
    ti, fi = head.index("CurrentTime"), head.index("FailedCall(C)")
    out, last = [], 0
    for r in rows[1:]:
        if len(r) <= max(ti, fi):
            continue
        t = float(r[ti].split()[-1])
        n = int(r[fi])
        if n > last:
            out.append((t, n - last))
        last = n
    return out


def totals(stat_csv: Path) -> tuple[int, int]:
    rows = [r.split(";") for r in stat_csv.read_text(errors="replace").splitlines() if r.strip()] \
        if stat_csv.exists() else []
    if len(rows) < 2:
        return 0, 0
    head, last = rows[0], rows[-1]
    return int(last[head.index("SuccessfulCall(C)")]), int(last[head.index("FailedCall(C)")])


# -- API clients -----------------------------------------------------------------------------
class WebhookReceiver:
    """A loopback receiver that can go down and come back on the same port."""

    def __init__(self):
        self.got: dict[int, float] = {}          # event seq -> when it arrived
        self.port: int | None = None
        self.loop = None

    def _app(self):
        from aiohttp import web

        async def hook(request):
            body = await request.json()
            self.got.setdefault(body["seq"], time.time())
            return web.Response(status=204)
        app = web.Application()
        app.router.add_post("/hook", hook)
        return app

    def up(self) -> None:
        if self.port is None:
            self.port, self.loop = serve_on_loopback(self._app)
            return
        from aiohttp import web
        loop, ready = asyncio.new_event_loop(), threading.Event()

        def run():
            asyncio.set_event_loop(loop)
            runner = web.AppRunner(self._app())
            loop.run_until_complete(runner.setup())
            for _ in range(100):          # the old socket may linger a moment
                try:
                    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start())
                    break
                except OSError:
                    time.sleep(0.1)
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
        threading.Thread(target=run, daemon=True).start()
        ready.wait(15)
        self.loop = loop

    def down(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.loop = None


class _Client:
    """An API client running its own asyncio loop (``_run``) on a daemon thread until ``stop``."""
    join_for = 15.0

    def __init__(self):
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self):
        raise NotImplementedError

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(self.join_for)


class EventSocket(_Client):
    """A WebSocket consumer of every event that drops its connection every ``period`` s and
    resumes from the last ``seq`` it saw, as a real consumer with a flaky link would."""

    def __init__(self, url: str, key: str, period: float):
        super().__init__()
        self.url, self.key, self.period = url, key, period
        self.seen: dict[int, str] = {}
        self.reconnects = 0

    async def _run(self):
        import aiohttp
        last = None
        while not self._stop.is_set():
            t_end = time.monotonic() + self.period
            try:
                async with aiohttp.ClientSession() as s:
                    async with s.ws_connect(self.url, headers={"Authorization": f"Bearer {self.key}"}) as ws:
                        sub = {"type": "subscribe", "topics": ["*"]}
                        if last is not None:
                            sub["since"] = last
                        await ws.send_json(sub)
                        while time.monotonic() < t_end and not self._stop.is_set():
                            try:
                                m = await asyncio.wait_for(ws.receive_json(), 0.5)
                            except asyncio.TimeoutError:
                                continue
                            if m.get("type") == "event":
                                ev = m["event"]
                                self.seen[ev["seq"]] = ev["type"]
                                last = max(last or 0, ev["seq"])
            except Exception as exc:  # noqa: BLE001 - the box API may be busy; count and retry
                self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                await asyncio.sleep(1.0)
            self.reconnects += 1



class AgentStreams(_Client):
    """A media-stream consumer on every agent call, as a customer's analytics or QA tap would be:
    it follows the event WebSocket, and when a call on the ``agent`` app is answered it opens a
    stream of both directions (``POST /v1/calls/{id}/streams``, G.711 µ-law) and reads it through
    the box's relay until the bridge stops it. Per stream it keeps what the verdict checks: the
    first message is ``start``, the last ``stop`` (its reason), ``sequence_number`` has no gap,
    and the frames per direction with what the 20 ms timestamps say was lost."""

    join_for = 20.0

    def __init__(self, http: str, key: str):
        super().__init__()
        self.http, self.key = http, key
        self.agent_calls: dict[str, float] = {}      # call id -> when it rang (agent app only)
        self.ended: dict[str, float] = {}
        self.streams: dict[str, dict] = {}           # call id -> what its stream delivered

    def live(self) -> list[str]:
        ended = dict(self.ended)                      # the tap thread adds to both while we read
        return [c for c in list(self.agent_calls) if c not in ended]

    async def _run(self):
        import aiohttp
        last = None
        taps: set[asyncio.Task] = set()
        hdr = {"Authorization": f"Bearer {self.key}"}
        async with aiohttp.ClientSession(headers=hdr) as http:
            while not self._stop.is_set():
                try:
                    async with http.ws_connect(self.http.replace("http", "ws", 1) + "/v1/ws") as ws:
                        await ws.send_json({"type": "subscribe", "topics": ["event:call_ringing",
                                            "event:call_progressing", "event:call_hangup"],
                                            **({"since": last} if last is not None else {})})
                        while not self._stop.is_set():
                            try:
                                m = await asyncio.wait_for(ws.receive_json(), 0.5)
                            except asyncio.TimeoutError:
                                continue
                            if m.get("type") != "event":
                                continue
                            ev = m["event"]
                            last = max(last or 0, ev["seq"])
                            cid, kind = ev["call_id"], ev["type"]
                            if kind == "call_ringing" and ev["data"].get("app") == "agent":
                                self.agent_calls.setdefault(cid, time.time())
                            elif kind == "call_progressing" and cid in self.agent_calls and cid not in self.streams:
                                self.streams[cid] = {"opened": False}
                                t = asyncio.ensure_future(self._tap(http, cid))
                                taps.add(t)
                                t.add_done_callback(taps.discard)
                            elif kind == "call_hangup" and cid in self.agent_calls:
                                self.ended.setdefault(cid, time.time())
                except Exception as exc:  # noqa: BLE001 - the box API may restart; count and resume
                    self.errors.append(f"events: {type(exc).__name__}: {exc}"[:200])
                    await asyncio.sleep(1.0)
            for t in list(taps):
                t.cancel()
            await asyncio.gather(*taps, return_exceptions=True)

    async def _tap(self, http, cid: str) -> None:
        rec = self.streams[cid]
        try:
            for _ in range(20):                       # the call row may be a moment behind its event
                async with http.post(f"{self.http}/v1/calls/{cid}/streams",
                                     json={"direction": "both", "encoding": "mulaw"}) as r:
                    body = await r.json(content_type=None)
                    if r.status == 201:
                        break
                    rec["refused"] = f"{r.status} {body}"[:200]
                    if r.status != 404:
                        return
                await asyncio.sleep(0.25)
            else:
                return
            rec.update(opened=True, id=body["id"], first=None, stop=None, seq_gaps=0, media={"in": 0, "out": 0},
                       lost={"in": 0, "out": 0}, connections=0)
            last_seq, last_ts = 0, {}
            async with http.ws_connect(self.http.replace("http", "ws", 1) + body["ws_path"]) as ws:
                async for msg in ws:
                    if msg.type != 1:                 # aiohttp.WSMsgType.TEXT
                        break
                    m = json.loads(msg.data)
                    rec["first"] = rec["first"] or m.get("event")
                    seq = m.get("sequence_number", 0)
                    if last_seq and seq != last_seq + 1:
                        rec["seq_gaps"] += 1
                    last_seq = seq
                    if m.get("event") == "start":
                        rec["connections"] += 1
                    elif m.get("event") == "media":
                        d, ts = m["media"]["direction"], m["media"]["timestamp"]
                        rec["media"][d] += 1
                        if d in last_ts and ts - last_ts[d] > 20:
                            rec["lost"][d] += (ts - last_ts[d]) // 20 - 1
                        last_ts[d] = ts
                    elif m.get("event") == "stop":
                        rec["stop"] = m["stop"].get("reason")
        except Exception as exc:  # noqa: BLE001 - recorded; the verdict reads it
            rec["error"] = f"{type(exc).__name__}: {exc}"[:200]


# -- faults ----------------------------------------------------------------------------------
@dataclass
class Fault:
    kind: str
    at: float                  # seconds into the run
    length: float              # how long it lasts (0: instant)
    expect: str
    done_at: float | None = None
    note: str = ""
    call: str = ""             # the call it hit, when it aimed at one
    result: dict | None = None   # what was found when it ended (kill_inference)

    def window(self, grace: float) -> tuple[float, float]:
        return self.at, self.at + self.length + grace


def schedule(duration: float, disk: bool, agent: bool = True) -> list[Fault]:
    d = duration
    f = [Fault("webhook_down", 0.15 * d, min(600.0, 0.2 * d), "deliveries retried, none lost"),
         Fault("kill_cell", 0.30 * d, 0.0, "supervisor restarts the cell; new calls recover")]
    if agent:     # the inference process of the cell with a live agent call: the cell and its calls stay up
        f.append(Fault("kill_inference", 0.38 * d, 30.0,
                       "the cell restarts its inference process; its calls stay up; later agent calls get turns"))
    f += [
         Fault("stop_cell", 0.45 * d, 5.0, "front fails over; the cell resumes"),
         Fault("kill_front", 0.60 * d, 0.0, "supervisor restarts Kamailio; new calls recover"),
         Fault("db_locked", 0.72 * d, 5.0, "records wait for the lock; nothing lost")]
    if disk:
        f.append(Fault("disk_full", 0.82 * d, min(30.0, 0.1 * d), "records kept in memory and written after"))
    # the box's wall clock an hour ahead, then back (an NTP correction): nothing may fail or stall
    f.append(Fault("clock_step", 0.90 * d, min(30.0, 0.05 * d), "calls go on; no record an hour long; retries on time"))
    return f


def _port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1], 16)


def socket_table() -> dict[str, tuple]:
    """Socket inode -> ("tcp", local port, remote port, listening) | ("udp",) | ("unix",), from
    /proc/net (this network namespace: the box's, all on loopback)."""
    out: dict[str, tuple] = {}
    for name in ("tcp", "tcp6"):
        for line in _read(f"/proc/net/{name}").splitlines()[1:]:
            f = line.split()
            if len(f) > 9:
                out[f[9]] = ("tcp", _port(f[1]), _port(f[2]), f[3] == "0A")
    for name in ("udp", "udp6"):
        for line in _read(f"/proc/net/{name}").splitlines()[1:]:
            f = line.split()
            if len(f) > 9:
                out[f[9]] = ("udp",)
    for line in _read("/proc/net/unix").splitlines()[1:]:
        f = line.split()
        if len(f) > 6:
            out[f[6]] = ("unix",)
    return out


def fd_targets(pid: int, remote: dict[int, str] | None = None, local: dict[int, str] | None = None) -> dict[str, int]:
    """The kinds of a process's open descriptors (pipe, anon_inode:..., a path, a socket) and how many.
    A socket is ``socket:listen``, ``socket:unix``, ``socket:udp``, ``socket:<name>`` for a TCP
    connection whose remote port ``remote`` names (the webhook receiver, a cell's HTTP) or whose
    local port ``local`` names (a client of the box API), else ``socket:tcp`` (or ``socket`` when
    /proc/net does not know it)."""
    out: dict[str, int] = {}
    remote, local = remote or {}, local or {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    table = None
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":[", 1)[0] if ":[" in target else target
        if kind == "socket":
            table = socket_table() if table is None else table
            sk = table.get(target[8:-1])
            if sk is None:
                pass
            elif sk[0] != "tcp":
                kind = f"socket:{sk[0]}"
            elif sk[3]:
                kind = "socket:listen"
            else:
                kind = f"socket:{remote.get(sk[2]) or local.get(sk[1]) or 'tcp'}"
        out[kind] = out.get(kind, 0) + 1
    return out


def _metric(p: dict, m: str) -> float:
    """A sampled figure; the supervisor's FDs without its webhook keep-alive pool, which steps up
    after any backlog of deliveries (a receiver outage, a locked database: many in flight at once,
    each on a connection of its own) and stays at that high-water mark while deliveries keep
    coming (aiohttp reuses its idle connections oldest first); ``_pool_problems`` bounds it."""
    return p["fds"] - p.get("pool_fds", 0) if m == "fds" else p[m]


# -- the run ---------------------------------------------------------------------------------
@dataclass
class Soak:
    duration: float
    interval: float
    cells: int
    tmp: Path
    samples: list[dict] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    restarts: dict[str, list[float]] = field(default_factory=dict)
    faults_on: bool = True
    agent: bool = True                      # a share of agent calls (models loaded), streams tapped
    api: object = None
    taps: object = None
    remote_ports: dict[int, str] = field(default_factory=dict)     # a TCP peer's port -> what it is
    local_ports: dict[int, str] = field(default_factory=dict)      # the supervisor's serving port -> ...

    def run(self) -> dict:
        tmp = self.tmp
        data = tmp / "data"
        data.mkdir()
        disk = os.geteuid() == 0 and shutil.which("mount") is not None
        if disk:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192m", "tmpfs", str(data)], capture_output=True)
            disk = r.returncode == 0
        (tmp / "pcap").symlink_to("/usr/share/sip-tester")
        keys = tmp / "records.keys"
        from bridge.core.keys import new_key_line
        keys.write_text(new_key_line("k1") + "\n")
        keys.chmod(0o600)
        slots = 3 * self.cells
        agent_limit = 1 if self.agent else 0             # ~21 s agent calls, one at a time (the LLM and
        long_limit = max(1, round(0.5 * slots))         # STT share the 2 cores with everything else); ~19 s
        short_limit = max(1, round(0.8 * slots) - long_limit - agent_limit)
        # webhook retries back off up to max_delay: the default 300 s in a long run, less in a short one
        # (the verdict waits for the last retry after the receiver's outage)
        max_delay = self.max_delay = min(300.0, max(10.0, self.duration / 10))
        # the product's rtp_timeout (30 s): a call whose caller is gone without a BYE (a fault lost it) is
        # reaped as in production instead of holding its slot to the end; the drain at the end is not
        # what the soak measures, so it is short
        cfg = (f'drain_timeout = 15\n[models]\nload = "{"auto" if self.agent else "never"}"\n'
               '[http]\noutbound_allow = ["127.0.0.1/32"]\n'
               f'[recordings]\nenabled = true\nkey_file = "{keys}"\ncurrent_key = "k1"\n'
               f'[webhooks]\nmax_delay = {max_delay}\n')
        if self.agent:          # the bundled models in every cell's inference process; one number the agent's
            cfg += f'[numbers]\n"{AGENT_NUMBER}" = "agent"\n'
        box = BoxProcess(tmp, self.cells, cfg)
        self.clock = tmp / "clock-offset"                 # the clock_step fault: every box process preloads
        step_clock(self.clock, 0.0)                        # tests/clockstep.c (the harness and SIPp do not)
        box.env.update(LD_PRELOAD=str(build_clockstep(tmp)), CLOCKSTEP_FILE=str(self.clock))
        hook = WebhookReceiver()
        hook.up()
        procs: list[subprocess.Popen] = []
        sock = None
        t0 = time.time()
        self.phases: dict[str, float] = {}      # seconds each part of the run took (the result's "phases")
        mark = time.monotonic()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            self.phases[name] = round(now - mark, 1)
            mark = now
        try:
            self._box = box
            box.start(wait=False)
            box.wait_healthy(timeout=120 + 3 * self.cells)
            phase("start")
            key = create_key(box.data, "control")
            api = self.api = Api(box, key)
            st, body, _ = api.post("/v1/webhooks", {"url": f"http://127.0.0.1:{hook.port}/hook",
                                                    "topics": ["event:call_hangup"]})
            assert st == 201, body
            # what the supervisor's sockets connect to (its "supervisor_fds" by kind)
            self.remote_ports = {hook.port: "webhook"}
            st, body, _ = api.get("/v1/cells")
            for c in body["cells"] if st == 200 else []:
                self.remote_ports[int(c["http"].rsplit(":", 1)[1])] = "cell http"
            self.local_ports = {box.ports["http"]: "api client"}
            sock = EventSocket(f"ws://127.0.0.1:{box.ports['http']}/v1/ws", key, period=20.0).start()
            if self.agent:
                self.taps = AgentStreams(f"http://127.0.0.1:{box.ports['http']}", key).start()
            t0 = time.time()
            self.faults = schedule(self.duration, disk, self.agent) if self.faults_on else []
            # SIPp: long calls at a rate that keeps long_limit up, short 2 s calls likewise: one call
            # every 1/rate s (`-r 1 -rp <ms>`). (It was `-r <rate x 1000> -rp 1000`, hundreds of calls
            # a second, so only -l paced the streams and after a fault SIPp's backlog met the front's 503s.)
            long_rate = long_limit / 20.0
            short_rate = short_limit / 2.6
            long_n = int(self.duration * long_rate)
            short_n = int(self.duration * short_rate)
            agent_rate = 1 / 24.0
            streams = [("agent", "agent_speech.xml", ["-s", AGENT_NUMBER, "-l", "1", "-r", "1",
                                                      "-rp", str(round(1000 / agent_rate)),
                                                      "-mp", str(box.ports["sip"] + 600)],
                        max(1, int(self.duration * agent_rate)), box.ports["sipp"] + 2)] if self.agent else []
            for name, scen, args, n, lp in (*streams,
                    ("long", "bench_pcap.xml", ["-l", str(long_limit), "-r", "1", "-rp", str(round(1000 / long_rate)),
                                                "-mp", str(box.ports["sip"] + 400)], long_n, box.ports["sipp"]),
                    ("short", "builtin:uac", ["-d", "2000", "-l", str(short_limit),
                                              "-r", "1", "-rp", str(round(1000 / short_rate))], short_n,
                     box.ports["sipp"] + 1)):
                d = tmp / name
                d.mkdir()
                if name in ("long", "agent"):
                    (d / "pcap").symlink_to("/usr/share/sip-tester")
                procs.append(sipp(scen, box.sip, d, *args, "-trace_stat", "-fd", "1", local_port=lp, calls=n,
                                  background=True, timeout=self.duration + 120))
            self._loop(box, hook, t0, data)
            phase("traffic")
            # traffic is paced to end with the run: wait for the last calls (bounded)
            for p in procs:
                try:
                    p.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
            phase("last_calls")
            hook.up() if hook.loop is None else None
            time.sleep(3)
            res = self._verdict(box, hook, sock, tmp, t0, data)
            phase("verdict")
            return res
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            if sock is not None:
                sock.stop()
            if self.taps is not None:
                self.taps.stop()
            for f in self.faults:
                if f.kind == "stop_cell" and f.note and f.done_at is None:
                    try:
                        os.kill(int(f.note.split("pid ")[1]), signal.SIGCONT)
                    except (OSError, IndexError, ValueError):
                        pass
            try:
                box.stop(timeout=60)
            except AssertionError:
                pass
            phase("stop")
            hook.down()
            # the logs outlive the run (the data directory may be a tmpfs that goes with it)
            (tmp / "logs").mkdir(exist_ok=True)
            for f in list((data / "run").glob("*.log")) + list((data / "run").glob("*.cfg")):
                try:
                    shutil.copy(f, tmp / "logs" / f.name)
                except OSError:
                    pass
            if disk:
                subprocess.run(["umount", "-l", str(data)], capture_output=True)

    def roles(self, box) -> dict[str, list[int]]:
        try:
            st, body, _ = self.api.get("/v1/cells")
            pids = {c["pid"]: c["index"] for c in body["cells"] if c.get("pid") and c.get("alive")} \
                if st == 200 else None
        except Exception:  # noqa: BLE001 - the box API busy or restarting: fall back to the environment
            pids = None
        return roles(box.proc.pid, pids)

    def _loop(self, box, hook, t0: float, data: Path) -> None:
        next_sample = t0
        pending = sorted(self.faults, key=lambda f: f.at)
        active: list[tuple[Fault, object]] = []
        while time.time() - t0 < self.duration:
            now = time.time()
            for f in [f for f in pending if now - t0 >= f.at]:
                pending.remove(f)
                active.append((f, self._inject(f, box, hook, data)))
            for f, undo in list(active):
                if now - t0 >= f.at + f.length:
                    if undo is not None:
                        undo()
                    f.done_at = time.time() - t0
                    active.remove((f, undo))
            if now >= next_sample:
                self._sample(box, t0, data)
                next_sample += self.interval
            time.sleep(0.2)
        for f, undo in active:
            if undo is not None:
                undo()
            f.done_at = time.time() - t0
        self._sample(box, t0, data)

    def _inject(self, f: Fault, box, hook, data: Path):
        r = self.roles(box)
        if f.kind == "webhook_down":
            hook.down()
            return hook.up
        if f.kind in ("kill_cell", "stop_cell"):
            idx = 1 if f.kind == "kill_cell" else 0
            idx = min(idx, self.cells - 1)
            pid = r.get(f"cell{idx}", [None])[0]
            if pid is None:
                f.note = f"cell{idx} not running"
                return None
            if f.kind == "kill_cell":
                os.kill(pid, signal.SIGKILL)
                self.restarts.setdefault(f"cell{idx}", []).append(f.at)
                f.note = f"cell{idx} pid {pid}"
                return None
            os.kill(pid, signal.SIGSTOP)
            f.note = f"cell{idx} pid {pid}"
            return lambda: os.kill(pid, signal.SIGCONT)
        if f.kind == "kill_inference":
            return self._kill_inference(f, r)
        if f.kind == "kill_front":
            k = [p for p in r.get("kamailio", []) if int(_read(f"/proc/{p}/stat").rsplit(")", 1)[1].split()[1])
                 == box.proc.pid]
            if k:
                os.kill(k[0], signal.SIGKILL)
                self.restarts.setdefault("kamailio", []).append(f.at)
                f.note = f"kamailio pid {k[0]}"
            return None
        if f.kind == "clock_step":
            step_clock(self.clock, 3600.0)
            f.note = "wall clock of every box process +1 h, then back"
            return lambda: step_clock(self.clock, 0.0)
        if f.kind == "db_locked":
            # held on a thread of its own for exactly f.length: this loop's sampling asks the box API,
            # which may wait on this very lock, so a release left to the loop could come 15 s late
            db = sqlite3.connect(data / "trunkline.db", timeout=10, isolation_level=None, check_same_thread=False)
            db.execute("BEGIN IMMEDIATE")
            f.note = "write lock held by the soak"

            def hold():
                time.sleep(f.length)
                db.execute("COMMIT")
                db.close()
            holder = threading.Thread(target=hold, name="db_locked", daemon=True)
            holder.start()
            return lambda: holder.join(f.length + 5)
        if f.kind == "disk_full":
            filler = data / "filler"
            free = shutil.disk_usage(data).free
            with open(filler, "wb") as fh:
                try:
                    os.posix_fallocate(fh.fileno(), 0, max(1, free))
                except OSError:
                    pass
                # whatever fallocate left (tmpfs rounds), fill by writing
                try:
                    while True:
                        fh.write(b"\0" * (1 << 20))
                        fh.flush()
                except OSError:
                    pass
            f.note = f"filled {free >> 20} MB"
            return lambda: filler.unlink(missing_ok=True)
        raise ValueError(f.kind)

    def _kill_inference(self, f: Fault, r: dict):
        """kill -9 of the inference process of the cell that has a live agent call (cell 0's when
        none is live). At the end of the fault's window: the cell is the same process, a new
        inference process runs beside it, and the call that lost its models went on (the verdict)."""
        idx = 0
        live = list(reversed(self.taps.live())) if self.taps else []
        if live:              # the cell of a call is in its row (the API does not show it)
            db = sqlite3.connect(f"file:{self._box.data / 'trunkline.db'}?mode=ro", uri=True, timeout=10)
            try:
                for cid in live:
                    row = db.execute("SELECT cell FROM calls WHERE id = ?", (cid,)).fetchone()
                    if row and row[0] is not None:
                        idx, f.call = int(row[0]), cid
                        break
            finally:
                db.close()
        cell, worker = r.get(f"cell{idx}", [None])[0], r.get(f"inference{idx}", [None])[0]
        if cell is None or worker is None:
            f.note = f"cell{idx} or its inference process not running"
            return None
        os.kill(worker, signal.SIGKILL)
        f.note = f"inference{idx} pid {worker} (cell pid {cell}" + (f", live agent call {f.call})" if f.call else ")")

        def check():
            now = self.roles(self._box)
            back = now.get(f"inference{idx}", [None])[0]
            f.result = {"cell_same": now.get(f"cell{idx}", [None])[0] == cell,
                        "inference_back": back is not None and back != worker}
        return check

    def _sample(self, box, t0: float, data: Path) -> None:
        row = {"t": round(time.time() - t0, 1), "procs": {}}
        for role, pids in self.roles(box).items():
            if role.startswith("worker:") or role == "other":
                continue
            ss = [s for s in (proc_sample(p) for p in pids) if s]
            if ss:
                row["procs"][role] = {k: sum(s[k] for s in ss) for k in ss[0]} | {"pids": sorted(pids)[:1]}
        db = data / "trunkline.db"
        row["db_kb"] = (db.stat().st_size // 1024) if db.exists() else 0
        wal = data / "trunkline.db-wal"
        row["wal_kb"] = (wal.stat().st_size // 1024) if wal.exists() else 0
        row["data_kb"] = dir_kb(data)
        sup = box.proc.pid if box.proc is not None else None
        if sup is not None:                   # what the supervisor holds open (FD growth is a verdict)
            kinds = row["supervisor_fds"] = fd_targets(sup, self.remote_ports, self.local_ports)
            if "supervisor" in row["procs"]:      # its webhook keep-alive pool, bounded on its own
                row["procs"]["supervisor"]["pool_fds"] = kinds.get("socket:webhook", 0)
        self.samples.append(row)

    # -- verdict -----------------------------------------------------------------------------
    def _growth(self, warmup: float) -> dict:
        out = {}
        roles_seen = sorted({r for s in self.samples for r in s["procs"]})
        for role in roles_seen:
            pts = [(s["t"], s["procs"][role]) for s in self.samples if role in s["procs"]]
            # a restarted process starts over: its last life only, after its own warm-up
            last_pid = pts[-1][1]["pids"] if pts else None
            life = [(t, p) for t, p in pts if p["pids"] == last_pid]
            pts = [(t, p) for t, p in life if t >= life[0][0] + warmup]
            if len(pts) < 4:
                out[role] = {"samples": len(pts), "note": "too few samples after warm-up (restarted late?)"}
                continue
            k = max(2, len(pts) // 3)
            first, last = pts[:k], pts[-k:]
            g = {}
            for m in ("pss_kb", "rss_kb", "fds", "threads"):
                a = statistics.median(_metric(p, m) for _, p in first)
                b = statistics.median(_metric(p, m) for _, p in last)
                g[m] = {"from": a, "to": b, "growth_pct": round(100 * (b - a) / a, 1) if a else 0.0}
            if any("pool_fds" in p for _, p in pts):
                g["webhook_pool"] = {"from": statistics.median(p.get("pool_fds", 0) for _, p in first),
                                     "to": statistics.median(p.get("pool_fds", 0) for _, p in last),
                                     "max": max(p.get("pool_fds", 0) for _, p in life)}
            cpu = (last[-1][1]["cpu_s"] - first[0][1]["cpu_s"]) / max(1e-6, last[-1][0] - first[0][0])
            out[role] = {"samples": len(pts), "cpu_pct": round(100 * cpu, 2), **g}
        return out

    def _pool_problems(self) -> list[str]:
        """The supervisor's keep-alive connections to the webhook receiver: never more than the
        dispatcher's deliveries in flight (``bridge.api.webhooks.CONCURRENCY``), at any sample."""
        top = max((s["procs"]["supervisor"].get("pool_fds", 0) for s in self.samples
                   if "supervisor" in s["procs"]), default=0)
        if top > WEBHOOK_CONCURRENCY:
            return [f"supervisor webhook connections reached {top} (bound {WEBHOOK_CONCURRENCY}: deliveries in flight)"]
        return []

    def _agent_verdict(self, db, t0: float, problems: list[str]) -> dict:
        """Agent calls: each answered one has turns both ways in the store, a ``call_summary``, and a
        clean media stream (start first, stop ``call_ended`` last, no sequence gap, audio both ways);
        the inference kill left its cell up, came back, and later agent calls still got turns.
        Calls a cell fault ended (its window) are excused; the inference kill excuses nothing."""
        cell_faults = [(t0 + f.at, t0 + f.at + f.length + 45) for f in self.faults
                       if f.kind in ("kill_cell", "stop_cell", "kill_front")]
        rows = db.execute("SELECT id, answered, ended FROM calls WHERE app = 'agent' AND answered IS NOT NULL").fetchall()
        turns = {(c, d): n for c, d, n in db.execute(
            "SELECT call_id, direction, COUNT(*) FROM transcripts GROUP BY call_id, direction").fetchall()}
        summaries = {r[0] for r in db.execute("SELECT DISTINCT call_id FROM events WHERE type = 'call_summary'")}
        out = {"answered": len(rows), "excused": 0, "caller_turns": 0, "agent_turns": 0, "summaries": 0,
               "streams": {"opened": 0, "clean": 0, "frames_in": 0, "frames_out": 0, "lost_in": 0, "lost_out": 0},
               "stream_errors": (self.taps.errors[:5] if self.taps else []),
               "without_turns": [], "without_summary": [], "bad_streams": {}}
        st = out["streams"]
        for cid, answered, ended in rows:
            # live during a cell fault or the 45 s after it (the fault may have ended it), or never ended
            excused = ended is None or any(answered <= b and ended >= a for a, b in cell_faults)
            caller, agent = turns.get((cid, "in"), 0), turns.get((cid, "out"), 0)
            out["caller_turns"] += caller
            out["agent_turns"] += agent
            out["summaries"] += cid in summaries
            rec = dict(self.taps.streams.get(cid, {})) if self.taps else {}
            if rec.get("opened"):
                st["opened"] += 1
                for d in ("in", "out"):
                    st[f"frames_{d}"] += rec["media"][d]
                    st[f"lost_{d}"] += rec["lost"][d]
            clean = (rec.get("opened") and rec.get("first") == "start" and rec.get("stop") == "call_ended"
                     and rec.get("seq_gaps") == 0 and rec["media"]["in"] > 0 and rec["media"]["out"] > 0
                     and "error" not in rec)
            st["clean"] += bool(clean)
            if excused:
                out["excused"] += 1
                continue
            if not (caller and agent):
                out["without_turns"].append([cid, caller, agent])
            if cid not in summaries:
                out["without_summary"].append(cid)
            if not clean:
                out["bad_streams"][cid] = {k: v for k, v in rec.items() if k != "id"} or "no stream"
        if not rows:
            problems.append("no agent call was answered")
        if out["without_turns"]:
            problems.append(f"{len(out['without_turns'])} agent calls without a caller and an agent turn in the store "
                            f"(call, caller turns, agent turns): {out['without_turns'][:5]}")
        if out["without_summary"]:
            problems.append(f"{len(out['without_summary'])} agent calls without a call_summary event")
        if out["bad_streams"]:
            problems.append(f"{len(out['bad_streams'])} agent calls without a clean media stream: "
                            f"{dict(list(out['bad_streams'].items())[:3])}")
        for f in self.faults:
            if f.kind != "kill_inference" or not f.note.startswith("inference"):
                if f.kind == "kill_inference":
                    problems.append(f"kill_inference not injected: {f.note}")
                continue
            r = f.result or {}
            if not r.get("cell_same"):
                problems.append("the cell whose inference process was killed did not stay up")
            if not r.get("inference_back"):
                problems.append(f"no new inference process {f.length:.0f} s after the kill")
            after = [cid for cid, answered, _ in rows if answered > t0 + f.at + f.length]
            out["answered_after_inference_kill"] = len(after)
            out["with_caller_turns_after_inference_kill"] = sum(1 for c in after if turns.get((c, "in")))
        return out

    def _verdict(self, box, hook, sock, tmp: Path, t0: float, data: Path) -> dict:
        problems: list[str] = []
        warmup = min(60.0, 0.25 * self.duration)
        growth = self._growth(warmup)
        problems += self._pool_problems()
        for role, g in growth.items():
            if "note" in g:
                continue
            # RSS is what the process itself holds; PSS also moves when a sibling sharing its pages
            # dies or is forked again (a killed cell changes the others' PSS), so it is reported only
            for m in ("rss_kb",):
                if g[m]["growth_pct"] >= 5.0:
                    problems.append(f"{role} {m} grew {g[m]['growth_pct']} % ({g[m]['from']} -> {g[m]['to']})")
            for m in ("fds", "threads"):
                if g[m]["to"] - g[m]["from"] > max(4, 0.05 * g[m]["from"]):
                    problems.append(f"{role} {m} grew {g[m]['from']} -> {g[m]['to']}")
        alive = self.roles(box)
        for i in range(self.cells):
            if f"cell{i}" not in alive:
                problems.append(f"cell{i} is not running at the end")
        if "kamailio" not in alive:
            problems.append("Kamailio is not running at the end")
        # failed calls: each must fall in a fault's window (the fault, then a call's length + recovery)
        grace = 45.0
        windows = [tuple(t0 + x for x in f.window(grace)) for f in self.faults
                   if f.kind in ("kill_cell", "stop_cell", "kill_front", "disk_full", "db_locked")]
        calls = {}
        unexplained = 0
        for name in ("long", "short", *(("agent",) if self.agent else ())):
            stat = next(iter(sorted((tmp / name).glob("*_.csv"))), tmp / name / "none.csv")
            ok, failed = totals(stat)
            fails = failures(stat)
            bad = sum(n for t, n in fails if not any(a <= t <= b for a, b in windows))
            unexplained += bad
            calls[name] = {"successful": ok, "failed": failed, "failed_outside_faults": bad,
                           "failed_at_s": [[round(t - t0, 1), n] for t, n in fails][:50]}
        if unexplained:
            problems.append(f"{unexplained} failed calls outside any fault's window")
        # every answered call has its record; events reached the WebSocket and the webhook
        db = sqlite3.connect(f"file:{data / 'trunkline.db'}?mode=ro", uri=True, timeout=30)
        ended = {r[0] for r in db.execute("SELECT seq FROM events WHERE type = 'call_hangup'")}
        answered_rows = db.execute("SELECT COUNT(*) FROM calls WHERE answered IS NOT NULL").fetchone()[0]
        # the clock_step fault: a record's times keep their true distances (no call an hour long)
        hour_long = db.execute("SELECT COUNT(*) FROM calls WHERE ended - answered > 1800").fetchone()[0]
        reaped = db.execute("SELECT COUNT(*) FROM calls WHERE reason = 'rtp timeout'").fetchone()[0]
        # every finished turn is in the store: a transcript row for each transcript_created event
        lines = dict(db.execute("SELECT call_id, COUNT(*) FROM transcripts GROUP BY call_id").fetchall())
        told = dict(db.execute("SELECT call_id, COUNT(*) FROM events WHERE type = 'transcript_created' "
                               "GROUP BY call_id").fetchall())
        turn_events = {r[0] for r in db.execute("SELECT seq FROM events WHERE type = 'transcript_created'")}
        agent = self._agent_verdict(db, t0, problems) if self.agent else None
        db.close()
        short_turns = {c: (told.get(c, 0), lines.get(c, 0)) for c in set(told) | set(lines)
                       if told.get(c, 0) != lines.get(c, 0)}
        if short_turns:
            problems.append(f"{len(short_turns)} calls whose transcript rows and transcript_created events differ: "
                            f"{dict(list(short_turns.items())[:5])}")
        if hour_long:
            problems.append(f"{hour_long} call records over half an hour long (the wall clock step went into them)")
        sipp_ok = sum(c["successful"] for c in calls.values())
        if answered_rows < sipp_ok:
            problems.append(f"{sipp_ok} calls answered at the caller, {answered_rows} answered calls in the store")
        deadline = time.time() + self.max_delay + 15    # the last retry waits up to webhooks.max_delay
        while time.time() < deadline and not ended <= set(hook.got):
            time.sleep(0.5)
        missing_hook = ended - set(hook.got)
        if missing_hook:
            problems.append(f"{len(missing_hook)} of {len(ended)} call_hangup events never reached the webhook")
        ws_seen = {s for s, t in sock.seen.items() if t == "call_hangup"}
        missing_ws = ended - ws_seen
        if missing_ws:
            problems.append(f"{len(missing_ws)} of {len(ended)} call_hangup events never reached the WebSocket")
        missing_turns = turn_events - {s for s, t in sock.seen.items() if t == "transcript_created"}
        if missing_turns:
            problems.append(f"{len(missing_turns)} of {len(turn_events)} transcript_created events never reached "
                            "the WebSocket")
        last = self.samples[-1] if self.samples else {}
        return {"duration_s": self.duration, "cells": self.cells, "interval_s": self.interval, "calls": calls,
                "answered_in_store": answered_rows, "call_hangup_events": len(ended),
                "transcript_rows": sum(lines.values()), "transcript_events": len(turn_events), "agent": agent,
                "ended_by_rtp_timeout": reaped,
                "webhook_received": len(set(hook.got) & ended), "websocket_received": len(ws_seen & ended),
                "websocket_reconnects": sock.reconnects,
                "faults": [{"kind": f.kind, "at_s": round(f.at, 1), "length_s": f.length, "expect": f.expect,
                            "note": f.note, **({"result": f.result} if f.result is not None else {})}
                           for f in self.faults],
                "growth_after_warmup": growth, "db_kb": last.get("db_kb"), "wal_kb": last.get("wal_kb"),
                "data_kb": last.get("data_kb"), "samples": len(self.samples),
                "series": [{"t": x["t"], "db_kb": x["db_kb"], "wal_kb": x["wal_kb"], "data_kb": x["data_kb"],
                            **{r: [v["rss_kb"], v["pss_kb"], v["fds"], v["threads"]] for r, v in x["procs"].items()},
                            "supervisor_fds": x.get("supervisor_fds")}
                           for x in self.samples],
                "supervisor_fds": {"first": next((x.get("supervisor_fds") for x in self.samples), None),
                                   "last": self.samples[-1].get("supervisor_fds") if self.samples else None},
                "problems": problems,
                "ok": not problems}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=float(os.environ.get("DURATION", 3600)))
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--cells", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "soak.json"))
    ap.add_argument("--samples-out", default="")
    ap.add_argument("--no-faults", action="store_true", help="traffic and sampling only")
    ap.add_argument("--no-agent", action="store_true",
                    help="echo traffic only (no agent calls, models not loaded, no stream taps)")
    ap.add_argument("--keep", default="", help="run in this directory and keep it (SIPp logs, cell logs)")
    a = ap.parse_args(argv)
    if a.cells < 2:     # `serve --cells 1` is a plain cell: no front, no supervisor, nothing to soak
        ap.error("--cells must be 2 or more: one cell runs without the Kamailio front and supervisor")
    with tempfile.TemporaryDirectory() as td:
        work = Path(a.keep or td)
        work.mkdir(parents=True, exist_ok=True)
        soak = Soak(a.duration, a.interval, a.cells, work, faults_on=not a.no_faults, agent=not a.no_agent)
        res = soak.run()
    res["phases_s"] = soak.phases
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    if a.samples_out:
        Path(a.samples_out).write_text(json.dumps(soak.samples))
    print(json.dumps({k: v for k, v in res.items() if k not in ("growth_after_warmup", "series")}, indent=1))
    for role, g in res["growth_after_warmup"].items():
        if "note" in g:
            print(f"  {role:10s} {g['note']}")
        else:
            print(f"  {role:10s} cpu {g['cpu_pct']:5.2f} %  PSS {g['pss_kb']['from']:.0f}->{g['pss_kb']['to']:.0f} kB "
                  f"({g['pss_kb']['growth_pct']:+.1f} %)  FDs {g['fds']['from']:.0f}->{g['fds']['to']:.0f}  "
                  f"threads {g['threads']['from']:.0f}->{g['threads']['to']:.0f}"
                  + (f"  webhook pool {g['webhook_pool']['from']:.0f}->{g['webhook_pool']['to']:.0f} "
                     f"(max {g['webhook_pool']['max']})" if "webhook_pool" in g else ""))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
