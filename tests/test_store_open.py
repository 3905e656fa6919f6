"""Cells of a box open (and migrate) one records database and one local key file at the same moment.

CI saw ``sqlite3.OperationalError: duplicate column name: caller_ref`` when three cells started together:
two processes both found the column missing and both added it. These tests start several real processes
released by one barrier time, on a fresh data directory and on a database from before sealed records.
"""
import json
import sqlite3
import subprocess
import sys
import textwrap
import time

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

OPENER = textwrap.dedent("""
    import json, sys, time
    from bridge.records.store import Store
    from bridge.core import keys
    data, at = sys.argv[1], float(sys.argv[2])
    while time.time() < at:
        pass
    s = Store(data)
    cols = [r[1] for r in s.db.execute("PRAGMA table_info(calls)")]
    print(json.dumps({"cols": cols, "key": open(keys.local_key_path(data)).read()}))
""")


def _open_together(data_dir, n=6):
    at = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, str(data_dir), str(at)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    return outs


def test_cells_opening_a_fresh_store_together_all_start_with_one_key(tmp_path):
    for round_ in range(3):
        d = tmp_path / f"r{round_}"
        outs = _open_together(d)
        assert all(o["cols"].count("caller_ref") == 1 for o in outs)
        assert len({o["key"] for o in outs}) == 1, "every cell must seal with the same generated key"
        assert "local" in outs[0]["key"]


def test_cells_migrating_an_old_store_together(tmp_path):
    for round_ in range(3):
        d = tmp_path / f"r{round_}"
        d.mkdir()
        db = sqlite3.connect(d / "trunkline.db")
        db.execute("CREATE TABLE calls (id TEXT PRIMARY KEY, direction TEXT, from_uri TEXT, to_uri TEXT, "
                   "trunk TEXT, app TEXT, state TEXT, codec TEXT, created REAL, answered REAL, ended REAL, "
                   "result TEXT, reason TEXT, quality TEXT)")
        db.execute("INSERT INTO calls (id, state) VALUES ('call_old', 'ended')")
        db.commit()
        db.close()
        outs = _open_together(d)
        for o in outs:
            assert o["cols"].count("cell") == 1 and o["cols"].count("caller_ref") == 1
        db = sqlite3.connect(d / "trunkline.db")
        assert db.execute("SELECT state FROM calls WHERE id = 'call_old'").fetchone() == ("ended",)
