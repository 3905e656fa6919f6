"""Bring your Twilio bot (issue 17): Twilio Media Streams on the wire, a number routed
straight to a bot, and the Twilio-style REST hang-up.

The conformance checks are written from Twilio's Media Streams message reference
(https://www.twilio.com/docs/voice/media-streams/websocket-messages): field names,
every number as a string, ``connected`` first and without a sequence number,
``start`` before any ``media``, ``sequenceNumber`` counting up by one. The same
checker runs on the pure messages, on a MediaStream driven by hand and on what a
bot (an aiohttp WebSocket server in this test) receives over a real call.
"""
import asyncio
import base64
import json
import math
import re
import struct
import threading
import time
import types
import urllib.request

import aiohttp
import numpy as np
import pytest

from bridge.api.streams import MediaStream
from bridge.api.twilio import basic_credentials, call_resource, key_token
from bridge.core import numbers as number_routes
from bridge.core.config import ConfigError, load
from bridge.core.metrics import Metrics
from media import g711
from media.callmedia import CallMedia
from media.twilio import TwilioWire, call_sid as twilio_call_sid
from support import Api, BoxProcess, RtpPeer, create_key, sipp
from test_streamcodec import voice_like
from test_streams import SILENCE, WsPeer, heard_loud, kill, peak_hz, ulaw_packets

SID = re.compile(r"^[A-Z]{2}[0-9a-f]{32}$")
DIGITS = re.compile(r"^[0-9]+$")
# Twilio's message reference, bridge -> bot: the fields of each message, nested
SHAPES = {
    "connected": {"event", "protocol", "version"},
    "start": {"event", "sequenceNumber", "start", "streamSid"},
    "media": {"event", "sequenceNumber", "media", "streamSid"},
    "dtmf": {"event", "streamSid", "sequenceNumber", "dtmf"},
    "mark": {"event", "sequenceNumber", "streamSid", "mark"},
    "stop": {"event", "sequenceNumber", "streamSid", "stop"},
}
INNER = {
    "start": {"accountSid", "streamSid", "callSid", "tracks", "customParameters", "mediaFormat"},
    "media": {"track", "chunk", "timestamp", "payload"},
    "dtmf": {"track", "digit"},
    "mark": {"name"},
    "stop": {"accountSid", "callSid"},
}


