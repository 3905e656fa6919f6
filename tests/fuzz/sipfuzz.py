"""A grammar-aware SIP mutation fuzzer: pure (no sockets, no clock) and seedable.

``SipFuzzer(seed, ...).case(i)`` is a pure function of ``(seed, i)``: case ``i`` of a
run can be rebuilt alone from its seed, which is how a failing batch is reproduced.
A case is one or more messages sent in order on one flow (a UDP socket or one TCP
connection). Messages are built as a model (start line, header list, body), mutated
at the grammar level (methods, request URIs, header names and values, folding,
duplicated/missing mandatory headers, SDP lines, multipart bodies), serialised with
framing games (Content-Length lies, bare LF/CR line ends, missing blank line) and
sometimes mutated again at the byte level (truncation, bit flips, binary junk).

Sequences: retransmissions, in-dialog requests (ACK/BYE/CANCEL/re-INVITE/UPDATE/
PRACK/INFO/REFER/NOTIFY) for unknown dialogs in random order, and "dialog" cases
that open a real call with a clean INVITE and then send the same in-dialog requests
out of order for that dialog: their messages hold ``TOTAG`` (the placeholder
below), which the runner replaces with the To-tag the target answered with.

Every address written into a message is a 127.0.0.0/8 literal: a fuzzed Contact or
Via never points the target at another host.
"""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field

TOTAG = b"@@TOTAG@@"              # replaced by the runner with the dialog's To-tag
MAX_UDP = 65000                   # one datagram, with room for IP/UDP headers

METHODS = ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "UPDATE", "INFO",
           "MESSAGE", "SUBSCRIBE", "NOTIFY", "REFER", "PUBLISH"]
ODD_METHODS = ["invite", "INVITE ", "INV ITE", "", "X" * 300, "FOO", "GET", "HTTP/1.1", "SIP/2.0",
               "INVITE\x00", "\xffINVITE", "B\tYE", "OPTIONS\r", "1NVITE", "-", "*"]
IN_DIALOG = ["ACK", "BYE", "CANCEL", "INVITE", "UPDATE", "PRACK", "INFO", "REFER", "NOTIFY", "MESSAGE", "OPTIONS"]
COMPACT = {"Via": "v", "From": "f", "To": "t", "Call-ID": "i", "Contact": "m", "Content-Length": "l",
           "Content-Type": "c", "Supported": "k", "Subject": "s", "Content-Encoding": "e", "Event": "o",
           "Refer-To": "r", "Allow-Events": "u"}
MANDATORY = ["Via", "From", "To", "Call-ID", "CSeq", "Max-Forwards", "Contact", "Content-Length", "Content-Type"]
JUNK_NUMBERS = ["-1", "0", "4294967295", "4294967296", "18446744073709551616", "99999999999999999999999",
                "abc", "", "1.5", "0x10", "1e9", " 1", "+5", "00000000000000000000000001", "NaN"]


