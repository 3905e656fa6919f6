"""The agent on a call (``AgentApp`` around the turn machine) with a fake at the model
boundary (the inference process); the VAD, endpointer, playout, media queues and
history handling are real. Caller speech is a stored recording (tests/fixtures/),
so no model runs here; tests/test_turn_machine.py drives the machine alone."""
import copy

import pytest

from bridge.agent.app import AgentApp
from bridge.agent.turn import State
from bridge.core.config import DEFAULTS
from bridge.core.metrics import Metrics
from bridge.records.journal import CallRecords
from media.callmedia import CallMedia
from media.frames import split_frames
from recorded import speech_frames, spoken, transcript

RATE = 8000


class AgentCalls:
    """The hub's count of a cell's agent calls (``AiHub.joined``/``left``/``model_calls``), for fakes."""
    calls: set

    def joined(self, call):
        self.calls.add(call)

    def left(self, call):
        self.calls.discard(call)

    def model_calls(self):
        return len(self.calls)


class FakeHub(AgentCalls):
    def __init__(self):
        self.stt_reqs, self.llm_reqs, self.tts_reqs = [], [], []
        self.cancels = 0
        self.released = False
        self.calls = set()                      # joined agent calls
        self.canned = {k: split_frames(bytes(3200), RATE) for k in
                       ("greeting", "reprompt_text", "goodbye_text", "not_understood_text", "apology_text")}

    def stt(self, call, pcm, interim, on_result, on_error=None):
        self.stt_reqs.append({"pcm": pcm, "interim": interim, "cb": on_result, "err": on_error})
        return len(self.stt_reqs)

    def llm(self, call, messages, params, on_token, on_done, on_error, on_tool=None):
        self.llm_reqs.append({"messages": copy.deepcopy(messages), "tok": on_token, "done": on_done,
                              "tool": on_tool, "params": params})
        return len(self.llm_reqs)

    def tts(self, call, text, on_result, on_done=None, on_error=None):
        self.tts_reqs.append({"text": text, "cb": on_result, "done": on_done})
        return len(self.tts_reqs)

    def turn(self, call, pcm, on_result, on_error):
        on_error("no end-of-turn model loaded")          # as the hub answers when the model did not load

    def cancel(self, call):
        self.cancels += 1

    def stt_backlog(self):
        return 0


    def release(self, call):
        self.released = True

    def to_frames(self, pcm, rate):
        return split_frames(pcm, RATE)


class Clock:
    """The test's time: frames, ticks and callbacks all read it."""
    def __init__(self, t=100.0):
        self.t = t

    def __call__(self):
        return self.t


class Session:
    def __init__(self):
        self.media = CallMedia(RATE)
        self.call_id = "call-1"
        self.from_uri, self.to_uri = "sip:+15551230001@pbx", "sip:+15550000000@us"
        self.tool_calls = []
        self.hangups = []
        self.events = []

    def hangup(self, reason, status=0):
        self.hangups.append(reason)

    def emit(self, etype, data):
        self.events.append((etype, data))

    def record_transcript(self, direction, text, transcribe_id=None, extra=None):
        self.events.append(("transcript_created", {"direction": direction, "message": text}))


@pytest.fixture
def agent(tmp_path):
    cfg = copy.deepcopy(DEFAULTS["agent"])
    cfg.update(greeting="", interim_every=0.0, reprompt_after=0.0, hangup_after=0.0)
    hub, session = FakeHub(), Session()
    app = AgentApp(session, hub, cfg, Metrics(), CallRecords(str(tmp_path), name="turns.jsonl"), clock=Clock())
    app.on_answered()
    hub.llm_reqs.clear()                       # the KV-cache warm-up request
    return app, hub, session


def feed(app, frames):
    """Caller audio in, and the media clock taking one outgoing frame per incoming one."""
    for f in frames:
        app.clock.t += 0.02
        now = app.clock.t
        app.on_frames([(now, f)], now)
        app.on_tick(now)
        app.session.media.tx(now)


SPEECH = speech_frames(rate=RATE)                # "I would like to book a cleaning please."
HEARD = transcript()
SILENCE = [bytes(320)] * 60


