"""Generate the Kamailio front's config and dispatcher list for a set of cells."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
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


Trunks = list[tuple[str | list[str], list[str]]]   # (address(es) or "", allow CIDRs) per trunk


@dataclass(frozen=True)
class Tls:
    """The front's SIP over TLS (``[sip] tls_*``): one socket for trunks, the server profile
    for inbound connections and the client profile for connections to ``transport = "tls"``
    trunks, both with the same certificate, key and CA."""
    listen: str                 # HOST:PORT
    cert: str
    key: str
    ca: str = ""
    verify: bool = True         # check the peer's certificate against ``ca``
    require_client_cert: bool = True    # inbound: a trunk must present one (with ``verify``)
    server_name: str = ""       # SNI sent to trunks

    @classmethod
    def from_sip(cls, sip: dict) -> "Tls | None":
        if not sip.get("tls_listen"):
            return None
        path = lambda k: os.path.abspath(os.path.expanduser(sip[k])) if sip[k] else ""   # noqa: E731
        return cls(sip["tls_listen"], path("tls_cert"), path("tls_key"), path("tls_ca"), sip["tls_verify"],
                   sip["tls_require_client_cert"], sip["tls_server_name"])

    @property
    def socket(self) -> str:
        host, _, port = self.listen.rpartition(":")
        host = host.strip("[]")
        return f"tls:{f'[{host}]' if ':' in host else host}:{port}"


def kamailio_version(binary: str = "kamailio") -> tuple[int, ...]:
    """``kamailio -v``'s version as a tuple ((0,) when it cannot be run)."""
    import re
    import subprocess
    try:
        out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0,)
    m = re.search(r"kamailio (\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0,)


def tls_process_settings(version: tuple[int, ...], children: int) -> tuple[str, int]:
    """(core lines, tcp_children) for TLS with OpenSSL 3. Kamailio before 5.7.4 shares
    OpenSSL 3's state between its processes without locking (kamailio issue #3791:
    "freeing already freed pointer ... tls_init.c", then crashes, reproduced here under
    concurrent handshakes with two TCP workers): there TLS gets a single TCP worker.
    From 5.7.4 ``tls_threads_mode`` fixes it (2 from 5.8)."""
    if version >= (5, 8, 0):
        return "tls_threads_mode=2\n", children
    if version >= (5, 7, 4):
        return "tls_threads_mode=1\n", children
    return "# Kamailio < 5.7.4 with OpenSSL 3: one TCP/TLS worker (kamailio issue #3791)\n", 1


def tls_cfg(tls: Tls) -> str:
    """The ``tls`` module's profiles: ``[server:default]`` (inbound) and ``[client:default]``
    (toward trunks). TLS 1.0/1.1 (and SSLv3) are never offered nor accepted."""
    method = "TLSv1.2+"         # TLS 1.2 or 1.3; Kamailio 5.6 has no "1.3 only" method
    yes = lambda b: "yes" if b else "no"                                  # noqa: E731

    def profile(name: str, verify: bool, require: bool, extra: list[str]) -> str:
        lines = [f"[{name}]", f"method = {method}", f"certificate = {_tls_path(tls.cert)}",
                 f"private_key = {_tls_path(tls.key)}", f"verify_certificate = {yes(verify)}",
                 f"require_certificate = {yes(require)}", "verify_depth = 5",
                 "cipher_list = HIGH:!aNULL:!eNULL:!MD5:!RC4:!3DES", *extra]
        if tls.ca:
            lines.append(f"ca_list = {_tls_path(tls.ca)}")
        return "\n".join(lines) + "\n"
    client_extra = [f"server_name = {_tls_path(tls.server_name)}"] if tls.server_name else []
    return ("# generated by trunkline (bridge/box/kamailio.py) from [sip] tls_*\n\n"
            + profile("server:default", tls.verify, tls.verify and tls.require_client_cert, [])
            + "\n" + profile("client:default", tls.verify, tls.verify, client_extra))


@dataclass(frozen=True)
class MediaEdge:
    """rtpengine (userspace) at the edge: SRTP toward ``srtp`` trunks, a trunk's ``codecs``
    (Opus transcoded), plain RTP in the cells' codecs toward cells. Kamailio drives it over the
    ng protocol on 127.0.0.1:``ng_port``."""
    binary: str
    interface: str              # the address rtpengine binds for media (both legs)
    advertised: str             # what it puts in SDP ("" = ``interface``)
    ng_port: int
    ports: tuple[int, int]

    def command(self, run_dir: str) -> list[str]:
        iface = self.interface + (f"!{self.advertised}" if self.advertised else "")
        return [self.binary, "--config-file=none", "--foreground", "--log-stderr", "--table=-1",
                f"--interface={iface}", f"--listen-ng=127.0.0.1:{self.ng_port}",
                f"--port-min={self.ports[0]}", f"--port-max={self.ports[1]}", "--log-level=5",
                f"--pidfile={os.path.join(run_dir, 'rtpengine.pid')}", "--timeout=60", "--silent-timeout=3600",
                "--delete-delay=0"]


def media_edge(cfg, public_host: str, front_port: int) -> MediaEdge | None:
    """rtpengine's settings when some trunk has ``srtp`` on or ``codecs`` (else None): it binds the public
    SIP address (the host's primary address when that is a wildcard), advertises
    ``sip.media_public_address`` (else ``sip.public_address``) when set, takes
    ``cells.rtpengine_ports`` and is controlled on 127.0.0.1:``cells.rtpengine_ng_port``
    (default: the front's internal port + 1)."""
    if all(cfg.srtp_mode(t.name) == "off" and not cfg.trunk_codecs(t.name) for t in cfg.trunks):
        return None
    c = cfg.raw["cells"]
    host = public_host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        import socket
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))          # no packet is sent: picks the outgoing address
            host = s.getsockname()[0]
    lo, _, hi = c["rtpengine_ports"].partition("-")
    sip = cfg.raw["sip"]
    return MediaEdge(c["rtpengine"], host, sip["media_public_address"] or sip["public_address"],
                     c["rtpengine_ng_port"] or front_port + 1,
                     (int(lo), int(hi)))