def check_twilio_messages(msgs: list[dict], first_seq: int = 1) -> dict:
    """Every rule of the reference on one connection's messages; returns the ``start``."""
    assert msgs, "no messages"
    assert msgs[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}, msgs[0]
    assert msgs[1]["event"] == "start", [m["event"] for m in msgs[:3]]
    start = msgs[1]
    sid = start["streamSid"]
    chunks: dict[str, int] = {}
    stamps: dict[str, int] = {}
    for i, m in enumerate(msgs[1:]):
        ev = m["event"]
        assert ev in SHAPES and ev != "connected", m
        assert set(m) == SHAPES[ev], (ev, sorted(m))
        assert set(m[ev]) == INNER[ev], (ev, sorted(m[ev]))
        assert isinstance(m["sequenceNumber"], str) and DIGITS.match(m["sequenceNumber"]), m["sequenceNumber"]
        assert int(m["sequenceNumber"]) == first_seq + i, (i, m["sequenceNumber"])
        assert m["streamSid"] == sid
        if ev == "media":
            md = m["media"]
            assert md["track"] in ("inbound", "outbound")
            for f in ("chunk", "timestamp", "payload"):
                assert isinstance(md[f], str), (f, md[f])
            assert DIGITS.match(md["chunk"]) and DIGITS.match(md["timestamp"])
            track = md["track"]
            assert int(md["chunk"]) == chunks.get(track, 0) + 1          # from 1, one by one
            chunks[track] = int(md["chunk"])
            assert int(md["timestamp"]) >= stamps.get(track, -1) + 1 or track not in stamps
            stamps[track] = int(md["timestamp"])
            assert len(base64.b64decode(md["payload"], validate=True)) == 160    # 20 ms of µ-law at 8 kHz
        elif ev == "dtmf":
            assert m["dtmf"]["track"] == "inbound_track" and re.match(r"^[0-9*#A-D]$", m["dtmf"]["digit"])
        elif ev == "mark":
            assert isinstance(m["mark"]["name"], str)
        elif ev == "stop":
            assert i == len(msgs) - 2, "stop is the last message"
            assert m["stop"] == {"accountSid": start["start"]["accountSid"], "callSid": start["start"]["callSid"]}
    s = start["start"]
    assert SID.match(sid) and sid.startswith("MZ") and s["streamSid"] == sid
    assert SID.match(s["accountSid"]) and s["accountSid"].startswith("AC")
    assert isinstance(s["callSid"], str) and s["callSid"]
    assert s["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    assert isinstance(s["tracks"], list) and set(s["tracks"]) <= {"inbound", "outbound"} and s["tracks"]
    assert isinstance(s["customParameters"], dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in s["customParameters"].items())
    return start


# ---- the pure messages ---------------------------------------------------------------------------
def test_twilio_wire_messages_follow_the_reference():
    wire = TwilioWire("MZ" + "a" * 32, "c0_0123", "AC" + "b" * 32, "both", {"lang": "en"})
    frame = bytes(160)
    msgs = [wire.connected(), wire.start(1), wire.media(2, "in", 0, frame), wire.media(3, "out", 0, frame),
            wire.media(4, "in", 20, frame), wire.dtmf(5, "7"), wire.mark(6, "intro"), wire.stop(7)]
    parsed = [json.loads(m) for m in msgs]
    start = check_twilio_messages(parsed)
    assert start["start"]["tracks"] == ["inbound", "outbound"] and start["start"]["customParameters"] == {"lang": "en"}
    assert [m["media"]["chunk"] for m in parsed if m["event"] == "media"] == ["1", "1", "2"]
    assert parsed[4]["media"]["timestamp"] == "20" and parsed[5]["dtmf"] == {"track": "inbound_track", "digit": "7"}
    assert TwilioWire("MZ" + "a" * 32, "c", "AC" + "b" * 32, "in").tracks == ["inbound"]
    # the checker is not a rubber stamp: each of these breaks one rule of the reference
    broken = [
        lambda p: p.pop(0),                                                  # no connected first
        lambda p: p[0].update(sequenceNumber="0"),                           # connected has no sequenceNumber
        lambda p: p.insert(1, p.pop(2)),                                     # media before start
        lambda p: p[2].update(sequenceNumber=2),                             # a number, not a string
        lambda p: p[2]["media"].update(chunk=1),
        lambda p: p[2]["media"].update(timestamp=0),
        lambda p: p[3].update(sequenceNumber="9"),                           # a gap
        lambda p: p[2]["media"].update(direction="in"),                      # a field Twilio does not send
        lambda p: p[4]["media"].update(chunk="3"),
        lambda p: p[1]["start"]["mediaFormat"].update(encoding="mulaw"),
        lambda p: p[5]["dtmf"].update(track="inbound"),
        lambda p: p[7]["stop"].update(callSid="other"),
    ]
    for n, breaker in enumerate(broken):
        p = [json.loads(m) for m in msgs]
        breaker(p)
        with pytest.raises(AssertionError):
            check_twilio_messages(p)
            print("not caught:", n)


class FakeWs:
    """What MediaStream._serve needs of a WebSocket; the bot's messages are scripted."""

    def __init__(self, script: list[dict]):
        self.sent: list[dict] = []
        self.script = script
        self.close_code = None
        self.done = asyncio.Event()

    def get_extra_info(self, name):
        return None

    async def send_str(self, text):
        self.sent.append(json.loads(text))

    async def close(self):
        self.close_code = 1000

    async def receive(self):
        if self.script:
            await asyncio.sleep(0.01)
            return types.SimpleNamespace(type=aiohttp.WSMsgType.TEXT, data=json.dumps(self.script.pop(0)))
        await self.done.wait()                       # then the peer goes away without a close frame
        return types.SimpleNamespace(type=aiohttp.WSMsgType.CLOSED, data=None)


def test_a_twilio_stream_driven_by_hand_speaks_the_protocol():
    """The real send/receive loops of MediaStream with protocol twilio, no socket: order, strings,
    marks, clear, dtmf, no error message for a bad one, stop last."""
    from test_streamcodec import CFG

    async def go():
        events = []
        manager = types.SimpleNamespace(cfg=CFG, metrics=Metrics(), ended=lambda st: None)
        media = CallMedia(16000)
        session = types.SimpleNamespace(call_id="c0_abc", media=media, services=types.SimpleNamespace(cell_id="0"),
                                        emit=lambda t, d: events.append((t, d)), remove_tap=lambda tap: None)
        st = MediaStream(manager, session, None, "in", "mulaw", True, "twilio", {"from": "100"}, None, bot=True)
        tone = g711.ulaw_encode((8000 * np.sin(2 * math.pi * 1000 * np.arange(800) / 8000)).astype("<i2").tobytes())
        ws = FakeWs([{"event": "media", "streamSid": "x", "media": {"payload": base64.b64encode(tone).decode()}},
                     {"event": "mark", "streamSid": "x", "mark": {"name": "a"}},
                     {"event": "dance"},                                   # Twilio answers nothing to this
                     {"event": "media", "media": {"payload": base64.b64encode(tone * 10).decode()}},
                     {"event": "mark", "mark": {"name": "b"}},
                     {"event": "clear", "streamSid": "x"}])
        task = asyncio.create_task(st._serve(ws))
        frame = bytes(640)
        for i in range(25):
            st.on_audio([(i * 0.02, frame)], [], i * 0.02)
            if i == 10:
                st.on_dtmf("5")
            await asyncio.sleep(0.02)
        st.stop("api")
        how, _ = await asyncio.wait_for(task, 5)
        return st, ws, how, events

    st, ws, how, events = asyncio.run(go())
    assert how == "stopped"
    msgs = ws.sent
    start = check_twilio_messages(msgs)
    assert start["start"]["callSid"] == twilio_call_sid("c0_abc") and SID.match(twilio_call_sid("c0_abc"))
    assert start["start"]["customParameters"] == {"from": "100"}
    assert start["start"]["tracks"] == ["inbound"]
    assert [m["dtmf"]["digit"] for m in msgs if m["event"] == "dtmf"] == ["5"]
    assert [m["mark"]["name"] for m in msgs if m["event"] == "mark"] == ["a", "b"]     # b: echoed by clear
    assert not any(m["event"] == "error" for m in msgs) and st.stats["client_errors"] == 1
    assert len([m for m in msgs if m["event"] == "media"]) == 25 and msgs[-1]["event"] == "stop"


def test_a_reconnected_twilio_stream_starts_again_and_keeps_counting():
    """After a lost connection the next one begins with connected and start again; sequenceNumber,
    chunk and timestamp go on from where they were (documented difference: Twilio never reconnects)."""
    from test_streamcodec import CFG

    async def go():
        manager = types.SimpleNamespace(cfg=CFG, metrics=Metrics(), ended=lambda st: None)
        session = types.SimpleNamespace(call_id="c0_abc", media=CallMedia(16000),
                                        services=types.SimpleNamespace(cell_id="0"),
                                        emit=lambda t, d: None, remove_tap=lambda tap: None)
        st = MediaStream(manager, session, None, "in", "mulaw", False, "twilio", {}, None)
        first, second = FakeWs([]), FakeWs([])
        task = asyncio.create_task(st._serve(first))
        for i in range(5):
            st.on_audio([(i * 0.02, bytes(640))], [], i * 0.02)
            await asyncio.sleep(0.02)
        first.done.set()                               # the peer goes away without a close
        how, _ = await asyncio.wait_for(task, 5)
        task = asyncio.create_task(st._serve(second))
        for i in range(5, 10):
            st.on_audio([(i * 0.02, bytes(640))], [], i * 0.02)
            await asyncio.sleep(0.02)
        st.stop("api")
        await asyncio.wait_for(task, 5)
        return how, first.sent, second.sent

    how, a, b = asyncio.run(go())
    assert how == "lost"
    check_twilio_messages(a)
    assert b[0]["event"] == "connected" and b[1]["event"] == "start"
    assert int(b[1]["sequenceNumber"]) == int(a[-1]["sequenceNumber"]) + 1
    assert b[1]["streamSid"] == a[1]["streamSid"]
    chunks = [int(m["media"]["chunk"]) for m in a + b if m["event"] == "media"]
    stamps = [int(m["media"]["timestamp"]) for m in a + b if m["event"] == "media"]
    assert chunks == list(range(1, 11)) and stamps == list(range(0, 200, 20))
    assert b[-1]["event"] == "stop"


# ---- number routes -------------------------------------------------------------------------------
def test_number_routes_parse_store_and_refuse(tmp_path):
    route = number_routes.check_route({"app": "stream", "url": "wss://bot.example/ws", "protocol": "twilio",
                                       "parameters": {"lang": "en"}})
    assert isinstance(route, number_routes.BotRoute) and route.protocol == "twilio"
    stored = number_routes.encode(route)
    assert number_routes.decode(stored) == route and number_routes.app_name(stored) == "stream"
    assert number_routes.view(stored) == {"app": "stream", "url": "wss://bot.example/ws", "protocol": "twilio",
                                          "parameters": {"lang": "en"}}
    assert number_routes.check_route("echo") == "echo" and number_routes.app_name("echo") == "echo"
    for bad in ("ivr", {"app": "echo"}, {"app": "stream"}, {"app": "stream", "url": "http://x/"},
                {"app": "stream", "url": "ws://x/", "protocol": "sip"},
                {"app": "stream", "url": "ws://x/", "protocol": "twilio", "encoding": "opus"},
                {"app": "stream", "url": "ws://x/", "parameters": {"a": 1}},
                {"app": "stream", "url": "ws://x/", "colour": "red"}, 5):
        with pytest.raises(ValueError):
            number_routes.check_route(bad)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[http]\noutbound_allow = ["127.0.0.1/32"]\n[numbers]\n"100" = { app = "stream", url = "ws://127.0.0.1:9/ws", protocol = "twilio", '
                   'parameters = { lang = "en" } }\n"200" = "echo"\n')
    c = load(str(cfg))
    assert not c.needs_models() and c.raw["numbers"]["200"] == "echo"
    cfg.write_text('[numbers]\n"100" = { app = "stream", url = "ws://x/", protocol = "carrier-pigeon" }\n')
    with pytest.raises(ConfigError, match="numbers.100: protocol"):
        load(str(cfg))
    cfg.write_text('[numbers]\n"100" = { app = "stream", url = "ws://169.254.169.254/bot" }\n')   # the SSRF guard
    with pytest.raises(ConfigError, match="numbers.100: url: .*refused"):
        load(str(cfg))


def test_a_trunkline_protocol_bot_gets_the_parameters_in_start():
    """A number routed to a bot speaking Trunkline's own protocol: the route's parameters are in
    ``start.parameters``; that protocol has no dtmf message (the digits are events)."""
    from test_streamcodec import CFG

    async def go():
        manager = types.SimpleNamespace(cfg=CFG, metrics=Metrics(), ended=lambda st: None)
        session = types.SimpleNamespace(call_id="c0_abc", media=CallMedia(16000),
                                        services=types.SimpleNamespace(cell_id="0"),
                                        emit=lambda t, d: None, remove_tap=lambda tap: None)
        st = MediaStream(manager, session, None, "in", "mulaw", True, "trunkline", {"from": "100"}, None, bot=True)
        ws = FakeWs([])
        task = asyncio.create_task(st._serve(ws))
        st.on_audio([(0.0, bytes(640))], [], 0.0)
        st.on_dtmf("5")
        await asyncio.sleep(0.05)
        st.stop("api")
        await asyncio.wait_for(task, 5)
        return st, ws.sent

    st, msgs = asyncio.run(go())
    assert [m["event"] for m in msgs] == ["start", "media", "stop"]
    assert msgs[0]["start"]["parameters"] == {"from": "100"} and msgs[0]["sequence_number"] == 1
    assert st.as_dict()["protocol"] == "trunkline" and "stream_sid" not in st.as_dict()


def test_basic_auth_maps_to_a_trunkline_key():
    hdr = "Basic " + base64.b64encode(b"ACxyz:tl_abc_s3cret").decode()
    assert basic_credentials(hdr) == ("ACxyz", "tl_abc_s3cret")
    assert basic_credentials("Bearer tl_abc_s3cret") is None and basic_credentials("Basic %%%") is None
    assert key_token("ACxyz", "tl_abc_s3cret", "ACxyz") == "tl_abc_s3cret"      # AccountSid + whole key
    assert key_token("key_abc", "tl_abc_s3cret", "ACxyz") == "tl_abc_s3cret"    # key id + whole key
    assert key_token("key_abc", "s3cret", "ACxyz") == "tl_abc_s3cret"           # key id + secret
    assert key_token("ACother", "tl_abc_s3cret", "ACxyz") is None               # not the path's account
    assert key_token("", "s3cret", "ACxyz") is None
    res = call_resource({"id": "c0_1", "state": "progressing", "direction": "inbound", "from_uri": "sip:a@b",
                         "to_uri": "sip:c@d", "created": 1.7e9, "answered": 1.7e9 + 1}, "ACxyz")
    sid = twilio_call_sid("c0_1")
    assert res["sid"] == sid and res["status"] == "in-progress" and res["account_sid"] == "ACxyz"
    assert res["uri"] == f"/2010-04-01/Accounts/ACxyz/Calls/{sid}.json" and res["date_created"].endswith("+0000")


# ---- a real call to a number routed to a bot ------------------------------------------------------
class Bot(WsPeer):
    """The bot: an aiohttp WebSocket server that records what the bridge sends and answers as a
    Twilio bot would (µ-law media in 20 ms chunks, marks, clear, the REST hang-up)."""

    def serve_free(self) -> "Bot":
        """Listen on a port the kernel picks (``self.port``): no clash with another suite's ports."""
        import socket
        from aiohttp import web
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]

        async def handler(request):
            ws = web.WebSocketResponse(max_msg_size=1 << 20)
            await ws.prepare(request)
            self.ws = ws
            self.connections += 1
            self.connected.set()
            await self._read(ws)
            return ws

        async def start():
            app = web.Application()
            app.router.add_get("/media", handler)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
        self._run(start())
        return self

    def play(self, pcm8k: bytes, mark: str | None = None) -> None:
        sid = self.start_msg()["streamSid"]
        ulaw = g711.ulaw_encode(pcm8k)
        for i in range(0, len(ulaw), 160):
            self.send({"event": "media", "streamSid": sid,
                       "media": {"payload": base64.b64encode(ulaw[i:i + 160]).decode()}})
        if mark:
            self.send({"event": "mark", "streamSid": sid, "mark": {"name": mark}})

    def start_msg(self) -> dict:
        return self.wait(lambda m: m["event"] == "start")[1]

    def events(self) -> list[dict]:
        return [m for _, m in self.messages]


