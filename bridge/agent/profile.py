"""One call's agent: its profile, context and language resolved into settings and model routing.

The profile comes from ``POST /v1/calls {profile}`` or from the dialled number's route
(``{app = "agent", profile = "sales", ...inline fields}``); its fields go over ``[agent]``;
``{context.NAME}`` in its system prompt and greeting is filled from the call's context
(``bridge.core.callcontext``: carrier headers, the API's values; a missing name gives
nothing); its language picks the ``[languages.xx]`` models (an unknown one falls back to
the defaults, with a reason for the log). Pure apart from reading the number routes.
"""
from __future__ import annotations

import asyncio
import logging
from collections import ChainMap
from dataclasses import dataclass, field

from bridge.agent.tools.runner import Outcome
from bridge.agent.turn import State, TurnMachine
from bridge.core import callcontext, numbers
from bridge.core.logs import event
from bridge.core.profiles import Catalog, Profile, Routing, routing
from sip.uri import user_part

log = logging.getLogger("trunkline.agent")
GREETING_WAIT = 5.0          # seconds an answered call waits for its own greeting before the default one


@dataclass
class CallSetup:
    cfg: dict                                  # the [agent] settings for this call
    routing: Routing = field(default_factory=Routing)
    tools: tuple[str, ...] | None = None       # the tools offered on this call (None: all)
    transfer: tuple[str, ...] = ()             # transfer destinations by name (the transfer tool's)
    profile: str = ""                          # the profile's name ("" inline or none)
    context: dict[str, str] = field(default_factory=dict)     # header values under their own names (x_...)
    notes: list[str] = field(default_factory=list)            # what fell back, for the log

    def stt_args(self) -> dict:
        r = self.routing
        return {k: v for k, v in (("model", r.stt_model), ("language", r.language)) if v}

    def tts_args(self) -> dict:
        r = self.routing
        return {"voice": r.tts_voice, "voice_config": r.tts_config} if r.tts_voice else {}


def number_profile(store, to_uri: str) -> tuple[str, Profile]:
    """The profile name and inline fields of the dialled number's route (none: ``("", Profile())``)."""
    user = user_part(to_uri)
    routes = store.numbers()
    text = routes.get(user) or routes.get(user.lstrip("+"))
    route = numbers.decode(text) if text else None
    if isinstance(route, numbers.AgentRoute):
        return route.profile, route.fields
    return "", Profile()


def resolve(agent_cfg: dict, raw: dict, name: str, fields: Profile, context: dict[str, str],
            language: str = "") -> CallSetup:
    """The call's settings: profile ``name`` (from ``raw["profiles"]``) with ``fields`` over it, over
    ``agent_cfg``; ``language`` (the API's) over the profile's."""
    catalog = Catalog.of(raw)
    notes = []
    base = catalog.profiles.get(name) if name else None
    if name and base is None:
        notes.append(f"profile {name!r} is not configured")
    p = fields.over(base or Profile())
    ctx = dict(context)
    cfg = dict(agent_cfg)
    if p.system_prompt is not None:
        cfg["system_prompt"] = p.system_prompt
    if p.greeting is not None:
        cfg["greeting"] = p.greeting
    cfg["system_prompt"] = callcontext.fill(cfg["system_prompt"], ctx)
    cfg["greeting"] = callcontext.fill(cfg["greeting"], ctx)
    route, why = routing(p, raw["agent"]["language"], catalog.languages, language)
    if why:
        notes.append(why + ": the default models are used")
    cfg["language"] = route.language
    lang = catalog.languages.get(route.language)
    if lang is not None and lang.short_words():
        cfg["short_words"] = lang.short_words()     # its backchannels, interrupting words, whisper prompt
    return CallSetup(cfg, route, p.tools, p.transfer, name if base is not None else "", ctx, notes)


class ToolSubset:
    """The cell's tool runner as one call sees it: only the profile's tools are offered, and a
    call of any other is refused without a request."""

    def __init__(self, runner, names: tuple[str, ...]):
        self.runner = runner
        self.names = frozenset(names)

    @property
    def specs(self) -> dict:
        return {k: v for k, v in self.runner.specs.items() if k in self.names}

    async def call(self, ctx, tool: str, arguments, tool_call_id: str | None = None):
        if tool not in self.names:
            return Outcome(tool, tool_call_id or "tc_refused", "invalid",
                           f"tool {tool} is not offered on this call", kind="not_offered")
        return await self.runner.call(ctx, tool, arguments, tool_call_id)

    def __getattr__(self, name: str):
        return getattr(self.runner, name)


