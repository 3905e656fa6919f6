"""The box's HTTP when several cells run behind Kamailio: one API for all.

- Reads (calls, transcripts, events, webhooks, numbers) come straight from the
  SQLite store every cell writes; the WebSocket and the webhook dispatcher
  follow its events table, so they see one gapless stream for the whole box.
- Actions on a call (hang up, transfer, DTMF, transcribes, speakings) are
  forwarded to the cell that owns it: the call's row names its cell, and
  transcribe/speaking ids carry it (``tr_c2_...``). New outbound calls go to
  the least-loaded healthy cell.
- ``/metrics`` is every cell's metrics with a ``cell`` label plus the box's own;
  ``/v1/cells`` lists cells and drains/undrains them.
"""
from __future__ import annotations

import asyncio
import json
import re
import subprocess

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bridge.api.routes import Api, ApiError, error_response
from bridge.api.services import Services
from bridge.api.events import Tailer
from bridge.api.streams import NORMAL_CLOSES
from bridge.api.http import CONSOLE, TLS, server_tls, start_http
from bridge.core.metrics import Metrics
from bridge.records.store import Store
from bridge.api.webhooks import WebhookDispatcher


def box_services(sup) -> Services:
    """The box's services for ``Api``: the shared store, its event tailer, webhooks and metrics.
    No live calls, no engine, no models: call actions are forwarded to the cell that owns the call."""
    store = Store(sup.cfg.data_dir)
    metrics = Metrics()
    tailer = Tailer(store)
    w = sup.cfg.raw["webhooks"]
    webhooks = WebhookDispatcher(store, metrics, w["max_attempts"], w["base_delay"], w["max_delay"], w["timeout"],
                                 guard=sup.cfg.outbound, retry_for=w["retry_for"])
    tailer.subscribe(webhooks.on_event)
    tailer.wanted = lambda: len(tailer.listeners) > 1 or webhooks.has_hooks()
    return Services(cfg=sup.cfg, store=store, metrics=metrics, tailer=tailer, webhooks=webhooks, cell_id="box")


