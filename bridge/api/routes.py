"""The control API under /v1: REST, the event WebSocket and the OpenAPI spec.

Routes are declared once in ``ROUTES`` (method, path, scope, request schema,
summary); the same table registers the aiohttp handlers and generates
``/v1/openapi.json``. Errors are JSON: ``{"error": {"code", "message", "field"}}``.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from typing import Awaitable, Callable

from aiohttp import web

from bridge import __version__
from bridge.core.app import APPS
from bridge.api.events import EVENT_TYPES, from_row, valid_topic
from bridge.api.base import (DIRECTION, TEXT, URI_OR_NUMBER, ApiError, RateLimiter, Route, error_response,
                             parse_json, retry_after)
from bridge.core.netguard import OutboundRefused
from bridge.api.media import MEDIA_ROUTES, NUMBER_ROUTE, MediaApi
from bridge.api.privacy import PRIVACY_ROUTES, PrivacyApi
from bridge.api.erasure import ERASURE_ROUTES, ErasureApi
from bridge.api.placing import PlacingApi
from bridge.api.socket import MAX_TOPICS, EventSocket, read_events
from bridge.api.services import Services
from bridge.core.schema import SchemaError, obj, validate
from bridge.core.states import CallState, SpeakingState, TranscribeState
from bridge.api.speaking import Speaking, Transcriber
from bridge.api.trunklimits import TrunkLimits
from sip import commands as cmd

log = logging.getLogger("trunkline.api")

MAX_SAY_QUEUED = 20           # texts a speaking session holds before say answers 429

ROUTES = [
    Route("GET", "/v1/calls", "list_calls", "read", "List calls (active first, then recent)"),
    Route("POST", "/v1/calls", "create_call", "control",
          "Place an outbound call through a trunk; context: flat name -> string/number values the agent's "
          "prompts and tools read as {context.NAME}; profile, language: the agent's; from: the number "
          "presented (the trunk's caller_id or one of its caller_ids); withhold_caller_id: From anonymous, "
          "the number only in P-Asserted-Identity with Privacy: id",
          obj(["to"], to=URI_OR_NUMBER, trunk={"type": "string"}, app={"type": "string", "enum": list(APPS)},
              context={"type": "object"}, profile={"type": "string", "maxLength": 64},
              language={"type": "string", "maxLength": 16},
              **{"from": {"type": "string", "pattern": r"^\+?[0-9]{3,20}$"}},
              withhold_caller_id={"type": "boolean"}), 201),
    Route("GET", "/v1/calls/{call_id}", "get_call", "read", "One call: state, parties, codec, live quality"),
    Route("GET", "/v1/calls/{call_id}/transcript", "get_transcript", "read", "Transcript of a call"),
    Route("POST", "/v1/calls/{call_id}/hangup", "hangup", "control", "Hang up a call", obj()),
    Route("POST", "/v1/calls/{call_id}/transfer", "transfer", "control", "Blind transfer (REFER)",
          obj(["to"], to={"type": "string", "pattern": r"^sips?:", "maxLength": 256})),
    Route("POST", "/v1/calls/{call_id}/dtmf", "send_dtmf", "control", "Send DTMF digits (RFC 4733)",
          obj(["digits"], digits={"type": "string", "pattern": r"^[0-9*#A-Da-d]{1,32}$"})),
    Route("POST", "/v1/transcribes", "create_transcribe", "control", "Start live transcription on a call",
          obj(["call_id"], call_id={"type": "string"}, direction=DIRECTION), 201),
    Route("GET", "/v1/transcribes/{transcribe_id}", "get_transcribe", "read", "A transcription session"),
    Route("POST", "/v1/transcribes/{transcribe_id}/stop", "stop_transcribe", "control", "Stop transcription", obj()),
    Route("POST", "/v1/speakings", "create_speaking", "control", "Create a speaking session on a call",
          obj(["call_id"], call_id={"type": "string"}, direction={"type": "string", "enum": ["in"]}), 201),
    Route("GET", "/v1/speakings/{speaking_id}", "get_speaking", "read", "A speaking session"),
    Route("POST", "/v1/speakings/{speaking_id}/say", "say", "control", "Queue text to be spoken",
          obj(["text"], text=TEXT), 202),
    Route("POST", "/v1/speakings/{speaking_id}/flush", "flush", "control",
          "Stop playback now, drop the queue; returns what the caller heard", obj()),
    Route("POST", "/v1/speakings/{speaking_id}/stop", "stop_speaking", "control", "Stop the speaking session", obj()),
    Route("GET", "/v1/numbers", "list_numbers", "read", "Which app answers each inbound number"),
    Route("PUT", "/v1/numbers/{number}", "put_number", "control",
          "Route an inbound number to an app, or straight to a bot (app: stream, url, protocol, parameters)",
          NUMBER_ROUTE),
    Route("DELETE", "/v1/numbers/{number}", "delete_number", "control", "Remove a number route"),
    Route("GET", "/v1/webhooks", "list_webhooks", "read", "Webhook subscriptions"),
    Route("POST", "/v1/webhooks", "create_webhook", "control", "Subscribe a URL to events (returns its secret)",
          obj(["url"], url={"type": "string", "pattern": r"^https?://", "maxLength": 2048},
              topics={"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_TOPICS},
              secret={"type": "string", "minLength": 16, "maxLength": 256}), 201),
    Route("DELETE", "/v1/webhooks/{webhook_id}", "delete_webhook", "control", "Remove a webhook"),
    Route("GET", "/v1/webhook-deliveries", "list_deliveries", "read", "Webhook deliveries (?status=dead)"),
    Route("POST", "/v1/webhook-deliveries/{delivery_id}/replay", "replay_delivery", "control",
          "Deliver again (e.g. a dead letter)", obj()),
    Route("GET", "/v1/events", "list_events", "read", "Stored events after ?since=SEQ"),
    *MEDIA_ROUTES,
    *PRIVACY_ROUTES,
    *ERASURE_ROUTES,
    Route("POST", "/v1/calls/{call_id}/tool-results/{tool_call_id}", "post_tool_result", "callback",
          "Deliver an asynchronous tool result (the URL, with its ?sig=, is given to the tool; no API key)",
          {"type": "object"}, 202),
]


def _fingerprint(request: web.Request, raw: bytes) -> str:
    return hashlib.sha256(f"{request.method} {request.path}\n".encode() + raw).hexdigest()


class Api(PlacingApi, MediaApi, PrivacyApi, ErasureApi, EventSocket):
    def __init__(self, services: Services):
        self.services = services              # a cell's, or the box's (no live calls there)
        self.store = services.store
        h = services.cfg.raw["http"]
        self.limiter = RateLimiter(h["rate_limit"], h["rate_burst"])    # per API key
        self.guard = services.cfg.outbound    # the SSRF guard: webhook URLs are checked here first
        self.transcribes: dict[str, Transcriber] = {}
        self.speakings: dict[str, Speaking] = {}
        self.trunk_limits = TrunkLimits(services.cfg.trunks, services.store)   # per-trunk cps / max_calls

    # -- plumbing ----------------------------------------------------------------------
    def auth(self, request: web.Request, scope: str) -> dict:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header.startswith("Bearer ") else request.query.get("token", "")
        key = self.store.check_key(token) if token else None
        if key is None:
            raise ApiError(401, "unauthorized", "a valid API key is required (Authorization: Bearer ...)")
        wait = self.limiter.take(key["id"])
        if wait:
            self.services.metrics.api_limited.labels("api_rate").inc()
            raise ApiError(429, "rate_limited", "too many requests with this key (http.rate_limit)",
                           headers=retry_after(wait))
        if scope == "control" and key["scope"] != "control":
            raise ApiError(403, "forbidden", "this key is read-only")
        if scope == "recordings" and key["scope"] != "recordings":    # control does not imply it
            raise ApiError(403, "forbidden", "recordings audio needs a key with the recordings scope")
        if scope == "audit" and key["scope"] != "audit":              # nor does it imply this one
            raise ApiError(403, "forbidden", "the access audit needs a key with the audit scope")
        return key

    def callback_key(self, request: web.Request) -> dict:
        """The unauthenticated tool-callback route: its URL signature is checked before the
        body is read, so a stranger's request costs one HMAC, never a JSON parse on the loop
        that runs the media tick. (In the box, which has no tools, the owning cell checks.)"""
        tools = self.services.tools
        if tools is not None:
            m = request.match_info
            if not tools.signed(m.get("call_id", ""), m.get("tool_call_id", ""), request.query.get("sig", "")):
                raise ApiError(404, "not_found", "no pending tool call at this URL (unknown, already answered or "
                               "bad signature)")
        return {"id": "callback"}

    def wrap(self, route: Route) -> Callable[[web.Request], Awaitable[web.Response]]:
        fn = getattr(self, route.handler)

        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                key = self.auth(request, route.scope) if route.scope != "callback" else self.callback_key(request)
                request["api_key"] = key
                body = None
                raw = b""
                if route.method in ("POST", "PUT"):
                    try:
                        raw = await request.read()
                    except web.HTTPRequestEntityTooLarge:
                        raise ApiError(413, "too_large", "the body is larger than 1 MiB (JSON bodies: 64 KiB)") from None
                    if raw.strip():
                        # malformed, too deep or too large: a 400 in the API's shape, never a 500
                        body = parse_json(raw)   # <= 64 KiB: a few ms at worst, and GIL-bound in any thread
                    else:
                        body = {}
                    if route.body is not None:
                        validate(body, route.body)
                idem = request.headers.get("Idempotency-Key")
                if idem and route.method != "GET":
                    fp = _fingerprint(request, raw)
                    prev = self.store.idempotent(key["id"], idem)
                    if prev is not None:
                        if prev["fingerprint"] != fp:
                            raise ApiError(422, "idempotency_key_reused",
                                           "this Idempotency-Key was used for a different request")
                        return web.Response(status=prev["status"], body=prev["body"].encode(),
                                            content_type="application/json", headers={"Idempotent-Replayed": "true"})
                result = await fn(request, body) if body is not None else await fn(request)
                if isinstance(result, web.StreamResponse):
                    return result                      # the handler streamed its answer (a download)
                status, payload = result
                text = json.dumps(payload)
                if idem and route.method != "GET" and status < 500:
                    self.store.remember(key["id"], idem, _fingerprint(request, raw), status, text)
                return web.Response(status=status, body=text.encode(), content_type="application/json")
            except ApiError as e:
                headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else e.headers
                return error_response(e.status, e.code, e.message, e.field, headers)
            except SchemaError as e:
                return error_response(400, e.code, e.message, e.field)
            except RecursionError:               # a last guard: nothing deep may become a 500
                return error_response(400, "invalid_json", "the body is nested too deeply")
        return handler

    def register(self, app: web.Application) -> None:
        for r in ROUTES:
            app.router.add_route(r.method, r.path, getattr(self, r.handler) if r.raw else self.wrap(r))
        self.register_twilio(app)        # the Twilio-compatible REST route (bridge/api/twilio.py)
        # The access audit opens now, at start: opening it creates its table, a write that would
        # wait on the writer's lock if it first happened on a read during a slow disk.
        self.audit_trail        # noqa: B018
        app.on_cleanup.append(lambda _app: asyncio.to_thread(self.close_audit))   # the access audit's thread
        app.router.add_get("/v1/openapi.json", self.openapi)
        app.router.add_get("/v1/ws", self.websocket)

    def session(self, call_id: str):
        s = self.services.calls.get(call_id)
        if s is None:
            if self.store.get_call(call_id):
                raise ApiError(409, "call_ended", f"call {call_id} has ended")
            raise ApiError(404, "not_found", f"no call {call_id}", "call_id")
        return s

    # -- calls ---------------------------------------------------------------------------
    def _call_view(self, row: dict) -> dict:
        live = self.services.calls.get(row["id"])
        q = row.get("quality")
        if live is not None:
            lq = self.services.live_quality(row["id"])
            if lq is not None and lq.rx_packets:
                q = lq.as_dict()
        return {"id": row["id"], "direction": row["direction"], "from": row["from_uri"], "to": row["to_uri"],
                "trunk": row["trunk"], "app": row["app"], "state": live.state if live else row["state"],
                "codec": row["codec"], "created": row["created"], "answered": row["answered"],
                "ended": row["ended"], "result": row["result"], "reason": row["reason"], "quality": q,
                "outcome": row.get("outcome"),
                "context": (getattr(live, "context", None) if live is not None else (row.get("sip") or {}).get("context")) or None,
                "sip": row.get("sip")}        # carrier headers; the trunk address that answered / failed          # summary, disposition, intent (agent calls, once ended)

    async def list_calls(self, request):
        state = request.query.get("state")
        if state not in (None, "active", "ended"):
            raise ApiError(400, "invalid_field", "state must be active or ended", "state")
        try:
            limit = max(1, min(500, int(request.query.get("limit", "50"))))
        except ValueError:
            raise ApiError(400, "invalid_field", "limit must be an integer", "limit") from None
        return 200, {"calls": [self._call_view(r) for r in self.store.list_calls(state, limit)]}

    async def get_call(self, request):
        row = self.store.get_call(request.match_info["call_id"])
        if row is None:
            raise ApiError(404, "not_found", "no such call", "call_id")
        return 200, self._call_view(row)

    async def get_transcript(self, request):
        cid = request.match_info["call_id"]
        if self.store.get_call(cid) is None:
            raise ApiError(404, "not_found", "no such call", "call_id")
        if self.services.bus is not None:       # lines already recorded, committed first
            await self.services.bus.settled()
        self.audited(request, cid)
        return 200, {"call_id": cid, "transcript": self.store.transcript(cid)}

    async def hangup(self, request, body):
        s = self.session(request.match_info["call_id"])
        s.hangup("api hangup")
        return 200, {"id": s.call_id, "state": CallState.ENDING}

    async def transfer(self, request, body):
        s = self.session(request.match_info["call_id"])
        if s.state != CallState.PROGRESSING:
            raise ApiError(409, "wrong_state", "the call is not answered")
        self._check_destination(body["to"], None)
        await asyncio.wrap_future(self.services.submit(cmd.Transfer(s.call_id, body["to"])))
        return 200, {"id": s.call_id, "transfer": body["to"]}

    async def send_dtmf(self, request, body):
        s = self.session(request.match_info["call_id"])
        if s.state != CallState.PROGRESSING:
            raise ApiError(409, "wrong_state", "the call is not answered")
        await asyncio.wrap_future(self.services.submit(cmd.SendDtmf(s.call_id, body["digits"].upper())))
        return 200, {"id": s.call_id, "digits": body["digits"].upper()}

    # -- transcribes and speakings ------------------------------------------------------------
    def _api_session(self, call_id: str, what: str):
        s = self.session(call_id)
        if s.app_name != "api":
            raise ApiError(409, "wrong_app", f"{what} need a call handled by the API app (this one: {s.app_name})")
        if self.services.hub is None:
            raise ApiError(409, "no_speech_engines", "this cell runs without models (models.load)")
        return s

    async def create_transcribe(self, request, body):
        s = self._api_session(body["call_id"], "transcribes")
        tr = Transcriber(s, self.services.hub, s.emit, body.get("direction", "in"), self.services.cfg.raw["agent"])
        s.transcribers[tr.id] = tr
        self.transcribes[tr.id] = tr
        s.emit("transcribe_started", tr.as_dict())
        return 201, tr.as_dict()

    def _transcribe(self, request) -> Transcriber:
        tr = self.transcribes.get(request.match_info["transcribe_id"])
        if tr is None:
            raise ApiError(404, "not_found", "no such transcribe", "transcribe_id")
        return tr

    async def get_transcribe(self, request):
        return 200, self._transcribe(request).as_dict()

    async def stop_transcribe(self, request, body):
        tr = self._transcribe(request)
        if tr.status == TranscribeState.STOPPED:
            raise ApiError(409, "wrong_state", "already stopped")
        tr.stop()
        return 200, tr.as_dict()

    async def create_speaking(self, request, body):
        s = self._api_session(body["call_id"], "speakings")
        if any(sp.status != SpeakingState.STOPPED for sp in s.speakings.values()):
            raise ApiError(409, "wrong_state", "the call already has a speaking session")
        sp = Speaking(s, self.services.hub, s.emit, body.get("direction", "in"))
        s.speakings[sp.id] = sp
        self.speakings[sp.id] = sp
        out = sp.as_dict()
        if s.state == CallState.PROGRESSING:
            sp.activate()
        return 201, out

    def _speaking(self, request) -> Speaking:
        sp = self.speakings.get(request.match_info["speaking_id"])
        if sp is None:
            raise ApiError(404, "not_found", "no such speaking", "speaking_id")
        return sp

    async def get_speaking(self, request):
        return 200, self._speaking(request).as_dict()

    async def say(self, request, body):
        sp = self._speaking(request)
        if sp.status != SpeakingState.ACTIVE:
            raise ApiError(409, "wrong_state", f"speaking is {sp.status}")
        if sp.as_dict().get("queued", 0) >= MAX_SAY_QUEUED:
            self.services.metrics.api_limited.labels("say_queue").inc()
            raise ApiError(429, "queue_full", f"{MAX_SAY_QUEUED} texts are already queued; wait or flush",
                           headers=retry_after(1))
        sp.say(body["text"])
        return 202, sp.as_dict()

    async def flush(self, request, body):
        sp = self._speaking(request)
        if sp.status != SpeakingState.ACTIVE:
            raise ApiError(409, "wrong_state", f"speaking is {sp.status}")
        heard = sp.flush()
        return 200, {**sp.as_dict(), "heard": heard}

    async def stop_speaking(self, request, body):
        sp = self._speaking(request)
        if sp.status == SpeakingState.STOPPED:
            raise ApiError(409, "wrong_state", "already stopped")
        heard = sp.stop()
        return 200, {**sp.as_dict(), "heard": heard}

    # -- numbers -----------------------------------------------------------------------------------
    async def list_numbers(self, request):
        return 200, {"default": self.services.cfg.app, "numbers": self.number_views(self.store.numbers())}

    async def put_number(self, request, body):
        number = request.match_info["number"]
        stored, view = self.number_route(body)
        self.store.set_number(number, stored)
        return 200, {"number": number, **view}

    async def delete_number(self, request):
        if not self.store.delete_number(request.match_info["number"]):
            raise ApiError(404, "not_found", "no such number route", "number")
        return 200, {"deleted": request.match_info["number"]}

    # -- webhooks ----------------------------------------------------------------------------------
    def _hook_view(self, wh: dict, secret: bool = False) -> dict:
        out = {"id": wh["id"], "url": wh["url"], "topics": wh["topics"], "created": wh["created"]}
        if secret:
            out["secret"] = wh["secret"]
        return out

    async def list_webhooks(self, request):
        return 200, {"webhooks": [self._hook_view(w) for w in self.store.webhooks()]}

    async def create_webhook(self, request, body):
        topics = body.get("topics", ["*"])
        if len(topics) > MAX_TOPICS:
            raise ApiError(400, "invalid_field", f"at most {MAX_TOPICS} topics", "topics")
        try:
            self.guard.check_url(body["url"], ("http", "https"))
        except OutboundRefused as exc:
            raise ApiError(400, "refused_address", f"{exc.reason} addresses are not allowed as webhook URLs "
                                                   "(http.outbound_allow)", "url") from None
        except ValueError as exc:
            raise ApiError(400, "invalid_field", str(exc), "url") from None
        for i, t in enumerate(topics):
            if not valid_topic(t):
                raise ApiError(400, "invalid_field", f"unknown topic {t!r}", f"topics[{i}]")
        wh = self.store.add_webhook(body["url"], topics, body.get("secret") or secrets.token_hex(32))
        self.services.webhooks.hooks_changed()
        return 201, self._hook_view(wh, secret=True)

    async def delete_webhook(self, request):
        if not self.store.delete_webhook(request.match_info["webhook_id"]):
            raise ApiError(404, "not_found", "no such webhook", "webhook_id")
        self.services.webhooks.hooks_changed()
        return 200, {"deleted": request.match_info["webhook_id"]}

    async def list_deliveries(self, request):
        status = request.query.get("status")
        if status not in (None, "pending", "sending", "delivered", "failed", "dead"):
            raise ApiError(400, "invalid_field", "unknown status", "status")
        return 200, {"deliveries": self.store.deliveries(status)}

    async def replay_delivery(self, request, body):
        d = self.services.webhooks.replay(request.match_info["delivery_id"])
        if d is None:
            raise ApiError(404, "not_found", "no such delivery", "delivery_id")
        return 200, d

    async def list_events(self, request):
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            raise ApiError(400, "invalid_field", "since must be an integer", "since") from None
        if self.services.bus is not None:       # what this cell has already published, committed first
            await self.services.bus.settled()
        rows = await asyncio.to_thread(read_events, self.store.path, since, 1000)
        self.audited(request, f"events>{since}")
        return 200, {"events": [from_row(r) for r in rows]}

    # -- WebSocket ---------------------------------------------------------------------------------
    async def post_tool_result(self, request, body):
        """An async tool's result: checked against the signed URL, then told to the live call."""
        call_id, tcid = request.match_info["call_id"], request.match_info["tool_call_id"]
        tools = self.services.tools
        tool = tools.take_pending(call_id, tcid, request.query.get("sig", "")) if tools is not None else None
        if tool is None:
            raise ApiError(404, "not_found", "no pending tool call at this URL (unknown, already answered or "
                           "bad signature)")
        result, say = tools.map_async(tool, body)
        s = self.services.calls.get(call_id)
        delivered = s is not None and hasattr(s.app, "on_tool_result")
        self.services.metrics.tool_async.labels(tool, "delivered" if delivered else "call_gone").inc()
        self.services.bus.publish("tool_result", call_id, {"tool_call_id": tcid, "tool": tool, "result": result,
                                                           "delivered": delivered})
        if s is not None:
            s.tool_calls.append({"tool_call_id": tcid, "tool": tool, "status": "async_result", "result": result,
                                 "at": round(time.time(), 3)})
        if delivered:
            s.app.on_tool_result(tool, result, say)
        return 202, {"tool_call_id": tcid, "delivered": delivered}

    # -- OpenAPI --------------------------------------------------------------------------------------
    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_spec())


