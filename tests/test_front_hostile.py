"""Hostile traffic against the Kamailio front (issue 11): open relay, answers to
untrusted sources, cell-originated requests to arbitrary hosts, idle TCP connections.

Most tests run the generated front on its own (one real Kamailio, loopback only) with
plain sockets standing in for a cell, a trunk and a victim, so every packet that
leaves the front is seen. Addresses: the front and the fake cell on 127.0.0.1, the
trusted trunk on 127.0.0.5, a victim on 127.0.0.6, the untrusted sender on 127.0.0.9.
"""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time

import pytest

from sipwire import UdpPeer, request, status_of
from support import next_ports

pytestmark = [pytest.mark.skipif(shutil.which("kamailio") is None, reason="kamailio is not installed"),
              pytest.mark.xdist_group("sipvicious")]

TRUNK_IP, VICTIM_IP, UNTRUSTED_IP, TRUNK2_IP = "127.0.0.5", "127.0.0.6", "127.0.0.9", "127.0.0.7"
METHODS = ("INVITE", "OPTIONS", "MESSAGE", "SUBSCRIBE", "REGISTER", "NOTIFY", "REFER", "INFO",
           "BYE", "CANCEL", "UPDATE", "PRACK", "PUBLISH", "ACK")


class Front:
    """The generated Kamailio front with a fake cell (a UDP socket) behind it."""

    def __init__(self, tmp, tcp_lifetime: int = 20):
        from bridge.box import kamailio
        p = next_ports()
        self.port, self.cell_port, self.trunk_port, self.victim_port = p["sip"], p["sip"] + 2, p["sip"] + 3, p["sip"] + 5
        self.inner_port = p["sip"] + 7                              # the front's socket toward cells
        self.run_dir = tmp / "front"
        inner = f"udp:127.0.0.1:{self.inner_port}"
        text = kamailio.render([f"udp:127.0.0.1:{self.port}", f"tcp:127.0.0.1:{self.port}"], str(self.run_dir),
                               [f"{TRUNK_IP}/32", f"{TRUNK2_IP}/32"], 5, ping=30, pike=30, children=1,
                               trunk_addresses=[f"sip:{TRUNK_IP}:{self.trunk_port}"], tcp_lifetime=tcp_lifetime,
                               cell_socket=inner, trunks=[(f"sip:{TRUNK_IP}:{self.trunk_port}", [f"{TRUNK_IP}/32"]),
                                                          ("", [f"{TRUNK2_IP}/32"])])
        path = kamailio.write(str(self.run_dir), text,
                              kamailio.dispatcher_list([("127.0.0.1", self.cell_port)], 3, socket=inner))
        self.cell = UdpPeer("127.0.0.1", self.cell_port)           # the cell's ip:port, as dispatcher knows it
        self.trunk = UdpPeer(TRUNK_IP, self.trunk_port)
        self.trunk2 = UdpPeer(TRUNK2_IP)
        self.victim = UdpPeer(VICTIM_IP, self.victim_port)
        self.log = open(self.run_dir / "kamailio.log", "ab")
        self.proc = subprocess.Popen(["kamailio", "-DD", "-E", "-f", path, "-P", str(self.run_dir / "k.pid")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if 200 in self.options(self.trunk):
                return
        self.close()
        raise RuntimeError("kamailio did not answer:\n" + (self.run_dir / "kamailio.log").read_text()[-3000:])

    def options(self, peer: UdpPeer, seconds: float = 0.5) -> list[int]:
        """An OPTIONS keepalive to the front itself (no user part): status codes back."""
        peer.send(request("OPTIONS", f"127.0.0.1:{self.port}", peer.addr).replace(b"sip:100@", b"sip:"), self.addr)
        return [status_of(m) for m in peer.gather(seconds, until_final=True)]

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def inner(self) -> tuple[str, int]:
        """The front's internal socket: where cells send."""
        return ("127.0.0.1", self.inner_port)

    def rss_kb(self) -> int:
        """VmRSS of the Kamailio processes (main + children)."""
        total = 0
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        for pid in [str(self.proc.pid), *out]:
            try:
                for line in open(f"/proc/{pid}/status"):
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()
        for s in (self.cell, self.trunk, self.trunk2, self.victim):
            s.close()


@pytest.fixture
def front(tmp_path):
    f = Front(tmp_path)
    yield f
    f.close()


def _requests(peer: UdpPeer, seconds: float) -> list[bytes]:
    """Requests (not responses, not the front's OPTIONS pings) that reached ``peer``."""
    return [m for m in peer.gather(seconds) if status_of(m) is None and not m.startswith(b"OPTIONS ")]


def test_untrusted_in_dialog_request_with_route_is_not_relayed(front):
    """The issue's open relay: From an untrusted address, an INVITE with a To-tag and a
    Route naming another socket used to be forwarded there from the front's address."""
    peer = UdpPeer(UNTRUSTED_IP)
    victim = f"{VICTIM_IP}:{front.victim_port}"
    try:
        for method in ("INVITE", "BYE", "MESSAGE", "ACK", "NOTIFY"):
            peer.send(request(method, victim, peer.addr, to_tag="x1", sdp=method == "INVITE",
                              extra=f"Route: <sip:{victim};lr>\r\n"), front.addr)
            peer.send(request(method, victim, peer.addr, to_tag="x2",
                              extra=f"Route: <sip:127.0.0.1:{front.port};lr>, <sip:{victim};lr>\r\n"), front.addr)
        assert _requests(front.victim, 1.5) == []
        assert peer.gather(0.5) == []                    # and not a word back
        assert _requests(front.cell, 0.1) == []
    finally:
        peer.close()
    assert front.proc.poll() is None


def test_trusted_in_dialog_request_for_an_unknown_dialog_is_not_relayed(front):
    """Even a trunk cannot aim the front elsewhere with a made-up dialog: 481, nothing relayed."""
    victim = f"{VICTIM_IP}:{front.victim_port}"
    front.trunk.send(request("BYE", victim, front.trunk.addr, to_tag="x3", extra=f"Route: <sip:{victim};lr>\r\n"),
                     front.addr)
    codes = [status_of(m) for m in front.trunk.gather(1.0, until_final=True)]
    assert 481 in codes, codes
    front.trunk.send(request("ACK", victim, front.trunk.addr, to_tag="x4", extra=f"Route: <sip:{victim};lr>\r\n"),
                     front.addr)
    assert _requests(front.victim, 1.0) == []


def test_untrusted_source_gets_silence_for_every_method(front):
    """Untrusted: no 403, no 100, nothing for any method; a SUBSCRIBE makes no NOTIFY."""
    peer = UdpPeer(UNTRUSTED_IP)
    try:
        for method in METHODS:
            extra = "Event: presence\r\nExpires: 60\r\n" if method == "SUBSCRIBE" else ""
            extra += f"Contact: <sip:x@{VICTIM_IP}:{front.victim_port}>\r\n" if method == "SUBSCRIBE" else ""
            peer.send(request(method, f"127.0.0.1:{front.port}", peer.addr, sdp=method == "INVITE", extra=extra),
                      front.addr)
        got = peer.gather(1.5)
        assert got == [], got
        assert _requests(front.victim, 0.3) == []
        assert _requests(front.cell, 0.1) == []
    finally:
        peer.close()
    # over TCP: the connection is closed on the first request, unanswered
    s = socket.socket()
    s.bind((UNTRUSTED_IP, 0))
    s.settimeout(3)
    s.connect(front.addr)
    s.sendall(request("OPTIONS", f"127.0.0.1:{front.port}", s.getsockname(), transport="TCP"))
    assert s.recv(4096) == b""
    s.close()


def test_trusted_trunk_is_served_without_revealing_a_version(front):
    """The trunk still gets its calls and keepalives; no Kamailio version in any header."""
    front.trunk.send(request("OPTIONS", f"127.0.0.1:{front.port}", front.trunk.addr).replace(
        b"sip:100@", b"sip:"), front.addr)
    replies = front.trunk.gather(1.0, until_final=True)
    assert replies and status_of(replies[-1]) == 200
    assert b"kamailio" not in replies[-1].lower()
    assert not re.search(rb"(?im)^(server|user-agent):.*\d", replies[-1]), replies[-1]
    front.trunk.send(request("INVITE", f"127.0.0.1:{front.port}", front.trunk.addr, sdp=True), front.addr)
    got = _requests(front.cell, 1.5)
    assert got and got[0].startswith(b"INVITE "), got


def test_cell_requests_go_only_to_configured_trunks(front):
    """A cell's outbound INVITE to a host that is no trunk gets 403 from the front and goes
    nowhere; to the trunk's address it is relayed."""
    victim = f"{VICTIM_IP}:{front.victim_port}"
    front.cell.send(request("INVITE", victim, front.cell.addr, sdp=True), front.inner)
    codes = [status_of(m) for m in front.cell.gather(1.5, until_final=True)]
    assert 403 in codes, codes
    assert _requests(front.victim, 0.5) == []
    front.cell.send(request("INVITE", f"{TRUNK_IP}:{front.trunk_port}", front.cell.addr, sdp=True), front.inner)
    got = _requests(front.trunk, 1.5)
    assert got and got[0].startswith(b"INVITE "), got
    # it leaves from the public socket, not the internal one
    assert f"127.0.0.1:{front.port}".encode() in got[0].split(b"\r\nVia:", 2)[1], got[0]


def test_a_stray_reply_is_not_forwarded_to_its_second_via(front):
    """H1: a `200 OK` matching no transaction, with the front in its top Via and a victim in
    the second, used to be forwarded to the victim (from an untrusted address, and from a
    trunk). Now it is dropped."""
    peer = UdpPeer(UNTRUSTED_IP)
    victim = f"{VICTIM_IP}:{front.victim_port}"
    try:
        for sender in (peer, front.trunk, front.cell):
            for dest in (front.addr, front.inner):
                reply = (f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:{dest[1]};branch=z9hG4bKstray{dest[1]}\r\n"
                         f"Via: SIP/2.0/UDP {victim};branch=z9hG4bKvictim\r\n"
                         f"From: <sip:a@{victim}>;tag=1\r\nTo: <sip:b@{victim}>;tag=2\r\n"
                         f"Call-ID: stray-{dest[1]}@x\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n").encode()
                sender.send(reply, dest)
        got = front.victim.gather(1.5)
        assert got == [], got
    finally:
        peer.close()
    assert front.proc.poll() is None


def test_a_local_user_posing_as_a_cell_cannot_reach_a_trunk(front):
    """H2: cells listen on UDP; a local user who binds TCP on a cell's ip:port (or sends UDP
    from it to the public socket) used to be taken for a cell and relayed to a trunk."""
    trunk = f"{TRUNK_IP}:{front.trunk_port}"
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", front.cell_port))
    s.settimeout(3)
    try:
        s.connect(front.addr)
        s.sendall(request("INVITE", trunk, s.getsockname(), sdp=True, transport="TCP"))
        try:
            answer = s.recv(4096)
        except (socket.timeout, ConnectionResetError):
            answer = b""
        assert status_of(answer) is None, answer
    finally:
        s.close()
    front.cell.send(request("INVITE", trunk, front.cell.addr, sdp=True), front.addr)   # UDP, public socket
    assert _requests(front.trunk, 1.5) == []
    assert front.cell.gather(0.2) == []
    # a trunk talking to the internal socket is no cell either
    front.trunk.send(request("INVITE", f"127.0.0.1:{front.inner_port}", front.trunk.addr, sdp=True), front.inner)
    assert _requests(front.cell, 1.0) == [] and front.trunk.gather(0.2) == []


def _answer(invite: bytes, to_tag: str) -> bytes:
    """The fake cell's 200 OK to a relayed INVITE (Vias and Record-Route copied)."""
    head = invite.split(b"\r\n\r\n", 1)[0].decode()
    lines = head.split("\r\n")[1:]
    keep = [x for x in lines if x.split(":", 1)[0].lower() in ("via", "v", "from", "f", "call-id", "i", "cseq",
                                                             "record-route")]
    to = next(x for x in lines if x.split(":", 1)[0].lower() in ("to", "t"))
    return ("SIP/2.0 200 OK\r\n" + "\r\n".join(keep) + f"\r\n{to};tag={to_tag}\r\n"
            "Contact: <sip:100@127.0.0.1:%d>\r\nContent-Length: 0\r\n\r\n" % 0).encode()


def _in_dialog(method: str, src: tuple[str, int], front_port: int, call_id: str, from_tag: str, to_tag: str,
               cseq: int) -> bytes:
    ip, port = src
    return (f"{method} sip:100@127.0.0.1:{front_port} SIP/2.0\r\nVia: SIP/2.0/UDP {ip}:{port};branch=z9hG4bK{method}{cseq}"
            f"\r\nFrom: <sip:t@{ip}>;tag={from_tag}\r\nTo: <sip:100@127.0.0.1>;tag={to_tag}\r\n"
            f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()


def test_a_trunk_cannot_act_on_another_trunks_dialog(front):
    """L6: with dialog matching by Call-ID and tags, any trusted trunk could send a BYE into
    another trunk's call (and aim it with a Route). Now only the owning trunk gets through,
    and a Route header naming another host does not choose the destination."""
    invite = request("INVITE", f"127.0.0.1:{front.port}", front.trunk.addr, sdp=True, call_id="owned@t1")
    from_tag = re.search(rb"From: [^\r]*;tag=(\w+)", invite).group(1).decode()
    front.trunk.send(invite, front.addr)
    got = _requests(front.cell, 1.5)
    assert got and got[0].startswith(b"INVITE "), got
    front.cell.send(_answer(got[0], "cell1"), front.inner)
    assert 200 in [status_of(m) for m in front.trunk.gather(1.5, until_final=True)]
    victim = f"{VICTIM_IP}:{front.victim_port}"
    bye = _in_dialog("BYE", front.trunk2.addr, front.port, "owned@t1", from_tag, "cell1", 2)
    front.trunk2.send(bye.replace(b"Max-Forwards", f"Route: <sip:{victim};lr>\r\nMax-Forwards".encode()), front.addr)
    assert 403 in [status_of(m) for m in front.trunk2.gather(1.0, until_final=True)]
    assert _requests(front.cell, 0.5) == [] and _requests(front.victim, 0.1) == []
    # the owner's in-dialog request with a foreign Route still goes to the dialog's cell only
    info = _in_dialog("INFO", front.trunk.addr, front.port, "owned@t1", from_tag, "cell1", 3)
    front.trunk.send(info.replace(b"Max-Forwards", f"Route: <sip:{victim};lr>\r\nMax-Forwards".encode()), front.addr)
    got = _requests(front.cell, 1.5)
    assert got and got[0].startswith(b"INFO "), got
    assert _requests(front.victim, 0.2) == []
    front.trunk.send(_in_dialog("BYE", front.trunk.addr, front.port, "owned@t1", from_tag, "cell1", 4), front.addr)
    got = _requests(front.cell, 1.5)
    assert got and got[0].startswith(b"BYE "), got


def _hold(n: int, dest: tuple[str, int], src_ip: str) -> list[socket.socket]:
    held = []
    for _ in range(n):
        s = socket.socket()
        s.bind((src_ip, 0))
        s.settimeout(2)
        try:
            s.connect(dest)
            s.sendall(b"INVITE sip:100@127.0.0.1 SI")   # half a request line, then nothing
        except OSError:
            s.close()
            continue
        held.append(s)
    return held


def _closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(0.05)
    try:
        return s.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_idle_tcp_connections_do_not_lock_out_a_tcp_trunk(tmp_path):
    """300 half-request connections from an untrusted address: a trunk's SIP-over-TCP INVITE
    still reaches a cell while they are held, and the front closes them once idle."""
    front = Front(tmp_path, tcp_lifetime=3)
    held = []
    try:
        rss_before = front.rss_kb()
        held = _hold(300, front.addr, UNTRUSTED_IP)
        assert len(held) >= 290, len(held)
        t = socket.socket()
        t.bind((TRUNK_IP, 0))
        t.settimeout(5)
        t.connect(front.addr)
        t.sendall(request("INVITE", f"127.0.0.1:{front.port}", t.getsockname(), sdp=True, transport="TCP"))
        got = _requests(front.cell, 3.0)
        assert got and got[0].startswith(b"INVITE "), got
        t.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(_closed_by_peer(s) for s in held[:20]):
            time.sleep(0.5)
        closed = sum(_closed_by_peer(s) for s in held)
        assert closed >= len(held) - 5, f"{closed}/{len(held)} idle connections closed by the front"
        assert front.proc.poll() is None
        print(f"kamailio VmRSS {rss_before} kB before, {front.rss_kb()} kB after 300 idle TCP connections")
    finally:
        for s in held:
            s.close()
        front.close()


def _rss_kb(needle: str) -> dict[str, int]:
    """VmRSS (kB) of the processes whose command line names ``needle``: kamailio vs cells."""
    import os
    out = {"kamailio": 0, "cells": 0}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            if needle not in cmd:
                continue
            rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        if cmd.startswith("kamailio") or "/kamailio " in cmd:
            out["kamailio"] += rss
        elif "bridge.cli serve --sip" in cmd:
            out["cells"] += rss
    return out


def test_box_answers_untrusted_sources_with_silence_or_403_and_keeps_tcp_trunks(tmp_path):
    """`serve --cells 2` from an untrusted address: the front says nothing, a cell says at most
    403, no SUBSCRIBE makes a NOTIFY, a cell has no TCP port to exhaust, and with 300 idle
    TCP connections held against the front a SIP-over-TCP call (SIPp -t t1) still works."""
    from support import BoxProcess, sipp
    b = BoxProcess(tmp_path, 2, '[models]\nload = "never"\n[[trunks]]\nname = "carrier"\nallow = ["127.0.0.1/32"]\n')
    b.start()
    held: list[socket.socket] = []
    listener, peer = UdpPeer(VICTIM_IP), UdpPeer(UNTRUSTED_IP)
    contact = f"{VICTIM_IP}:{listener.addr[1]}"
    try:
        front = ("127.0.0.1", b.ports["sip"])
        cells = [("127.0.0.1", b.ports["sip"] + 100 + i) for i in range(2)]
        for dest in (front, *cells):
            for method in METHODS:
                if method in ("ACK", "CANCEL"):
                    continue
                extra = f"Event: presence\r\nExpires: 60\r\nContact: <sip:x@{contact}>\r\n" if method == "SUBSCRIBE" else ""
                codes = peer.ask(method, dest, seconds=0.4, sdp=method == "INVITE", extra=extra)
                if dest == front:
                    assert codes == [], (method, codes)
                else:
                    assert {c for c in codes if c >= 200} <= {403}, (dest, method, codes)
        assert [m for m in listener.gather(1.5) if m.startswith(b"NOTIFY")] == []
        for dest in cells:                                   # behind the front a cell is UDP only
            with socket.socket() as s, pytest.raises(ConnectionRefusedError):
                s.settimeout(2)
                s.connect(dest)
        before = _rss_kb(str(b.data))
        held = _hold(300, front, UNTRUSTED_IP)
        assert len(held) >= 290, len(held)
        res = sipp("call_pcmu.xml", b.sip, tmp_path, "-t", "t1", "-d", "500", local_port=b.ports["sipp"])
        assert res.returncode == 0, res.stdout.decode()[-2000:]
        after = _rss_kb(str(b.data))
        print(f"VmRSS kB before/after 300 idle TCP connections + scan: {before} -> {after}")
    finally:
        for s in held:
            s.close()
        peer.close()
        listener.close()
        b.stop()


@pytest.mark.skipif(shutil.which("svmap") is None, reason="sipvicious (svmap/svwar) is not installed")
def test_scanners_find_nothing_at_the_front(front):
    """SIPVicious from an untrusted address (its source is 127.0.0.1, the trunk is 127.0.0.5):
    svmap (OPTIONS, INVITE) finds no SIP device and svwar no extension; the front lives."""
    port = str(front.port)
    for cmd in (["svmap", "-p", port, "127.0.0.1"], ["svmap", "-m", "INVITE", "-p", port, "127.0.0.1"],
                ["svwar", "-m", "INVITE", "-e", "100-120", "--force", "-p", port, "127.0.0.1"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        report = r.stdout + r.stderr
        assert "found nothing" in report and "| SIP Device" not in report, report
    assert front.proc.poll() is None
    assert 200 in front.options(front.trunk)                # the trunk is still served


def test_a_cell_trusts_only_the_fronts_internal_socket(tmp_path):
    """H2 (cell side): cells trusted the front's address, 127.0.0.1, on any port, so every
    local user was "the front" to them (OPTIONS answered 200, INVITEs accepted). Now only
    the front's internal socket counts; a trunk's call through the front still works."""
    from support import BoxProcess, sipp
    b = BoxProcess(tmp_path, 2, f'[models]\nload = "never"\n[[trunks]]\nname = "carrier"\nallow = ["{TRUNK_IP}/32"]\n')
    b.start()
    local = UdpPeer("127.0.0.1")
    try:
        cell = ("127.0.0.1", b.ports["sip"] + 100)
        assert local.ask("OPTIONS", cell, seconds=0.8) == []
        assert local.ask("INVITE", cell, seconds=1.0, sdp=True)[-1:] == [403]
        res = sipp("call_pcmu.xml", b.sip, tmp_path, "-d", "300", local_port=b.ports["sipp"], local_ip=TRUNK_IP)
        assert res.returncode == 0, res.stdout.decode()[-2000:]
    finally:
        local.close()
        b.stop()


def test_the_callee_trunk_of_a_cells_outbound_call_can_end_it_and_no_other(front):
    """L6, outbound: the dialog a cell set up belongs to the trunk it went to."""
    invite = request("INVITE", f"{TRUNK_IP}:{front.trunk_port}", front.cell.addr, sdp=True, call_id="out@cell")
    from_tag = re.search(rb"From: [^\r]*;tag=(\w+)", invite).group(1).decode()
    front.cell.send(invite, front.inner)
    got = _requests(front.trunk, 1.5)
    assert got and got[0].startswith(b"INVITE "), got
    front.trunk.send(_answer(got[0], "callee1"), front.addr)
    assert 200 in [status_of(m) for m in front.cell.gather(1.5, until_final=True)]
    # in-dialog from the callee: From is the callee's tag, To the cell's
    bye = (f"BYE sip:scanner@127.0.0.1:{front.cell_port} SIP/2.0\r\nVia: SIP/2.0/UDP {{ip}}:{{port}};branch=z9hG4bKb{{n}}\r\n"
           f"From: <sip:100@{TRUNK_IP}>;tag=callee1\r\nTo: <sip:scanner@127.0.0.1>;tag={from_tag}\r\n"
           "Call-ID: out@cell\r\nCSeq: 1 BYE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
    ip2, port2 = front.trunk2.addr
    front.trunk2.send(bye.format(ip=ip2, port=port2, n=2).encode(), front.addr)
    assert 403 in [status_of(m) for m in front.trunk2.gather(1.0, until_final=True)]
    assert _requests(front.cell, 0.3) == []
    ip1, port1 = front.trunk.addr
    front.trunk.send(bye.format(ip=ip1, port=port1, n=1).encode(), front.addr)
    got = _requests(front.cell, 1.5)
    assert got and got[0].startswith(b"BYE "), got
