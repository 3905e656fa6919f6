"""How a media stream's WebSocket connection ends, over real loopback sockets: a peer
that closes with 1000 ends the stream (``client_closed``/``consumer_closed``) even when
a frame was on its way out at that moment; a peer that drops the TCP connection or
closes with another code is ``lost`` (the stream waits or reconnects).

The server side is aiohttp with the real ``MediaStream._serve``; the stream is fed a
frame on every turn of the event loop, so its sender is always mid-send when the
peer's close arrives (the race a CI run hit once in the call-level test)."""
import asyncio
import base64
import contextlib
import os
import socket

import aiohttp
import pytest
from aiohttp import web

from bridge.api.streams import connection_end
from test_streamcodec import hand_stream


async def _site(handler) -> tuple[web.AppRunner, int]:
    """An aiohttp server on a free loopback port with ``handler`` at /ws: (runner, port)."""
    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    await web.SockSite(runner, sock).start()
    return runner, sock.getsockname()[1]


@contextlib.asynccontextmanager
async def streams_server():
    """A loopback WebSocket server running one MediaStream per connection: yields (results, port),
    results getting each connection's (how, detail)."""
    results: list = []

    async def handler(request):
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        st, _, _ = hand_stream("in")

        async def feed():
            t = 0.0
            while True:
                st.on_audio([(t, bytes(640))], [], t)
                t += 0.02
                await asyncio.sleep(0)

        feeder = asyncio.create_task(feed())
        try:
            results.append(await st._serve(ws))
        finally:
            feeder.cancel()
        return ws

    runner, port = await _site(handler)
    try:
        yield results, port
    finally:
        await runner.cleanup()


async def _raw_client(port: int):
    """A WebSocket client by hand (handshake only), once frames are flowing: (reader, writer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    await reader.read(1000)
    return reader, writer


async def _wait_for(results: list, n: int) -> None:
    async with asyncio.timeout(10):
        while len(results) < n:
            await asyncio.sleep(0.005)


def test_a_peer_closing_with_1000_while_frames_flow_is_a_close_every_time():
    async def go():
        async with streams_server() as (results, port), aiohttp.ClientSession() as http:
            for i in range(30):
                ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws")
                for _ in range(2 + i % 5):                     # close at varying points of the flow
                    assert (await ws.receive()).type == aiohttp.WSMsgType.TEXT
                await ws.close()
                await _wait_for(results, i + 1)
        return results

    results = asyncio.run(go())
    assert results == [("closed", "closed by the peer")] * 30


def test_a_dropped_connection_or_another_close_code_is_lost_and_a_close_without_a_code_is_not():
    async def go():
        async with streams_server() as (results, port):
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws")
                await ws.receive()
                await ws.close(code=1011)
                await _wait_for(results, 1)
            for _ in range(3):                                 # TCP gone without a close frame
                reader, writer = await _raw_client(port)
                writer.close()
            await _wait_for(results, 4)
            reader, writer = await _raw_client(port)           # a close frame with no status code
            writer.write(b"\x88\x80" + os.urandom(4))            # FIN + close, masked, empty payload
            await _wait_for(results, 5)
            writer.close()
        return results

    results = asyncio.run(go())
    assert results[0] == ("lost", "the peer closed with code 1011")
    assert all(how == "lost" for how, _ in results[1:4]), results
    assert results[4] == ("closed", "closed by the peer")


def test_a_consumer_that_drops_every_connection_at_once_is_reconnected_ever_more_slowly(monkeypatch):
    """An outbound stream to a consumer that accepts each WebSocket and closes it with 1011 at once:
    every connection succeeds, so the stream never runs out of attempts, but it backs off as if
    they had failed (the attempt number given to the backoff grows), instead of reconnecting every
    base delay for the whole call."""
    from bridge.api import streams
    asked: list[int] = []
    real = streams.backoff

    def recording(attempt, base, cap, rnd=None):
        asked.append(attempt)
        return real(attempt, base, cap) if rnd is None else real(attempt, base, cap, rnd)
    monkeypatch.setattr(streams, "backoff", recording)

    async def go():
        connections = 0

        async def handler(request):
            nonlocal connections
            connections += 1
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            await ws.close(code=1011)
            return ws

        runner, port = await _site(handler)
        st, _, events = hand_stream("in")
        st.url = f"ws://127.0.0.1:{port}/ws"
        st.cfg = {**st.cfg, "reconnect_base_delay": 0.05, "reconnect_max_delay": 0.4}
        async with aiohttp.ClientSession() as http:
            st.manager.http = lambda: http
            st.session.add_tap = lambda tap: None
            st.begin()
            async with asyncio.timeout(20):
                while connections < 7:
                    await asyncio.sleep(0.01)
            st.stop("api")
        await runner.cleanup()
        return events

    events = asyncio.run(go())
    assert asked[:6] == [1, 2, 3, 4, 5, 6], asked
    reconnecting = [d for t, d in events if t == "stream_reconnecting"]
    assert reconnecting and all(d["attempt"] == 1 for d in reconnecting)     # never "in a row": not exhausted
    assert not any(t == "stream_failed" for t, _ in events)


@pytest.mark.parametrize("sender_done, error, peer, code, expected", [
    (True, None, None, None, "stopped"),
    (True, None, 1000, 1000, "stopped"),                        # we sent stop: ours, whatever came back
    (True, ConnectionResetError("Cannot write to closing transport"), 1000, 1000, "closed"),
    (False, None, 1000, 1000, "closed"),
    (False, None, None, 1000, "lost"),                          # aiohttp's 1000 for a dropped TCP connection
    (True, TimeoutError(), None, None, "lost"),
    (True, ConnectionResetError(), None, 1006, "lost"),
    (False, None, 1001, 1001, "lost"),
    (False, None, 0, 1000, "closed"),                           # a close frame without a status code
])
def test_connection_end_rules(sender_done, error, peer, code, expected):
    how, detail = connection_end(sender_done, error, peer, code, 1.5)
    assert how == expected
    if isinstance(error, TimeoutError):
        assert detail == "consumer too slow: a send blocked for 1.5 s"
    elif expected == "lost" and sender_done:
        assert detail == "send failed: the connection broke"
