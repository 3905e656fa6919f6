"""aiohttp clients that obey the outbound address policy (``bridge.core.netguard``).

``GuardedConnector`` checks what every host resolves to (a literal address
included) *inside* the connector, right before it connects, and connects to
exactly the addresses it checked: a DNS answer that changes between a check
and the connection (rebinding) cannot slip a refused address in. Redirects
are refused too (``allow_redirects=False`` on requests; a trace hook stops
the ones aiohttp would follow by itself, e.g. in a WebSocket handshake).

``failure_class`` turns an exception into the few words the API may show
("refused address", "connect failed", "timeout", ...): never an address,
a response body or an exception text.
"""
from __future__ import annotations

import asyncio
import logging

import aiohttp

from bridge.core.netguard import DEFAULT, REFUSED, OutboundRefused, Policy

log = logging.getLogger("trunkline.netguard")

REDIRECT = "redirect refused"


class RefusedConnection(aiohttp.ClientConnectionError):
    """The connector refused the address (an aiohttp error, so callers' handlers see it)."""

    def __init__(self, reason: str):
        super().__init__(f"{REFUSED} ({reason})")
        self.reason = reason


class RedirectRefused(aiohttp.ClientError):
    def __init__(self, status: int):
        super().__init__(f"{REDIRECT} ({status})")
        self.status = status


class GuardedConnector(aiohttp.TCPConnector):
    def __init__(self, policy: Policy = DEFAULT, *, metric=None, use: str = "", **kwargs):
        super().__init__(**kwargs)
        self.policy = policy
        self._metric = metric
        self._use = use

    async def _resolve_host(self, host, port, traces=None):
        results = await super()._resolve_host(host, port, traces=traces)
        try:
            self.policy.check_host(host, [r["host"] for r in results])
        except OutboundRefused as exc:
            log.warning("outbound connection refused: %s (%s)", exc.reason, self._use or "http",
                        extra={"fields": {"event": "outbound_refused", "use": self._use, "reason": exc.reason}})
            if self._metric is not None:
                self._metric.labels(self._use or "http").inc()
            raise RefusedConnection(exc.reason) from None
        return results


async def _no_redirect(session, ctx, params) -> None:
    raise RedirectRefused(params.response.status)


def guarded_session(policy: Policy = DEFAULT, *, metric=None, use: str = "", limit: int = 100,
                    **kwargs) -> aiohttp.ClientSession:
    """A ClientSession whose connections obey ``policy`` and never follow a redirect."""
    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(_no_redirect)
    connector = GuardedConnector(policy, metric=metric, use=use, limit=limit)
    return aiohttp.ClientSession(connector=connector, trace_configs=[trace], trust_env=False, **kwargs)


def failure_class(exc: BaseException) -> str:
    """A delivery failure in a few fixed words, safe to show through the API."""
    if isinstance(exc, (RefusedConnection, OutboundRefused)):
        return REFUSED
    if isinstance(exc, RedirectRefused):
        return REDIRECT
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)):
        return "timeout"
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"handshake answered {exc.status}"
    if isinstance(exc, (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch)):
        return "TLS failed"
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, ConnectionError)):
        return "connect failed"
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid URL"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"HTTP {exc.status}"
    return "request failed"
