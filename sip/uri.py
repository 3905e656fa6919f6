"""Small SIP URI helpers for trunks."""
from __future__ import annotations

import re
from dataclasses import dataclass

from sip.config import EngineConfig, EngineError, TrunkSpec

def _uri_host(address: str) -> str:
    a = address.split(":", 1)[1] if address.startswith("sip:") else address
    return a.split(";")[0].split("@")[-1]


def _loose_route(address: str) -> str:
    uri = address if address.startswith("sip:") else f"sip:{address}"
    return uri if ";lr" in uri else uri + ";lr"


def _registrar(address: str) -> str:
    uri = address if address.startswith("sip:") else f"sip:{address}"
    return uri.split(";")[0]


def _number_uri(number: str, trunk: str | None, cfg: EngineConfig) -> str:
    for t in cfg.trunks:
        if t.name == trunk and t.address:
            return f"sip:{number}@{_uri_host(t.address)}"
    raise EngineError(f"'{number}' is not a SIP URI and no trunk address to send it to")


@dataclass(frozen=True)
class Identity:
    """Who an outbound call says it is from: the From value (``""``: the trunk account's own) and
    the identity headers that go with it."""
    from_uri: str = ""
    headers: tuple[tuple[str, str], ...] = ()


ANONYMOUS = '"Anonymous" <sip:anonymous@anonymous.invalid>'      # RFC 3323 §4.1.1.3


def caller_identity(trunk: TrunkSpec | None, caller: str, withheld: bool, public_address: str,
                    address: str, account_user: str = "") -> Identity:
    """The From and identity headers of an outbound call over ``trunk`` sent to ``address`` (this
    attempt's). The number is ``caller`` (already checked against the trunk's numbers) or the
    trunk's ``caller_id``; the host is the trunk's ``from_domain``, else ``public_address``, else
    the host the call is sent to (never a cell's own address), without a port (pjsip drops a
    From URI's port anyway; P-Asserted-Identity names the same URI). ``withheld``: From is anonymous and
    the number rides in P-Asserted-Identity with ``Privacy: id`` (RFC 3325 §9.3), for the carrier
    only; without a number, From is anonymous and nothing is asserted. ``account_user``: the call
    leaves through the cell's default account (a URI at a trunk's address, no trunk named), whose
    own From would name the cell's host: without a number, From is that user at the host above.
    No host at all (no address to go by): the account's own From."""
    number = caller or (trunk.caller_id if trunk is not None else "")
    if not number and not withheld and not account_user:
        return Identity()
    host = (trunk.from_domain if trunk is not None else "") or public_address or host_port(_uri_host(address))[0]
    host = host_port(host)[0]
    host = f"[{host}]" if ":" in host else host
    if not host:
        return Identity()
    if not number:
        return Identity(ANONYMOUS, (("Privacy", "id"),)) if withheld else Identity(f"<sip:{account_user}@{host}>")
    uri = f"<sip:{number}@{host}>"
    if withheld:
        return Identity(ANONYMOUS, (("P-Asserted-Identity", uri), ("Privacy", "id")))
    return Identity(uri, (("P-Asserted-Identity", uri),) if trunk is not None and trunk.asserted_identity else ())


def user_part(uri: str) -> str:
    """The number (user part) of a From/To value: ``"Bob" <sip:+15551230001@host;user=phone>``
    and ``tel:+15551230001`` give ``+15551230001``; a URI without a user part gives ''."""
    s = uri.split("<", 1)[-1].split(">", 1)[0].strip()
    scheme, sep, rest = s.partition(":")
    if scheme == "tel" and sep:
        return rest.split(";", 1)[0]
    if scheme in ("sip", "sips") and "@" in rest:
        return rest.split("@", 1)[0].split(";", 1)[0]
    return ""


# -- where outbound calls and transfers may go (toll-fraud guard) --------------------------

@dataclass(frozen=True)
class DestinationPolicy:
    """What ``check_destination`` allows.

    ``patterns`` (``sip.allowed_destinations``): shell-style patterns; one starting with
    ``sip:``/``sips:``/``tel:`` matches a whole URI (``sip:user@host[:port]``, lower-cased,
    without parameters), any other matches a number (``+1*``). Empty: the default rule,
    numbers through a trunk with an address and URIs whose host is a trunk's address or
    inside a trunk's allow-list. ``fixed``: targets the operator configured
    (``app.dtmf_transfer``), always allowed. ``trunks``: (name, address, allow CIDRs)."""
    patterns: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()
    trunks: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    @classmethod
    def of(cls, patterns, fixed, trunks) -> "DestinationPolicy":
        return cls(tuple(patterns), tuple(fixed), tuple((t.name, t.address, tuple(t.allow)) for t in trunks))


_URI_SCHEMES = ("sip:", "sips:", "tel:")


def host_port(hostport: str) -> tuple[str, int | None]:
    """``host:port`` / ``[v6]:port`` / ``host`` -> (lower-case host, port or None)."""
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
    else:
        host, port = hostport, ""
    return host.lower(), int(port) if port.isdigit() else None