class BoxApi(Api):
    def __init__(self, services: Services, sup, http: aiohttp.ClientSession):
        super().__init__(services)
        self.sup = sup                       # the cells, for forwarding
        self.http = http                     # the box's client towards its cells

    def _cell(self, index: str | int):
        cells = self.sup.cells
        try:
            c = cells[int(index)]
        except (ValueError, IndexError):
            raise ApiError(404, "not_found", f"no cell {index}") from None
        if not c.alive():
            raise ApiError(503, "cell_down", f"cell {c.index} is restarting")
        return c

    def _owner(self, call_id: str):
        row = self.store.get_call(call_id)
        if row is None:
            raise ApiError(404, "not_found", f"no call {call_id}", "call_id")
        if row["ended"]:
            raise ApiError(409, "call_ended", f"call {call_id} has ended")
        return self._cell(row["cell"] or 0)

    def _owner_of_resource(self, rid: str):
        m = re.match(r"^(?:tr|spk)_c(\d+)_", rid)
        if not m:
            raise ApiError(404, "not_found", f"no such resource {rid}")
        return self._cell(m.group(1))

    async def _forward(self, request: web.Request, cell, body=None):
        headers = {k: v for k, v in request.headers.items() if k in ("Authorization", "Idempotency-Key")}
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self.http.request(request.method, cell.http + request.path_qs, data=data,
                                         headers=headers) as r:
            payload = await r.json(content_type=None)
            return r.status, payload

    # calls
    async def create_call(self, request, body):
        active = {}
        for row in self.store.list_calls("active", 500):
            active[str(row["cell"])] = active.get(str(row["cell"]), 0) + 1
        candidates = [c for c in self.sup.cells if c.alive() and not c.drained]
        if not candidates:
            raise ApiError(503, "no_cell", "no cell is taking calls")
        cell = min(candidates, key=lambda c: active.get(str(c.index), 0))
        return await self._forward(request, cell, body)

    async def hangup(self, request, body):
        return await self._forward(request, self._owner(request.match_info["call_id"]), body)

    transfer = hangup
    send_dtmf = hangup
    post_tool_result = hangup

    async def create_transcribe(self, request, body):
        return await self._forward(request, self._owner(body["call_id"]), body)

    create_speaking = create_transcribe

    async def _by_resource(self, request, body=None, key="transcribe_id"):
        return await self._forward(request, self._owner_of_resource(request.match_info[key]), body)

    async def get_transcribe(self, request):
        return await self._by_resource(request)

    async def stop_transcribe(self, request, body):
        return await self._by_resource(request, body)

    async def get_speaking(self, request):
        return await self._by_resource(request, key="speaking_id")

    async def say(self, request, body):
        return await self._by_resource(request, body, key="speaking_id")

    flush = say
    stop_speaking = say

    # recordings: controlled on the call's cell; read back by the cell that wrote the file
    async def call_recording(self, request, body):
        return await self._forward(request, self._owner(request.match_info["call_id"]), body)

    def _recording_cell(self, rid: str | None):
        row = self.store._one("SELECT cell FROM recordings WHERE id = ?", rid) if rid else None
        if rid and row is None:
            raise ApiError(404, "not_found", "no such recording", "recording_id")
        if row is not None:
            return self._cell(row["cell"] or 0)
        alive = [c for c in self.sup.cells if c.alive()]     # a listing: any cell reads the shared store
        if not alive:
            raise ApiError(503, "cell_down", "no cell is running")
        return alive[0]

    async def list_recordings(self, request):
        return await self._forward(request, self._recording_cell(None))

    async def get_recording(self, request):
        return await self._forward(request, self._recording_cell(request.match_info["recording_id"]))

    async def delete_recording(self, request):
        return await self._forward(request, self._recording_cell(request.match_info["recording_id"]))

    async def recording_audio(self, request):
        """The decrypted file, streamed through from the cell as it arrives (never buffered whole)."""
        cell = self._recording_cell(request.match_info["recording_id"])
        headers = {"Authorization": request.headers.get("Authorization", "")}
        async with self.http.get(cell.http + request.path_qs, headers=headers) as r:
            if r.status != 200:
                return web.Response(status=r.status, body=await r.read(), content_type="application/json")
            self.audited(request, request.match_info["recording_id"])   # the client's address (the cell sees ours)
            resp = web.StreamResponse(status=200, headers={k: v for k, v in r.headers.items() if k in (
                "Content-Type", "Content-Length", "Cache-Control", "Content-Disposition", "X-Recording-Complete",
                "X-Recording-Key-Id")})
            await resp.prepare(request)
            try:
                async for piece in r.content.iter_chunked(64 * 1024):
                    await resp.write(piece)
            except aiohttp.ClientPayloadError:
                raise ConnectionAbortedError("the cell aborted the download") from None
            await resp.write_eof()
            return resp

    # media streams: REST goes to the call's cell; an inbound stream's WebSocket is relayed to it
    def _call_cell(self, call_id: str):
        """The cell of a call, ended or not (an ended call's cell still has its streams' final stats)."""
        row = self.store.get_call(call_id)
        if row is None:
            raise ApiError(404, "not_found", f"no call {call_id}", "call_id")
        return self._cell(row["cell"] or 0)

    async def create_stream(self, request, body):
        return await self._forward(request, self._owner(request.match_info["call_id"]), body)

    async def stop_stream(self, request, body):
        return await self._forward(request, self._call_cell(request.match_info["call_id"]), body)

    async def list_streams(self, request):
        return await self._forward(request, self._call_cell(request.match_info["call_id"]))

    get_stream = list_streams

    async def stream_socket(self, request: web.Request) -> web.StreamResponse:
        try:
            self.auth(request, "read")
            cell = self._call_cell(request.match_info["call_id"])
        except ApiError as e:
            return error_response(e.status, e.code, e.message, e.field)
        headers = {k: v for k, v in request.headers.items() if k == "Authorization"}
        http = aiohttp.ClientSession()          # its own: the box's client times whole requests out
        upstream = None
        try:                                    # whatever happens below, the cell's side is closed
            try:
                upstream = await http.ws_connect(cell.http.replace("http", "ws", 1) + request.path_qs,
                                                 headers=headers, max_msg_size=1 << 20)
            except aiohttp.WSServerHandshakeError as e:
                return error_response(e.status, "refused", f"the cell refused the stream: {e.message}")
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
                return error_response(503, "cell_down", f"cannot reach the call's cell: {e}")
            ws = web.WebSocketResponse(max_msg_size=1 << 20)
            await ws.prepare(request)

            async def pump(src, dst):
                code = None                     # the code of src's close frame (not ``close_code``:
                while True:                     # aiohttp turns it into 1006 when its reply fails)
                    msg = await src.receive()
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        await dst.send_str(msg.data)
                    elif msg.type == aiohttp.WSMsgType.BINARY:
                        await dst.send_bytes(msg.data)
                    elif msg.type == aiohttp.WSMsgType.CLOSE:
                        code = msg.data
                        break
                    elif msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break
                # a normal close ends the stream; anything else is a lost connection to the cell
                await dst.close(code=1000 if code in NORMAL_CLOSES else 1001)
            await asyncio.gather(pump(ws, upstream), pump(upstream, ws), return_exceptions=True)
            return ws
        finally:
            if upstream is not None:
                await upstream.close()
            await http.close()

    # cells
    def register(self, app: web.Application) -> None:
        super().register(app)

        async def list_cells(request):
            try:
                self.auth(request, "read")
            except ApiError as e:
                return error_response(e.status, e.code, e.message)
            return web.json_response({"cells": [
                {"index": c.index, "sip": f"{c.host}:{c.sip_port}", "http": c.http, "rtp": c.rtp,
                 "alive": c.alive(), "drained": c.drained, "restarts": c.restarts, "deaths": len(c.history),
                 "pid": c.proc.pid if c.proc else None} for c in self.sup.cells]})

        def drain_handler(drained: bool):
            async def handler(request):
                try:
                    self.auth(request, "control")
                    c = self._cell(request.match_info["index"]) if drained else \
                        self.sup.cells[int(request.match_info["index"])]
                    await asyncio.get_running_loop().run_in_executor(None, self.sup.set_drained, c, drained)
                except ApiError as e:
                    return error_response(e.status, e.code, e.message)
                except (ValueError, IndexError):
                    return error_response(404, "not_found", "no such cell")
                except RuntimeError as e:
                    return error_response(502, "front_error", str(e))
                return web.json_response({"index": c.index, "drained": c.drained})
            return handler

        async def list_registrations(request):
            """The front's trunk registrations (``register = true``): state, the registrar's last
            answer, when it last changed, failed attempts in a row and when the next one may go."""
            try:
                self.auth(request, "read")
            except ApiError as e:
                return error_response(e.status, e.code, e.message)
            regs = getattr(self.sup, "registrations", {})
            return web.json_response({"registrations": [
                {"trunk": t, "registered": r.registered, "status": r.status or None, "reason": r.reason or None,
                 "since": r.since or None, "failures": r.failures, "next_attempt": r.next_attempt or None}
                for t, r in sorted(regs.items())]})

        async def register_now(request):
            """Register a trunk at once (scope ``control``): after a carrier's outage, rather than
            waiting out the backoff. 202: REGISTER goes out on the front's next timer tick."""
            try:
                self.auth(request, "control")
                await self.sup.register_now(request.match_info["trunk"])
            except ApiError as e:
                return error_response(e.status, e.code, e.message)
            except KeyError:
                return error_response(404, "not_found", "no trunk the front registers by that name")
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                return error_response(502, "front_error", str(e)[:300])
            return web.json_response({"trunk": request.match_info["trunk"], "registering": True}, status=202)

        app.router.add_get("/v1/cells", list_cells)
        app.router.add_get("/v1/registrations", list_registrations)
        app.router.add_post("/v1/registrations/{trunk}/register", register_now)
        app.router.add_post("/v1/cells/{index}/drain", drain_handler(True))
        app.router.add_post("/v1/cells/{index}/undrain", drain_handler(False))


