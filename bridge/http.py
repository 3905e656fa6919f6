"""HTTP surface of a cell: health and metrics (the /v1 API joins later)."""
from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


def make_app(cell) -> web.Application:
    app = web.Application()

    async def healthz(request: web.Request) -> web.Response:
        if cell.ready and not cell.draining and cell.engine.alive():
            status, state = 200, "ok"
        else:
            status, state = 503, "draining" if cell.draining else "starting" if not cell.ready else "down"
        return web.json_response({"status": state, "calls": len(cell.sessions),
                                  "capacity": cell.cfg.raw["sip"]["capacity"]}, status=status)

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(cell.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_http(app: web.Application, listen: str) -> web.AppRunner:
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), int(port))
    await site.start()
    return runner
