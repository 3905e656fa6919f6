"""The front's own trunk registrations (``register = true``): Kamailio's ``uac`` module and its
``uacreg`` table (db_text), and the check that answers come from the trunk's registrar."""
from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import dataclass, field

from bridge.box.sipaddr import primary_address, quoted, socket_parts, split_address

@dataclass(frozen=True)
class Registration:
    """A ``register = true`` trunk registered by the front (Kamailio's ``uac`` module, ``uac_reg``):
    one row of the ``uacreg`` table (``uacreg_table``). REGISTER goes to ``proxy`` from the public
    ``socket`` with ``Contact: <sip:uuid@contact>``, the front's public address, so the carrier's
    INVITEs reach the front and are dispatched to cells like any other call."""
    trunk: str                  # the trunk's name (metrics, events)
    uuid: str                   # the Contact's user (uac_reg's l_uuid): the trunk's username, made unique
    username: str
    domain: str                 # the registrar's host[:port]: Request-URI sip:domain, To/From sip:username@domain
    realm: str
    ha1: str = field(repr=False)  # MD5(username:realm:password): the table never holds the password itself
    proxy: str                  # where REGISTER is sent: sip:host:port[;transport=tcp|tls]
    contact: str                # host:port[;transport=..] of the front's public socket
    socket: str                 # the public socket REGISTER leaves from (never the cells' one)
    expires: int
    retry: int                  # seconds before a failed registration is tried again (the first time)
    retry_max: int = 300        # the longest wait between attempts (the backoff's cap)


_USER_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()&=+$,;?/")


def registrations(cfg, listen: list[str], tls_socket: str = "") -> list[Registration]:
    """The trunks the front registers (``register = true``), with the front's public address in
    Contact: ``sip.public_address`` when set, else the public socket's own address (the host's
    primary address when that is a wildcard), and the port of the socket for the trunk's
    transport (``tls_socket``: the front's TLS socket, ``tls:ip:port``, if it has one). Digest
    credentials come from the trunk's ``password``/``password_env``."""
    public_udp = next((x for x in listen if x.lower().startswith("udp:")), listen[0])
    public_tcp = next((x for x in listen if x.lower().startswith("tcp:")), public_udp)
    out: list[Registration] = []
    seen: set[str] = set()
    aors: dict[str, str] = {}
    for i, t in enumerate(cfg.trunks):
        if not t.register:
            continue
        transport = cfg.transport(t.name)
        if transport == "tls" and not tls_socket:
            raise ValueError(f"trunk {t.name!r}: transport = \"tls\" needs the front's TLS socket (sip.tls_listen)")
        sock = {"udp": public_udp, "tcp": public_tcp, "tls": tls_socket}[transport]
        _, sock_host, sock_port = socket_parts(sock)
        host = (cfg.raw["sip"]["public_address"] or "").strip().strip("[]") or sock_host
        if host in ("", "0.0.0.0", "::"):
            host = primary_address()
        param = "" if transport == "udp" else f";transport={transport}"
        contact = f"{f'[{host}]' if ':' in host else host}:{sock_port}{param}"
        rhost, rport = split_address(t.address)
        rh = f"[{rhost}]" if ":" in rhost else rhost
        domain = f"{rh}:{rport}" if rport else rh
        proxy = f"sip:{rh}:{rport or (5061 if transport == 'tls' else 5060)}{param}"
        aor = f"sip:{t.username}@{domain}"
        if aor in aors:       # the front tells the answers apart by their From: two would share one
            raise ValueError(f"trunk {t.name!r} registers {aor} like trunk {aors[aor]!r}: one registration each")
        aors[aor] = t.name
        uuid = t.username if set(t.username) <= _USER_SAFE else f"trunk{i}"
        if uuid in seen:
            uuid = f"{uuid}-{i}"
        seen.add(uuid)
        ha1 = hashlib.md5(f"{t.username}:{t.realm}:{t.password}".encode()).hexdigest()
        raw = cfg.raw["trunks"][i] if i < len(cfg.raw["trunks"]) else {}
        retry = int(raw.get("register_retry", 30))
        retry_max = max(retry, int(raw.get("register_retry_max", 300)))
        quoted(contact)                # the first one goes into kamailio.cfg (reg_contact_addr)
        out.append(Registration(t.name, uuid, t.username, domain, t.realm, ha1, proxy, contact, sock,
                                t.expires, retry, retry_max))
    return out


