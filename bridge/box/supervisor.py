"""``trunkline serve --cells N``: N cell processes behind a Kamailio front.

The supervisor starts each cell on its own loopback SIP port, HTTP port and
RTP range (all sharing one data directory and its SQLite store), generates the
Kamailio config (deploy/kamailio/kamailio.cfg.tmpl) and runs Kamailio on the
public SIP address, restarts a cell that dies (backoff up to 1 s doubling to 30 s, full jitter
(``bridge.core.backoff``), reset after a minute up), and on SIGTERM drains every cell before stopping
Kamailio. It also serves the box's HTTP: one API, WebSocket, webhooks and
/metrics for all cells (see ``bridge.box.api``). The front registers the ``register = true``
trunks itself (uac_reg, ``bridge.box.uacreg.registrations``); the supervisor reads their state
over Kamailio's ctl socket every ``REG_POLL`` s (``bridge.box.registrations``).

Cells are forked from a zygote (``bridge.box.zygote``) that the supervisor forks at start, so
they share the imported code instead of each importing it again (exec is the fallback).
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from bridge.box import kamailio, uacreg
from bridge.box.registrations import (Backoff, RegState, changed, last_replies, read_states, records,
                                      registrar_net as _registrar_net)
from bridge.box.zygote import Zygote
from bridge.core import backoff
from bridge.core.config import Config
from bridge.core.logs import event

log = logging.getLogger("trunkline.supervisor")

REG_POLL = 2.0          # seconds between reads of the front's registrations (uac.reg_dump)
REG_UNREADABLE = 5      # reads failed in a row before the trunks are reported unregistered


def _reap_front(config_path: str) -> None:
    """Kill what is left of an earlier Kamailio on this config: when its main process dies by
    SIGKILL its workers live on, holding the front's sockets, and a new one cannot bind them."""
    me = os.getpid()
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == me:
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"-f" in args and config_path.encode() in args and os.path.basename(args[0]).startswith(b"kamailio"):
            try:
                os.kill(int(p), signal.SIGKILL)
            except OSError:
                pass


