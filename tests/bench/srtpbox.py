"""The box's concurrent-call figure with SRTP on (issue 12), saved as results/srtpbox.json.

N concurrent G.711 (PCMA) calls, all up at once, into a box of ceil(N/3) echo cells through a
TLS trunk with ``srtp = "mandatory"`` (rtpengine at the edge: SRTP toward the trunk, plain RTP
toward the cells); then the same N calls as plain RTP through the same box (a second TLS trunk,
``srtp`` off, from 127.0.0.2: no relay, media straight to the cells), so both figures come from
one load generator. Reported per size and mode, as ``box.concurrent``: answered, failed, calls on
time with a good MOS (each call's own ``call_ended`` record: frame_rate >= 49.5,
frame_p99_ms <= 30, mos >= 4.3), frames/s min, frame p99 max, MOS min, the box's CPU (supervisor,
cells, Kamailio, rtpengine) over 8 s of the steady part and per call, plus rtpengine's and
Kamailio's own CPU and the load generator's.

The load generator is this one Python process (asyncio), cheap per call so the box, not the
generator, is what is measured: signalling over ONE TLS connection per mode (client
certificate, as a carrier's trunk), every call's SRTP packets (~50/s, AES_CM_128_HMAC_SHA1_80
with its own SDES key) encrypted BEFORE the calls start (the keystream depends only on SSRC,
sequence number and rollover counter), so during the calls it only does ``sendto`` at 20 ms
pacing from one timer loop and counts what comes back (authenticating every 50th packet of a
call with the answer's key, to prove it is real SRTP). It shares the machine's cores with the
box: its own CPU is measured over the same window and reported.

    python tests/bench/run.py --only srtpbox
    python tests/bench/srtpbox.py 3 6          # sizes (calls) on the command line
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import resource
import socket
import ssl
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import support  # noqa: E402
from box import _cpu, _tree  # noqa: E402
from srtp_peer import Srtp  # noqa: E402
from support import BoxProcess  # noqa: E402

PTIME = 0.020
SAMPLE = 50                 # authenticate every 50th SRTP packet a call receives
PCAP = Path("/usr/share/sip-tester/g711a.pcap")      # SIPp's real speech, PCMA (what box.concurrent sends)


def _pcma_frames() -> list[bytes]:
    """SIPp's g711a.pcap as 20 ms PCMA payloads (160 bytes each)."""
    data, off, audio = PCAP.read_bytes(), 24, bytearray()
    while off + 16 <= len(data):
        n = struct.unpack("<I", data[off + 8:off + 12])[0]
        rtp = data[off + 16 + 42:off + 16 + n]          # Ethernet + IPv4 + UDP headers
        audio += rtp[12 + 4 * (rtp[0] & 0x0F):]
        off += 16 + n
    return [bytes(audio[i:i + 160]) for i in range(0, len(audio) - 159, 160)]


@dataclass
class Call:
    """One call of the generator: its dialog, its packets (pre-built) and what came back."""
    idx: int
    mode: str                       # "srtp" or "plain"
    key: str                        # our SDES key ("" for plain)
    packets: list[bytes]
    call_id: str = ""
    tag: str = ""
    branch: str = ""
    status: int | None = None
    to: str = ""
    target: str = ""
    routes: list[str] = field(default_factory=list)
    remote: tuple[str, int] | None = None
    rx: Srtp | None = None
    sent: int = 0
    received: int = 0
    checked: int = 0
    bad: int = 0
    bye: int | None = None
    done: asyncio.Event | None = None


def build_calls(mode: str, n: int, seconds: float) -> tuple[list[Call], float]:
    """``n`` calls of ``seconds`` of PCMA each, every RTP packet built (and for SRTP encrypted
    and tagged with the call's own key) now: (calls, CPU seconds it took)."""
    t0 = time.process_time()
    frames = _pcma_frames()
    count = int(seconds / PTIME)
    calls = []
    for i in range(n):
        ssrc, seq, ts = random.getrandbits(32), random.getrandbits(16), random.getrandbits(32)
        key = base64.b64encode(random.randbytes(30)).decode() if mode == "srtp" else ""
        tx = Srtp(key) if key else None
        pkts = []
        for k in range(count):
            head = struct.pack("!BBHII", 0x80, 8 | (0x80 if k == 0 else 0), (seq + k) & 0xFFFF,
                               (ts + 160 * k) & 0xFFFFFFFF, ssrc)
            pkt = head + frames[(i * 37 + k) % len(frames)]
            pkts.append(tx.protect(pkt) if tx else pkt)
        calls.append(Call(i, mode, key, pkts))
    return calls, time.process_time() - t0


