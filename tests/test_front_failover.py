"""The front's failover (deploy/kamailio/kamailio.cfg.tmpl, failure_route[FAILOVER]): a call whose
cell does not answer (timeout) or is full (503) goes to the next cell, not back to the caller.

With dispatcher algorithm 10 (call load) ``ds_next_dst()`` moves the call's load entry to the next
cell (``ds_load_replace``, by Call-ID); the route used to remove that entry first
(``ds_load_unset()``), so ``ds_next_dst()`` failed ("cannot update load distribution") and every
such call got 503 (issue 14's soak: after a stopped cell or a front restart)."""
import os
import re
import signal
import time

import pytest

from support import Api, BoxProcess, create_key, sipp


@pytest.fixture
def box(tmp_path):
    made = []

    def make(cells: int) -> BoxProcess:
        b = BoxProcess(tmp_path, cells, '[models]\nload = "never"\n[sip]\nrtp_timeout = 0\n')
        made.append(b)
        b.start()
        return b
    yield make
    for b in made:
        # the stopped cell answers the timed-out INVITE once it runs again; that call is never
        # ACKed and would hold a graceful stop for ~32 s: the box is killed, and what it leaves
        # (its zygote and cells, found by the test's own data directory) after 3 s
        if b.alive():
            b.proc.kill()
            b.proc.wait(10)
        deadline = time.monotonic() + 3
        while _procs_with(str(b.data)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in _procs_with(str(b.data)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _procs_with(needle: str) -> list[int]:
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


def _stats(out: str) -> tuple[int, int]:
    ok = int(re.search(r"Successful call\s+\|\s+\d+\s+\|\s+(\d+)", out).group(1))
    failed = int(re.search(r"Failed call\s+\|\s+\d+\s+\|\s+(\d+)", out).group(1))
    return ok, failed


def test_a_call_to_a_stopped_cell_fails_over_to_the_next(box, tmp_path):
    """Cell 0 is stopped (SIGSTOP) just before two calls: least-loaded sends one of them to it;
    its branch times out (fr_timer) and the front must try cell 1, which takes both."""
    b = box(2)
    api = Api(b, create_key(b.data, "read"))
    pid = next(c["pid"] for c in api.get("/v1/cells")[1]["cells"] if c["index"] == 0)
    time.sleep(2.5)                                  # both cells answered their OPTIONS pings
    os.kill(pid, signal.SIGSTOP)
    try:
        res = sipp("builtin:uac", b.sip, tmp_path, "-d", "500", "-l", "2", "-r", "50",
                   local_port=b.ports["sipp"], calls=2, timeout=30)
    finally:
        os.kill(pid, signal.SIGCONT)
    out = res.stdout.decode(errors="replace")
    assert _stats(out) == (2, 0), out[-2500:]
    ended = b.wait_cell_events(1, "call_ended", 2)
    assert len(ended) == 2 and all(e["reason"] == "remote bye" for e in ended), ended
    log = (b.run_dir / "kamailio.log").read_text(errors="replace")
    assert "cannot update load distribution" not in log, log[-2000:]
