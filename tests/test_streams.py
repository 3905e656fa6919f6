"""Media streams against a real cell: a SIPp call with our own RTP endpoint on
127.0.0.1, the stream's other end a WebSocket in this test (or a sink process
we can stop and kill). What the caller sends must come out of the stream in
order at 50 frames/s; what the stream sends back must reach the caller."""
import asyncio
import base64
import json
import math
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from media import g711
from media.opus import OpusDecoder
from media.resample import resample
from support import ROOT, Api, RtpPeer, create_key, sipp
from test_streamcodec import voice_like

API_CALLS = ('[models]\nload = "never"\n[numbers]\n"service" = "api"\n'   # SIPp dials sip:service@...
             '[http]\noutbound_allow = ["127.0.0.1/32"]\n')                # the test's consumers are on loopback
SILENCE = bytes([0xFF]) * 160


class WsPeer:
    """One WebSocket end on a loop in a background thread: a server the bridge
    connects to, or a client connecting to the bridge. Records every message."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.messages: list[tuple[float, dict]] = []
        self.ws = None
        self.connections = 0
        self.connected = threading.Event()
        self._runner = None
        self._http = None

    def _run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _read(self, ws):
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.messages.append((time.monotonic(), json.loads(msg.data)))

    def serve(self, port: int) -> "WsPeer":
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
            await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self._run(start())
        return self

    def connect(self, url: str, key: str) -> int:
        """The HTTP status of the upgrade (101 when connected)."""
        async def go():
            self._http = self._http or aiohttp.ClientSession()
            try:
                ws = await self._http.ws_connect(url, headers={"Authorization": f"Bearer {key}"})
            except aiohttp.WSServerHandshakeError as e:
                return e.status
            self.ws = ws
            self.connected.set()
            self.loop.create_task(self._read(ws))
            return 101
        return self._run(go())

    def send(self, msg) -> None:
        self._run(self.ws.send_str(msg if isinstance(msg, str) else json.dumps(msg)))

    def close_ws(self) -> None:
        self._run(self.ws.close())

    def wait(self, pred, timeout: float = 10.0) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, m in list(self.messages):
                if pred(m):
                    return t, m
            time.sleep(0.01)
        raise AssertionError(f"no such message in {timeout}s; last: {[m['event'] for _, m in self.messages[-5:]]}")

    def media(self, direction: str) -> list[tuple[float, dict]]:
        return [(t, m) for t, m in self.messages if m["event"] == "media" and m["media"]["direction"] == direction]

    def close(self) -> None:
        async def stop():
            if self.ws is not None and not self.ws.closed:
                await self.ws.close()
            if self._http is not None:
                await self._http.close()
            if self._runner is not None:
                await self._runner.cleanup()
        try:
            self._run(stop(), 5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


def start_call(cell, tmp_path, seconds: float):
    peer = RtpPeer(cell.ports["rtp_peer"])
    proc = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", str(int(seconds * 1000)), local_port=cell.ports["sipp"],
                rtpport=cell.ports["rtp_peer"], background=True, timeout=seconds + 20)
    try:
        peer.wait_remote()
        api = Api(cell, create_key(cell.data))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            calls = api.get("/v1/calls?state=active")[1]["calls"]
            if calls and calls[0]["state"] == "progressing":
                return peer, proc, api, calls[0]["id"]
            time.sleep(0.05)
        raise AssertionError("the call was not answered")
    except BaseException:
        kill(proc)
        peer.close()
        raise


def kill(proc) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(5)


def finish_call(proc, peer):
    out, _ = proc.communicate(timeout=40)
    peer.close()
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]


def ulaw_packets(sig8k: np.ndarray) -> list[bytes]:
    raw = sig8k.tobytes()
    return [g711.ulaw_encode(raw[i:i + 320]) for i in range(0, len(raw) - 319, 320)]


def wire_pcm(encoding: str, msgs: list[dict]) -> np.ndarray:
    """The stream's frames decoded, at 8 kHz."""
    payloads = [base64.b64decode(m["media"]["payload"]) for m in msgs]
    if encoding == "mulaw":
        return np.frombuffer(b"".join(g711.ulaw_decode(p) for p in payloads), "<i2")
    if encoding == "opus":
        dec = OpusDecoder(16000)
        payloads = [dec.decode(p) for p in payloads]
    return np.frombuffer(resample(b"".join(payloads), 16000, 8000), "<i2")


