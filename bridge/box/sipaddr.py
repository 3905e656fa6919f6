"""SIP addresses as the front's config generators read them: trunk addresses, Kamailio sockets,
values placed inside Kamailio strings. No I/O but ``primary_address``'s routing lookup."""
from __future__ import annotations

import socket

from sip.uri import host_port


def split_address(address: str) -> tuple[str, int | None]:
    """``sip:host[:port][;params]`` / ``host:port`` / ``[v6]:port`` -> (host, port or None)."""
    a = address.strip()
    for scheme in ("sips:", "sip:"):
        if a.lower().startswith(scheme):
            a = a[len(scheme):]
    return host_port(a.split(";", 1)[0].split("@")[-1])


def quoted(text: str) -> str:
    """A value safe inside a double-quoted Kamailio string (config comes from the operator,
    but a stray quote must not change the routing logic)."""
    if any(ch in text for ch in '"\\\n\r$'):
        raise ValueError(f"unsupported character in {text!r}")
    return text


def socket_parts(sock: str) -> tuple[str, str, int]:
    """``udp:ip:port`` -> (proto, ip, port)."""
    proto, _, rest = sock.partition(":")
    host, _, port = rest.rpartition(":")
    return proto.lower(), host.strip("[]"), int(port)


def primary_address() -> str:
    """The host's outgoing address (for a wildcard listen address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))          # no packet is sent: picks the outgoing address
        return s.getsockname()[0]
