"""HTTP surface of a cell: the /v1 control API, the console, health and metrics.

With ``http.ops_listen`` set, /healthz and /metrics move to that address
(e.g. a management network) and the API address serves only /v1 and /console.
"""
from __future__ import annotations

from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.api.routes import Api

CONSOLE = Path(__file__).resolve().parent / "console"


def _ops_routes(app: web.Application, cell) -> None:
    async def healthz(request: web.Request) -> web.Response:
        if cell.ready and not cell.draining and cell.engine.alive():
            status, state = 200, "ok"
        else:
            status, state = 503, "draining" if cell.draining else "starting" if not cell.ready else "down"
        return web.json_response({"status": state, "calls": len(cell.sessions),
                                  "capacity": cell.cfg.raw["sip"]["capacity"],
                                  "models": None if cell.hub is None else cell.hub.up}, status=status)

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(cell.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)


def make_app(cell, with_ops: bool = True) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    Api(cell.services).register(app)

    async def console(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(CONSOLE / "index.html")

    app.router.add_get("/console", console)
    app.router.add_get("/", lambda r: web.HTTPFound("/console"))
    if with_ops:
        _ops_routes(app, cell)
    return app


def make_ops_app(cell) -> web.Application:
    app = web.Application()
    _ops_routes(app, cell)
    return app


async def start_http(app: web.Application, listen: str) -> web.AppRunner:
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), int(port))
    await site.start()
    return runner
