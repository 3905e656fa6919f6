"""Handoff to a person (issue 13): the built-in ``transfer`` tool, blind (REFER) and attended
transfers (the bridge calls the person, whispers a summary, bridges the two calls, or gives the
caller back to the agent when nobody answers), ``call_transferred``/``transfer_failed``.

The fast tests drive the real agent (``AgentApp`` and its turn machine), the real tool and the
real ``Handoff`` with fakes only at the model boundary (the inference hub) and the SIP engine
(commands recorded, outbound legs as plain sessions). The slow ones run a real cell with the agent
(whisper, Piper, a scripted model server), a SIPp caller and a SIPp "human" that answers or not.
"""
import asyncio
import copy
import json
import time
from concurrent.futures import Future

import pytest

from bridge.agent.app import AgentApp
from bridge.agent.tools.runner import CallContext
from bridge.agent.tools.transfer import AgentTools, TransferTool
from bridge.agent.turn import State
from bridge.cell.handoff import Handoff, LegApp, Phase, failure_reason
from bridge.core import config as config_mod
from bridge.core.config import DEFAULTS, ConfigError
from bridge.core.handoff import parse
from bridge.core.metrics import Metrics
from bridge.records.journal import CallRecords
from recorded import speech_frames, spoken
from sip import commands as cmd
from test_agent_flow import RATE, Clock
from test_agent_flow import FakeHub as FlowHub
from test_agent_flow import Session as CallerSession

DESTS = {"sales": {"to": "sip:sales@127.0.0.1:5999", "description": "Sales: new orders and quotes",
                   "mode": "attended"},
         "billing": {"to": "sip:billing@127.0.0.1:5998", "description": "Billing questions"}}
SPEECH = speech_frames(rate=RATE)
SILENCE = [bytes(320)] * 60
TONE = b"\x10\x27" * 160            # a loud constant frame: "the caller's voice"
VOICE = b"\xf0\xd8" * 160           # another: "the person's voice"


