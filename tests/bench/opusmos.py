"""MOS of an Opus call through the edge against a plain G.711 call, at 0 % and 1 % loss
(issue 12), saved as results/opusmos.json.

A box of one echo cell behind the generated Kamailio front, with two trunks (as in
tests/test_opus_edge.py): "carrier" (``codecs = ["opus", "PCMU"]``: its media crosses
rtpengine, which transcodes Opus to what the cell speaks and back) and "plain" (no
``codecs``: PCMU straight to the cell, today's path). The caller is a Python RTP endpoint
that sends real speech (Piper, two phrases, ~9 s) at real-time pace and decodes everything
the echo cell sends back; SIPp does the signalling (opus_call.xml, call_pcmu.xml).

Loss is applied in the caller's sender, caller -> box only: a seeded ``random.Random(seed)``
picks exactly 1 % of the packets after the 0.5 s lead-in, the same positions for both codecs
(same speech, same packet count). Each lossy condition runs once per seed and is averaged.

Scored on what the caller hears back (the echo: caller -> box -> cell -> box -> caller, so the
speech crosses the codec twice, and the Opus call is transcoded four times) against what it
sent, with ITU-T P.862 PESQ (the PyPI ``pesq`` package, ``pip install .[bench]``): MOS-LQO
narrowband (P.862.1) at 8 kHz for both codecs; for Opus also wideband (P.862.2) from a second
pair of calls whose caller encodes and decodes Opus at 16 kHz. The cell's leg is G.711 (8 kHz)
either way, so the wideband figure measures what a wideband Opus carrier loses to that leg,
not Opus itself. Also reported: the product's own MOS (the E-model figure in the cell's
call record, ``call_ended.mos``), its loss figure, and the E-model's MOS for the applied loss.

    TEST_PORT_BLOCK=490 python tests/bench/opusmos.py [--seeds 5] [--out tests/bench/results/opusmos.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from media import emodel, g711  # noqa: E402
from support import next_ports, sipp  # noqa: E402
from test_opus_edge import OpusPeer, _box, _logged  # noqa: E402

PHRASES = ("Please read me the last four digits of the card you would like to use today.",
           "The weather will be cold and windy over the weekend, with rain on Sunday night.")
LEAD = 25                     # packets of silence talk() sends first (0.5 s): never dropped


class _Ulaw:
    """G.711 mu-law with OpusPeer's encoder/decoder interface."""

    @staticmethod
    def encode(pcm: bytes) -> bytes:
        return g711.ulaw_encode(pcm)

    @staticmethod
    def decode(payload: bytes) -> bytes:
        return g711.ulaw_decode(payload)


def speech(rate: int) -> bytes:
    import voice
    gap = bytes(int(rate * 0.4) * 2)
    return gap.join(voice.say(p, rate) for p in PHRASES)


def drops(packets: int, loss: float, seed: int) -> set[int]:
    """Exactly ``loss`` of the packets after the lead-in, at seeded random positions."""
    n = round(loss * (packets - LEAD))
    return set(random.Random(seed).sample(range(LEAD, packets), n)) if n else set()


def aligned(ref: np.ndarray, heard: np.ndarray, rate: int) -> np.ndarray:
    """``heard`` cut to ``ref``'s length from the delay where the two correlate best (0..3 s)."""
    span = 3 * rate
    xc = np.correlate(heard[:len(ref) + span], ref, "valid")[:span + 1]
    lag = int(np.argmax(xc))
    out = heard[lag:lag + len(ref)]
    return np.pad(out, (0, len(ref) - len(out)))


def pesq_mos(ref: np.ndarray, deg: np.ndarray, rate: int, mode: str) -> float | None:
    try:
        from pesq import pesq
    except ImportError:
        return None
    return round(float(pesq(rate, ref.astype(np.float32) / 32768, deg.astype(np.float32) / 32768, mode)), 3)


def segsnr(ref: np.ndarray, deg: np.ndarray, rate: int) -> float:
    """Segmental SNR in dB over 20 ms frames with speech in them, each clamped to [-10, 35]."""
    w = rate // 50
    vals = []
    for i in range(0, len(ref) - w + 1, w):
        a, b = ref[i:i + w], deg[i:i + w]
        if np.sqrt((a ** 2).mean()) < 300:
            continue
        scale = float(np.dot(a, b) / (np.dot(b, b) + 1e-9)) if np.dot(b, b) else 0.0
        noise = ((a - scale * b) ** 2).sum()
        vals.append(min(35.0, max(-10.0, 10 * np.log10((a ** 2).sum() / (noise + 1e-9)))))
    return round(float(np.mean(vals)), 2) if vals else 0.0


