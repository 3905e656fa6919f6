"""Box figures: many cells behind Kamailio on this machine, media-only (echo).

Concurrency: SIPp places C calls through Kamailio (`bench_pcap.xml`: PCMA, ~19 s
of real speech RTP from SIPp's own g711a.pcap per call), all up at once; every
call's frame timing and MOS come from the cells' own call records; CPU is every
process of the box (supervisor, cells, Kamailio) over the steady part.
CPS: SIPp's built-in `uac` (no media, 0.1 s calls) at a fixed rate for 10 s.
Idle: what a cell costs with no call (CPU % of a core from utime+stime of all its
threads, PSS from /proc/<pid>/smaps_rollup), alone and in a box; and the CPU of
echo calls at an 8 kHz vs a 16 kHz bridge (`media.clock_rate`).

    python tests/bench/box.py [idle]
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

from support import Api, BoxProcess, CellProcess, create_key, next_ports, sipp  # noqa: E402

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


def _pss_mb(pid: int) -> float:
    try:
        m = re.search(r"^Pss:\s+(\d+)", open(f"/proc/{pid}/smaps_rollup").read(), re.M)
        return int(m.group(1)) / 1024 if m else 0.0
    except OSError:
        return 0.0


def _cell_pids(box) -> list[int]:
    """The cells' pids, as the box API lists them (forked cells share the supervisor's command line)."""
    api = Api(box, create_key(box.data, "read", "bench"))
    return [c["pid"] for c in api.get("/v1/cells")[1]["cells"]]


def idle(cells: int, seconds: float = 60.0, settle: float = 5.0) -> dict:
    """CPU % of a core and PSS of each idle echo cell: one `trunkline serve`, or a box of ``cells``."""
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        conf = '[models]\nload = "never"\n'
        box = (CellProcess(tmp, conf, ("--app", "echo")) if cells == 1 else BoxProcess(tmp, cells, conf))
        box.start(wait=False)
        box.wait_healthy(timeout=120 + 3 * cells)
        try:
            time.sleep(settle)
            pids = [box.proc.pid] if cells == 1 else _cell_pids(box)
            c0, w0 = {p: _cpu([p]) for p in pids}, time.monotonic()
            time.sleep(seconds)
            c1, w1 = {p: _cpu([p]) for p in pids}, time.monotonic()
            pss = [_pss_mb(p) for p in pids]
        finally:
            box.stop()
    cpu = [100 * (c1[p] - c0[p]) / (w1 - w0) for p in pids]
    return {"cells": cells, "seconds": seconds, "cell_cpu_pct_mean": round(sum(cpu) / len(cpu), 2),
            "cell_cpu_pct_max": round(max(cpu), 2), "cell_pss_mb_mean": round(sum(pss) / len(pss), 1),
            "cell_pss_mb_max": round(max(pss), 1)}


def echo_rate(rate: int, calls: int = 3, seconds: float = 10.0) -> dict:
    """CPU per echo call (SIPp `bench_pcap.xml`: PCMA, real speech) on one cell whose bridge runs at ``rate``."""
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        (tmp / "pcap").symlink_to("/usr/share/sip-tester")
        cell = CellProcess(tmp, f'[models]\nload = "never"\n[media]\nclock_rate = {rate}\n', ("--app", "echo"))
        cell.start()
        try:
            proc = sipp("bench_pcap.xml", cell.sip, tmp, "-l", str(calls), "-r", str(calls),
                        "-mp", str(next_ports()["sip"]), local_port=cell.ports["sipp"], calls=calls,
                        background=True, timeout=60)
            cell.wait_event("call_answered", calls, timeout=20)
            time.sleep(2)
            c0, w0 = _cpu([cell.proc.pid]), time.monotonic()
            time.sleep(seconds)
            c1, w1 = _cpu([cell.proc.pid]), time.monotonic()
            out, _ = proc.communicate(timeout=90)
            ok, failed = _stats(out.decode(errors="replace"))
            ended = cell.wait_event("call_ended", calls, timeout=30)
        finally:
            cell.stop()
    cpu = 100 * (c1 - c0) / (w1 - w0)
    return {"clock_rate": rate, "calls": calls, "answered": ok, "failed": failed, "cell_cpu_pct": round(cpu, 2),
            "cpu_pct_per_call": round(cpu / max(1, ok), 2),
            "frame_rate_min": min(e["frame_rate"] for e in ended),
            "mos_min": min((e["mos"] or 0) for e in ended)}


def idle_main(out_path: str | None = None, seconds: float = 60.0, box_cells: int = 4) -> dict:
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "idle": [], "echo_rate": []}
    print(f"idle echo cells ({seconds:.0f} s): CPU % of a core (utime+stime) and PSS per cell")
    print(f"{'cells':>5} {'CPU% mean':>9} {'CPU% max':>8} {'PSS MB mean':>11} {'PSS MB max':>10}")
    for n in (1, box_cells):
        r = idle(n, seconds)
        res["idle"].append(r)
        print(f"{r['cells']:>5} {r['cell_cpu_pct_mean']:>9} {r['cell_cpu_pct_max']:>8} {r['cell_pss_mb_mean']:>11} "
              f"{r['cell_pss_mb_max']:>10}")
    print(f"\n{'bridge Hz':>9} {'calls':>5} {'ok':>3} {'cell CPU%':>9} {'CPU%/call':>9} {'fps min':>7} {'MOS min':>7}")
    for rate in (8000, 16000):
        r = echo_rate(rate)
        res["echo_rate"].append(r)
        print(f"{r['clock_rate']:>9} {r['calls']:>5} {r['answered']:>3} {r['cell_cpu_pct']:>9} "
              f"{r['cpu_pct_per_call']:>9} {r['frame_rate_min']:>7} {r['mos_min']:>7}")
    if out_path:
        Path(out_path).write_text(json.dumps(res, indent=2) + "\n")
        print(f"saved {out_path}")
    return res


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
            c0, g0, w0 = _cpu(pids), _cpu([proc.pid]), time.monotonic()
            time.sleep(8)
            c1, g1, w1 = _cpu(pids), _cpu([proc.pid]), time.monotonic()
            cell_rss = [_rss_mb(p) for p in _cell_pids(box)]
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
            "sipp_cpu_pct": round(100 * (g1 - g0) / (w1 - w0), 1),
            "cell_rss_mb": round(sum(cell_rss) / max(1, len(cell_rss)), 1)}


def curve(out_path: str, sizes=((34, 100), (50, 150), (67, 200), (84, 250)), repeats: int = 2) -> dict:
    """The capacity curve: each size ``repeats`` times, one box after another, with the
    machine's load average before and after each point and SIPp's own CPU (it generates
    every call's RTP on the same cores)."""
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine_cpus": os.cpu_count(),
           "command": "python tests/bench/run.py --only boxcurve", "runs": []}
    print(f"{'cells':>5} {'calls':>5} {'ok':>4} {'fail':>4} {'on time+MOS':>11} {'p99 ms':>6} {'gaps':>5} "
          f"{'MOS min':>7} {'box CPU%':>8} {'CPU%/call':>9} {'SIPp CPU%':>9} {'load before':>11}")
    for _ in range(repeats):
        for cells, calls in sizes:
            time.sleep(10)                                  # the last box's processes gone, load settling
            before = os.getloadavg()[0]
            try:
                r = concurrent(cells, calls)
            except Exception as exc:  # noqa: BLE001 - a point that broke is reported, the curve goes on
                r = {"cells": cells, "calls": calls, "error": f"{type(exc).__name__}: {exc}"}
            r.update(when=time.strftime("%H:%M UTC", time.gmtime()), loadavg_before=round(before, 2),
                     loadavg_after=round(os.getloadavg()[0], 2))
            res["runs"].append(r)
            Path(out_path).write_text(json.dumps(res, indent=2) + "\n")      # kept point by point
            if "error" in r:
                print(f"{cells:>5} {calls:>5} failed: {r['error']}", flush=True)
                continue
            print(f"{r['cells']:>5} {r['calls']:>5} {r['answered']:>4} {r['failed']:>4} {r['on_time_and_mos_ok']:>11} "
                  f"{r['frame_p99_ms_max']!s:>6} {r['frame_gaps']:>5} {r['mos_min']!s:>7} {r['box_cpu_pct']:>8} "
                  f"{r['cpu_pct_per_call']:>9} {r['sipp_cpu_pct']:>9} {r['loadavg_before']:>11}", flush=True)
    print(f"saved {out_path}")
    return res


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
    res.update({k: v for k, v in idle_main().items() if k != "when"})
    print("box: cells behind Kamailio, echo app, PCMA calls with real speech RTP")
    print(f"{'cells':>5} {'calls':>5} {'ok':>4} {'fail':>4} {'on time+MOS':>11} {'fps min':>7} {'p99 ms':>6} "
          f"{'gaps':>4} {'MOS min':>7} {'box CPU%':>8} {'CPU%/call':>9} {'RSS/cell MB':>11}")
    for cells, calls in sizes:
        r = concurrent(cells, calls)
        res["concurrent"].append(r)
        print(f"{r['cells']:>5} {r['calls']:>5} {r['answered']:>4} {r['failed']:>4} {r['on_time_and_mos_ok']:>11} "
              f"{r['frame_rate_min']!s:>7} {r['frame_p99_ms_max']!s:>6} {r['frame_gaps']:>4} {r['mos_min']!s:>7} "
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
    if sys.argv[1:] == ["idle"]:
        idle_main(str(Path(__file__).resolve().parent / "results" / "idle.json"))
    else:
        main(str(Path(__file__).resolve().parent / "results" / "box.json"))
