"""A pjsip module that drops requests from untrusted sources before pjsua sees them.

pjsua answers some requests inside its own C modules with no Python hook: an
out-of-dialog OPTIONS gets 200 (with Allow/Accept/Supported: a fingerprint), a
MESSAGE gets 200 before ``onInstantMessage`` runs. From an address outside every
trunk's allow-list that is an answer to a stranger, and over UDP a reflector.

pjsua2 exposes no request hook, but its extension exports the pjsip C API, so this
registers a small pjsip module (priority 15: before the transaction layer) through
ctypes. For each request it reads the source address from the ``pjsip_rx_data``;
from an untrusted source only an out-of-dialog INVITE (no To-tag) and ACK go on to the
engine (which refuses the INVITE with 403 and reports it as ``call_rejected``; the ACK
completes that 403's transaction); every other request, including CANCEL (else a CANCEL
racing the deferred 403 drew 200 and 487) and an INVITE with a To-tag (a re-INVITE into
some dialog), is dropped unanswered. A request whose To or From tag is empty is dropped
from anyone: such an ACK aborted the process inside pjsip.

The offsets of ``pkt_info.src_name``/``src_port`` and ``msg_info.msg_buf``/``len`` inside
``pjsip_rx_data`` depend on how pjproject was built (e.g. PJSIP_MAX_PKT_LEN), so they are
not hard-coded: at start the engine sends itself two OPTIONS from two loopback ports,
with different lengths and a secret marker in the request line, and ``Guard`` finds the
fields in those requests' rdata:

- only a UDP rdata is considered (the transport's ``obj_name`` starts with ``udp``) and
  only one whose first bytes hold a marker we sent; nothing else is read past 512 bytes;
- ``pkt_info`` is walked as pjsip lays it out: after the packet buffer comes its length
  (equal to what we sent), then the source sockaddr (family, our port and address),
  ``src_name`` (our address) and ``src_port``; then ``msg_info.msg_buf`` points at the
  packet and ``msg_info.len`` is its length. So stale bytes in the reused packet buffer
  cannot pass for a field (the search starts past the packet and needs the whole chain);
- both requests must give the same offsets; memory is read in small steps, never far
  past the fields found;
- after calibration only those four fields (and the message, up to its length) are read.

If calibration fails the guard stays off and says so (``state``: "on", "off", "failed");
the engine refuses to start when ``sip.require_guard`` is on (the default for a cell that
listens on a non-loopback address), and the state shows in /healthz.

Engine thread only (pjsip calls the module from ``libHandleEvents``).
"""
from __future__ import annotations

import ctypes
import logging
import re
import secrets
import socket
import struct
from typing import Callable

log = logging.getLogger("trunkline.sip")

PASS, CONSUMED = 0, 1
MODULE_PRIORITY = 15                     # PJSIP_MOD_PRIORITY_TSX_LAYER is 16
HEAD_BYTES = 512                         # the packet buffer starts here: always inside any rdata
SCAN_LIMIT = 16384                       # how far calibration may look for the packet length field
STEP = 64                                # memory is read in steps of this many bytes
ADDR_LEN = 46                            # PJ_INET6_ADDRSTRLEN
MSG_LIMIT = 8192                         # how much of a message the To-tag check reads
UNTRUSTED_PASS = (b"INVITE", b"ACK")   # the engine refuses (403) the INVITE; the ACK completes that 403
_TO_TAG = re.compile(rb"(?im)^(?:to|t)[ \t]*:[^\n]*;[ \t]*tag[ \t]*=")
# A To or From tag with no value (``;tag=`` then nothing): RFC 3261 wants a token there. An ACK
# like that for a live call aborted the cell inside pjsip (sip_util.c: "Assertion
# 'req_msg->line.req.method.id != PJSIP_ACK_METHOD'", found by the fuzzer), from any source.
_EMPTY_TAG = re.compile(rb"(?im)^(?:to|t|from|f)[ \t]*:[^\n]*;[ \t]*tag[ \t]*=[ \t]*(?:[;,>\r\n]|$)")


class _PjStr(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_char_p), ("slen", ctypes.c_ssize_t)]


_RX = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class _Module(ctypes.Structure):
    """``struct pjsip_module`` (pjsip/sip_module.h)."""
    _fields_ = [("prev", ctypes.c_void_p), ("next", ctypes.c_void_p), ("name", _PjStr), ("id", ctypes.c_int),
                ("priority", ctypes.c_int), ("load", ctypes.c_void_p), ("start", ctypes.c_void_p),
                ("stop", ctypes.c_void_p), ("unload", ctypes.c_void_p), ("on_rx_request", _RX),
                ("on_rx_response", ctypes.c_void_p), ("on_tx_request", ctypes.c_void_p),
                ("on_tx_response", ctypes.c_void_p), ("on_tsx_state", ctypes.c_void_p)]