def aligned_block_corr(ref: np.ndarray, got: np.ndarray, block: int = 1600, slack: int = 400) -> np.ndarray:
    """Find where ``ref`` sits in ``got`` (FFT cross-correlation), then the normalized
    correlation of each 200 ms block, each allowed to slip up to 50 ms from its neighbour: the
    jitter buffer may drop or add a 20 ms frame when the machine stalls, and every later block
    moves with it (a CI run saw the last 40 % of the blocks one frame off with a 5 ms slack; a
    run sharing 2 cores with another test worker saw the first half of an Opus stream more than
    50 ms off the rest, the buffer having grown and then shrunk). So the search follows the
    slips outward from the block that matches best at the overall lag, one block at a time."""
    ref, got = ref.astype(float), got.astype(float)
    n = 1 << int(math.ceil(math.log2(ref.size + got.size)))
    xc = np.fft.irfft(np.fft.rfft(got, n) * np.conj(np.fft.rfft(ref, n)), n)
    lag = int(np.argmax(xc[:max(1, got.size - ref.size + 1)]))
    starts = list(range(0, ref.size - block + 1, block))

    def best_at(start: int, center: int) -> tuple[float, int]:
        a = ref[start:start + block]
        best, where = 0.0, center
        for d in range(-slack, slack + 1, 2):
            s = center + start + d
            if 0 <= s and s + block <= got.size:
                b = got[s:s + block]
                c = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
                if c > best:
                    best, where = c, center + d
        return best, where

    at_lag = [best_at(s, lag) for s in starts]
    if not at_lag:
        return np.array([])
    k = int(np.argmax([c for c, _ in at_lag]))
    out: dict[int, float] = {k: at_lag[k][0]}
    for step in (1, -1):                        # outward from block k, each centred on its neighbour
        center = at_lag[k][1]
        for i in range(k + step, len(starts) if step > 0 else -1, step):
            out[i], center = best_at(starts[i], center)
    return np.array([out[i] for i in range(len(starts))])


def envelope(x: np.ndarray, n: int = 160) -> np.ndarray:
    x = x[:x.size // n * n].astype(float).reshape(-1, n)
    return np.sqrt((x ** 2).mean(axis=1))


def heard_loud(peer, start: float, end: float, level: float = 1000) -> list[float]:
    """Arrival times of the packets the caller got in [start, end) that were not quiet."""
    out = []
    for t, pt, _, p in peer.received:
        if pt == 0 and start <= t < end:
            x = np.frombuffer(g711.ulaw_decode(p), "<i2").astype(float)
            if np.sqrt((x ** 2).mean()) > level:
                out.append(t)
    return out


def peak_hz(pcm: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(float) * np.hanning(pcm.size)))
    return float(np.argmax(spectrum) * rate / pcm.size)


def event_types(api, call_id: str) -> list[tuple[str, dict]]:
    return [(e["type"], e["data"]) for e in api.get("/v1/events?since=0")[1]["events"] if e["call_id"] == call_id]


