"""What every part of the control API shares: the error type and its JSON shape,
the route declaration, and schema fragments used by more than one route."""
from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

DIRECTION = {"type": "string", "enum": ["in", "out", "both"]}
TEXT = {"type": "string", "minLength": 1, "maxLength": 2000}
URI_OR_NUMBER = {"type": "string", "minLength": 1, "maxLength": 256, "pattern": r"^(sips?:|tel:|\+?[0-9*#]+$)"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def error_response(status: int, code: str, message: str, field: str | None = None, headers=None) -> web.Response:
    err = {"code": code, "message": message}
    if field:
        err["field"] = field
    return web.json_response({"error": err}, status=status, headers=headers)


@dataclass
class Route:
    method: str
    path: str
    handler: str
    scope: str                    # "read", "control", or "callback" (signed URL instead of a key)
    summary: str
    body: dict | None = None
    status: int = 200
    raw: bool = False             # the handler answers the request itself (a WebSocket)
