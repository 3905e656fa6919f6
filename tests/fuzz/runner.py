"""Sends fuzz cases to a loopback SIP target over UDP or TCP, checks the target after
every batch, and saves the batch that broke it as a regression case.

The oracle is passed in (``Oracle``): after each batch the target processes must all
be alive and a probe (an OPTIONS from a trusted source, /healthz) must answer within
``probe_timeout`` seconds, else the batch is a crash or a hang. Calls that the cases
happen to open are ended (ACK + BYE) so the target's call slots come back.
"""
from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from fuzz.sipfuzz import TOTAG, Case, Endpoint, SipFuzzer

REGRESSIONS = Path(__file__).resolve().parent / "regressions"


# -- tiny SIP parsing for responses ----------------------------------------------------
def header(msg: bytes, *names: str) -> str | None:
    """First value of a header (long or compact name) in a message."""
    head = msg.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    for line in head.split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() in names:
            return value.strip()
    return None


def status_of(msg: bytes) -> int | None:
    m = re.match(rb"SIP/2\.0 (\d{3}) ", msg)
    return int(m.group(1)) if m else None


def to_tag(msg: bytes) -> str | None:
    to = header(msg, "to", "t") or ""
    m = re.search(r";\s*tag=([^;>\s]+)", to)
    return m.group(1) if m else None


def split_stream(buf: bytes) -> tuple[list[bytes], bytes]:
    """Complete messages in a TCP byte stream (by Content-Length) and the rest."""
    out = []
    while True:
        buf = buf.lstrip(b"\r\n")
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return out, buf
        length = int(header(buf[:end + 4], "content-length", "l") or 0)
        total = end + 4 + length
        if len(buf) < total:
            return out, buf
        out.append(buf[:total])
        buf = buf[total:]


@dataclass
class Oracle:
    """How to tell the target survived: ``alive()`` and ``probe()`` return None when
    fine, else a reason. ``pids()``: processes whose VmRSS is measured."""
    alive: Callable[[], str | None]
    probe: Callable[[], str | None]
    pids: Callable[[], dict[str, int]] = lambda: {}


@dataclass
class Stats:
    cases: int = 0
    messages: int = 0
    bytes: int = 0
    responses: dict[str, int] = field(default_factory=dict)   # status code -> count
    calls_opened: int = 0
    batches: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    probe_max: float = 0.0

    def count(self, code: int | None) -> None:
        key = str(code) if code is not None else "request"
        self.responses[key] = self.responses.get(key, 0) + 1