def _escape(value: str, quote: bool = True) -> str:
    """The text format's escaping: backslash and newline (and the double quote in a label value)."""
    value = str(value).replace("\\", "\\\\").replace("\n", "\\n")
    return value.replace('"', '\\"') if quote else value


def _render_families(families: dict) -> str:
    """Prometheus text format; label values (a trunk's name, a cell's own labels as parsed) escaped."""
    out = []
    for name, (kind, doc, samples) in families.items():
        out.append(f"# HELP {name} {_escape(doc, quote=False)}")
        out.append(f"# TYPE {name} {kind}")
        for sname, labels, value in samples:
            lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append(f"{sname}{{{lab}}} {value}" if lab else f"{sname} {value}")
    return "\n".join(out) + "\n"


async def merged_metrics(sup, http: aiohttp.ClientSession, metrics: Metrics) -> str:
    families: dict = {}

    async def fetch(c):
        try:
            async with http.get(f"{c.http}/metrics", timeout=aiohttp.ClientTimeout(total=2)) as r:
                return c, await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return c, None
    results = await asyncio.gather(*(fetch(c) for c in sup.cells))
    up = []
    for c, text in results:
        up.append((c.index, 1 if text is not None else 0))
        if text is None:
            continue
        for fam in text_string_to_metric_families(text):
            kind = fam.type if fam.type != "unknown" else "untyped"
            entry = families.setdefault(fam.name if kind != "counter" else fam.name + "_total",
                                        (kind, fam.documentation, []))
            for s in fam.samples:
                entry[2].append((s.name, {**s.labels, "cell": str(c.index)}, s.value))
    families["trunkline_box_cell_up"] = ("gauge", "1 if the cell answers its metrics endpoint",
                                         [("trunkline_box_cell_up", {"cell": str(i)}, v) for i, v in up])
    families["trunkline_box_cell_deaths_total"] = ("counter", "Times a cell process died and was restarted", [
        ("trunkline_box_cell_deaths_total", {"cell": str(c.index)}, len(c.history)) for c in sup.cells])
    families["trunkline_box_cell_drained"] = ("gauge", "1 while the front sends the cell no new calls", [
        ("trunkline_box_cell_drained", {"cell": str(c.index)}, int(c.drained)) for c in sup.cells])
    regs = getattr(sup, "registrations", {})
    if regs:
        families["trunkline_trunk_registered"] = (
            "gauge", "1 while the front's registration of the trunk (register = true) is current",
            [("trunkline_trunk_registered", {"trunk": t}, int(r.registered)) for t, r in sorted(regs.items())])
        families["trunkline_trunk_registration_failures"] = (
            "gauge", "Failed registration attempts in a row (the wait before the next one doubles each time)",
            [("trunkline_trunk_registration_failures", {"trunk": t}, r.failures) for t, r in sorted(regs.items())])
    for s in metrics.registry.collect():
        if s.name.startswith("trunkline_webhook"):
            families[s.name + "_total"] = ("counter", s.documentation,
                                           [(x.name, x.labels, x.value) for x in s.samples if x.name.endswith("_total")])
    return _render_families(families)


async def start_box(sup) -> list:
    services = box_services(sup)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    await services.webhooks.start()
    tail = asyncio.create_task(services.tailer.run())
    app = web.Application(client_max_size=1 << 20)
    if (tls := server_tls(sup.cfg.raw["http"])) is not None:    # HTTPS on the box's address (cells stay plain)
        app[TLS] = tls
    BoxApi(services, sup, http).register(app)

    async def healthz(request):
        cells = [c for c in sup.cells if c.alive() and not c.drained]
        front = sup.kamailio is not None and sup.kamailio.poll() is None
        ok = front and bool(cells) and not sup.stopping
        return web.json_response({"status": "ok" if ok else "down", "front": front,
                                  "cells_taking_calls": len(cells), "cells": len(sup.cells)},
                                 status=200 if ok else 503)

    async def metrics(request):
        return web.Response(text=await merged_metrics(sup, http, services.metrics), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def console(request):
        return web.FileResponse(CONSOLE / "index.html")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/console", console)

    async def cleanup(_app):
        tail.cancel()
        await services.webhooks.stop()
        await http.close()
        services.store.close()
    app.on_cleanup.append(cleanup)
    return [await start_http(app, sup.cfg.raw["http"]["listen"])]