def openapi_spec() -> dict:
    error = {"type": "object", "properties": {"error": {"type": "object", "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"}},
        "required": ["code", "message"]}}, "required": ["error"]}
    paths: dict = {}
    for r in ROUTES:
        op = {"summary": r.summary, "operationId": r.handler,
              "security": [] if r.scope == "callback" else [{"bearer": []}],
              "x-scope": r.scope,
              "responses": {str(r.status): {"description": "OK", "content": {"application/json": {"schema": {
                  "type": "object"}}}},
                  "400": {"description": "Invalid request", "content": {"application/json": {"schema": error}}},
                  "401": {"description": "Missing or invalid key", "content": {"application/json": {"schema": error}}},
                  "403": {"description": "Key lacks the scope", "content": {"application/json": {"schema": error}}},
                  "404": {"description": "Not found", "content": {"application/json": {"schema": error}}},
                  "409": {"description": "Wrong state", "content": {"application/json": {"schema": error}}},
                  "429": {"description": "Rate limited (per key) or queue full; see Retry-After",
                          "content": {"application/json": {"schema": error}}}}}
        if r.method in ("POST", "PUT"):
            op["responses"]["413"] = {"description": "Body larger than 64 KiB",
                                      "content": {"application/json": {"schema": error}}}
        params = [{"name": p.strip("{}"), "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in r.path.split("/") if p.startswith("{")]
        if r.method != "GET":
            params.append({"name": "Idempotency-Key", "in": "header", "required": False,
                           "schema": {"type": "string", "maxLength": 255}})
            op["responses"]["422"] = {"description": "Idempotency-Key reused for another request",
                                      "content": {"application/json": {"schema": error}}}
        if r.handler == "list_calls":
            params += [{"name": "state", "in": "query", "schema": {"type": "string", "enum": ["active", "ended"]}},
                       {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}}]
        if r.handler == "list_recordings":
            params += [{"name": "call_id", "in": "query", "schema": {"type": "string"}},
                       {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}}]
        if r.handler == "recording_audio":
            binary = {"schema": {"type": "string", "format": "binary"}}
            op["responses"]["200"] = {"description": "The decrypted recording",
                                      "content": {"audio/ogg": binary, "audio/wav": binary}}
            op["responses"]["410"] = {"description": "The file is gone",
                                      "content": {"application/json": {"schema": error}}}
            op["responses"]["422"] = {"description": "recording_corrupt: the file failed authentication",
                                      "content": {"application/json": {"schema": error}}}
        if r.handler == "list_events":
            params.append({"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0}})
        if r.handler == "list_audit":
            params += [{"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                       {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                       {"name": "key_id", "in": "query", "schema": {"type": "string"}},
                       {"name": "caller", "in": "query", "schema": {"type": "string"}},
                       {"name": "object", "in": "query", "schema": {"type": "string"}}]
        if r.handler == "list_deliveries":
            params.append({"name": "status", "in": "query", "schema": {
                "type": "string", "enum": ["pending", "sending", "delivered", "failed", "dead"]}})
        if params:
            op["parameters"] = params
        if r.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": r.body}}}
        if r.raw:
            op["responses"] = {"101": {"description": "Switching protocols"},
                               **{k: v for k, v in op["responses"].items() if k != str(r.status)}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    paths["/v1/ws"] = {"get": {"summary": "Event WebSocket: send {type: subscribe, topics, since}; receives "
                                          "{type: event|heartbeat|subscribed|error}", "operationId": "websocket",
                               "security": [{"bearer": []}],
                               "responses": {"101": {"description": "Switching protocols"},
                                             "400": {"description": "Not a WebSocket upgrade request"},
                                             "401": {"description": "Missing or invalid key"},
                                             "429": {"description": "Rate limited (Retry-After)"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Trunkline control API", "version": __version__,
                 "description": "Calls, transcribes, speakings, numbers, webhooks and events. "
                                f"Event types: {', '.join(EVENT_TYPES)}."},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }
