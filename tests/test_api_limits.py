"""Limits on what a remote party can send or grow, against real cells (loopback only):
malformed and deeply nested JSON, body size, the per-key rate limit, topic caps, the
paginated event replay, stream marks; file permissions; secrets kept out of errors;
DTMF masking; tool path arguments."""
import asyncio
import base64
import json
import os
import sqlite3
import stat
import threading
import time
import urllib.request

import aiohttp
import pytest

from bridge.agent.tools.template import UnsafeValue, render_url
from bridge.api.base import RateLimiter, json_too_deep, parse_json, ApiError
from bridge.api.webhooks import sign, verify_signature
from bridge.core import pii
from bridge.core.keys import KeyRingError, parse_keys
from support import Api, create_key

NEVER = '[models]\nload = "never"\n'
DEEP = "[" * 5000 + "]" * 5000


def _raw_post(cell, path: str, body: bytes, key: str | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{cell.ports['http']}{path}", data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"{}"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


# -- JSON ---------------------------------------------------------------------------------------
def test_json_depth_and_size_checks_unit():
    assert json_too_deep(DEEP) and not json_too_deep("[" * 32 + "]" * 32)
    assert not json_too_deep('["' + "[" * 100 + '"]')               # brackets in a string do not count
    for raw in (DEEP, b"{", b"\xff\xfe", b'{"a": ' + b"1" * 5000 + b"}"):
        with pytest.raises(ApiError) as e:
            parse_json(raw)
        assert e.value.status == 400 and e.value.code == "invalid_json"


def test_malformed_or_deep_json_is_a_400_on_every_route(cell_factory):
    cell = cell_factory(NEVER)
    key = create_key(cell.data)
    for path, k in (("/v1/webhooks", key), ("/v1/calls", key), ("/v1/numbers/123", key),
                    ("/v1/calls/c1/tool-results/tc1?sig=x", None)):          # the unauthenticated callback
        for body in (DEEP.encode(), b'{"a": [1, 2', b"\xff"):
            if path.startswith("/v1/numbers"):
                req = urllib.request.Request(f"http://127.0.0.1:{cell.ports['http']}{path}", data=body,
                                             method="PUT", headers={"Authorization": f"Bearer {key}"})
                try:
                    urllib.request.urlopen(req, timeout=10)
                    status, out = 200, {}
                except urllib.error.HTTPError as e:
                    status, out = e.code, json.loads(e.read())
            else:
                status, out, _ = _raw_post(cell, path, body, k)
            assert status == 400 and out["error"]["code"] == "invalid_json", (path, body[:10], status, out)
    status, out, _ = _raw_post(cell, "/v1/webhooks", b'{"url": "' + b"x" * (2 << 20) + b'"}', key)
    assert status == 413 and out["error"]["code"] == "too_large"

    async def ws():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"ws://127.0.0.1:{cell.ports['http']}/v1/ws?token={key}") as w:
                await w.send_str('{"type": "subscribe", "topics": ' + "[" * 3000 + "]" * 3000 + "}")
                err = await w.receive_json(timeout=5)
                assert err["type"] == "error" and err["code"] == "invalid_message"
                await w.send_json({"type": "ping"})                  # the connection lives on
                assert (await w.receive_json(timeout=5))["type"] == "pong"
    asyncio.run(ws())


# -- rate limit ---------------------------------------------------------------------------------
def test_rate_limiter_unit():
    now = [0.0]
    rl = RateLimiter(2.0, 3, clock=lambda: now[0])
    assert [rl.take("k") for _ in range(3)] == [0, 0, 0]
    assert rl.take("k") == pytest.approx(0.5)
    assert rl.take("other") == 0
    now[0] += 0.5
    assert rl.take("k") == 0
    assert RateLimiter(0, 1).take("k") == 0                            # 0 turns it off


