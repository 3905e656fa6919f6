"""A number routed straight to a bot (``bridge/core/numbers.py``): the call's app is a
bidirectional media stream to the bot's URL (Twilio Media Streams or Trunkline's own)."""
from __future__ import annotations

from bridge.api.stream_manager import StreamManager
from bridge.api.streams import MediaStream
from bridge.core.app import App
from bridge.core.numbers import BotRoute
from sip.uri import user_part


class BotApp(App):
    """A number routed straight to a bot: the call is answered, a bidirectional stream
    connects out to the bot, the bot's audio is the call's audio, and the call ends
    when the stream does (the bot closed the socket, or it could not be reached)."""
    name = "stream"

    def __init__(self, session, manager: StreamManager, route: BotRoute, api_base: str):
        super().__init__(session)
        self.manager = manager
        self.route = route
        self.api_base = route.api_base or api_base
        self.stream: MediaStream | None = None

    def parameters(self) -> dict[str, str]:
        """``customParameters`` (Twilio) / ``start.parameters`` (Trunkline): the route's own, then
        the call's: numbers, direction, trunk, its id and where to hang it up."""
        s = self.session
        return {**self.route.parameters, "from": user_part(s.from_uri), "to": user_part(s.to_uri),
                "direction": s.direction, "trunk": s.trunk or "", "call_id": s.call_id,
                "api_base": self.api_base}

    def on_answered(self) -> None:
        r = self.route
        self.stream = self.manager.start(self.session, r.url, "in", r.encoding, True, r.protocol,
                                         self.parameters(), r.account_sid, bot=True)
        self.stream.on_stopped = self._stream_stopped

    def _stream_stopped(self, reason: str) -> None:
        if reason != "call_ended":
            self.session.hangup(f"bot stream {reason}")

    def on_dtmf(self, digit: str) -> None:
        if self.stream is not None:
            self.stream.on_dtmf(digit)