def tone8k(hz: float, seconds: float, level: float = 8000) -> bytes:
    return (level * np.sin(2 * math.pi * hz * np.arange(int(8000 * seconds)) / 8000)).astype("<i2").tobytes()


def twilio_post(base: str, account: str, call_sid: str, user: str, password: str, form: dict):
    data = "&".join(f"{k}={v}" for k, v in form.items()).encode()
    req = urllib.request.Request(f"{base}/2010-04-01/Accounts/{account}/Calls/{call_sid}.json", data=data,
                                 method="POST", headers={
                                     "Content-Type": "application/x-www-form-urlencoded",
                                     "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def talk(peer: RtpPeer, packets: list[bytes], digit: int, stop: threading.Event) -> None:
    """The caller, paced at 20 ms: ``packets`` of speech, then one RFC 4733 telephone-event for
    ``digit`` (100 ms, end packet sent three times), then silence until ``stop``; what comes back
    is collected all along."""
    frames = [("audio", p) for p in packets] + [("dtmf", i) for i in range(1, 6)]
    start, i = time.monotonic(), 0
    while not stop.is_set():
        kind, item = frames[i] if i < len(frames) else ("audio", SILENCE)
        if kind == "audio":
            peer.send(item, marker=(i == 0))
        else:
            last = item == 5
            for _ in range(3 if last else 1):
                peer.send(struct.pack("!BBH", digit, (0x80 if last else 0) | 10, 160 * item), pt=101,
                          marker=(item == 1), ts_step=0)
            if last:
                peer.ts += 800
        i += 1
        while time.monotonic() < start + i * 0.02:
            peer._recv_once()


def bot_config(port: int, extra: str = "") -> str:
    return ('[models]\nload = "never"\n[http]\noutbound_allow = ["127.0.0.1/32"]\n[numbers]\n'
            f'"service" = {{ app = "stream", url = "ws://127.0.0.1:{port}/media", protocol = "twilio", '
            'parameters = { greeting = "hello there", lang = "en" } }\n' + extra)


def test_a_number_routed_to_a_twilio_bot(cell_factory, tmp_path):
    """SIPp calls the number; the bridge answers and connects to the bot; the caller's audio reaches
    the bot, the bot's tone reaches the caller, marks and clear behave, a DTMF digit arrives (real,
    while events mask it), and the bot ends the call with the Twilio REST route."""
    bot = Bot().serve_free()
    cell = cell_factory(bot_config(bot.port))
    key = create_key(cell.data)
    read_key = create_key(cell.data, "read")
    api = Api(cell, key)
    base = f"http://127.0.0.1:{cell.ports['http']}"
    peer = RtpPeer(cell.ports["rtp_peer"])
    proc = sipp("wait_bye.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"], rtpport=cell.ports["rtp_peer"],
                background=True, timeout=40)
    stop = threading.Event()
    talker = None
    try:
        peer.wait_remote()
        assert bot.connected.wait(5)
        start = bot.start_msg()["start"]
        call_sid, account = start["callSid"], start["accountSid"]
        params = start["customParameters"]
        assert params["greeting"] == "hello there" and params["lang"] == "en"
        assert params["to"] == "service" and params["from"] == "sipp" and params["direction"] == "inbound"
        call_id = params["call_id"]                 # the Trunkline call id; callSid is Twilio-shaped
        assert call_sid == twilio_call_sid(call_id) and SID.match(call_sid) and params["api_base"] == base
        call = api.get(f"/v1/calls/{call_id}")[1]
        assert call["app"] == "stream" and call["state"] == "progressing"

        # the caller talks for 1.5 s (it reaches the bot), presses 5, then stays on the line
        sent = voice_like(8000, 1.5, seed=5)
        talker = threading.Thread(target=talk, args=(peer, [SILENCE] * 10 + ulaw_packets(sent), 5, stop),
                                  daemon=True)
        talker.start()
        bot.wait(lambda m: m["event"] == "dtmf", 5)

        # 1 s of 1 kHz from the bot, then a mark: echoed once played; the caller heard the tone
        t_send = time.monotonic()
        bot.play(tone8k(1000, 1.0), mark="greeting")
        t_mark, _ = bot.wait(lambda m: m["event"] == "mark" and m["mark"]["name"] == "greeting", 5)
        time.sleep(0.2)
        assert 0.85 < t_mark - t_send < 1.6, t_mark - t_send
        loud = heard_loud(peer, t_send, t_mark + 0.2)
        assert 45 <= len(loud) <= 57, len(loud)
        heard = np.frombuffer(b"".join(g711.ulaw_decode(p) for t, pt, _, p in peer.received
                                       if pt == 0 and loud[0] <= t <= loud[-1]), "<i2")
        assert abs(peak_hz(heard, 8000) - 1000) < 20

        # 5 s queued, clear after 0.5 s: the line goes quiet, the pending mark comes back at once
        bot.play(tone8k(600, 5.0), mark="long")
        time.sleep(0.6)
        t_clear = time.monotonic()
        bot.send({"event": "clear", "streamSid": bot.start_msg()["streamSid"]})
        t_cleared, _ = bot.wait(lambda m: m["event"] == "mark" and m["mark"]["name"] == "long", 2)
        assert t_cleared - t_clear < 0.3
        time.sleep(0.5)
        assert len(heard_loud(peer, t_clear - 0.4, t_clear)) >= 15
        after = heard_loud(peer, t_clear, t_clear + 0.5)
        assert not after or after[-1] - t_clear < 0.12, after[-1] - t_clear

        # the REST route: Twilio's errors first, then the hang-up
        st, err = twilio_post(base, account, call_sid, account, "tl_nope_nope", {"Status": "completed"})
        assert st == 401 and err == {"code": 20003, "message": "Authenticate",
                                     "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401}
        assert twilio_post(base, account, call_sid, account, read_key, {"Status": "completed"})[0] == 403
        st, err = twilio_post(base, account, "c0_nosuchcall", account, key, {"Status": "completed"})
        assert st == 404 and err["code"] == 20404 and err["status"] == 404 and "more_info" in err
        st, err = twilio_post(base, account, call_sid, account, key, {"Status": "ringing"})
        assert st == 400 and set(err) == {"code", "message", "more_info", "status"}
        assert api.get(f"/v1/calls/{call_id}")[1]["state"] == "progressing"        # none of those ended it
        req = urllib.request.Request(f"{base}/2010-04-01/Accounts/{account}/Calls/{call_sid}.json", headers={
            "Authorization": "Basic " + base64.b64encode(f"{account}:{read_key}".encode()).decode()})
        with urllib.request.urlopen(req, timeout=10) as r:                    # fetch: a read key will do
            fetched = json.loads(r.read())
        assert fetched["sid"] == call_sid and fetched["status"] == "in-progress" and fetched["direction"] == "inbound"
        st, res = twilio_post(base, account, call_sid, account, key, {"Status": "completed"})
        assert st == 200 and res["sid"] == call_sid and res["status"] == "completed", res
        assert res["account_sid"] == account and res["from"] and res["to"]
        bot.wait(lambda m: m["event"] == "stop", 5)
        out, _ = proc.communicate(timeout=20)                   # SIPp got the BYE and answered it
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
        # an ended call answers 200 completed: a bot's hang-up racing the caller's is no error
        kid = "key_" + key.split("_")[1]
        st, res = twilio_post(base, account, call_sid, kid, key.split("_", 2)[2], {"Status": "completed"})
        assert st == 200 and res["status"] == "completed"
    finally:
        stop.set()
        if talker is not None:
            talker.join(5)
        bot.close()
        peer.close()
        kill(proc)
    msgs = bot.events()
    check_twilio_messages(msgs)
    inbound = [m for m in msgs if m["event"] == "media"]
    got = np.frombuffer(b"".join(g711.ulaw_decode(base64.b64decode(m["media"]["payload"])) for m in inbound), "<i2")
    ref = np.frombuffer(g711.ulaw_decode(b"".join(ulaw_packets(sent))), "<i2")
    from test_streams import aligned_block_corr
    corr = aligned_block_corr(ref, got)
    assert np.median(corr) > 0.9, corr                         # the caller's voice reached the bot
    assert [m["dtmf"]["digit"] for m in msgs if m["event"] == "dtmf"] == ["5"]   # the real digit, for the bot
    ended = cell.wait_event("call_ended")[0]
    assert ended["reason"] == "api hangup" and ended["dtmf"] == "X"            # logs still mask it
    events = [(e["type"], e["data"]) for e in api.get("/v1/events?since=0")[1]["events"] if e["call_id"] == call_id]
    types_ = [t for t, _ in events]
    assert types_.index("stream_started") < types_.index("stream_stopped") < types_.index("call_hangup")
    assert [d["digit"] for t, d in events if t == "dtmf_received"] == ["X"]


def test_the_bot_closing_its_socket_ends_the_call(cell_factory, tmp_path):
    """The bot closes with 1000 after a second: the call ends (BYE to the caller). A number can also
    be pointed at a bot with PUT /v1/numbers; an address outside http.outbound_allow is refused."""
    bot = Bot().serve_free()
    cell = cell_factory('[models]\nload = "never"\n[http]\noutbound_allow = ["127.0.0.1/32"]\n')
    api = Api(cell, create_key(cell.data))
    route = {"app": "stream", "url": f"ws://127.0.0.1:{bot.port}/media", "protocol": "twilio",
             "parameters": {"tenant": "t1"}}
    st, body, _ = api.call("PUT", "/v1/numbers/service", route)
    assert st == 200 and body == {"number": "service", **route}, body
    assert api.get("/v1/numbers")[1]["numbers"]["service"] == route
    st, body, _ = api.call("PUT", "/v1/numbers/evil", {**route, "url": "ws://169.254.169.254/x"})
    assert st == 400 and body["error"]["code"] == "refused_address"
    st, body, _ = api.call("PUT", "/v1/numbers/bad", {"app": "echo", "url": "ws://127.0.0.1:9/"})
    assert st == 400 and body["error"]["field"] == "url"
    assert api.call("PUT", "/v1/numbers/plain", {"app": "echo"})[1] == {"number": "plain", "app": "echo"}
    t0 = time.monotonic()
    proc = sipp("wait_bye.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"], background=True, timeout=30)
    try:
        assert bot.connected.wait(10)
        assert bot.start_msg()["start"]["customParameters"]["tenant"] == "t1"
        time.sleep(1.0)
        bot.close_ws()
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
        assert time.monotonic() - t0 < 10
    finally:
        bot.close()
        kill(proc)
    ended = cell.wait_event("call_ended")[0]
    assert ended["reason"] == "bot stream consumer_closed", ended
    call_id = ended["call_id"]
    streams = api.get(f"/v1/calls/{call_id}/streams")[1]["streams"]
    assert streams[0]["protocol"] == "twilio" and streams[0]["reason"] == "consumer_closed"


def test_an_api_stream_speaks_twilio_and_the_rest_route_ends_an_api_call(cell_factory, tmp_path):
    """POST /v1/calls/{id}/streams with protocol twilio on an api-app call: both tracks, the
    digit only as events show it ([pii] show_dtmf here), and the Twilio REST route ends the call."""
    bot = Bot().serve_free()
    cell = cell_factory('[models]\nload = "never"\n[numbers]\n"service" = "api"\n[pii]\nshow_dtmf = true\n'
                        '[http]\noutbound_allow = ["127.0.0.1/32"]\n')
    key = create_key(cell.data)
    api = Api(cell, key)
    peer = RtpPeer(cell.ports["rtp_peer"])
    proc = sipp("wait_bye.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"], rtpport=cell.ports["rtp_peer"],
                background=True, timeout=30)
    stop = threading.Event()
    talker = None
    try:
        peer.wait_remote()
        deadline = time.monotonic() + 5
        calls = []
        while not calls and time.monotonic() < deadline:
            calls = [c for c in api.get("/v1/calls?state=active")[1]["calls"] if c["state"] == "progressing"]
            time.sleep(0.05)
        call_id = calls[0]["id"]
        url = f"ws://127.0.0.1:{bot.port}/media"
        st, body, _ = api.post(f"/v1/calls/{call_id}/streams", {"url": url, "protocol": "twilio", "encoding": "pcm16"})
        assert st == 400 and body["error"]["field"] == "encoding"
        st, body, _ = api.post(f"/v1/calls/{call_id}/streams", {"url": url, "protocol": "twilio", "direction": "both"})
        assert st == 201 and body["protocol"] == "twilio" and SID.match(body["stream_sid"]), body
        start = bot.start_msg()
        assert start["start"]["tracks"] == ["inbound", "outbound"] and start["start"]["customParameters"] == {}
        assert start["streamSid"] == body["stream_sid"] and start["start"]["callSid"] == twilio_call_sid(call_id)
        talker = threading.Thread(target=talk, args=(peer, [SILENCE] * 25, 7, stop), daemon=True)
        talker.start()
        bot.wait(lambda m: m["event"] == "dtmf", 5)
        bot.wait(lambda m: m["event"] == "media" and m["media"]["track"] == "outbound", 5)
        base = f"http://127.0.0.1:{cell.ports['http']}"
        account = start["start"]["accountSid"]
        st, res = twilio_post(base, account, start["start"]["callSid"], account, key, {"Status": "completed"})
        assert st == 200 and res["status"] == "completed"
        bot.wait(lambda m: m["event"] == "stop", 5)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    finally:
        stop.set()
        if talker is not None:
            talker.join(5)
        bot.close()
        peer.close()
        kill(proc)
    msgs = bot.events()
    check_twilio_messages(msgs)
    assert [m["dtmf"]["digit"] for m in msgs if m["event"] == "dtmf"] == ["7"]
    assert {m["media"]["track"] for m in msgs if m["event"] == "media"} == {"inbound", "outbound"}
    assert cell.wait_event("call_ended")[0]["reason"] == "api hangup"