class Generator:
    """The carrier: one TLS connection for the signalling of all its calls and one UDP socket
    (``host``:``rtp_port``) for all their media; ``run`` places the calls at ``rate`` per second,
    streams each call's packets at 20 ms pacing, hangs up when they run out."""

    def __init__(self, host: str, tls_port: int, rtp_port: int, pki: dict, calls: list[Call], rate: float):
        self.host, self.tls_port, self.rtp_port, self.pki = host, tls_port, rtp_port, pki
        self.calls, self.rate = calls, rate
        self.pending: dict[tuple[str, str], asyncio.Future] = {}
        self.by_remote: dict[tuple[str, int], Call] = {}
        self.active: list[Call] = []
        self.stray = 0
        self.requests: list[str] = []          # requests the box sent us (answered 200)

    # -- signalling ------------------------------------------------------------------------------
    async def _connect(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(self.pki["ca"]))
        ctx.load_cert_chain(str(self.pki["far"][0]), str(self.pki["far"][1]))
        for attempt in range(20):
            try:
                self.reader, self.writer = await asyncio.open_connection(
                    "127.0.0.1", self.tls_port, ssl=ctx, server_hostname="127.0.0.1", local_addr=(self.host, 0))
                break
            except OSError:
                if attempt == 19:
                    raise
                await asyncio.sleep(0.5)
        self.local = self.writer.get_extra_info("sockname")[1]

    def _send(self, method: str, uri: str, call: Call, cseq: int, body: str = "", to: str = "",
              routes: list[str] = (), branch: str = "") -> str:
        branch = branch or f"z9hG4bK{random.getrandbits(48):x}"
        head = [f"{method} {uri} SIP/2.0", f"Via: SIP/2.0/TLS {self.host}:{self.local};branch={branch};rport",
                "Max-Forwards: 70", f"From: <sip:sb{call.mode}-{call.idx}@{self.host}>;tag={call.tag}",
                f"To: {to or f'<sip:100@127.0.0.1>'}", f"Call-ID: {call.call_id}", f"CSeq: {cseq} {method}",
                f"Contact: <sip:carrier@{self.host}:{self.local};transport=tls>", *[f"Route: {r}" for r in routes]]
        if body:
            head.append("Content-Type: application/sdp")
        body = body.replace("\n", "\r\n")
        self.writer.write(("\r\n".join(head) + f"\r\nContent-Length: {len(body.encode())}\r\n\r\n" + body).encode())
        return branch

    async def _read_loop(self) -> None:
        try:
            while True:
                head = await self.reader.readuntil(b"\r\n\r\n")
                head = head.lstrip(b"\r\n")           # CRLF keep-alives
                if not head.strip():
                    continue
                lines = head.decode(errors="replace").split("\r\n")
                hdrs: dict[str, list[str]] = {}
                for ln in lines[1:]:
                    if ln:
                        k, _, v = ln.partition(":")
                        hdrs.setdefault({"l": "content-length", "i": "call-id", "t": "to", "m": "contact"}
                                        .get(k.strip().lower(), k.strip().lower()), []).append(v.strip())
                body = await self.reader.readexactly(int(hdrs.get("content-length", ["0"])[0]))
                cid = hdrs.get("call-id", [""])[0]
                method = hdrs.get("cseq", ["0 X"])[0].split()[-1]
                if lines[0].startswith("SIP/2.0"):
                    status = int(lines[0].split()[1])
                    fut = self.pending.get((cid, method))
                    if status >= 200 and fut is not None and not fut.done():
                        fut.set_result((status, hdrs, body.decode(errors="replace")))
                else:                              # a request from the box (BYE, OPTIONS...): 200 OK
                    self.requests.append(lines[0].split()[0])
                    resp = ["SIP/2.0 200 OK", *[f"Via: {v}" for v in hdrs.get("via", [])],
                            f"From: {hdrs.get('from', [''])[0]}", f"To: {hdrs.get('to', [''])[0]}",
                            f"Call-ID: {cid}", f"CSeq: {hdrs.get('cseq', [''])[0]}", "Content-Length: 0", "", ""]
                    self.writer.write("\r\n".join(resp).encode())
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return

    async def _transaction(self, call: Call, method: str, timeout: float, **kw) -> tuple[int, dict, str]:
        fut = asyncio.get_running_loop().create_future()
        self.pending[(call.call_id, method)] = fut
        branch = self._send(method, kw.pop("uri"), call, **kw)
        if method == "INVITE":
            call.branch = branch
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop((call.call_id, method), None)

    def _offer(self, call: Call) -> str:
        proto, crypto = (("RTP/SAVP", f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{call.key}\n") if call.key
                         else ("RTP/AVP", ""))
        return (f"v=0\no=carrier {call.idx + 1} 1 IN IP4 {self.host}\ns=-\nc=IN IP4 {self.host}\nt=0 0\n"
                f"m=audio {self.rtp_port} {proto} 8\na=rtpmap:8 PCMA/8000\n{crypto}a=ptime:20\na=sendrecv\n")

    async def _call(self, call: Call, t0: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, t0 + call.idx / self.rate - loop.time()))
        call.call_id, call.tag = f"{random.getrandbits(64):x}@srtpbox", f"{random.getrandbits(32):x}"
        call.done = asyncio.Event()
        uri = f"sip:100@127.0.0.1:{self.tls_port};transport=tls"
        try:
            status, hdrs, body = await self._transaction(call, "INVITE", 60, uri=uri, cseq=1, body=self._offer(call))
        except asyncio.TimeoutError:
            call.status = 408
            return
        call.status = status
        if status >= 300:
            self._send("ACK", uri, call, 1, to=hdrs["to"][0], branch=call.branch)
            return
        call.to = hdrs["to"][0]
        call.target = re.search(r"<([^>]+)>", hdrs["contact"][0]).group(1)
        call.routes = [r.strip() for rr in reversed(hdrs.get("record-route", [])) for r in reversed(rr.split(","))]
        self._send("ACK", call.target, call, 1, to=call.to, routes=call.routes)
        ip = re.search(r"c=IN IP4 (\S+)", body).group(1)
        m = re.search(r"m=audio (\d+) (\S+)", body)
        call.remote = (ip, int(m.group(1)))
        if call.key:
            crypto = re.search(r"a=crypto:\d+ AES_CM_128_HMAC_SHA1_80 inline:(\S+)", body)
            if m.group(2) != "RTP/SAVP" or not crypto:
                raise RuntimeError(f"answer without SRTP: {body}")
            call.rx = Srtp(crypto.group(1))
        self.by_remote[call.remote] = call
        self.active.append(call)
        await call.done.wait()
        try:
            call.bye = (await self._transaction(call, "BYE", 30, uri=call.target, cseq=2, to=call.to,
                                                routes=call.routes))[0]
        except asyncio.TimeoutError:
            call.bye = 408

    # -- media --------------------------------------------------------------------------------------
    def _readable(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(2048)
            except (BlockingIOError, ConnectionRefusedError):
                return
            call = self.by_remote.get(addr)
            if call is None or len(data) < 12 or data[0] >> 6 != 2:
                self.stray += 1
                continue
            call.received += 1
            if call.rx is not None and call.received % SAMPLE == 1:
                call.checked += 1
                if len(data) < 23 or call.rx.unprotect(data) is None:
                    call.bad += 1

    async def _ticker(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        t = loop.time()
        while not stop.is_set() or self.active:
            t += PTIME
            await asyncio.sleep(max(0.0, t - loop.time()))
            for call in list(self.active):
                try:
                    self.sock.sendto(call.packets[call.sent], call.remote)
                except (BlockingIOError, ConnectionRefusedError):
                    pass
                call.sent += 1
                if call.sent >= len(call.packets):
                    self.active.remove(call)
                    call.done.set()

    async def run(self, window, settle: float = 2.0) -> dict:
        """Place every call, then (once all are answered or failed, + ``settle`` s) run
        ``window()`` (an async callable: the measurement) while media flows; returns its result."""
        loop = asyncio.get_running_loop()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((self.host, self.rtp_port))
        self.sock.setblocking(False)
        rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)    # the far ends' RTCP: taken, dropped
        rtcp.bind((self.host, self.rtp_port + 1))
        rtcp.setblocking(False)
        loop.add_reader(self.sock, self._readable)
        loop.add_reader(rtcp, lambda: _drain(rtcp))
        await self._connect()
        reader = asyncio.create_task(self._read_loop())
        stop = asyncio.Event()
        ticker = asyncio.create_task(self._ticker(stop))
        t0 = loop.time()
        tasks = [asyncio.create_task(self._call(c, t0)) for c in self.calls]
        while any(c.status is None for c in self.calls) and loop.time() < t0 + len(self.calls) / self.rate + 90:
            await asyncio.sleep(0.1)
        setup = loop.time() - t0
        await asyncio.sleep(settle)
        measured = await window()
        stop.set()
        await asyncio.wait(tasks, timeout=len(self.calls[0].packets) * PTIME + 90)
        await ticker
        reader.cancel()
        self.writer.close()
        loop.remove_reader(self.sock)
        loop.remove_reader(rtcp)
        self.sock.close()
        rtcp.close()
        return {"setup_s": round(setup, 1), **measured}


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recvfrom(2048)
        except (BlockingIOError, ConnectionRefusedError):
            return


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _records(box: BoxProcess, call_ids: set[str], want: int, timeout: float = 30.0) -> list[dict]:
    """The cells' ``call_ended`` records of these calls (by Call-ID: the records' ``from`` is redacted)."""
    deadline = time.time() + timeout
    while True:
        ended = [e for i in range(box.n) for e in box.cell_events(i, "call_ended") if e.get("call_id") in call_ids]
        if len(ended) >= want or time.time() > deadline:
            return ended
        time.sleep(0.5)


def run_mode(box: BoxProcess, pki: dict, mode: str, calls: int, seconds: float, tls_port: int, rtp_port: int,
             window_s: float = 8.0) -> dict:
    """``calls`` calls of ``mode`` ("srtp": the mandatory trunk from 127.0.0.1; "plain": the plain
    trunk from 127.0.0.2) into the running ``box``, measured as ``box.concurrent`` does."""
    host = "127.0.0.1" if mode == "srtp" else "127.0.0.2"
    built, prep_cpu = build_calls(mode, calls, seconds)
    rate = max(10, calls // 4)                     # as box.concurrent: all up within ~4 s
    gen = Generator(host, tls_port, rtp_port, pki, built, rate)
    rtpe = int((box.run_dir / "rtpengine.pid").read_text().strip())

    async def window() -> dict:
        loop = asyncio.get_running_loop()
        pids = await loop.run_in_executor(None, _tree, box.proc.pid)
        pids = sorted(set(pids) | {rtpe})
        kam = [p for p in pids if _comm(p) == "kamailio"]
        up = sum(1 for c in built if c.status == 200)
        c0, r0, k0, g0, w0 = _cpu(pids), _cpu([rtpe]), _cpu(kam), _self_cpu(), time.monotonic()
        await asyncio.sleep(window_s)
        c1, r1, k1, g1, w1 = _cpu(pids), _cpu([rtpe]), _cpu(kam), _self_cpu(), time.monotonic()
        wall = w1 - w0
        still = sum(1 for c in built if c in gen.active)
        return {"up_in_window": up, "media_at_window_end": still, "box_cpu_pct": round(100 * (c1 - c0) / wall, 1),
                "rtpengine_cpu_pct": round(100 * (r1 - r0) / wall, 1),
                "kamailio_cpu_pct": round(100 * (k1 - k0) / wall, 1), "kamailio_processes": len(kam),
                "generator_cpu_pct": round(100 * (g1 - g0) / wall, 1)}

    load0 = os.getloadavg()
    measured = asyncio.run(gen.run(window))
    ok = sum(1 for c in built if c.status == 200)
    ended = _records(box, {c.call_id for c in built}, ok)
    good = [e for e in ended if e["frame_rate"] >= 49.5 and (e["frame_p99_ms"] or 99) <= 30 and (e["mos"] or 0) >= 4.3]
    sent, received = sum(c.sent for c in built), sum(c.received for c in built)
    cpu = measured["box_cpu_pct"]
    return {"mode": mode, "cells": box.n, "calls": calls, "answered": ok, "failed": calls - ok,
            "statuses": sorted({c.status for c in built if c.status is not None}),
            "bye_ok": sum(1 for c in built if c.bye == 200), "records": len(ended), "on_time_and_mos_ok": len(good),
            "frame_rate_min": min((e["frame_rate"] for e in ended), default=None),
            "frame_p99_ms_max": max((e["frame_p99_ms"] or 0 for e in ended), default=None),
            "frame_gaps": sum(e["frame_gaps"] for e in ended),
            "mos_min": min((e["mos"] or 0 for e in ended), default=None),
            "codecs": sorted({e.get("codec") or "" for e in ended}),
            "mos_below_4_3": sum(1 for e in ended if (e["mos"] or 0) < 4.3),
            "loss_max": max((e.get("loss") or 0 for e in ended), default=None),
            "late_max": max((e.get("late") or 0 for e in ended), default=None),
            "jitter_ms_max": max((e.get("jitter_ms") or 0 for e in ended), default=None),
            **measured, "cpu_pct_per_call": round(cpu / max(1, ok), 2),
            "rtpengine_cpu_pct_per_call": round(measured["rtpengine_cpu_pct"] / max(1, ok), 3),
            "packets_sent": sent, "packets_received": received, "stray_packets": gen.stray,
            "srtp_checked": sum(c.checked for c in built), "srtp_bad": sum(c.bad for c in built),
            "prebuild_cpu_s": round(prep_cpu, 2), "box_requests": sorted(set(gen.requests)),
            "load_average_before": [round(x, 2) for x in load0],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def size(tmp: Path, pki: dict, calls: int, seconds: float, modes=("srtp", "plain")) -> list[dict]:
    """One box of ceil(calls/3) echo cells with both trunks; ``calls`` calls in each mode, one after the other."""
    support.reset_ports()                                                        # every size reuses the same ports
    cells = max(1, -(-calls // 3))
    front = support.next_ports()["sip"]
    edge = [support.next_ports()["sip"] for _ in range((4 * calls + 60) // 40 + 1)]
    tmp.mkdir(parents=True, exist_ok=True)
    box = BoxProcess(tmp, cells, "", cells_extra=f"front_port = {front}\n")
    tls_port = box.ports["sip"] + 5
    box.config_path.write_text(
        f'[sip]\ntls_listen = "127.0.0.1:{tls_port}"\ntls_cert = "{pki["box"][0]}"\ntls_key = "{pki["box"][1]}"\n'
        f'tls_ca = "{pki["ca"]}"\nrtp_timeout = 0\n[models]\nload = "never"\n'
        f'[[trunks]]\nname = "carrier"\nallow = ["127.0.0.1/32"]\ntransport = "tls"\nsrtp = "mandatory"\n'
        f'[[trunks]]\nname = "plain"\nallow = ["127.0.0.2/32"]\ntransport = "tls"\n'
        + box.config_path.read_text()
        + f'rtpengine_ng_port = {edge[0]}\nrtpengine_ports = "{edge[0] + 2}-{edge[-1] + 39}"\n')
    box.start(wait=False)
    out = []
    try:
        box.wait_healthy(timeout=120 + 3 * cells)
        for i, mode in enumerate(modes):
            out.append(run_mode(box, pki, mode, calls, seconds, tls_port, box.ports["sip"] + 6 + 2 * i))
            time.sleep(3)
    finally:
        box.stop(60) if box.alive() else None
    return out


COLS = (("mode", 5), ("cells", 5), ("calls", 5), ("answered", 4, "ok"), ("failed", 4, "fail"),
        ("on_time_and_mos_ok", 11, "on time+MOS"), ("frame_rate_min", 7, "fps min"), ("frame_p99_ms_max", 6, "p99 ms"),
        ("mos_min", 7, "MOS min"), ("box_cpu_pct", 8, "box CPU%"), ("cpu_pct_per_call", 9, "CPU%/call"),
        ("rtpengine_cpu_pct", 7, "rtpe %"), ("kamailio_cpu_pct", 6, "kam %"), ("generator_cpu_pct", 6, "gen %"),
        ("srtp_bad", 8, "SRTP bad"))


def _row(r: dict | None) -> str:
    return " ".join(f"{(c[2] if len(c) > 2 else c[0]) if r is None else str(r[c[0]]):>{c[1]}}" for c in COLS)


def main(out_path: str | None, sizes=(30, 60, 90, 120, 150, 180), seconds: float = 20.0, keep_going: bool = False) -> dict:
    """Each size in turn (SRTP, then plain through the same box); stops after the first size whose
    SRTP calls are not all answered and on time (unless ``keep_going``)."""
    from tls_peer import make_ca
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
           "call_seconds": seconds, "generator": "one Python asyncio process on the same machine (shares its cores)",
           "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "runs": []}
    print("box with SRTP (mandatory TLS trunk, rtpengine at the edge) vs plain RTP, echo cells, PCMA, all up at once")
    print(_row(None))
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        ca = make_ca(tmp / "pki")
        pki = {"ca": ca.ca, "box": ca.issue("box"), "far": ca.issue("far")}
        for n in sizes:
            rows = size(tmp / f"n{n}", pki, n, seconds)
            for r in rows:
                res["runs"].append(r)
                print(_row(r), flush=True)
            srtp = rows[0]
            if not keep_going and (srtp["answered"] < n or srtp["on_time_and_mos_ok"] < n):
                break
    res["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if out_path:
        Path(out_path).write_text(json.dumps(res, indent=2) + "\n")
        print(f"saved {out_path}")
    return res


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    if args:
        main(None, sizes=tuple(args), keep_going=True)
    else:
        main(str(HERE / "results" / "srtpbox.json"))
