"""Hostile traffic against a cell: refused INVITEs without SDP, scanners (issue 11)."""
import shutil
import socket
import subprocess
import time

import pytest

from sipwire import UdpPeer, request
from support import sipp, sipp_file

pytestmark = pytest.mark.xdist_group("sipvicious")

TRUSTED_ONLY = '[[trunks]]\nname = "carrier"\nallow = ["127.0.0.1/32"]\n'
# svwar binds where it likes (its -b is ignored: it always sends from 127.0.0.1:5060), so
# for an untrusted scan the trunk lives on 127.0.0.5 and the scanner's 127.0.0.1 is outside.
TRUSTED_ELSEWHERE = '[[trunks]]\nname = "carrier"\nallow = ["127.0.0.5/32"]\n'


def _call_works(cell, tmp_path, local_ip="127.0.0.1"):
    res = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "300", local_port=cell.ports["sipp"], local_ip=local_ip)
    assert res.returncode == 0, res.stdout.decode()[-2000:]


def test_untrusted_invite_without_sdp_is_refused_and_the_cell_lives(cell_factory, tmp_path):
    """A late-offer INVITE from outside the allow-list used to abort the cell
    (pjsip_rx_data_free_cloned: Assertion 'rdata' failed) when refused inside the callback."""
    cell = cell_factory(TRUSTED_ONLY)
    dest = ("127.0.0.1", cell.ports["sip"])
    peer = UdpPeer("127.0.0.9")
    try:
        for _ in range(3):
            codes = peer.ask("INVITE", dest, sdp=False)
            assert codes and codes[-1] == 403, codes
    finally:
        peer.close()
    time.sleep(0.3)
    assert cell.alive(), cell.log_path.read_text()[-3000:]
    assert len(cell.wait_event("call_rejected", 3)) == 3
    _call_works(cell, tmp_path)


def test_full_cell_refuses_invite_without_sdp_with_503_and_keeps_its_calls(cell, tmp_path):
    """Three calls hold every slot; a late-offer INVITE from a trusted source gets 503
    and the three calls finish normally."""
    busy = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "4000", "-l", "3", "-r", "10",
                local_port=cell.ports["sipp"], calls=3, background=True)
    try:
        deadline = time.monotonic() + 10
        while cell.metrics()["trunkline_calls_active"] < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cell.metrics()["trunkline_calls_active"] == 3
        peer = UdpPeer("127.0.0.1")
        try:
            codes = peer.ask("INVITE", ("127.0.0.1", cell.ports["sip"]), sdp=False)
        finally:
            peer.close()
        assert codes and codes[-1] == 503, codes
        assert cell.alive(), cell.log_path.read_text()[-3000:]
        out, _ = busy.communicate(timeout=30)
    finally:
        if busy.poll() is None:
            busy.kill()
    assert busy.returncode == 0, out.decode()[-2000:]
    assert sipp_file(tmp_path, "_logs.log").count("ANSWERED") == 3
    assert cell.alive()


def _svwar(port: int, method: str = "INVITE") -> str:
    r = subprocess.run(["svwar", "-m", method, "-e", "100-199", "--force", "-p", str(port), "127.0.0.1"],
                       capture_output=True, text=True, timeout=120)
    return r.stdout + r.stderr


def _distinguished(report: str) -> dict[str, str]:
    """Extensions svwar could tell apart from the rest: with ``--force`` it lists every
    extension whose answer is not 404, so a server that answers all alike (403) shows
    all of them with one verdict, which tells a scanner nothing. Returns {ext: verdict}
    when the answers differ, else {}."""
    rows = [line.split("|") for line in report.splitlines() if line.startswith("|")]
    found = {r[1].strip(): r[2].strip() for r in rows if len(r) > 3 and r[1].strip() not in ("Extension", "")}
    found.pop("None", None)
    uniform = len(set(found.values())) <= 1 and (not found or len(found) >= 90)
    return {} if uniform else found


needs_svwar = pytest.mark.skipif(shutil.which("svwar") is None, reason="sipvicious (svwar) is not installed")


@needs_svwar
def test_svwar_invite_scan_from_untrusted_source_finds_nothing(cell_factory, tmp_path):
    """The stock scan from the issue, from outside the allow-list: the cell lives and
    answers every extension alike (403), so nothing is enumerated."""
    cell = cell_factory(TRUSTED_ELSEWHERE)
    report = _svwar(cell.ports["sip"])
    assert cell.alive(), cell.log_path.read_text()[-3000:]
    assert _distinguished(report) == {}, report
    assert not cell.events("call_offered")
    assert cell.events("call_rejected")
    _call_works(cell, tmp_path, local_ip="127.0.0.5")


@needs_svwar
def test_svwar_invite_scan_from_trusted_source_does_not_kill_the_cell(cell_factory, tmp_path):
    """From a trusted address the scan's INVITEs are calls: 3 are answered, the rest get 503.
    Before the fix the first 503 to an INVITE without SDP aborted the cell."""
    cell = cell_factory(TRUSTED_ONLY)
    _svwar(cell.ports["sip"])
    assert cell.alive(), cell.log_path.read_text()[-3000:]
    assert cell.events("call_rejected"), "the scan never filled the cell"
    deadline = time.monotonic() + 60        # the scanner's unacknowledged calls time out
    while cell.metrics()["trunkline_calls_active"] > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    _call_works(cell, tmp_path)


# -- answers to untrusted sources (issue 11) ----------------------------------------------

