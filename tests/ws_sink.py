"""A media stream consumer in its own process, for tests and the benchmark.

    python tests/ws_sink.py PORT [--rcvbuf BYTES]

Accepts WebSocket connections on 127.0.0.1:PORT at any path, reads every
message and counts media frames per stream; ``GET /stats`` returns the counts
as JSON. Being a separate process it can be stopped (SIGSTOP: a stalled
consumer whose TCP window fills) or killed (SIGKILL) by a test, and its CPU
is never charged to the cell. ``--rcvbuf`` shrinks the accepted sockets'
receive buffer so a stall backs up into the bridge within seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys

from aiohttp import WSMsgType, web


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--rcvbuf", type=int, default=0)
    args = ap.parse_args()
    stats: dict[str, dict] = {}

    async def ws_handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            m = json.loads(msg.data)
            st = stats.setdefault(m.get("stream_id", "?"), {"media": 0, "bytes": 0, "events": {}})
            st["events"][m["event"]] = st["events"].get(m["event"], 0) + 1
            if m["event"] == "media":
                st["media"] += 1
                st["bytes"] += len(msg.data)
        return ws

    async def stats_handler(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def run() -> None:
        app = web.Application()
        app.router.add_get("/stats", stats_handler)
        app.router.add_get("/{tail:.*}", ws_handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if args.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)   # inherited by accepted sockets
        sock.bind(("127.0.0.1", args.port))
        await web.SockSite(runner, sock).start()
        print("ready", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