# -- config and the tool (what the model may do) ------------------------------------------------
def test_destinations_are_checked_and_the_model_sees_only_their_names(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[transfer]\nring_timeout = 5\ndestinations = { sales = { to = "sip:sales@127.0.0.1:5999", '
                   'description = "Sales", mode = "attended" } }\n')
    c = config_mod.load(str(cfg), environ={})
    assert c.raw["transfer"]["ring_timeout"] == 5.0 and c.raw["transfer"]["whisper"] is True
    from bridge.cell.cell import engine_config
    assert "sip:sales@127.0.0.1:5999" in engine_config(c).fixed_destinations     # the engine's guard allows it
    for bad, where in [('{ "Sales!" = { to = "sip:a@b", description = "x" } }', "name"),
                       ('{ s = { to = "sip:a@b?Route=x", description = "x" } }', "s.to"),
                       ('{ s = { to = "sip:a@b", description = "" } }', "s.description"),
                       ('{ s = { to = "sip:a@b", description = "x", mode = "warm" } }', "s.mode"),
                       ('{ s = { to = "1", description = "x", number = "2" } }', "s.number"),
                       ('{ s = { to = "+1555", description = "x", trunk = "nope", mode = "attended" } }', "trunk"),
                       ('{ s = { to = "+1555", description = "x" } }', "s.to: a blind transfer"),   # a REFER needs a URI
                       ('{ s = { to = "sip:a@b", description = "x", trunk = "t" } }', "s.trunk")]:
        cfg.write_text(f"[transfer]\ndestinations = {bad}\n")
        with pytest.raises(ConfigError, match="transfer.destinations") as exc:
            config_mod.load(str(cfg), environ={})
        assert where in str(exc.value)
    assert config_mod.load(None, environ={}).raw["transfer"]["destinations"] == {}    # default: no tool


def test_the_tool_takes_only_a_configured_destination():
    started = []
    tool = TransferTool(parse(DESTS), DEFAULTS["transfer"], lambda d, s: started.append((d.name, s)))
    tools = AgentTools(None, tool)
    schema = tools.specs["transfer"].model_parameters()
    assert schema["properties"]["destination"]["enum"] == ["sales", "billing"]
    assert "127.0.0.1" not in json.dumps(schema) and "127.0.0.1" not in tools.specs["transfer"].description
    ctx = CallContext("call-1")

    async def run():
        out = []
        for args in ({"destination": "sip:premium@127.0.0.1"}, {"destination": "+19005550100"}, {},
                     {"destination": "sales", "to": "+19005550100"}, "not json",
                     {"destination": "sales", "summary": "Wants a  quote\nfor 3 units"}):
            out.append(await tools.call(ctx, "transfer", args, "tc"))
        out.append(await tools.call(ctx, "lookup", {}, "tc"))         # no REST tools configured
        return out
    outs = asyncio.run(run())
    assert [o.status for o in outs] == ["invalid"] * 5 + ["ok", "invalid"]
    assert started == [("sales", "Wants a quote for 3 units")]        # only the configured name, once
    assert outs[5].say == "Let me put you through to Sales: new orders and quotes. Please hold."
    assert outs[5].audit["tool"] == "transfer" and outs[5].result == {"destination": "sales", "mode": "attended"}


# -- the agent and the handoff, with the engine and the model faked ---------------------------------
class FakeHub(FlowHub):
    """The inference hub at the model boundary (per-call language/voice arguments accepted)."""
    def stt(self, call, pcm, interim, on_result, on_error=None, **kw):
        return super().stt(call, pcm, interim, on_result, on_error)

    def tts(self, call, text, on_result, on_done=None, on_error=None, **kw):
        return super().tts(call, text, on_result, on_done, on_error)

    def release(self, call):
        self.released = [*(self.released or []), call]


class Services:
    """What a Handoff uses of the cell: engine commands (recorded), outbound calls (plain sessions)."""
    def __init__(self):
        self.cfg = config_mod.load(None, environ={})        # what the agent's per-call profile reads
        self.submitted: list = []
        self.calls: dict = {}
        self.dialed: list = []

    def submit(self, c):
        self.submitted.append(c)
        f = Future()
        f.set_result(None)
        return f

    async def make_call(self, uri, trunk=None, app=None):
        self.dialed.append((uri, trunk, app))
        leg = CallerSession()
        leg.call_id, leg.answered_at, leg.ending = "leg-1", None, False
        leg.app = LegApp(leg)
        self.calls[leg.call_id] = leg
        return leg.call_id


def test_the_cell_gives_the_agent_the_tool_and_runs_the_person_s_leg(tmp_path):
    from types import SimpleNamespace

    from bridge.api.events import EVENT_TYPES
    from bridge.cell.apps import make_app
    cfg = config_mod.load(None, environ={})
    cfg.raw["transfer"]["destinations"] = DESTS
    cell = SimpleNamespace(cfg=cfg, hub=FakeHub(), metrics=Metrics(), turns=CallRecords(str(tmp_path)), tools=None)
    session = CallerSession()
    session.services, session.direction = Services(), "outbound"
    app = make_app("agent", session, cell)
    assert list(app.tools.specs) == ["transfer"] and app.tools.transfer.start.__self__.session is session
    assert isinstance(make_app("handoff", CallerSession(), cell), LegApp)
    cfg.raw["transfer"]["destinations"] = {}
    assert make_app("agent", session, cell).tools is None             # no destinations: no tool, as before
    assert {"call_transferred", "transfer_failed"} <= set(EVENT_TYPES)   # the bus publishes them


def handoff_agent(tmp_path, dests=DESTS, **settings):
    cfg = copy.deepcopy(DEFAULTS["agent"])
    cfg.update(greeting="", interim_every=0.0, reprompt_after=0.0, hangup_after=0.0)
    transfer = {**DEFAULTS["transfer"], "destinations": dests, "ring_timeout": 5.0, **settings}
    hub, session = FakeHub(), CallerSession()
    session.services, session.ending, session.direction = Services(), False, "outbound"
    clock = Clock()
    handoff = Handoff(session, transfer, hub, clock=clock)
    tools = AgentTools(None, TransferTool(parse(dests), transfer, handoff.request, clock=clock))
    app = AgentApp(session, hub, cfg, Metrics(), CallRecords(str(tmp_path), name="turns.jsonl"), tools=tools,
                   tool_settings=DEFAULTS["tools"], clock=clock)
    session.app = app
    app.on_answered()
    hub.llm_reqs.clear()
    return app, hub, session, handoff


def run(session, frames, leg=None):
    """The cell's tick for the caller (and the person's leg): frames in, the media clocks take one out."""
    clock = session.app.clock if hasattr(session.app, "clock") else None
    for f in frames:
        clock.t += 0.02
        now = clock.t
        app = session.app
        app.on_frames([(now, f)], now)
        app.on_tick(now)
        session.media.tx(now)
        if leg is not None and leg.app is not None:
            leg.app.on_frames([(now, VOICE)] if leg.answered_at else [], now)
            leg.app.on_tick(now)
            leg.media.tx(now)


def speak_tts(hub):
    for t in hub.tts_reqs:
        if not t.get("played"):
            t["played"] = True
            t["cb"](spoken(t["text"]), RATE)
            t["done"](0.05)


async def ask_for(app, hub, session, destination, said="Can I talk to a person in sales?"):
    run(session, SPEECH + SILENCE[:12])
    hub.stt_reqs[-1]["cb"](said, 0.01, -0.2, 2.0, 0.3)
    req = hub.llm_reqs[-1]
    offered = [t["name"] for t in req["params"]["tools"]]
    assert offered == ["transfer"], offered                # the caller's words shortlist the tool
    req["tool"]({"tool": "transfer", "arguments": {"destination": destination, "summary": "Wants a quote"}})
    req["done"](0.1, 0)
    run(session, SILENCE[:25])                             # the turn ends: the tool runs
    await asyncio.sleep(0.05)


def until(session, hub, done, limit=600):
    """Silence from the caller (the agent's lines synthesized as asked) until ``done()``, at most ``limit`` ticks."""
    for _ in range(limit):
        if done():
            return
        speak_tts(hub)
        run(session, SILENCE[:1])
    raise AssertionError("the agent never got there")


def said(hub):
    return " ".join(t["text"] for t in hub.tts_reqs)


def events(session, etype):
    return [d for e, d in session.events if e == etype]


async def dialing(tmp_path, dests=DESTS, **settings):
    """An agent asked for sales and its transfer has dialed the person: (app, hub, caller, handoff, leg)."""
    app, hub, session, handoff = handoff_agent(tmp_path, dests, **settings)
    await ask_for(app, hub, session, "sales")
    until(session, hub, lambda: handoff.phase is not Phase.PENDING)
    await asyncio.sleep(0.01)
    return app, hub, session, handoff, session.services.calls["leg-1"]


def test_attended_transfer_whispers_then_bridges_both_ways(tmp_path):
    async def scenario():
        app, hub, session, handoff = handoff_agent(tmp_path)
        await ask_for(app, hub, session, "sales")
        assert session.app is handoff and handoff.phase is Phase.PENDING
        assert " ".join(t["text"] for t in hub.tts_reqs) == ("Let me put you through to Sales: new orders and "
                                                            "quotes. Please hold.")
        speak_tts(hub)
        run(session, SILENCE[:10])
        services = session.services
        assert services.dialed == [] and handoff.phase is Phase.PENDING      # the agent is still saying it
        until(session, hub, lambda: handoff.phase is not Phase.PENDING)
        await asyncio.sleep(0.01)
        assert services.dialed == [("sip:sales@127.0.0.1:5999", None, "handoff")]
        leg = services.calls["leg-1"]
        assert handoff.phase is Phase.DIALING and leg.app.owner is handoff
        run(session, SILENCE[:20], leg)
        assert any(f != bytes(320) for f in session.media.downlink._q)      # the caller hears the ringback
        leg.answered_at = app.clock.t                                        # the person answers
        run(session, SILENCE[:2], leg)
        assert handoff.phase is Phase.WHISPER
        assert hub.tts_reqs[-1]["text"] == "A caller from the voice agent. Wants a quote"
        sent_before = leg.media.tx_frames
        speak_tts(hub)
        run(session, [TONE] * 10, leg)
        assert handoff.phase is Phase.WHISPER and leg.media.tx_frames > sent_before   # the person hears it
        assert TONE not in leg.media.downlink._q                          # not the caller yet
        for _ in range(400):
            run(session, [TONE], leg)
            if handoff.phase is Phase.BRIDGED:
                break
        assert handoff.phase is Phase.BRIDGED
        assert events(session, "call_transferred") == [{"destination": "sales", "mode": "attended",
                                                        "transfer_call_id": "leg-1"}]
        # bridged: the caller's frames reach the person and the person's the caller, tick by tick
        got_leg, got_caller = [], []
        for _ in range(10):
            app.clock.t += 0.02
            now = app.clock.t
            session.app.on_frames([(now, TONE)], now)
            session.app.on_tick(now)
            leg.app.on_frames([(now, VOICE)], now)
            got_leg.append(leg.media.tx(now))
            got_caller.append(session.media.tx(now))
        assert got_leg.count(TONE) == 10 and got_caller.count(VOICE) == 10
        assert hub.llm_reqs[-1]["params"]["tools"] and len(hub.stt_reqs) == 1    # the agent heard none of it
        assert session.transferred_to == "sales"
        leg.app.on_call_ended(200, "remote bye")                          # the person hangs up
        leg.app.on_end()
        assert session.hangups == ["transfer ended"]
        session.app.on_end()                                               # the caller's call ends
        assert hub.released == ["call-1:whisper", "call-1"]                # the whisper's, then the agent's cleanup
        assert events(session, "transfer_failed") == []
    asyncio.run(scenario())


def test_nobody_answers_the_caller_is_back_with_the_agent(tmp_path):
    async def scenario():
        app, hub, session, handoff, leg = await dialing(tmp_path)
        run(session, [TONE] * 200, leg)                                   # 4 s ringing
        assert handoff.phase is Phase.DIALING and events(session, "transfer_failed") == []
        assert session.call_id not in hub.calls      # the paused agent needs no decodes: others get interims
        run(session, SILENCE[:60], leg)                                   # past ring_timeout (5 s)
        assert leg.hangups == ["no answer"]
        assert events(session, "transfer_failed") == [{"destination": "sales", "mode": "attended",
                                                       "reason": "no_answer"}]
        assert session.app is app and handoff.phase is Phase.IDLE
        assert session.call_id in hub.calls          # the agent has the call again
        assert said(hub).endswith(DEFAULTS["transfer"]["no_answer_text"])     # the agent tells the caller
        assert app.history[-1]["role"] == "system" and "no_answer" in app.history[-1]["content"]
        assert events(session, "call_transferred") == []
        leg.app.on_call_ended(487, "cancelled")                           # the CANCEL's end: nothing more
        leg.app.on_end()
        assert session.hangups == [] and len(events(session, "transfer_failed")) == 1
    asyncio.run(scenario())


def _fail_app(session):
    """The cell dropping an app that raised (bridge/cell/cell.py ``_app_failed``)."""
    from types import SimpleNamespace

    from bridge.cell.cell import Cell
    session.transcribers, session.speakings = {}, {}
    session.answered_at = getattr(session, "answered_at", None) or 1.0
    hub = FakeHub()
    hub.release = lambda call: None
    Cell._app_failed(SimpleNamespace(hub=hub, metrics=Metrics()), session, RuntimeError("boom"))


@pytest.mark.parametrize("broken", ["caller", "person"])
def test_a_side_whose_app_breaks_takes_the_other_call_down_with_it(tmp_path, broken):
    """An app that raises is dropped without on_end; its ``on_failed`` still lets go of the other call:
    a broken caller's side hangs up the person's call (not left up bridged to nobody), a broken
    person's side hangs up the caller it was bridged to."""
    async def scenario():
        app, hub, session, handoff, leg = await dialing(tmp_path, whisper=False)
        leg.answered_at = app.clock.t
        for _ in range(400):
            run(session, [TONE], leg)
            if handoff.phase is Phase.BRIDGED:
                break
        assert handoff.phase is Phase.BRIDGED and leg.hangups == [] and session.hangups == []
        if broken == "caller":
            _fail_app(session)
            assert session.app is None and session.hangups == ["app error"]
            assert leg.hangups == ["transfer failed"]
        else:
            _fail_app(leg)
            assert leg.app is None and leg.hangups == ["app error"]
            assert session.hangups == ["transfer ended"]
        assert events(session, "transfer_failed") == []           # it was transferred already
    asyncio.run(scenario())


@pytest.mark.parametrize("broken", ["caller", "person"])
def test_a_side_that_breaks_while_dialing_fails_the_transfer_with_reason_error(tmp_path, broken):
    """While the person's phone rings: a broken caller's side hangs up the leg; a broken person's side
    fails the transfer as ``error`` (not ``no_answer``) and the agent has the caller back."""
    async def scenario():
        app, hub, session, handoff, leg = await dialing(tmp_path)
        run(session, [TONE] * 10, leg)
        assert handoff.phase is Phase.DIALING
        if broken == "caller":
            _fail_app(session)
            assert leg.hangups == ["transfer failed"] and session.hangups == ["app error"]
        else:
            _fail_app(leg)
            run(session, SILENCE[:2])
            assert session.app is app and handoff.phase is Phase.IDLE and session.hangups == []
        assert events(session, "transfer_failed") == [{"destination": "sales", "mode": "attended", "reason": "error"}]
    asyncio.run(scenario())


def test_without_whisper_the_answer_bridges_at_once_and_a_destination_says_its_own_line(tmp_path):
    async def scenario():
        dests = {"sales": {**DESTS["sales"], "say": "Connecting you to our sales team."}}
        app, hub, session, handoff = handoff_agent(tmp_path, dests, whisper=False)
        await ask_for(app, hub, session, "sales")
        assert said(hub) == "Connecting you to our sales team."
        until(session, hub, lambda: handoff.phase is not Phase.PENDING)
        await asyncio.sleep(0.01)
        leg = session.services.calls["leg-1"]
        leg.answered_at = app.clock.t
        asked = len(hub.tts_reqs)
        run(session, SILENCE[:3], leg)
        assert handoff.phase is Phase.BRIDGED and len(hub.tts_reqs) == asked      # no whisper synthesized
        assert events(session, "call_transferred")[0]["mode"] == "attended"
    asyncio.run(scenario())


@pytest.mark.parametrize("status,reason", [(486, "busy"), (603, "declined"), (404, "rejected")])
def test_a_rejected_leg_is_a_failure_with_its_reason(tmp_path, status, reason):
    async def scenario():
        app, hub, session, handoff, leg = await dialing(tmp_path)
        leg.app.on_call_ended(status, "rejected")
        leg.app.on_end()
        run(session, SILENCE[:2], leg)
        assert events(session, "transfer_failed")[0]["reason"] == reason and session.app is app
    asyncio.run(scenario())
    assert failure_reason(0) == "no_answer"


def test_blind_transfer_refers_and_reports(tmp_path):
    async def scenario():
        app, hub, session, handoff = handoff_agent(tmp_path)
        await ask_for(app, hub, session, "billing", said="Put me through to someone in billing please")
        until(session, hub, lambda: handoff.phase is not Phase.PENDING)
        sent = session.services.submitted
        assert [(type(c), c.call_id, c.target) for c in sent] == [
            (cmd.Transfer, "call-1", "sip:billing@127.0.0.1:5998")]
        assert handoff.phase is Phase.REFERRED
        handoff.on_transfer_status(100, "Trying", False)
        handoff.on_transfer_status(486, "Busy Here", True)                # the target is busy: back to the agent
        assert events(session, "transfer_failed") == [{"destination": "billing", "mode": "blind", "reason": "busy",
                                                       "status": 486}]
        assert session.app is app
        run(session, SILENCE[:5])
        assert said(hub).endswith(DEFAULTS["transfer"]["no_answer_text"])
        # asked again, and this time it goes through
        until(session, hub, lambda: app.state is State.LISTENING and not app.machine.speaking())
        await ask_for(app, hub, session, "billing", said="Put me through to someone in billing please")
        until(session, hub, lambda: handoff.phase is not Phase.PENDING)
        assert len(sent) == 2 and handoff.phase is Phase.REFERRED
        handoff.on_transfer_status(200, "OK", True)
        assert events(session, "call_transferred") == [{"destination": "billing", "mode": "blind"}]
        assert session.transferred_to == "billing"
        session.app.on_end()                                # the engine's BYE after the NOTIFY's 200
        assert len(events(session, "transfer_failed")) == 1 and hub.released == ["call-1"]
    asyncio.run(scenario())


# -- a real cell, a SIPp caller, a SIPp "human" (slow: whisper and Piper run for real) -----------------
class HandoffLLM:
    """A scripted OpenAI-compatible model: "sales" or "person" in the caller's words (with the
    transfer tool offered) is a transfer to sales with a summary; anything else gets "Okay."."""

    def __init__(self):
        from support import serve_on_loopback
        self.requests: list[dict] = []
        self.port, self.loop = serve_on_loopback(self._app)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)

    def _app(self):
        from aiohttp import web

        async def chat(request):
            body = await request.json()
            self.requests.append(body)
            last = body["messages"][-1]
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)

            async def send(delta):
                await resp.write(f"data: {json.dumps({'choices': [{'delta': delta}]})}\n\n".encode())
            offered = {t["function"]["name"] for t in body.get("tools") or []}
            text = (last.get("content") or "").lower() if last["role"] == "user" else ""
            if "transfer" in offered and ("sales" in text or "person" in text):
                where = "billing" if "billing" in text else "sales"
                args = json.dumps({"destination": where, "summary": "The caller wants a quote."})
                await send({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                            "function": {"name": "transfer", "arguments": ""}}]})
                await send({"tool_calls": [{"index": 0, "function": {"arguments": args}}]})
            else:
                await send({"content": "Okay."})
            await resp.write(b"data: [DONE]\n\n")
            return resp

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app


