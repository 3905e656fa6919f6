"""Nothing leaves the box: a full agent call inside a network namespace that has only loopback.

The outer test starts ``pytest`` again inside ``unshare -n`` (a new network namespace: only ``lo``,
brought up, no route anywhere else) to run the inner test there. The inner test runs a real cell with
the bundled models (whisper, llama.cpp, Piper) and the agent app, its tools pointed at the loopback
billing API (tests/billing.py) and a webhook to a loopback receiver, and a SIPp caller speaking real
(synthesized) speech: the call is answered, the agent greets and replies (whisper hears it), the tool is
called, the webhooks arrive. The cell runs under ``strace -f`` (connect/sendto/sendmsg, the cell and
its inference process and every thread): every address it sent to or connected to is loopback or a
local socket, it made no DNS lookup (nothing to port 53) and no attempt failed for want of a route
(ENETUNREACH). Before that, the same check is shown to catch a process that does try to leave.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import ROOT, SCENARIOS, Api, CellProcess, create_key, serve_on_loopback

INNER = "TL_OFFLINE_INNER"            # set only for the run inside the namespace
REPORT = "TL_OFFLINE_REPORT"
CALLER_ID = "+15551230001"
TRACED = "trace=connect,sendto,sendmsg,sendmmsg"
# pjlib's pj_getipinterface() learns a source address by connect()ing a UDP socket to a host's port 53
# and reading the socket's name: a route lookup in the kernel that sends no packet. At start
# (pjsua_create -> pj_gethostip) the host is 1.1.1.1 (IPv6: 2001:4860:4860::8888); for a call, the
# peer (loopback here). Those connects are counted apart; anything *sent* to them (or anywhere
# outside), and any other connect outside, still fails the test.
ROUTE_PROBES = {("1.1.1.1", 53), ("2001:4860:4860::8888", 53)}

_ADDR = re.compile(r'(connect|sendto|sendmsg|sendmmsg)\((\d+), .*?(sa_family=AF_\w+)(.*?)(?:\}, \d+\)|\},|\) =)')
_IP4 = re.compile(r'sin_port=htons\((\d+)\), sin_addr=inet_addr\("([0-9.]+)"\)')
_IP6 = re.compile(r'sin6_port=htons\((\d+)\).*?inet_pton\(AF_INET6, "([0-9a-fA-F:.]+)"')


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::") or ip.startswith("::ffff:127.") or ip == "0.0.0.0"


def scan_trace(text: str) -> dict:
    """Every address an strace log (``-ff``: one file per thread, no interleaved lines) shows being
    connected or sent to: how many, which are loopback, which are not, DNS (port 53) and failures for
    want of a route."""
    out = {"calls": 0, "inet": 0, "local": 0, "outside": [], "dns": [], "unreachable": 0, "route_probes": 0}
    for line in text.splitlines():
        m = _ADDR.search(line)
        if not m:
            continue
        hit = _IP4.search(line) or _IP6.search(line)
        if m.group(1) == "connect" and hit and (hit.group(2), int(hit.group(1))) in ROUTE_PROBES:
            out["route_probes"] += 1
            continue
        if "ENETUNREACH" in line or "EHOSTUNREACH" in line:
            out["unreachable"] += 1
        out["calls"] += 1
        family, rest = m.group(3).split("=", 1)[1], line[m.start(3):]
        if family in ("AF_UNIX", "AF_NETLINK", "AF_UNSPEC"):
            out["local"] += 1
            continue
        hit = _IP4.search(rest) or _IP6.search(rest)
        if hit is None:
            out["outside"].append(line.strip()[:200])      # an address family we cannot vouch for
            continue
        port, ip = int(hit.group(1)), hit.group(2)
        out["inet"] += 1
        if not _loopback(ip):
            out["outside"].append(line.strip()[:200])
        if port == 53 and (m.group(1) != "connect" or not _loopback(ip)):
            out["dns"].append(line.strip()[:200])
    return out


def _tools_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace (unshare -n)"
    for tool in ("unshare", "ip", "strace", "sipp"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _in_namespace(*argv: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv],
                          cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.sample
def test_a_full_agent_call_needs_nothing_but_loopback(tmp_path):
    why = _tools_available()
    if why:
        pytest.skip(why)
    # The check can fail: a process in the namespace that tries to reach an outside address is caught.
    probe = tmp_path / "probe.trace"
    r = _in_namespace("strace", "-ff", "-qq", "-e", TRACED, "-e", "signal=none", "-o", str(probe), sys.executable,
                      "-c", "import socket\ns = socket.socket()\ntry:\n    s.connect(('192.0.2.10', 443))\n"
                            "except OSError as e:\n    print(e.errno)")
    assert r.returncode == 0, r.stderr
    caught = scan_trace(_read_traces(probe))
    assert caught["outside"] and caught["unreachable"] == 1, caught

    report = tmp_path / "report.json"
    started = time.monotonic()
    r = _in_namespace(sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                      "--basetemp", str(tmp_path / "inner"), f"{__file__}::test_inner_call_in_namespace",
                      env={INNER: "1", REPORT: str(report), "PYTHONPATH": str(ROOT)}, timeout=240)
    took = time.monotonic() - started
    errors = "\n".join(line for line in r.stdout.splitlines() if line.startswith(("E ", ">")))
    assert r.returncode == 0 and "1 passed" in r.stdout, (errors[-4000:] or r.stdout[-4000:], r.stderr[-2000:])
    got = json.loads(report.read_text())
    assert got["interfaces"] == ["lo"] and got["no_route"] is True
    trace = got["trace"]
    assert trace["inet"] > 100                # RTP, SIP, the API, the billing API, webhooks: all seen ...
    assert trace["outside"] == [] and trace["dns"] == [] and trace["unreachable"] == 0, trace
    assert got["log_unreachable"] == 0
    print(f"offline call: {took:.1f}s in the namespace; {trace['calls']} traced sends/connects, "
          f"{trace['inet']} to loopback addresses, {trace['local']} on local sockets, none outside")


def _trace_cmd(cell: CellProcess, path: Path) -> None:
    cell.cmd = ["strace", "-ff", "-qq", "--seccomp-bpf", "-e", TRACED, "-e", "signal=none", "-o", str(path),
                *cell.cmd]


def _read_traces(prefix: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(prefix.parent.glob(prefix.name + ".*")))


def _traced_pid(strace_pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kids = Path(f"/proc/{strace_pid}/task/{strace_pid}/children").read_text().split()
        except OSError:
            kids = []
        if kids:
            return int(kids[0])
        time.sleep(0.05)
    raise AssertionError("strace started no cell")


def test_inner_call_in_namespace(tmp_path):
    """Runs only inside the namespace (started by the test above)."""
    if os.environ.get(INNER) != "1":
        pytest.skip("runs inside the network namespace made by test_a_full_agent_call_needs_nothing_but_loopback")
    from aiohttp import web

    from billing import TOKEN, BillingApi, tools_toml
    from voice import Caller, transcribe

    # The namespace: loopback only, and no route to anywhere else.
    interfaces = sorted(name for _, name in socket.if_nameindex())
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.10", 53))
        no_route = False
    except OSError as exc:
        no_route = exc.errno == 101          # ENETUNREACH
    finally:
        probe.close()
    assert interfaces == ["lo"] and no_route

    hooks: list[dict] = []

    def receiver():
        async def hook(request):
            hooks.append({"signature": request.headers.get("Trunkline-Signature"), **json.loads(await request.read())})
            return web.Response(status=204)
        app = web.Application()
        app.router.add_post("/hook", hook)
        return app

    hook_port, hook_loop = serve_on_loopback(receiver)
    billing = BillingApi()
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'billing_token = "{TOKEN}"\n')
    lookup = tools_toml(billing.url, timeout=5.0).split("[[tool]]")[:2]      # [tools] and lookup_invoices only
    config = ('[http]\noutbound_allow = ["127.0.0.1/32"]\n'
              '[agent]\nmax_reply_tokens = 30\n'
              + "[[tool]]".join(lookup).replace("{secrets}", str(secrets)))
    cell = CellProcess(tmp_path, config, ("--app", "agent"))
    trace = tmp_path / "cell.trace"
    _trace_cmd(cell, trace)
    cell.start(wait=False)
    caller = None
    try:
        cell.wait_healthy(timeout=90)
        control = create_key(cell.data, "control")
        status, hook_row, _ = Api(cell, control).post("/v1/webhooks", {"url": f"http://127.0.0.1:{hook_port}/hook",
                                                                       "topics": ["*"]})
        assert status == 201, hook_row
        scenario = tmp_path / "caller.xml"
        scenario.write_text((SCENARIOS / "wait_bye.xml").read_text().replace("sip:sipp@", f"sip:{CALLER_ID}@"))
        caller = Caller(cell, tmp_path, seconds=60, scenario=str(scenario))
        greeting = transcribe(caller.wait_reply(time.monotonic())).lower()
        assert "help" in greeting, greeting                   # answered, and the agent spoke (TTS -> whisper)
        end = caller.speak("What do I owe on my bill?")
        heard = transcribe(caller.wait_reply(end, quiet=2.0)).lower()
        assert "invoice" in heard or "120" in heard, heard    # the tool's answer, read out
        assert caller.goodbye() == 0
        caller = None
    finally:
        if caller is not None:
            caller.close()
        billing.stop()
        if cell.alive():
            os.kill(_traced_pid(cell.proc.pid), 15)           # the cell itself, not strace
            cell.proc.wait(30)
        hook_loop.call_soon_threadsafe(hook_loop.stop)
    looked = [r for r in billing.requests if r["path"] == "/v1/invoices"]
    assert looked and looked[0]["query"]["phone"] == CALLER_ID          # the tool was called
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "call_hangup" not in {h.get("type") for h in hooks}:
        time.sleep(0.1)
    kinds = {h.get("type") for h in hooks}
    assert {"call_ringing", "call_hangup", "tool_called"} <= kinds, kinds    # the webhooks arrived
    assert all(h["signature"] for h in hooks)
    scanned = scan_trace(_read_traces(trace))
    log = cell.log_path.read_text(errors="replace")
    Path(os.environ[REPORT]).write_text(json.dumps({
        "interfaces": interfaces, "no_route": no_route, "trace": scanned,
        "log_unreachable": log.count("Network is unreachable") + log.count("ENETUNREACH"),
        "webhooks": sorted(k for k in kinds if k)}))
