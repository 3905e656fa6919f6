"""The access audit and a caller's export, on a real cell with real (recorded) SIPp calls from two
callers: reads of transcripts, event replays (REST and WebSocket ``since``), recording downloads and
exports and erasures each append an audit row (key id, route, object, time, source address) that only an
``audit`` key can list; the audit holds no number or words in clear, and refuses to be rewritten;
the export of one caller holds that caller's calls, words, events and recordings, and nobody else's."""
import asyncio
import json
import math
import sqlite3
import time
import urllib.request

import aiohttp
import numpy as np
import pytest

from bridge.core import config
from bridge.core.keys import new_key_line
from bridge.records.audit import AuditTrail
from bridge.records.cipher import vault_for
from bridge.records.store import Store
from media.wav import write_wav
from support import SCENARIOS, Api, RtpPeer, create_key, sipp

CALLER = "+15551230001"
OTHER = "+15559870002"
WORDS = "my account number is seventeen and my dog is called biscuit"
OTHER_WORDS = "please cancel the appointment for tuesday"


def _call_from(cell, tmp_path, number: str, peer_port: int) -> None:
    scenario = tmp_path / f"call-{number[1:]}.xml"
    scenario.write_text((SCENARIOS / "call_pcmu.xml").read_text().replace("sip:sipp@", f"sip:{number}@"))
    peer = RtpPeer(peer_port)
    try:
        r = sipp(str(scenario), cell.sip, tmp_path, "-d", "1500", local_port=cell.ports["sipp"],
                 rtpport=peer_port)
        assert r.returncode == 0, r.stdout.decode()[-2000:]
    finally:
        peer.close()


def _wait(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"waited {timeout}s for {what}")


async def _ws_replay(port: int, key: str) -> list[dict]:
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"http://127.0.0.1:{port}/v1/ws", headers={"Authorization": f"Bearer {key}"}) as ws:
            await ws.send_json({"type": "subscribe", "topics": ["*"], "since": 0})
            got = []
            while True:
                m = await asyncio.wait_for(ws.receive_json(), 10)
                if m["type"] == "subscribed":
                    return got
                if m["type"] == "event":
                    got.append(m["event"])


