"""Which source addresses may send INVITEs."""
from __future__ import annotations

import ipaddress


def split_hostport(addr: str) -> tuple[str, int | None]:
    """'1.2.3.4:5060' / '[::1]:5060' / '::1' / 'host' -> (host, port)."""
    addr = addr.strip()
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:] else None
    if addr.count(":") == 1:
        host, port = addr.split(":")
        return host, int(port) if port else None
    return addr, None


class SourceFilter:
    def __init__(self, cidrs: list[str]):
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]

    def allows(self, source: str) -> bool:
        host, _ = split_hostport(source)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks if net.version == ip.version)