class ProfiledCall:
    """The part of ``AgentApp`` that gives a call its own agent: ``prepare`` resolves the call's
    setup (inbound: when offered; outbound: when answered, after the API gave its context) and,
    when it differs from the cell's, builds the call's turn machine with it, renders the call's
    greeting (in its voice; the answer waits for it, at most ``GREETING_WAIT`` s, then the default
    greeting is said) and routes the call's STT and TTS to its language's models."""
    setup: CallSetup | None = None
    stt_args: dict = {}
    tts_args: dict = {}
    _greeting_pending = False
    _answer_waiting = False

    def on_start(self) -> None:
        if getattr(self.session, "direction", "") == "inbound":
            self.prepare()

    def hold_answer(self) -> bool:
        """Called when the call is answered: True while its greeting is still being rendered."""
        self.prepare()
        if self._greeting_pending:
            self._answer_waiting = True
        return self._greeting_pending

    def prepare(self) -> None:
        s = self.session
        services = getattr(s, "services", None)
        if self.setup is not None or services is None:
            return
        raw = services.cfg.raw
        name, fields = getattr(s, "profile", ""), Profile()
        if not name and getattr(s, "direction", "") == "inbound":
            name, fields = number_profile(services.store, s.to_uri)
        setup = self.setup = resolve(self.cfg, raw, name, fields, dict(getattr(s, "context", None) or {}),
                                     getattr(s, "language", ""))
        if self.tools is not None:
            self.tool_ctx.context = setup.context
        if setup.cfg == self.cfg and setup.tools is None and not setup.transfer and not setup.tts_args() \
                and not setup.stt_args():
            return                          # the cell's agent as it is
        for note in setup.notes:
            log.warning("call %s: %s", s.call_id, note)
        event(log, "agent_profile", call_id=s.call_id, profile=setup.profile or None, language=setup.routing.language,
              voice=bool(setup.routing.tts_voice), tools=list(setup.tools) if setup.tools is not None else None,
              fallback=setup.notes or None)
        self.stt_args, self.tts_args = setup.stt_args(), setup.tts_args()
        offered = setup.tools
        if setup.transfer and hasattr(self.tools, "only"):        # the profile's destinations, no other
            self.tools = self.tools.only(setup.transfer)
            offered = None if offered is None else (*offered, "transfer")
        if offered is not None and self.tools is not None:
            self.tools = ToolSubset(self.tools, offered)
        self.cfg = setup.cfg
        self.own_canned: dict[str, list[bytes]] = {}
        self.machine = TurnMachine(setup.cfg, ChainMap(self.own_canned, self.hub.canned), self.tools,
                                   self.machine.tool_settings, call_id=s.call_id, now=self.clock())
        greeting = setup.cfg["greeting"]
        if greeting and (greeting != raw["agent"]["greeting"] or self.tts_args):
            self._greeting_pending = True
            task = asyncio.ensure_future(asyncio.wait_for(self.hub.render_cached(greeting, **self.tts_args),
                                                          GREETING_WAIT))
            task.add_done_callback(self._greeting_done)
        if self.tts_args:                   # the other canned phrases in the call's voice, as they come
            for key in [k for k in self.hub.canned if k != "greeting" and setup.cfg.get(k)]:
                task = asyncio.ensure_future(self.hub.render_cached(setup.cfg[key], **self.tts_args))
                task.add_done_callback(lambda t, key=key: self._phrase_done(key, t))

    def _phrase_done(self, key: str, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is None and task.result():
            self.own_canned[key] = task.result()

    def _greeting_done(self, task: asyncio.Task) -> None:
        frames = None
        if not task.cancelled() and task.exception() is None:
            frames = task.result()
        else:
            log.warning("call %s: its greeting could not be rendered (%s): the default greeting is said",
                        self.session.call_id, "cancelled" if task.cancelled() else task.exception())
        if frames:
            self.own_canned["greeting"] = frames
        else:
            self.machine.cfg["greeting"] = self.session.services.cfg.raw["agent"]["greeting"]
        self._greeting_pending = False
        if self._answer_waiting and self.machine.state is not State.ENDED:
            self._answer_waiting = False
            self._run(self.machine.answered(self.clock()))
