"""Starting the engine's pjsua2 Endpoint, as a part of the engine (a base class of ``sip.engine.Engine``).

Library and media configuration (the bridge clock rate, the jitter buffer's prefetch, RTP on
pjmedia's own worker), the SIP transports, the wake socket and the source guard, the codec
priorities and one pjsua account per trunk (and per extra failover address). Engine thread only,
once, before the loop."""
from __future__ import annotations

import logging
import socket
import time
from dataclasses import replace

import pjsua2 as pj

from sip.callbacks import _Account, _Call, _LogWriter, _quiet_stdout
from sip.config import PJSUA_SLOTS, EngineError, TrunkSpec
from sip.guard import Guard
from sip.port import FramePort, PortPool, choose_copy
from sip.uri import _loose_route, _registrar, _uri_host

BUSY_POLL_MS = 10          # libHandleEvents timeout while calls are up (answer delays, stats, commands)
SND_IDLE_CLOSE = 1         # seconds without a call before pjsua stops the bridge clock
PJSUA_ACCOUNTS = 8         # the wheel's PJSUA_MAX_ACC: one more aborts the process (an assertion)
log = logging.getLogger("trunkline.sip")


class EndpointSetup:
    """Needs the engine's ``cfg`` and ``trunk_for``; sets ``ep``, ``pool``, ``accounts``, ``guard``,
    ``_abandoned``, ``fast_copy``, ``_log_writer`` and the wake socket."""

    def _start_lib(self) -> None:
        c = self.cfg
        self.fast_copy = choose_copy()
        FramePort.realtime = c.realtime_clock
        ep = self.ep = pj.Endpoint()
        with _quiet_stdout():          # pjlib prints its banner before any log config applies
            ep.libCreate()
        ep_cfg = pj.EpConfig()
        ep_cfg.uaConfig.threadCnt = 0
        ep_cfg.uaConfig.mainThreadOnly = False
        ep_cfg.uaConfig.maxCalls = PJSUA_SLOTS
        ep_cfg.uaConfig.userAgent = c.user_agent
        self._log_writer = _LogWriter()
        ep_cfg.logConfig.writer = self._log_writer
        ep_cfg.logConfig.level = c.log_level
        ep_cfg.logConfig.consoleLevel = c.log_level
        ep_cfg.logConfig.decor = 0
        mc = ep_cfg.medConfig
        mc.clockRate = c.clock_rate
        mc.sndClockRate = c.clock_rate
        mc.channelCount = 1
        mc.audioFramePtime = 20
        mc.noVad = True
        mc.ecTailLen = 0
        mc.jbInit, mc.jbMinPre, mc.jbMaxPre = c.jitter_init_ms, c.jitter_min_ms, c.jitter_max_ms
        # RTP stays on pjmedia's own ioqueue and worker thread (C only, no GIL): that worker wakes
        # every 10 ms even with no call (~0.25 % of a core), but sharing the SIP ioqueue would put
        # every RTP packet through this thread's Python loop. The bridge clock stops SND_IDLE_CLOSE s
        # after the last call (``_stop_idle_clock``); pjsua starts it again for a call's audio.
        mc.threadCnt = 1
        mc.sndAutoCloseTime = SND_IDLE_CLOSE
        mc.maxMediaPorts = 32
        ep.libInit(ep_cfg)
        # Behind the front a cell listens on UDP only: the front reaches cells over UDP, and
        # pjsip's select() ioqueue (64 handles) is exhausted by a few dozen idle TCP connections.
        for kind in (pj.PJSIP_TRANSPORT_UDP, pj.PJSIP_TRANSPORT_TCP) if c.tcp else (pj.PJSIP_TRANSPORT_UDP,):
            tc = pj.TransportConfig()
            tc.port = c.port
            tc.boundAddress = c.host
            if c.public_address:
                tc.publicAddress = c.public_address
            try:
                ep.transportCreate(kind, tc)
            except pj.Error as exc:
                raise EngineError(f"cannot listen on {c.host}:{c.port}: {exc.info()}") from None
        ep.libStart()
        self._open_wake()
        self._start_guard()
        if c.tcp and c.host not in ("127.0.0.1", "::1", "localhost") and not c.host.startswith("127."):
            log.warning("SIP over TCP on %s:%d is reachable directly: pjsip's select() ioqueue holds 64 "
                        "sockets, so idle connections can lock out TCP trunks; for TCP trunks on a public "
                        "address run the Kamailio front (trunkline serve --cells N)", c.host, c.port)
        ep.audDevManager().setNullDev()
        self._set_codecs()
        self.pool = PortPool(PJSUA_SLOTS, c.clock_rate)
        self._stop_idle_clock()
        self.accounts: dict[str | None, _Account] = {}
        self._abandoned: dict[int, _Call] = {}   # outbound attempts given up on (failover), until pjsua ends them
        self._add_account(None, None)
        failover = [(t, i, a) for t in c.trunks for i, a in enumerate(t.addresses[1:], 1)]
        wanted = 1 + sum(1 for t in c.trunks if t.register or t.address or t.proxy) + len(failover)
        if wanted > PJSUA_ACCOUNTS:
            raise EngineError(f"trunks need {wanted} SIP accounts (one per trunk with an address, one per extra "
                              f"failover address, one default); pjsua holds {PJSUA_ACCOUNTS}")
        for t in c.trunks:
            if t.register or t.address or t.proxy:
                self._add_account(t.name, t)
        for t, i, a in failover:          # one account per failover address (its own route), never registered
            self._add_account(f"{t.name}#{i}", replace(t, address=a, register=False))
        log.info("SIP engine listening on %s:%d %s (capacity %d calls)", c.host, c.port,
                 "udp+tcp" if c.tcp else "udp", c.capacity)

    def _open_wake(self) -> None:
        """The socket ``_wake`` sends from, and where to: our UDP listen address (loopback for a wildcard)."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.cfg.host, self.cfg.host)
        try:
            family, _, _, _, to = socket.getaddrinfo(host, self.cfg.port, type=socket.SOCK_DGRAM)[0]
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.setblocking(False)
            # bound and connected to our own address: no port of its own open to the network, and
            # the kernel drops anything that does not come from the engine's socket
            s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0) if host.startswith(("127.", "::1"))
                   else (host, 0))
            s.connect(to)
        except OSError as exc:
            log.warning("no wake socket for the SIP engine (%s): an idle engine polls every %d ms", exc, BUSY_POLL_MS)
            return
        self._wake_sock, self._wake_to = s, to

    def _start_guard(self) -> None:
        """Drop requests from untrusted sources inside pjsip (see sip/guard.py): calibrate
        with one OPTIONS sent to ourselves from the listen address (loopback for a wildcard)."""
        host = self.cfg.host
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        self.guard = Guard(lambda ip: self.trunk_for(ip) is not None)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        problem = "did not calibrate"
        try:
            self.guard.register()
            with socket.socket(family, socket.SOCK_DGRAM) as s1, socket.socket(family, socket.SOCK_DGRAM) as s2:
                for s, pad in ((s1, 0), (s2, 97)):           # two ports, two lengths: offsets must agree
                    s.bind((host, 0))
                    s.sendto(self.guard.calibration_packet(s, (host, self.cfg.port), pad), (host, self.cfg.port))
                deadline = time.monotonic() + 2.0
                while not self.guard.active and time.monotonic() < deadline:
                    self.ep.libHandleEvents(10)
        except (OSError, RuntimeError, AttributeError) as exc:
            problem = f"unavailable ({exc})"
        finally:
            self.guard.give_up()
        if self.guard.active:
            return
        if self.cfg.require_guard:
            raise EngineError(f"SIP source guard {problem} and sip.require_guard is on: refusing to answer "
                              "untrusted sources with pjsua's replies (set sip.require_guard = \"off\" to run "
                              "without it, e.g. behind the Kamailio front)")
        log.error("SIP source guard %s: untrusted OPTIONS/MESSAGE get pjsua's answers", problem)

    def _stop_idle_clock(self) -> None:
        """pjsua stops an idle sound device (here the null device's clock thread, which ticks the
        conference bridge 50 times a second) only when a bridge connection goes away: make and break
        one between two pooled ports, so the clock stops SND_IDLE_CLOSE s after start too."""
        a, b = self.pool.ports[0], self.pool.ports[1]
        a.startTransmit(b)
        a.stopTransmit(b)

    def _set_codecs(self) -> None:
        wanted = [w.upper() for w in self.cfg.codecs]
        for info in self.ep.codecEnum2():
            cid = info.codecId
            name = cid.upper()
            prio = 0
            for i, w in enumerate(wanted):
                if name == w or name.startswith(w + "/"):
                    prio = 250 - i
            self.ep.codecSetPriority(cid, prio)

    def _rtp_transport(self) -> pj.TransportConfig:
        c = self.cfg
        tc = pj.TransportConfig()
        tc.port = c.rtp_low
        tc.portRange = max(0, c.rtp_high - c.rtp_low)
        tc.boundAddress = c.rtp_host or c.host
        # SDP c=/o=; the far end's RTP is latched anyway (pjmedia switches to a new source after
        # PJMEDIA_RTP_NAT_PROBATION_CNT packets from it: symmetric RTP behind the carrier's NAT)
        public = c.media_public_address or c.public_address
        if public:
            tc.publicAddress = public
        return tc

    def _add_account(self, name: str | None, trunk: TrunkSpec | None) -> None:
        c = self.cfg
        ac = pj.AccountConfig()
        # the identity (From of calls on a trunk without a username or caller_id): behind the front a
        # cell has no SIP public address of its own (its Via/Contact name its socket), its media one
        # stands in; without either, a trunk's calls name the trunk's host, never the cell's own
        # address (on a box of several hosts that was a cell's private address, to the carrier)
        public = c.public_address or c.media_public_address
        host = public or c.host
        hostport = f"[{host}]" if ":" in host else host
        ac.idUri = f"sip:trunkline@{hostport}:{c.port}"
        if trunk is not None and not public and _uri_host(trunk.address):
            ac.idUri = f"sip:trunkline@{_uri_host(trunk.address)}"
        ac.mediaConfig.transportConfig = self._rtp_transport()
        ac.callConfig.timerUse = pj.PJSUA_SIP_TIMER_OPTIONAL
        ac.natConfig.sipStunUse = pj.PJSUA_STUN_USE_DISABLED
        ac.natConfig.mediaStunUse = pj.PJSUA_STUN_USE_DISABLED
        if trunk is not None:
            if trunk.username:
                ac.idUri = f"sip:{trunk.username}@{_uri_host(trunk.address) or hostport}"
                if not trunk.realm or trunk.realm == "*":
                    # realm "*" answers any server's challenge with these credentials
                    raise EngineError(f"trunk {name!r}: credentials need an explicit realm")
                ac.sipConfig.authCreds.append(
                    pj.AuthCredInfo("digest", trunk.realm, trunk.username, 0, trunk.password))
            if trunk.proxy or trunk.address:
                ac.sipConfig.proxies.append(_loose_route(trunk.proxy or trunk.address))
            if trunk.register:
                ac.regConfig.registrarUri = _registrar(trunk.address)
                ac.regConfig.timeoutSec = trunk.expires
                ac.regConfig.registerOnAdd = True
            else:
                ac.regConfig.registerOnAdd = False
        acc = _Account(self, name)
        acc.create(ac, name is None)
        self.accounts[name] = acc