def start_media(edge: MediaEdge, run_dir: str, preexec=None):
    """Start rtpengine (userspace, foreground) with its log in ``run_dir/rtpengine.log``."""
    import shutil
    import subprocess
    if not shutil.which(edge.binary):
        raise RuntimeError(f"rtpengine not found ({edge.binary}); install the Debian package 'rtpengine-daemon'")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "rtpengine.log"), "ab") as out:
        return subprocess.Popen(edge.command(run_dir), stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec)


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
    retry: int                  # seconds before a failed registration is tried again


_USER_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()&=+$,;?/")


def primary_address() -> str:
    """The host's outgoing address (for a wildcard listen address)."""
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))          # no packet is sent: picks the outgoing address
        return s.getsockname()[0]


def registrations(cfg, listen: list[str], tls: "Tls | None" = None) -> list[Registration]:
    """The trunks the front registers (``register = true``), with the front's public address in
    Contact: ``sip.public_address`` when set, else the public socket's own address (the host's
    primary address when that is a wildcard), and the port of the socket for the trunk's
    transport. Digest credentials come from the trunk's ``password``/``password_env``."""
    import hashlib
    public_udp = next((x for x in listen if x.lower().startswith("udp:")), listen[0])
    public_tcp = next((x for x in listen if x.lower().startswith("tcp:")), public_udp)
    out: list[Registration] = []
    seen: set[str] = set()
    aors: dict[str, str] = {}
    for i, t in enumerate(cfg.trunks):
        if not t.register:
            continue
        transport = cfg.transport(t.name)
        if transport == "tls" and tls is None:
            raise ValueError(f"trunk {t.name!r}: transport = \"tls\" needs the front's TLS socket (sip.tls_listen)")
        sock = {"udp": public_udp, "tcp": public_tcp, "tls": tls.socket if tls else ""}[transport]
        _, sock_host, sock_port = _socket_parts(sock)
        host = (cfg.raw["sip"]["public_address"] or "").strip().strip("[]") or sock_host
        if host in ("", "0.0.0.0", "::"):
            host = primary_address()
        param = "" if transport == "udp" else f";transport={transport}"
        contact = f"{f'[{host}]' if ':' in host else host}:{sock_port}{param}"
        rhost, rport = _split_address(t.address)
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
        retry = int(cfg.raw["trunks"][i].get("register_retry", 30)) if i < len(cfg.raw["trunks"]) else 30
        _quoted(contact)                # the first one goes into kamailio.cfg (reg_contact_addr)
        out.append(Registration(t.name, uuid, t.username, domain, t.realm, ha1, proxy, contact, sock,
                                t.expires, retry))
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
    import ipaddress
    lines = []
    for r in regs:
        host, _ = _split_address(r.proxy)
        aor = _quoted(f"sip:{r.username}@{r.domain}")
        try:
            ip = ipaddress.ip_address(host)
            cond = f'is_in_subnet("$si", "{ip}/{ip.max_prefixlen}")'
        except ValueError:
            cond = f'dns_int_match_ip("{_quoted(host)}", "$si")'
        lines.append(f'    if ($fu == "{aor}") {{ if ({cond}) return 1; return -1; }}')
    return "\n".join(lines) or "    # no registration"


