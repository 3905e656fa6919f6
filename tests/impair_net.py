"""A userspace network impairer for the caller's RTP path (issue 14).

The kernel here has no ``sch_netem`` (``tc qdisc add dev lo root netem ...`` fails with "Specified
qdisc kind is unknown"), so impairment is done in userspace instead: ``ImpairRelay`` is a UDP relay
on 127.0.0.1 that the caller's SDP points at. Packets from the caller's RTP endpoint go on to the
cell, packets from the cell go on to the caller, and each direction passes through its own seeded
``Channel``:

- loss: independent per packet, or bursty (a two-state Gilbert-Elliott chain, ``burst`` = mean
  length of a loss burst);
- delay + jitter: ``delay`` plus a uniform sample in [-``jitter``, +``jitter``] (clipped at 0), as
  netem's ``delay D J`` without a distribution table; packets are delivered in order of their due
  time, so jitter wider than the 20 ms packet spacing reorders them, as on a real network;
- explicit reordering: with probability ``reorder`` a packet is held back ``reorder_gap`` s more, so
  it arrives after the packets sent after it;
- an outage: every packet is dropped from ``outage_at`` s after the channel's first packet, for
  ``outage`` s.

Decisions are drawn from a ``random.Random`` seeded with the impairment's seed and the direction, a
fixed number of draws per packet, so the same packet sequence always gets the same fate (only the
outage window is in wall time). The relay is transparent: the cell and the caller see each other's
packets unchanged, only from the relay's address. ``ImpairedCaller`` is ``voice.Caller`` with its
media routed through a relay.
"""
from __future__ import annotations

import heapq
import itertools
import random
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Impairment:
    """One direction's network conditions (times in seconds, probabilities 0..1)."""
    name: str = "clean"
    loss: float = 0.0
    burst: float = 1.0              # mean loss-burst length in packets; 1 = independent losses
    delay: float = 0.0
    jitter: float = 0.0
    reorder: float = 0.0
    reorder_gap: float = 0.045
    outage_at: float | None = None  # seconds after the channel's first packet
    outage: float = 0.0
    seed: int = 14

    @property
    def burst_ratio(self) -> float:
        """The E-model's BurstR for this loss process (1 for random loss): 1 / (p + q) with p the
        chance to go from 'found' to 'lost' and q the chance to go back."""
        if self.loss <= 0 or self.burst <= 1:
            return 1.0
        return (1 - self.loss) * self.burst

    @property
    def mean_delay(self) -> float:
        return self.delay


@dataclass
class ChannelStats:
    packets: int = 0
    lost: int = 0                   # dropped by the loss process
    outage: int = 0                 # dropped by the outage window
    delivered: int = 0
    held_back: int = 0              # packets given the explicit reorder gap
    out_of_order: int = 0           # delivered after a packet with a higher RTP sequence number
    delays: list[float] = field(default_factory=list)
    jumps: list[tuple[int, int]] = field(default_factory=list)   # first few sequence jumps (from, to)

    def as_dict(self) -> dict:
        d = sorted(self.delays)
        return {"packets": self.packets, "lost": self.lost, "outage_dropped": self.outage,
                "delivered": self.delivered, "held_back": self.held_back, "out_of_order": self.out_of_order,
                "seq_jumps": self.jumps,
                "loss_ratio": round((self.lost + self.outage) / self.packets, 4) if self.packets else 0.0,
                "delay_mean_ms": round(1000 * sum(d) / len(d), 1) if d else 0.0,
                "delay_p95_ms": round(1000 * d[int(0.95 * (len(d) - 1))], 1) if d else 0.0}


class Channel:
    """The fate of each packet in one direction: ``decide(now)`` returns its delivery time, or
    None when it is dropped. Pure and clock-free (``now`` is passed in)."""

    def __init__(self, imp: Impairment, direction: str):
        self.imp = imp
        self.rng = random.Random(f"{imp.seed}:{direction}")
        self.bad = False             # Gilbert-Elliott state
        self.first: float | None = None
        self.stats = ChannelStats()
        self.window: tuple[float, float] | None = None   # an outage started by hand (``ImpairRelay.outage``)
        self._max_seq: int | None = None

    def _lost(self, u: float) -> bool:
        imp = self.imp
        if imp.loss <= 0:
            return False
        if imp.burst <= 1:
            return u < imp.loss
        q = 1.0 / imp.burst                                  # bad -> good
        p = imp.loss * q / (1.0 - imp.loss)                  # good -> bad: stationary loss = imp.loss
        self.bad = (u >= q) if self.bad else (u < p)
        return self.bad

    def in_outage(self, now: float) -> bool:
        imp = self.imp
        if self.window is not None and self.window[0] <= now < self.window[1]:
            return True
        if imp.outage_at is None or imp.outage <= 0 or self.first is None:
            return False
        return imp.outage_at <= now - self.first < imp.outage_at + imp.outage

    def decide(self, now: float) -> float | None:
        imp, rng, st = self.imp, self.rng, self.stats
        if self.first is None:
            self.first = now
        st.packets += 1
        u_loss, u_jitter, u_reorder = rng.random(), rng.random(), rng.random()   # always 3 draws
        if self.in_outage(now):
            st.outage += 1
            return None
        if self._lost(u_loss):
            st.lost += 1
            return None
        delay = max(0.0, imp.delay + imp.jitter * (2 * u_jitter - 1))
        if u_reorder < imp.reorder:
            delay += imp.reorder_gap
            st.held_back += 1
        st.delays.append(delay)
        return now + delay

    def delivered(self, seq: int | None) -> None:
        """Count a delivery (with its RTP sequence number, for the out-of-order count)."""
        st = self.stats
        st.delivered += 1
        if seq is None:
            return
        if self._max_seq is None:
            self._max_seq = seq
            return
        ahead = (seq - self._max_seq) & 0xFFFF
        if 0 < ahead < 1000:                 # in order (gaps allowed)
            self._max_seq = seq
        elif ahead > 0x10000 - 1000:         # behind one already delivered
            st.out_of_order += 1
        elif ahead:                          # a jump: a new sequence, follow it
            if len(st.jumps) < 5:
                st.jumps.append((self._max_seq, seq))
            self._max_seq = seq


