"""Data at rest (issue 16): nothing a caller said or keyed is readable on disk without the key,
one caller can be erased (crypto-shredding what append-only files and backups keep), retention
runs everywhere while the cell runs, and key rotation reads old and new records.

Real cells and SIPp calls on loopback; the agent test speaks real (synthesized) speech."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support import ROOT, SCENARIOS, Api, RtpPeer, create_key, sipp

NUMBER_A = "+15550001111"
NUMBER_B = "+15550002222"


def _from(tmp: Path, number: str, scenario: str) -> str:
    """One of our SIPp scenarios, calling from ``number`` (SIPp's own From is "sipp")."""
    p = tmp / f"from{number.strip('+')}-{scenario}"
    p.write_text((SCENARIOS / scenario).read_text().replace("sip:sipp@", f"sip:{number}@"))
    return str(p)


def _files(cell) -> list[Path]:
    return [p for p in cell.data.rglob("*") if p.is_file()] + [cell.log_path]


def _found(cell, needles: list[bytes]) -> list[tuple[str, bytes]]:
    """Every (file, needle) where a needle is in clear (case-insensitive) under the data dir or the log."""
    out = []
    for p in _files(cell):
        try:
            data = p.read_bytes().lower()
        except OSError:
            continue
        out += [(str(p), n) for n in needles if n.lower() in data]
    return out


def _keys_config(tmp: Path, *ids: str, current: str | None = None) -> tuple[Path, str]:
    from bridge.core.keys import new_key_line
    path = tmp / "ring.keys"
    old = {ln.split(":", 1)[0]: ln for ln in path.read_text().splitlines()} if path.exists() else {}
    path.write_text("".join((old.get(i) or new_key_line(i)) + "\n" for i in ids))
    os.chmod(path, 0o600)
    return path, f'[recordings]\nkey_file = "{path}"\ncurrent_key = "{current or ids[-1]}"\n'


def _send_digit(peer: RtpPeer, digit: str) -> None:
    """An RFC 4733 telephone-event (pt 101), then 200 ms of audio."""
    ev = "0123456789*#".index(digit)
    for i, (end, dur) in enumerate([(0, 160), (0, 320), (0, 480), (1, 800), (1, 800), (1, 800)]):
        peer.send(bytes([ev, (0x80 if end else 0) | 10]) + dur.to_bytes(2, "big"), pt=101, marker=i == 0, ts_step=0)
        time.sleep(0.02)
    peer.ts += 800
    peer.stream([b"\xff" * 160] * 10)


def _active_call(api: Api, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        calls = api.get("/v1/calls?state=active")[1]["calls"]
        if calls:
            return calls[0]
        time.sleep(0.1)
    raise AssertionError("no active call")


def _open_store(cell):
    """The test's own view of the cell's records, keyed as the cell is (same config)."""
    from bridge.core.config import load
    from bridge.records.store import Store
    load(str(cell.config_path), {"data_dir": str(cell.data)})
    return Store(str(cell.data))


# What the caller keys: framed by * and # so that no random id can match it by chance, as the bare
# "4815" once did inside the webhook id "wh_7cc0664815f673ec" (hex), a false alarm, not a leak.
KEYED = "*4815#"


def test_api_call_keeps_no_number_digits_or_secrets_in_clear(cell_factory, tmp_path):
    """A caller on the api app keys digits (shown in records: show_dtmf), the API stores a webhook secret and
    an idempotent answer holding it: none of it is in clear in any file, log included; the API reads it all."""
    keys, ring = _keys_config(tmp_path, "k1")
    cell = cell_factory('[models]\nload = "never"\n[pii]\nshow_dtmf = true\n[http]\noutbound_allow = ["127.0.0.0/8"]\n'
                        + ring, args=("--app", "api"))
    api = Api(cell, create_key(cell.data, "control"))
    peer = RtpPeer(cell.ports["rtp_peer"])
    proc = sipp(_from(tmp_path, NUMBER_A, "wait_bye.xml"), cell.sip, tmp_path, "-d", "20000",
                local_port=cell.ports["sipp"], rtpport=cell.ports["rtp_peer"], background=True, timeout=40)
    try:
        peer.wait_remote()
        call = _active_call(api)
        for d in KEYED:
            _send_digit(peer, d)
        cell.wait_event("dtmf", len(KEYED))
        secret = "whsec-" + "7" * 24
        st, hook, _ = api.post("/v1/webhooks", {"url": "http://127.0.0.1:9/hook", "secret": secret},
                               headers={"Idempotency-Key": "idem-1"})
        assert st == 201, hook
        assert api.post(f"/v1/calls/{call['id']}/hangup")[0] == 200
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        peer.close()
    ended = cell.wait_event("call_ended")[0]
    # callers of the API read plaintext: the number, the digits, the secret (and its idempotent replay)
    assert NUMBER_A in api.get(f"/v1/calls/{call['id']}")[1]["from"]
    digits = [e["data"]["digit"] for e in api.get("/v1/events")[1]["events"] if e["type"] == "dtmf_received"]
    assert "".join(digits) == KEYED
    st, again, h = api.post("/v1/webhooks", {"url": "http://127.0.0.1:9/hook", "secret": secret},
                            headers={"Idempotency-Key": "idem-1"})
    assert h.get("Idempotent-Replayed") == "true" and again["secret"] == secret
    from bridge.records.journal import CallRecords
    _open_store(cell).close()
    (rec,) = [r for r in CallRecords(str(cell.data)).read() if r["call_id"] == ended["call_id"]]
    assert rec["dtmf"] == KEYED and NUMBER_A in rec["from"]
    # ... and no file holds any of it in clear (while running: WAL; after a clean stop: the main file)
    needles = [NUMBER_A.encode(), NUMBER_A[1:].encode(), KEYED.encode(), b'"digit": "4"', secret.encode()]
    assert _found(cell, needles) == []
    assert cell.stop() == 0
    assert _found(cell, needles) == []
    assert (cell.data / "calls.jsonl").exists() and (cell.data / "trunkline.db").stat().st_size > 0


def _short_call(cell, tmp: Path, number: str) -> None:
    res = sipp(_from(tmp, number, "call_pcmu.xml"), cell.sip, tmp, "-d", "1500", local_port=cell.ports["sipp"])
    assert res.returncode == 0, res.stdout.decode()[-2000:]


def test_erasure_of_one_caller_leaves_the_others(cell_factory, tmp_path):
    keys, ring = _keys_config(tmp_path, "k1")
    cell = cell_factory('[models]\nload = "never"\n' + ring +
                        'enabled = true\nformat = "wav"\nflush_interval = 0.5\n')
    control = create_key(cell.data, "control")
    api = Api(cell, control)
    _short_call(cell, tmp_path, NUMBER_A)
    _short_call(cell, tmp_path, NUMBER_B)
    cell.wait_event("call_ended", 2)
    stopped = cell.wait_event("recording_stopped", 2)
    calls = {c["from"]: c for c in api.get("/v1/calls")[1]["calls"]}
    a = next(c for f, c in calls.items() if NUMBER_A in f)
    b = next(c for f, c in calls.items() if NUMBER_B in f)
    rec_files = {e["call_id"]: next(cell.data.rglob(f"{e['recording_id']}.*")) for e in stopped}
    backup = tmp_path / "calls.jsonl.backup"                   # a backup taken before the erasure
    shutil.copy(cell.data / "calls.jsonl", backup)
    assert _found(cell, [NUMBER_A[1:].encode(), NUMBER_B[1:].encode()]) == []

    st, era, _ = api.post("/v1/erasures", {"caller": "tel:" + NUMBER_A})
    assert st == 201, era
    assert era["counts"]["calls"] == 1 and era["counts"]["recordings"] == 1
    assert era["counts"]["recording_files"] == 1 and era["counts"]["journal_lines"] == 1
    assert era["counts"]["events"] >= 2 and era["counts"]["caller_keys"] == 1
    assert NUMBER_A[1:] not in json.dumps(era) and era["by"].startswith("key_")
    # A is gone everywhere; B is intact and readable
    assert api.get(f"/v1/calls/{a['id']}")[0] == 404
    assert api.get(f"/v1/calls/{b['id']}")[1]["from"] == b["from"]
    assert not rec_files[a["id"]].exists() and rec_files[b["id"]].exists()
    events = api.get("/v1/events")[1]["events"]
    assert {e["call_id"] for e in events if e.get("call_id")} == {b["id"]}
    from bridge.records.journal import CallRecords, open_record
    store = _open_store(cell)
    try:
        assert [r["call_id"] for r in CallRecords(str(cell.data)).read()] == [b["id"]]
        old = {r["call_id"]: open_record(r, store.vault) for r in map(json.loads, backup.read_text().splitlines())}
        assert old[a["id"]].get("erased") is True and "from" not in old[a["id"]]     # crypto-shredded
        assert NUMBER_B in old[b["id"]]["from"] and not old[b["id"]].get("erased")
        (row,) = store.erasures()
        assert row["caller_hash"] == store.vault.ref(NUMBER_A) and row["counts"]["calls"] == 1
    finally:
        store.close()
    assert cell.wait_event("caller_erased")[0]["calls"] == 1
    assert _found(cell, [NUMBER_A[1:].encode()]) == []
    # the command line erases B while the cell runs
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "erase", "--caller", NUMBER_B, "--config",
                        str(cell.config_path), "--data-dir", str(cell.data)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["by"] == "cli" and out["counts"]["calls"] == 1 and out["counts"]["recording_files"] == 1
    assert api.get("/v1/calls")[1]["calls"] == [] and not rec_files[b["id"]].exists()
    assert (cell.data / "calls.jsonl").read_text() == ""
    assert api.post("/v1/erasures", {"caller": NUMBER_A}, key=create_key(cell.data, "read"))[0] == 403


def test_retention_purges_rows_journals_and_recordings_while_running(cell_factory, tmp_path):
    days = 6 / 86400                                           # six seconds: a round every 1.5 s
    keys, ring = _keys_config(tmp_path, "k1")
    cell = cell_factory(f'[models]\nload = "never"\n[records]\nretention_days = {days}\n' + ring +
                        f'enabled = true\nformat = "wav"\nflush_interval = 0.5\nretention_days = {days}\n')
    api = Api(cell, create_key(cell.data, "read"))
    _short_call(cell, tmp_path, NUMBER_A)
    cell.wait_event("call_ended")
    rec = cell.wait_event("recording_stopped")[0]
    assert len(api.get("/v1/calls")[1]["calls"]) == 1 and api.get("/v1/events")[1]["events"]
    assert (cell.data / "calls.jsonl").read_text().strip()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = cell.metrics()
        if (m.get('trunkline_records_purged_total{kind="calls"}', 0) >= 1 and
                m.get('trunkline_records_purged_total{kind="journal_lines"}', 0) >= 1 and
                m.get('trunkline_records_purged_total{kind="recordings"}', 0) >= 1):
            break
        time.sleep(0.5)
    else:
        raise AssertionError("nothing purged while running: "
                             f"{ {k: v for k, v in cell.metrics().items() if 'purged_total' in k} }")
    assert cell.alive()
    assert api.get("/v1/calls")[1]["calls"] == [] and api.get("/v1/events")[1]["events"] == []
    assert (cell.data / "calls.jsonl").read_text() == ""
    assert not list(cell.data.rglob(f"{rec['recording_id']}.*"))
    assert cell.events("records_purged")


def test_key_rotation_reads_old_and_new_records(tmp_path):
    from bridge.core.config import load
    from bridge.records import cipher
    from bridge.records.journal import CallRecords
    from bridge.records.store import Store
    data = tmp_path / "data"
    conf = tmp_path / "c.toml"

    def store_with(*ids: str) -> Store:
        cipher.reset()                                           # a restart: the key file is read again
        conf.write_text(_keys_config(tmp_path, *ids)[1])
        load(str(conf), {"data_dir": str(data)})
        return Store(str(data))

    st = store_with("k1")
    row = st.stage_call({"id": "c1", "direction": "inbound", "from_uri": f"sip:{NUMBER_A}@h", "to_uri": "sip:s@h"})
    st.upsert_call(row)
    st.add_transcript("c1", "in", "old words about a cleaning")
    old_hook = st.add_webhook("http://127.0.0.1:9/", ["*"], "old-secret-0123456789")
    CallRecords(str(data), name="turns.jsonl").append({"event": "turn", "at": 1.0, "call_id": "c1", "text": "old"})
    st.db.execute("INSERT INTO transcripts (call_id, direction, text, at) VALUES ('legacy', 'in', 'plain', 1)")
    st.close()

    st = store_with("k1", "k2")                                  # rotate: k2 seals, k1 still opens
    new_hook = st.add_webhook("http://127.0.0.1:9/", ["*"], "new-secret-0123456789")
    assert {r[0] for r in st.db.execute("SELECT key_id FROM caller_keys UNION SELECT key_id FROM vault_keys")} \
        == {"k2"}                                                # the caller keys were re-wrapped
    raw = dict(st.db.execute("SELECT id, secret FROM webhooks").fetchall())
    assert raw[old_hook["id"]].startswith("tl1:k.k1:") and raw[new_hook["id"]].startswith("tl1:k.k2:")
    st.add_transcript("c1", "in", "new words")
    assert [t["text"] for t in st.transcript("c1")] == ["old words about a cleaning", "new words"]
    assert st.webhook(old_hook["id"])["secret"] == "old-secret-0123456789"
    assert st.transcript("legacy")[0]["text"] == "plain"         # rows from before sealing read as they are
    st.close()

    st = store_with("k2")                                        # k1 retired: what only it sealed is gone
    try:
        assert st.webhook(old_hook["id"])["secret"] is None
        assert st.webhook(new_hook["id"])["secret"] == "new-secret-0123456789"
        assert [t["text"] for t in st.transcript("c1")] == ["old words about a cleaning", "new words"]
        assert NUMBER_A in st.get_call("c1")["from_uri"]
        assert [r["text"] for r in CallRecords(str(data), name="turns.jsonl").read()] == ["old"]
    finally:
        st.close()
        cipher.reset()


def test_without_a_key_ring_a_local_key_is_made_or_refused(tmp_path):
    from bridge.core.config import ConfigError, load
    from bridge.records import cipher
    from bridge.records.store import Store
    data = tmp_path / "data"
    load(None, {"data_dir": str(data)}, environ={})
    st = Store(str(data))
    st.add_webhook("http://127.0.0.1:9/", ["*"], "a-secret-0123456789")
    st.close()
    key = data / "records.key"
    assert key.exists() and (key.stat().st_mode & 0o777) == 0o600
    assert b"a-secret" not in (data / "trunkline.db").read_bytes() + (data / "trunkline.db-wal").read_bytes()
    conf = tmp_path / "strict.toml"
    conf.write_text("[records]\nrequire_keys = true\n")
    with pytest.raises(ConfigError, match="require_keys"):
        load(str(conf), {"data_dir": str(data)}, environ={})
    cipher.reset()


@pytest.mark.slow
@pytest.mark.sample
def test_agent_call_leaves_no_spoken_words_or_number_in_clear(cell_factory, tmp_path):
    """A real conversation with the agent (real speech in, whisper, the LLM, piper out): the caller's words
    are in the transcript the API returns, and in no file under the data dir or in the cell's log."""
    from voice import Caller
    keys, ring = _keys_config(tmp_path, "k1")
    cell = cell_factory('[agent]\nsystem_prompt = "You are the receptionist of Acme Dental. Answer in one short '
                        'sentence."\nmax_reply_tokens = 30\n' + ring, args=("--app", "agent"))
    api = Api(cell, create_key(cell.data, "read"))
    caller = Caller(cell, tmp_path, scenario=_from(tmp_path, NUMBER_A, "wait_bye.xml"))
    try:
        caller.wait_reply(time.monotonic())
        end = caller.speak("I need a cleaning on Thursday with doctor Pemberton.")
        caller.wait_reply(end)
        caller.goodbye()
    finally:
        caller.close()
    ended = cell.wait_event("call_ended")[0]
    said = " ".join(t["text"] for t in api.get(f"/v1/calls/{ended['call_id']}/transcript")[1]["transcript"]
                    if t["direction"] == "in").lower()
    assert "cleaning" in said and "thursday" in said
    # (not "goodbye": it is also the call's end reason, metadata kept in clear)
    words = [w.encode() for w in ("cleaning", "thursday", "pemberton") if w in said]
    needles = [*words, NUMBER_A[1:].encode()]
    assert _found(cell, needles) == []
    assert cell.stop() == 0
    assert _found(cell, needles) == []


def test_a_late_record_of_an_old_call_keeps_its_callers_key(tmp_path):
    """The vault keeps the caller key of only its last calls (each held an AESGCM with ~2.5 KB of
    native state: 4096 of them were ~10 MB a cell). A record written for an older call (evicted)
    is still sealed with that call's caller key, found through the call's row, so erasing the
    caller still shreds it."""
    from bridge.core.config import load
    from bridge.records import cipher
    from bridge.records.store import Store
    data, conf = tmp_path / "data", tmp_path / "c.toml"
    cipher.reset()
    conf.write_text(_keys_config(tmp_path, "k1")[1])
    load(str(conf), {"data_dir": str(data)})
    st = Store(str(data))
    try:
        for i in range(300):
            number = NUMBER_A if i == 0 else f"+1555{i:07d}"
            st.upsert_call(st.stage_call({"id": f"c{i}", "direction": "inbound", "from_uri": f"sip:{number}@h",
                                          "to_uri": "sip:s@h"}))
        assert "c0" not in st.vault._calls                                     # evicted: bounded
        assert len(st.vault._calls) <= cipher._CALLS_KEPT
        st.add_transcript("c0", "in", "said after many other calls")
        raw = st.db.execute("SELECT text FROM transcripts WHERE call_id = 'c0'").fetchone()[0]
        assert raw.startswith("tl1:c."), raw                                  # the caller's key, not the ring's
        assert [t["text"] for t in st.transcript("c0")] == ["said after many other calls"]
        st.erase_caller(NUMBER_A, "test")
        assert st.transcript("c0") == [] or st.transcript("c0")[0]["text"] is None
        assert st.vault.open(raw) is None                                       # shredded with the caller
    finally:
        st.close()
        cipher.reset()
