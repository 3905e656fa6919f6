"""Call applications: what a call does with its audio.

An app instance belongs to one call. The cell calls ``on_frames`` with the
caller's frames drained from the uplink queue and ``on_tick`` every 20 ms;
the app writes what the caller should hear into ``session.media.downlink``.
"""
from __future__ import annotations

import functools

from bridge.core.app import APPS, App  # noqa: F401 (re-exported)
from media.frames import split_frames
from media.wav import read_wav

PREBUFFER_FRAMES = 5   # how far playback runs ahead of the clock (100 ms)


class EchoApp(App):
    """The caller hears themselves, frame for frame."""
    name = "echo"

    def on_frames(self, frames, now):
        push = self.session.media.downlink.push
        for _, pcm in frames:
            push(pcm)


@functools.lru_cache(maxsize=8)
def load_prompt(path: str, rate: int) -> tuple[bytes, ...]:
    pcm, _ = read_wav(path, rate)
    return tuple(split_frames(pcm, rate))


class PlaybackApp(App):
    """Plays a WAV prompt (resampled to the call's rate), then hangs up or loops."""
    name = "playback"

    def __init__(self, session, prompt: str, loop: bool = False):
        super().__init__(session)
        self.frames = load_prompt(prompt, session.media.rate)
        self.loop = loop
        self.pos = 0
        self.done = False

    def on_tick(self, now):
        media = self.session.media
        while media.queued_out() < PREBUFFER_FRAMES and self.pos < len(self.frames):
            media.downlink.push(self.frames[self.pos])
            self.pos += 1
        if self.pos >= len(self.frames):
            if self.loop:
                self.pos = 0
            elif not self.done and media.queued_out() == 0:
                self.done = True
                self.session.hangup("playback finished")


class ApiApp(App):
    """No local AI: the call is driven through the control API (transcribes, speakings)."""
    name = "api"

    def on_frames(self, frames, now):
        listeners = [t for t in self.session.transcribers.values() if t.hears_caller()]
        for t, pcm in frames:
            for tr in listeners:
                tr.on_frame(t, pcm)

    def on_tick(self, now):
        for sp in self.session.speakings.values():
            if sp.status == "active":
                sp.tick()

    def on_end(self):
        for tr in self.session.transcribers.values():
            tr.stop()
        for sp in self.session.speakings.values():
            sp.stop()




def make_app(name: str, session, cell) -> App:
    app_cfg = cell.cfg.raw["app"]
    if name == "echo":
        return EchoApp(session)
    if name == "playback":
        return PlaybackApp(session, app_cfg["prompt"], app_cfg["loop"])
    if name == "agent":
        from bridge.agent.app import AgentApp
        return AgentApp(session, cell.hub, cell.cfg.raw["agent"], cell.metrics, cell.turns,
                        tools=cell.tools, tool_settings=cell.cfg.raw["tools"])
    if name == "api":
        return ApiApp(session)
    raise ValueError(f"app {name!r} is not available in this build")