@pytest.mark.slow
@pytest.mark.sample
def test_reads_are_audited_and_a_caller_export_holds_only_their_data(cell_factory, tmp_path, monkeypatch):
    prompt = tmp_path / "prompt.wav"
    t = np.arange(16000) / 16000
    write_wav(str(prompt), (6000 * np.sin(2 * math.pi * 1000 * t)).astype("<i2").tobytes(), 16000)
    # the key ring in the environment, so that `trunkline keys create` (no config file) sees it too
    monkeypatch.setenv("TRUNKLINE_RECORDING_KEYS", new_key_line("k1"))
    cell = cell_factory('[models]\nload = "never"\n[app]\nloop = true\n'
                        '[recordings]\nnumbers = {"service" = true}\n',
                        args=("--app", "playback", "--prompt", str(prompt)))
    control, read = create_key(cell.data, "control"), create_key(cell.data, "read")
    audit, rec_key = create_key(cell.data, "audit"), create_key(cell.data, "recordings")
    api = Api(cell, control)
    _call_from(cell, tmp_path, CALLER, cell.ports["rtp_peer"])
    _call_from(cell, tmp_path, OTHER, cell.ports["rtp_peer"] + 2)
    cell.wait_event("call_ended", 2)
    calls = _wait(lambda: [c for c in api.get("/v1/calls?state=ended")[1]["calls"]], 10, "two ended calls")
    mine = next(c for c in calls if CALLER in c["from"])
    theirs = next(c for c in calls if OTHER in c["from"])
    # What a transcribe on each call would have stored (through the store's own API, as a cell does).
    config.load(overrides={"data_dir": str(cell.data)})     # this process seals with the cell's key ring
    store = Store(str(cell.data))
    store.add_transcript(mine["id"], "in", WORDS)
    store.add_transcript(theirs["id"], "in", OTHER_WORDS)
    store.close()
    recs = _wait(lambda: [r for r in api.get(f"/v1/recordings?call_id={mine['id']}")[1]["recordings"]
                          if r["status"] == "stopped"], 10, "the caller's recording")

    # -- reads that are audited -----------------------------------------------------------------
    status, body, _ = api.get(f"/v1/calls/{mine['id']}/transcript", key=read)
    assert status == 200 and body["transcript"][0]["text"] == WORDS
    status, body, _ = api.get("/v1/events?since=0", key=read)
    assert status == 200 and body["events"]
    replayed = asyncio.run(_ws_replay(cell.ports["http"], read))
    assert replayed and {e["call_id"] for e in replayed if e["call_id"]} >= {mine["id"], theirs["id"]}
    req = urllib.request.Request(f"{api.base}/v1/recordings/{recs[0]['id']}/audio",
                                 headers={"Authorization": f"Bearer {rec_key}"})
    with urllib.request.urlopen(req, timeout=15) as r:
        assert r.status == 200 and r.read(4) == b"OggS"
    # not audited: a plain call listing
    assert api.get("/v1/calls", key=read)[0] == 200

    # -- the export -------------------------------------------------------------------------------
    assert api.get(f"/v1/callers/{CALLER}/export", key=read)[0] == 403
    assert api.get(f"/v1/callers/{CALLER}/export", key=audit)[0] == 403
    assert api.get(f"/v1/callers/{'9' * 65}/export")[0] == 400
    status, export, _ = api.get(f"/v1/callers/{CALLER}/export")
    assert status == 200 and export["caller"] == CALLER
    assert [c["id"] for c in export["calls"]] == [mine["id"]]
    got = export["calls"][0]
    assert [t["text"] for t in got["transcript"]] == [WORDS]
    assert got["events"] and {e["call_id"] for e in got["events"]} == {mine["id"]}
    assert {"call_ringing", "call_hangup", "recording_stopped"} <= {e["type"] for e in got["events"]}
    assert [r["id"] for r in got["recordings"]] == [recs[0]["id"]]
    assert got["recordings"][0]["audio"] == f"/v1/recordings/{recs[0]['id']}/audio"
    assert got["records"] and got["records"][0]["call_id"] == mine["id"]      # calls.jsonl: the call's record
    text = json.dumps(export)
    assert OTHER_WORDS not in text and theirs["id"] not in text and OTHER not in text
    # the number as the caller dialled it, with or without +, gives the same export
    assert [c["id"] for c in api.get(f"/v1/callers/{CALLER[1:]}/export")[1]["calls"]] == [mine["id"]]

    # an erasure (of the other caller) is audited too, under the same keyed hash as its own record
    status, erased, _ = api.post("/v1/erasures", {"caller": OTHER})
    assert status == 201, erased

    # -- the audit: its own scope ---------------------------------------------------------------------
    assert api.get("/v1/audit", key=read)[0] == 403
    assert api.get("/v1/audit", key=control)[0] == 403
    assert api.get("/v1/audit", key=rec_key)[0] == 403
    status, page, _ = api.get("/v1/audit?limit=100", key=audit)
    assert status == 200, page
    rows = page["entries"]
    ids = {name: k.split("_")[1] for name, k in (("control", control), ("read", read), ("audit", audit),
                                                  ("rec", rec_key))}
    seen = [(r["key_id"], r["route"], r["object"]) for r in rows]
    assert seen[:4] == [
        ("key_" + ids["read"], "GET /v1/calls/{call_id}/transcript", mine["id"]),
        ("key_" + ids["read"], "GET /v1/events", "events>0"),
        ("key_" + ids["read"], "GET /v1/ws", "events>0"),
        ("key_" + ids["rec"], "GET /v1/recordings/{recording_id}/audio", recs[0]["id"]),
    ], seen
    exports = [r for r in rows if r["route"] == "GET /v1/callers/{number}/export"]
    assert len(exports) == 2 and all(r["key_id"] == "key_" + ids["control"] for r in exports)
    assert exports[0]["object"] == exports[1]["object"] and exports[0]["object"].startswith("caller:")
    erasures = [r for r in rows if r["route"] == "POST /v1/erasures"]
    assert [(r["key_id"], r["object"]) for r in erasures] == [("key_" + ids["control"],
                                                              "caller:" + erased["caller_hash"])]
    assert rows[-1]["route"] == "GET /v1/audit" and rows[-1]["key_id"] == "key_" + ids["audit"]
    assert all(r["source"] == "127.0.0.1" and abs(r["at"] - time.time()) < 120 for r in rows)
    assert len(rows) == 8                    # refused requests and plain listings are not in it
    # the caller's number filters to the caller's exports, without being stored
    by_caller = api.get(f"/v1/audit?caller={CALLER}", key=audit)[1]["entries"]
    assert [r["seq"] for r in by_caller] == [r["seq"] for r in exports]
    # paginated: 3 at a time, in order, with a cursor
    pages, after = [], 0
    while True:
        body = api.get(f"/v1/audit?limit=3&after={after}", key=audit)[1]
        pages += body["entries"]
        if body["next"] is None:
            break
        after = body["next"]
    seqs = [r["seq"] for r in pages]
    assert seqs == sorted(set(seqs)) and seqs[:len(rows)] == [r["seq"] for r in rows]

    # -- at rest: no number or words in the audit; and it cannot be rewritten ------------------------------
    db = sqlite3.connect(str(cell.data / "trunkline.db"))
    dump = json.dumps(db.execute("SELECT * FROM access_audit").fetchall())
    for secret in (CALLER, CALLER[1:], OTHER[1:], "biscuit", "seventeen"):
        assert secret not in dump
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE access_audit SET key_id = 'someone_else'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM access_audit")
    db.close()


