"""Outbound address policy (the SSRF guard): which addresses the box may connect to.

Every URL the box connects to on someone's behalf (webhooks, media streams,
tools, the OpenAI-compatible LLM backend) goes through one ``Policy``. By
default it refuses addresses that reach into the box or its host: loopback,
link-local, multicast, unspecified, reserved, "this network" (0.0.0.0/8) and
the cloud metadata services (169.254.169.254, fd00:ec2::254,
100.100.100.200, ...). In strict mode every address that is not globally
routable is refused too (RFC 1918, ULA, CGNAT, documentation ranges).
IPv4 addresses embedded in IPv6 (``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``,
6to4 ``2002::/16``) are judged as the IPv4 address they carry.

The operator's allow-list (``http.outbound_allow``) wins: CIDRs (a bare
address is a /32 or /128) and host names (exact, case-insensitive). A
metadata address is only allowed by an entry naming exactly that address,
never by a wider range.

This module is pure (``ipaddress``, ``urllib.parse``, ``socket.inet_aton``): resolving and
connecting is ``bridge.core.guarded_http``'s job.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud instance metadata / host services reachable from a VM or container.
METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",      # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
    "169.254.170.2",        # AWS ECS task metadata
    "169.254.169.253",      # AWS DNS
    "fd00:ec2::254",        # AWS IPv6 metadata
    "fd00:ec2::253",
    "100.100.100.200",      # Alibaba Cloud
    "192.0.0.192",          # Oracle Cloud
    "168.63.129.16",        # Azure wire server
))
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")

REFUSED = "refused address"      # what the API says about any refusal (never the address)


class OutboundRefused(Exception):
    """A connection the policy does not allow. ``reason`` is a short class of the
    address (``loopback``, ``metadata``, ...) for logs and for the operator who
    registered the URL; the API shows only ``REFUSED``."""

    def __init__(self, reason: str, address: str = ""):
        super().__init__(f"{REFUSED} ({reason})")
        self.reason, self.address = reason, address


def _embedded_v4(ip: IP) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip in _SIXTOFOUR:
            return ip.sixtofour
    return None


def classify(ip: IP, strict: bool = False) -> str | None:
    """Why ``ip`` is refused (a short class), or None if the default/strict rules allow it."""
    inner = _embedded_v4(ip)
    if inner is not None:
        return classify(inner, strict)
    if ip in METADATA:
        return "metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified or (ip.version == 4 and ip in _THIS_NETWORK):
        return "unspecified"
    if ip.is_reserved:
        return "reserved"
    if strict and not ip.is_global:
        return "private"
    return None


def parse_ip(host: str) -> IP | None:
    """``host`` as an address (brackets and an IPv6 zone stripped), or None for a name."""
    h = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(h)
    except ValueError:
        return None


def _legacy_ipv4(host: str) -> bool:
    """A host the C library would read as an IPv4 address although it is not written as
    one (``2130706433``, ``127.1``, ``0x7f.0.0.1``): never a name, so never allowed."""
    try:
        socket.inet_aton(host)
    except (OSError, ValueError):
        return False
    return True


def _host_key(host: str) -> str:
    return host.strip().lower().rstrip(".")


@dataclass(frozen=True)
class Policy:
    allow_nets: tuple = ()
    allow_hosts: frozenset = field(default_factory=frozenset)
    strict: bool = False

    @classmethod
    def parse(cls, allow: list[str] | tuple = (), strict: bool = False) -> "Policy":
        """From config: ``allow`` entries are CIDRs, addresses or host names; ``ValueError``
        names the first entry that is none of these."""
        nets, hosts = [], set()
        for i, entry in enumerate(allow):
            e = entry.strip()
            if not e:
                raise ValueError(f"[{i}]: empty entry")
            if "/" in e or parse_ip(e) is not None:
                try:
                    nets.append(ipaddress.ip_network(e.strip("[]"), strict=False))
                except ValueError:
                    raise ValueError(f"[{i}]: {entry!r} is not an IP network") from None
                continue
            name = _host_key(e)
            if not name or any(not (c.isalnum() or c in "-._") for c in name):
                raise ValueError(f"[{i}]: {entry!r} is neither a CIDR nor a host name")
            hosts.add(name)
        return cls(tuple(nets), frozenset(hosts), bool(strict))

    @classmethod
    def from_config(cls, http_cfg: dict) -> "Policy":
        return cls.parse(http_cfg.get("outbound_allow", ()), http_cfg.get("outbound_strict", False))

    def host_allowed(self, host: str) -> bool:
        """An allow-listed host name: whatever it resolves to is the operator's choice."""
        return _host_key(host) in self.allow_hosts

    def check_address(self, ip: IP | str) -> None:
        """Raise ``OutboundRefused`` unless connecting to ``ip`` is allowed."""
        if isinstance(ip, str):
            parsed = parse_ip(ip)
            if parsed is None:
                raise OutboundRefused("not an address", ip)
            ip = parsed
        reason = classify(ip, self.strict)
        if reason is None:
            return
        for net in self.allow_nets:
            if ip.version == net.version and ip in net:
                if reason != "metadata" or net.num_addresses == 1:
                    return
        raise OutboundRefused(reason, str(ip))

    def check_host(self, host: str, addresses: list[str]) -> None:
        """A name and what it resolved to: every address must be allowed (one bad
        address refuses the name, so a mixed answer cannot be raced)."""
        if self.host_allowed(host):
            return
        for a in addresses:
            self.check_address(a)

    def check_url(self, url: str, schemes: tuple[str, ...]) -> None:
        """At registration: the scheme, a host present, and a literal address allowed.
        Names are checked when connecting. ``ValueError`` for a malformed URL."""
        parts = urlsplit(url)
        if parts.scheme.lower() not in schemes:
            raise ValueError(f"the scheme must be one of {', '.join(schemes)}")
        host = parts.hostname
        if not host:
            raise ValueError("the URL has no host")
        if self.host_allowed(host):
            return
        ip = parse_ip(host)
        if ip is not None:
            self.check_address(ip)
        elif _legacy_ipv4(host):
            raise OutboundRefused("non-canonical address", host)   # 2130706433, 127.1, 0x7f.1


DEFAULT = Policy()