def uac_lines(run_dir: str, regs: list[Registration], timer: int = 0) -> str:
    """The ``uac`` module's settings when the front registers trunks (else a comment). uac_reg's
    timer wakes every ``timer`` s (default: a third of the shortest retry, 1..10 s) and refreshes a
    registration that expires within ``timer + 3`` s; after a failure it sends again once
    ``retry - timer - 3`` s have passed, so its ``reg_retry_interval`` is the trunk's
    ``register_retry`` plus that margin (the shortest one when trunks differ: it is global)."""
    if not regs:
        return "# no trunk registers through the front (register = true)\n"
    retry = min(r.retry for r in regs)
    timer = timer or max(1, min(10, retry // 3))
    contact = regs[0].contact.split(";")[0]
    return ("#!define WITH_UACREG\n"
            'loadmodule "db_text.so"\nloadmodule "htable.so"\nloadmodule "uac.so"\n'
            f'modparam("uac", "reg_db_url", "text://{_quoted(run_dir)}/db")\n'
            f'modparam("uac", "reg_contact_addr", "{contact}")\n'
            f'modparam("uac", "reg_timer_interval", {timer})\n'
            f'modparam("uac", "reg_retry_interval", {retry + timer + 3})\n'
            'modparam("uac", "restore_mode", "none")\n'
            'modparam("htable", "htable", "uacreg=>size=4;")\n')


TOPOH_FILE = "topoh.cfg"        # in the run directory: topoh's mask key, owner-only
TOPOH_URI_PARAM = "tlh"         # the masked URIs' parameter (topoh's default "line" is a common Contact parameter)
_KEY_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")


def mask_address(public_address: str, listen: list[str]) -> str:
    """topoh's ``mask_ip``, the address masked URIs and Vias name toward trunks: ``sip.public_address``
    when set, else the public UDP socket's own address (the host's primary address when that is a
    wildcard). The address alone: topoh recognises a masked URI by its host being exactly
    ``mask_ip``, so with a port in it the Record-Route entry it masked came back undecoded (and
    broke the outbound call's in-dialog routing). Carriers route in-dialog requests by the front's
    public Record-Route entry (address and port); one that ignores Record-Route and sends to the
    masked Contact reaches port 5060 of that address."""
    public_udp = next((x for x in listen if x.lower().startswith("udp:")), listen[0])
    _, host, _ = _socket_parts(public_udp)
    host = public_address.strip().strip("[]") or host
    if host in ("", "0.0.0.0", "::"):
        host = primary_address()
    if any(ch.isspace() or ch in '"#;,<>@' for ch in host):
        raise ValueError(f"unsupported character in the front's public address {host!r}")
    return f"[{host}]" if ":" in host else host


def topoh_lines(run_dir: str, mask_ip: str) -> str:
    """The topoh module's settings (topology hiding toward trunks). The mask key is not here: it is
    in ``run_dir/topoh.cfg`` (``write_topoh``), readable by its owner only, and included."""
    return ("#!define WITH_TOPOH\n"
            'loadmodule "textopsx.so"\nloadmodule "topoh.so"\n'
            f'include_file "{_quoted(run_dir)}/{TOPOH_FILE}"\n'
            f'modparam("topoh", "mask_ip", "{_quoted(mask_ip)}")\n'
            f'modparam("topoh", "uparam_name", "{TOPOH_URI_PARAM}")\n'
            'modparam("topoh", "mask_callid", 0)\n')


def topoh_key(run_dir: str) -> str:
    """The box's mask key: made (random, 256 bits) the first time, kept in ``run_dir/topoh.cfg`` and
    reused when the supervisor restarts Kamailio (what a trunk sends back masked with it still
    decodes); a new box (an empty run directory) gets a new one."""
    import re
    try:
        m = re.search(r'"mask_key", "([A-Za-z0-9_-]{32,})"', Path(run_dir, TOPOH_FILE).read_text())
        if m:
            return m.group(1)
    except (OSError, UnicodeDecodeError):
        pass
    import secrets
    return secrets.token_urlsafe(32)


def write_topoh(run_dir: str) -> None:
    """``run_dir/topoh.cfg`` (0600): topoh's mask key, whoever can read it can decode what the front
    hides from trunks; the key never goes into kamailio.cfg or a log."""
    key = topoh_key(run_dir)
    if len(key) < 32 or not set(key) <= _KEY_CHARS:
        raise ValueError("bad topoh mask key")
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, TOPOH_FILE)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# generated by trunkline: topoh's mask key (owner-only; keep it private)\n"
                f'modparam("topoh", "mask_key", "{key}")\n')
    os.chmod(path + ".tmp", 0o600)
    os.replace(path + ".tmp", path)


