"""Per-call RTP quality: a plain snapshot and the MOS derived from it."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from media import emodel


@dataclass
class Quality:
    codec: str = ""
    clock_rate: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    rx_lost: int = 0
    rx_discarded: int = 0
    rx_jitter_ms: float = 0.0     # mean interarrival jitter of what we received
    tx_jitter_ms: float = 0.0     # as the peer reported it by RTCP (0 if none)
    jb_delay_ms: float = 0.0      # mean jitter-buffer delay
    jb_lost: int = 0              # frames the jitter buffer found missing when due (PLC played instead)
    jb_discarded: int = 0         # frames it threw away (too late, or beyond its size)
    jb_empty: int = 0             # times it had nothing to give (PLC or silence played)
    rtt_ms: float | None = None   # from RTCP, when the peer sends reports
    packet_ms: int = 20

    @property
    def loss_ratio(self) -> float:
        """Packets the network lost (RTCP's count), of those expected."""
        expected = self.rx_packets + self.rx_lost
        return self.rx_lost / expected if expected else 0.0

    @property
    def late_ratio(self) -> float:
        """Packets that arrived but were never played: too late for the jitter buffer (or beyond
        its size), so the caller heard concealment instead - under 30 ms of jitter ~15 % of
        frames with no network loss at all."""
        expected = self.rx_packets + self.rx_lost
        return min(1.0, max(self.jb_discarded, self.rx_discarded) / expected) if expected else 0.0

    @property
    def heard_loss_ratio(self) -> float:
        """What the listener lost: the network's loss plus the late packets (the E-model's Ppl)."""
        return min(1.0, self.loss_ratio + self.late_ratio)

    @property
    def delay_ms(self) -> float:
        """One-way mouth-to-ear estimate: half the RTT (or 20 ms of network
        when no RTCP gave one) + jitter buffer + one packet + codec look-ahead."""
        network = self.rtt_ms / 2 if self.rtt_ms is not None else 20.0
        return network + self.jb_delay_ms + self.packet_ms + 5.0

    @property
    def r_factor(self) -> float:
        return emodel.r_factor(self.codec or "PCMU", 100 * self.heard_loss_ratio, self.delay_ms)

    @property
    def mos(self) -> float:
        return emodel.mos_from_r(self.r_factor)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(loss_ratio=round(self.loss_ratio, 5), late_ratio=round(self.late_ratio, 5), mos=round(self.mos, 3),
                 r_factor=round(self.r_factor, 2), delay_ms=round(self.delay_ms, 1))
        return d
