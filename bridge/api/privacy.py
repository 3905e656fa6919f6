"""The control API's privacy resources: a caller's export (an access request) and the access audit.

``PrivacyApi`` is a part of ``bridge.api.routes.Api`` (its handlers use the same
plumbing and are registered from ``PRIVACY_ROUTES``). It owns the access audit
trail (``bridge/records/audit.py``): ``audited(request, object)`` appends one
row for a read of a caller's words or media, and the routes that do such reads
call it (transcripts, event replays, recording downloads, exports, erasures).

- ``GET /v1/callers/{number}/export`` (control scope, audited): everything held
  about the caller, decrypted by the store, as JSON: each call with its
  transcript, events, turn and call records (the JSONL journals, tool audits
  included) and its recordings as links to ``/v1/recordings/{id}/audio``.
- ``GET /v1/audit`` (``audit`` scope only, itself audited): the trail, oldest
  first, paginated by ``?after=SEQ&limit=N`` (``next`` is the cursor to pass on),
  filtered by ``?key_id=``, ``?object=`` (a call, recording id) or ``?caller=NUMBER`` (matched by its
  keyed hash, never stored).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import web

from bridge.api.base import ApiError, Route
from bridge.api.events import from_row
from bridge.records.audit import AuditTrail
from bridge.records.cipher import normalize_number
from bridge.records.journal import CallRecords

log = logging.getLogger("trunkline.api")

EVENT_PAGE = 1000

PRIVACY_ROUTES = [
    Route("GET", "/v1/callers/{number}/export", "export_caller", "control",
          "Everything held about a caller (calls, transcripts, events, turn records, recordings as links), "
          "decrypted, for an access request; audited"),
    Route("GET", "/v1/audit", "list_audit", "audit",
          "The access audit (who read which transcript, events, recording, export, erasure): "
          "?after=SEQ&limit=N, ?key_id=, ?object=, ?caller=NUMBER; needs a key with the audit scope"),
]


def read_journal(data_dir: str, name: str, call_ids: set[str]) -> dict[str, list]:
    """A JSONL journal's records of ``call_ids``, opened (in a worker thread)."""
    out: dict[str, list] = {}
    for rec in CallRecords(data_dir, name=name).read():
        if rec.get("call_id") in call_ids:
            out.setdefault(rec["call_id"], []).append(rec)
    return out


class PrivacyApi:
    """Mixed into ``Api``: expects ``self.services``, ``self.store`` and ``self._call_view``."""

    _audit_trail: AuditTrail | None = None

    @property
    def audit_trail(self) -> AuditTrail:
        if self._audit_trail is None:
            self._audit_trail = AuditTrail(self.store.path, self.services.cell_id)
        return self._audit_trail

    def close_audit(self) -> None:
        if self._audit_trail is not None:
            self._audit_trail.close()
            self._audit_trail = None

    def audited(self, request: web.Request, obj: str | None, key: dict | None = None) -> None:
        """Append one access to the trail: the key, the route's template, ``obj``, the peer address."""
        key = key if key is not None else request.get("api_key") or {}
        resource = request.match_info.route.resource
        path = resource.canonical if resource is not None else request.path
        self.audit_trail.record(key.get("id", "?"), f"{request.method} {path}", obj, request.remote)

    # -- export ---------------------------------------------------------------------------------
    async def export_caller(self, request):
        given = request.match_info["number"]
        number = normalize_number(given)
        if not number or len(given) > 64:
            raise ApiError(400, "invalid_field", "number: the caller's number (or SIP user)", "number")
        self.audited(request, self.audit_trail.caller_ref(number))
        if self.services.bus is not None:        # what this cell has already done, committed first
            await self.services.bus.settled()
        calls = [r for r in map(self.store.get_call, self.store.caller_calls(number)) if r is not None]
        calls.sort(key=lambda r: r["created"] or 0)
        ids = {r["id"] for r in calls}
        events: dict[str, list] = {}
        cursor = 0
        while ids:
            rows = self.store.events_since(cursor, EVENT_PAGE)
            for row in rows:
                if row["call_id"] in ids:
                    events.setdefault(row["call_id"], []).append(from_row(row))
            if len(rows) < EVENT_PAGE:
                break
            cursor = rows[-1]["seq"]
            await asyncio.sleep(0)               # the loop also runs the media tick
        data_dir = self.services.cfg.data_dir
        turns = await asyncio.to_thread(read_journal, data_dir, "turns.jsonl", ids)
        records = await asyncio.to_thread(read_journal, data_dir, "calls.jsonl", ids)
        out = []
        for row in calls:
            cid = row["id"]
            view = self._call_view(row)
            view["transcript"] = self.store.transcript(cid)
            view["events"] = events.get(cid, [])
            view["turns"] = turns.get(cid, [])
            view["records"] = records.get(cid, [])
            view["recordings"] = [self._recording_link(r) for r in self._recording_rows(cid)]
            out.append(view)
        return 200, {"caller": given, "generated": time.time(), "calls": out}

    def _recording_rows(self, call_id: str) -> list[dict]:
        recs = self.services.recordings
        if recs is not None:
            return [recs.view(r) for r in recs.rows(call_id, 1000)]
        return [dict(r) for r in self.store.db.execute(
            "SELECT id, call_id, status, format, started, ended, duration, bytes, key_id FROM recordings "
            "WHERE call_id = ? ORDER BY started", (call_id,)).fetchall()]

    @staticmethod
    def _recording_link(view: dict) -> dict:
        out = {k: view.get(k) for k in ("id", "status", "format", "started", "ended", "duration", "bytes")
               if k in view}
        out["audio"] = f"/v1/recordings/{view['id']}/audio"
        return out

    # -- the audit trail ------------------------------------------------------------------------
    async def list_audit(self, request):
        q = request.query
        try:
            after = max(0, int(q.get("after", "0")))
            limit = max(1, min(1000, int(q.get("limit", "100"))))
        except ValueError:
            raise ApiError(400, "invalid_field", "after and limit must be integers") from None
        obj = None
        if q.get("caller"):
            obj = self.audit_trail.caller_ref(q["caller"])
        elif q.get("object"):
            obj = q["object"]
        self.audited(request, "audit")
        trail = self.audit_trail
        await trail.settled()                    # reads made just before are listed
        rows = await asyncio.to_thread(trail.rows, after, limit, q.get("key_id") or None, obj)
        return 200, {"entries": rows, "next": rows[-1]["seq"] if len(rows) == limit else None}