def test_per_key_rate_limit_answers_429_with_retry_after(cell_factory):
    cell = cell_factory(NEVER + "[http]\nrate_limit = 1\nrate_burst = 5\n")
    a, b = Api(cell, create_key(cell.data)), Api(cell, create_key(cell.data, "read"))
    statuses = [a.get("/v1/calls")[0] for _ in range(8)]
    assert statuses[:5] == [200] * 5 and 429 in statuses[5:]
    status, body, headers = a.get("/v1/calls")
    assert status == 429 and body["error"]["code"] == "rate_limited"
    assert int(headers["Retry-After"]) >= 1
    assert b.get("/v1/calls")[0] == 200                               # another key has its own bucket
    assert cell.metrics()['trunkline_api_limited_total{limit="api_rate"}'] >= 1
    time.sleep(1.1)
    assert a.get("/v1/calls")[0] == 200


# -- topic caps and the paginated replay ---------------------------------------------------------------
def test_topic_lists_are_capped(cell_factory):
    cell = cell_factory(NEVER + '[http]\noutbound_allow = ["127.0.0.1/32"]\n')
    key = create_key(cell.data)
    api = Api(cell, key)
    many = [f"call:c{i}" for i in range(51)]
    status, body, _ = api.post("/v1/webhooks", {"url": "http://127.0.0.1:9/x", "topics": many})
    assert status == 400 and body["error"]["field"] == "topics"
    assert api.post("/v1/webhooks", {"url": "http://127.0.0.1:9/x", "topics": many[:50]})[0] == 201

    async def ws():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"ws://127.0.0.1:{cell.ports['http']}/v1/ws?token={key}") as w:
                await w.send_json({"type": "subscribe", "topics": many[:30]})
                assert (await w.receive_json(timeout=5))["type"] == "subscribed"
                await w.send_json({"type": "subscribe", "topics": many[30:]})      # 51 in all
                err = await w.receive_json(timeout=5)
                assert err["type"] == "error" and err["code"] == "too_many_topics"
    asyncio.run(ws())


def _insert_events(db_path, n: int) -> None:
    db = sqlite3.connect(db_path, timeout=15)
    now = time.time()
    db.executemany("INSERT INTO events (id, type, call_id, at, data) VALUES (?, 'call_ringing', ?, ?, ?)",
                   [(f"ev_{i}", f"c{i % 7}", now, json.dumps({"call_seq": i, "data": {"n": i}})) for i in range(n)])
    db.commit()
    db.close()


def test_event_replay_is_paginated_and_keeps_the_loop_free(cell_factory, tmp_path):
    """A subscribe with since=0 over 60k stored events: every event once, in order, while the
    cell's event loop (the one that runs the 20 ms media tick) keeps answering /healthz."""
    from bridge.records.store import Store
    n = 60000
    Store(str(tmp_path / "data")).close()                 # stored before the cell starts: history, not news
    _insert_events(tmp_path / "data" / "trunkline.db", n)
    cell = cell_factory(NEVER)
    key = create_key(cell.data)
    stalls = []
    stop = threading.Event()

    def probe():
        url = f"http://127.0.0.1:{cell.ports['http']}/healthz"
        while not stop.is_set():
            t = time.monotonic()
            try:
                urllib.request.urlopen(url, timeout=10).read()
            except urllib.error.HTTPError:
                pass
            stalls.append(time.monotonic() - t)
            time.sleep(0.01)

    async def ws():
        got = []
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"ws://127.0.0.1:{cell.ports['http']}/v1/ws?token={key}",
                                    max_msg_size=0) as w:
                await w.send_json({"type": "subscribe", "topics": ["*"], "since": 0})
                while True:
                    m = await w.receive_json(timeout=60)
                    if m["type"] == "event":
                        got.append(m["event"]["seq"])
                    elif m["type"] == "subscribed":
                        return got
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    try:
        got = asyncio.run(ws())
    finally:
        stop.set()
        t.join(15)
    assert len(got) == n and got == sorted(set(got))
    assert stalls and max(stalls) < 0.25, f"/healthz waited {max(stalls):.3f} s during the replay"


