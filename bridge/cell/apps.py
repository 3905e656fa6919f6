"""Call applications: what a call does with its audio.

An app instance belongs to one call. The cell calls ``on_frames`` with the
caller's frames drained from the uplink queue and ``on_tick`` every 20 ms;
the app writes what the caller should hear into ``session.media.downlink``.
"""
from __future__ import annotations

import functools
import re

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




_CONTEXT_REF = re.compile(r"\{context\.([A-Za-z0-9_]+)\}")


_PROMPT_SAFE = re.compile(r"[^A-Za-z0-9+._@:;=<>,\- ]")


def prompt_value(value: str) -> str:
    """A context value as it may appear in a prompt: header values come from the network (an
    upstream party may set X- headers), so only the characters of ids, numbers and SIP URIs
    are kept, at most 64 of them, and never a run of words long enough to read as an order."""
    clean = _PROMPT_SAFE.sub("", value)[:64]
    return clean if len(clean.split()) <= 3 else clean.split()[0]


def fill_context(text: str, context: dict[str, str]) -> str:
    """``{context.x_customer_id}`` in an operator's text replaced by the call's context value
    (``prompt_value``); a name the call has no value for is left as it is (a later stage may fill it)."""
    return _CONTEXT_REF.sub(lambda m: prompt_value(context[m.group(1)]) if m.group(1) in context
                            else m.group(0), text)


def agent_settings(agent_cfg: dict, session) -> dict:
    """The agent's settings for this call: its system prompt with the call's context filled in
    (carrier headers: ``{context.x_customer_id}``, ``{context.pai_number}``...). The greeting is
    synthesized once at start, so it is not per call."""
    context = getattr(session, "context", None) or {}
    if not context or "{context." not in agent_cfg.get("system_prompt", ""):
        return agent_cfg
    return {**agent_cfg, "system_prompt": fill_context(agent_cfg["system_prompt"], context)}


def make_app(name: str, session, cell) -> App:
    app_cfg = cell.cfg.raw["app"]
    if name == "echo":
        return EchoApp(session)
    if name == "playback":
        return PlaybackApp(session, app_cfg["prompt"], app_cfg["loop"])
    if name == "agent":
        from bridge.agent.app import AgentApp
        tools = cell.tools
        transfer = cell.cfg.raw.get("transfer") or {}
        if transfer.get("destinations"):          # the built-in transfer tool, next to the business's tools
            from bridge.agent.tools.transfer import AgentTools, TransferTool
            from bridge.cell.handoff import Handoff
            from bridge.core.handoff import parse
            handoff = Handoff(session, transfer, cell.hub)
            tools = AgentTools(cell.tools, TransferTool(parse(transfer["destinations"]), transfer, handoff.request))
        app = AgentApp(session, cell.hub, agent_settings(cell.cfg.raw["agent"], session), cell.metrics, cell.turns,
                       tools=tools, tool_settings=cell.cfg.raw["tools"])
        return app
    if name == "handoff":                     # the call to a person an attended transfer placed
        from bridge.cell.handoff import LegApp
        return LegApp(session)
    if name == "api":
        return ApiApp(session)
    raise ValueError(f"app {name!r} is not available in this build")
