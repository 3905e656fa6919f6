"""Real peers for the tests: a cell subprocess, SIPp, and a tiny RTP endpoint."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "sipp-scenarios"
SHARED = Path(os.environ.get("TRUNKLINE_SHARED", ROOT.parent / "shared"))


def needs_shared(*relative: str):
    """A pytest skip mark for tests that read reference data in ``../shared`` (not in the repo):
    CI has it; a fresh clone may not, and then the tests skip with this reason."""
    import pytest
    missing = [r for r in relative if not (SHARED / r).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"reference data not found under {SHARED}: {', '.join(missing)} "
                              "(../shared is absent; set TRUNKLINE_SHARED to point at it)")

# Test ports stay below the kernel's ephemeral range (32768+), so a listener never
# collides with the source port of some outgoing connection: 550 blocks of 40 ports from 10000.
# TEST_PORT_BLOCK pins the first block, so two suites on one machine can be kept apart (unset, a
# suite starts at one of 4 places, from its pid or its pytest-xdist run id). Under pytest-xdist
# (`make test` runs `-n 2`) each worker (gw0, gw1, ...) hands out only its own share of the blocks
# and cycles inside it, and a run of blocks (``next_ports(blocks=k)``, a box) never crosses the end
# of the share, so two workers never hand out the same ports.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
_index = int(_worker[2:]) if _worker[2:].isdigit() else None
_workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)) if _index is not None else 1
_seed = zlib.crc32(os.environ.get("PYTEST_XDIST_TESTRUNUID", "").encode()) if _index is not None else os.getpid()
_first = int(os.environ.get("TEST_PORT_BLOCK", (_seed % 4) * 125))
_share = 550 // _workers
_own = (_index or 0) * _share
_pos = 0                                  # the next block, counted inside this process's share


def reset_ports() -> None:
    """Hand out the same ports again from the first block (a benchmark that reuses them per size)."""
    global _pos
    _pos = 0


def _take(blocks: int) -> int:
    global _pos
    if not 1 <= blocks <= _share:
        raise ValueError(f"{blocks} port blocks do not fit in a share of {_share}")
    if _pos % _share + blocks > _share:   # would cross the end of the share: start it again
        _pos += _share - _pos % _share
    p = _pos % _share
    _pos += blocks
    return 10000 + ((_first + _own + p) % 550) * 40


def next_ports(blocks: int = 1) -> dict:
    """A fresh block of ports per cell so tests never trip over each other; ``blocks`` 40-port
    blocks in a row for a process that uses more (a box: its cells' ports follow its own)."""
    base = _take(blocks)
    return {"sip": base, "http": base + 1, "sipp": base + 2, "rtp_peer": base + 4,
            "rtp_lo": base + 10, "rtp_hi": base + 38}


def wait_until(what, timeout: float, message: str, step: float = 0.1):
    """``what()``'s first truthy value within ``timeout`` s, else AssertionError(``message``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        time.sleep(step)
    raise AssertionError(message)


def build_clockstep(tmp: Path) -> Path:
    """``tests/clockstep.c`` built into ``tmp``: LD_PRELOAD it with CLOCKSTEP_FILE naming a file of
    one int64 (nanoseconds) to step a process tree's wall clock (``step_clock``)."""
    out = tmp / "clockstep.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(out), str(ROOT / "tests" / "clockstep.c"), "-ldl"],
                   check=True, capture_output=True, timeout=60)
    return out


def step_clock(path: Path, seconds: float) -> None:
    """Set the wall-clock offset of the processes that preloaded ``clockstep.so`` with ``path``."""
    with open(path, "wb" if not path.exists() else "r+b") as f:
        f.write(struct.pack("<q", int(seconds * 1e9)))


