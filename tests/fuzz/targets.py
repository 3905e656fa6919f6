"""Real targets for the hostile-traffic tests: a cell (CellProcess) or a box (Kamailio
front + cells, BoxProcess), with the oracle that says whether they survived.

Trust: the trunk allow-list names only 127.0.0.1/32, so 127.0.0.1 is a trusted source
and 127.0.0.9 (a bound socket) an untrusted one."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fuzz.runner import Oracle, header, status_of, vm_rss_kb
from support import BoxProcess, CellProcess, sipp

TRUSTED, UNTRUSTED = "127.0.0.1", "127.0.0.9"
TRUNK = '[[trunks]]\nname = "carrier"\nallow = ["127.0.0.1/32"]\n'
NO_MODELS = '[models]\nload = "never"\n'
# calls the fuzzer opens and cannot end are hung up by the cell after 5 s without RTP
QUICK_RTP_TIMEOUT = "[sip]\nrtp_timeout = 5\n"
REPORT_ENV = "FUZZ_REPORT"          # a JSON-lines file the tests append their figures to


def options_probe(dest: tuple[str, int], src_ip: str = TRUSTED, timeout: float = 5.0, user: str = "",
                  transport: str = "UDP") -> str | None:
    """One OPTIONS from ``src_ip`` (retransmitted each second over UDP): None when any
    response came back within ``timeout``, else why not."""
    call_id = "%x@probe" % random.getrandbits(64)
    kind = socket.SOCK_DGRAM if transport == "UDP" else socket.SOCK_STREAM
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.bind((src_ip, 0))
        port = s.getsockname()[1]
        target = f"{user}@{dest[0]}:{dest[1]}" if user else f"{dest[0]}:{dest[1]}"
        msg = (f"OPTIONS sip:{target} SIP/2.0\r\n"
               f"Via: SIP/2.0/{transport} {src_ip}:{port};branch=z9hG4bK{random.getrandbits(48):x};rport\r\n"
               f"Max-Forwards: 70\r\nFrom: <sip:probe@{src_ip}:{port}>;tag={random.getrandbits(32):x}\r\n"
               f"To: <sip:{target}>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n"
               f"Contact: <sip:probe@{src_ip}:{port}>\r\nContent-Length: 0\r\n\r\n").encode()
        end = time.monotonic() + timeout
        if transport == "TCP":
            s.settimeout(timeout)
            try:
                s.connect(dest)
                s.sendall(msg)
            except OSError as exc:
                return f"OPTIONS over TCP to {dest}: {exc}"
        resend = 0.0
        buf = b""
        while time.monotonic() < end:
            if transport == "UDP" and time.monotonic() >= resend:
                s.sendto(msg, dest)
                resend = time.monotonic() + 1.0
            s.settimeout(max(0.01, min(resend if transport == "UDP" else end, end) - time.monotonic()))
            try:
                data = s.recv(65535)
            except (socket.timeout, ConnectionRefusedError):
                continue
            except OSError as exc:
                return f"OPTIONS to {dest}: {exc}"
            if transport == "TCP" and not data:
                return f"OPTIONS over TCP to {dest}: connection closed without an answer"
            buf += data
            if status_of(buf) is not None and header(buf, "call-id", "i") == call_id:
                return None
        return f"no answer to an OPTIONS from {src_ip} to {dest[0]}:{dest[1]} within {timeout:.0f}s"
    finally:
        s.close()


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:   # a zombie is dead
        return open(f"/proc/{pid}/status").read().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class CellTarget:
    """A single cell (echo app) trusting 127.0.0.1 only."""
    cell: CellProcess
    kind: str = "cell"

    @classmethod
    def start(cls, tmp: Path, extra: str = "") -> "CellTarget":
        return cls(CellProcess(tmp, QUICK_RTP_TIMEOUT + TRUNK + extra, ("--app", "echo")).start())

    @property
    def sip(self) -> tuple[str, int]:
        return ("127.0.0.1", self.cell.ports["sip"])

    def oracle(self, probe_timeout: float = 5.0, probe_ip: str = TRUSTED) -> Oracle:
        """``probe_ip``: a source the trunk allow-list trusts (it gets answers)."""
        c = self.cell

        def alive():
            if not c.alive():
                return f"cell exited with {c.proc.returncode}; log tail:\n" + c.log_path.read_text(errors="replace")[-2500:]
            return None

        def probe():
            why = options_probe(self.sip, src_ip=probe_ip, timeout=probe_timeout)
            if why:
                return why
            try:
                st = c.http_get("/healthz")[0]
            except OSError as exc:
                return f"/healthz: {exc}"
            return None if st == 200 else f"/healthz answered {st}"
        return Oracle(alive, probe, lambda: {"cell": c.proc.pid})

    def open_calls(self) -> list[dict]:
        return open_calls(self.cell.events())

    def active_calls(self) -> float:
        return self.cell.metrics().get("trunkline_calls_active", 0.0)

    def call_works(self, tmp: Path, local_ip: str = TRUSTED) -> str | None:
        res = sipp("call_pcmu.xml", f"127.0.0.1:{self.sip[1]}", tmp, "-d", "300",
                   local_port=self.cell.ports["sipp"], local_ip=local_ip, timeout=20)
        return None if res.returncode == 0 else res.stdout.decode(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.cell.alive():
            self.cell.proc.kill()
            self.cell.proc.wait(5)


@dataclass
class BoxTarget:
    """``trunkline serve --cells N``: the real Kamailio front (on ports['sip']) and its cells."""
    box: BoxProcess
    kind: str = "front"

    @classmethod
    def start(cls, tmp: Path, cells: int = 2, extra: str = "", config: str | None = None) -> "BoxTarget":
        """``--cells 2`` at least: with one cell ``serve`` runs it alone, without a front."""
        b = BoxProcess(tmp, cells, config if config is not None else NO_MODELS + QUICK_RTP_TIMEOUT + TRUNK + extra)
        b.start()
        t = cls(b)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(t.started("cell_started")) < cells or t.kamailio_pid() is None):
            time.sleep(0.1)
        t.initial = {"cells": {e["cell"]: e["pid"] for e in t.started("cell_started")},
                     "kamailio": t.kamailio_pid(), "fronts": len(t.started("front_started"))}
        return t

    def started(self, name: str) -> list[dict]:
        return self.box.events(name)

    def kamailio_pid(self) -> int | None:
        return read_pid(self.box.run_dir / "kamailio.pid")

    @property
    def sip(self) -> tuple[str, int]:
        return ("127.0.0.1", self.box.ports["sip"])

    def cell_sip(self, i: int = 0) -> tuple[str, int]:
        return ("127.0.0.1", self.box.ports["sip"] + 100 + i)

    def oracle(self, probe_timeout: float = 5.0, probe_ip: str = TRUSTED) -> Oracle:
        b = self.box

        def alive():
            if not b.alive():
                return f"box exited with {b.proc.returncode}:\n" + b.log_path.read_text(errors="replace")[-2500:]
            died = b.events("cell_died")
            if died:
                return f"a cell died: {json.dumps(died[-1])}"
            if len(self.started("front_started")) != self.initial["fronts"] or not pid_alive(self.initial["kamailio"]):
                tail = (b.run_dir / "kamailio.log").read_text(errors="replace")[-2500:]
                return f"kamailio (pid {self.initial['kamailio']}) died or was restarted; kamailio.log tail:\n{tail}"
            for i, pid in self.initial["cells"].items():
                if not pid_alive(pid):
                    return f"cell {i} (pid {pid}) is gone"
            return None

        def probe():
            for dest, what in [(self.sip, "front")] + [(self.cell_sip(i), f"cell{i}") for i in self.initial["cells"]]:
                why = options_probe(dest, src_ip=probe_ip, timeout=probe_timeout)
                if why:
                    return f"{what}: {why}"
            try:
                st = b.http_get("/healthz")[0]
            except OSError as exc:
                return f"/healthz: {exc}"
            return None if st == 200 else f"box /healthz answered {st}"

        def pids():
            out = {f"cell{i}": pid for i, pid in self.initial["cells"].items()}
            if self.initial["kamailio"]:
                out["kamailio"] = self.initial["kamailio"]
            return out
        return Oracle(alive, probe, pids)

    def open_calls(self) -> list[dict]:
        out = []
        for i in self.initial["cells"]:
            path = self.box.run_dir / f"cell{i}.log"
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            out += open_calls([json.loads(x) for x in lines if x.startswith("{")])
        return out

    def active_calls(self) -> float:
        total = 0.0
        for i in self.initial["cells"]:
            port = self.box.ports["sip"] + 100 + self.box.n + i        # the cells' http_base + i
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("trunkline_calls_active "):
                        total += float(line.split()[1])
        return total

    def call_works(self, tmp: Path, local_ip: str = TRUSTED) -> str | None:
        res = sipp("call_pcmu.xml", f"127.0.0.1:{self.sip[1]}", tmp, "-d", "300",
                   local_port=self.box.ports["sipp"], local_ip=local_ip, timeout=20)
        return None if res.returncode == 0 else res.stdout.decode(errors="replace")[-2000:]

    def stop(self) -> None:
        b = self.box
        if b.alive():
            b.proc.terminate()
            try:
                b.proc.wait(30)
            except Exception:  # noqa: BLE001
                b.proc.kill()
        for pid in procs_with(str(b.data)):          # nothing may outlive the test
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def open_calls(events: list[dict]) -> list[dict]:
    """call_offered events with no call_ended (by call_id): calls still holding a slot."""
    ended = {e.get("call_id") for e in events if e.get("event") == "call_ended"}
    return [e for e in events if e.get("event") == "call_offered" and e.get("call_id") not in ended]


def wait_idle(target, timeout: float) -> str | None:
    """Wait until ``target`` holds no call (trunkline_calls_active is 0); None when it
    does, else what is still open (the metric and the call_offered with no call_ended)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            active = target.active_calls()
        except OSError as exc:          # a cell that cannot serve /metrics within 5 s is hung
            return f"hang: a cell's /metrics did not answer ({exc})"
        if not active:
            return None
        if time.monotonic() > deadline:
            left = target.open_calls()
            return (f"trunkline_calls_active = {active:g}; offered and never ended in the log: "
                    + ("; ".join(f"{e.get('call_id')} from {e.get('source')} to {e.get('to')}" for e in left)
                       or "none"))
        time.sleep(0.25)


def procs_with(needle: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd:
                out.append(int(pid))
    return out


def vm_rss_of(oracle: Oracle) -> dict[str, int | None]:
    """VmRSS (kB) of the target's processes (cell, cells, kamailio)."""
    return {name: vm_rss_kb(pid) for name, pid in oracle.pids().items()}


def report(record: dict) -> None:
    """Append one figure record (what was sent, how much, what happened) to $FUZZ_REPORT."""
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
