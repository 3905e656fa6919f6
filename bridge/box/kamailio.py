"""Generate the Kamailio front's config and dispatcher list for a set of cells."""
from __future__ import annotations

import glob
import os
from pathlib import Path

from sip.uri import host_port

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "kamailio" / "kamailio.cfg.tmpl"


def modules_dir() -> str:
    for pattern in ("/usr/lib/*/kamailio/modules", "/usr/lib/kamailio/modules", "/usr/local/lib*/kamailio/modules"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return "/usr/lib/x86_64-linux-gnu/kamailio/modules"


def dispatcher_list(cells: list[tuple[str, int]], maxload: int, socket: str | None = None) -> str:
    """``cells``: (host, sip port) per cell; set 1, algorithm 10 needs duid and maxload.
    ``socket``: the front's internal socket (``udp:ip:port``) calls and pings leave from."""
    lines = ["# setid destination flags priority attributes"]
    for i, (host, port) in enumerate(cells):
        h = f"[{host}]" if ":" in host else host
        lines.append(f"1 sip:{h}:{port} 0 0 duid=cell{i};maxload={maxload}" + (f";socket={socket}" if socket else ""))
    return "\n".join(lines) + "\n"


def _split_address(address: str) -> tuple[str, int | None]:
    """``sip:host[:port][;params]`` / ``host:port`` / ``[v6]:port`` -> (host, port or None)."""
    a = address.strip()
    for scheme in ("sips:", "sip:"):
        if a.lower().startswith(scheme):
            a = a[len(scheme):]
    return host_port(a.split(";", 1)[0].split("@")[-1])


def _quoted(text: str) -> str:
    """A value safe inside a double-quoted Kamailio string (config comes from the operator,
    but a stray quote must not change the routing logic)."""
    if any(ch in text for ch in '"\\\n\r$'):
        raise ValueError(f"unsupported character in {text!r}")
    return text


Trunks = list[tuple[str, list[str]]]       # (address or "", allow CIDRs) per trunk


def _groups(trusted: list[str], trunk_addresses: list[str], trunks: Trunks | None) -> list[tuple[str, str, list[str]]]:
    """(tag, address, allow) per trunk; without ``trunks`` all addresses and CIDRs are one
    trunk "t0" (no dialog binding between trunks)."""
    if trunks is not None:
        return [(f"t{i}", a, list(allow)) for i, (a, allow) in enumerate(trunks)]
    return [("t0", a, []) for a in trunk_addresses] + [("t0", "", list(trusted))]


def trusted_lines(groups: list[tuple[str, str, list[str]]]) -> str:
    """route[TRUSTED] body: the source is inside a trunk's allow-list; ``$var(trunk)``
    names that trunk (in-dialog requests are bound to the trunk that owns the dialog)."""
    lines = [f'    if (is_in_subnet("$si", "{_quoted(c)}")) {{ $var(trunk) = "{tag}"; return 1; }}'
             for tag, _, allow in groups for c in allow]
    return "\n".join(lines) or "    # none"


def trunk_dest_lines(trunk_addresses: list[str], trusted: list[str],
                     groups: list[tuple[str, str, list[str]]] | None = None) -> str:
    """route[TRUNKDEST] body: a cell's request may go to a trunk's address (host, and
    port when the address names one) or to a host inside a trunk's allow-list; sets
    ``$var(trunk)`` to that trunk."""
    lines = []
    groups = groups if groups is not None else _groups(trusted, trunk_addresses, None)
    for tag, address, _ in groups:
        host, port = _split_address(address) if address else ("", None)
        if not host:
            continue
        host = _quoted(host)
        rd = f"[{host}]" if ":" in host else host
        cond = f'$rd == "{rd}"' + (f" && $rp == {port}" if port else "")
        lines.append(f'    if ({cond}) {{ $var(trunk) = "{tag}"; return 1; }}')
    for tag, _, allow in groups:
        for c in allow:
            lines.append(f'    if (is_ip("$rd") && is_in_subnet("$rd", "{_quoted(c)}")) {{ $var(trunk) = "{tag}"; return 1; }}')
    return "\n".join(lines) or "    # no trunk addresses: cells may not send anywhere"


def _socket_parts(sock: str) -> tuple[str, str, int]:
    """``udp:ip:port`` -> (proto, ip, port)."""
    proto, _, rest = sock.partition(":")
    host, _, port = rest.rpartition(":")
    return proto.lower(), host.strip("[]"), int(port)


def render(listen: list[str], run_dir: str, trusted: list[str], retry_after: int, ping: int = 2,
           pike: int = 60, children: int = 2, debug: int = 1, fr_timer: int = 2000,
           trunk_addresses: list[str] | None = None, tcp_lifetime: int = 20,
           tcp_trusted_lifetime: int = 3600, tcp_max: int = 2048, cell_socket: str | None = None,
           trunks: Trunks | None = None) -> str:
    """The front's config. ``listen``: the public sockets; ``trusted``: trunk source CIDRs
    (everything else is dropped); ``trunk_addresses``: where cells may send requests (with
    ``trusted``); ``trunks``: the same per trunk, (address, allow), so that a trunk acts
    only on its own dialogs; ``cell_socket``: the internal ``udp:ip:port`` socket used only
    toward cells (default: the first public UDP address, port + 1000)."""
    tpl = TEMPLATE.read_text()
    public_udp = next((x for x in listen if x.lower().startswith("udp:")), listen[0])
    public_tcp = next((x for x in listen if x.lower().startswith("tcp:")), public_udp)
    if cell_socket is None:
        _, h, p = _socket_parts(public_udp)
        cell_socket = f"udp:{f'[{h}]' if ':' in h else h}:{p + 1000}"
    proto, cell_ip, cell_port = _socket_parts(cell_socket)
    if proto != "udp" or cell_socket in listen:
        raise ValueError(f"cell socket {cell_socket!r}: must be a UDP socket of its own")
    groups = _groups(trusted, trunk_addresses or [], trunks)
    values = {
        "LISTEN": "\n".join(f"listen={x}" for x in [*listen, cell_socket]), "RUN_DIR": run_dir,
        "MODULES": modules_dir(), "CELL_SOCKET": _quoted(cell_socket), "CELL_IP": _quoted(cell_ip),
        "CELL_PORT": str(cell_port), "PUBLIC_UDP": _quoted(public_udp), "PUBLIC_TCP": _quoted(public_tcp),
        "TRUSTED": trusted_lines(groups), "RETRY_AFTER": str(retry_after), "PING": str(ping), "PIKE": str(pike),
        "CHILDREN": str(children), "DEBUG": str(debug), "FR_TIMER": str(fr_timer),
        "TRUNKDEST": trunk_dest_lines(trunk_addresses or [], trusted, groups),
        "TCP_LIFETIME": str(tcp_lifetime), "TCP_TRUSTED_LIFETIME": str(tcp_trusted_lifetime),
        "TCP_MAX": str(tcp_max), "OPEN_FILES": str(tcp_max + 1024),
    }
    for k, v in values.items():
        tpl = tpl.replace("{{" + k + "}}", v)
    if "{{" in tpl:
        raise ValueError("unfilled placeholder in kamailio template")
    return tpl


def write(run_dir: str, cfg_text: str, dlist: str) -> str:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "dispatcher.list"), "w") as f:
        f.write(dlist)
    path = os.path.join(run_dir, "kamailio.cfg")
    with open(path, "w") as f:
        f.write(cfg_text)
    return path