def test_audit_trail_unit(tmp_path, monkeypatch):
    """The trail on its own: rows appended off the caller's thread, filters, the caller reference
    (a keyed hash: the same for every spelling of a number, different for another number), purge
    only of rows older than a day."""
    monkeypatch.setenv("TRUNKLINE_RECORDING_KEYS", new_key_line("k1"))
    trail = AuditTrail(str(tmp_path / "t.db"))
    try:
        ref = trail.caller_ref("+1 (555) 123-0001")
        assert ref == trail.caller_ref("tel:+15551230001") == trail.caller_ref("sip:+15551230001@pbx;user=phone")
        assert ref != trail.caller_ref("+15551230002") and "5551230001" not in ref
        assert ref == "caller:" + vault_for(str(tmp_path / "t.db")).ref("15551230001")   # the erasures' hash
        old = time.time() - 3 * 86400
        trail.record("key_a", "GET /v1/events", "events>0", "127.0.0.1", at=old)
        trail.record("key_b", "GET /v1/calls/{call_id}/transcript", "call_1", "10.0.0.9")
        assert trail.flush()
        assert [r["key_id"] for r in trail.rows()] == ["key_a", "key_b"]
        assert [r["object"] for r in trail.rows(key_id="key_b")] == ["call_1"]
        assert [r["key_id"] for r in trail.rows(after=trail.rows()[0]["seq"])] == ["key_b"]
        assert trail.purge(time.time()) == 1                # only the old one can go
        assert [r["key_id"] for r in trail.rows()] == ["key_b"]
    finally:
        trail.close()


def test_retention_purges_old_audit_rows_but_never_the_last_day(tmp_path):
    """records.retention_days applies to the access audit too; its own trigger keeps a day."""
    import sqlite3
    import time as _time
    from bridge.records.audit import open_trail
    from bridge.records.store import Store
    store = Store(str(tmp_path))
    trail = open_trail(str(tmp_path))
    db = sqlite3.connect(str(tmp_path / "trunkline.db"))
    now = _time.time()
    for age_days in (40, 10, 0.1):
        db.execute("INSERT INTO access_audit (at, key_id, route, object) VALUES (?, 'k', '/v1/x', 'o')",
                   (now - age_days * 86400,))
    db.commit()
    db.close()
    removed = store.purge(now - 5 * 86400)
    assert removed["access_audit"] == 2
    store.purge(now)                                    # asks for everything: the last day stays
    left = [r["at"] for r in trail.rows(0, 10)]
    assert len(left) == 1 and left[0] > now - 86400
    trail.close() if hasattr(trail, "close") else None
    store.close()
