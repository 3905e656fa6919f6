"""Small SIP URI helpers for trunks."""
from __future__ import annotations

from sip.config import EngineConfig, EngineError

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
