"""HTTP surface of a cell: the /v1 control API, the console, health and metrics.

With ``http.ops_listen`` set, /healthz and /metrics move to that address
(e.g. a management network) and the API address serves only /v1 and /console.

With ``http.tls_cert`` and ``http.tls_key`` set, the API address (/v1, the
WebSocket, the console, and /healthz and /metrics unless they moved) speaks
HTTPS only, TLS 1.2 or later; plain HTTP to it fails. The ops address stays
plain HTTP (a management network). A reverse proxy in front of a plain
loopback listener remains an alternative (README).
"""
from __future__ import annotations

import ssl
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.api.routes import Api

CONSOLE = Path(__file__).resolve().parent / "console"
TLS = web.AppKey("tls", ssl.SSLContext)      # an app's server TLS context, if it serves HTTPS


def server_tls(http_cfg: dict) -> ssl.SSLContext | None:
    """The server TLS context of ``[http]`` (None without ``tls_cert``): TLS 1.2 minimum, the
    certificate chain and key from PEM files (``ssl.SSLError``/``OSError`` if they do not load)."""
    if not http_cfg.get("tls_cert"):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(http_cfg["tls_cert"], http_cfg["tls_key"])
    return ctx


def _ops_routes(app: web.Application, cell) -> None:
    async def healthz(request: web.Request) -> web.Response:
        if cell.ready and not cell.draining and cell.engine.alive():
            status, state = 200, "ok"
        else:
            status, state = 503, "draining" if cell.draining else "starting" if not cell.ready else "down"
        return web.json_response({"status": state, "calls": len(cell.sessions),
                                  "capacity": cell.cfg.raw["sip"]["capacity"],
                                  "models": None if cell.hub is None else cell.hub.up,
                                  "sip_guard": getattr(cell.engine, "guard_state", None)}, status=status)

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(cell.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)


def make_app(cell, with_ops: bool = True) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    tls = server_tls(cell.cfg.raw["http"])
    if tls is not None:
        app[TLS] = tls
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
    site = web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=app.get(TLS))
    await site.start()
    return runner
