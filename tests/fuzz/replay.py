"""Replay a saved regression batch case by case to find the case that breaks the target.

    .venv/bin/python tests/fuzz/replay.py tests/fuzz/regressions/<dir> [--front]

Starts a fresh cell (or a box with --front), sends the saved cases one at a time with the
oracle after each, and prints the first case after which the target crashed or hung,
with its messages; then confirms it alone against another fresh target.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.runner import Runner, load_regression  # noqa: E402
from fuzz.sipfuzz import Endpoint  # noqa: E402
from fuzz.targets import BoxTarget, CellTarget  # noqa: E402


def _target(front: bool, tmp: Path):
    return BoxTarget.start(tmp) if front else CellTarget.start(tmp)


def replay(d: Path, front: bool, cases_filter=None) -> int | None:
    """Index of the first case after which the target fails (None: it survived)."""
    tmp = Path(tempfile.mkdtemp(prefix="replay-"))
    t = _target(front, tmp)
    try:
        ep = Endpoint(*t.sip, __import__("json").loads((d / "case.json").read_text())["transport"])
        meta, cases = load_regression(d, ep)
        if cases_filter is not None:
            cases = [c for c in cases if c.index in cases_filter]
        r = Runner(ep, meta["source"], t.oracle(), "replay", batch=1, save_dir=tmp / "saved")
        try:
            for c in cases:
                why = r.run_cases([c])
                if why:
                    print(f"case {c.index} ({c.label}) -> {why.splitlines()[0]}")
                    print(why.splitlines()[-1][:400])
                    return c.index
        finally:
            r.close()
        return None
    finally:
        t.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--front", action="store_true", help="replay into a box (Kamailio front) instead of a cell")
    a = ap.parse_args()
    bad = replay(a.dir, a.front)
    if bad is None:
        print("the target survived every case")
        return 0
    alone = replay(a.dir, a.front, {bad})
    print(f"case {bad} alone: " + ("reproduces" if alone == bad else "does not reproduce (needs the cases before it)"))
    _, cases = load_regression(a.dir, Endpoint("127.0.0.1", 1))
    for c in cases:
        if c.index == bad:
            for m in c.messages:
                print("-" * 60)
                print(m.decode("utf-8", "replace")[:3000])
    return 1


if __name__ == "__main__":
    sys.exit(main())