def test_a_box_routes_a_number_to_a_bot_and_hangs_up_the_twilio_way(tmp_path):
    """Two cells behind Kamailio: the number is routed with the box's API, the call lands on a
    cell, the bot gets it, and the REST hang-up sent to the box ends it on that cell."""
    bot = Bot().serve_free()
    box = BoxProcess(tmp_path, 2, '[models]\nload = "never"\n[http]\noutbound_allow = ["127.0.0.1/32"]\n')
    proc = None
    try:
        box.start()
        key = create_key(box.data)
        api = Api(box, key)
        route = {"app": "stream", "url": f"ws://127.0.0.1:{bot.port}/media", "protocol": "twilio"}
        assert api.call("PUT", "/v1/numbers/service", route)[0] == 200
        proc = sipp("wait_bye.xml", box.sip, tmp_path, local_port=box.ports["sipp"], background=True, timeout=30)
        assert bot.connected.wait(10)
        start = bot.start_msg()["start"]
        bot.wait(lambda m: m["event"] == "media", 5)
        base = f"http://127.0.0.1:{box.ports['http']}"
        st, res = twilio_post(base, start["accountSid"], start["callSid"], start["accountSid"], key,
                              {"Status": "completed"})
        assert st == 200 and res["status"] == "completed" and res["sid"] == start["callSid"], res
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
        bot.wait(lambda m: m["event"] == "stop", 5)
        check_twilio_messages(bot.events())
    finally:
        bot.close()
        kill(proc)
        box.stop()