def _dbtext(value: str) -> str:
    """A db_text field: its separator and escapes written as db_text reads them back."""
    return (value.replace("\\", "\\\\").replace(":", "\\:").replace("\n", "\\n").replace("\r", "\\r")
            .replace("\t", "\\t").replace("\0", "\\0"))


UACREG_COLUMNS = ("id(int,auto) l_uuid(string) l_username(string) l_domain(string) r_username(string) "
                  "r_domain(string) realm(string,null) auth_username(string) auth_password(string,null) "
                  "auth_ha1(string,null) auth_proxy(string) expires(int) flags(int) reg_delay(int) "
                  "contact_addr(string,null) socket(string,null)")


def uacreg_table(regs: list[Registration]) -> str:
    """The ``uacreg`` table (db_text) uac_reg loads at start. It holds HA1 digests: ``write``
    makes it readable by its owner only."""
    rows = [UACREG_COLUMNS]
    for n, r in enumerate(regs, 1):
        rows.append(":".join([str(n), *(_dbtext(x) for x in (r.uuid, r.username, r.domain, r.username, r.domain,
                                                            r.realm, r.username, "", r.ha1, r.proxy)),
                              str(r.expires), "0", "0", _dbtext(r.contact), _dbtext(r.socket)]))
    return "\n".join(rows) + "\n"


def registrar_lines(regs: list[Registration]) -> str:
    """route[REGISTRAR] body: an answer to the front's REGISTER for a registration (its From,
    ``sip:username@domain``) is accepted only from that registration's registrar (``proxy``): its
    IP address (any port), or when it is a host name one of the addresses it resolves to."""
    lines = []
    for r in regs:
        host, _ = split_address(r.proxy)
        aor = quoted(f"sip:{r.username}@{r.domain}")
        try:
            ip = ipaddress.ip_address(host)
            cond = f'is_in_subnet("$si", "{ip}/{ip.max_prefixlen}")'
        except ValueError:
            cond = f'dns_int_match_ip("{quoted(host)}", "$si")'
        lines.append(f'    if ($fu == "{aor}") {{ if ({cond}) return 1; return -1; }}')
    return "\n".join(lines) or "    # no registration"


def uac_lines(run_dir: str, regs: list[Registration], timer: int = 0) -> str:
    """The ``uac`` module's settings when the front registers trunks (else a comment). uac_reg's
    timer wakes every ``timer`` s (default: a third of the shortest retry, 1..10 s) and refreshes a
    registration that expires within ``timer + 3`` s; after a failure it sends again once
    ``retry - timer - 3`` s have passed, so its ``reg_retry_interval`` is the trunk's
    ``register_retry`` plus that margin (the shortest one when trunks differ: it is global), and
    never under 5 s: after a failure the supervisor (polling every 2 s) takes the retries over with
    its backoff (``registrations.Backoff``), and must see the failure before uac_reg retries."""
    if not regs:
        return "# no trunk registers through the front (register = true)\n"
    retry = min(r.retry for r in regs)
    timer = timer or max(1, min(10, retry // 3))
    retry = max(5, retry)
    contact = regs[0].contact.split(";")[0]
    return ("#!define WITH_UACREG\n"
            'loadmodule "db_text.so"\nloadmodule "htable.so"\nloadmodule "uac.so"\n'
            f'modparam("uac", "reg_db_url", "text://{quoted(run_dir)}/db")\n'
            f'modparam("uac", "reg_contact_addr", "{contact}")\n'
            f'modparam("uac", "reg_timer_interval", {timer})\n'
            f'modparam("uac", "reg_retry_interval", {retry + timer + 3})\n'
            'modparam("uac", "restore_mode", "none")\n'
            'modparam("htable", "htable", "uacreg=>size=4;")\n')


def write_uacreg(run_dir: str, regs: list[Registration]) -> None:
    """uac_reg's db_text database in ``run_dir/db`` (directory 0700, files 0600: HA1 digests)."""
    db = os.path.join(run_dir, "db")
    os.makedirs(db, mode=0o700, exist_ok=True)
    os.chmod(db, 0o700)
    files = {"version": "id(int,auto) table_name(string) table_version(int)\n1:version:1\n2:uacreg:5\n",
             "uacreg": uacreg_table(regs)}
    for name, text in files.items():
        path = os.path.join(db, name)
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(path + ".tmp", 0o600)
        os.replace(path + ".tmp", path)