class CellProcess:
    def __init__(self, tmp: Path, config: str = "", args: tuple = (), env: dict | None = None, blocks: int = 1):
        self.ports = next_ports(blocks)
        self.tmp = tmp
        self.data = tmp / "data"
        self.log_path = tmp / f"cell-{self.ports['sip']}.log"
        self.config_path = tmp / f"cell-{self.ports['sip']}.toml"
        self.config_path.write_text(config)
        self.cmd = [sys.executable, "-m", "bridge.cli", "serve", "--config", str(self.config_path),
                    "--sip", f"127.0.0.1:{self.ports['sip']}", "--http", f"127.0.0.1:{self.ports['http']}",
                    "--rtp-ports", f"{self.ports['rtp_lo']}-{self.ports['rtp_hi']}",
                    "--data-dir", str(self.data), *args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "CellProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cell exited {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if self.http_get("/healthz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("cell did not become healthy:\n" + self.log_path.read_text())

    @property
    def sip(self) -> str:
        return f"127.0.0.1:{self.ports['sip']}"

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in self.http_get("/metrics")[1].splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if name is None or e.get("event") == name:
                    out.append(e)
        return out

    def wait_event(self, name: str, count: int = 1, timeout: float = 15.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.events(name)
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise AssertionError(f"waited {timeout}s for {count} x {name}; log:\n" + self.log_path.read_text()[-4000:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError("cell did not stop on SIGTERM:\n" + self.log_path.read_text()[-3000:])
        self._log.close()
        return self.proc.returncode


def sipp(scenario: str, target: str, tmp: Path, *args: str, local_port: int, rtpport: int = 0,
         calls: int = 1, timeout: float = 30.0, background: bool = False, local_ip: str = "127.0.0.1"):
    """Run SIPp (``sip-tester``) with one of our scenarios (or a built-in/-sf path)."""
    if scenario.startswith("builtin:"):
        sc = ["-sn", scenario.split(":", 1)[1]]
    else:
        path = Path(scenario) if os.path.isabs(scenario) else SCENARIOS / scenario
        sc = ["-sf", str(path)]
    cmd = ["sipp", *sc, target, "-i", local_ip, "-p", str(local_port), "-m", str(calls),
           "-timeout", f"{int(timeout)}s", "-timeout_error", "-nostdin", "-trace_err", "-trace_logs",
           "-trace_msg", *args]
    if not scenario.startswith("builtin:") and "$rtpport" in Path(sc[1]).read_text():
        cmd += ["-set", "rtpport", str(rtpport or 9)]
    if background:
        return subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=timeout + 15)


def sipp_file(tmp: Path, suffix: str) -> str:
    """Concatenated contents of SIPp's trace files ending in ``suffix`` in ``tmp``."""
    return "".join(p.read_text(errors="replace") for p in sorted(tmp.glob(f"*{suffix}")))


class RtpPeer:
    """Our own RTP endpoint: learns the cell's address from its first packet."""

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.settimeout(0.02)
        self.remote = None
        self.received: list[tuple[float, int, int, bytes]] = []   # (t, pt, seq, payload)
        self.seq = random.randint(0, 1000)
        self.ts = random.randint(0, 1 << 20)
        self.ssrc = random.getrandbits(32)

    def _recv_once(self) -> bool:
        try:
            data, addr = self.sock.recvfrom(2048)
        except (socket.timeout, BlockingIOError, ConnectionRefusedError):
            return False
        if len(data) >= 12 and data[0] >> 6 == 2:
            self.remote = self.remote or addr
            pt = data[1] & 0x7F
            seq = struct.unpack("!H", data[2:4])[0]
            self.received.append((time.monotonic(), pt, seq, data[12:]))
        return True

    def wait_remote(self, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while self.remote is None and time.monotonic() < deadline:
            self._recv_once()
        if self.remote is None:
            raise AssertionError("no RTP from the cell")
        return self.remote

    def send(self, payload: bytes, pt: int = 0, marker: bool = False, ts_step: int = 160, raw: bytes | None = None):
        pkt = raw if raw is not None else struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt,
                                                      self.seq & 0xFFFF, self.ts & 0xFFFFFFFF, self.ssrc) + payload
        self.sock.sendto(pkt, self.remote)
        self.seq += 1
        self.ts += ts_step

    def stream(self, payloads: list[bytes], pt: int = 0, ptime: float = 0.020):
        """Send payloads paced in real time while collecting what comes back."""
        start = time.monotonic()
        for i, p in enumerate(payloads):
            self.send(p, pt, marker=(i == 0))
            while time.monotonic() < start + (i + 1) * ptime:
                self._recv_once()

    def collect(self, seconds: float):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._recv_once()

    def close(self):
        self.sock.close()


def create_key(data_dir, scope: str = "control", name: str = "test") -> str:
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "keys", "create", "--scope", scope, "--name", name,
                        "--data-dir", str(data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


class Api:
    """A plain HTTP client for the cell's /v1 API."""

    def __init__(self, cell: "CellProcess", key: str | None):
        self.base = f"http://127.0.0.1:{cell.ports['http']}"
        self.key = key

    def call(self, method: str, path: str, body=None, raw: bytes | None = None, headers: dict | None = None,
             key: str | None = None):
        h = {"Content-Type": "application/json", **(headers or {})}
        k = key if key is not None else self.key
        if k:
            h["Authorization"] = f"Bearer {k}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                return r.status, json.loads(r.read() or b"null"), dict(r.headers)
        except urllib.error.HTTPError as e:
            text = e.read()
            return e.code, json.loads(text) if text else None, dict(e.headers)

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.call("POST", path, body if body is not None else {}, **kw)


class BoxProcess(CellProcess):
    """``trunkline serve --cells N``: N cells behind Kamailio, one API."""

    def __init__(self, tmp: Path, cells: int, config: str = "", args: tuple = (), cells_extra: str = ""):
        # its cells' SIP/HTTP/RTP ports follow the box's own: enough 40-port blocks in a row to ourselves
        super().__init__(tmp, config, ("--cells", str(cells), "--app", "echo", *args),
                         blocks=1 + (100 + 22 * cells) // 40 + 1)
        base = self.ports["sip"]
        self.n = cells
        rtp = base + 100 + 2 * cells + (base + 100 + 2 * cells) % 2
        self.config_path.write_text(config + f"\n[cells]\nsip_base = {base + 100}\nhttp_base = {base + 100 + cells}\n"
                                    + cells_extra)
        self.cmd[self.cmd.index("--rtp-ports") + 1] = f"{rtp}-{rtp + 20 * cells - 1}"

    @property
    def run_dir(self) -> Path:
        return self.data / "run"

    def cell_events(self, index: int, name: str) -> list[dict]:
        out = []
        path = self.run_dir / f"cell{index}.log"
        if not path.exists():
            return out
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"event": "{name}"' in line:
                out.append(json.loads(line))
        return out

    def wait_cell_events(self, index: int, name: str, count: int, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.cell_events(index, name)
            if len(got) >= count:
                return got
            time.sleep(0.05)
        return self.cell_events(index, name)


def serve_on_loopback(app_factory) -> tuple[int, asyncio.AbstractEventLoop]:
    """Run an aiohttp app (built by ``app_factory()`` inside its loop) on a free 127.0.0.1
    port in a daemon thread; returns the port and the loop (stop it with ``loop.stop``)."""
    from aiohttp import web
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(app_factory())
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
    threading.Thread(target=run, daemon=True).start()
    if not ready.wait(10):
        raise RuntimeError("loopback server did not start")
    return port, loop
