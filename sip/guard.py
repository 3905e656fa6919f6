"""A pjsip module that drops requests from untrusted sources before pjsua sees them.

pjsua answers some requests inside its own C modules with no Python hook: an
out-of-dialog OPTIONS gets 200 (with Allow/Accept/Supported: a fingerprint), a
MESSAGE gets 200 before ``onInstantMessage`` runs. From an address outside every
trunk's allow-list that is an answer to a stranger, and over UDP a reflector.

pjsua2 exposes no request hook, but its extension exports the pjsip C API, so this
registers a small pjsip module (priority 15: before the transaction layer) through
ctypes. For each request it reads the source address from the ``pjsip_rx_data``;
an untrusted source's INVITE, ACK and CANCEL go on to the engine (which refuses the
INVITE with 403 and reports it as ``call_rejected``); every other method from an
untrusted source is dropped unanswered.

The offsets of ``pkt_info.src_name`` and ``msg_info.msg_buf`` inside ``pjsip_rx_data``
depend on how pjproject was built (e.g. PJSIP_MAX_PKT_LEN), so they are not hard-coded:
at start the engine sends itself one OPTIONS from a known loopback address and port,
and ``Guard.calibrate`` finds them in that request's rdata. If calibration fails the
guard stays off and says so in the log (the front still filters in a box).

Engine thread only (pjsip calls the module from ``libHandleEvents``).
"""
from __future__ import annotations

import ctypes
import logging
import secrets
import socket
import struct
from typing import Callable

log = logging.getLogger("trunkline.sip")

PASS, CONSUMED = 0, 1
MODULE_PRIORITY = 15                     # PJSIP_MOD_PRIORITY_TSX_LAYER is 16
SCAN_BYTES = 6144                        # how much of one rdata calibration looks at
ADDR_LEN = 46                            # PJ_INET6_ADDRSTRLEN
UNTRUSTED_PASS = (b"INVITE", b"ACK", b"CANCEL")   # the engine refuses (403) and reports these


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


class Guard:
    """``allows(ip) -> bool`` decides; ``dropped`` counts what was dropped."""

    def __init__(self, allows: Callable[[str], bool]):
        self.allows = allows
        self.dropped = 0
        self.active = False
        self.marker = b"trunkline-guard-" + secrets.token_hex(8).encode()
        self._expect: tuple[bytes, int] | None = None     # calibration source (ip, port)
        self._off_name = self._off_port = self._off_buf = -1
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

    def calibration_packet(self, sock: socket.socket, dest: tuple[str, int]) -> bytes:
        """One OPTIONS from ``sock`` that the module recognises (and swallows)."""
        ip, port = sock.getsockname()[:2]
        self._expect = (ip.encode(), port)
        host = f"[{ip}]" if ":" in ip else ip
        return (f"OPTIONS sip:guard@{host} SIP/2.0\r\nVia: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{self.marker[-8:].decode()}"
                f"\r\nFrom: <sip:guard@{host}>;tag=1\r\nTo: <sip:guard@{host}>\r\n"
                f"Call-ID: {self.marker.decode()}\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
                ).encode()

    def _calibrate(self, rdata: int) -> bool:
        """Find the source-name and message-buffer offsets in the calibration request."""
        buf = ctypes.string_at(rdata, SCAN_BYTES)
        start = buf.find(b"OPTIONS sip:guard@")
        if start < 0 or self.marker not in buf or self._expect is None:
            return False
        ip, port = self._expect
        at = start
        while True:
            at = buf.find(ip + b"\0", at + 1)
            if at < 0 or at + ADDR_LEN + 8 > len(buf):
                return False
            port_at = (at + ADDR_LEN + 3) // 4 * 4
            if struct.unpack_from("<i", buf, port_at)[0] == port:
                break
        ptr = struct.pack("<Q", rdata + start)
        buf_at = buf.find(ptr, port_at)
        if buf_at < 0 or buf_at % 8:
            return False
        self._off_name, self._off_port, self._off_buf = at, port_at, buf_at
        self.active = True
        return True

    def _on_rx_request(self, rdata: int) -> int:
        try:
            if not self.active:
                if self._expect is not None and self._calibrate(rdata):
                    log.info("SIP source guard on: requests from untrusted sources other than "
                             "INVITE/ACK/CANCEL are dropped")
                    self._expect = None
                    return CONSUMED
                return PASS
            name = ctypes.string_at(rdata + self._off_name, ADDR_LEN).split(b"\0", 1)[0].decode("ascii", "replace")
            if self.allows(name):
                return PASS
            msg = ctypes.c_void_p.from_address(rdata + self._off_buf).value
            method = ctypes.string_at(msg, 8).split(b" ", 1)[0] if msg else b""
            if method in UNTRUSTED_PASS:
                return PASS
            self.dropped += 1
            if self.dropped <= 10 or self.dropped % 1000 == 0:
                log.info("dropped %s from untrusted %s (%d so far)", method.decode("ascii", "replace")[:16],
                         name, self.dropped)
            return CONSUMED
        except Exception:  # noqa: BLE001 - never let a Python error escape into pjsip
            log.exception("SIP source guard failed; request passed on")
            return PASS
