"""SIP over TLS settings (``[sip] tls_*``, per trunk ``transport``): checked at load.

TLS is terminated by the Kamailio front (its ``tls`` module, the system's OpenSSL), never
by a cell. A mistake here stops the start with one line naming the key: a missing or
unreadable file, a key that does not match its certificate, ``tls_listen`` without a
certificate, peer verification without a CA, a ``transport = "tls"`` trunk without
``tls_listen``.
"""
from __future__ import annotations

import os
import ssl


def _readable(key: str, path: str) -> str:
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        raise ValueError(f"sip.{key}: {path} does not exist")
    if not os.access(full, os.R_OK):
        raise ValueError(f"sip.{key}: {path} is not readable")
    return full


def check(sip: dict, transports: dict[str, str]) -> None:
    """Raise ValueError (``sip.<key>: why``) when the TLS settings cannot work."""
    tls_trunks = [name for name, t in transports.items() if t == "tls"]
    listen = sip["tls_listen"]
    if not listen:
        if tls_trunks:
            raise ValueError(f"trunks: trunk {tls_trunks[0]!r} has transport = \"tls\" and needs sip.tls_listen "
                             "(the front's TLS socket, e.g. \"0.0.0.0:5061\")")
        return
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"sip.tls_listen: expected HOST:PORT, got {listen!r}")
    s_host, _, s_port = sip["listen"].rpartition(":")
    if s_port == port and (s_host == host or "0.0.0.0" in (s_host, host) or "[::]" in (s_host, host)):
        raise ValueError(f"sip.tls_listen: {listen} uses the port of sip.listen ({sip['listen']}); "
                         "TLS needs a port of its own (5061)")
    for key in ("tls_cert", "tls_key"):
        if not sip[key]:
            raise ValueError(f"sip.{key}: sip.tls_listen needs sip.tls_cert and sip.tls_key (PEM files)")
    cert, key = _readable("tls_cert", sip["tls_cert"]), _readable("tls_key", sip["tls_key"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key, password=lambda: b"")   # an encrypted key fails here, not in Kamailio
    except ssl.SSLError as exc:
        raise ValueError(f"sip.tls_key: {sip['tls_key']} is not an unencrypted PEM key matching "
                         f"sip.tls_cert ({exc.reason or exc})") from None
    if sip["tls_verify"] and not sip["tls_ca"]:
        raise ValueError("sip.tls_ca: peer verification (sip.tls_verify = true) needs the CA file "
                         "that signs the trunks' certificates")
    if sip["tls_ca"]:
        ca = _readable("tls_ca", sip["tls_ca"])
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ValueError(f"sip.tls_ca: {sip['tls_ca']} holds no PEM certificate ({exc.reason or exc})") from None
    name = sip["tls_server_name"]
    if name and (any(c.isspace() or c in '"\\$[]' for c in name) or len(name) > 253):
        raise ValueError(f"sip.tls_server_name: not a host name: {name!r}")
