"""RTP fuzzing during a real echo call (issue 11).

SIPp places the call (call_pcmu.xml) with its media pointed at our own RtpPeer; mid-call
we send, seedably: random payload types, SSRC changes, sequence and timestamp jumps,
huge (1400 B .. 64 KB) and tiny (< 12 B) packets, broken RTP headers (version, padding,
extension, CSRC count), RFC 4733 junk, RTCP junk to the RTCP port, and packets from a
third party address. Then normal audio again. The call must go on (echo comes back to
the peer, not to the third party) or end cleanly (a call_ended event); the cell must
never crash and must take a new call afterwards.
"""
import os
import random
import socket
import struct
import time

import pytest

from fuzz.runner import vm_rss_kb
from fuzz.targets import TRUNK, report
from media import g711
from support import RtpPeer, next_ports, sipp

SEED = int(os.environ.get("FUZZ_SEED", "11"))


def _tone(n: int) -> list[bytes]:
    import math
    import numpy as np
    t = np.arange(160 * n) / 8000
    pcm = (8000 * np.sin(2 * math.pi * 700 * t)).astype("<i2")
    return [g711.ulaw_encode(pcm[i:i + 160].tobytes()) for i in range(0, pcm.size, 160)]


def rtp(pt: int, seq: int, ts: int, ssrc: int, payload: bytes, *, version: int = 2, padding: bool = False,
        ext: bool = False, cc: int = 0, marker: bool = False) -> bytes:
    b0 = (version << 6) | (0x20 if padding else 0) | (0x10 if ext else 0) | (cc & 0x0F)
    return struct.pack("!BBHII", b0, (0x80 if marker else 0) | (pt & 0x7F), seq & 0xFFFF, ts & 0xFFFFFFFF,
                       ssrc & 0xFFFFFFFF) + payload


def hostile_packets(rng: random.Random, n: int):
    """``n`` hostile packets: (kind, bytes, where) with where in {"rtp", "rtcp", "third"}."""
    ulaw = bytes(rng.getrandbits(8) for _ in range(160))
    for i in range(n):
        k = rng.randrange(13)
        seq, ts, ssrc = rng.getrandbits(16), rng.getrandbits(32), rng.getrandbits(32)
        if k == 0:
            yield "random-pt", rtp(rng.randrange(128), seq, ts, ssrc, ulaw), "rtp"
        elif k == 1:
            yield "ssrc-change", rtp(0, i, i * 160, rng.getrandbits(32), ulaw), "rtp"
        elif k == 2:
            yield "seq-ts-jump", rtp(0, seq, ts, 0x1234, ulaw), "rtp"
        elif k == 3:
            size = rng.choice([1400, 1500, 4000, 9000, 65000])
            yield f"huge-{size}", rtp(0, seq, ts, ssrc, bytes(rng.getrandbits(8) for _ in range(size - 12))), "rtp"
        elif k == 4:
            yield "tiny", bytes(rng.getrandbits(8) for _ in range(rng.randrange(12))), "rtp"
        elif k == 5:
            yield "bad-version", rtp(0, seq, ts, ssrc, ulaw, version=rng.choice([0, 1, 3])), "rtp"
        elif k == 6:                               # padding bit with a padding count past the end
            yield "bad-padding", rtp(0, seq, ts, ssrc, ulaw[:rng.randrange(1, 160)] + bytes([255]),
                                     padding=True), "rtp"
        elif k == 7:                               # extension header claiming 65535 words
            yield "bad-extension", rtp(0, seq, ts, ssrc, struct.pack("!HH", 0xBEDE, 0xFFFF) + ulaw[:20],
                                       ext=True), "rtp"
        elif k == 8:
            yield "csrc-overflow", rtp(0, seq, ts, ssrc, b"\x00" * rng.randrange(0, 40), cc=15), "rtp"
        elif k == 9:                               # RFC 4733 with junk event, flags, duration
            ev = struct.pack("!BBH", rng.choice([0, 11, 16, 99, 255]), rng.getrandbits(8), rng.getrandbits(16))
            yield "dtmf-junk", rtp(101, seq, ts, ssrc, ev + (b"" if rng.random() < 0.5 else b"\x00" * 50),
                                   marker=True), "rtp"
        elif k == 10:                              # RTCP junk: random, or headers with lying lengths
            junk = rng.choice([
                bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300))),
                struct.pack("!BBH", 0x80, 200, 0xFFFF) + b"\x00" * 24,                      # SR, length lies
                struct.pack("!BBH", 0x9F, 201, 1) + b"\x00" * 4,                            # RR claiming 31 blocks
                struct.pack("!BBH", 0x81, 203, 1) + b"\x00" * 4,                            # BYE
                struct.pack("!BBH", 0x81, 202, 10) + b"\x01\x02" * 3,                       # SDES short
                struct.pack("!BBH", 0x80, 204, 0) * 50])                                   # APP, zero lengths
            yield "rtcp-junk", junk, "rtcp"
        elif k == 11:
            yield "rtcp-on-rtp-port", struct.pack("!BBH", 0x80, 200, 6) + bytes(24), "rtp"
        else:                                      # a third party injects plausible audio
            yield "third-party", rtp(0, seq, ts, ssrc, ulaw), "third"