def answer(hub, text="Sure, I can help you with that. What day works?"):
    req = hub.llm_reqs[-1]
    for tok in text.split(" "):
        req["tok"](tok + " ")
    req["done"](0.1, 10)
    for t in hub.tts_reqs:
        t["cb"](spoken(t["text"]), RATE)
        t["done"](0.05)


def test_speculative_reply_is_held_until_the_turn_ends(agent):
    app, hub, session = agent
    feed(app, SPEECH + SILENCE[:12])               # 240 ms of quiet: a pause, not the end
    spec = [r for r in hub.stt_reqs if not r["interim"]]
    assert len(spec) == 1
    spec[0]["cb"](*HEARD.values())
    assert len(hub.llm_reqs) == 1 and hub.llm_reqs[0]["messages"][-1]["content"].startswith("I would like")
    answer(hub)
    assert session.media.queued_out() == 0         # held: nothing goes out yet
    feed(app, SILENCE[:25])                         # the silence window closes
    assert session.media.tx_frames > 0              # released at once
    assert app.history[-1] == {"role": "user", "content": HEARD["text"]}
    feed(app, [bytes(320)] * 400)                   # let it all play
    assert app.reply is None
    assert app.history[-1]["role"] == "assistant"
    assert app.history[-1]["content"] == "Sure, I can help you with that. What day works?"
    lines = (app.turns.path and open(app.turns.path).read().splitlines())
    assert len(lines) == 2 and '"role": "caller"' in lines[0] and '"role": "agent"' in lines[1]
    (lat,) = [d for e, d in session.events if e == "turn_latency"]     # the marked frame was timed on the wire
    assert lat["turn"] == 1 and 0.5 < lat["voice_to_voice"] < 1.0
    assert round(app.metrics.turn_latency.labels("voice_to_voice")._sum.get(), 3) == lat["voice_to_voice"]
    assert [d["direction"] for e, d in session.events if e == "transcript_created"] == ["in", "out"]


def test_caller_going_on_after_a_pause_cancels_the_held_reply(agent):
    app, hub, session = agent
    feed(app, SPEECH + SILENCE[:12])
    hub.stt_reqs[-1]["cb"]("I would like to book", 0.01, -0.2, 2.0, 0.3)
    assert app.reply is not None and app.state is State.HOLDING
    feed(app, SPEECH[:20])
    assert app.reply is None and hub.cancels == 1
    assert all(m["role"] != "user" for m in app.history)    # nothing was committed


def test_barge_in_keeps_only_what_was_heard(agent):
    app, hub, session = agent
    feed(app, SPEECH + SILENCE[:12])
    hub.stt_reqs[-1]["cb"]("I would like to book a cleaning please.", 0.01, -0.2, 2.0, 0.3)
    answer(hub, "Sure, we have openings on Monday and Tuesday. Which one suits you best?")
    feed(app, SILENCE[:25] + SILENCE[:30])          # turn ends; the reply plays for a while
    played = session.media.tx_frames
    assert played > 20
    cancels = hub.cancels
    quiet_after = None
    for i, f in enumerate(SPEECH[:80]):              # the caller talks over the agent: paused at once, then cut
        queued = session.media.queued_out()
        feed(app, [f])
        if quiet_after is None and queued > 0 and session.media.queued_out() == 0:
            quiet_after = i
        if hub.cancels > cancels:
            break
    assert hub.cancels == cancels + 1
    assert quiet_after is not None and quiet_after < 8 and session.media.queued_out() == 0   # flushed at once
    assert session.media.mark is None and session.media.mark_time is None
    heard = app.history[-1]
    assert heard["role"] == "assistant"
    spoken = "Sure, we have openings on Monday and Tuesday. Which one suits you best?"
    assert spoken.startswith(heard["content"]) and 0 < len(heard["content"]) < len(spoken)
    assert app.metrics.interruptions._value.get() == 1


def test_unclear_speech_gets_a_repeat_request_not_an_llm_call(agent):
    app, hub, session = agent
    feed(app, SPEECH + SILENCE[:12])
    hub.stt_reqs[-1]["cb"]("", 0.9, -2.0, 2.0, 0.3)
    feed(app, SILENCE[:30])
    assert not hub.llm_reqs
    assert len(app.playout.queue) + session.media.tx_frames > 0          # "Sorry, could you repeat that?"