def vm_rss_kb(pid: int) -> int | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class UdpFlow:
    """One UDP socket bound on the source address; a thread gathers everything that comes back."""

    def __init__(self, src_ip: str):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((src_ip, 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._rx, daemon=True)
        self.thread.start()

    def _rx(self) -> None:
        self.sock.settimeout(0.1)
        while not self.closed:
            try:
                data, _ = self.sock.recvfrom(65535)
            except (socket.timeout, ConnectionRefusedError):
                continue
            except OSError:
                return
            with self.cond:
                self.received.append(data)
                self.cond.notify_all()

    def send(self, data: bytes, dest: tuple[str, int]) -> None:
        try:
            self.sock.sendto(data, dest)
        except OSError:            # EMSGSIZE, ECONNREFUSED from an earlier ICMP: the datagram is lost
            pass

    def wait_for(self, pred: Callable[[bytes], bool], timeout: float) -> bytes | None:
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for m in self.received:
                    if pred(m):
                        return m
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def take(self) -> list[bytes]:
        with self.cond:
            out, self.received = self.received, []
        return out

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        self.thread.join(1)


class TcpFlow:
    """One TCP connection from the source address for one case (closed with a FIN, as a
    scanner or a real peer would: the target decides when to free its side)."""

    def __init__(self, src_ip: str, dest: tuple[str, int]):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((src_ip, 0))
        self.sock.settimeout(3)
        self.sock.connect(dest)
        self.port = self.sock.getsockname()[1]
        self.buf = b""
        self.received: list[bytes] = []
        self.dead = False

    def send(self, data: bytes, dest=None) -> None:
        if self.dead:
            return
        try:
            self.sock.sendall(data)
        except OSError:
            self.dead = True

    def pump(self, timeout: float) -> None:
        if self.dead:
            return
        self.sock.settimeout(max(0.001, timeout))
        try:
            data = self.sock.recv(65535)
        except (socket.timeout, BlockingIOError):
            return
        except OSError:
            self.dead = True
            return
        if not data:
            self.dead = True
            return
        msgs, self.buf = split_stream(self.buf + data)
        self.received += msgs

    def wait_for(self, pred: Callable[[bytes], bool], timeout: float) -> bytes | None:
        end = time.monotonic() + timeout
        while True:
            for m in self.received:
                if pred(m):
                    return m
            left = end - time.monotonic()
            if left <= 0 or self.dead:
                return None
            self.pump(min(left, 0.1))

    def take(self) -> list[bytes]:
        self.pump(0.001)          # what already arrived: a connection churn stays a churn
        out, self.received = self.received, []
        return out

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _final_invite_response(call_id: str) -> Callable[[bytes], bool]:
    def pred(m: bytes) -> bool:
        st = status_of(m)
        return (st is not None and st >= 200 and header(m, "call-id", "i") == call_id
                and (header(m, "cseq") or "").endswith("INVITE"))
    return pred


def end_call(flow, resp: bytes, target: Endpoint, src: tuple[str, int]) -> None:
    """ACK a 2xx to an INVITE and send a BYE for it (clean requests built from the response;
    the BYE's CSeq is far above any the case used, so the target takes it)."""
    try:
        cseq = int((header(resp, "cseq") or "1").split()[0])
    except ValueError:
        cseq = 1
    contact = header(resp, "contact", "m") or f"<sip:{target.hostport}>"
    m = re.search(r"<([^>]+)>", contact)
    ruri = m.group(1) if m else contact.split(";")[0]
    if not re.match(r"sips?:([^@;]*@)?127\.\d{1,3}\.\d{1,3}\.\d{1,3}(:\d+)?(;|$)", ruri):
        ruri = f"sip:{target.hostport}"        # a clean loopback Request-URI (it is sent to the target anyway)
    frm, to, call_id = header(resp, "from", "f"), header(resp, "to", "t"), header(resp, "call-id", "i")
    for method, seq in (("ACK", cseq), ("BYE", 100000 + random.randrange(1000))):
        msg = (f"{method} {ruri} SIP/2.0\r\n"
               f"Via: SIP/2.0/{target.transport} {src[0]}:{src[1]};branch=z9hG4bK{random.getrandbits(48):x};rport\r\n"
               f"Max-Forwards: 70\r\nFrom: {frm}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {seq} {method}\r\n"
               f"Content-Length: 0\r\n\r\n").encode()
        flow.send(msg, (target.ip, target.port))


class Runner:
    """Drives one fuzz run: ``run(seed, start, count)`` sends cases in batches of
    ``batch`` and checks ``oracle`` after each. ``name`` names saved regressions."""

    def __init__(self, target: Endpoint, src_ip: str, oracle: Oracle, name: str, batch: int = 50,
                 probe_timeout: float = 5.0, save_dir: Path = REGRESSIONS, budget: float = 900.0,
                 dialog_wait: float = 3.0):
        self.target, self.src_ip, self.oracle, self.name = target, src_ip, oracle, name
        self.batch, self.probe_timeout, self.save_dir, self.budget = batch, probe_timeout, save_dir, budget
        self.dialog_wait = dialog_wait          # how long a dialog case waits for the INVITE's answer
        self.stats = Stats()
        self.rss_before: dict[str, int | None] = {}
        self.rss_after: dict[str, int | None] = {}
        self.saved: Path | None = None
        self.udp: UdpFlow | None = UdpFlow(src_ip) if target.transport == "UDP" else None

    def close(self) -> None:
        if self.udp:
            self.udp.close()

    # -- sending -----------------------------------------------------------------------
    def send_case(self, case: Case) -> None:
        dest = (self.target.ip, self.target.port)
        if self.udp:
            flow, src = self.udp, (self.src_ip, self.udp.port)
        else:
            try:
                flow = TcpFlow(self.src_ip, dest)
            except OSError as exc:
                self.stats.failures.append(f"case {case.index}: TCP connect failed: {exc}")
                return
            src = (self.src_ip, flow.port)
        try:
            msgs = list(case.messages)
            tag, resp = None, None
            for i, data in enumerate(msgs):
                if case.dialog and i == 1:
                    call_id = header(msgs[0], "call-id", "i") or ""
                    resp = flow.wait_for(_final_invite_response(call_id), self.dialog_wait)
                    tag = (to_tag(resp) if resp is not None else None) or "nodialog"
                if tag is not None:
                    data = data.replace(TOTAG, tag.encode())
                flow.send(data, dest)
                self.stats.messages += 1
                self.stats.bytes += len(data)
                if case.pause:
                    time.sleep(case.pause)
            if resp is not None and (status_of(resp) or 0) < 300:
                end_call(flow, resp, self.target, src)      # whatever the case did, the call ends
            if not self.udp:
                invites = {header(m, "call-id", "i") for m in msgs if m.startswith(b"INVITE ")}
                for call_id in invites - {None}:
                    flow.wait_for(_final_invite_response(call_id), 1.0)
                self._settle(flow, src)
        finally:
            if not self.udp:
                flow.close()

    def _settle(self, flow, src) -> None:
        """Answers gathered so far: counted; 2xx to INVITEs ended."""
        for m in flow.take():
            st = status_of(m)
            self.stats.count(st)
            if st is not None and 200 <= st < 300 and (header(m, "cseq") or "").endswith("INVITE"):
                self.stats.calls_opened += 1
                end_call(flow, m, self.target, src)
            elif st is None and m[:4] in (b"BYE ", b"NOTI", b"OPTI", b"INVI"):
                self._answer_request(flow, m)

    def _answer_request(self, flow, req: bytes) -> None:
        """A request the target sent us (BYE, NOTIFY, OPTIONS): answer 200 so it stops."""
        lines = [f"{n}: {header(req, n.lower())}" for n in ("Via", "From", "To", "Call-ID", "CSeq")
                 if header(req, n.lower()) is not None]
        flow.send(("SIP/2.0 200 OK\r\n" + "\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode(),
                  (self.target.ip, self.target.port))

    # -- the run -----------------------------------------------------------------------
    def measure(self) -> dict[str, int | None]:
        return {name: vm_rss_kb(pid) for name, pid in self.oracle.pids().items()}

    def check(self) -> str | None:
        why = self.oracle.alive()
        if why:
            return "crash: " + why
        t = time.monotonic()
        why = self.oracle.probe()
        took = time.monotonic() - t
        self.stats.probe_max = max(self.stats.probe_max, took)
        if why:
            return f"hang: {why}"
        if took > self.probe_timeout:
            return f"hang: the probe took {took:.1f}s (budget {self.probe_timeout}s)"
        return None

    def run_cases(self, cases: list[Case], seed: int | None = None) -> str | None:
        """Send ``cases`` in batches; the first failing batch is saved and its reason returned."""
        start = time.monotonic()
        self.rss_before = self.rss_before or self.measure()
        try:
            for b in range(0, len(cases), self.batch):
                batch = cases[b:b + self.batch]
                for case in batch:
                    self.send_case(case)
                    self.stats.cases += 1
                if self.udp:
                    time.sleep(0.2)
                    self._settle(self.udp, (self.src_ip, self.udp.port))
                self.stats.batches += 1
                why = self.check()
                if why:
                    self.saved = self.save(batch, why, seed)
                    self.stats.failures.append(why)
                    return f"{why} (batch saved in {self.saved})"
                if time.monotonic() - start > self.budget:
                    break
            if self.udp:
                time.sleep(0.5)
                self._settle(self.udp, (self.src_ip, self.udp.port))
            return None
        finally:
            self.stats.seconds += time.monotonic() - start
            self.rss_after = self.measure()

    def run(self, seed: int, start: int, count: int, rtp_port: int = 9) -> str | None:
        """Cases ``start``..``start+count`` of the run ``seed`` (a pure function of both)."""
        src_port = self.udp.port if self.udp else 5060
        fz = SipFuzzer(seed, self.target, Endpoint(self.src_ip, src_port, self.target.transport), rtp_port)
        return self.run_cases(list(fz.cases(start, count)), seed)

    # -- regression cases ----------------------------------------------------------------
    def save(self, batch: list[Case], why: str, seed: int | None) -> Path:
        first = batch[0].index if batch else 0
        d = self.save_dir / f"{self.name}-{self.target.transport.lower()}-seed{seed}-case{first}"
        d.mkdir(parents=True, exist_ok=True)
        meta = {"reason": why, "seed": seed, "transport": self.target.transport, "source": self.src_ip,
                "target": self.name, "target_hostport": self.target.hostport, "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cases": []}
        for case in batch:
            files = []
            for k, data in enumerate(case.messages):
                f = f"{case.index:06d}-{k:02d}.sip"
                (d / f).write_bytes(data)
                files.append(f)
            c = asdict(case)
            c.pop("messages")
            c["files"] = files
            meta["cases"].append(c)
        (d / "case.json").write_text(json.dumps(meta, indent=1))
        return d


def load_regression(d: Path, target: Endpoint) -> tuple[dict, list[Case]]:
    """A saved batch: its metadata and its cases, rewritten for ``target`` (a replay runs
    against a fresh target on fresh ports), ready for ``Runner.run_cases``."""
    meta = json.loads((d / "case.json").read_text())
    old = meta.get("target_hostport", "").encode()

    def fix(data: bytes) -> bytes:
        return data.replace(old, target.hostport.encode()) if old else data
    cases = [Case(c["index"], meta["transport"], [fix((d / f).read_bytes()) for f in c["files"]], c["label"],
                  c.get("dialog", False), c.get("pause", 0.0)) for c in meta["cases"]]
    return meta, cases


def regression_dirs(save_dir: Path = REGRESSIONS) -> list[Path]:
    return sorted(p.parent for p in save_dir.glob("*/case.json"))