def _tls_path(text: str) -> str:
    if any(ch.isspace() or ch in '#[]"=' for ch in text):
        raise ValueError(f"unsupported character in TLS setting {text!r}")
    return text


def _groups(trusted: list[str], trunk_addresses: list[str], trunks: Trunks | None) -> list[tuple[str, str, list[str]]]:
    """(tag, address, allow) per trunk; without ``trunks`` all addresses and CIDRs are one
    trunk "t0" (no dialog binding between trunks)."""
    if trunks is not None:
        return [(f"t{i}", a, list(allow)) for i, (a, allow) in enumerate(trunks)]
    return [("t0", a, []) for a in trunk_addresses] + [("t0", "", list(trusted))]


def trusted_lines(groups: list[tuple[str, str, list[str]]], transports: list[str] | None = None) -> str:
    """route[TRUSTED] body: the source is inside a trunk's allow-list; ``$var(trunk)``
    names that trunk (in-dialog requests are bound to the trunk that owns the dialog). A
    ``tls`` trunk is trusted only over TLS: a spoofed UDP packet from its address is not it."""
    transports = list(transports or []) + ["udp"] * (len(groups) - len(transports or []))
    over_tls = '$pr == "tls" && '
    lines = [f'    if ({over_tls if transport == "tls" else ""}is_in_subnet("$si", "{_quoted(c)}")) '
             f'{{ $var(trunk) = "{tag}"; return 1; }}'
             for (tag, _, allow), transport in zip(groups, transports) for c in allow]
    return "\n".join(lines) or "    # none"


def trunk_transport_lines(groups: list[tuple[str, str, list[str]]], transports: list[str]) -> str:
    """route[TRUNKTRANSPORT] body: a request to a ``tcp``/``tls`` trunk (``$var(trunk)``) leaves
    over that transport, to the Request-URI's host and port (5061 for TLS, 5060 for TCP
    when the URI names none), so each of a trunk's addresses is reached the same way. An
    in-dialog request keeps its next hop when that already uses the transport (a Contact
    or Route with ``transport=tls``)."""
    lines = []
    for (tag, _, _), transport in zip(groups, transports):
        if transport not in ("tcp", "tls"):
            continue
        lines.append(f'    if ($var(trunk) == "{tag}") {{ if (!has_totag() || $nh(P) != "{transport}") '
                     f'route(VIA{transport.upper()}); return 1; }}')
    return "\n".join(lines) or "    # every trunk is reached over UDP"