@dataclass(frozen=True)
class Endpoint:
    """A loopback address (the target or the source) and transport, e.g. ("127.0.0.1", 5060, "UDP")."""
    ip: str
    port: int
    transport: str = "UDP"

    def __post_init__(self):
        if not ipaddress.ip_address(self.ip).is_loopback:
            raise ValueError(f"the fuzzer only talks to loopback addresses, not {self.ip}")
        if self.transport not in ("UDP", "TCP"):
            raise ValueError(self.transport)

    @property
    def hostport(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass
class Msg:
    """A SIP message as a model: start line, ordered headers (duplicates allowed), body."""
    start: list[str]
    headers: list[list[str]]
    body: bytes = b""
    eol: str = "\r\n"
    content_length: str | None = None     # None: the true length; else this text (a lie)
    no_length: bool = False               # drop Content-Length entirely
    blank_line: bool = True               # the empty line that ends the headers

    def get(self, name: str) -> str | None:
        for h in self.headers:
            if h[0].lower() == name.lower():
                return h[1]
        return None

    def set(self, name: str, value: str) -> None:
        for h in self.headers:
            if h[0].lower() == name.lower():
                h[1] = value
                return
        self.headers.append([name, value])

    def delete(self, name: str) -> None:
        self.headers = [h for h in self.headers if h[0].lower() != name.lower()]

    def serialise(self) -> bytes:
        lines = [" ".join(self.start)]
        for name, value in self.headers:
            if name.lower() in ("content-length", "l"):
                continue
            lines.append(f"{name}: {value}" if name else value)
        if not self.no_length:
            lines.append("Content-Length: " + (self.content_length if self.content_length is not None
                                                else str(len(self.body))))
        head = self.eol.join(lines) + self.eol + (self.eol if self.blank_line else "")
        return head.encode("utf-8", "surrogateescape") + self.body


@dataclass
class Case:
    """What the runner sends on one flow, in order. ``dialog``: the first message opens a
    call and the rest carry ``TOTAG``. ``label`` says what was done (for the saved case)."""
    index: int
    transport: str
    messages: list[bytes]
    label: str
    dialog: bool = False
    pause: float = 0.0                       # seconds between messages (retransmission timing)
    tags: list[str] = field(default_factory=list)


def sdp_offer(ip: str, port: int, rng: random.Random) -> str:
    return ("v=0\r\n"
            f"o=fuzz {rng.getrandbits(31)} {rng.getrandbits(31)} IN IP4 {ip}\r\n"
            "s=-\r\n"
            f"c=IN IP4 {ip}\r\n"
            "t=0 0\r\n"
            f"m=audio {port} RTP/AVP 0 8 101\r\n"
            "a=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
            "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n")


class SipFuzzer:
    """Builds case ``i`` of the run ``seed`` for ``target`` from ``source``.

    ``rtp_port``: where the SDP offers say we receive media (a loopback port nobody
    needs to own). ``max_size`` bounds one message (UDP: one datagram)."""

    def __init__(self, seed: int, target: Endpoint, source: Endpoint, rtp_port: int = 9,
                 max_size: int | None = None):
        if source.transport != target.transport:
            raise ValueError("source and target transports differ")
        self.seed, self.target, self.source, self.rtp_port = seed, target, source, rtp_port
        self.max_size = max_size or (MAX_UDP if target.transport == "UDP" else 200_000)

    # -- building blocks --------------------------------------------------------------
    def request(self, rng: random.Random, method: str, *, call_id: str | None = None, cseq: int | None = None,
                to_tag: str | bytes = "", from_tag: str | None = None, sdp: bool | None = None,
                branch: str | None = None, user: str | None = None) -> Msg:
        t, s = self.target, self.source
        user = user if user is not None else rng.choice(["100", "1001", "alice", "+15551234567", "s", "0"])
        tag = to_tag.decode() if isinstance(to_tag, bytes) else to_tag
        headers = [
            ["Via", f"SIP/2.0/{t.transport} {s.hostport};branch={branch or self.branch(rng)};rport"],
            ["Max-Forwards", "70"],
            ["From", f"<sip:fuzz@{s.hostport}>;tag={from_tag or '%x' % rng.getrandbits(32)}"],
            ["To", f"<sip:{user}@{t.hostport}>" + (f";tag={tag}" if tag else "")],
            ["Call-ID", call_id or self.call_id(rng)],
            ["CSeq", f"{cseq if cseq is not None else rng.randint(1, 50)} {method}"],
            ["Contact", f"<sip:fuzz@{s.hostport};transport={t.transport.lower()}>"],
            ["User-Agent", "sipfuzz"],
        ]
        if method == "SUBSCRIBE":
            headers += [["Event", rng.choice(["presence", "dialog", "message-summary", "refer", "x"])],
                        ["Expires", rng.choice(["0", "60", "3600", "4294967296"])]]
        if method == "REFER":
            headers.append(["Refer-To", f"<sip:200@{t.hostport}>"])
        if method == "PRACK":
            headers.append(["RAck", f"{rng.randint(1, 5)} 1 INVITE"])
        if method == "NOTIFY":
            headers += [["Event", "refer"], ["Subscription-State", "active;expires=60"]]
        if method == "REGISTER":
            headers.append(["Expires", "3600"])
        m = Msg([method, f"sip:{user}@{t.hostport}", "SIP/2.0"], headers)
        want_sdp = sdp if sdp is not None else method in ("INVITE", "UPDATE") and rng.random() < 0.8
        if want_sdp:
            m.body = sdp_offer(s.ip, self.rtp_port, rng).encode()
            m.headers.append(["Content-Type", "application/sdp"])
        elif method == "INFO":
            m.body = f"Signal={rng.choice('0123456789*#ABCD')}\r\nDuration=160\r\n".encode()
            m.headers.append(["Content-Type", "application/dtmf-relay"])
        elif method == "MESSAGE":
            m.body = b"hello"
            m.headers.append(["Content-Type", "text/plain"])
        elif method == "NOTIFY":
            m.body = b"SIP/2.0 200 OK\r\n"
            m.headers.append(["Content-Type", "message/sipfrag;version=2.0"])
        return m

    @staticmethod
    def branch(rng: random.Random) -> str:
        return "z9hG4bK" + "%x" % rng.getrandbits(48)

    @staticmethod
    def call_id(rng: random.Random) -> str:
        return "%x@fuzz" % rng.getrandbits(64)

    def loopback_host(self, rng: random.Random) -> str:
        return rng.choice([self.target.hostport, self.source.hostport, "127.0.0.1", "127.0.0.2:1",
                           "127.255.255.255:65535", "[::1]:5060", "localhost"])

    # -- grammar-level mutators: each changes the model in place and names itself ---------
    @staticmethod
    def _pad(m: Msg) -> None:
        while len(m.start) < 3:
            m.start.append("")

    def m_method(self, m: Msg, rng: random.Random) -> str:
        self._pad(m)
        m.start[0] = rng.choice(ODD_METHODS + METHODS)
        return "method"

    def m_uri(self, m: Msg, rng: random.Random) -> str:
        self._pad(m)
        h = self.loopback_host(rng)
        m.start[1] = rng.choice([
            f"sip:{'9' * rng.randint(100, 5000)}@{h}", f"sips:100@{h}", "tel:+15551234567", f"sip:{h}",
            "sip:", "sip:@", f"<sip:100@{h}>", "", "*", f"sip:100@{h};transport=sctp;lr;maddr=127.0.0.1",
            f"sip:%00%ff%@{h}", f"sip:100@{h}?Route=%3Csip:127.0.0.1%3E&body=x", "sip:100@[::1", "sip:100@:0",
            f"sip:100@127.0.0.1:{rng.choice(['0', '65536', '99999', '-1', 'x'])}", f"SIP:100@{h}",
            f"sip:a b@{h}", "http://127.0.0.1/", f"sip:100@{h};" + ";".join(f"p{i}={i}" for i in range(300)),
            f"sip:\u00e9\u00e8@{h}", "sip:100@" + "a." * 200 + "invalid"])
        return "uri"

    def m_version(self, m: Msg, rng: random.Random) -> str:
        self._pad(m)
        m.start[2:] = [rng.choice(["SIP/3.0", "SIP/2.0x", "sip/2.0", "HTTP/1.1", "", "SIP/2", "SIP/2.0 extra",
                                   "SIP/99999999999.0", "SIP/2.0\x00"])]
        return "version"

    def m_start_fields(self, m: Msg, rng: random.Random) -> str:
        self._pad(m)
        choice = rng.randrange(4)
        if choice == 0:
            m.start = m.start[:rng.randint(0, 2)]
        elif choice == 1:
            m.start = [m.start[0], "", m.start[1], "\t", *m.start[2:]]
        elif choice == 2:
            m.start = [" ".join(m.start) + " " * rng.randint(1, 50)]
        else:
            m.start = [" " + " ".join(m.start)]
        return "start-fields"

    def m_as_response(self, m: Msg, rng: random.Random) -> str:
        code = rng.choice(["100", "180", "183", "200", "202", "401", "407", "481", "487", "503", "699", "0",
                           "999", "1000", "abc", "-200", "2000000000"])
        m.start = ["SIP/2.0", code, rng.choice(["OK", "", "X" * 500, "Trying"])]
        return f"stray-response-{code}"

    def m_delete_mandatory(self, m: Msg, rng: random.Random) -> str:
        names = rng.sample(MANDATORY, rng.randint(1, 3))
        for n in names:
            m.delete(n)
            if n == "Content-Length":
                m.no_length = True
        return "missing-" + "+".join(names)

    def m_duplicate(self, m: Msg, rng: random.Random) -> str:
        if not m.headers:
            return "dup-none"
        h = rng.choice(m.headers)
        value = h[1] if rng.random() < 0.5 else self.odd_value(h[0], rng)
        m.headers.insert(rng.randrange(len(m.headers) + 1), [h[0], value])
        return f"dup-{h[0]}"

    def odd_value(self, name: str, rng: random.Random) -> str:
        n = name.lower()
        if n in ("cseq",):
            return f"{rng.choice(JUNK_NUMBERS)} {rng.choice(METHODS + ['', 'X' * 100])}"
        if n in ("max-forwards", "expires", "content-length", "l", "min-se", "session-expires", "rseq"):
            return rng.choice(JUNK_NUMBERS)
        if n in ("via", "v"):
            return rng.choice([
                "SIP/2.0/UDP", "SIP/2.0/UDP 127.0.0.1:5060", "SIP/2.0/XYZ 127.0.0.1;branch=z9hG4bKx",
                f"SIP/2.0/UDP {self.source.hostport};branch=", "SIP/2.0/UDP 127.0.0.1:99999;branch=z9hG4bK1",
                f"SIP/2.0/UDP {self.source.hostport};branch=z9hG4bK{'a' * 5000}",
                f"SIP/2.0/UDP {self.source.hostport};rport=abc;received=notanip;branch=z9hG4bK2",
                "SIP/2.0/UDP [::1;branch=z9hG4bK3", "garbage", "",
                ", ".join(f"SIP/2.0/UDP 127.0.0.{i % 250 + 1};branch=z9hG4bK{i}" for i in range(200))])
        if n in ("from", "to", "f", "t", "contact", "m", "route", "record-route", "refer-to", "r"):
            h = self.loopback_host(rng)
            return rng.choice([
                "", "<", ">", "<sip:", f"<sip:x@{h}", f'"unbalanced <sip:x@{h}>', f"sip:x@{h};tag=",
                f"<sip:x@{h}>;tag={'t' * 3000}", f"<sip:x@{h}>;tag=a;tag=b", "*", f"<sip:x@{h}>;expires=-1",
                ", ".join(f"<sip:{i}@{h}>" for i in range(300)), f"<tel:123>;tag=1", f"<sip:x@{h}>;lr;;;;",
                '"\\"\\\\\\" <sip:x@' + h + ">", "\u0000<sip:x@127.0.0.1>"])
        if n in ("content-type", "c"):
            return rng.choice(["", "application/sdp;charset=", "multipart/mixed", "multipart/mixed;boundary=",
                               "application", "text/plain", "application/sdp, text/plain", "*/*",
                               "multipart/mixed;boundary=" + "b" * 5000, "application/isup;version=itu-t92+"])
        if n in ("call-id", "i"):
            return rng.choice(["", "@", "a" * 10000, "\x00", "x y z",
                               "%x@%s" % (rng.getrandbits(64), self.loopback_host(rng))])
        return self.junk_text(rng)

    @staticmethod
    def junk_text(rng: random.Random) -> str:
        return rng.choice(["", " ", "\t", ";;;;", "=" * 100, "A" * rng.randint(1, 20000), '"', "<>", "\\",
                           "%00", "\x00\x01\x02", "\u2028", "${jndi:ldap://127.0.0.1/x}", "' OR 1=1 --",
                           "%s%s%s%n", "\xff\xfe", ",,,", "a=b;" * 500])

    def m_header_value(self, m: Msg, rng: random.Random) -> str:
        if not m.headers:
            return "value-none"
        h = rng.choice(m.headers)
        h[1] = self.odd_value(h[0], rng)
        return f"value-{h[0]}"

    def m_header_name(self, m: Msg, rng: random.Random) -> str:
        if not m.headers:
            return "name-none"
        h = rng.choice(m.headers)
        h[0] = rng.choice([COMPACT.get(h[0], h[0].lower()), h[0].upper(), h[0].lower(), h[0] + " ", " " + h[0],
                           h[0] + "\t", h[0] + ":", "", h[0] + "\x00", h[0].replace("-", "_"), "X-" * 500 + h[0]])
        return f"name-{h[0][:20]}"

    def m_no_colon(self, m: Msg, rng: random.Random) -> str:
        if m.headers:
            h = rng.choice(m.headers)
            h[0], h[1] = "", f"{h[0]} {h[1]}"
        return "no-colon"

    def m_fold(self, m: Msg, rng: random.Random) -> str:
        if not m.headers:
            return "fold-none"
        h = rng.choice(m.headers)
        parts = h[1].split(" ") if " " in h[1] else [h[1][:len(h[1]) // 2], h[1][len(h[1]) // 2:]]
        h[1] = (m.eol + rng.choice([" ", "\t", "  \t "])).join(parts)
        if rng.random() < 0.2:              # fold into nothing: a continuation line alone
            m.headers.insert(rng.randrange(len(m.headers) + 1), ["", " continued"])
        return f"fold-{h[0]}"

    def m_many_headers(self, m: Msg, rng: random.Random) -> str:
        n = rng.choice([100, 500, 2000])
        for i in range(n):
            m.headers.insert(rng.randrange(len(m.headers) + 1), [rng.choice([f"X-F{i}", "Via", "Route",
                                                                             "Record-Route", "Supported"]),
                                                                 rng.choice(["a", f"<sip:127.0.0.1:{i};lr>",
                                                                             f"SIP/2.0/UDP 127.0.0.1;branch=z9hG4bK{i}"])])
        return f"many-headers-{n}"

    def m_huge_header(self, m: Msg, rng: random.Random) -> str:
        size = rng.choice([1024, 8192, 16384, 40000, 60000])
        name = rng.choice(["Subject", "X-Huge", "User-Agent", "Call-ID", "Via", "To", "Contact"])
        value = rng.choice(["A", "%", ";a=b", ", <sip:127.0.0.1>"]) * (size // 4)
        m.set(name, value[:size])
        return f"huge-{name}-{size}"

    def m_sdp(self, m: Msg, rng: random.Random) -> str:
        lines = (m.body.decode("utf-8", "replace").split("\r\n") if m.body
                 else sdp_offer(self.source.ip, self.rtp_port, rng).split("\r\n"))
        lines = [x for x in lines if x]
        what = []
        for _ in range(rng.randint(1, 4)):
            k = rng.randrange(14)
            if k == 0:                                    # m= port
                lines = [f"m=audio {rng.choice(['0', '1', '65535', '65536', '-1', '99999999999', 'x', ''])} "
                         f"RTP/AVP 0" if x.startswith("m=") else x for x in lines]
                what.append("m-port")
            elif k == 1:                                  # m= proto / formats
                fmts = rng.choice(["", "0 " * 500, " ".join(str(i) for i in range(128)), "255 256 -1", "x y",
                                   "96", "13", "18 4 3 9"])
                proto = rng.choice(["RTP/AVP", "RTP/SAVP", "UDP/TLS/RTP/SAVPF", "TCP/RTP/AVP", "udptl", "X"])
                lines = [f"m=audio {self.rtp_port} {proto} {fmts}" if x.startswith("m=") else x for x in lines]
                what.append("m-fmts")
            elif k == 2:                                  # extra m= lines
                extra = rng.choice([f"m=video {self.rtp_port + 2} RTP/AVP 96\r\na=rtpmap:96 H264/90000",
                                    f"m=image {self.rtp_port + 4} udptl t38", "m=application 9 TCP/BFCP *",
                                    f"m=audio {self.rtp_port + 6} RTP/AVP 0"] * rng.choice([1, 2, 50]))
                lines.append(extra)
                what.append("m-extra")
            elif k == 3:                                  # c=
                c = rng.choice(["c=IN IP6 ::1", "c=IN IP4 0.0.0.0", "c=IN IP4 255.255.255.255", "c=IN IP4",
                                "c=IN IP4 127.0.0.1/127/3", "c=XX YY ZZ", "c=IN IP4 " + "9" * 300, "c=",
                                "c=IN IP4 224.0.0.1/1"])
                lines = [c if x.startswith("c=") else x for x in lines]
                what.append("c")
            elif k == 4:
                lines = [x for x in lines if not x.startswith(rng.choice(["c=", "m=", "v=", "o=", "s=", "t="]))]
                what.append("missing-line")
            elif k == 5:                                  # rtpmap games
                lines.append(rng.choice(["a=rtpmap:0 PCMU/0", "a=rtpmap:0 PCMA/8000", "a=rtpmap:96 opus/48000/2",
                                         "a=rtpmap:abc", "a=rtpmap:", "a=rtpmap:96 telephone-event/0",
                                         "a=rtpmap:127 " + "X" * 3000 + "/8000", "a=rtpmap:0 PCMU/8000/999",
                                         "a=rtpmap:-1 PCMU/8000", "a=rtpmap:9 G722/4294967296"]))
                what.append("rtpmap")
            elif k == 6:
                lines.append(rng.choice(["a=fmtp:101 " + "0-" * 2000, "a=fmtp:101 99999999-0", "a=fmtp:",
                                         "a=ptime:0", "a=ptime:-20", "a=ptime:100000", "a=maxptime:1",
                                         "a=rtcp:0", "a=rtcp:70000 IN IP4 127.0.0.1", "a=rtcp-mux",
                                         "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:" + "A" * 500,
                                         "a=fingerprint:sha-256 00", "a=setup:actpass", "a=ice-ufrag:x",
                                         "a=candidate:1 1 UDP 1 127.0.0.1 9 typ host", "a=" + "z" * 8000]))
                what.append("attr")
            elif k == 7:
                lines.append(rng.choice(["a=sendonly", "a=recvonly", "a=inactive", "a=sendrecv"]) * 1)
                what.append("direction")
            elif k == 8:
                rng.shuffle(lines)
                what.append("shuffled")
            elif k == 9:
                lines = lines + lines
                what.append("doubled")
            elif k == 10:
                lines = ["v=" + rng.choice(["1", "", "x", "0 0"])] + [x for x in lines if not x.startswith("v=")]
                what.append("v")
            elif k == 11:
                lines = [x + rng.choice([" ", "\x00", "\t", "=", "\r"]) for x in lines]
                what.append("trailing")
            elif k == 12:
                lines = [x.replace("=", " = ", 1) for x in lines]
                what.append("spaced")
            else:
                lines = lines[:rng.randint(0, len(lines))]
                what.append("cut")
        m.body = ("\r\n".join(lines) + rng.choice(["\r\n", "\n", ""])).encode("utf-8", "surrogateescape")
        m.set("Content-Type", "application/sdp")
        return "sdp-" + "+".join(what)

    def m_multipart(self, m: Msg, rng: random.Random) -> str:
        b = rng.choice(["b1", "unique-boundary-1", "", "-", "x" * 70, "a b"])
        sdp = sdp_offer(self.source.ip, self.rtp_port, rng)
        parts = [f"Content-Type: application/sdp\r\n\r\n{sdp}",
                 "Content-Type: application/isup;version=itu-t92+\r\nContent-Disposition: signal;handling=optional"
                 "\r\n\r\n\x01\x00\x49\x00\x00\x03\x02\x00\x07\x04\x10\x00\x33\x63\x21\x43\x00\x00\x03",
                 "Content-Type: text/plain\r\n\r\nhello",
                 f"Content-Type: multipart/mixed;boundary=inner\r\n\r\n--inner\r\nContent-Type: application/sdp"
                 f"\r\n\r\n{sdp}\r\n--inner--",
                 "Content-Type: application/sdp\r\n\r\n", "no headers at all"]
        chosen = rng.sample(parts, rng.randint(0, len(parts)))
        body = "".join(f"--{b}\r\n{p}\r\n" for p in chosen)
        body += rng.choice([f"--{b}--\r\n", "", f"--{b}", "--other--\r\n"])
        m.body = body.encode("latin-1", "replace")
        m.set("Content-Type", rng.choice([f"multipart/mixed;boundary={b}", "multipart/mixed",
                                          f'multipart/alternative;boundary="{b}"', f"multipart/related;boundary={b}x"]))
        return "multipart"

    def m_body_type(self, m: Msg, rng: random.Random) -> str:
        m.body = rng.choice([b"", b"\x00" * 100, bytes(rng.getrandbits(8) for _ in range(200)),
                             b"<?xml version='1.0'?><x>" + b"<a>" * 500, b'{"a":' * 500, b"v=0\r\n" * 1000])
        m.set("Content-Type", rng.choice(["application/sdp", "application/pidf+xml", "application/json",
                                          "application/dtmf-relay", "message/sipfrag"]))
        return "body"

    MODEL_MUTATORS = ["m_method", "m_uri", "m_version", "m_start_fields", "m_as_response", "m_delete_mandatory",
                      "m_duplicate", "m_header_value", "m_header_name", "m_no_colon", "m_fold", "m_many_headers",
                      "m_huge_header", "m_sdp", "m_multipart", "m_body_type"]
    # how often each is picked: SDP and header values most, the start line often
    WEIGHTS = [3, 3, 1, 1, 2, 4, 4, 6, 3, 1, 2, 1, 1, 6, 2, 1]

    # -- framing and byte-level mutators ----------------------------------------------
    def frame(self, m: Msg, rng: random.Random) -> str:
        k = rng.randrange(9)
        if k == 0:
            m.content_length = str(len(m.body) + rng.choice([1, 10, 1000, 100000]))
            return "length-longer"
        if k == 1:
            m.content_length = str(max(0, len(m.body) - rng.randint(1, max(1, len(m.body)))))
            return "length-shorter"
        if k == 2:
            m.content_length = rng.choice(JUNK_NUMBERS)
            return "length-junk"
        if k == 3:
            m.no_length = True
            return "length-missing"
        if k == 4:
            m.eol = rng.choice(["\n", "\r", "\n\r", "\r\r\n"])
            return "eol"
        if k == 5:
            m.blank_line = False
            return "no-blank-line"
        if k == 6:
            m.headers.append(["Content-Length", rng.choice(["0", "5", "100"])])
            m.content_length = rng.choice(["0", "100"])
            return "length-twice"
        return "frame-ok"

    def bytes_mutate(self, data: bytes, rng: random.Random) -> tuple[bytes, str]:
        k = rng.randrange(8)
        b = bytearray(data)
        if k == 0 and b:
            return bytes(b[:rng.randrange(len(b))]), "truncated"
        if k == 1 and b:
            for _ in range(rng.randint(1, 20)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
            return bytes(b), "bitflip"
        if k == 2:
            i = rng.randrange(len(b) + 1)
            junk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
            return bytes(b[:i]) + junk + bytes(b[i:]), "junk-inserted"
        if k == 3:
            return b"\r\n" * rng.randint(1, 20) + bytes(b), "leading-crlf"
        if k == 4 and b:
            i = rng.randrange(len(b))
            return bytes(b[:i]) + b"\x00" + bytes(b[i:]), "nul"
        if k == 5:
            return bytes(b) + bytes(b), "two-in-one"
        if k == 6:
            return bytes(b) + b"\r\n" * rng.randint(1, 5), "trailing-crlf"
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 1500))), "random-bytes"

    # -- cases ---------------------------------------------------------------------------
    def case(self, index: int) -> Case:
        rng = random.Random(f"{self.seed}:{index}:{self.target.transport}")
        kind = rng.choices(["single", "retransmit", "unknown-dialog", "known-dialog", "cancel", "keepalive"],
                           weights=[70, 6, 8, 10, 4, 2])[0]
        case = getattr(self, "case_" + kind.replace("-", "_"))(rng, index)
        case.messages = [x[:self.max_size] for x in case.messages]
        return case

    def mutated(self, rng: random.Random, m: Msg, n: int | None = None, byte_level: float = 0.15) -> tuple[bytes, str]:
        labels = []
        for _ in range(n if n is not None else rng.choice([1, 1, 1, 2, 3])):
            name = rng.choices(self.MODEL_MUTATORS, weights=self.WEIGHTS)[0]
            labels.append(getattr(self, name)(m, rng))
        labels.append(self.frame(m, rng))
        data = m.serialise()
        if rng.random() < byte_level:
            data, what = self.bytes_mutate(data, rng)
            labels.append(what)
        return data, ",".join(x for x in labels if x != "frame-ok")

    def case_single(self, rng: random.Random, index: int) -> Case:
        method = rng.choice(METHODS)
        data, label = self.mutated(rng, self.request(rng, method))
        return Case(index, self.target.transport, [data], f"single {method}: {label}")

    def case_retransmit(self, rng: random.Random, index: int) -> Case:
        method = rng.choice(["INVITE", "OPTIONS", "BYE", "REGISTER", "SUBSCRIBE"])
        m = self.request(rng, method)
        data, label = self.mutated(rng, m, n=rng.choice([0, 1])) if rng.random() < 0.6 else (m.serialise(), "clean")
        n = rng.randint(2, 7)
        return Case(index, self.target.transport, [data] * n, f"retransmit x{n} {method}: {label}",
                    pause=rng.choice([0.0, 0.0, 0.05, 0.5]))

    def case_unknown_dialog(self, rng: random.Random, index: int) -> Case:
        call_id, from_tag, to_tag = self.call_id(rng), "%x" % rng.getrandbits(32), "%x" % rng.getrandbits(32)
        out, labels = [], []
        for _ in range(rng.randint(1, 6)):
            method = rng.choice(IN_DIALOG)
            m = self.request(rng, method, call_id=call_id, from_tag=from_tag, to_tag=to_tag,
                             cseq=rng.randint(1, 10))
            if rng.random() < 0.3:
                m.headers.insert(0, ["Route", f"<sip:{self.loopback_host(rng)};lr>"])
            if rng.random() < 0.4:
                data, label = self.mutated(rng, m, n=1, byte_level=0.05)
            else:
                data, label = m.serialise(), "clean"
            out.append(data)
            labels.append(f"{method}({label})")
        return Case(index, self.target.transport, out, "unknown dialog: " + " ".join(labels))

    def case_known_dialog(self, rng: random.Random, index: int) -> Case:
        """A clean INVITE opens a call; then in-dialog requests for it in random order,
        some mutated, some duplicated, and (usually) a BYE to end it."""
        call_id, from_tag = self.call_id(rng), "%x" % rng.getrandbits(32)
        invite = self.request(rng, "INVITE", call_id=call_id, from_tag=from_tag, cseq=1, sdp=True, user="100")
        out, labels = [invite.serialise()], ["INVITE"]
        cseq = 2
        steps = [rng.choice(IN_DIALOG) for _ in range(rng.randint(1, 7))]
        if rng.random() < 0.85:
            steps.append("BYE")
        for method in steps:
            seq = 1 if method in ("ACK", "CANCEL") and rng.random() < 0.7 else rng.choice([cseq, cseq, 0, cseq - 5])
            m = self.request(rng, method, call_id=call_id, from_tag=from_tag, to_tag=TOTAG, cseq=seq,
                             sdp=(method in ("INVITE", "UPDATE") and rng.random() < 0.7), user="100")
            cseq += 1
            if rng.random() < 0.35:
                data, label = self.mutated(rng, m, n=1, byte_level=0.0)
            else:
                data, label = m.serialise(), "clean"
            out.append(data)
            labels.append(f"{method}({label})")
            if rng.random() < 0.15:
                out.append(data)
                labels.append("dup")
        return Case(index, self.target.transport, out, "known dialog: " + " ".join(labels), dialog=True,
                    pause=0.02)

    def case_cancel(self, rng: random.Random, index: int) -> Case:
        call_id, from_tag, branch = self.call_id(rng), "%x" % rng.getrandbits(32), self.branch(rng)
        inv = self.request(rng, "INVITE", call_id=call_id, from_tag=from_tag, cseq=1, sdp=rng.random() < 0.7,
                           branch=branch, user="100")
        cancel = self.request(rng, "CANCEL", call_id=call_id, from_tag=from_tag, cseq=rng.choice([1, 1, 2]),
                              branch=branch if rng.random() < 0.7 else self.branch(rng), user="100")
        seq = rng.choice([[inv, cancel], [cancel, inv], [inv, cancel, cancel], [cancel], [inv, inv, cancel]])
        return Case(index, self.target.transport, [x.serialise() for x in seq],
                    "cancel: " + " ".join(x.start[0] for x in seq), pause=rng.choice([0.0, 0.01]))

    def case_keepalive(self, rng: random.Random, index: int) -> Case:
        data = rng.choice([b"\r\n\r\n", b"\r\n", b"", b"\x00", b" " * 100, b"\r\n" * 1000])
        return Case(index, self.target.transport, [data], "keepalive")

    def cases(self, start: int, count: int):
        for i in range(start, start + count):
            yield self.case(i)
