"""The control API's call media resources: media streams (``bridge/api/streams.py``) and
recordings (``bridge/records/recording.py``). ``MediaApi`` is a part of ``bridge.api.routes.Api``:
its handlers use the same plumbing (``session``, ``auth``) and are registered from
``MEDIA_ROUTES`` like every other route.
"""
from __future__ import annotations

import logging

from aiohttp import web

from bridge.api.base import DIRECTION, ApiError, Route, error_response
from bridge.api.twilio import TwilioApi
from bridge.core import numbers as number_routes
from bridge.core.app import APPS
from bridge.core.netguard import OutboundRefused
from bridge.core.logs import event
from bridge.records.recording import FORMATS as REC_FORMATS, RecordingError
from bridge.core.schema import obj
from bridge.core.states import StreamState
from bridge.records.sealed import SealedError
from bridge.api.streams import MediaStream, StreamRefused
from media.streamcodec import ENCODINGS as STREAM_ENCODINGS
from media.twilio import PROTOCOLS as STREAM_PROTOCOLS

# PUT /v1/numbers/{number}: an app, or (app "stream") a bot the number's calls go straight to
NUMBER_ROUTE = obj(["app"], app={"type": "string", "enum": [*APPS, "stream"]},
                   url={"type": "string", "pattern": r"^wss?://", "maxLength": 2048},
                   protocol={"type": "string", "enum": list(STREAM_PROTOCOLS)},
                   parameters={"type": "object"}, account_sid={"type": "string", "maxLength": 64},
                   encoding={"type": "string", "enum": list(STREAM_ENCODINGS)},
                   api_base={"type": "string", "pattern": r"^https?://", "maxLength": 2048},
                   # app "agent": a profile ([profiles.NAME]) and/or its fields inline (bridge/core/profiles.py)
                   profile={"type": "string", "maxLength": 64}, system_prompt={"type": "string", "maxLength": 8192},
                   greeting={"type": "string", "maxLength": 8192}, voice={"type": "string", "maxLength": 1024},
                   language={"type": "string", "maxLength": 16},
                   tools={"type": "array", "items": {"type": "string"}, "maxItems": 100},
                   transfer={"type": "array", "items": {"type": "string"}, "maxItems": 100})

CONFIG_ONLY = ("system_prompt", "greeting", "voice", "tools", "transfer")   # profile fields the API cannot set

log = logging.getLogger("trunkline.api")

MEDIA_ROUTES = [
    Route("POST", "/v1/calls/{call_id}/recording", "call_recording", "control",
          "Start, stop, pause (silence, e.g. while a card number is given) or resume the call's recording",
          obj(["action"], action={"type": "string", "enum": ["start", "stop", "pause", "resume"]},
              format={"type": "string", "enum": ["opus", "wav"]})),
    Route("GET", "/v1/recordings", "list_recordings", "read", "Recordings, newest first (?call_id=, ?limit=)"),
    Route("GET", "/v1/recordings/{recording_id}", "get_recording", "read",
          "A recording's metadata: status, duration, bytes, key id, paused intervals, completeness"),
    Route("GET", "/v1/recordings/{recording_id}/audio", "recording_audio", "recordings",
          "The recording decrypted (audio/ogg or audio/wav; stereo, caller left); X-Recording-Complete says "
          "whether it was cut short"),
    Route("DELETE", "/v1/recordings/{recording_id}", "delete_recording", "recordings",
          "Delete a recording's file and metadata"),
    Route("POST", "/v1/calls/{call_id}/streams", "create_stream", "control",
          "Stream the call's audio over a WebSocket: the bridge connects to url, or a client connects in at ws_path",
          obj([], url={"type": "string", "pattern": r"^wss?://", "maxLength": 2048}, direction=DIRECTION,
              encoding={"type": "string", "enum": list(STREAM_ENCODINGS)}, bidirectional={"type": "boolean"},
              protocol={"type": "string", "enum": list(STREAM_PROTOCOLS)}), 201),
    Route("GET", "/v1/calls/{call_id}/streams", "list_streams", "read", "Media streams of a call"),
    Route("GET", "/v1/calls/{call_id}/streams/{stream_id}", "get_stream", "read", "A media stream and its counters"),
    Route("POST", "/v1/calls/{call_id}/streams/{stream_id}/stop", "stop_stream", "control", "Stop a media stream",
          obj()),
    Route("GET", "/v1/calls/{call_id}/streams/{stream_id}/ws", "stream_socket", "read",
          "WebSocket for a stream started without url (a bidirectional one needs a control key); "
          "messages: start, media, mark, error, stop; send media, mark, clear", raw=True),
]