SRTP_FLAGS = {   # rtpengine_manage() flags: toward the cell always plain RTP; toward the trunk
    "in": "RTP/AVP replace-origin replace-session-connection ICE=remove",
    "mandatory": "RTP/SAVP SDES-only replace-origin replace-session-connection ICE=remove",
    "optional": "OSRTP-offer SDES-only replace-origin replace-session-connection ICE=remove",
}


CELL_CODECS = ("PCMU", "PCMA", "G722")    # what cells speak that rtpengine can transcode to and from


def edge_flags(srtp: str, codecs: list[str], cell_codecs: list[str] | None = None) -> tuple[str, str] | None:
    """rtpengine_manage() flags for the offers of a trunk's calls, (toward the cell, toward the
    trunk), or None when its media does not cross the edge (no SRTP, no ``codecs``). ``codecs``
    (the trunk's, rtpengine's spelling) is what goes on the wire toward the trunk: a cell codec
    it does not list is masked there (still spoken on the cell's side), one the cells lack (Opus)
    is added and transcoded (codec-transcode). Toward the cell that codec is masked and the
    cells' own are added, so an Opus-only offer still reaches a cell it can answer."""
    if srtp == "off" and not codecs:
        return None
    to_cell, to_trunk = SRTP_FLAGS["in"], SRTP_FLAGS[srtp if srtp != "off" else "in"]
    if codecs:
        cells = [c.upper() for c in (cell_codecs or CELL_CODECS) if c.upper() in CELL_CODECS] or ["PCMU"]
        foreign = [c for c in codecs if c not in cells]
        to_trunk += "".join(f" codec-mask-{c}" for c in cells if c not in codecs)
        to_trunk += "".join(f" codec-transcode-{c}" for c in foreign)
        if foreign:
            to_cell += "".join(f" codec-mask-{c}" for c in foreign)
            to_cell += "".join(f" codec-transcode-{c}" for c in cells)
    return to_cell, to_trunk


def edge_lines(groups: list[tuple[str, str, list[str]]], flags: list[tuple[str, str] | None]) -> str:
    """route[EDGEFLAGS] body: for a trunk whose media crosses rtpengine, ``$var(edge)`` = 1 and
    its offer flags toward the cell and toward the trunk (see ``edge_flags``)."""
    lines = [f'    if ($var(trunk) == "{tag}") {{ $var(edge) = 1; $var(edge_cell) = "{_quoted(f[0])}"; '
             f'$var(edge_trunk) = "{_quoted(f[1])}"; return 1; }}'
             for (tag, _, _), f in zip(groups, flags) if f is not None]
    return "\n".join(lines) or "    # no trunk's media crosses the edge"


def srtp_lines(groups: list[tuple[str, str, list[str]]], modes: list[str]) -> str:
    """route[SRTPMODE] body: ``$var(srtp)`` = the mode of trunk ``$var(trunk)`` ("" = off)."""
    lines = [f'    if ($var(trunk) == "{tag}") {{ $var(srtp) = "{mode}"; return 1; }}'
             for (tag, _, _), mode in zip(groups, modes) if mode in ("optional", "mandatory")]
    return "\n".join(lines) or "    # no SRTP trunk"


def trunk_dest_lines(trunk_addresses: list[str], trusted: list[str],
                     groups: list[tuple[str, str, list[str]]] | None = None) -> str:
    """route[TRUNKDEST] body: a cell's request may go to a trunk's address (host, and
    port when the address names one) or to a host inside a trunk's allow-list; sets
    ``$var(trunk)`` to that trunk."""
    lines = []
    groups = groups if groups is not None else _groups(trusted, trunk_addresses, None)
    for tag, addresses, _ in groups:
        # a trunk's address, or every address of its ordered failover list
        for address in ([addresses] if isinstance(addresses, str) else addresses):
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