def test_goodbye_ends_the_call_after_the_goodbye_plays(agent):
    app, hub, session = agent
    feed(app, SPEECH + SILENCE[:12])
    hub.stt_reqs[-1]["cb"]("Thanks, that's all. Goodbye.", 0.01, -0.2, 2.0, 0.3)
    feed(app, SILENCE[:30] + [bytes(320)] * 30)
    assert session.hangups == ["goodbye"]


# -- tools: the agent's side (the runner is faked; tests/test_tools.py runs the real one) --------
class FakeRunner:
    def __init__(self, say_line="You have 2 open invoices."):
        from bridge.core.toolspec import load_toolbox
        self.specs = load_toolbox([{"name": "lookup_invoices", "description": "Look up open invoices and the bill",
                                    "url": "http://127.0.0.1:9/v1/invoices"}], environ={}).tools
        self.calls = []
        self.say_line = say_line

    async def call(self, ctx, name, args, tool_call_id=None):
        from bridge.agent.tools.runner import Outcome
        self.calls.append((ctx.call_id, name, args))
        return Outcome(name, tool_call_id or "tc_1", "ok", "done", result={"count": 2}, say=self.say_line,
                       http_status=200, attempts=1, audit={"tool": name, "status": "ok"})


def tool_agent(tmp_path):
    """An agent with tools (call it inside a running loop: tool requests are tasks on it)."""
    cfg = copy.deepcopy(DEFAULTS["agent"])
    cfg.update(greeting="", interim_every=0.0, reprompt_after=0.0, hangup_after=0.0)
    hub, session, runner = FakeHub(), Session(), FakeRunner()
    hub.canned.update({k: split_frames(bytes(3200), RATE) for k in
                       ("tool_filler_text", "tool_unavailable_text", "tool_fallback_text")})
    app = AgentApp(session, hub, cfg, Metrics(), CallRecords(str(tmp_path), name="turns.jsonl"),
                   tools=runner, tool_settings={**DEFAULTS["tools"], "filler_after": 0.0}, clock=Clock())
    app.on_answered()
    hub.llm_reqs.clear()
    return app, hub, session, runner


def test_a_tool_chosen_on_a_guess_runs_only_when_the_turn_stands(tmp_path):
    import asyncio

    async def scenario():
        app, hub, session, runner = tool_agent(tmp_path)
        feed(app, SPEECH + SILENCE[:12])                       # a pause: speculative reply
        hub.stt_reqs[-1]["cb"]("How much do I owe on my bill?", 0.01, -0.2, 2.0, 0.3)
        req = hub.llm_reqs[-1]
        assert [t["name"] for t in req["params"]["tools"]] == ["lookup_invoices"]
        req["tool"]({"tool": "lookup_invoices", "arguments": {}})
        req["done"](0.1, 0)
        await asyncio.sleep(0.05)
        assert runner.calls == []                               # held: no request on a guess
        feed(app, SILENCE[:25])                                 # the turn ends: now it runs
        await asyncio.sleep(0.05)
        assert runner.calls == [("call-1", "lookup_invoices", {})]
        assert [t["text"] for t in hub.tts_reqs] == ["You have 2 open invoices."]
        assert session.tool_calls == [{"tool": "lookup_invoices", "status": "ok"}]
        assert [e for e, _ in session.events].count("tool_called") == 1
        roles = [m["role"] for m in app.history]
        assert roles == ["user", "assistant", "tool"] and app.history[1]["tool_calls"][0]["function"]["name"] == \
            "lookup_invoices"
        for t in hub.tts_reqs:                                   # synthesize and play the line
            t["cb"](spoken(t["text"]), RATE)
            t["done"](0.05)
        feed(app, [bytes(320)] * 200)
        assert app.reply is None and app.history[-1] == {"role": "assistant", "content": "You have 2 open invoices."}
    asyncio.run(scenario())