class MediaApi(TwilioApi):
    # -- number routes straight to a bot (bridge/core/numbers.py) ----------------------------------------
    def number_route(self, body: dict) -> tuple[str, dict]:
        """A PUT /v1/numbers body checked: (what the store keeps, what the API answers)."""
        if body["app"] == "agent" and set(body) - {"app"}:
            return self.agent_number_route(body)
        if body["app"] != "stream":
            extra = sorted(set(body) - {"app"})
            if extra:
                raise ApiError(400, "invalid_field", f"{extra[0]}: only a stream route takes it", extra[0])
            return body["app"], {"app": body["app"]}
        if "url" not in body:
            raise ApiError(400, "missing_field", "a stream route needs url", "url")
        try:
            route = number_routes.bot_route(body)
            self.services.cfg.outbound.check_url(route.url, ("ws", "wss"))
        except OutboundRefused as exc:
            raise ApiError(400, "refused_address", f"url: {exc.reason} addresses are not allowed "
                                                   "(http.outbound_allow)", "url") from None
        except ValueError as exc:
            field = str(exc).partition(":")[0]
            raise ApiError(400, "invalid_field", str(exc), field if field in body else None) from None
        return number_routes.encode(route), route.as_dict()

    def agent_number_route(self, body: dict) -> tuple[str, dict]:
        """An agent route with a profile: its fields checked as the config's are (400 naming the field)."""
        from bridge.core.config import ConfigError, check_profile
        cfg = self.services.cfg
        inline = sorted(k for k in CONFIG_ONLY if k in body)
        if inline:
            # a prompt, a greeting, a voice file or a tool list is the operator's, in the config file:
            # through the API a control key could load any file as a voice (and learn which exist),
            # queue minutes of synthesis per call, or reprogram what the agent asks callers
            raise ApiError(400, "invalid_field", f"{inline[0]}: set in a [profiles.NAME] table of the config file; "
                           "a number route names the profile (and a configured language)", inline[0])
        try:
            route = number_routes.agent_route(body)
        except ValueError as exc:
            field = str(exc).partition(":")[0]
            raise ApiError(400, "invalid_field", str(exc), field if field in body else None) from None
        if route.profile and route.profile not in cfg.raw["profiles"]:
            raise ApiError(400, "invalid_field", f"no profile {route.profile!r} (configured: "
                           f"{', '.join(sorted(cfg.raw['profiles'])) or 'none'})", "profile")
        try:
            check_profile("route", route.fields, cfg.raw, set(cfg.toolbox.tools) if cfg.toolbox else set())
        except ConfigError as exc:
            field = str(exc).partition(":")[0].removeprefix("route.").partition(".")[0]
            raise ApiError(400, "invalid_field", str(exc).removeprefix("route."), field) from None
        return number_routes.encode(route), route.as_dict()

    @staticmethod
    def number_views(stored: dict[str, str]) -> dict:
        return {number: number_routes.view(text) for number, text in stored.items()}

    # -- media streams (bridge/api/streams.py) ----------------------------------------------------------
    async def create_stream(self, request, body):
        s = self.session(request.match_info["call_id"])
        try:
            st = self.services.streams.start(s, body.get("url"), body.get("direction", "in"),
                                             body.get("encoding", "mulaw"), body.get("bidirectional", False),
                                             body.get("protocol", "trunkline"))
        except StreamRefused as e:
            raise ApiError(e.status, e.code, e.message, e.field) from None
        return 201, st.as_dict()

    async def list_streams(self, request):
        cid = request.match_info["call_id"]
        found = self.services.streams.for_call(cid)
        if not found and cid not in self.services.calls and self.store.get_call(cid) is None:
            raise ApiError(404, "not_found", "no such call", "call_id")
        return 200, {"streams": [st.as_dict() for st in found]}

    def _stream(self, request) -> MediaStream:
        st = self.services.streams.get(request.match_info["stream_id"])
        if st is None or st.call_id != request.match_info["call_id"]:
            raise ApiError(404, "not_found", "no such stream", "stream_id")
        return st

    async def get_stream(self, request):
        return 200, self._stream(request).as_dict()

    async def stop_stream(self, request, body):
        st = self._stream(request)
        if not st.live:
            raise ApiError(409, "wrong_state", f"the stream is {st.status}")
        st.stop("api")
        return 200, st.as_dict()

    async def stream_socket(self, request: web.Request) -> web.StreamResponse:
        try:
            key = self.auth(request, "read")
            st = self._stream(request)
            if st.bidirectional and key["scope"] != "control":
                raise ApiError(403, "forbidden", "a bidirectional stream plays into the call: it needs a control key")
            if st.url:
                raise ApiError(409, "wrong_state", "this stream connects out to its url")
            if st.status != StreamState.WAITING:
                raise ApiError(409, "wrong_state", f"the stream is {st.status}"
                               + (" (one client at a time)" if st.status == StreamState.STREAMING else ""))
        except ApiError as e:
            return error_response(e.status, e.code, e.message, e.field,
                                  {"WWW-Authenticate": "Bearer"} if e.status == 401 else None)
        return await st.accept(request)

    # -- recordings (bridge/records/recording.py) ------------------------------------------------------------
    async def call_recording(self, request, body):
        s = self.session(request.match_info["call_id"])
        recs = self.services.recordings
        action = body["action"]
        try:
            if action == "start":
                rec = recs.start(s, body.get("format"), "api")
                return 201, recs.view(rec.as_row())
            rec = recs.for_call(s.call_id)
            if rec is None:
                raise ApiError(409, "not_recording", "the call is not being recorded")
            if action == "pause" and not rec.pause("api"):
                raise ApiError(409, "wrong_state", "the recording is already paused")
            if action == "resume" and not rec.resume():
                raise ApiError(409, "wrong_state", "the recording is not paused")
            if action == "stop":
                rec.stop("api")
            return 200, recs.view(rec.as_row())
        except RecordingError as e:
            raise ApiError(e.status, e.code, e.message) from None

    async def list_recordings(self, request):
        try:
            limit = max(1, min(500, int(request.query.get("limit", "50"))))
        except ValueError:
            raise ApiError(400, "invalid_field", "limit must be an integer", "limit") from None
        recs = self.services.recordings
        return 200, {"recordings": [recs.view(r) for r in recs.rows(request.query.get("call_id"), limit)]}

    async def get_recording(self, request):
        row = self.services.recordings.row(request.match_info["recording_id"])
        if row is None:
            raise ApiError(404, "not_found", "no such recording", "recording_id")
        return 200, self.services.recordings.view(row)

    async def recording_audio(self, request):
        """Authenticated as a whole before the first byte; a chunk that fails on the way aborts the body."""
        rid = request.match_info["recording_id"]
        key = request["api_key"]                   # checked by the route's "recordings" scope
        try:
            row, total, complete, chunks = await self.services.recordings.open_audio(rid)
        except RecordingError as e:
            raise ApiError(e.status, e.code, e.message, "recording_id" if e.status == 404 else None) from None
        ctype, ext = REC_FORMATS[row["format"]]
        resp = web.StreamResponse(headers={
            "Content-Type": ctype, "Content-Length": str(total), "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="{rid}.{ext}"',
            "X-Recording-Complete": "true" if complete else "false", "X-Recording-Key-Id": row["key_id"]})
        event(log, "recording_downloaded", recording_id=rid, call_id=row["call_id"], key=key["id"],
              complete=complete, bytes=total)
        self.audited(request, rid)
        await resp.prepare(request)
        try:
            async for piece in chunks:
                await resp.write(piece)
        except SealedError as exc:
            self.services.metrics.recording_encryption_failures.inc()
            log.error("recording %s failed authentication during download: %s", rid, exc)
            raise ConnectionAbortedError("recording failed authentication") from None
        await resp.write_eof()
        return resp

    async def delete_recording(self, request):
        rid = request.match_info["recording_id"]
        try:
            self.services.recordings.delete(rid)
        except RecordingError as e:
            raise ApiError(e.status, e.code, e.message, "recording_id" if e.status == 404 else None) from None
        event(log, "recording_deleted", recording_id=rid)
        return 200, {"deleted": rid}