def listen_lines(public: list[str], cell_socket: str, advertise: str = "") -> str:
    """``listen=`` lines: the public sockets (``proto:ip:port``), each with ``advertise
    PUBLIC:port`` when the box is behind NAT (``sip.public_address``: Kamailio then puts the
    public address in its Via and Record-Route toward trunks), and the internal cell socket,
    which never advertises (cells reach it on its own address). Kamailio counts an
    advertised address as ``myself`` (its Record-Route is consumed, OPTIONS to it answered)."""
    adv = advertise.strip().strip("[]")
    if any(ch.isspace() or ch in '"#;,' for ch in adv):
        raise ValueError(f"unsupported character in sip.public_address {advertise!r}")
    adv = f"[{adv}]" if ":" in adv else adv

    def line(sock: str) -> str:
        return f"listen={sock}" + (f" advertise {adv}:{sock.rpartition(':')[2]}" if adv else "")
    return "\n".join([*(line(x) for x in public), f"listen={cell_socket}"])


def render(listen: list[str], run_dir: str, trusted: list[str], retry_after: int, ping: int = 2,
           pike: int = 60, children: int = 2, debug: int = 1, fr_timer: int = 2000,
           trunk_addresses: list[str] | None = None, tcp_lifetime: int = 20,
           tcp_trusted_lifetime: int = 3600, tcp_max: int = 2048, cell_socket: str | None = None,
           trunks: Trunks | None = None, tls: Tls | None = None, transports: list[str] | None = None,
           srtp: list[str] | None = None, media: MediaEdge | None = None, advertise: str = "",
           registrations: list[Registration] | None = None, codecs: list[list[str]] | None = None,
           cell_codecs: list[str] | None = None, topology_hiding: bool = False,
           lost_dialog_window: int = 3660) -> str:
    """The front's config. ``listen``: the public sockets; ``trusted``: trunk source CIDRs
    (everything else is dropped); ``trunk_addresses``: where cells may send requests (with
    ``trusted``); ``trunks``: the same per trunk, (address, allow), so that a trunk acts
    only on its own dialogs; ``cell_socket``: the internal ``udp:ip:port`` socket used only
    toward cells (default: the first public UDP address, port + 1000); ``tls``: SIP over TLS
    at the edge (its socket is added to ``listen``; write ``tls_cfg(tls)`` next to the config);
    ``transports``: per trunk (same order as ``trunks``) "udp", "tcp" or "tls"; ``srtp``: per
    trunk "off", "optional" or "mandatory", which needs ``media`` (rtpengine); ``advertise``:
    ``sip.public_address``, named instead of the public sockets' own address (see ``listen_lines``);
    ``registrations``: trunks the front registers (uac_reg; write ``uacreg_table`` next to the config);
    ``codecs``: per trunk its ``codecs`` ([] = as the cells offer), which also needs ``media``;
    ``cell_codecs``: ``sip.codecs``, what the cells speak (transcoded to from a trunk's Opus);
    ``topology_hiding``: mask the cells' addresses toward trunks (topoh; write ``write_topoh`` next
    to the config), on the public address ``mask_address(advertise, listen)``."""
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
    transports = list(transports or [])
    if "tls" in transports and tls is None:
        raise ValueError("a trunk with transport = \"tls\" needs the front's TLS socket (sip.tls_listen)")
    if tls is not None:
        listen = [*listen, tls.socket]
        threads, tcp_children = tls_process_settings(kamailio_version(), children)
        tls_module = (threads + "enable_tls=yes\n"
                      f'loadmodule "tls.so"\nmodparam("tls", "config", "{_quoted(run_dir)}/tls.cfg")\n'
                      'modparam("tls", "connection_timeout", 600)\n')
        to_tls = f'if ($nh(P) == "tls") {{\n        $fs = "{_quoted(tls.socket)}";\n    }} else '
    else:
        tls_module, to_tls = "# no SIP over TLS configured ([sip] tls_listen)\n", ""
        tcp_children = children
    modes = list(srtp or [])
    modes += ["off"] * (len(groups) - len(modes))
    trunk_codecs = list(codecs or [])
    trunk_codecs += [[]] * (len(groups) - len(trunk_codecs))
    if any(m != "off" for m in modes) and media is None:
        raise ValueError("a trunk with srtp needs rtpengine at the edge (media)")
    if any(trunk_codecs) and media is None:
        raise ValueError("a trunk with codecs needs rtpengine at the edge (media)")
    flags = [edge_flags(m, c, cell_codecs) for m, c in zip(modes, trunk_codecs)]
    if media is not None:
        # WITH_MEDIAEDGE guards the relay's routes; WITH_SRTP only marks that some trunk has SRTP
        media_module = ("#!define WITH_MEDIAEDGE\n" + ("#!define WITH_SRTP\n" if any(m != "off" for m in modes) else "")
                        + f'loadmodule "rtpengine.so"\nmodparam("rtpengine", "rtpengine_sock", '
                        f'"udp:127.0.0.1:{media.ng_port}")\nmodparam("rtpengine", "rtpengine_tout_ms", 2000)\n')
    else:
        media_module = "# no rtpengine: media flows directly between trunks and cells\n"
    values = {
        "RTPENGINE_MODULE": media_module, "SRTPMODE": srtp_lines(groups, modes),
        "EDGEFLAGS": edge_lines(groups, flags),
        "LISTEN": listen_lines(listen, cell_socket, advertise), "RUN_DIR": run_dir,
        "TLS_MODULE": tls_module, "TOTLS": to_tls,
        "TRUNKTRANSPORT": trunk_transport_lines(groups, transports + ["udp"] * (len(groups) - len(transports))),
        "MODULES": modules_dir(), "CELL_SOCKET": _quoted(cell_socket), "CELL_IP": _quoted(cell_ip),
        "CELL_PORT": str(cell_port), "PUBLIC_UDP": _quoted(public_udp), "PUBLIC_TCP": _quoted(public_tcp),
        "LOST_DLG_WINDOW": str(int(lost_dialog_window)),
        "TRUSTED": trusted_lines(groups, transports), "RETRY_AFTER": str(retry_after), "PING": str(ping), "PIKE": str(pike),
        "CHILDREN": str(children), "TCP_CHILDREN": str(tcp_children), "DEBUG": str(debug), "FR_TIMER": str(fr_timer),
        "TRUNKDEST": trunk_dest_lines(trunk_addresses or [], trusted, groups),
        "TCP_LIFETIME": str(tcp_lifetime), "TCP_TRUSTED_LIFETIME": str(tcp_trusted_lifetime),
        "TCP_MAX": str(tcp_max), "OPEN_FILES": str(tcp_max + 1024),
        "UAC_MODULE": uac_lines(run_dir, list(registrations or [])),
        "REGISTRAR": registrar_lines(list(registrations or [])),
        "CELL_RR_RE": "".join({".": "[.]", "[": "[[]", "]": "[]]"}.get(ch, ch) for ch in
                              (f"[{cell_ip}]" if ":" in cell_ip else cell_ip) + f":{cell_port}"),
        "TOPOH_MODULE": (topoh_lines(run_dir, mask_address(advertise, [x for x in listen if not x.startswith("tls:")]))
                         if topology_hiding else "# no topology hiding ([sip] topology_hiding = false)\n"),
    }
    for k, v in values.items():
        tpl = tpl.replace("{{" + k + "}}", v)
    if "{{" in tpl:
        raise ValueError("unfilled placeholder in kamailio template")
    return tpl


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


def write(run_dir: str, cfg_text: str, dlist: str, tls: Tls | None = None,
          regs: list[Registration] | None = None) -> str:
    os.makedirs(run_dir, exist_ok=True)
    if "#!define WITH_TOPOH" in cfg_text:
        write_topoh(run_dir)
    if regs:
        write_uacreg(run_dir, regs)
    else:                                   # no trunk registers now: no digest left behind from before
        for name in ("uacreg", "version"):
            try:
                os.unlink(os.path.join(run_dir, "db", name))
            except FileNotFoundError:
                pass
    if tls is not None:
        with open(os.path.join(run_dir, "tls.cfg"), "w") as f:
            f.write(tls_cfg(tls))
    with open(os.path.join(run_dir, "dispatcher.list"), "w") as f:
        f.write(dlist)
    path = os.path.join(run_dir, "kamailio.cfg")
    with open(path, "w") as f:
        f.write(cfg_text)
    return path
