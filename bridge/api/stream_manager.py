"""A cell's media streams (``bridge/api/streams.py``): the checks before one starts, the
lookup by id and call, the end of them at hang-up and shutdown, and the one HTTP client
(under the SSRF guard) that outbound streams connect with."""
from __future__ import annotations

import asyncio
from collections import deque

import aiohttp

from bridge.api.streams import MediaStream, StreamRefused
from bridge.core.guarded_http import guarded_session
from bridge.core.netguard import OutboundRefused
from bridge.core.states import CallState, SpeakingState
from media import twilio as tw
from media.opus import OpusEncoder, OpusError
from media.streamcodec import ENCODINGS


class StreamManager:
    """The cell's media streams: start, look up, end; one HTTP client for outbound ones."""

    KEEP_ENDED = 500       # ended streams kept for GET (their final stats)

    def __init__(self, services):
        """``services``: a cell's ``bridge.api.services.Services`` (its cfg and metrics)."""
        self.services = services
        self.cfg = services.cfg.raw["streams"]
        self.metrics = services.metrics
        self.streams: dict[str, MediaStream] = {}
        self._ended: deque[str] = deque()
        self._http: aiohttp.ClientSession | None = None
        self.guard = services.cfg.outbound      # the SSRF guard for outbound stream URLs

    def http(self) -> aiohttp.ClientSession:
        """Outbound connections obey the SSRF guard (checked, pinned addresses; no redirects)."""
        if self._http is None or self._http.closed:
            self._http = guarded_session(self.guard, metric=getattr(self.metrics, "outbound_refused", None),
                                         use="stream")
        return self._http

    def get(self, stream_id: str) -> MediaStream | None:
        return self.streams.get(stream_id)

    def for_call(self, call_id: str) -> list[MediaStream]:
        return [s for s in self.streams.values() if s.call_id == call_id]

    def start(self, session, url: str | None, direction: str, encoding: str, bidirectional: bool,
              protocol: str = "trunkline", parameters: dict | None = None, account_sid: str | None = None,
              bot: bool = False) -> MediaStream:
        """``bot``: the stream is the call's app (a number routed to a bot): it may play into the call."""
        if protocol not in tw.PROTOCOLS:
            raise StreamRefused(400, "invalid_field", f"protocol: one of {', '.join(tw.PROTOCOLS)}", "protocol")
        if protocol == "twilio" and encoding != tw.ENCODING:
            raise StreamRefused(400, "invalid_field", "encoding: Twilio Media Streams carry mulaw only", "encoding")
        if url is not None:
            try:
                self.guard.check_url(url, ("ws", "wss"))
            except OutboundRefused as exc:
                raise StreamRefused(400, "refused_address", f"url: {exc.reason} addresses are not allowed "
                                                            "(http.outbound_allow)", "url") from None
            except ValueError as exc:
                raise StreamRefused(400, "invalid_field", f"url: {exc}", "url") from None
        if session.ending or session.state == CallState.ENDED:
            raise StreamRefused(409, "call_ended", f"call {session.call_id} is ending")
        live = [s for s in self.for_call(session.call_id) if s.live]
        if len(live) >= self.cfg["max_per_call"]:
            raise StreamRefused(409, "too_many_streams",
                                f"the call already has {len(live)} streams (streams.max_per_call)")
        if bidirectional:
            if session.app_name != "api" and not bot:
                raise StreamRefused(409, "wrong_app", "a bidirectional stream plays into the call, so it needs a "
                                                      f"call handled by the API app (this one: {session.app_name})",
                                    "bidirectional")
            if any(s.bidirectional for s in live):
                raise StreamRefused(409, "wrong_state", "the call already has a bidirectional stream", "bidirectional")
            if any(sp.status != SpeakingState.STOPPED for sp in session.speakings.values()):
                raise StreamRefused(409, "wrong_state", "the call has a speaking session playing into it",
                                    "bidirectional")
        if encoding == "opus":
            try:
                OpusEncoder(ENCODINGS["opus"])
            except OpusError as exc:
                raise StreamRefused(409, "encoding_unavailable", str(exc), "encoding") from None
        st = MediaStream(self, session, url, direction, encoding, bidirectional, protocol, parameters, account_sid,
                         bot)
        self.streams[st.id] = st
        st.begin()
        self.metrics.streams_active.inc()
        return st

    def ended(self, st: MediaStream) -> None:
        self.metrics.streams_active.dec()
        self._ended.append(st.id)
        while len(self._ended) > self.KEEP_ENDED:
            self.streams.pop(self._ended.popleft(), None)

    def call_ended(self, call_id: str) -> None:
        for st in self.for_call(call_id):
            st.stop("call_ended")

    async def close(self, grace: float = 2.0) -> None:
        """Cell shutdown: stop every stream, give them ``grace`` seconds to say ``stop``."""
        tasks = []
        for st in list(self.streams.values()):
            st.stop("shutdown")
            if st._task is not None:
                tasks.append(st._task)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
