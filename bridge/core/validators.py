"""The value checks of the configuration's keys (``bridge.core.config.SCHEMA``): each takes a raw
value from the file, the environment or a flag and returns it normalized, or raises ``TypeError``
(or ``ValueError``) with a line that says what was expected; ``config`` adds the key's name."""
from __future__ import annotations

import ipaddress
import re
from typing import Any

def _hostport(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected HOST:PORT, got {v!r}")
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TypeError(f"expected HOST:PORT, got {v!r}")
    return v


def _port_range(v: Any) -> str:
    if isinstance(v, str) and "-" in v:
        lo, _, hi = v.partition("-")
        if lo.isdigit() and hi.isdigit() and 1024 <= int(lo) < int(hi) < 65536:
            return v
    raise TypeError(f"expected LOW-HIGH with 1024 <= LOW < HIGH < 65536, got {v!r}")


def _int(lo: int, hi: int):
    def check(v: Any) -> int:
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise TypeError(f"expected an integer {lo}..{hi}, got {v!r}")
        return v
    return check


def _float(lo: float, hi: float):
    def check(v: Any) -> float:
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise TypeError(f"expected a number {lo}..{hi}, got {v!r}")
        return float(v)
    return check


def _bool(v: Any) -> bool:
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return v.lower() in ("1", "true", "yes", "on")
    if not isinstance(v, bool):
        raise TypeError(f"expected true or false, got {v!r}")
    return v


def _auto_bool(v: Any) -> str:
    """"auto", or a boolean given as "on"/"off" (true/false accepted)."""
    if isinstance(v, str) and v.lower() == "auto":
        return "auto"
    return "on" if _bool(v) else "off"


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {v!r}")
    return v


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _address(v: Any) -> str:
    """An address others reach us at (``sip.public_address``): an IP or a host name, no port; it
    goes into Via/Contact/SDP and the front's ``advertise``, so nothing else may ride along."""
    if not isinstance(v, str):
        raise TypeError(f"expected an IP address or a host name, got {v!r}")
    if v == "":
        return v
    try:
        ipaddress.ip_address(v)
        return v
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(v) or v.replace(".", "").isdigit():
        raise TypeError(f"expected an IP address or a host name without a port, got {v!r}")
    return v


MEDIA_ONLY_APPS = ("echo", "playback")      # apps that do nothing with the audio but move it
WIDEBAND_CODECS = ("G722",)


def _clock_rate(v: Any) -> str | int:
    if v == "auto":
        return v
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if isinstance(v, bool) or v not in (8000, 16000):
        raise TypeError(f"expected auto, 8000 or 16000, got {v!r}")
    return v


def _choice(*options):
    def check(v: Any):
        if isinstance(v, str) and all(isinstance(o, int) for o in options) and v.isdigit():
            v = int(v)
        if isinstance(v, bool) or v not in options:
            raise TypeError(f"expected one of {', '.join(map(str, options))}, got {v!r}")
        return v
    return check


def _str_list(v: Any) -> list[str]:
    if isinstance(v, str):
        v = [x.strip() for x in v.split(",") if x.strip()]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError(f"expected a list of strings, got {v!r}")
    return v


CALLER_NUMBER = re.compile(r"^\+?[0-9]{3,20}$")


def _caller_number(v: Any) -> str:
    """A number presented as the caller (From user, P-Asserted-Identity): digits, an optional
    leading ``+``; it goes into SIP headers, so nothing else may ride along."""
    if not isinstance(v, str) or not (v == "" or CALLER_NUMBER.fullmatch(v)):
        raise TypeError(f"expected a phone number (3-20 digits, optional leading +), got {v!r}")
    return v


def _caller_numbers(v: Any) -> list[str]:
    v = _str_list(v)
    for x in v:
        if not CALLER_NUMBER.fullmatch(x):
            raise TypeError(f"expected phone numbers (3-20 digits, optional leading +), got {x!r}")
    return v


def _sip_host(v: Any) -> str:
    """A host, or host:port, for a SIP URI (``from_domain``): a name or an IP literal (IPv6 in
    brackets with a port), nothing else."""
    if not isinstance(v, str):
        raise TypeError(f"expected a host name or address, got {v!r}")
    if v == "":
        return v
    host, port, v6 = v, "", False
    if v.startswith("["):
        host, close, rest = v[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise TypeError(f"expected host[:port] (IPv6 as [addr]), got {v!r}")
        port, v6 = rest[1:], True
        if rest and not port:
            raise TypeError(f"expected host[:port], got {v!r}")
    elif v.count(":") == 1:
        host, port = v.split(":")
    if port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise TypeError(f"expected host[:port], got {v!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if v6 or not _HOSTNAME.fullmatch(host):
            raise TypeError(f"expected host[:port], got {v!r}") from None
    else:
        if (ip.version == 6 and not v6) or getattr(ip, "scope_id", None):
            raise TypeError(f"expected host[:port] (IPv6 as [addr], no zone), got {v!r}")
    return v


TRUNK_CODECS = {"OPUS": "opus", "PCMU": "PCMU", "PCMA": "PCMA", "G722": "G722"}   # name -> rtpengine's spelling


def _trunk_codecs(v: Any) -> list[str]:
    """A trunk's ``codecs``: names from ``TRUNK_CODECS`` (any case), each once, in the
    operator's order; Opus is transcoded at the edge (rtpengine), the others are what cells speak."""
    out: list[str] = []
    for name in _str_list(v):
        canon = TRUNK_CODECS.get(name.strip().upper())
        if canon is None:
            raise TypeError(f"unknown codec {name!r} (known: {', '.join(TRUNK_CODECS.values())})")
        if canon in out:
            raise TypeError(f"codec {name!r} is listed twice")
        out.append(canon)
    return out


def _cidrs(v: Any) -> list[str]:
    v = _str_list(v)
    for c in v:
        try:
            ipaddress.ip_network(c, strict=False)
        except ValueError:
            raise TypeError(f"not an IP network: {c!r}") from None
    return v


def _outbound_allow(v: Any) -> list[str]:
    """CIDRs, addresses or host names the SSRF guard lets the box connect to."""
    v = _str_list(v)
    from bridge.core.netguard import Policy
    try:
        Policy.parse(v)
    except ValueError as exc:
        raise TypeError(str(exc).lstrip()) from None
    return v


def _digit_map(v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(k, str) and k in "0123456789*#ABCD" and len(k) == 1
                                          and isinstance(x, str) for k, x in v.items()):
        raise TypeError(f"expected a table of DTMF digit = \"sip:uri\", got {v!r}")
    return v


def _number_flags(v: Any) -> dict[str, bool]:
    """``{"+15551230000" = true, ...}`` (or "NUMBER=true,NUMBER=false" from the environment)."""
    if isinstance(v, str):
        try:
            v = {k.strip(): _bool(x.strip()) for k, _, x in (p.partition("=") for p in v.split(",") if p.strip())}
        except TypeError:
            raise TypeError(f"expected NUMBER=true|false,..., got {v!r}") from None
    if not isinstance(v, dict) or not all(isinstance(k, str) and k and isinstance(x, bool) for k, x in v.items()):
        raise TypeError(f"expected a table of \"number\" = true|false, got {v!r}")
    return v


def _regex_list(v: Any) -> list[str]:
    v = [v] if isinstance(v, str) else v          # from the environment: one pattern
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError(f"expected a list of regular expressions, got {v!r}")
    from bridge.core.pii import check_patterns
    try:
        check_patterns(v)
    except ValueError as exc:
        raise TypeError(str(exc)) from None
    return v


def _transfer_destinations(v: Any) -> dict:
    from bridge.core.handoff import destinations
    return destinations(v)