def _rtp_seq(data: bytes) -> int | None:
    if len(data) >= 12 and data[0] >> 6 == 2:
        return struct.unpack("!H", data[2:4])[0]
    return None


class ImpairRelay:
    """A UDP relay on ``host:port`` between one caller endpoint (``host:peer_port``) and the cell:
    what the caller sends goes through ``up``, what the cell sends through ``down``."""

    def __init__(self, port: int, peer_port: int, up: Impairment, down: Impairment | None = None,
                 host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]       # (port 0: one the kernel picked)
        self.peer = (host, peer_port)
        self.cell: tuple[str, int] | None = None
        self.strays = 0
        self.up = Channel(up, "up")
        self.down = Channel(down if down is not None else up, "down")
        self._queue: list[tuple[float, int, tuple, bytes, Channel]] = []
        self._order = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"impair-{port}", daemon=True)

    def start(self) -> "ImpairRelay":
        self._thread.start()
        return self

    def _run(self) -> None:
        q = self._queue
        while not self._stop.is_set():
            now = time.monotonic()
            while q and q[0][0] <= now:
                _, _, dest, data, ch = heapq.heappop(q)
                try:
                    self.sock.sendto(data, dest)
                except OSError:
                    pass
                ch.delivered(_rtp_seq(data))
            timeout = min(0.05, max(0.0, q[0][0] - now)) if q else 0.05
            if not select.select([self.sock], [], [], timeout)[0]:
                continue
            while True:
                try:
                    data, addr = self.sock.recvfrom(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                except OSError:
                    return
                if addr == self.peer:
                    if self.cell is None:
                        continue                      # nowhere to send it yet
                    ch, dest = self.up, self.cell
                elif self.cell is None or addr == self.cell:
                    self.cell = addr                  # latch onto the first sender that is not the caller
                    ch, dest = self.down, self.peer
                else:
                    self.strays += 1                  # e.g. an earlier call still sending here
                    continue
                due = ch.decide(time.monotonic())
                if due is not None:
                    heapq.heappush(q, (due, next(self._order), dest, data, ch))

    def outage(self, seconds: float, now: float | None = None) -> tuple[float, float]:
        """Drop everything, both ways, for ``seconds`` from now; returns the window (monotonic)."""
        start = time.monotonic() if now is None else now
        self.up.window = self.down.window = (start, start + seconds)
        return self.up.window

    def stats(self) -> dict:
        return {"up": self.up.stats.as_dict(), "down": self.down.stats.as_dict(), "strays": self.strays}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def impaired_caller(cell, tmp, up: Impairment, down: Impairment | None = None, seconds: float = 30.0,
                    scenario: str = "wait_bye.xml", sipp_args: tuple = (), slot: int = 0):
    """``voice.Caller`` whose media goes through an ``ImpairRelay``: the SDP offers the relay's port
    (the cell's ``rtp_peer`` port + ``slot``), the Python RTP endpoint sits 4 ports higher. Alternate
    ``slot`` between 0 and 1 for calls in a row: a call the cell has not ended yet (RTP timeout)
    keeps sending to the port it was given."""
    import voice
    from support import RtpPeer, sipp
    if slot not in (0, 1):
        raise ValueError("slot is 0 or 1 (the free ports of a cell's block)")

    class ImpairedCaller(voice.Caller):
        def __init__(self):
            port = cell.ports["rtp_peer"] + slot
            self.relay = ImpairRelay(port, port + 4, up, down).start()
            self.peer = RtpPeer(port + 4)
            self.proc = sipp(scenario, cell.sip, tmp, "-d", str(int(seconds * 1000)), *sipp_args,
                             local_port=cell.ports["sipp"] + slot, rtpport=port, background=True,
                             timeout=seconds + 30)
            try:
                self.peer.wait_remote()
            except AssertionError:
                self.close()
                raise

        def close(self) -> int | None:
            try:
                return super().close()
            finally:
                self.relay.close()

    return ImpairedCaller()