def test_a_tool_chosen_on_a_guess_is_dropped_if_the_caller_goes_on(tmp_path):
    import asyncio

    async def scenario():
        app, hub, session, runner = tool_agent(tmp_path)
        feed(app, SPEECH + SILENCE[:12])
        hub.stt_reqs[-1]["cb"]("How much do I owe", 0.01, -0.2, 2.0, 0.3)
        hub.llm_reqs[-1]["tool"]({"tool": "lookup_invoices", "arguments": {}})
        feed(app, SPEECH[:20])                                  # the caller was not finished
        await asyncio.sleep(0.05)
        assert app.reply is None and runner.calls == []
    asyncio.run(scenario())


def test_async_result_waits_for_the_caller_to_finish(tmp_path):
    import asyncio

    async def scenario():
        app, hub, session, runner = tool_agent(tmp_path)
        feed(app, SPEECH[:30])                                  # the caller is talking
        app.on_tool_result("pay_invoice_later", {"status": "confirmed"}, "Your payment is confirmed.")
        assert hub.tts_reqs == []                               # not over the caller
        assert app.history[-1]["role"] == "system" and "confirmed" in app.history[-1]["content"]
        feed(app, SILENCE[:12])                                 # a pause: the utterance is decoded
        hub.stt_reqs[-1]["cb"]("", 0.9, -2.0, 0.6, 0.2)         # ... and was not words
        assert hub.tts_reqs == []
        feed(app, SILENCE[:20])                                 # the turn ends: "Sorry, could you repeat that?"
        assert app.state is State.LISTENING and hub.tts_reqs == []
        assert app.playout.active or session.media.queued_out()  # the canned line is playing
        feed(app, SILENCE[:15])                                 # it has played: the line is free
        assert [t["text"] for t in hub.tts_reqs] == ["Your payment is confirmed."]
        assert app.state is State.REPLYING
    asyncio.run(scenario())


def test_an_agent_call_joins_the_hub_while_it_is_up(tmp_path):
    """The hub counts the cell's agent calls (interim decodes only while there is one): an answered
    call joins, its end leaves, so a call that has ended never keeps another call's interims off."""
    cfg = copy.deepcopy(DEFAULTS["agent"])
    cfg.update(greeting="", reprompt_after=0.0, hangup_after=0.0, call_summary=False)
    hub = FakeHub()
    apps = []
    for n in range(2):
        s = Session()
        s.call_id = f"call-{n}"
        apps.append(AgentApp(s, hub, cfg, Metrics(), CallRecords(str(tmp_path), name="turns.jsonl"), clock=Clock()))
        apps[-1].on_answered()
    assert hub.calls == {"call-0", "call-1"} and apps[0]._line().model_calls == 2
    apps[1].on_end()
    assert hub.calls == {"call-0"} and apps[0]._line().model_calls == 1
    apps[0].on_end()
    assert hub.calls == set()


def test_a_failed_app_releases_its_model_state_and_leaves_the_hub():
    """An app that raises is dropped without on_end (bridge/cell/cell.py ``_app_failed``): the cell
    releases the call's model state in the inference process and takes it off the hub's count."""
    from types import SimpleNamespace

    from bridge.cell.cell import Cell
    from bridge.core.metrics import Metrics as M
    hub = FakeHub()
    hub.released = []
    hub.release = hub.released.append
    hub.joined("call-9")
    stopped = []

    class Resource:                               # an API transcribe or speaking on the call
        def __init__(self, name, fails=False):
            self.name, self.fails = name, fails

        def stop(self):
            stopped.append(self.name)
            if self.fails:
                raise RuntimeError("already broken")

    s = SimpleNamespace(call_id="call-9", app=object(), answered_at=1.0, hangups=[],
                        transcribers={"tr_1": Resource("tr_1", fails=True)}, speakings={"spk_1": Resource("spk_1")})
    s.hangup = lambda reason, status=0: s.hangups.append((reason, status))
    Cell._app_failed(SimpleNamespace(hub=hub, metrics=M()), s, RuntimeError("boom"))
    assert s.app is None and s.hangups == [("app error", 0)]
    assert stopped == ["tr_1", "spk_1"], "each stopped, one failing does not keep the next"
    assert hub.released == ["call-9"] and hub.calls == set()
