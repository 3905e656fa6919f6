"""pjsua reuses a call slot at once (4 slots, 3 calls a cell): a call that ends and the next
INVITE, read in the same ``libHandleEvents``, share a slot. pjsua2's ``Call`` destructor acts
on its slot index (clears the slot's user data, hangs up whatever call is active there), so
the engine must never let an ended call's wrapper go while its slot holds a newer call.

Issue 14's soak: short calls through the front failed steadily from ~11 s in (603 Decline
before 180, a BYE from the cell just after the 200, then ``pjsua reused its slot`` in the
cell log and more of the same), because the old wrapper, dropped after the poll, hung up the
new call and cut it off from its callbacks; ending that stale leg later did the same to the
next call in the slot.

This test puts the BYE of the call in slot 0 and the INVITE that pjsua gives slot 0 to into
the engine's socket while its process is stopped (SIGSTOP), so that one poll reads both."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

from support import ROOT, next_ports

# The engine in its own process (one pjsua2 library per process); it prints READY, then on any
# line on stdin the calls' ends and the warnings it logged, and exits.
ENGINE = r"""
import json, logging, sys
from sip.engine import Engine, EngineConfig, TrunkSpec
from sip import events as ev
warnings = []
class Keep(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
h = Keep(level=logging.WARNING)
logging.getLogger("trunkline.sip").addHandler(h)
sip_port, rtp = int(sys.argv[1]), int(sys.argv[2])
events = []
e = Engine(EngineConfig(host="127.0.0.1", port=sip_port, rtp_low=rtp, rtp_high=rtp + 20, tcp=False,
                        rtp_timeout=0, trunks=[TrunkSpec("local", allow=["127.0.0.1/32"])]), events.append)
e.start()
print("READY", flush=True)
sys.stdin.readline()
ended = {x.call_id: x.reason for x in events if isinstance(x, ev.CallEnded)}
rejected = [x.status for x in events if isinstance(x, ev.CallRejected)]
legs = len(e.legs)
e.stop()
print("RESULT " + json.dumps({"ended": ended, "rejected": rejected, "warnings": warnings, "legs": legs}), flush=True)
"""

SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio {rtp} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")


class Uac:
    """A bare UDP caller: INVITE with an offer, ACK, BYE; keeps what came back per Call-ID."""

    def __init__(self, port: int, target: tuple[str, int]):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.port, self.target = port, target
        self.calls: dict[str, dict] = {}
        self.got: dict[str, list[str]] = {}       # call id -> first lines received (responses, requests)

    def _send(self, call_id: str, method: str, cseq: int, body: str = "") -> bytes:
        c = self.calls[call_id]
        to = f"<sip:echo@127.0.0.1:{self.target[1]}>" + (f";tag={c['to_tag']}" if c.get("to_tag") else "")
        branch = "z9hG4bK" + ("%x" % random.getrandbits(48) if method != "ACK" or c.get("ack_branch") is None
                              else c["ack_branch"])
        msg = (f"{method} {c.get('contact') or f'sip:echo@127.0.0.1:{self.target[1]}'} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};branch={branch};rport\r\n"
               f"From: <sip:soak@127.0.0.1:{self.port}>;tag={c['from_tag']}\r\nTo: {to}\r\n"
               f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
               f"Contact: <sip:soak@127.0.0.1:{self.port}>\r\nMax-Forwards: 70\r\n")
        if body:
            msg += "Content-Type: application/sdp\r\n"
        data = (msg + f"Content-Length: {len(body)}\r\n\r\n" + body).encode()
        self.sock.sendto(data, self.target)
        return data

    def invite(self, call_id: str, rtp: int) -> None:
        self.calls[call_id] = {"from_tag": "%x" % random.getrandbits(32)}
        self._send(call_id, "INVITE", 1, SDP.format(rtp=rtp))

    def ack(self, call_id: str) -> None:
        self._send(call_id, "ACK", 1)

    def bye(self, call_id: str) -> None:
        self._send(call_id, "BYE", 2)

    def pump(self, seconds: float) -> None:
        """Read for ``seconds``: note each message, take the To-tag and Contact of a 200 to
        INVITE, answer a request from the cell (its BYE) with 200."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data, addr = self.sock.recvfrom(65535)
            except (socket.timeout, BlockingIOError):
                continue
            head = data.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
            fields = {}
            for h in head[1:]:
                k, _, v = h.partition(":")
                fields.setdefault(k.strip().lower(), v.strip())
            call_id = fields.get("call-id") or fields.get("i", "")
            cseq = fields.get("cseq", "")
            self.got.setdefault(call_id, []).append(f"{head[0].split(' sip:')[0]} / {cseq}")
            if head[0].startswith("SIP/2.0 200") and cseq.endswith("INVITE") and call_id in self.calls:
                c = self.calls[call_id]
                to = fields.get("to") or fields.get("t", "")
                c["to_tag"] = to.split("tag=", 1)[1].split(";")[0] if "tag=" in to else ""
                contact = fields.get("contact") or fields.get("m", "")
                c["contact"] = contact[contact.find("<") + 1:contact.find(">")] if "<" in contact else None
            elif head[0].startswith("SIP/2.0") and cseq.endswith("INVITE") and int(head[0].split()[1]) >= 300:
                c = self.calls.setdefault(call_id, {"from_tag": ""})
                to = fields.get("to") or fields.get("t", "")
                c["to_tag"] = to.split("tag=", 1)[1].split(";")[0] if "tag=" in to else ""
                c["ack_branch"] = (fields.get("via") or fields.get("v", "")).split("branch=z9hG4bK", 1)[-1].split(";")[0]
                self._send(call_id, "ACK", 1)              # ACK to a negative answer (same branch)
            elif not head[0].startswith("SIP/2.0"):
                reply = ["SIP/2.0 200 OK"] + [h for h in head[1:] if h.split(":", 1)[0].strip().lower()
                                              in ("via", "v", "from", "f", "to", "t", "call-id", "i", "cseq")]
                self.sock.sendto(("\r\n".join(reply) + "\r\nContent-Length: 0\r\n\r\n").encode(), addr)

    def pump_until(self, done, timeout: float = 10.0) -> bool:
        """Read until ``done()`` holds (or ``timeout``): a loaded machine may be slow to answer."""
        end = time.monotonic() + timeout
        while not done() and time.monotonic() < end:
            self.pump(0.05)
        return done()

    def has(self, call_id: str, first: str, method: str) -> bool:
        return any(x.startswith(first) and x.endswith(method) for x in self.got.get(call_id, []))

    def answered(self, call_id: str) -> bool:
        return any(x.startswith("SIP/2.0 200") and x.endswith("INVITE") for x in self.got.get(call_id, []))

    def close(self) -> None:
        self.sock.close()


def test_a_reused_call_slot_never_ends_the_next_call():
    p = next_ports()
    eng = subprocess.Popen([sys.executable, "-c", ENGINE, str(p["sip"]), str(p["rtp_lo"])], cwd=ROOT,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    uac = Uac(p["sipp"], ("127.0.0.1", p["sip"]))
    try:
        assert eng.stdout.readline().strip() == "READY", eng.stderr.read()[-3000:]
        rtp = p["rtp_peer"]
        # slots 0, 1, 2: three answered calls (the cell's capacity)
        for n, cid in enumerate(("a@slot", "x@slot", "y@slot")):
            uac.invite(cid, rtp + 2 * n)
            assert uac.pump_until(lambda c=cid: uac.answered(c)), uac.got
            uac.ack(cid)
        # slot 3: a fourth call is refused (503, full); pjsua's next slot is 0 again
        uac.invite("z@slot", rtp + 6)
        assert uac.pump_until(lambda: uac.has("z@slot", "SIP/2.0 503", "INVITE")), uac.got
        uac.pump(0.5)
        # the BYE of the call in slot 0 and a new INVITE, read by one poll: the new call gets slot 0
        os.kill(eng.pid, signal.SIGSTOP)
        try:
            uac.bye("a@slot")
            uac.invite("b@slot", rtp + 8)
            time.sleep(0.2)
        finally:
            os.kill(eng.pid, signal.SIGCONT)
        assert uac.pump_until(lambda: uac.answered("b@slot")), uac.got
        uac.ack("b@slot")
        uac.pump(1.5)
        # the new call is up: the cell neither declined nor hung it up
        assert [x for x in uac.got["b@slot"] if x.startswith(("BYE", "SIP/2.0 603"))] == [], uac.got["b@slot"]
        for cid in ("b@slot", "x@slot", "y@slot"):
            uac.bye(cid)
        for cid in ("a@slot", "b@slot", "x@slot", "y@slot"):
            assert uac.pump_until(lambda c=cid: uac.has(c, "SIP/2.0 200", "BYE")), (cid, uac.got[cid])
        out, err = eng.communicate("quit\n", timeout=30)
        line = [x for x in out.splitlines() if x.startswith("RESULT ")]
        assert line, out[-2000:] + err[-3000:]
        res = json.loads(line[0][7:])
        # every call ended for the engine as the caller ended it; nothing left behind
        assert res["ended"] == {cid: "remote bye" for cid in ("a@slot", "x@slot", "y@slot", "b@slot")}, res
        assert res["rejected"] == [503], res
        assert not [w for w in res["warnings"] if "reused its slot" in w], res["warnings"]
        assert res["legs"] == 0, res
    finally:
        uac.close()
        if eng.poll() is None:
            os.kill(eng.pid, signal.SIGCONT)
            eng.kill()
            eng.wait(10)
