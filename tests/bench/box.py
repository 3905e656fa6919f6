"""Box figures: many cells behind Kamailio on this machine, media-only (echo).

Concurrency: SIPp places C calls through Kamailio (`bench_pcap.xml`: PCMA, ~19 s
of real speech RTP from SIPp's own g711a.pcap per call), all up at once; every
call's frame timing and MOS come from the cells' own call records; CPU is every
process of the box (supervisor, cells, Kamailio) over the steady part.
CPS: SIPp's built-in `uac` (no media, 0.1 s calls) at a fixed rate for 10 s.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support import BoxProcess, sipp  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def _tree(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(pid))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _cpu(pids) -> float:
    total = 0
    for p in pids:
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except (OSError, IndexError):
            pass
    return total / TICKS


def _rss_mb(pid: int) -> float:
    try:
        m = re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{pid}/status").read())
        return int(m.group(1)) / 1024 if m else 0.0
    except OSError:
        return 0.0


def _stats(out: str) -> tuple[int, int]:
    ok = int(re.search(r"Successful call\s+\|\s+\d+\s+\|\s+(\d+)", out).group(1))
    failed = int(re.search(r"Failed call\s+\|\s+\d+\s+\|\s+(\d+)", out).group(1))
    return ok, failed


def concurrent(cells: int, calls: int) -> dict:
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        (tmp / "pcap").symlink_to("/usr/share/sip-tester")
        box = BoxProcess(tmp, cells, '[models]\nload = "never"\n[sip]\nrtp_timeout = 0\n')
        box.start(wait=False)
        box.wait_healthy(timeout=120 + 3 * cells)
        try:
            rate = max(10, calls // 4)
            proc = sipp("bench_pcap.xml", box.sip, tmp, "-l", str(calls), "-r", str(rate),
                        "-mp", str(box.ports["sip"] + 400), local_port=box.ports["sipp"], calls=calls,
                        background=True, timeout=120)
            time.sleep(calls / rate + 3)                    # all calls up
            pids = _tree(box.proc.pid)
            c0, w0 = _cpu(pids), time.monotonic()
            time.sleep(8)
            c1, w1 = _cpu(pids), time.monotonic()
            cell_rss = [_rss_mb(p) for p in pids if b"bridge.cli" in open(f"/proc/{p}/cmdline", "rb").read()
                        and p != box.proc.pid]
            out, _ = proc.communicate(timeout=180)
            ok, failed = _stats(out.decode(errors="replace"))
            ended = []
            deadline = time.time() + 20
            while len(ended) < ok and time.time() < deadline:
                ended = [e for i in range(cells) for e in box.cell_events(i, "call_ended")]
                time.sleep(0.5)
        finally:
            box.stop()
    good = [e for e in ended if e["frame_rate"] >= 49.5 and (e["frame_p99_ms"] or 99) <= 30 and (e["mos"] or 0) >= 4.3]
    cpu = 100 * (c1 - c0) / (w1 - w0)
    return {"cells": cells, "calls": calls, "answered": ok, "failed": failed, "records": len(ended),
            "on_time_and_mos_ok": len(good),
            "frame_rate_min": min((e["frame_rate"] for e in ended), default=None),
            "frame_p99_ms_max": max((e["frame_p99_ms"] or 0 for e in ended), default=None),
            "frame_gaps": sum(e["frame_gaps"] for e in ended),
            "mos_min": min((e["mos"] or 0 for e in ended), default=None),
            "box_cpu_pct": round(cpu, 1), "cpu_pct_per_call": round(cpu / max(1, ok), 2),
            "cell_rss_mb": round(sum(cell_rss) / max(1, len(cell_rss)), 1)}


def cps(cells: int, rate: int, seconds: int = 10) -> dict:
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        box = BoxProcess(tmp, cells, '[models]\nload = "never"\n')
        box.start(wait=False)
        box.wait_healthy(timeout=120 + 3 * cells)
        try:
            t0 = time.monotonic()
            res = sipp("builtin:uac", box.sip, tmp, "-d", "100", "-r", str(rate), "-l", str(3 * cells),
                       local_port=box.ports["sipp"], calls=rate * seconds, timeout=seconds * 6 + 30)
            elapsed = time.monotonic() - t0
            ok, failed = _stats(res.stdout.decode(errors="replace"))
        finally:
            box.stop()
    return {"cells": cells, "offered_cps": rate, "calls": rate * seconds, "successful": ok, "failed": failed,
            "achieved_cps": round(ok / elapsed, 1)}


def main(out_path: str, sizes=((10, 30), (20, 60), (34, 100)), rates=(20, 50, 80), cps_cells=10) -> dict:
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "concurrent": [], "cps": []}
    print("box: cells behind Kamailio, echo app, PCMA calls with real speech RTP")
    print(f"{'cells':>5} {'calls':>5} {'ok':>4} {'fail':>4} {'on time+MOS':>11} {'fps min':>7} {'p99 ms':>6} "
          f"{'gaps':>4} {'MOS min':>7} {'box CPU%':>8} {'CPU%/call':>9} {'RSS/cell MB':>11}")
    for cells, calls in sizes:
        r = concurrent(cells, calls)
        res["concurrent"].append(r)
        print(f"{r['cells']:>5} {r['calls']:>5} {r['answered']:>4} {r['failed']:>4} {r['on_time_and_mos_ok']:>11} "
              f"{r['frame_rate_min']:>7} {r['frame_p99_ms_max']:>6} {r['frame_gaps']:>4} {r['mos_min']:>7} "
              f"{r['box_cpu_pct']:>8} {r['cpu_pct_per_call']:>9} {r['cell_rss_mb']:>11}")
    print(f"\n{'cells':>5} {'offered cps':>11} {'calls':>6} {'ok':>5} {'failed':>6} {'achieved cps':>12}")
    for rate in rates:
        r = cps(cps_cells, rate)
        res["cps"].append(r)
        print(f"{r['cells']:>5} {r['offered_cps']:>11} {r['calls']:>6} {r['successful']:>5} {r['failed']:>6} "
              f"{r['achieved_cps']:>12}")
    Path(out_path).write_text(json.dumps(res, indent=2) + "\n")
    print(f"saved {out_path}")
    return res


if __name__ == "__main__":
    main(str(Path(__file__).resolve().parent / "results" / "box.json"))