# ---- a real Pipecat pipeline: stock TwilioFrameSerializer, stock WebSocket server transport ------
class PipecatBot:
    """A Pipecat pipeline in a thread of its own: it listens to the caller, answers with a
    1 kHz tone, starts a long 600 Hz tone, interrupts it (Pipecat sends ``clear``), then ends
    the pipeline, and the stock serializer's auto hang-up calls the Twilio REST route."""

    def __init__(self, port: int, auth_token: str):
        self.port, self.auth_token = port, auth_token
        self.heard = bytearray()            # the caller's audio as the pipeline got it (16 kHz)
        self.digits: list[str] = []
        self.start: dict | None = None
        self.spoke_at = self.interrupted_at = self.ended_at = None
        self.ready = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.loop = asyncio.new_event_loop()
        self.task = None
        threading.Thread(target=self._run, daemon=True).start()
        if not self.ready.wait(20):
            raise AssertionError(f"the Pipecat bot did not start: {self.error!r}")

    def _run(self):
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.ready.set()
        finally:
            self.done.set()

    async def _main(self):
        from pipecat.frames.frames import (EndWorkerFrame, InputAudioRawFrame, InputDTMFFrame,
                                           OutputAudioRawFrame)
        from pipecat.pipeline.pipeline import Pipeline
        from pipecat.pipeline.worker import PipelineParams, PipelineWorker
        from pipecat.workers.runner import WorkerRunner
        from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
        from pipecat.serializers.base_serializer import FrameSerializer
        from pipecat.serializers.twilio import TwilioFrameSerializer
        from pipecat.transports.websocket.server import (SingleClientWebsocketServerParams,
                                                         SingleClientWebsocketServerTransport)
        bot = self

        class TwilioHandshake(FrameSerializer):
            """What Pipecat's runner does for Twilio (read ``start``, build the stock serializer
            with the call's sids) done inside the transport; every other message, both ways, goes
            through the stock TwilioFrameSerializer."""

            def __init__(self):
                super().__init__()
                self.inner = None
                self._setup = None

            async def setup(self, setup):
                self._setup = setup

            async def deserialize(self, data):
                m = json.loads(data)
                if m.get("event") == "start":
                    bot.start = s = m["start"]
                    self.inner = TwilioFrameSerializer(
                        stream_sid=s["streamSid"], call_sid=s["callSid"], account_sid=s["accountSid"],
                        auth_token=bot.auth_token, base_url=s["customParameters"]["api_base"])
                    await self.inner.setup(self._setup)
                    return None
                return await self.inner.deserialize(data) if self.inner is not None else None

            async def serialize(self, frame):
                return await self.inner.serialize(frame) if self.inner is not None else None

        def tone16k(hz: float, seconds: float) -> bytes:
            n = int(16000 * seconds)
            return (8000 * np.sin(2 * math.pi * hz * np.arange(n) / 16000)).astype("<i2").tobytes()

        class ToneBot(FrameProcessor):
            def __init__(self):
                super().__init__()
                self.loud = 0
                self.speaking = False

            async def process_frame(self, frame, direction):
                await super().process_frame(frame, direction)
                if isinstance(frame, InputAudioRawFrame):
                    bot.heard += frame.audio
                    x = np.frombuffer(frame.audio, "<i2").astype(float)
                    self.loud += frame.num_frames if np.sqrt((x ** 2).mean()) > 500 else 0
                    if self.loud > 0.8 * frame.sample_rate and not self.speaking:
                        self.speaking = True
                        self.create_task(self.speak())
                    return
                if isinstance(frame, InputDTMFFrame):
                    bot.digits.append(frame.button.value)
                    return
                await self.push_frame(frame, direction)

            async def speak(self):
                bot.spoke_at = time.monotonic()
                await self.push_frame(OutputAudioRawFrame(tone16k(1000, 1.0), 16000, 1))
                await self.push_frame(OutputAudioRawFrame(tone16k(600, 4.0), 16000, 1))
                await asyncio.sleep(2.0)
                bot.interrupted_at = time.monotonic()
                await self.broadcast_interruption()          # the stock serializer sends "clear"
                await asyncio.sleep(1.0)
                bot.ended_at = time.monotonic()
                await self.push_frame(EndWorkerFrame(), FrameDirection.UPSTREAM)   # auto hang-up

        transport = SingleClientWebsocketServerTransport(
            params=SingleClientWebsocketServerParams(audio_in_enabled=True, audio_out_enabled=True,
                                                     add_wav_header=False, serializer=TwilioHandshake()),
            host="127.0.0.1", port=self.port)

        @transport.event_handler("on_websocket_ready")
        async def ready(_transport):
            bot.ready.set()

        self.task = PipelineWorker(Pipeline([transport.input(), ToneBot(), transport.output()]),
                                   params=PipelineParams(audio_in_sample_rate=16000, audio_out_sample_rate=16000))
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(self.task)
        await runner.run()

    def stop(self):
        if not self.done.is_set() and self.task is not None:
            asyncio.run_coroutine_threadsafe(self.task.cancel(), self.loop)
        self.done.wait(10)


