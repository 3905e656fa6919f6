"""The SIP source guard's calibration (sip/guard.py), against rdata laid out in memory the
way pjsip lays out ``pjsip_rx_data`` (no pjsua2 needed), and its start-up rule
(``sip.require_guard``) against a real engine in a child process."""
from __future__ import annotations

import ctypes
import socket
import struct
import subprocess
import sys

from sip.guard import CONSUMED, PASS, Guard, has_to_tag
from support import ROOT, next_ports

MAX_PKT = 4000                 # PJSIP_MAX_PKT_LEN of the build being imitated
PACKET_AT = 88                 # tp_info (pool, transport, tp_data, op_key) + timestamp


class FakeRdata:
    """tp_info / pkt_info / msg_info of one received request, in a ctypes buffer."""

    def __init__(self, packet: bytes, src: tuple[str, int], transport: bytes = b"udp0x1234", max_pkt: int = MAX_PKT,
                 stale: bytes = b""):
        self.tp = ctypes.create_string_buffer(transport + b"\0" * 64)
        self.size = PACKET_AT + max_pkt + 400
        self.buf = ctypes.create_string_buffer(self.size)
        base = ctypes.addressof(self.buf)
        self.addr = base
        struct.pack_into("<Q", self.buf, 8, ctypes.addressof(self.tp))
        self.buf[PACKET_AT:PACKET_AT + len(packet) + len(stale)] = packet + stale
        x = (PACKET_AT + max_pkt + 4 + 7) // 8 * 8                   # zero, then len
        struct.pack_into("<q", self.buf, x, len(packet))
        ip, port = src
        struct.pack_into("<H", self.buf, x + 8, socket.AF_INET)
        struct.pack_into(">H", self.buf, x + 10, port)
        self.buf[x + 12:x + 16] = socket.inet_aton(ip)
        name = x + 8 + 28 + 4
        self.buf[name:name + len(ip)] = ip.encode()
        port_at = (name + 46 + 3) // 4 * 4
        struct.pack_into("<i", self.buf, port_at, port)
        msg = (port_at + 4 + 7) // 8 * 8
        struct.pack_into("<Q", self.buf, msg, base + PACKET_AT)
        struct.pack_into("<i", self.buf, msg + 8, len(packet))
        self.offsets = (name, port_at, msg, msg + 8)


def _socks(n: int = 2) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        out.append(s)
    return out


