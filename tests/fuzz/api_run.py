"""Schemathesis against a real cell's served /v1/openapi.json with a real control key.

Run as a script (by tests/test_fuzz_api.py), normally inside a fresh network namespace
(``unshare -n``) whose only interface is loopback: whatever URL or SIP destination the
generated requests name, the cell cannot reach anything but 127.0.0.0/8.

    python tests/fuzz/api_run.py OUT_DIR MAX_EXAMPLES SEED [st options, e.g. --checks ...]

Writes OUT_DIR/st.txt (Schemathesis' report, with a curl line per failure),
OUT_DIR/junit.xml, OUT_DIR/summary.json and exits with Schemathesis' exit code.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fuzz.runner import vm_rss_kb  # noqa: E402
from support import CellProcess, create_key  # noqa: E402

CONFIG = '[models]\nload = "never"\n[[trunks]]\nname = "carrier"\nallow = ["127.0.0.1/32"]\n'


def main() -> int:
    out = Path(sys.argv[1])
    max_examples, seed, extra = sys.argv[2], sys.argv[3], sys.argv[4:]
    out.mkdir(parents=True, exist_ok=True)
    cell = CellProcess(out, CONFIG, ("--app", "echo"))
    cell.start()
    st = shutil.which("st", path=os.path.dirname(sys.executable)) or "st"
    try:
        key = create_key(cell.data, "control", "schemathesis")
        rss_before = vm_rss_kb(cell.proc.pid)
        url = f"http://127.0.0.1:{cell.ports['http']}/v1/openapi.json"
        cmd = [st, "run", url, "-H", f"Authorization: Bearer {key}", "--max-examples", max_examples,
               "--seed", seed, "--workers", "1", "--request-timeout", "10",
               "--report", "junit", "--report-junit-path", str(out / "junit.xml"), "--no-color", *extra]
        t0 = time.monotonic()
        r = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=1500,
                           env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
        took = time.monotonic() - t0
        text = r.stdout + r.stderr
        (out / "st.txt").write_text(text.replace(key, "<control key>"))
        alive = cell.alive()
        summary = {"cmd": [c if c != f"Authorization: Bearer {key}" else "Authorization: Bearer <control key>"
                           for c in cmd], "exit": r.returncode, "seconds": round(took, 1), "alive": alive,
                   "rss_kb_before": rss_before, "rss_kb_after": vm_rss_kb(cell.proc.pid) if alive else None,
                   "log_errors": [e.get("msg", "")[:300] for e in cell.events() if e.get("level") == "error"][:50],
                   "isolated": os.environ.get("FUZZ_NETNS") == "1"}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return r.returncode
    finally:
        if cell.alive():
            cell.stop()


if __name__ == "__main__":
    sys.exit(main())