# ---- the caller's audio out, in order, in each encoding -------------------------------------------
@pytest.mark.parametrize("encoding", ["mulaw", "pcm16", "opus"])
def test_outbound_stream_carries_the_callers_audio(cell_factory, tmp_path, encoding):
    cell = cell_factory(API_CALLS)
    server = WsPeer().serve(cell.ports["sip"] + 6)
    peer, proc, api, call_id = start_call(cell, tmp_path, 5.5)
    try:
        status, st, _ = api.post(f"/v1/calls/{call_id}/streams", {
            "url": f"ws://127.0.0.1:{cell.ports['sip'] + 6}/media", "direction": "both", "encoding": encoding})
        assert status == 201, st
        assert st["status"] == "connecting" and st["sample_rate"] == {"mulaw": 8000}.get(encoding, 16000)
        assert server.connected.wait(5)
        sent = voice_like(8000, 3.6, seed=11)
        packets = ulaw_packets(sent)
        peer.stream([SILENCE] * 25 + packets)
        finish_call(proc, peer)
        server.wait(lambda m: m["event"] == "stop", 10)
        final = api.get(f"/v1/calls/{call_id}/streams/{st['id']}")[1]
    finally:
        server.close()
        kill(proc)
    msgs = [m for _, m in server.messages]
    assert msgs[0]["event"] == "start" and msgs[-1]["event"] == "stop"
    assert msgs[0]["start"]["media_format"] == {"encoding": encoding, "sample_rate": st["sample_rate"],
                                                "channels": 1, "frame_ms": 20,
                                                "frame_samples": st["sample_rate"] // 50}
    assert msgs[-1]["stop"]["reason"] == "call_ended"
    assert [m["sequence_number"] for m in msgs] == list(range(1, len(msgs) + 1))
    assert {m["call_id"] for m in msgs} == {call_id} and {m["stream_id"] for m in msgs} == {st["id"]}
    for direction in ("in", "out"):
        frames = server.media(direction)
        ts = np.array([m["media"]["timestamp"] for _, m in frames])
        steps = np.diff(ts)
        assert steps.min() >= 20 and np.mean(steps == 20) > 0.98, np.unique(steps, return_counts=True)
        # ~50 frames a second as they arrive (the first second may include buffered frames)
        arrivals = np.array([t for t, _ in frames])
        steady = arrivals[(arrivals > arrivals[0] + 1.0) & (arrivals < arrivals[-1] - 0.5)]
        rate = (steady.size - 1) / (steady[-1] - steady[0])
        assert 45 <= rate <= 55, rate
        sizes = {len(base64.b64decode(m["media"]["payload"])) for _, m in frames}
        assert sizes == {"mulaw": {160}, "pcm16": {640}}[encoding] if encoding != "opus" else max(sizes) < 200
    assert len(server.media("in")) >= 4.5 * 50
    assert final["status"] == "stopped" and final["reason"] == "call_ended"
    assert final["stats"]["frames_dropped"] == 0
    assert final["stats"]["frames_sent"] == len(server.media("in")) + len(server.media("out"))
    # decoding the "in" leg gives back what the caller sent (the wire went PCMU -> 16 kHz bridge -> encoding)
    ref = np.frombuffer(g711.ulaw_decode(b"".join(packets)), "<i2")
    got = wire_pcm(encoding, [m for _, m in server.media("in")])
    corr = aligned_block_corr(ref, got)
    assert np.median(corr) > (0.75 if encoding == "opus" else 0.95), corr
    assert np.mean(corr > 0.5) > 0.9, corr
    lag = int(np.argmax(np.correlate(envelope(got), envelope(ref), "valid")))
    env_corr = np.corrcoef(envelope(ref), envelope(got)[lag:lag + envelope(ref).size])[0, 1]
    print(f"{encoding}: block correlation median {np.median(corr):.3f} min {corr.min():.3f}, "
          f"envelope {env_corr:.3f}, frames in {len(server.media('in'))}")
    assert env_corr > 0.95, env_corr
    # the "out" leg is what the caller heard: nothing is playing on this API call
    assert np.abs(wire_pcm(encoding, [m for _, m in server.media("out")])).max() < 200
    types = [t for t, _ in event_types(api, call_id)]
    assert types.index("stream_started") < types.index("stream_stopped") < types.index("call_hangup")
    m = cell.metrics()
    assert m[f'trunkline_stream_frames_sent_total{{encoding="{encoding}"}}'] == final["stats"]["frames_sent"]
    assert m["trunkline_streams_active"] == 0


# ---- a client connects in, plays audio, marks and clears ------------------------------------------
def test_inbound_client_plays_into_the_call_with_marks_and_clear(cell_factory, tmp_path):
    cell = cell_factory(API_CALLS)
    read_key = create_key(cell.data, "read")
    peer, proc, api, call_id = start_call(cell, tmp_path, 9.0)
    talker = threading.Thread(target=peer.stream, args=([SILENCE] * 400,), daemon=True)   # 8 s of RTP
    talker.start()
    client = WsPeer()
    try:
        base = f"/v1/calls/{call_id}/streams"
        assert api.post(base, {"encoding": "gsm"})[1]["error"]["field"] == "encoding"
        assert api.post(base, {"url": "http://127.0.0.1:9/"})[1]["error"]["field"] == "url"
        assert api.post("/v1/calls/nope/streams", {})[0] == 404
        status, st, _ = api.post(base, {"direction": "both", "encoding": "pcm16", "bidirectional": True})
        assert status == 201 and st["status"] == "waiting" and st["ws_path"] == f"{base}/{st['id']}/ws"
        assert api.post(base, {"bidirectional": True})[1]["error"]["code"] == "wrong_state"   # one plays at a time
        url = f"ws://127.0.0.1:{cell.ports['http']}{st['ws_path']}"
        assert client.connect(url, "tl_bad_key") == 401
        assert client.connect(url, read_key) == 403            # playing into a call needs a control key
        assert client.connect(url.replace(st["id"], "st_c0_0000"), api.key) == 404
        assert client.connect(url, api.key) == 101
        client.wait(lambda m: m["event"] == "start")
        assert api.get(f"{base}/{st['id']}")[1]["status"] == "streaming"

        # 1 s of a 1 kHz tone in odd-sized chunks, then a mark: echoed once it has been played
        tone = (8000 * np.sin(2 * math.pi * 1000 * np.arange(16000) / 16000)).astype("<i2").tobytes()
        t_send = time.monotonic()
        for a, b in ((0, 6002), (6002, 20000), (20000, 32000)):
            client.send({"event": "media", "media": {"payload": base64.b64encode(tone[a:b]).decode()}})
        client.send({"event": "mark", "mark": {"name": "greeting"}})
        t_mark, mark = client.wait(lambda m: m["event"] == "mark", 5)
        assert mark["mark"] == {"name": "greeting", "cleared": False}
        assert 0.9 < t_mark - t_send < 1.5, t_mark - t_send
        time.sleep(0.2)
        loud = heard_loud(peer, t_send, t_mark + 0.2)
        assert 45 <= len(loud) <= 56, len(loud)                  # the caller heard ~1 s of it
        heard = np.frombuffer(b"".join(g711.ulaw_decode(p) for t, pt, _, p in peer.received
                                       if pt == 0 and loud[0] <= t <= loud[-1]), "<i2")
        assert abs(peak_hz(heard, 8000) - 1000) < 20
        # and the stream's "out" leg is what the caller heard: the same tone
        out = [m for _, m in client.media("out")]
        out_pcm = np.frombuffer(b"".join(base64.b64decode(m["media"]["payload"]) for m in out), "<i2")
        assert np.sum(envelope(out_pcm, 320) > 3000) >= 45 and abs(peak_hz(out_pcm, 16000) - 1000) < 20

        # bad messages: an error each, the stream goes on
        for bad in ("not json", {"event": "dance"}, {"event": "media", "media": {"payload": "%%%"}}):
            client.send(bad)
        client.wait(lambda m: m["event"] == "error" and m["error"]["code"] == "invalid_payload", 5)
        assert [m["error"]["code"] for _, m in client.messages if m["event"] == "error"] == [
            "invalid_json", "unknown_event", "invalid_payload"]

        # 5 s queued, clear after 0.5 s: silence within ~100 ms, the mark comes back as cleared
        client.send({"event": "media", "media": {"payload": base64.b64encode(tone * 5).decode()}})
        client.send({"event": "mark", "mark": {"name": "long"}})
        time.sleep(0.6)
        t_clear = time.monotonic()
        client.send({"event": "clear"})
        t_cleared, cleared = client.wait(lambda m: m["event"] == "mark" and m["mark"]["name"] == "long", 2)
        assert cleared["mark"]["cleared"] is True and t_cleared - t_clear < 0.3
        time.sleep(0.5)
        before = heard_loud(peer, t_clear - 0.4, t_clear)
        after = heard_loud(peer, t_clear, t_clear + 0.5)
        assert len(before) >= 15, "the long audio was not playing before the clear"
        print(f"mark after {t_mark - t_send:.3f} s for 1 s of audio; {len(loud)} loud packets heard; "
              f"last loud packet {after[-1] - t_clear if after else 0:.3f} s after clear")
        assert not after or after[-1] - t_clear < 0.12, after[-1] - t_clear
        client.close_ws()                                        # a normal close ends the stream
        deadline = time.monotonic() + 5
        while api.get(f"{base}/{st['id']}")[1]["status"] != "stopped" and time.monotonic() < deadline:
            time.sleep(0.05)
        final = api.get(f"{base}/{st['id']}")[1]
        assert final["reason"] == "client_closed"
        assert final["stats"]["client_errors"] == 3 and final["stats"]["marks"] == 2
        assert final["stats"]["frames_received"] == 50 + 250
        talker.join(15)
        finish_call(proc, peer)
    finally:
        client.close()
        kill(proc)
    assert cell.metrics()["trunkline_stream_client_errors_total"] == 3
    ended = cell.wait_event("call_ended")[0]
    assert ended["reason"] == "remote bye" and ended["result"] == "answered"


def test_stream_api_refusals(cell_factory, tmp_path):
    """Echo calls can be streamed but not played into; limits per call; stop is final."""
    cell = cell_factory('[models]\nload = "never"\n[streams]\nmax_per_call = 2\n'
                        '[http]\noutbound_allow = ["127.0.0.1/32"]\n')
    peer, proc, api, call_id = start_call(cell, tmp_path, 3.0)
    try:
        base = f"/v1/calls/{call_id}/streams"
        status, body, _ = api.post(base, {"bidirectional": True})
        assert status == 409 and body["error"]["code"] == "wrong_app"
        ids = [api.post(base, {"encoding": e})[1]["id"] for e in ("mulaw", "opus")]
        status, body, _ = api.post(base, {})
        assert status == 409 and body["error"]["code"] == "too_many_streams"
        status, body, _ = api.post(f"{base}/{ids[0]}/stop")
        assert status == 200 and body["status"] == "stopped" and body["reason"] == "api"
        assert api.post(f"{base}/{ids[0]}/stop")[0] == 409
        assert api.post(base, {})[0] == 201                       # a stopped stream frees its place
        assert len(api.get(base)[1]["streams"]) == 3
        assert api.get(f"/v1/calls/other/streams/{ids[1]}")[0] == 404
        read = Api(cell, create_key(cell.data, "read"))
        assert read.post(base, {})[0] == 403 and read.get(base)[0] == 200
        # a consumer that refuses the handshake (404 here) is not asked again
        server = WsPeer().serve(cell.ports["sip"] + 6)
        try:
            assert api.post(f"{base}/{ids[1]}/stop")[0] == 200
            status, st, _ = api.post(base, {"url": f"ws://127.0.0.1:{cell.ports['sip'] + 6}/nope"})
            assert status == 201
            deadline = time.monotonic() + 5
            while api.get(f"{base}/{st['id']}")[1]["status"] != "failed" and time.monotonic() < deadline:
                time.sleep(0.05)
            failed = api.get(f"{base}/{st['id']}")[1]
            assert failed["reason"] == "rejected" and "404" in failed["detail"] and failed["stats"]["reconnects"] == 0
        finally:
            server.close()
        finish_call(proc, peer)
    finally:
        kill(proc)
    types = [t for t, d in event_types(api, call_id)]
    assert types.count("stream_stopped") == 3 and types.count("stream_failed") == 1
    assert "stream_started" not in types                                             # nobody ever connected
    assert types.index("call_hangup") == len(types) - 1


# ---- a stalled, then killed consumer: drops and reconnects, never the call's timing ----------------
def _sink(port: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "ws_sink.py"), str(port), "--rcvbuf", "4096"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert p.stdout.readline().strip() == b"ready"
    return p


def _sink_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.loads(r.read())


def _wait_status(api, path: str, want: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = api.get(path)[1]
        if st["status"] == want:
            return st
        time.sleep(0.05)
    raise AssertionError(f"stream never became {want}: {st}")


@pytest.mark.slow
@pytest.mark.sample
def test_stalled_and_killed_consumer_never_touch_the_call(cell_factory, tmp_path):
    cell = cell_factory(API_CALLS + "[streams]\nsend_timeout = 1.0\nconnect_timeout = 1.0\nreconnect_attempts = 8\n"
                        "reconnect_base_delay = 0.2\nreconnect_max_delay = 0.5\nbuffer_frames = 50\n")
    port = cell.ports["sip"] + 6
    sink = _sink(port)
    proc = None
    try:
        peer, proc, api, call_id = start_call(cell, tmp_path, 14.0)
        talker = threading.Thread(target=peer.stream, args=(ulaw_packets(voice_like(8000, 13.0)),), daemon=True)
        talker.start()
        status, st, _ = api.post(f"/v1/calls/{call_id}/streams", {"url": f"ws://127.0.0.1:{port}/x",
                                                                "direction": "both", "encoding": "pcm16"})
        assert status == 201
        path = f"/v1/calls/{call_id}/streams/{st['id']}"
        _wait_status(api, path, "streaming", 5)
        time.sleep(1.5)
        assert _sink_stats(port)[st["id"]]["media"] > 100
        t_stall = time.monotonic()
        sink.send_signal(signal.SIGSTOP)                             # stalled: its TCP window fills up
        stalled = _wait_status(api, path, "reconnecting", 10)
        stall_detected = time.monotonic() - t_stall
        assert stall_detected < 8 and stalled["stats"]["reconnects"] >= 1
        time.sleep(1.5)                                              # still not taking frames: the oldest go
        assert api.get(path)[1]["stats"]["frames_dropped"] > 50
        sink.kill()                                                  # killed; a new consumer comes up
        sink.wait(5)
        sink = _sink(port)
        back = _wait_status(api, path, "streaming", 5)
        assert back["stats"]["connections"] == 2
        time.sleep(1.0)
        again = _sink_stats(port)[st["id"]]
        assert again["events"]["start"] == 1 and again["media"] > 80
        sink.kill()                                                  # killed for good
        sink.wait(5)
        failed = _wait_status(api, path, "failed", 10)
        assert failed["reason"] == "reconnect_exhausted"
        talker.join(20)
        rtp = np.array([t for t, pt, _, _ in peer.received if pt == 0 and t_stall - 1 < t < t_stall + 6])
        finish_call(proc, peer)
    finally:
        kill(sink)
        kill(proc)
    print(f"stall detected after {stall_detected:.2f} s; stats {failed['stats']}")
    # the call: unaffected
    ended = cell.wait_event("call_ended")[0]
    assert ended["reason"] == "remote bye" and 49 <= ended["frame_rate"] <= 51
    # One or two clock intervals over 40 ms in a 14 s call are also seen on this shared 2-core
    # machine under load in calls with no stream fault at all (2 in a full run beside other
    # benchmarks); a consumer holding up the call stalls the clock for the whole stall (seconds:
    # dozens of gaps), which the caller's own RTP below shows too.
    assert ended["frame_gaps"] <= 3 and ended["frame_p99_ms"] < 30
    gaps = np.diff(rtp)
    assert 45 <= 1 / np.median(gaps) <= 55 and gaps.max() < 0.06          # what the caller got, during it all
    m = cell.metrics()
    assert m.get('trunkline_media_frames_dropped_total{direction="uplink"}', 0) == 0     # the tick kept up
    assert m['trunkline_stream_frames_dropped_total{encoding="pcm16"}'] == failed["stats"]["frames_dropped"] > 0
    assert m["trunkline_stream_reconnects_total"] == failed["stats"]["reconnects"] >= 9
    types = [(t, d) for t, d in event_types(api, call_id) if t.startswith("stream_")]
    assert [t for t, _ in types].count("stream_started") == 2
    assert [t for t, _ in types][-1] == "stream_failed" and types[-1][1]["reason"] == "reconnect_exhausted"
    assert all(d["attempt"] >= 1 and d["delay"] <= 0.75 for t, d in types if t == "stream_reconnecting")


# ---- a box: the stream API and the inbound WebSocket reach the call's cell through the box ----------
@pytest.mark.slow
@pytest.mark.sample
def test_box_relays_an_inbound_stream_to_the_calls_cell(tmp_path):
    from support import BoxProcess
    b = BoxProcess(tmp_path, 1, API_CALLS).start()
    client = WsPeer()
    proc = peer = None
    try:
        peer = RtpPeer(b.ports["rtp_peer"])
        proc = sipp("call_pcmu.xml", b.sip, tmp_path, "-d", "6000", local_port=b.ports["sipp"],
                    rtpport=b.ports["rtp_peer"], background=True, timeout=30)
        peer.wait_remote()
        api = Api(b, create_key(b.data))
        deadline = time.monotonic() + 5
        calls = []
        while not calls and time.monotonic() < deadline:
            calls = api.get("/v1/calls?state=active")[1]["calls"]
            time.sleep(0.05)
        call_id = calls[0]["id"]
        status, st, _ = api.post(f"/v1/calls/{call_id}/streams", {"encoding": "mulaw", "bidirectional": True})
        assert status == 201, st
        url = f"ws://127.0.0.1:{b.ports['http']}{st['ws_path']}"
        assert client.connect(url, "tl_bad_key") == 401
        assert client.connect(url, api.key) == 101
        client.wait(lambda m: m["event"] == "start")
        tone = (6000 * np.sin(2 * math.pi * 800 * np.arange(8000) / 8000)).astype("<i2").tobytes()
        t_send = time.monotonic()
        client.send({"event": "media", "media": {"payload": base64.b64encode(g711.ulaw_encode(tone)).decode()}})
        client.send({"event": "mark", "mark": {"name": "done"}})
        peer.stream([SILENCE] * 75)                                  # 1.5 s of RTP while it plays
        client.wait(lambda m: m["event"] == "mark", 3)
        assert 40 <= len(heard_loud(peer, t_send, time.monotonic())) <= 56
        assert len(client.media("in")) > 40
        assert api.get(f"/v1/calls/{call_id}/streams")[1]["streams"][0]["status"] == "streaming"
        status, body, _ = api.post(f"/v1/calls/{call_id}/streams/{st['id']}/stop")
        assert status == 200 and body["reason"] == "api"
        client.wait(lambda m: m["event"] == "stop", 3)
        # through the relay a client's close keeps its meaning: 1000 ends the stream, 4000 is a lost client
        for code, status_after, reason in ((1000, "stopped", "client_closed"), (4000, "waiting", None)):
            status, st, _ = api.post(f"/v1/calls/{call_id}/streams", {"encoding": "mulaw", "bidirectional": True})
            assert status == 201, st
            seen = len(client.messages)
            assert client.connect(f"ws://127.0.0.1:{b.ports['http']}{st['ws_path']}", api.key) == 101
            client.wait(lambda m: m["event"] == "start" and m["stream_id"] == st["id"], 3)
            assert len(client.messages) > seen
            client._run(client.ws.close(code=code))
            path = f"/v1/calls/{call_id}/streams/{st['id']}"
            deadline = time.monotonic() + 3
            while api.get(path)[1]["status"] != status_after and time.monotonic() < deadline:
                time.sleep(0.05)
            assert api.get(path)[1]["status"] == status_after and api.get(path)[1]["reason"] == reason
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode(errors="replace")[-1500:]
    finally:
        client.close()
        kill(proc)
        if peer is not None:
            peer.close()
        b.stop()


def test_stream_routes_in_the_openapi_spec():
    from openapi_spec_validator import validate

    from bridge.api.routes import ROUTES, openapi_spec
    from bridge.api.events import EVENT_TYPES
    spec = openapi_spec()
    validate(spec)
    base = "/v1/calls/{call_id}/streams"
    assert set(spec["paths"][base]) == {"get", "post"}
    assert spec["paths"][base]["post"]["x-scope"] == "control"
    assert spec["paths"][base + "/{stream_id}/stop"]["post"]["x-scope"] == "control"
    ws = spec["paths"][base + "/{stream_id}/ws"]["get"]
    assert "101" in ws["responses"] and "200" not in ws["responses"]
    body = spec["paths"][base]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert body["encoding"]["enum"] == ["mulaw", "pcm16", "opus"] and body["direction"]["enum"] == ["in", "out", "both"]
    assert sum(1 for r in ROUTES if "/streams" in r.path) == 5
    assert {"stream_started", "stream_reconnecting", "stream_stopped", "stream_failed"} <= set(EVENT_TYPES)
