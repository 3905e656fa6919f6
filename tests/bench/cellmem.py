"""A cell's memory against the calls it has handled (issue 14): tells a leak from a high-water mark.

One echo cell on 127.0.0.1; SIPp's built-in ``uac`` places short calls (200 ms, 3 at a time,
12 calls/s asked); after each batch, the cell's RSS and PSS and the resident size of its main
heap (``[heap]``) and anonymous mappings (Python's arenas, other threads' malloc arenas), from
``/proc/<pid>/smaps``. A line of JSON per batch.

    python tests/bench/cellmem.py [--batches 8] [--calls 400]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support import CellProcess, sipp  # noqa: E402


def memory(pid: int) -> dict:
    out = {"rss_kb": 0, "pss_kb": 0, "heap_kb": 0, "anon_kb": 0}
    for line in open(f"/proc/{pid}/smaps_rollup"):
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key.lower() + "_kb"] = int(value.split()[0])
    name = None
    for line in open(f"/proc/{pid}/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            name = parts[5] if len(parts) > 5 else "anon"
        elif line.startswith("Rss:") and name in ("[heap]", "anon"):
            out["heap_kb" if name == "[heap]" else "anon_kb"] += int(line.split()[1])
    return out


def main(batches: int, calls: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        cell = CellProcess(tmp, '[models]\nload = "never"\n[sip]\nrtp_timeout = 0\n').start()
        try:
            for b in range(batches):
                d = tmp / f"b{b}"
                d.mkdir()
                r = sipp("builtin:uac", cell.sip, d, "-d", "200", "-l", "3", "-r", "12",
                         local_port=cell.ports["sipp"], calls=calls, timeout=900)
                time.sleep(2)
                row = {"calls": (b + 1) * calls, "sipp_rc": r.returncode, **memory(cell.proc.pid)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            cell.stop()
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--calls", type=int, default=400)
    a = ap.parse_args()
    main(a.batches, a.calls)
