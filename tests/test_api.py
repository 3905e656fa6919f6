"""The control API against a real cell: auth, validation, idempotency, events,
WebSocket resume, signed webhooks with retries and dead letters."""
import asyncio
import json
import threading
import time

import aiohttp
from aiohttp import web

from bridge.api.routes import ROUTES
from bridge.api.webhooks import verify_signature
from support import Api, create_key, sipp

ECHO = "[models]\nload = \"never\"\n[http]\nws_heartbeat = 1.0\noutbound_allow = [\"127.0.0.1/32\"]\n"   # loopback receivers


def test_auth_scopes_and_errors(cell_factory, tmp_path):
    cell = cell_factory(ECHO)
    control, read = create_key(cell.data, "control"), create_key(cell.data, "read")
    api = Api(cell, control)
    status, body, headers = api.get("/v1/calls", key="")
    assert status == 401 and body["error"]["code"] == "unauthorized" and headers["WWW-Authenticate"] == "Bearer"
    assert api.get("/v1/calls", key="tl_nope_nope")[0] == 401
    assert api.get("/v1/calls", key=read)[0] == 200
    status, body, _ = api.post("/v1/webhooks", {"url": "http://127.0.0.1:9/x"}, key=read)
    assert status == 403 and body["error"]["code"] == "forbidden"
    # bad JSON, unknown fields, wrong types, missing fields: 400 naming the field
    status, body, _ = api.call("POST", "/v1/calls", raw=b"{not json")
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body, _ = api.post("/v1/calls", {"to": "sip:a@127.0.0.1", "colour": "red"})
    assert status == 400 and body["error"] == {"code": "unknown_field", "field": "colour", "message": "unknown field"}
    status, body, _ = api.post("/v1/calls", {"to": 42})
    assert status == 400 and body["error"]["field"] == "to" and body["error"]["code"] == "wrong_type"
    status, body, _ = api.post("/v1/calls", {})
    assert status == 400 and body["error"]["code"] == "missing_field" and body["error"]["field"] == "to"
    status, body, _ = api.post("/v1/webhooks", {"url": "http://127.0.0.1:9/x", "topics": ["nonsense"]})
    assert status == 400 and body["error"]["field"] == "topics[0]"
    assert api.get("/v1/calls/nope")[0] == 404
    assert api.post("/v1/calls/nope/hangup")[0] == 404
    # revoke: the key stops working at once
    from support import ROOT
    import subprocess
    import sys
    kid = "key_" + read.split("_")[1]
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "keys", "revoke", kid, "--data-dir", str(cell.data)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0
    assert api.get("/v1/calls", key=read)[0] == 401
    listed = subprocess.run([sys.executable, "-m", "bridge.cli", "keys", "list", "--data-dir", str(cell.data)],
                            cwd=ROOT, capture_output=True, text=True).stdout
    assert kid in listed and "revoked" in listed and read not in listed and control not in listed


def test_openapi_spec_matches_routes(cell_factory):
    cell = cell_factory(ECHO)
    api = Api(cell, create_key(cell.data))
    status, spec, _ = api.get("/v1/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.0")
    from openapi_spec_validator import validate
    validate(spec)
    declared = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert {(r.method, r.path) for r in ROUTES} | {("GET", "/v1/ws")} == declared
    # every declared route answers (not 404/405) with a key
    for r in ROUTES:
        path = r.path.replace("{", "").replace("}", "")
        status, _, _ = api.call(r.method, path, {} if r.method in ("POST", "PUT") else None)
        assert status not in (404, 405) or (status == 404 and "{" in r.path), (r.method, r.path, status)


def test_idempotent_repeats(cell_factory):
    cell = cell_factory(ECHO)
    api = Api(cell, create_key(cell.data))
    hdr = {"Idempotency-Key": "abc-123"}
    s1, b1, _ = api.post("/v1/webhooks", {"url": "http://127.0.0.1:9/hook"}, headers=hdr)
    s2, b2, h2 = api.post("/v1/webhooks", {"url": "http://127.0.0.1:9/hook"}, headers=hdr)
    assert s1 == s2 == 201 and b1 == b2 and h2.get("Idempotent-Replayed") == "true"
    assert len(api.get("/v1/webhooks")[1]["webhooks"]) == 1
    s3, b3, _ = api.post("/v1/webhooks", {"url": "http://127.0.0.1:9/other"}, headers=hdr)
    assert s3 == 422 and b3["error"]["code"] == "idempotency_key_reused"


