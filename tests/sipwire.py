"""Hand-made SIP messages over UDP/TCP: for the hostile-traffic tests, where SIPp's
scenarios are too polite (no SDP, wrong methods, foreign Route headers)."""
from __future__ import annotations

import random
import socket
import time

SDP = ("v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
       "m=audio {rtp} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")


def request(method: str, target: str, src: tuple[str, int], *, sdp: bool = False, to_tag: str = "",
            extra: str = "", call_id: str | None = None, cseq: int = 1, transport: str = "UDP") -> bytes:
    """One SIP request from ``src`` to ``target`` ("host:port"), optionally with an audio offer."""
    ip, port = src
    branch = "z9hG4bK" + "%x" % random.getrandbits(48)
    call_id = call_id or "%x@hostile" % random.getrandbits(64)
    body = SDP.format(ip=ip, rtp=port + 2) if sdp else ""
    to = f"<sip:100@{target}>" + (f";tag={to_tag}" if to_tag else "")
    head = (f"{method} sip:100@{target} SIP/2.0\r\n"
            f"Via: SIP/2.0/{transport} {ip}:{port};branch={branch};rport\r\n"
            f"From: <sip:scanner@{ip}:{port}>;tag={random.getrandbits(32):x}\r\n"
            f"To: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
            f"Contact: <sip:scanner@{ip}:{port}>\r\nMax-Forwards: 70\r\n"
            f"User-Agent: hostile-test\r\n{extra}")
    if body:
        head += "Content-Type: application/sdp\r\n"
    return (head + f"Content-Length: {len(body.encode())}\r\n\r\n" + body).encode()


def status_of(msg: bytes) -> int | None:
    line = msg.split(b"\r\n", 1)[0]
    if line.startswith(b"SIP/2.0 "):
        try:
            return int(line.split()[1])
        except (IndexError, ValueError):
            return None
    return None


class UdpPeer:
    """A UDP socket on ``ip`` that sends requests and gathers what comes back."""

    def __init__(self, ip: str = "127.0.0.1", port: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, port))
        self.addr = self.sock.getsockname()

    def send(self, data: bytes, dest: tuple[str, int]) -> None:
        self.sock.sendto(data, dest)

    def gather(self, seconds: float, until_final: bool = False) -> list[bytes]:
        """Every datagram received for ``seconds`` (or until a final response)."""
        out: list[bytes] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                data, _ = self.sock.recvfrom(65535)
            except (socket.timeout, ConnectionRefusedError):
                continue
            out.append(data)
            st = status_of(data)
            if until_final and st is not None and st >= 200:
                break
        return out

    def ask(self, method: str, dest: tuple[str, int], seconds: float = 2.0, **kw) -> list[int]:
        """Send one request and return the status codes of the responses to it."""
        self.send(request(method, f"{dest[0]}:{dest[1]}", self.addr, **kw), dest)
        return [s for s in map(status_of, self.gather(seconds, until_final=True)) if s is not None]

    def close(self) -> None:
        self.sock.close()
