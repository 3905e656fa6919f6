"""An idle cell sleeps: the SIP engine blocks in ``libHandleEvents`` while there is no call and a
command wakes it at once (a CRLFCRLF keep-alive to its own UDP socket); the bridge clock stops
without calls and comes back for the next one. Behaviour only (CPU figures: tests/bench/box.py)."""
import json
import os
import socket
import subprocess
import sys
import time

from support import ROOT, Api, RtpPeer, create_key, next_ports, sipp

# The engine in its own process (one pjsua2 library per process), its idle wait made 8 s so that a
# command that does not wake it shows as seconds, not as a flaky few hundred milliseconds.
ENGINE = r"""
import json, os, socket, sys, time
from sip import commands as cmd, engine as engine_mod
from sip.engine import Engine, EngineConfig
engine_mod.IDLE_POLL_MS = 8000
sip_port, rtp, peer_port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
peer.bind(("127.0.0.1", peer_port))
peer.settimeout(10)
events = []
e = Engine(EngineConfig(host="127.0.0.1", port=sip_port, rtp_low=rtp, rtp_high=rtp + 20, tcp=False,
                        allowed_destinations=("sip:*@127.0.0.1:*",)), events.append)
e.start()
def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
time.sleep(2.0)                                  # the bridge clock's idle stop (1 s) is done
out = {"threads_idle": threads(), "command_s": []}
for _ in range(3):
    time.sleep(0.5)                              # the engine is back in its (8 s) idle wait
    t = time.monotonic()
    e.submit(cmd.SetDraining(False)).result(20)
    out["command_s"].append(time.monotonic() - t)
time.sleep(0.5)
t = time.monotonic()                             # an API-originated call: the INVITE leaves at once
call_id = e.submit(cmd.MakeCall(f"sip:peer@127.0.0.1:{peer_port}")).result(20)
data, addr = peer.recvfrom(65535)
out["invite_s"] = time.monotonic() - t
out["invite"] = data.split(b" ", 1)[0].decode()
head = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
keep = [h for h in head[1:] if h.split(":", 1)[0].lower() in ("via", "from", "call-id", "cseq", "to")]
busy = "SIP/2.0 486 Busy Here\r\n" + "\r\n".join(h + (";tag=idle1" if h.lower().startswith("to:") else "")
                                                 for h in keep) + "\r\nContent-Length: 0\r\n\r\n"
peer.sendto(busy.encode(), addr)
deadline = time.monotonic() + 10
while time.monotonic() < deadline and not any(type(x).__name__ == "CallEnded" for x in events):
    time.sleep(0.05)
out["ended"] = [x.reason for x in events if type(x).__name__ == "CallEnded"]
out["wakes"] = e.wakes
out["guard"] = [e.guard_state, e.guard.dropped]
e.stop()
print("RESULT " + json.dumps(out))
"""


def test_a_command_wakes_the_idle_engine_at_once(tmp_path):
    p = next_ports()
    r = subprocess.run([sys.executable, "-c", ENGINE, str(p["sip"]), str(p["rtp_lo"]), str(p["rtp_peer"])],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(line[0][7:])
    # no bridge clock while idle (pjmedia's RTP worker, "media", stays: see sip/engine.py)
    assert "clock" not in out["threads_idle"], out
    # each command took effect in well under the idle wait (8 s): the keep-alive woke the engine
    assert max(out["command_s"]) < 1.0, out
    assert out["invite"] == "INVITE" and out["invite_s"] < 1.0, out
    assert out["ended"] == ["failed 486"], out
    assert out["wakes"] >= 4, out
    # the keep-alives are not requests: the source guard neither saw nor counted them
    assert out["guard"] == ["on", 0], out


def _threads(pid: int) -> list[str]:
    names = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(open(f"/proc/{pid}/task/{t}/comm").read().strip())
        except OSError:
            pass
    return names


def test_the_bridge_clock_runs_only_while_a_call_has_audio(cell_factory, tmp_path):
    """An idle echo cell has no clock thread; a call starts it (and its audio flows at 50
    frames/s), and it stops again shortly after the call ends."""
    cell = cell_factory('[models]\nload = "never"\n', ("--app", "echo"))
    deadline = time.monotonic() + 10
    while "clock" in _threads(cell.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "clock" not in _threads(cell.proc.pid)
    peer = RtpPeer(cell.ports["rtp_peer"])
    try:
        proc = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "2000", local_port=cell.ports["sipp"],
                    rtpport=cell.ports["rtp_peer"], background=True)
        peer.wait_remote()
        assert "clock" in _threads(cell.proc.pid)
        peer.stream([b"\xff" * 160] * 60)
        peer.collect(0.3)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()[-2000:]
    finally:
        peer.close()
    ended = cell.wait_event("call_ended")[0]
    assert ended["result"] == "answered" and 49.0 <= ended["frame_rate"] <= 51.0, ended
    deadline = time.monotonic() + 10
    while "clock" in _threads(cell.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "clock" not in _threads(cell.proc.pid)
    assert cell.http_get("/healthz")[0] == 200


def _busy(invite: bytes) -> bytes:
    """A 486 for ``invite`` (its Via, From, To with a tag, Call-ID, CSeq)."""
    head = invite.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]
    keep = [h + (";tag=idle" if h.lower().startswith(("to:", "t:")) else "") for h in head
            if h.split(":", 1)[0].strip().lower() in ("via", "v", "from", "f", "to", "t", "call-id", "i", "cseq")]
    return ("SIP/2.0 486 Busy Here\r\n" + "\r\n".join(keep) + "\r\nContent-Length: 0\r\n\r\n").encode()


def test_api_calls_from_an_idle_cell_leave_at_once(cell_factory):
    """End to end: POST /v1/calls on an idle cell, three times; each INVITE reaches the callee
    well within the engine's idle wait (IDLE_POLL_MS, 1 s), so the command woke it."""
    port = next_ports()["sip"]
    callee = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    callee.bind(("127.0.0.1", port))
    try:
        cell = cell_factory(f'[models]\nload = "never"\n[sip]\nallowed_destinations = ["sip:*@127.0.0.1:{port}"]\n',
                            ("--app", "echo"))
        api = Api(cell, create_key(cell.data, "control"))
        delays = []
        for n in range(3):
            time.sleep(1.5 if n == 0 else 0.6)          # idle: the engine blocks in libHandleEvents
            t = time.monotonic()
            status, body, _ = api.post("/v1/calls", {"to": f"sip:idle{n}@127.0.0.1:{port}"})
            assert status in (200, 201, 202), body
            callee.settimeout(10)
            while True:
                data, addr = callee.recvfrom(65535)
                if data.startswith(b"INVITE "):
                    break
            delays.append(time.monotonic() - t)
            callee.sendto(_busy(data), addr)
            cell.wait_event("call_ended", n + 1, timeout=10)
        assert max(delays) < 0.4, delays
    finally:
        callee.close()


def _ppid(pid: int) -> int:
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])