# -- stream marks ----------------------------------------------------------------------------------
def test_stream_marks_are_bounded(cell_factory, tmp_path):
    from test_streams import API_CALLS, finish_call, kill, start_call
    cell = cell_factory(API_CALLS)
    peer, proc, api, call_id = start_call(cell, tmp_path, 4.0)
    try:
        status, st, _ = api.post(f"/v1/calls/{call_id}/streams", {"bidirectional": True, "encoding": "mulaw"})
        assert status == 201

        async def client():
            errors = []
            async with aiohttp.ClientSession() as s:
                async with s.ws_connect(f"ws://127.0.0.1:{cell.ports['http']}{st['ws_path']}?token={api.key}") as w:
                    # 10 s of audio queued, then 150 marks that wait for it to play
                    audio = base64.b64encode(bytes([0xFF]) * 160 * 500).decode()
                    await w.send_json({"event": "media", "media": {"payload": audio}})
                    for i in range(150):
                        await w.send_json({"event": "mark", "mark": {"name": f"m{i}"}})
                    deadline = time.monotonic() + 3
                    while time.monotonic() < deadline:
                        try:
                            m = await w.receive_json(timeout=0.5)
                        except asyncio.TimeoutError:
                            break
                        if m["event"] == "error":
                            errors.append(m["error"]["code"] if isinstance(m.get("error"), dict) else m)
            return errors
        errors = asyncio.run(client())
        # 100 wait for their audio; the other 50 are refused, each with an error frame unless 20 are
        # already waiting to be sent (error frames are bounded too)
        assert 20 <= errors.count("too_many_marks") <= 50
        assert cell.metrics()['trunkline_api_limited_total{limit="stream_marks"}'] == 50
        finish_call(proc, peer)
    finally:
        kill(proc)