async def _ws_collect(url: str, key: str, msgs: list, stop: asyncio.Event, since: int | None = None,
                      topics=("*",), until_type: str | None = None):
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(url, headers={"Authorization": f"Bearer {key}"}) as ws:
            sub = {"type": "subscribe", "topics": list(topics)}
            if since is not None:
                sub["since"] = since
            await ws.send_json(sub)
            while not stop.is_set():
                try:
                    m = await asyncio.wait_for(ws.receive_json(), 0.5)
                except asyncio.TimeoutError:
                    continue
                msgs.append(m)
                if until_type and m.get("type") == "event" and m["event"]["type"] == until_type:
                    return


def test_call_events_on_the_websocket_with_resume(cell_factory, tmp_path):
    cell = cell_factory(ECHO)
    key = create_key(cell.data, "read")
    api = Api(cell, key)
    url = f"ws://127.0.0.1:{cell.ports['http']}/v1/ws"
    first: list = []

    async def scenario():
        stop = asyncio.Event()
        # first connection sees the call start, then drops before it ends
        task = asyncio.create_task(_ws_collect(url, key, first, stop, until_type="dtmf_received"))
        await asyncio.sleep(0.3)
        (tmp_path / "pcap").symlink_to("/usr/share/sip-tester")
        proc = await asyncio.create_subprocess_exec(
            "sipp", "-sn", "uac_pcap", cell.sip, "-i", "127.0.0.1", "-p", str(cell.ports["sipp"]), "-m", "1",
            "-mp", str(cell.ports["rtp_peer"]), "-timeout", "30s", "-nostdin", cwd=tmp_path,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        await asyncio.wait_for(task, 30)
        assert await proc.wait() == 0
        last_seen = max(m["event"]["seq"] for m in first if m["type"] == "event")
        # reconnect with the last seq seen: get exactly what was missed, then heartbeats
        second: list = []
        stop2 = asyncio.Event()
        t2 = asyncio.create_task(_ws_collect(url, key, second, stop2, since=last_seen))
        await asyncio.sleep(2.5)
        stop2.set()
        await t2
        return last_seen, second

    last_seen, second = asyncio.run(scenario())
    events_first = [m["event"] for m in first if m["type"] == "event"]
    types = [e["type"] for e in events_first]
    assert types[:2] == ["call_ringing", "call_progressing"] and "dtmf_received" in types
    call_id = events_first[0]["call_id"]
    assert [e["call_seq"] for e in events_first] == list(range(1, len(events_first) + 1))
    replayed = [m["event"] for m in second if m["type"] == "event"]
    assert replayed and replayed[0]["seq"] == last_seen + 1
    assert replayed[-1]["type"] == "call_hangup" and replayed[-1]["data"]["quality"]["mos"] > 4
    all_seqs = [e["seq"] for e in events_first + replayed]
    stored = [e["seq"] for e in api.get("/v1/events?since=0")[1]["events"]]
    assert all_seqs == stored                             # no gap, no duplicate
    assert any(m["type"] == "heartbeat" for m in second)
    status, call, _ = api.get(f"/v1/calls/{call_id}")
    assert call["state"] == "ended" and call["result"] == "answered" and call["codec"] == "PCMA"
    assert call["quality"]["rx_packets"] > 200


class Receiver:
    """A webhook receiver on loopback whose answers the test scripts."""

    def __init__(self, port: int, plan: dict):
        self.port, self.plan, self.got = port, plan, []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(5)

    def _run(self):
        asyncio.set_event_loop(self.loop)

        async def handle(request):
            body = await request.read()
            path = request.path
            self.got.append((path, dict(request.headers), body))
            answers = self.plan.get(path, [200])
            n = sum(1 for p, _, _ in self.got if p == path)
            return web.Response(status=answers[min(n, len(answers)) - 1])

        app = web.Application()
        app.router.add_post("/{name}", handle)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()


def test_webhooks_signed_retried_and_dead_lettered(cell_factory, tmp_path):
    cell = cell_factory(ECHO + "[webhooks]\nmax_attempts = 3\nbase_delay = 0.05\nretry_for = 0\n")
    api = Api(cell, create_key(cell.data))
    rx = Receiver(cell.ports["sip"] + 30, {"/flaky": [500, 200], "/down": [503], "/gone": [410]})
    hooks = {}
    for name in ("flaky", "down", "gone"):
        s, wh, _ = api.post("/v1/webhooks", {"url": f"http://127.0.0.1:{rx.port}/{name}",
                                             "topics": ["event:call_progressing"]})
        assert s == 201 and len(wh["secret"]) >= 32
        hooks[name] = wh
    res = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "200", local_port=cell.ports["sipp"])
    assert res.returncode == 0
    deadline = time.time() + 15
    while time.time() < deadline:
        d = api.get("/v1/webhook-deliveries")[1]["deliveries"]
        if sorted(x["status"] for x in d) == ["dead", "delivered", "failed"]:
            break
        time.sleep(0.2)
    by_hook = {x["webhook_id"]: x for x in d}
    assert by_hook[hooks["flaky"]["id"]]["status"] == "delivered" and by_hook[hooks["flaky"]["id"]]["attempts"] == 2
    assert by_hook[hooks["down"]["id"]]["status"] == "dead" and by_hook[hooks["down"]["id"]]["attempts"] == 3
    assert by_hook[hooks["gone"]["id"]]["status"] == "failed" and by_hook[hooks["gone"]["id"]]["attempts"] == 1
    # signatures verify with the helper, and only with the right secret
    path, headers, body = next(g for g in rx.got if g[0] == "/flaky")
    assert verify_signature(hooks["flaky"]["secret"], headers["Trunkline-Signature"], body)
    assert not verify_signature(hooks["down"]["secret"], headers["Trunkline-Signature"], body)
    assert not verify_signature(hooks["flaky"]["secret"], headers["Trunkline-Signature"], body + b" ")
    assert json.loads(body)["type"] == "call_progressing"
    # dead letters are listed and can be replayed once the receiver is back
    dead = api.get("/v1/webhook-deliveries?status=dead")[1]["deliveries"]
    assert [x["webhook_id"] for x in dead] == [hooks["down"]["id"]]
    rx.plan["/down"] = [200]
    rx.got = [g for g in rx.got if g[0] != "/down"]
    assert api.post(f"/v1/webhook-deliveries/{dead[0]['id']}/replay")[0] == 200
    deadline = time.time() + 10
    while time.time() < deadline and api.get("/v1/webhook-deliveries?status=dead")[1]["deliveries"]:
        time.sleep(0.1)
    assert not api.get("/v1/webhook-deliveries?status=dead")[1]["deliveries"]