UNTRUSTED = "127.0.0.9"
ALL_METHODS = ("OPTIONS", "MESSAGE", "SUBSCRIBE", "REGISTER", "NOTIFY", "REFER", "INFO", "BYE",
               "UPDATE", "PRACK", "PUBLISH", "INVITE")


def _extra(method: str, contact: str) -> str:
    if method == "SUBSCRIBE":
        return f"Event: presence\r\nExpires: 60\r\nContact: <sip:x@{contact}>\r\n"
    if method == "MESSAGE":
        return "Content-Type: text/plain\r\n"
    return ""


def test_untrusted_source_gets_only_403_or_nothing_from_a_cell(cell_factory, tmp_path):
    """Every method from outside the allow-list: no 2xx (OPTIONS and MESSAGE used to get 200
    from pjsua itself), finals only 403, and a SUBSCRIBE makes no NOTIFY anywhere. TCP is
    opted in (sip.tcp = "on") so the TCP path of the guard is tested too."""
    cell = cell_factory(TRUSTED_ONLY + '[sip]\ntcp = "on"\n')
    dest = ("127.0.0.1", cell.ports["sip"])
    listener = UdpPeer("127.0.0.6")
    contact = f"127.0.0.6:{listener.addr[1]}"
    peer = UdpPeer(UNTRUSTED)
    try:
        answers = {m: peer.ask(m, dest, seconds=0.6, sdp=m == "INVITE", extra=_extra(m, contact))
                   for m in ALL_METHODS}
        finals = {m: [c for c in codes if c >= 200] for m, codes in answers.items()}
        assert all(set(f) <= {403} for f in finals.values()), answers
        assert finals["INVITE"] == [403]
        assert listener.gather(1.5) == []                       # no NOTIFY to the Contact
        # over TCP too: an untrusted OPTIONS goes unanswered
        with socket.socket() as s:
            s.bind((UNTRUSTED, 0))
            s.settimeout(1.0)
            s.connect(dest)
            s.sendall(request("OPTIONS", f"127.0.0.1:{dest[1]}", s.getsockname(), transport="TCP"))
            try:
                got = s.recv(4096)
            except socket.timeout:
                got = b""
            assert got == b"", got
    finally:
        peer.close()
        listener.close()
    assert cell.alive()
    _call_works(cell, tmp_path)


def test_subscribe_is_refused_even_from_a_trunk(cell_factory):
    """A trunk never subscribes to presence: 403, no subscription, no NOTIFY."""
    cell = cell_factory(TRUSTED_ONLY)
    listener = UdpPeer("127.0.0.1")
    peer = UdpPeer("127.0.0.1")
    try:
        codes = peer.ask("SUBSCRIBE", ("127.0.0.1", cell.ports["sip"]),
                         extra=_extra("SUBSCRIBE", f"127.0.0.1:{listener.addr[1]}"))
        assert [c for c in codes if c >= 200] == [403], codes
        assert [m for m in peer.gather(1.0) + listener.gather(0.5) if m.startswith(b"NOTIFY")] == []
    finally:
        peer.close()
        listener.close()


def test_untrusted_in_dialog_invite_gets_no_answer_and_the_guard_is_on(cell_factory):
    """L5: an INVITE with a To-tag (a re-INVITE into some dialog) from an untrusted address
    used to reach pjsua (which answered it); the source guard now drops it unanswered, while
    an out-of-dialog INVITE still gets its 403. /healthz says the guard is on."""
    import json
    cell = cell_factory(TRUSTED_ONLY)
    status, body = cell.http_get("/healthz")[:2]
    assert json.loads(body)["sip_guard"] == "on", body
    dest = ("127.0.0.1", cell.ports["sip"])
    peer = UdpPeer("127.0.0.9")
    try:
        for compact in (False, True):
            msg = request("INVITE", f"{dest[0]}:{dest[1]}", peer.addr, sdp=True, to_tag="x1")
            if compact:
                msg = msg.replace(b"\r\nTo: ", b"\r\nt: ")
            peer.send(msg, dest)
            assert peer.gather(1.0) == [], compact
        assert peer.ask("INVITE", dest, sdp=True)[-1:] == [403]
    finally:
        peer.close()
    assert cell.alive()


def test_tcp_is_off_by_default_on_a_public_address_and_the_guard_required(tmp_path):
    """M4: a standalone cell on a non-loopback address no longer listens on TCP unless the
    operator opts in (sip.tcp = "on"): pjsip's select() limit made idle connections lock TCP
    trunks out. M1: there the source guard is required by default."""
    from bridge.cell.cell import engine_config
    from bridge.core.config import load

    def ec(text: str):
        path = tmp_path / "c.toml"
        path.write_text('[models]\nload = "never"\n' + text)
        return engine_config(load(str(path), environ={}))

    public = ec('[sip]\nlisten = "0.0.0.0:5060"\n')
    assert (public.tcp, public.require_guard) == (False, True)
    assert ec('[sip]\nlisten = "192.0.2.10:5060"\n').tcp is False
    assert ec('[sip]\nlisten = "0.0.0.0:5060"\ntcp = "on"\n').tcp is True
    assert ec('[sip]\nlisten = "0.0.0.0:5060"\nrequire_guard = "off"\n').require_guard is False
    local = ec('[sip]\nlisten = "127.0.0.1:5060"\n')      # a burst of TCP connections aborted pjsip
    assert (local.tcp, local.require_guard) == (False, False)
    behind_front = ec('[sip]\nlisten = "127.0.0.1:5061"\ntrusted_proxies = ["127.0.0.1/32"]\n')
    assert behind_front.tcp is False