# -- permissions --------------------------------------------------------------------------------
def test_data_dir_and_files_are_private(cell_factory, tmp_path):
    old = tmp_path / "data"                       # the cell's data dir, as an older version left it
    old.mkdir(mode=0o755)
    os.chmod(old, 0o755)
    (old / "calls.jsonl").write_text("")
    os.chmod(old / "calls.jsonl", 0o644)
    cell = cell_factory(NEVER)
    assert cell.data == old
    create_key(cell.data)
    for p in [old, *old.rglob("*")]:
        mode = stat.S_IMODE(os.lstat(p).st_mode)
        assert mode & 0o077 == 0, f"{p} is {oct(mode)}"
    assert stat.S_IMODE(os.stat(old / "trunkline.db").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o700


def test_systemd_units_set_umask():
    from support import ROOT
    for unit in (ROOT / "deploy" / "systemd").glob("*.service"):
        assert "\nUMask=0077\n" in unit.read_text(), unit


# -- secrets never in errors ---------------------------------------------------------------------
def test_malformed_key_entry_is_not_echoed():
    material = base64.b64encode(os.urandom(32)).decode()
    for text, env in ((material, True), (f"good:{material} {material}", True), (material, False),
                      (f"{material}:{material}", True)):
        with pytest.raises(KeyRingError) as e:
            parse_keys(text, "TRUNKLINE_RECORDING_KEYS", env=env)
        assert material not in str(e.value) and material[:12] not in str(e.value)


def test_verify_signature_returns_false_on_odd_input():
    body = b'{"a":1}'
    now = 1_700_000_000
    good = sign("s3cret-s3cret-s3cret", now, body)
    assert verify_signature("s3cret-s3cret-s3cret", good, body, now=now)
    arabic_digits = "\u0660" * 64
    odd = [None, b"t=1,v1=00", 12, "", ",,,", "t=", "t=1e3,v1=00", f"t={now},v1=\u00e9\u00e9",
           f"t={now},v1={arabic_digits}", "t=" + "9" * 400 + ",v1=00", "t=\u0661\u0662,v1=00", "v1",
           "t=1=2,v1=00", "x" * 100000]
    for header in odd:
        assert verify_signature("s3cret-s3cret-s3cret", header, body, now=now) is False, header
    assert verify_signature(None, good, body, now=now) is False
    assert verify_signature("s3cret-s3cret-s3cret", good, None, now=now) is False


def test_dtmf_digits_masked_unless_the_operator_opts_in():
    try:
        pii.configure()
        assert pii.dtmf("5") == "X"
        pii.configure(show_dtmf=True)
        assert pii.dtmf("5") == "5" and pii.dtmf("5", paused=True) == "X"
    finally:
        pii.configure()


# -- tool path arguments ------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["..", ".", "%2e%2e", "%2E%2e", ".%2e", "%252e%252e"])
def test_tool_path_argument_cannot_climb(value):
    with pytest.raises(UnsafeValue):
        render_url("https://billing.example.com/v1/customers/{args.id}/invoices", {"args": {"id": value}})


def test_tool_path_arguments_that_are_not_dot_segments_pass():
    for v, seg in (("a.b", "a.b"), ("...", "..."), ("../x", "..%2Fx"), ("x/..", "x%2F..")):
        assert render_url("https://h/v1/{args.id}/x", {"args": {"id": v}}) == f"https://h/v1/{seg}/x"


# -- the say queue --------------------------------------------------------------------------------
def test_say_queue_is_bounded(tmp_path):
    """POST .../say on a speaking session that already holds MAX_SAY_QUEUED texts is a 429
    (the speaking session stands in for a live call's: synthesis needs the models)."""
    from bridge.api.events import Tailer
    from bridge.api.routes import MAX_SAY_QUEUED, Api as RoutesApi
    from bridge.api.services import Services
    from bridge.api.webhooks import WebhookDispatcher
    from bridge.core.config import load
    from bridge.core.metrics import Metrics
    from bridge.core.states import SpeakingState
    from bridge.records.store import Store

    class Queue:
        status = SpeakingState.ACTIVE

        def __init__(self):
            self.texts = []

        def say(self, text):
            self.texts.append(text)

        def as_dict(self):
            return {"id": "sp_1", "status": self.status, "queued": len(self.texts)}

    class Request:
        match_info = {"speaking_id": "sp_1"}

    cfg = load(None, {"data_dir": str(tmp_path)}, environ={})
    store, metrics = Store(str(tmp_path)), Metrics()
    api = RoutesApi(Services(cfg, store, metrics, Tailer(store), WebhookDispatcher(store, metrics)))
    sp = api.speakings["sp_1"] = Queue()

    async def run():
        for _ in range(MAX_SAY_QUEUED):
            assert (await api.say(Request(), {"text": "hello"}))[0] == 202
        with pytest.raises(ApiError) as e:
            await api.say(Request(), {"text": "one too many"})
        return e.value
    err = asyncio.run(run())
    store.close()
    assert err.status == 429 and err.code == "queue_full" and err.headers["Retry-After"] == "1"
    assert len(sp.texts) == MAX_SAY_QUEUED
    assert metrics.api_limited.labels("say_queue")._value.get() == 1


def test_unsigned_tool_callback_is_refused_before_its_body_is_read(cell_factory):
    """The tool-callback route has no key: a stranger's body must cost nothing on the loop
    that runs the media tick. A bad signature is a 404 before any JSON is parsed (a deep body
    would otherwise be a 400), and no JSON body over 64 KiB is parsed anywhere (413)."""
    tool = ('[http]\noutbound_allow = ["127.0.0.1/32"]\n[[tool]]\nname = "t"\ndescription = "d"\n'
            'url = "http://127.0.0.1:9/x"\n')
    cell = cell_factory(NEVER + tool)
    status, out, _ = _raw_post(cell, "/v1/calls/c1/tool-results/tc1?sig=forged", DEEP.encode(), None)
    assert status == 404 and out["error"]["code"] == "not_found", (status, out)
    key = create_key(cell.data)
    status, out, _ = _raw_post(cell, "/v1/webhooks", b'{"url": "' + b"x" * (70 << 10) + b'"}', key)
    assert status == 413 and out["error"]["code"] == "too_large", (status, out)
