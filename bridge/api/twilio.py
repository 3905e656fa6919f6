"""Hang up the Twilio way: the REST route a Twilio bot calls to end its call.

``POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`` with the form
body ``Status=completed`` (or ``canceled``) ends the call; ``GET`` on the same
path fetches it. The ``CallSid`` is a Twilio stream's ``start.callSid``
(``CA`` and 32 hex digits derived from the Trunkline call id; live calls and the
most recent ones are found by it) or the Trunkline call id itself. Authentication is HTTP basic, mapped to a Trunkline key:

- username the ``AccountSid`` of the path (any: the key decides) or the key's id
  (``key_<id>``), password the whole key (``tl_<id>_<secret>``); or
- username the key's id, password its secret (the part after ``tl_<id>_``).

Ending a call needs a ``control`` key, fetching one a ``read`` key; the per-key
rate limit applies. Answers are Twilio's: the call resource as JSON (``sid``,
``account_sid``, ``status``, ``from``, ``to``, ...) and errors as
``{"code", "message", "more_info", "status"}``. A call that has already ended
answers 200 ``completed`` (a bot's hang-up racing the caller's is no error).
In a box the hang-up goes to the call's cell.
"""
from __future__ import annotations

import base64
import binascii
import email.utils
import time
from datetime import datetime, timezone

from urllib.parse import quote

from aiohttp import web
from yarl import URL

from bridge.api.base import ApiError
from media.twilio import DEFAULT_ACCOUNT_SID, call_sid as make_call_sid

PATH = "/2010-04-01/Accounts/{AccountSid}/Calls/{call_id}.json"
END_STATUSES = ("completed", "canceled")
MORE_INFO = "https://www.twilio.com/docs/errors/{}"
SID_SEARCH = {"active": 1000, None: 200}   # calls searched for a CallSid that is not live here
# Trunkline call state -> Twilio call status
STATUS = {"ringing": "ringing", "progressing": "in-progress", "ending": "in-progress", "ended": "completed"}