def handoff_cell(cell_factory, llm, human_port, ring_timeout=20, extra=""):
    return cell_factory(extra +
        f'[models]\nllm_backend = "openai"\nllm_url = "{llm.url}"\nllm_model = "big"\n'
        '[http]\noutbound_allow = ["127.0.0.1/32"]\n'
        '[agent]\nreprompt_after = 0\nhangup_after = 0\n'
        f'[transfer]\nring_timeout = {ring_timeout}\n'
        f'destinations = {{ sales = {{ to = "sip:sales@127.0.0.1:{human_port}", description = "Sales", '
        'mode = "attended" }, billing = { to = "sip:billing@127.0.0.1:5999", description = "Billing" } }\n',
        args=("--app", "agent"))


class Human:
    """The person's phone: SIPp answers (or only rings); our RTP endpoint hears and speaks."""

    def __init__(self, ports, tmp, scenario="uas_answer.xml"):
        import threading
        from support import RtpPeer, sipp
        self.sip_port, rtp = ports["sipp"], ports["rtp_peer"]
        self.peer = RtpPeer(rtp)
        self.proc = sipp(scenario, "", tmp, local_port=self.sip_port, rtpport=rtp, background=True, timeout=120)
        self.say: bytes | None = None          # set: spoken once, as soon as the line is up
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        from voice import ulaw_packets
        while not self.stopped.is_set():
            if self.say is not None and self.peer.remote is not None:
                pcm, self.say = self.say, None
                self.peer.stream(ulaw_packets(pcm))
            self.peer._recv_once()

    def close(self):
        self.stopped.set()
        self.thread.join(5)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.peer.close()
        return self.proc.returncode


