"""`make bench`: capacity and timing figures, printed and saved under results/:
one cell (cell.json), the voice agent (agent.json), many cells behind Kamailio
(box.json), the agent's tool choice (tools.json), media streams per encoding
(streams.json), the built-in agent against a Pipecat bot on the same models
(pipecat.json), TLS handshakes at the front (tls.json), call quality and STT under
network impairment (impair.json), PESQ MOS of an Opus call through the edge against G.711 at
0 and 1 % loss (opusmos.json), digit strings read slowly, cut off or not at the caller (digits.json),
the box's concurrent calls with SRTP on against plain RTP (srtpbox.json), an inference process's
memory with Piper's arena kept or shrunk (ttsmem.json).
`--only cell|agent|box|tools|streams|pipecat|tls|impair|opusmos|digits|srtpbox|ttsmem` runs one part; `--only boxcurve`
(the capacity curve, 100-250 calls, each twice: boxcurve.json) and `--only longcall`
(a long agent call, ~10 minutes, longcall.json) run only on request.

Everything runs on 127.0.0.1 with real peers: a `trunkline serve` cell, SIPp
for signalling and a Python RTP endpoint per call that streams G.711 at 50
packets/s and records what comes back. Bounded in calls and time.

    python tests/bench/run.py [--seconds 20] [--calls 3] [--out tests/bench/results/cell.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from media import g711  # noqa: E402
from support import CellProcess, RtpPeer, sipp  # noqa: E402

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024 if m else 0.0


def _stream_call(cell, tmp: Path, idx: int, seconds: float, out: dict, packets: list[bytes] | None = None) -> None:
    """One SIPp call with our RTP endpoint sending ``packets`` (default: a tone per call)."""
    port = cell.ports["rtp_peer"] + 2 * idx + 100
    peer = RtpPeer(port)
    work = tmp / f"call{idx}"
    work.mkdir()
    try:
        proc = sipp("call_pcmu.xml", cell.sip, work, "-d", str(int(seconds * 1000)),
                    local_port=cell.ports["sipp"] + 200 + idx, rtpport=port, background=True,
                    timeout=seconds + 30)
        peer.wait_remote()
        if packets is None:
            t = np.arange(160 * int(seconds * 50)) / 8000
            sig = (6000 * np.sin(2 * math.pi * (300 + 100 * idx) * t)).astype("<i2")
            packets = [g711.ulaw_encode(sig[i:i + 160].tobytes()) for i in range(0, sig.size, 160)]
        peer.stream(packets)
        proc.communicate(timeout=60)
        arrivals = np.array([t for t, pt, _, _ in peer.received if pt == 0])
        d = np.diff(arrivals)
        out[idx] = {"sipp_rc": proc.returncode, "rx_packets": int(arrivals.size),
                    "rx_interval_p50_ms": float(np.percentile(d, 50) * 1000) if d.size else None,
                    "rx_interval_p99_ms": float(np.percentile(d, 99) * 1000) if d.size else None}
    finally:
        peer.close()


def echo_calls(n: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        cell = CellProcess(tmp, "").start()
        try:
            pid = cell.proc.pid
            peers: dict = {}
            threads = [threading.Thread(target=_stream_call, args=(cell, tmp, i, seconds, peers)) for i in range(n)]
            for th in threads:
                th.start()
            cell.wait_event("call_answered", n, timeout=20)
            time.sleep(2)                                 # steady state
            c0, w0 = cpu_seconds(pid), time.monotonic()
            time.sleep(max(1.0, seconds - 5))
            c1, w1 = cpu_seconds(pid), time.monotonic()
            rss = rss_mb(pid)
            for th in threads:
                th.join()
            ended = cell.wait_event("call_ended", n, timeout=30)
        finally:
            cell.stop()
    cpu_pct = 100 * (c1 - c0) / (w1 - w0)
    return {
        "calls": n, "seconds": seconds,
        "cell_cpu_pct": round(cpu_pct, 1), "cpu_pct_per_call": round(cpu_pct / n, 2),
        "cell_rss_mb": round(rss, 1),
        "frame_rate_min": min(e["frame_rate"] for e in ended),
        "frame_p99_ms_max": max(e["frame_p99_ms"] for e in ended),
        "frame_gaps": sum(e["frame_gaps"] for e in ended),
        "mos_min": min(e["mos"] for e in ended),
        "rtp_out_interval_p99_ms_max": round(max(p["rx_interval_p99_ms"] for p in peers.values()), 2),
        "failed": sum(1 for p in peers.values() if p["sipp_rc"] != 0),
    }


def cps(rate: int, seconds: float) -> dict:
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        cell = CellProcess(tmp, "").start()
        try:
            total = int(rate * seconds)
            start = time.monotonic()
            res = sipp("call_pcmu.xml", cell.sip, tmp, "-d", "100", "-r", str(rate), "-l", "3",
                       local_port=cell.ports["sipp"], calls=total, timeout=seconds * 4 + 30)
            elapsed = time.monotonic() - start
            out = res.stdout.decode(errors="replace")
            ok = int(re.search(r"Successful call\s+\|\s+\d+\s+\|\s+(\d+)", out).group(1))
            failed = int(re.search(r"Failed call\s+\|\s+\d+\s+\|\s+(\d+)", out).group(1))
            refused = cell.metrics().get('trunkline_sip_rejected_total{reason="full"}', 0.0)
        finally:
            cell.stop()
    return {"offered_cps": rate, "calls": total, "successful": ok, "failed": failed,
            "refused_503": int(refused), "achieved_cps": round(ok / elapsed, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "cell.json"))
    ap.add_argument("--only", choices=["cell", "agent", "box", "idle", "tools", "streams", "pipecat", "tls",
                                       "longcall", "impair", "opusmos", "digits", "srtpbox", "boxcurve", "ttsmem"],
                    help="run one part only (idle: the idle-cell and bridge-rate figures, also part of box)")
    args = ap.parse_args()
    if args.only in (None, "cell"):
        run_cell(args)
    if args.only in (None, "agent"):
        import agent
        agent.main(str(HERE / "results" / "agent.json"))
    if args.only in (None, "tools"):
        import tools
        tools.main(str(HERE / "results" / "tools.json"))
    if args.only in (None, "box"):
        import box
        box.main(str(HERE / "results" / "box.json"), sizes=((10, 30), (34, 100), (50, 150), (67, 200), (84, 250)),
                 rates=(50, 100, 150))
    if args.only == "boxcurve":                  # the capacity curve, 100-250 calls, twice (~6 minutes)
        import box
        box.curve(str(HERE / "results" / "boxcurve.json"))
    if args.only == "idle":
        import box
        box.idle_main(str(HERE / "results" / "idle.json"))
    if args.only in (None, "streams"):
        import streams
        streams.main(str(HERE / "results" / "streams.json"), calls=min(3, args.calls), seconds=15.0)
    if args.only in (None, "pipecat"):
        import pipecat_vs_agent
        pipecat_vs_agent.main(str(HERE / "results" / "pipecat.json"), calls=sorted({1, min(3, args.calls)}))
    if args.only in (None, "tls"):
        import tls
        tls.main(str(HERE / "results" / "tls.json"))
    if args.only in (None, "impair"):            # loss, jitter, reorder, outage (userspace impairer)
        import impair
        impair.main(str(HERE / "results" / "impair.json"))
    if args.only in (None, "opusmos"):           # Opus at the edge vs G.711, 0 and 1 % loss (PESQ)
        import opusmos
        opusmos.main(str(HERE / "results" / "opusmos.json"))
    if args.only in (None, "digits"):            # slowly read digit strings: cut-offs at the caller
        import digits
        digits.main(str(HERE / "results" / "digits.json"))
    if args.only in (None, "srtpbox"):           # the box's concurrent calls with SRTP on vs plain RTP
        import srtpbox
        srtpbox.main(str(HERE / "results" / "srtpbox.json"))
    if args.only in (None, "ttsmem"):            # Piper's arena kept / shrunk: RSS and speed (~4 minutes)
        import ttsmem
        ttsmem.main(str(HERE / "results" / "ttsmem.json"))
    if args.only == "longcall":                  # ~10 minutes: on request only (issue 14's long call)
        import longcall
        longcall.main(str(HERE / "results" / "longcall.json"))
    return 0


def run_cell(args) -> None:
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "kernel": platform.release()},
               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "echo": [], "cps": []}
    print(f"{'calls':>5} {'cpu%':>6} {'cpu%/call':>9} {'rss MB':>7} {'fps min':>7} {'p99 ms':>7} {'gaps':>4} {'MOS':>5} {'rtp p99':>7}")
    for n in sorted({1, args.calls}):
        r = echo_calls(n, args.seconds)
        results["echo"].append(r)
        print(f"{r['calls']:>5} {r['cell_cpu_pct']:>6} {r['cpu_pct_per_call']:>9} {r['cell_rss_mb']:>7} "
              f"{r['frame_rate_min']:>7} {r['frame_p99_ms_max']:>7} {r['frame_gaps']:>4} {r['mos_min']:>5} "
              f"{r['rtp_out_interval_p99_ms_max']:>7}")
    print(f"\n{'offered cps':>11} {'calls':>6} {'ok':>5} {'failed':>6} {'503':>5} {'achieved cps':>12}")
    for rate in (10, 20, 40):
        r = cps(rate, 5)
        results["cps"].append(r)
        print(f"{r['offered_cps']:>11} {r['calls']:>6} {r['successful']:>5} {r['failed']:>6} "
              f"{r['refused_503']:>5} {r['achieved_cps']:>12}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nsaved {args.out}\n")


if __name__ == "__main__":
    sys.exit(main())