_USER = re.compile(r"[A-Za-z0-9+\-_.!~*'()&=$,%#]+")     # no ';' '?' '@' ':' '<' or whitespace
_NUMBER = re.compile(r"[A-Za-z0-9+\-_.*#()]+")
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(:[0-9]{1,5})?")
# URI parameters that only say how to reach the checked host: anything else (maddr,
# lr, method, ...) can redirect the request or change what is sent, and ``?headers``
# are copied by pjsip into the INVITE/REFER (Route, P-Asserted-Identity, ...).
_SAFE_PARAMS = {"transport": ("udp", "tcp", "tls"), "user": ("phone", "ip")}


def _strict_uri(uri: str) -> tuple[str, str, str, int | None] | str:
    """``sip:user@host[:port][;transport=..][;user=..]`` -> (scheme, user, host, port), or
    the reason it is refused: headers (``?``), other parameters, odd characters."""
    if "?" in uri:
        return "SIP URI headers ('?') are not allowed"
    scheme, _, rest = uri.partition(":")
    rest, *params = rest.split(";")
    for p in params:
        name, eq, value = p.partition("=")
        allowed = _SAFE_PARAMS.get(name.lower())
        if allowed is None or not eq or value.lower() not in allowed:
            return f"URI parameter {p.split('=', 1)[0][:20]!r} is not allowed (only transport= and user=)"
    user, at, hostport = rest.rpartition("@")
    if at and not _USER.fullmatch(user):
        return "unsupported characters in the user part"
    if not _HOST.fullmatch(hostport):
        return "unsupported host"
    host, port = host_port(hostport)
    return scheme.lower(), user, host, port


def _uri_parts(uri: str) -> tuple[str, str, str, int | None]:
    """``sip:user@host:port;params`` -> (scheme, user, host, port)."""
    scheme, _, rest = uri.partition(":")
    rest = rest.split(";", 1)[0].split("?", 1)[0]
    user, at, hostport = rest.rpartition("@")
    host, port = host_port(hostport if at else rest)
    return scheme.lower(), user, host, port


def _at_trunk(host: str, port: int | None, policy: DestinationPolicy) -> bool:
    return _trunk_at(host, port, policy) is not None


def _trunk_at(host: str, port: int | None, policy: DestinationPolicy) -> str | None:
    """The first trunk whose address (host and port) or allow-list is ``host``."""
    import ipaddress
    for name, address, allow in policy.trunks:
        if address:
            a = address[4:] if address.lower().startswith("sip:") else address
            thost, tport = host_port(a.split(";", 1)[0].split("@")[-1])
            if thost == host and (port is None or port == (tport or 5060)):
                return name
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if any(ip in ipaddress.ip_network(c, strict=False) for c in allow
               if ipaddress.ip_network(c, strict=False).version == ip.version):
            return name
    return None


def trunk_of(target: str, trunk: str | None, policy: DestinationPolicy) -> str | None:
    """The trunk a call to ``target`` goes through: the one named, else the trunk whose address
    or allow-list a SIP URI's host is in (so per-trunk limits hold for a URI sent without
    ``trunk``); None for anything else."""
    if trunk is not None:
        return trunk
    target = target.strip()
    if not target.lower().startswith(("sip:", "sips:")):
        return None
    parts = _strict_uri(target)
    if isinstance(parts, str):
        return None
    _, _, host, port = parts
    return _trunk_at(host, port, policy)


def check_destination(target: str, trunk: str | None, policy: DestinationPolicy) -> str | None:
    """``None`` when ``target`` (a number or a URI; through ``trunk``) may be called or
    transferred to, else the reason, naming the rule. Pure: used by the API, the transfer
    paths and the engine (last guard)."""
    from fnmatch import fnmatchcase
    target = target.strip()
    if not target:
        return "empty destination"
    if target in policy.fixed:
        return None
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in target):
        return f"destination {target!r}: whitespace or control characters"
    uri_rules = [p.lower() for p in policy.patterns if p.lower().startswith(_URI_SCHEMES)]
    number_rules = [p for p in policy.patterns if not p.lower().startswith(_URI_SCHEMES)]
    rule = ("sip.allowed_destinations" if policy.patterns else
            "the default rule (sip.allowed_destinations is empty: numbers through a trunk with an "
            "address, SIP URIs only at a trunk's address or allow-list)")
    if target.lower().startswith(("sip:", "sips:")):
        parts = _strict_uri(target)
        if isinstance(parts, str):
            return f"destination {target!r}: {parts}"
        scheme, user, host, port = parts
        norm = f"{scheme}:{user + '@' if user else ''}{host}{f':{port}' if port else ''}".lower()
        at_trunk = _at_trunk(host, port, policy)
        if policy.patterns:
            if any(fnmatchcase(norm, p) for p in uri_rules):
                return None
            if at_trunk and user and any(fnmatchcase(user, p) for p in number_rules):
                return None
        elif at_trunk:
            return None
        return f"destination {target!r} is not allowed by {rule}"
    number = target[4:] if target.lower().startswith("tel:") else target
    if not _NUMBER.fullmatch(number):
        return f"destination {target!r}: not a number or SIP URI (no parameters or headers allowed)"
    if trunk is None or not any(name == trunk and address for name, address, _ in policy.trunks):
        return f"destination {target!r}: a number needs a trunk with an address ({rule})"
    if policy.patterns and not (any(fnmatchcase(number, p) for p in number_rules)
                                or any(fnmatchcase(f"tel:{number}", p) for p in uri_rules)):
        return f"destination {target!r} is not allowed by {rule}"
    return None