def one_call(b, far: dict, work: Path, codec: str, rate: int, loss: float, seed: int) -> dict:
    """One echo call: ``codec`` "opus" through the carrier trunk or "pcmu" through the plain one."""
    pcm = speech(rate)
    ref = np.frombuffer(pcm, "<i2").astype(float)
    packets = LEAD + -(-len(pcm) // (rate // 50 * 2))
    lost = drops(packets, loss, seed)
    work.mkdir()
    port = far["rtp_peer"]
    peer = OpusPeer(port, rate=rate, host="127.0.0.1" if codec == "opus" else "127.0.0.2")  # SDP's c= address
    before = len(b.cell_events(0, "call_ended"))
    try:
        if codec == "opus":
            call = sipp("opus_call.xml", f"127.0.0.1:{b.ports['sip']}", work, "-d", "14000", "-s", "100",
                        local_port=far["sipp"], rtpport=port, background=True, timeout=40)
            ip, rport, _ = _logged(work, "ANSWER")
            target = (ip, rport)
        else:
            peer.pt, peer.step, peer.enc, peer.dec = 0, 160, _Ulaw, _Ulaw
            call = sipp("call_pcmu.xml", f"127.0.0.1:{b.ports['sip']}", work, "-d", "14000", "-s", "100",
                        local_port=far["sipp"], rtpport=port, background=True, timeout=40, local_ip="127.0.0.2")
            deadline = time.monotonic() + 10
            while not peer.sources and time.monotonic() < deadline:
                peer.listen(0.02)
            assert peer.sources, "no RTP from the cell"
            target = next(iter(peer.sources))
        peer.drop = lost.__contains__
        peer.talk(target, pcm, tail=1.5)
        out, _ = call.communicate(timeout=40)
        assert call.returncode == 0, out.decode()[-1500:]
        heard = peer.heard()
    finally:
        peer.close()
    ended = b.wait_cell_events(0, "call_ended", before + 1, timeout=15)[before:]
    rec = ended[0] if ended else {}
    deg = aligned(ref, heard, rate)
    mode = "wb" if rate == 16000 else "nb"
    return {"codec": codec, "rate": rate, "loss_pct": 100 * loss, "seed": seed, "packets": packets,
            "dropped": len(lost), "pesq_mos_lqo": pesq_mos(ref, deg, rate, mode), "pesq_mode": mode,
            "segsnr_db": segsnr(ref, deg, rate), "cell_codec": rec.get("codec"), "cell_mos": rec.get("mos"),
            "cell_loss": rec.get("loss"), "cell_rx_packets": rec.get("rx_packets")}


def _mean(rows: list[dict], key: str):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return round(float(np.mean(vals)), 3) if vals else None


CONDITIONS = (("opus", 8000), ("pcmu", 8000), ("opus", 16000))


def summarize(rows: list[dict]) -> list[dict]:
    """Per codec, caller rate and loss: the calls' mean (and PESQ's spread over the seeds)."""
    summary = []
    for codec, rate in CONDITIONS:
        for loss in (0.0, 1.0):
            sel = [r for r in rows if r["codec"] == codec and r["rate"] == rate and r["loss_pct"] == loss]
            if not sel:
                continue
            scores = [r["pesq_mos_lqo"] for r in sel if r["pesq_mos_lqo"] is not None]
            summary.append({"codec": codec, "caller_rate": rate, "pesq_mode": sel[0]["pesq_mode"], "loss_pct": loss,
                            "calls": len(sel), "pesq_mos_lqo": _mean(sel, "pesq_mos_lqo"),
                            "pesq_min": min(scores, default=None), "pesq_max": max(scores, default=None),
                            "segsnr_db": _mean(sel, "segsnr_db"), "cell_mos": _mean(sel, "cell_mos"),
                            "cell_loss": _mean(sel, "cell_loss"),
                            "emodel_mos_for_applied_loss": round(emodel.mos("PCMU", loss), 2)})
    return summary


def main(out_path: str, seeds: int = 5) -> dict:
    conditions = CONDITIONS
    rows = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        far = next_ports()
        b = _box(tmp, 1, far)
        try:
            b.start()
            n = 0
            for codec, rate in conditions:
                for loss in (0.0, 0.01):
                    for seed in ([1] if loss == 0 else range(1, seeds + 1)):
                        n += 1
                        r = one_call(b, far, tmp / f"call{n}", codec, rate, loss, seed)
                        rows.append(r)
                        print(f"{codec:>5} {rate:>5} Hz loss {r['loss_pct']:>3.0f}% seed {seed}: PESQ {r['pesq_mode']} "
                              f"{r['pesq_mos_lqo']}  segSNR {r['segsnr_db']} dB  cell MOS {r['cell_mos']} "
                              f"(cell codec {r['cell_codec']}, cell loss {r['cell_loss']}, dropped {r['dropped']})",
                              flush=True)
        finally:
            b.stop(40) if b.alive() else None
    summary = summarize(rows)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "scorer": "ITU-T P.862 (PyPI pesq)" if rows and rows[0]["pesq_mos_lqo"] is not None
              else "pesq not installed: segmental SNR and the cell's E-model MOS only",
              "path": "echo: caller -> box -> echo cell -> box -> caller (Opus: transcoded by rtpengine both ways)",
              "loss": "caller -> box only, exactly 1 % of packets after a 0.5 s lead-in, seeded positions, "
                      "same for both codecs",
              "summary": summary, "calls": rows}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'codec':>5} {'rate':>5} {'mode':>4} {'loss%':>5} {'PESQ':>6} {'segSNR':>6} {'cell MOS':>8} "
          f"{'cell loss':>9}")
    for s in summary:
        print(f"{s['codec']:>5} {s['caller_rate']:>5} {s['pesq_mode']:>4} {s['loss_pct']:>5} {s['pesq_mos_lqo']!s:>6} "
              f"{s['segsnr_db']!s:>6} {s['cell_mos']!s:>8} {s['cell_loss']!s:>9}  (PESQ {s['pesq_min']}..{s['pesq_max']})")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5, help="lossy calls per condition (seeds 1..N)")
    ap.add_argument("--out", default=str(HERE / "results" / "opusmos.json"))
    args = ap.parse_args()
    main(args.out, args.seeds)