def _request(method: str, to_tag: str = "", compact: bool = False) -> bytes:
    to = ("t: " if compact else "To: ") + "<sip:100@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
    return (f"{method} sip:100@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.9:5060;branch=z9hG4bK1\r\n"
            f"From: <sip:x@127.0.0.9>;tag=9\r\n{to}\r\nCall-ID: c@x\r\nCSeq: 1 {method}\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def test_two_agreeing_udp_calibrations_turn_the_guard_on_and_it_reads_the_found_fields():
    g = Guard(lambda src: src.startswith("127.0.0.1:"))
    dest = ("127.0.0.1", 5060)
    s1, s2 = _socks()
    r1 = FakeRdata(g.calibration_packet(s1, dest), s1.getsockname())
    assert g._on_rx_request(r1.addr) == CONSUMED and not g.active      # one is not enough
    r2 = FakeRdata(g.calibration_packet(s2, dest, pad=97), s2.getsockname())
    assert g._on_rx_request(r2.addr) == CONSUMED and g.active and g.state == "on"
    assert (g._off_name, g._off_port, g._off_buf, g._off_len) == r1.offsets
    assert g._on_rx_request(FakeRdata(_request("OPTIONS"), ("127.0.0.1", 5999)).addr) == PASS
    # L5: from an untrusted source an INVITE with a To-tag (re-INVITE) is dropped, a new one passes
    untrusted = ("127.0.0.9", 5060)
    assert g._on_rx_request(FakeRdata(_request("INVITE"), untrusted).addr) == PASS
    for req in (_request("INVITE", "x1"), _request("INVITE", "x1", compact=True), _request("OPTIONS"),
                _request("MESSAGE"), _request("BYE", "x1")):
        assert g._on_rx_request(FakeRdata(req, untrusted).addr) == CONSUMED, req[:40]
    assert g._on_rx_request(FakeRdata(_request("ACK", "x1"), untrusted).addr) == PASS   # ends our 403's transaction
    for s in (s1, s2):
        s.close()


def test_calibration_ignores_tcp_rdata_and_gives_up_cleanly():
    """M1: a TCP rdata is never scanned; after the deadline nothing is scanned any more."""
    g = Guard(lambda ip: True)
    s1, s2 = _socks()
    dest = ("127.0.0.1", 5060)
    tcp = FakeRdata(g.calibration_packet(s1, dest), s1.getsockname(), transport=b"tcps0x1")
    assert g._on_rx_request(tcp.addr) == CONSUMED and not g.active
    g.calibration_packet(s2, dest, pad=5)
    g.give_up()
    assert g.state == "failed" and not g._expect
    other = FakeRdata(_request("OPTIONS"), ("127.0.0.9", 5060))
    assert g._on_rx_request(other.addr) == PASS and not g.active
    for s in (s1, s2):
        s.close()


def test_stale_bytes_in_the_packet_buffer_cannot_pass_for_the_source_fields():
    """A copy of the source fields left in the reused packet buffer by an earlier packet
    (a full fake chain, right after our request) is found for the first request, but the
    second request (another length, another port) disagrees: the guard does not switch on
    with wrong offsets."""
    g = Guard(lambda ip: True)
    s1, s2 = _socks()
    dest = ("127.0.0.1", 5060)
    pkt = g.calibration_packet(s1, dest)
    ip, port = s1.getsockname()
    fake = bytearray(256)
    x = (PACKET_AT + len(pkt) + 7) // 8 * 8 - PACKET_AT - len(pkt)
    struct.pack_into("<q", fake, x, len(pkt))
    struct.pack_into("<H", fake, x + 8, socket.AF_INET)
    struct.pack_into(">H", fake, x + 10, port)
    fake[x + 12:x + 16] = socket.inet_aton(ip)
    fake[x + 40:x + 40 + len(ip)] = ip.encode()
    struct.pack_into("<i", fake, x + 88, port)
    r1 = FakeRdata(pkt, (ip, port), stale=bytes(fake))
    struct.pack_into("<Q", r1.buf, PACKET_AT + len(pkt) + x + 96, r1.addr + PACKET_AT)
    struct.pack_into("<i", r1.buf, PACKET_AT + len(pkt) + x + 104, len(pkt))
    assert g._on_rx_request(r1.addr) == CONSUMED
    r2 = FakeRdata(g.calibration_packet(s2, dest, pad=97), s2.getsockname())
    assert g._on_rx_request(r2.addr) == CONSUMED
    assert not g.active
    g.give_up()
    assert g.state == "failed"
    for s in (s1, s2):
        s.close()


def test_to_tag_detection():
    assert has_to_tag(_request("INVITE", "abc")) and has_to_tag(_request("INVITE", "abc", compact=True))
    assert not has_to_tag(_request("INVITE"))
    assert has_to_tag(b"INVITE sip:a@b SIP/2.0\r\nTO:\r\n <sip:a@b> ; TAG = 1\r\n\r\n")     # folded, spaced
    assert not has_to_tag(b"INVITE sip:a@b SIP/2.0\r\nTo: <sip:a@b>\r\n\r\nTo: <sip:a@b>;tag=1\r\n")  # body


ENGINE = """
import sys, time
from sip import guard
from sip.engine import Engine, EngineConfig, EngineError
guard.Guard._locate = lambda self, *a: None          # a pjsip build whose layout is not found
cfg = EngineConfig(host="127.0.0.1", port=int(sys.argv[1]), rtp_low=int(sys.argv[2]), rtp_high=int(sys.argv[2]) + 20,
                   require_guard=sys.argv[3] == "1")
e = Engine(cfg, lambda ev: None)
try:
    e.start()
except EngineError as exc:
    print("REFUSED", exc)
    sys.exit(3)
print("STARTED", e.guard_state)
e.stop() if hasattr(e, "stop") else None
"""


def test_a_cell_that_requires_the_guard_refuses_to_start_without_it():
    """M1: sip.require_guard on (the default off loopback) and no calibration: a clear error,
    no engine; off: it starts and says the guard failed."""
    p = next_ports()
    r = subprocess.run([sys.executable, "-c", ENGINE, str(p["sip"]), str(p["rtp_lo"]), "1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "REFUSED" in r.stdout and "sip.require_guard" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", ENGINE, str(p["sip"]), str(p["rtp_lo"]), "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert "STARTED failed" in r.stdout, r.stdout + r.stderr[-2000:]