class TwilioError(Exception):
    def __init__(self, status: int, code: int, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> web.Response:
        headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if self.status == 401 else None
        return web.json_response({"code": self.code, "message": self.message,
                                  "more_info": MORE_INFO.format(self.code), "status": self.status},
                                 status=self.status, headers=headers)


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(username, password) of an ``Authorization: Basic`` header, or None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        text = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = text.partition(":")
    return (user, password) if sep else None


def key_token(user: str, password: str, account_sid: str) -> str | None:
    """The Trunkline key a username/password pair stands for (checked against the store later)."""
    if password.startswith("tl_"):
        parts = password.split("_")
        if len(parts) >= 3 and user in (account_sid, f"key_{parts[1]}", parts[1]):
            return password
        return None
    kid = user[4:] if user.startswith("key_") else user
    if kid and password and "_" not in kid:
        return f"tl_{kid}_{password}"
    return None


def _rfc2822(t: float | None) -> str | None:
    return email.utils.format_datetime(datetime.fromtimestamp(t, timezone.utc)) if t else None


def call_resource(row: dict, account_sid: str, status: str | None = None) -> dict:
    """A Trunkline call row as Twilio's call resource (the fields client libraries read)."""
    created, answered, ended = row.get("created"), row.get("answered"), row.get("ended")
    sid = make_call_sid(row["id"])
    duration = str(int(round(ended - answered))) if ended and answered else None
    return {
        "sid": sid, "account_sid": account_sid, "api_version": "2010-04-01",
        "status": status or STATUS.get(row.get("state") or "", "in-progress"),
        "direction": "inbound" if row.get("direction") == "inbound" else "outbound-api",
        "from": row.get("from_uri") or "", "to": row.get("to_uri") or "",
        "from_formatted": row.get("from_uri") or "", "to_formatted": row.get("to_uri") or "",
        "date_created": _rfc2822(created), "date_updated": _rfc2822(time.time()),
        "start_time": _rfc2822(answered or created), "end_time": _rfc2822(ended), "duration": duration,
        "parent_call_sid": None, "phone_number_sid": None, "trunk_sid": None, "answered_by": None,
        "caller_name": None, "forwarded_from": None, "group_sid": None, "queue_time": "0",
        "price": None, "price_unit": "USD", "annotation": None,
        "uri": f"/2010-04-01/Accounts/{account_sid}/Calls/{sid}.json",
        "subresource_uris": {},
    }


class TwilioApi:
    """Mixed into ``bridge.api.routes.Api`` (through ``MediaApi``): uses its store, limiter and
    services; in the box (``BoxApi``: ``_owner``, ``http``) a hang-up is forwarded to the call's cell."""

    def register_twilio(self, app: web.Application) -> None:
        app.router.add_post(PATH, self.twilio_update_call)
        app.router.add_get(PATH, self.twilio_fetch_call)

    def _twilio_key(self, request: web.Request, scope: str) -> tuple[dict, str]:
        account_sid = request.match_info["AccountSid"]
        creds = basic_credentials(request.headers.get("Authorization", ""))
        token = key_token(*creds, account_sid) if creds else None
        key = self.store.check_key(token) if token else None
        if key is None:
            raise TwilioError(401, 20003, "Authenticate")
        wait = self.limiter.take(key["id"])
        if wait:
            self.services.metrics.api_limited.labels("api_rate").inc()
            raise TwilioError(429, 20429, "Too Many Requests")
        if scope == "control" and key["scope"] != "control":
            raise TwilioError(403, 20403, "this key is read-only: ending a call needs a control key")
        return key, token

    def _twilio_row(self, sid: str) -> dict:
        """The call row a CallSid names (``CA...`` from a stream's start, or a Trunkline call id)."""
        row = None
        if sid.startswith("CA") and len(sid) == 34:
            found = [cid for cid in self.services.calls if make_call_sid(cid) == sid]
            if found:
                row = self.store.get_call(found[0])
            else:
                for state, limit in SID_SEARCH.items():
                    row = next((r for r in self.store.list_calls(state, limit)
                                if make_call_sid(r["id"]) == sid), None)
                    if row is not None:
                        break
        if row is None:
            row = self.store.get_call(sid)
        if row is None:
            raise TwilioError(404, 20404, f"The requested resource /2010-04-01/Accounts/.../Calls/{sid}.json "
                                          "was not found")
        return row

    async def twilio_fetch_call(self, request: web.Request) -> web.Response:
        try:
            self._twilio_key(request, "read")
            row = self._twilio_row(request.match_info["call_id"])
            return web.json_response(call_resource(row, request.match_info["AccountSid"]))
        except TwilioError as e:
            return e.response()

    async def twilio_update_call(self, request: web.Request) -> web.Response:
        try:
            _, token = self._twilio_key(request, "control")
            account_sid = request.match_info["AccountSid"] or DEFAULT_ACCOUNT_SID
            try:
                form = await request.post()
            except ValueError:
                raise TwilioError(400, 20001, "the body must be application/x-www-form-urlencoded") from None
            status = form.get("Status")
            others = sorted(k for k in form if k != "Status")
            if status is None:
                raise TwilioError(400, 20001, "Status is required (only Status=completed or canceled is supported)")
            if status not in END_STATUSES:
                raise TwilioError(400, 20001, f"Status {status!r} is not supported: completed or canceled")
            if others:
                raise TwilioError(400, 20001, f"parameter {others[0]} is not supported (only Status)")
            row = self._twilio_row(request.match_info["call_id"])
            if row.get("ended"):
                return web.json_response(call_resource(row, account_sid, "completed"))
            await self._twilio_hangup(row["id"], token)
            return web.json_response(call_resource(self.store.get_call(row["id"]) or row, account_sid, status))
        except TwilioError as e:
            return e.response()

    async def _twilio_hangup(self, call_id: str, token: str) -> None:
        owner = getattr(self, "_owner", None)
        if owner is None:                    # a cell: the call is ours (or it has just ended)
            s = self.services.calls.get(call_id)
            if s is not None:
                s.hangup("api hangup")
            return
        try:                                 # the box: the call's cell ends it
            cell = owner(call_id)
        except ApiError as e:
            if e.status == 409:              # ended meanwhile
                return
            raise TwilioError(e.status, 20404 if e.status == 404 else 20500, e.message) from None
        url = URL(f"{cell.http}/v1/calls/{quote(call_id, safe='@')}/hangup", encoded=True)
        async with self.http.post(url, json={},
                                  headers={"Authorization": f"Bearer {token}"}) as r:
            if r.status not in (200, 404, 409):
                raise TwilioError(502 if r.status >= 500 else r.status, 20500,
                                  f"the call's cell answered {r.status}")
