"""Read pjsua2 stream statistics into a plain ``Quality`` snapshot."""
from __future__ import annotations

import pjsua2 as pj

from media.quality import Quality


def read_quality(call: pj.Call, med_idx: int, prev: Quality | None = None) -> Quality:
    q = Quality()
    if prev is not None:
        q.codec, q.clock_rate, q.packet_ms = prev.codec, prev.clock_rate, prev.packet_ms
    if not q.codec:
        si = call.getStreamInfo(med_idx)
        q.codec = si.codecName.upper()
        q.clock_rate = si.codecClockRate
        try:
            p = si.audCodecParam
            q.packet_ms = int(p.info.frameLen * max(1, p.setting.frmPerPkt)) or 20
        except Exception:  # noqa: BLE001 - older builds lack these fields
            q.packet_ms = 20
    st = call.getStreamStat(med_idx)
    rx, tx = st.rtcp.rxStat, st.rtcp.txStat
    q.rx_packets, q.tx_packets = rx.pkt, tx.pkt
    q.rx_lost, q.rx_discarded = rx.loss, rx.discard
    q.rx_jitter_ms = rx.jitterUsec.mean / 1000.0 if rx.jitterUsec.n else 0.0
    q.tx_jitter_ms = tx.jitterUsec.mean / 1000.0 if tx.jitterUsec.n else 0.0
    jb = st.jbuf
    q.jb_delay_ms = float(jb.avgDelayMsec)
    q.jb_lost, q.jb_discarded, q.jb_empty = int(jb.lost), int(jb.discard), int(jb.empty)
    rtt = st.rtcp.rttUsec
    q.rtt_ms = rtt.mean / 1000.0 if rtt.n else None
    return q