def _pjsip_lib() -> ctypes.CDLL:
    from pjsua2 import _pjsua2           # the SWIG extension: pjproject linked in, C symbols exported
    return ctypes.CDLL(_pjsua2.__file__)


def _head(msg: bytes) -> bytes:
    head = re.split(rb"\r?\n\r?\n", msg, maxsplit=1)[0]
    return re.sub(rb"\r?\n[ \t]+", b" ", head)


def has_empty_tag(msg: bytes) -> bool:
    """Whether the To or From header carries ``tag=`` with no value (headers only, folded lines joined)."""
    return _EMPTY_TAG.search(_head(msg)) is not None


def has_to_tag(msg: bytes) -> bool:
    """Whether the request's To header (``To:`` or compact ``t:``) carries a tag (headers only,
    folded lines joined)."""
    head = re.split(rb"\r?\n\r?\n", msg, maxsplit=1)[0]
    head = re.sub(rb"\r?\n[ \t]+", b" ", head)
    return _TO_TAG.search(head) is not None


class _Reader:
    """Reads an rdata in small steps, never more than asked for (plus one step)."""

    def __init__(self, base: int):
        self.base = base
        self.buf = b""

    def upto(self, end: int) -> bytes:
        while len(self.buf) < end:
            self.buf += ctypes.string_at(self.base + len(self.buf), STEP)
        return self.buf


