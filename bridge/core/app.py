"""What a call application is: the base every app (echo, playback, agent, api) extends,
and the names of the apps a cell can run. No I/O here; the cell drives these hooks."""
from __future__ import annotations

APPS = ("echo", "playback", "agent", "api")


class App:
    name = "app"

    def __init__(self, session):
        self.session = session

    def on_start(self) -> None:
        pass

    def on_answered(self) -> None:
        pass

    def on_frames(self, frames: list[tuple[float, bytes]], now: float) -> None:
        """``frames``: (arrival time, 20 ms PCM) in order."""
        pass

    def on_tick(self, now: float) -> None:
        pass

    def on_dtmf(self, digit: str) -> None:
        pass

    def on_end(self) -> None:
        pass

    def on_failed(self) -> None:
        """The app raised and is dropped; no other hook follows, ``on_end`` included. Let go
        of what it holds beyond its own call (another call it set up). Must not raise."""
        pass
