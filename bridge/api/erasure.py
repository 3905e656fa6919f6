"""``POST /v1/erasures``: erase everything held about one caller (a GDPR Art. 17 request).

Part of ``bridge.api.routes.Api`` (like ``MediaApi``), registered from
``ERASURE_ROUTES`` with the control scope. The work is
``bridge.records.lifecycle.erase_caller``: call rows, transcripts, events,
deliveries, recordings (rows and files) and journal lines of the caller's calls
are deleted and the caller's key is destroyed, so whatever is left of them in
append-only files or backups cannot be read. The answer and the stored
erasure record name the caller only by a keyed hash; the API key that asked is
recorded as ``by``. A caller on a live call is refused (409): their call would
write again after the erasure; retry when it has ended.
"""
from __future__ import annotations

from bridge.api.base import ApiError, Route
from bridge.core.schema import obj
from bridge.records.cipher import caller_of, normalize_number
from bridge.records.lifecycle import erase_caller

ERASURE_ROUTES = [
    Route("POST", "/v1/erasures", "create_erasure", "control",
          "Erase everything held about a caller (calls, transcripts, events, recordings, journal lines); "
          "the erasure is recorded with the number only as a keyed hash",
          obj(["caller"], caller={"type": "string", "minLength": 1, "maxLength": 256}), 201),
]


class ErasureApi:
    async def create_erasure(self, request, body):
        number = body["caller"].strip()
        want = normalize_number(number)
        if not want:
            raise ApiError(400, "invalid_field", "caller must be a number or a SIP URI", "caller")
        self.audited(request, self.audit_trail.caller_ref(number))   # the access audit (bridge/api/privacy.py)
        if self.services.bus is not None:          # what this cell has queued lands before it is erased
            await self.services.bus.settled()
        if any(caller_of(r) == want for r in self.store.list_calls("active", 1000)):
            raise ApiError(409, "caller_active", "the caller is on a live call; erase after it ends", "caller")
        row = erase_caller(self.store, self.services.cfg.data_dir, number, request["api_key"]["id"])
        return 201, {"id": row["id"], "at": row["at"], "by": row["by"], "caller_hash": row["caller_hash"],
                     "counts": row["counts"]}