class Guard:
    """``allows("ip:port") -> bool`` decides; ``dropped`` counts what was dropped; ``state`` says
    whether it works ("on"), was never calibrated ("off") or could not be ("failed")."""

    def __init__(self, allows: Callable[[str], bool]):
        self.allows = allows
        self.dropped = 0
        self.active = False
        self.state = "off"
        self._expect: dict[bytes, tuple[bytes, int, int]] = {}     # marker -> (ip, port, packet length)
        self._found: list[tuple[int, int, int, int]] = []
        self._off_name = self._off_port = self._off_buf = self._off_len = -1
        self._cb = _RX(self._on_rx_request)
        self._mod = _Module()
        self._name = b"mod-trunkline-guard"
        self._mod.name = _PjStr(self._name, len(self._name))
        self._mod.id = -1
        self._mod.priority = MODULE_PRIORITY
        self._mod.on_rx_request = self._cb

    def register(self) -> None:
        lib = _pjsip_lib()
        lib.pjsua_get_pjsip_endpt.restype = ctypes.c_void_p
        lib.pjsip_endpt_register_module.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        endpt = lib.pjsua_get_pjsip_endpt()
        if not endpt:
            raise RuntimeError("no pjsip endpoint")
        status = lib.pjsip_endpt_register_module(endpt, ctypes.byref(self._mod))
        if status != 0:
            raise RuntimeError(f"pjsip_endpt_register_module failed ({status})")

    # -- calibration ------------------------------------------------------------------------
    def calibration_packet(self, sock: socket.socket, dest: tuple[str, int], pad: int = 0) -> bytes:
        """One OPTIONS from ``sock`` that the module recognises (and swallows); ``pad`` bytes
        of an extra header make two calibration packets differ in length."""
        ip, port = sock.getsockname()[:2]
        marker = b"guard-" + secrets.token_hex(12).encode()
        host = f"[{ip}]" if ":" in ip else ip
        packet = (f"OPTIONS sip:{marker.decode()}@{host} SIP/2.0\r\n"
                  f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{marker[-12:].decode()}\r\n"
                  f"From: <sip:guard@{host}>;tag=1\r\nTo: <sip:guard@{host}>\r\n"
                  f"Call-ID: {marker.decode()}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n"
                  + (f"X-Pad: {'p' * pad}\r\n" if pad else "") + "Content-Length: 0\r\n\r\n").encode()
        self._expect[marker] = (ip.encode(), port, len(packet))
        return packet

    def give_up(self) -> None:
        """Calibration time is over: forget the markers (nothing more is scanned)."""
        self._expect.clear()
        if not self.active:
            self.state = "failed"

    def _is_udp(self, rdata: int) -> bool:
        transport = ctypes.c_void_p.from_address(rdata + 8).value    # rdata->tp_info.transport
        return bool(transport) and ctypes.string_at(transport, 3) == b"udp"   # transport->obj_name "udp%p"

    def _locate(self, rdata: int, start: int, ip: bytes, port: int, length: int) -> tuple[int, int, int, int] | None:
        """(src_name, src_port, msg_buf, msg len) offsets for our request at ``start``."""
        try:
            packed_ip = socket.inet_pton(socket.AF_INET6 if b":" in ip else socket.AF_INET, ip.decode())
        except OSError:
            return None
        family = socket.AF_INET6 if b":" in ip else socket.AF_INET
        r = _Reader(rdata)
        x = (start + length + 7) // 8 * 8                  # pkt_info.len lies past the packet buffer
        while x + 8 <= SCAN_LIMIT:
            buf = r.upto(x + 8)
            if struct.unpack_from("<q", buf, x)[0] == length:
                found = self._chain(r, rdata, start, x, family, packed_ip, ip, port, length)
                if found:
                    return found
            x += 8
        return None

    @staticmethod
    def _chain(r: _Reader, rdata: int, start: int, x: int, family: int, packed_ip: bytes, ip: bytes, port: int,
               length: int) -> tuple[int, int, int, int] | None:
        """After pkt_info.len at ``x``: src_addr, src_name, src_port, then msg_info.msg_buf/len."""
        buf = r.upto(x + 8 + 28 + 4 + ADDR_LEN + 8 + 80)
        sa = x + 8
        fam, sport = struct.unpack_from("<H", buf, sa)[0], struct.unpack_from(">H", buf, sa + 2)[0]
        addr = buf[sa + 4:sa + 8] if family == socket.AF_INET else buf[sa + 8:sa + 24]
        if fam != family or sport != port or addr != packed_ip:
            return None
        name = buf.find(ip + b"\0", sa + 16, sa + 16 + 48)
        if name < 0:
            return None
        port_at = (name + ADDR_LEN + 3) // 4 * 4
        if struct.unpack_from("<i", buf, port_at)[0] != port:
            return None
        ptr = struct.pack("<Q", rdata + start)
        for b in range((port_at + 4 + 7) // 8 * 8, port_at + 4 + 40, 8):
            if buf[b:b + 8] == ptr and struct.unpack_from("<i", buf, b + 8)[0] == length:
                return name, port_at, b, b + 8
        return None

    def _calibrate(self, rdata: int) -> bool | None:
        """True: this was a calibration request (consumed); None: not one of ours."""
        head = ctypes.string_at(rdata, HEAD_BYTES)
        for marker, (ip, port, length) in list(self._expect.items()):
            start = head.find(b"OPTIONS sip:" + marker + b"@")
            if start < 0:
                continue
            del self._expect[marker]
            if not self._is_udp(rdata):
                return True
            found = self._locate(rdata, start, ip, port, length)
            if found is None:
                log.error("SIP source guard: calibration request found, but not its source fields")
            elif self._found and self._found[0] != found:
                log.error("SIP source guard: two calibration requests disagree (%s, %s)", self._found[0], found)
                self._expect.clear()
            else:
                self._found.append(found)
                if len(self._found) >= 2:
                    self._off_name, self._off_port, self._off_buf, self._off_len = found
                    self._expect.clear()
                    self.active, self.state = True, "on"
            return True
        return None

    # -- every request ------------------------------------------------------------------------
    def _on_rx_request(self, rdata: int) -> int:
        try:
            if not self.active:
                if self._expect and self._calibrate(rdata):
                    if self.active:
                        log.info("SIP source guard on: from untrusted sources only out-of-dialog INVITE "
                                 "and ACK reach pjsua")
                    return CONSUMED
                return PASS
            name = ctypes.string_at(rdata + self._off_name, ADDR_LEN).split(b"\0", 1)[0].decode("ascii", "replace")
            port = ctypes.c_int.from_address(rdata + self._off_port).value
            msg = ctypes.c_void_p.from_address(rdata + self._off_buf).value
            size = ctypes.c_int.from_address(rdata + self._off_len).value
            method = ctypes.string_at(msg, 8).split(b" ", 1)[0] if msg and size >= 8 else b""
            if msg and size > 0 and has_empty_tag(ctypes.string_at(msg, min(size, MSG_LIMIT))):
                self.dropped += 1                       # malformed from anyone (trunks included)
                log.info("dropped %s with an empty To/From tag from %s", method.decode("ascii", "replace")[:16], name)
                return CONSUMED
            if self.allows(f"[{name}]:{port}" if ":" in name else f"{name}:{port}"):
                return PASS
            if method in UNTRUSTED_PASS and not (method == b"INVITE" and has_to_tag(
                    ctypes.string_at(msg, min(size, MSG_LIMIT)))):
                return PASS
            self.dropped += 1
            if self.dropped <= 10 or self.dropped % 1000 == 0:
                log.info("dropped %s from untrusted %s (%d so far)", method.decode("ascii", "replace")[:16],
                         name, self.dropped)
            return CONSUMED
        except Exception:  # noqa: BLE001 - never let a Python error escape into pjsip
            log.exception("SIP source guard failed; request passed on")
            return PASS