def _run_rtp_fuzz(cell_factory, tmp_path, packets: int, seconds_after: float = 1.5):
    cell = cell_factory(TRUNK, args=("--app", "echo"))        # sip.rtp_timeout stays 30 s
    peer = RtpPeer(cell.ports["rtp_peer"])
    third = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    third.bind(("127.0.0.9", 0))
    third.setblocking(False)
    rng = random.Random(SEED)
    counts: dict[str, int] = {}
    sent_bytes = 0
    rss_before = {"cell": vm_rss_kb(cell.proc.pid)}
    # the call outlasts the storm (~0.5 ms a packet here) and the audio after it
    duration_ms = int(8000 + packets * 1.0)
    call = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", str(duration_ms), local_port=cell.ports["sipp"],
                rtpport=cell.ports["rtp_peer"], background=True, timeout=duration_ms / 1000 + 30)
    try:
        remote = peer.wait_remote()
        rtcp = (remote[0], remote[1] + 1)
        tone = _tone(400)
        peer.stream(tone[:50])                                   # 1 s of normal audio
        before = len(peer.received)
        assert before > 20, "no echo before the fuzzing"
        start = time.monotonic()
        peer.sock.settimeout(0.0005)          # the storm: do not wait on our own reads
        for i, (kind, data, where) in enumerate(hostile_packets(rng, packets)):
            counts[kind] = counts.get(kind, 0) + 1
            sent_bytes += len(data)
            try:
                if where == "third":
                    third.sendto(data, remote)
                elif where == "rtcp":
                    peer.sock.sendto(data, rtcp)
                else:
                    peer.sock.sendto(data, remote)
            except OSError:
                pass
            if i % 5 == 4:                                       # keep the real stream going too
                peer.send(tone[(i // 5) % len(tone)])
                peer._recv_once()
        fuzz_seconds = time.monotonic() - start
        peer.sock.settimeout(0.02)
        mark = len(peer.received)
        peer.stream(tone[50:50 + int(seconds_after / 0.02)])     # normal audio after the storm
        peer.collect(0.3)
        echoed_after = len(peer.received) - mark
        third_got = 0
        while True:
            try:
                third.recvfrom(65535)
                third_got += 1
            except (BlockingIOError, OSError):
                break
        assert cell.alive(), "the cell died:\n" + cell.log_path.read_text()[-3000:]
        out, _ = call.communicate(timeout=duration_ms / 1000 + 30)
    finally:
        if call.poll() is None:
            call.kill()
        peer.close()
        third.close()
    ended = [e for e in cell.events("call_ended")]
    rec = {"test": "rtp-fuzz", "seed": SEED, "packets": sum(counts.values()), "bytes": sent_bytes, "kinds": counts,
           "fuzz_seconds": round(fuzz_seconds, 2), "echo_packets_after": echoed_after,
           "third_party_received": third_got, "sipp_rc": call.returncode,
           "call_ended": [(e.get("reason"), e.get("media_errors")) for e in ended],
           "rss_kb_before": rss_before, "rss_kb_after": {"cell": vm_rss_kb(cell.proc.pid)}}
    report(rec)
    assert cell.alive(), "the cell died:\n" + cell.log_path.read_text()[-3000:]
    assert fuzz_seconds * 1000 < duration_ms - 3000, f"the storm outlasted the call: {rec}"
    went_on = call.returncode == 0 and echoed_after > 0.5 * seconds_after / 0.02
    ended_cleanly = bool(ended) and all(e.get("reason") for e in ended)
    assert went_on or ended_cleanly, (rec, out.decode(errors="replace")[-1500:])
    assert third_got == 0, f"the cell sent {third_got} packets of the call's audio to a third party: {rec}"
    res = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "300", local_port=next_ports()["sipp"], timeout=20)
    assert res.returncode == 0, "no new call after the RTP fuzzing:\n" + res.stdout.decode(errors="replace")[-1500:]
    return rec


@pytest.mark.slow
@pytest.mark.sample
def test_rtp_fuzz_during_an_echo_call(cell_factory, tmp_path):
    """~1,500 hostile packets in ~1-2 s mid-call: the call goes on, the cell lives."""
    _run_rtp_fuzz(cell_factory, tmp_path, 1500)


@pytest.mark.slow
def test_rtp_fuzz_long(cell_factory, tmp_path):
    """``make fuzz``: 20,000 hostile packets mid-call."""
    _run_rtp_fuzz(cell_factory, tmp_path, int(os.environ.get("FUZZ_RTP_PACKETS", "20000")))