def _is_loopback(host: str) -> bool:
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the supervisor dies, however it dies."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class CellProc:
    index: int
    host: str
    sip_port: int
    http_port: int
    rtp: str
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    drained: bool = False
    log_path: str = ""
    history: list = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"sip:{self.host}:{self.sip_port}"

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    def __init__(self, cfg: Config, n: int, config_path: str | None):
        self.cfg = cfg
        self.n = n
        self.config_path = config_path
        c = cfg.raw["cells"]
        sip_host, _, sip_port = cfg.raw["sip"]["listen"].rpartition(":")
        self.public_host, self.public_port = sip_host.strip("[]"), int(sip_port)
        http_host, _, http_port = cfg.raw["http"]["listen"].rpartition(":")
        sip_base = c["sip_base"] or self.public_port + 1
        http_base = c["http_base"] or int(http_port) + 1
        lo, _, hi = cfg.raw["media"]["rtp_ports"].partition("-")
        lo, hi = int(lo), int(hi)
        per = (hi - lo + 1) // n
        if per < 8:
            raise ValueError(f"media.rtp_ports {lo}-{hi} is too small for {n} cells (8 ports per cell at least)")
        per -= per % 2
        self.cells = [CellProc(i, c["host"], sip_base + i, http_base + i,
                               f"{lo + i * per}-{lo + (i + 1) * per - 1}") for i in range(n)]
        # the front's internal UDP socket, used only toward cells (see deploy/kamailio)
        taken = {self.public_port, int(http_port)} | {p for c in self.cells for p in (c.sip_port, c.http_port)} \
            | set(range(lo, hi + 1))           # the cells' RTP ports: a call must never find its port taken
        self.front_port = cfg.raw["cells"]["front_port"] or next(p for p in range(sip_base + n, 65536) if p not in taken)
        used = {self.public_port, int(http_port)}
        if self.front_port in taken:
            raise ValueError(f"cells.front_port {self.front_port} collides with other listeners")
        used.add(self.front_port)
        for c in self.cells:
            if c.sip_port in used or c.http_port in used or c.sip_port == c.http_port:
                raise ValueError(f"cells.sip_base/http_base: cell {c.index} ports {c.sip_port}/{c.http_port} "
                                 "collide with other listeners")
            used |= {c.sip_port, c.http_port}
        self.run_dir = os.path.join(os.path.abspath(cfg.data_dir), "run")
        self.kamailio: subprocess.Popen | None = None
        self.rtpengine: subprocess.Popen | None = None      # SRTP/codecs trunks only (kamailio.media_edge)
        self._front_fails, self._front_next, self._front_started = 0, 0.0, time.monotonic()
        self._media_next = 0.0
        self.stopping = False
        self.zygote: Zygote | None = None     # forks the cells (shared imported code); None: exec
        self.registrations: dict[str, RegState] = {}    # trunk -> the front's registration (uac_reg)
        self.front_registrations: list[uacreg.Registration] = []
        self.reg_holds: Backoff | None = None           # the registrations' backoff, while polled
        self.front_config = ""                          # the running front's kamailio.cfg

    # -- cells -------------------------------------------------------------------------
    def _cell_cmd(self, c: CellProc) -> list[str]:
        cmd = [sys.executable, "-m", "bridge.cli", "serve", "--sip", f"{c.host}:{c.sip_port}",
               "--http", f"{c.host}:{c.http_port}", "--rtp-ports", c.rtp, "--data-dir", self.cfg.data_dir,
               "--app", self.cfg.app]
        if self.config_path:
            cmd += ["--config", self.config_path]
        return cmd

    def _cell_env(self, c: CellProc) -> dict:
        # A cell trusts only the front's internal socket (address and port); on loopback any
        # local user may still bind that address (deploy/OPERATOR.md: "Cells and local users").
        front = self._front_ip()
        h = f"[{front}]" if ":" in front else front
        return {**os.environ, "TRUNKLINE_CELL": str(c.index),
                "TRUNKLINE_SIP_TRUSTED_PROXIES": f"{front}/32",
                "TRUNKLINE_SIP_TRUSTED_PROXY_PORT": str(self.front_port),
                "TRUNKLINE_SIP_OUTBOUND_PROXY": f"sip:{h}:{self.front_port}",
                "TRUNKLINE_WEBHOOKS_DISPATCH": "false",
                "TRUNKLINE_HTTP_OPS_LISTEN": "",
                "TRUNKLINE_HTTP_TLS_CERT": "", "TRUNKLINE_HTTP_TLS_KEY": "",   # the box terminates HTTPS
                **self._nat_env()}

    def _nat_env(self) -> dict:
        """Behind NAT (``sip.public_address`` / ``media_public_address``): the front advertises the
        public SIP address; a cell's Via/Contact name its own socket (trunks reach the dialog through
        the front's Record-Route), its SDP names the public media address and its RTP binds the
        box's public-side address (``sip.listen``'s host), where the router forwards the RTP range."""
        sip = self.cfg.raw["sip"]
        media = sip["media_public_address"] or sip["public_address"]
        if not media:
            # No public address: the trunk's RTP still reaches the cells on the box's public side.
            # (Before, they bound and announced ``cells.host``, loopback, on any box.)
            if _is_loopback(self.public_host):
                return {}
            return {"TRUNKLINE_CELL_RTP_HOST": self.public_host}
        return {"TRUNKLINE_SIP_PUBLIC_ADDRESS": "", "TRUNKLINE_SIP_MEDIA_PUBLIC_ADDRESS": media,
                "TRUNKLINE_CELL_RTP_HOST": self.public_host}

    def _front_ip(self) -> str:
        """The address of the front's internal socket: Kamailio sends to cells from it and
        cells send to it (cells trust only it)."""
        return self.cfg.raw["cells"]["front_ip"] or "127.0.0.1"

    def start_cell(self, c: CellProc) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        c.log_path = os.path.join(self.run_dir, f"cell{c.index}.log")
        if self.zygote is not None:
            try:
                c.proc = self.zygote.spawn(self._cell_cmd(c)[3:], self._cell_env(c), c.log_path, os.getcwd())
            except OSError as exc:
                log.error("cannot fork cell %d (%s): cells start with exec from now on", c.index, exc)
                self.zygote = None
        if self.zygote is None:
            out = open(c.log_path, "ab")
            c.proc = subprocess.Popen(self._cell_cmd(c), env=self._cell_env(c), stdout=out, stderr=subprocess.STDOUT,
                                      cwd=os.getcwd(), preexec_fn=_die_with_parent)
            out.close()
        c.started = time.monotonic()
        event(log, "cell_started", cell=c.index, pid=c.proc.pid, sip=f"{c.host}:{c.sip_port}",
              http=f"{c.host}:{c.http_port}", rtp=c.rtp, restarts=c.restarts)

    async def wait_healthy(self, c: CellProc, timeout: float) -> bool:
        import aiohttp
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
            while time.monotonic() < deadline:
                if not c.alive():
                    return False
                try:
                    async with s.get(f"{c.http}/healthz") as r:
                        if r.status == 200:
                            return True
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                await asyncio.sleep(0.2)
        return False

    # -- kamailio ------------------------------------------------------------------------
    def render_front(self, media=None):
        """The front's Kamailio config for this box: (text, TLS settings, the internal socket); the
        trunks it registers are left in ``front_registrations``. Cells may send only to a trunk's
        addresses (every one of a failover list) or allow-list. A trunk the front registers also
        trusts its registrar's address (an IP literal): the registrar answers and calls from it."""
        h = f"[{self.public_host}]" if ":" in self.public_host else self.public_host
        listen = [f"udp:{h}:{self.public_port}", f"tcp:{h}:{self.public_port}"]
        fh = self._front_ip()
        inner = f"udp:{f'[{fh}]' if ':' in fh else fh}:{self.front_port}"
        tls = kamailio.Tls.from_sip(self.cfg.raw["sip"])
        regs = uacreg.registrations(self.cfg, listen, tls.socket if tls else "")
        allow = {t.name: list(t.allow) for t in self.cfg.trunks}
        for t in self.cfg.trunks:
            net = _registrar_net(t.address) if t.register else ""
            if net and net not in allow[t.name]:
                allow[t.name].append(net)
        trusted = [a for t in self.cfg.trunks for a in allow[t.name]]
        text = kamailio.render(listen, self.run_dir, trusted, self.cfg.raw["sip"]["retry_after"],
                               ping=self.cfg.raw["cells"]["ping_interval"], pike=self.cfg.raw["cells"]["pike"],
                               children=self.cfg.raw["cells"]["children"],
                               trunk_addresses=[a for t in self.cfg.trunks for a in (t.addresses or [t.address]) if a],
                               cell_socket=inner,
                               trunks=[(list(t.addresses) or t.address, allow[t.name]) for t in self.cfg.trunks],
                               tls=tls, transports=[self.cfg.transport(t.name) for t in self.cfg.trunks],
                               srtp=[self.cfg.srtp_mode(t.name) for t in self.cfg.trunks], media=media,
                               advertise=self.cfg.raw["sip"]["public_address"], registrations=regs,
                               codecs=[self.cfg.trunk_codecs(t.name) for t in self.cfg.trunks],
                               cell_codecs=list(self.cfg.raw["sip"]["codecs"]),
                               topology_hiding=self.cfg.raw["sip"]["topology_hiding"],
                               # a call set up before a restart lasts at most app.max_duration (0: no limit)
                               lost_dialog_window=int(self.cfg.raw["app"]["max_duration"] or 86400) + 60)
        self.front_registrations = regs
        return text, tls, inner

    def start_kamailio(self) -> None:
        binary = shutil.which(self.cfg.raw["cells"]["kamailio"]) or self.cfg.raw["cells"]["kamailio"]
        if not shutil.which(binary):
            raise RuntimeError(f"kamailio not found ({binary}); install the Debian package 'kamailio'")
        media = kamailio.media_edge(self.cfg, self.public_host, self.front_port)
        if media is not None and (self.rtpengine is None or self.rtpengine.poll() is not None):
            self.rtpengine = kamailio.start_media(media, self.run_dir, _die_with_parent)
        text, tls, inner = self.render_front(media)
        regs = self.front_registrations
        h = f"[{self.public_host}]" if ":" in self.public_host else self.public_host
        dlist = kamailio.dispatcher_list([(c.host, c.sip_port) for c in self.cells], self.cfg.raw["sip"]["capacity"],
                                         socket=inner)
        path = kamailio.write(self.run_dir, text, dlist, tls, regs)
        for r in regs:
            self.registrations.setdefault(r.trunk, RegState(r.trunk))
        check = subprocess.run([binary, "-c", "-f", path], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError("generated kamailio config does not parse:\n" + check.stderr[-2000:])
        _reap_front(path)
        self.front_config = path
        out = open(os.path.join(self.run_dir, "kamailio.log"), "ab")
        self.kamailio = subprocess.Popen([binary, "-DD", "-E", "-f", path, "-P", os.path.join(self.run_dir, "kamailio.pid")],
                                         stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        out.close()
        event(log, "front_started", pid=self.kamailio.pid, listen=f"{h}:{self.public_port}", cells=self.n)

    def kamcmd(self, *args: str) -> str:
        r = subprocess.run(["kamcmd", "-s", f"unix:{self.run_dir}/kamailio_ctl", *args],
                           capture_output=True, text=True, errors="replace", timeout=5)
        if r.returncode != 0:
            raise RuntimeError(f"kamcmd {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    async def wait_front(self, timeout: float) -> bool:
        """Kamailio is up once its control socket answers (all its workers are forked by then)."""
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            if self.kamailio is None or self.kamailio.poll() is not None:
                return False
            try:
                await loop.run_in_executor(None, self.kamcmd, "core.uptime")
                return True
            except (RuntimeError, subprocess.TimeoutExpired):
                await asyncio.sleep(0.1)
        return False

    # -- the front's trunk registrations (uac_reg) ------------------------------------------
    def read_registrations(self) -> tuple[dict[str, RegState], dict[str, tuple[int, int]]]:
        """Each registered trunk's state and uac_reg record (flags, seconds until due), read from
        Kamailio (``uac.reg_dump`` carries the HA1 digest: it is parsed here and never logged)."""
        dump = self.kamcmd("uac.reg_dump")
        try:
            replies = last_replies(self.kamcmd("htable.dump", "uacreg"))
        except RuntimeError:
            replies = {}
        trunks = {r.uuid: r.trunk for r in self.front_registrations}
        return read_states(dump, replies, trunks, self.registrations), records(dump, trunks)

    def update_registrations(self, states: dict[str, RegState]) -> None:
        """Keep the new states (the /metrics gauge) and log a ``registration`` event for each change."""
        for trunk, new in states.items():
            old = self.registrations.get(trunk)
            if changed(old, new):
                new.since = time.time()
                event(log, "registration", trunk=trunk, status=new.status, reason=new.reason,
                      registered=new.registered)
            elif old is not None:
                new.since = old.since
            self.registrations[trunk] = new

    async def _hold_or_release(self, holds: Backoff, recs: dict[str, tuple[int, int]]) -> None:
        """Apply the backoff's decisions at the front: a failed registration is disabled until its
        wait is over, then enabled (uac_reg sends on its next timer tick)."""
        loop = asyncio.get_running_loop()
        uuids = {r.trunk: r.uuid for r in self.front_registrations}
        now = time.monotonic()
        for verb, trunk in holds.step(now, recs):
            try:
                # "s:": kamcmd sends a value that parses as a number as an int (a phone-number
                # username would reach Kamailio mangled) and reads one starting with "-" as an option
                await loop.run_in_executor(None, self.kamcmd, f"uac.reg_{verb}", "l_uuid", f"s:{uuids[trunk]}")
            except (RuntimeError, subprocess.TimeoutExpired, OSError, KeyError) as exc:
                if verb == "disable":
                    holds.undo(trunk)               # not held after all: uac_reg's own retry stands
                event(log, "registration_control_failed", trunk=trunk, action=verb, error=str(exc)[:200])
                continue
            if verb == "disable":
                event(log, "registration_retry", trunk=trunk, failures=holds.failures[trunk],
                      retry_in=round(holds.retry_in(trunk, now) or 0.0, 1))

    async def register_now(self, trunk: str) -> None:
        """Register ``trunk`` at once (an operator after a carrier's outage, rather than waiting out
        the backoff): its hold is dropped, its count reset and its record enabled, which makes
        uac_reg send on its next timer tick, registered or not. KeyError: not a trunk the front
        registers; RuntimeError: the front did not take it."""
        reg = {r.trunk: r for r in self.front_registrations}[trunk]
        if self.reg_holds is not None:
            self.reg_holds.retry_now(trunk)
        await asyncio.get_running_loop().run_in_executor(None, self.kamcmd, "uac.reg_enable", "l_uuid",
                                                         f"s:{reg.uuid}")
        event(log, "registration_requested", trunk=trunk)

    async def _poll_registrations(self) -> None:
        loop = asyncio.get_running_loop()
        failed = 0
        holds = self.reg_holds = Backoff({r.trunk: (r.retry, r.retry_max) for r in self.front_registrations})
        while not self.stopping:
            now = time.monotonic()
            # wake for a hold that ends before the next poll, never sooner than 1 s (a hold that is
            # due but cannot be applied yet must not spin the loop)
            await asyncio.sleep(min([REG_POLL, *(max(1.0, u - now) for u in holds.until.values())]))
            if self.kamailio is not None and self.kamailio.poll() is None:
                try:
                    states, recs = await loop.run_in_executor(None, self.read_registrations)
                    failed = 0
                    await self._hold_or_release(holds, recs)
                    now, wall = time.monotonic(), time.time()
                    for trunk, st in states.items():
                        wait = holds.retry_in(trunk, now)
                        st.next_attempt = 0.0 if wait is None else round(wall + wait, 3)
                except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError):
                    failed += 1                 # the front is (re)starting: its ctl socket is not there yet
                    if failed < REG_UNREADABLE:
                        continue
                    # unreadable for long: never leave a stale "registered" on /metrics and /v1
                    states = {t: RegState(t, False, 0, "the front's registrations cannot be read", True)
                              for t in self.registrations}
            else:                               # no front, no registration
                states = {t: RegState(t, False, 0, "the front is down", True) for t in self.registrations}
                holds.until.clear()             # a new front loads its table enabled and registers at once
            for trunk, st in states.items():    # (the failures in a row outlive an unreadable front)
                st.failures = holds.failures.get(trunk, 0)
            self.update_registrations(states)

    def set_drained(self, c: CellProc, drained: bool) -> None:
        """A drained cell gets no new calls from the front; its live calls go on."""
        self.kamcmd("dispatcher.set_state", "d" if drained else "a", "1", c.uri)
        c.drained = drained
        event(log, "cell_drained" if drained else "cell_undrained", cell=c.index)

    # -- lifecycle -------------------------------------------------------------------------
    async def run(self) -> int:
        self.zygote = Zygote.start()          # now, while this process has a single thread
        try:
            return await self._run()
        finally:
            # whatever happened, no cell or front outlives the supervisor
            for c in self.cells:
                if c.alive():
                    c.proc.kill()
            if self.zygote is not None:
                self.zygote.close()
            if self.kamailio is not None and self.kamailio.poll() is None:
                self.kamailio.kill()
            if self.front_config:
                _reap_front(self.front_config)
            if self.rtpengine is not None and self.rtpengine.poll() is None:
                self.rtpengine.kill()

    def stop_front(self) -> None:
        """Stop Kamailio: SIGTERM, 10 s, SIGKILL; then whatever of it is left. Its main process can
        exit while a worker that had SIGTERM blocked lives on (seen once in a full test run: three
        workers of a stopped box, holding its sockets); those are killed here, not at the next start."""
        if self.kamailio and self.kamailio.poll() is None:
            self.kamailio.terminate()
            try:
                self.kamailio.wait(10)
            except subprocess.TimeoutExpired:
                self.kamailio.kill()
                self.kamailio.wait(5)
        if self.front_config:
            _reap_front(self.front_config)

    async def _run(self) -> int:
        from bridge.box.api import start_box
        for c in self.cells:
            self.start_cell(c)
        results = await asyncio.gather(*(self.wait_healthy(c, self.cfg.raw["models"]["load_timeout"] + 30)
                                         for c in self.cells))
        bad = [c.index for c, ok in zip(self.cells, results) if not ok]
        if bad:
            for c in self.cells:
                if c.alive():
                    c.proc.terminate()
            tail = open(self.cells[bad[0]].log_path, errors="replace").read()[-1500:]
            print(f"trunkline: cell(s) {bad} did not start:\n{tail}", file=sys.stderr)
            return 1
        try:
            self.start_kamailio()
        except (RuntimeError, ValueError, OSError) as exc:
            print(f"trunkline: {exc}", file=sys.stderr)
            await self._stop_cells()
            return 1
        if not await self.wait_front(15.0):
            tail = open(os.path.join(self.run_dir, "kamailio.log"), errors="replace").read()[-1500:]
            print(f"trunkline: the Kamailio front did not come up:\n{tail}", file=sys.stderr)
            await self._stop_cells()
            return 1
        runners = await start_box(self)
        polling = asyncio.create_task(self._poll_registrations()) if self.front_registrations else None
        event(log, "box_ready", sip=f"{self.public_host}:{self.public_port}", cells=self.n,
              http=self.cfg.raw["http"]["listen"])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            self._watch()
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        self.stopping = True
        if polling is not None:
            polling.cancel()
        event(log, "box_draining", cells=self.n)
        await self._stop_cells()
        self.stop_front()
        for r in runners:
            await r.cleanup()
        event(log, "box_stopped")
        return 0

    def _watch(self) -> None:
        now = time.monotonic()
        for c in self.cells:
            if c.alive():
                if c.restarts and now - c.started > 60:
                    c.restarts = 0
                continue
            if c.next_start == 0.0:
                code = c.proc.returncode if c.proc else None
                delay = backoff.delay(c.restarts, 1.0, 30.0)
                c.next_start = now + delay
                c.history.append(time.time())
                event(log, "cell_died", cell=c.index, exit_code=code, restart_in=round(delay, 3))
            elif now >= c.next_start:
                c.restarts += 1
                c.next_start = 0.0
                self.start_cell(c)
        if self.rtpengine is not None and self.rtpengine.poll() is not None and not self.stopping \
                and now >= self._media_next:
            # the media relay (SRTP, transcoding) died: calls through it lost their audio; new ones need it back
            log.error("rtpengine exited (%s); restarting it", self.rtpengine.returncode)
            self._media_next = now + 5.0
            try:
                media = kamailio.media_edge(self.cfg, self.public_host, self.front_port)
                if media is not None:
                    self.rtpengine = kamailio.start_media(media, self.run_dir, _die_with_parent)
            except (RuntimeError, OSError) as exc:
                log.error("rtpengine did not restart: %s", exc)
        if self.kamailio is not None and self.kamailio.poll() is not None and not self.stopping:
            # restarted with backoff (a front that cannot bind must not be respawned twice a second),
            # the count forgiven once it has stayed up for a minute
            if self._front_next == 0.0:
                self._front_fails = self._front_fails + 1 if now - self._front_started < 60 else 1
                delay = backoff.delay(self._front_fails - 1, 0.5, 30.0)
                self._front_next = now + delay
                log.error("kamailio exited (%s); restarting it in %.1f s", self.kamailio.returncode, delay)
            elif now >= self._front_next:
                self._front_next = 0.0
                self._front_started = now
                try:
                    self.start_kamailio()
                except (RuntimeError, ValueError, OSError) as exc:
                    log.error("kamailio did not restart: %s", exc)
                    self._front_next = now + 30.0

    async def _stop_cells(self) -> None:
        for c in self.cells:
            if c.alive():
                c.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.raw["drain_timeout"] + 15
        while any(c.alive() for c in self.cells) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        for c in self.cells:
            if c.alive():
                c.proc.kill()