def test_killed_cell_loses_no_acknowledged_event(cell_factory, tmp_path):
    cell = cell_factory(ECHO)
    key = create_key(cell.data, "read")
    got: list = []

    async def watch():
        stop = asyncio.Event()
        await asyncio.wait_for(_ws_collect(f"ws://127.0.0.1:{cell.ports['http']}/v1/ws", key, got, stop,
                                           until_type="call_progressing"), 20)
    t = threading.Thread(target=lambda: asyncio.run(watch()))
    t.start()
    time.sleep(0.5)
    call = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "10000", local_port=cell.ports["sipp"], background=True)
    t.join(25)
    seen = [m["event"] for m in got if m["type"] == "event"]
    assert [e["type"] for e in seen] == ["call_ringing", "call_progressing"]
    cell.proc.kill()                                 # SIGKILL mid-call
    cell.proc.wait(10)
    call.kill()
    again = cell_factory(ECHO, args=("--data-dir", str(cell.data)))
    api = Api(again, key)
    stored = api.get("/v1/events?since=0")[1]["events"]
    assert [e["id"] for e in stored][:2] == [e["id"] for e in seen]
    row = api.get(f"/v1/calls/{seen[0]['call_id']}")[1]
    assert row["state"] == "ended" and row["reason"] == "bridge restarted"