def wait_event_on_line(caller, cell, name, timeout=40.0) -> tuple[dict, float]:
    """``cell.wait_event``, with the caller's RTP kept flowing (and timed) meanwhile: the event and
    when it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cell.events(name)
        if got:
            return got[0], time.monotonic()
        caller.silence(0.2)
    raise AssertionError(f"no {name} within {timeout} s")


def caller_scenario(tmp, name="wait_bye.xml"):
    from support import SCENARIOS
    scenario = tmp / "caller.xml"
    scenario.write_text((SCENARIOS / name).read_text().replace("sip:sipp@", "sip:+15551230001@"))
    return str(scenario)


@pytest.mark.slow
@pytest.mark.sample
def test_attended_transfer_to_a_person_who_answers(cell_factory, tmp_path):
    from support import Api, create_key
    from voice import Caller, decode, say, transcribe
    from support import next_ports
    llm = HandoffLLM()
    far = next_ports()
    human = Human(far, tmp_path)
    cell = handoff_cell(cell_factory, llm, human.sip_port)
    caller = Caller(cell, tmp_path, seconds=90, scenario=caller_scenario(tmp_path))
    try:
        caller.wait_reply(time.monotonic())                                    # the greeting
        end = caller.speak("Can I speak to a person in sales, please?")
        heard = transcribe(caller.wait_reply(end, quiet=2.0)).lower()
        assert "put you through" in heard, heard
        moved, bridged_at = wait_event_on_line(caller, cell, "call_transferred")    # whisper played, bridged
        whisper = transcribe(decode(human.peer.received, end=bridged_at)).lower()
        assert "caller" in whisper and "quot" in whisper, whisper              # the person heard the summary
        human.say = say("Hello, this is Sales speaking.")
        spoke = caller.speak("Hi, I would like a price for ten chairs.")
        caller.silence(3.0)
        to_caller = transcribe(decode(caller.peer.received, bridged_at)).lower()
        assert "speaking" in to_caller, to_caller                              # the person, not the agent
        to_human = transcribe(decode(human.peer.received, bridged_at)).lower()
        assert "price" in to_human, to_human                                   # the caller reaches the person
        assert spoke > bridged_at
        key = create_key(cell.data, "control")
        status, _, _ = Api(cell, key).post(f"/v1/calls/{moved['call_id']}/hangup")
        assert status in (200, 202), status
        assert caller.close() is not None
        human_rc = human.proc.wait(20)                                           # the person's leg gets its BYE
        assert human_rc == 0
    finally:
        caller.close()
        human.close()
        llm.stop()
    events = Api(cell, create_key(cell.data, "read")).get("/v1/events?since=0")[1]["events"]
    kinds = [(e["type"], e["call_id"]) for e in events if e["type"] in ("call_transferred", "transfer_failed")]
    assert kinds == [("call_transferred", moved["call_id"])]
    data = [e["data"] for e in events if e["type"] == "call_transferred"][0]
    assert data["destination"] == "sales" and data["mode"] == "attended" and data["transfer_call_id"]
    assert [e["data"]["disposition"] for e in events
            if e["type"] == "call_summary" and e["call_id"] == moved["call_id"]] == ["transferred"]


@pytest.mark.slow
def test_attended_transfer_nobody_answers_back_to_the_agent(cell_factory, tmp_path):
    from support import Api, create_key
    from voice import Caller, decode, transcribe
    from support import next_ports
    llm = HandoffLLM()
    far = next_ports()
    human = Human(far, tmp_path, scenario="uas_no_answer.xml")
    cell = handoff_cell(cell_factory, llm, human.sip_port, ring_timeout=3)
    caller = Caller(cell, tmp_path, seconds=90, scenario=caller_scenario(tmp_path))
    try:
        caller.wait_reply(time.monotonic())
        end = caller.speak("Can I speak to a person in sales, please?")
        failed, failed_at = wait_event_on_line(caller, cell, "transfer_failed")     # rang 3 s, then cancelled
        assert failed["reason"] == "no_answer"
        heard = transcribe(decode(caller.peer.received, end, failed_at)).lower()
        assert "put you through" in heard, heard
        back = transcribe(caller.wait_reply(failed_at, quiet=1.5)).lower()
        assert "nobody is available" in back, back                             # back with the agent
        assert human.proc.wait(20) == 0                                        # rang, was cancelled (487)
        end = caller.speak("What are your opening hours?")
        assert "okay" in transcribe(caller.wait_reply(end, quiet=1.5)).lower()  # and keeps the conversation
    finally:
        caller.close()
        human.close()
        llm.stop()
    events = Api(cell, create_key(cell.data, "read")).get("/v1/events?since=0")[1]["events"]
    assert [e["data"]["reason"] for e in events if e["type"] == "transfer_failed"] == ["no_answer"]
    assert not [e for e in events if e["type"] == "call_transferred"]


def ask_blind_transfer(caller, wait_transferred) -> dict:
    """The caller asks for billing (a blind destination), hears the agent put it through, and its
    SIPp ends cleanly (REFER accepted, NOTIFY 200, then the cell's BYE): the ``call_transferred``."""
    from voice import transcribe
    caller.wait_reply(time.monotonic())
    end = caller.speak("Can I talk to a person in billing, please?")
    heard = transcribe(caller.wait_reply(end, quiet=1.5)).lower()
    assert "put you through" in heard, heard
    moved = wait_transferred()
    assert (moved["destination"], moved["mode"]) == ("billing", "blind")
    deadline = time.monotonic() + 20
    while caller.proc.poll() is None and time.monotonic() < deadline:
        caller.silence(0.2)
    assert caller.proc.returncode == 0
    return moved


@pytest.mark.slow
def test_blind_transfer_refers_the_caller(cell_factory, tmp_path):
    from support import Api, create_key, sipp_file
    from voice import Caller
    llm = HandoffLLM()
    cell = handoff_cell(cell_factory, llm, 9)
    caller = Caller(cell, tmp_path, seconds=60, scenario=caller_scenario(tmp_path, "refer_accept.xml"))
    try:
        ask_blind_transfer(caller, lambda: cell.wait_event("call_transferred", timeout=30)[0])
    finally:
        caller.close()
        llm.stop()
    assert "REFER to sip:billing@127.0.0.1:5999" in sipp_file(tmp_path, "_logs.log")
    ended = cell.wait_event("call_ended")[0]
    assert ended["reason"] == "transferred"
    events = Api(cell, create_key(cell.data, "read")).get("/v1/events?since=0")[1]["events"]
    assert [e["data"] for e in events if e["type"] == "call_transferred"] == [{"destination": "billing",
                                                                               "mode": "blind"}]
    assert not [e for e in events if e["type"] == "transfer_failed"]
    deadline = time.monotonic() + 15                        # the summary comes after the hang-up
    while time.monotonic() < deadline and not [e for e in events if e["type"] == "call_summary"]:
        time.sleep(0.2)
        events = Api(cell, create_key(cell.data, "read")).get("/v1/events?since=0")[1]["events"]
    assert [e["data"]["disposition"] for e in events if e["type"] == "call_summary"] == ["transferred"]


@pytest.mark.slow
def test_dtmf_zero_still_transfers_with_the_tool_configured(cell_factory, tmp_path):
    from support import sipp, sipp_file
    llm = HandoffLLM()
    try:
        cell = handoff_cell(cell_factory, llm, 9,
                            extra='[app]\ndtmf_transfer = { "0" = "sip:frontdesk@127.0.0.1:5997" }\n')
        res = sipp("transfer_dtmf.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"])
    finally:
        llm.stop()
    assert res.returncode == 0, res.stdout.decode()[-2000:]
    assert "REFER to sip:frontdesk@127.0.0.1:5997" in sipp_file(tmp_path, "_logs.log")


def test_an_attended_leg_keeps_to_its_trunk_s_max_calls(tmp_path):
    """The person's leg goes out through a trunk: that trunk's max_calls (and cps) hold for it as for
    POST /v1/calls; over them the transfer fails (unavailable) and nothing is dialled."""
    from types import SimpleNamespace
    conf = tmp_path / "t.toml"
    conf.write_text('[[trunks]]\nname = "carrier"\naddress = "sip:127.0.0.1:5999"\nmax_calls = 1\n')
    dests = {"sales": {**DESTS["sales"], "to": "+15550100", "trunk": "carrier"}}

    async def scenario():
        app, hub, session, handoff = handoff_agent(tmp_path, dests)
        session.services.cfg = config_mod.load(str(conf), environ={})
        session.services.store = SimpleNamespace(outbound_load=lambda trunk, since: (1, []))   # one call already
        await ask_for(app, hub, session, "sales")
        until(session, hub, lambda: handoff.phase is not Phase.PENDING)
        await asyncio.sleep(0.01)
        assert session.services.dialed == []
        failed = events(session, "transfer_failed")
        assert failed and failed[0]["reason"] == "unavailable", failed
        assert session.app is app and handoff.phase is Phase.IDLE
    asyncio.run(scenario())
