"""Media stream figures: the cell's CPU per streamed call, per encoding.

One cell (default config: 16 kHz bridge; calls routed to the API app, no
models) takes N SIPp calls, each with a Python RTP endpoint sending speech-like
PCMU at 50 packets/s. Once every call is up, each gets a media stream to a
WebSocket sink running in its own process (``tests/ws_sink.py``), so the
sink's work is never charged to the cell. CPU is the cell process's
utime+stime over the steady part of the calls; the same run without streams
is the baseline, and "per streamed call" is the difference divided by N.

    python tests/bench/streams.py [--calls 3] [--seconds 15] [--directions in,both]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from run import _stream_call, cpu_seconds, rss_mb  # noqa: E402
from support import Api, CellProcess, create_key  # noqa: E402
from test_streamcodec import voice_like  # noqa: E402
from test_streams import API_CALLS, ulaw_packets  # noqa: E402

ENCODINGS = ("mulaw", "pcm16", "opus")


def _caller(cell, tmp: Path, idx: int, seconds: float, out: dict) -> None:
    """A call whose caller speaks (voice-like signal), so every encoding has real work to do."""
    _stream_call(cell, tmp, idx, seconds, out, ulaw_packets(voice_like(8000, seconds - 0.5, seed=idx)))


def run_one(calls: int, seconds: float, encoding: str | None, direction: str) -> dict:
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        cell = CellProcess(tmp, API_CALLS).start()
        sink = None
        try:
            api = Api(cell, create_key(cell.data))
            sink_port = cell.ports["sip"] + 6
            if encoding:
                sink = subprocess.Popen([sys.executable, str(HERE.parent / "ws_sink.py"), str(sink_port)],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                assert sink.stdout.readline().strip() == b"ready"
            rcs: dict = {}
            threads = [threading.Thread(target=_caller, args=(cell, tmp, i, seconds, rcs)) for i in range(calls)]
            for th in threads:
                th.start()
            cell.wait_event("call_answered", calls, timeout=20)
            streams = []
            if encoding:
                for c in api.get("/v1/calls?state=active")[1]["calls"]:
                    status, st, _ = api.post(f"/v1/calls/{c['id']}/streams", {
                        "url": f"ws://127.0.0.1:{sink_port}/bench", "direction": direction, "encoding": encoding})
                    assert status == 201, st
                    streams.append(st)
            time.sleep(2)                                          # steady state
            pid = cell.proc.pid
            c0, w0 = cpu_seconds(pid), time.monotonic()
            time.sleep(max(1.0, seconds - 6))
            c1, w1 = cpu_seconds(pid), time.monotonic()
            rss = rss_mb(pid)
            stats = [api.get(f"/v1/calls/{st['call_id']}/streams/{st['id']}")[1]["stats"] for st in streams]
            for th in threads:
                th.join()
            ended = cell.wait_event("call_ended", calls, timeout=30)
            sink_stats = {}
            if sink is not None:
                with urllib.request.urlopen(f"http://127.0.0.1:{sink_port}/stats", timeout=5) as r:
                    sink_stats = json.loads(r.read())
        finally:
            if sink is not None:
                sink.kill()
                sink.wait(5)
            cell.stop()
    cpu = 100 * (c1 - c0) / (w1 - w0)
    return {
        "encoding": encoding or "none", "direction": direction if encoding else None, "calls": calls,
        "cell_cpu_pct": round(cpu, 2), "cell_rss_mb": round(rss, 1),
        "frames_sent": sum(s["frames_sent"] for s in stats), "frames_dropped": sum(s["frames_dropped"] for s in stats),
        "sink_media": sum(v["media"] for v in sink_stats.values()),
        # what one stream puts on the wire: mean message size x messages per second
        "sink_kbit_per_stream": round(8 / 1000 * sum(v["bytes"] for v in sink_stats.values())
                                      / max(1, sum(v["media"] for v in sink_stats.values()))
                                      * 50 * (2 if direction == "both" else 1), 1) if sink_stats else None,
        "frame_p99_ms_max": max(e["frame_p99_ms"] for e in ended), "frame_gaps": sum(e["frame_gaps"] for e in ended),
        "failed_calls": sum(1 for r in rcs.values() if r["sipp_rc"] != 0),
    }


def main(out_path: str, calls: int = 3, seconds: float = 15.0, directions=("in", "both")) -> dict:
    res = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "calls": calls, "seconds": seconds, "runs": []}
    print(f"streams: {calls} API calls (16 kHz bridge), each streaming to a WebSocket sink process")
    print(f"{'encoding':>8} {'dir':>4} {'cell CPU%':>9} {'+CPU%/stream':>12} {'µs/frame':>8} {'kbit/s':>7} "
          f"{'sent':>6} {'dropped':>7} {'p99 ms':>6} {'gaps':>4} {'failed':>6}")
    base = run_one(calls, seconds, None, "in")
    res["runs"].append(base)
    print(f"{'none':>8} {'':>4} {base['cell_cpu_pct']:>9} {'':>12} {'':>8} {'':>7} {'':>6} {'':>7} "
          f"{base['frame_p99_ms_max']:>6} {base['frame_gaps']:>4} {base['failed_calls']:>6}")
    for direction in directions:
        for enc in ENCODINGS:
            r = run_one(calls, seconds, enc, direction)
            extra = (r["cell_cpu_pct"] - base["cell_cpu_pct"]) / calls
            frames_per_s = 50 * (2 if direction == "both" else 1)
            r["extra_cpu_pct_per_stream"] = round(extra, 2)
            r["cpu_us_per_frame"] = round(extra / 100 / frames_per_s * 1e6, 1)
            res["runs"].append(r)
            print(f"{enc:>8} {direction:>4} {r['cell_cpu_pct']:>9} {r['extra_cpu_pct_per_stream']:>12} "
                  f"{r['cpu_us_per_frame']:>8} {r['sink_kbit_per_stream']:>7} {r['frames_sent']:>6} "
                  f"{r['frames_dropped']:>7} {r['frame_p99_ms_max']:>6} {r['frame_gaps']:>4} {r['failed_calls']:>6}")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(res, indent=2) + "\n")
    print(f"saved {out_path}\n")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--directions", default="in,both")
    ap.add_argument("--out", default=str(HERE / "results" / "streams.json"))
    a = ap.parse_args()
    main(a.out, a.calls, a.seconds, tuple(a.directions.split(",")))