@pytest.mark.slow
@pytest.mark.sample
def test_a_pipecat_bot_answers_a_number(cell_factory, tmp_path):
    """A real Pipecat pipeline (PyPI pipecat-ai, stock TwilioFrameSerializer and WebSocket server
    transport) behind a number: the caller's speech reaches it, its tone reaches the caller, its
    interruption (clear) silences the line, and its end hangs up through the Twilio REST route."""
    pytest.importorskip("pipecat.serializers.twilio", reason="pipecat-ai[websocket] (the test extra) is not installed")
    from media.resample import resample
    import socket
    from test_streams import aligned_block_corr
    with socket.socket() as s:                      # a port the kernel picks, for Pipecat to listen on
        s.bind(("127.0.0.1", 0))
        bot_port = s.getsockname()[1]
    cell = cell_factory(bot_config(bot_port).replace("/media", "/"))
    key = create_key(cell.data)
    bot = PipecatBot(bot_port, key)
    peer = RtpPeer(cell.ports["rtp_peer"])
    stop = threading.Event()
    talker = None
    proc = sipp("wait_bye.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"], rtpport=cell.ports["rtp_peer"],
                background=True, timeout=40)
    try:
        peer.wait_remote()
        sent = voice_like(8000, 1.5, seed=7)
        talker = threading.Thread(target=talk, args=(peer, [SILENCE] * 10 + ulaw_packets(sent), 5, stop),
                                  daemon=True)
        talker.start()
        out, _ = proc.communicate(timeout=30)        # the pipeline's end hangs the call up
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
        stop.set()
        talker.join(5)
    finally:
        stop.set()
        bot.stop()
        peer.close()
        kill(proc)
    assert bot.error is None, bot.error
    assert bot.start is not None and bot.spoke_at and bot.interrupted_at and bot.ended_at
    ended = cell.wait_event("call_ended")[0]
    assert ended["reason"] == "api hangup", ended             # the serializer's auto hang-up, not a BYE
    assert twilio_call_sid(ended["call_id"]) == bot.start["callSid"]
    # the caller's voice reached the pipeline
    got = np.frombuffer(resample(bytes(bot.heard), 16000, 8000), "<i2")
    ref = np.frombuffer(g711.ulaw_decode(b"".join(ulaw_packets(sent))), "<i2")
    corr = aligned_block_corr(ref, got)
    assert np.median(corr) > 0.8, corr
    assert bot.digits == ["5"]
    # the caller heard the 1 kHz answer, then the 600 Hz tone until the interruption, then quiet
    loud = heard_loud(peer, bot.spoke_at, bot.interrupted_at)
    assert len(loud) >= 80, len(loud)
    first = np.frombuffer(b"".join(g711.ulaw_decode(p) for t, pt, _, p in peer.received
                                   if pt == 0 and loud[0] <= t <= loud[0] + 0.8), "<i2")
    assert abs(peak_hz(first, 8000) - 1000) < 20
    after = heard_loud(peer, bot.interrupted_at, bot.ended_at)
    print(f"pipecat: answered {loud[0] - bot.spoke_at:.3f} s after it spoke; last loud packet "
          f"{(after[-1] - bot.interrupted_at) if after else 0:.3f} s after the interruption")
    assert not after or after[-1] - bot.interrupted_at < 0.15, after[-1] - bot.interrupted_at
