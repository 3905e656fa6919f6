"""A test hook that makes the data disk "slow": every durable write (a JSONL
fsync, a SQLite record write) waits while the flag file named by
``TL_TEST_SLOW_DISK`` exists (at most 30 s per write).

Only the tests set it (tests/test_writer.py stalls a live cell's writer with
it during a call); unset, the hook costs one dictionary lookup. Not named
``TRUNKLINE_*``: those are configuration settings.
"""
from __future__ import annotations

import os
import time

ENV = "TL_TEST_SLOW_DISK"
MAX_STALL = 30.0


def stall() -> None:
    flag = os.environ.get(ENV)
    if not flag:
        return
    deadline = time.monotonic() + MAX_STALL
    while os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.01)