def _private_dirty_mb(pid: int) -> float:
    text = open(f"/proc/{pid}/smaps_rollup").read()
    return int(text.split("Private_Dirty:")[1].split()[0]) / 1024


def test_box_cells_are_forked_from_the_preimported_zygote(tmp_path):
    """In a box the cells are forked from one process that has everything imported (the zygote,
    the supervisor's child): each idle cell's own memory is what it changed since (~15 MB), not
    a whole interpreter's imports (~42 MB when started with exec)."""
    from support import BoxProcess
    b = BoxProcess(tmp_path, 2, '[models]\nload = "never"\n')
    b.start()
    try:
        cells = Api(b, create_key(b.data, "read")).get("/v1/cells")[1]["cells"]
        pids = [c["pid"] for c in cells]
        assert len(pids) == 2 and all(c["alive"] for c in cells), cells
        zygotes = {_ppid(p) for p in pids}
        assert len(zygotes) == 1 and b.proc.pid not in zygotes and _ppid(zygotes.pop()) == b.proc.pid
        time.sleep(2)                                   # idle: the bridge clocks have stopped
        for c in cells:                                 # named for ps/top (cmdline is the supervisor's)
            assert open(f"/proc/{c['pid']}/comm").read().strip() == f"tl-cell{c['index']}"
        for p in pids:
            assert "clock" not in _threads(p)
            assert _private_dirty_mb(p) < 30, (p, _private_dirty_mb(p))
        # nothing of the supervisor's open files reaches a cell (its event loop's epoll and
        # self-pipe were inherited through the zygote): the cell has its own, or /dev/null
        sup = set(_fd_targets(b.proc.pid).values()) - {"/dev/null"}
        for p in pids:
            leaked = {fd: t for fd, t in _fd_targets(p).items() if t in sup and fd > 2 and
                      (t.startswith("socket:") or t.startswith("pipe:"))}
            assert not leaked, (p, leaked)
    finally:
        assert b.stop() == 0


def _fd_targets(pid: int) -> dict[int, str]:
    """fd -> what it points at (sockets and pipes carry their own inode: shared means the same one)."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
    return out


ZYGOTE = r"""
import json, os, sys, tempfile
from bridge.box.zygote import Zygote
z = Zygote.start()
d = tempfile.mkdtemp()
quick = z.spawn(["--version"], dict(os.environ), f"{d}/a.log", os.getcwd())      # exits at once
bad = z.spawn(["serve", "--no-such-flag"], dict(os.environ), f"{d}/b.log", os.getcwd())
codes = [quick.wait(30), bad.wait(30)]
z.close()
print("RESULT " + json.dumps({"codes": codes, "a": open(f"{d}/a.log").read(), "b": open(f"{d}/b.log").read(),
                              "zygote_alive": z.alive()}))
"""


def test_the_zygote_reports_how_its_cells_exit(tmp_path):
    """Cells that exit at once (before the supervisor even sees their pid) still report their exit
    code; their output goes to their own log; the zygote goes when the supervisor closes it."""
    r = subprocess.run([sys.executable, "-c", ZYGOTE], cwd=ROOT, capture_output=True, text=True, timeout=90)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(line[0][7:])
    assert out["codes"] == [0, 2], out
    assert out["a"].startswith("trunkline ") and "--no-such-flag" in out["b"], out
    assert out["zygote_alive"] is False
