"""The agent's turn logic with a fake at the model boundary (the inference
process); the VAD, endpointer, playout and history handling are real."""
import copy

import pytest

from bridge.agent import AgentApp
from bridge.config import DEFAULTS
from bridge.metrics import Metrics
from bridge.records import CallRecords
from media.callmedia import CallMedia
from media.frames import split_frames
from voice import say

RATE = 8000


class FakeHub:
    def __init__(self):
        self.stt_reqs, self.llm_reqs, self.tts_reqs = [], [], []
        self.cancels = 0
        self.released = False
        self.canned = {k: split_frames(bytes(3200), RATE) for k in
                       ("greeting", "reprompt_text", "goodbye_text", "not_understood_text", "apology_text")}

    def stt(self, call, pcm, interim, on_result, on_error=None):
        self.stt_reqs.append({"pcm": pcm, "interim": interim, "cb": on_result, "err": on_error})
        return len(self.stt_reqs)

    def llm(self, call, messages, params, on_token, on_done, on_error):
        self.llm_reqs.append({"messages": copy.deepcopy(messages), "tok": on_token, "done": on_done})
        return len(self.llm_reqs)

    def tts(self, call, text, on_result, on_done=None, on_error=None):
        self.tts_reqs.append({"text": text, "cb": on_result, "done": on_done})
        return len(self.tts_reqs)

    def cancel(self, call):
        self.cancels += 1

    def stt_backlog(self):
        return 0

    def release(self, call):
        self.released = True

    def to_frames(self, pcm, rate):
        return split_frames(pcm, RATE)


class Session:
    def __init__(self):
        self.media = CallMedia(RATE)
        self.call_id = "call-1"
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
    app = AgentApp(session, hub, cfg, Metrics(), CallRecords(str(tmp_path), name="turns.jsonl"))
    app.on_answered()
    hub.llm_reqs.clear()                       # the KV-cache warm-up request
    app.clock = 100.0
    return app, hub, session


def feed(app, frames):
    """Caller audio in, and the media clock taking one outgoing frame per incoming one."""
    for f in frames:
        app.clock += 0.02
        app.on_frames([(app.clock, f)], app.clock)
        app.on_tick(app.clock)
        app.session.media.tx(app.clock)


SPEECH = split_frames(say("I would like to book a cleaning please."), RATE)
SILENCE = [bytes(320)] * 60


def answer(hub, text="Sure, I can help you with that. What day works?"):
    req = hub.llm_reqs[-1]
    for tok in text.split(" "):
        req["tok"](tok + " ")
    req["done"](0.1, 10)
    for t in hub.tts_reqs:
        t["cb"](say(t["text"]), RATE)
        t["done"](0.05)


def test_speculative_reply_is_held_until_the_turn_ends(agent):
    app, hub, session = agent
    feed(app, SPEECH + SILENCE[:12])               # 240 ms of quiet: a pause, not the end
    spec = [r for r in hub.stt_reqs if not r["interim"]]
    assert len(spec) == 1
    spec[0]["cb"]("I would like to book a cleaning please.", 0.01, -0.2, 2.0, 0.3)
    assert len(hub.llm_reqs) == 1 and hub.llm_reqs[0]["messages"][-1]["content"].startswith("I would like")
    answer(hub)
    assert session.media.queued_out() == 0         # held: nothing goes out yet
    feed(app, SILENCE[:25])                         # the silence window closes
    assert session.media.tx_frames > 0              # released at once
    assert app.history[-1] == {"role": "user", "content": "I would like to book a cleaning please."}
    feed(app, [bytes(320)] * 400)                   # let it all play
    assert app.reply is None
    assert app.history[-1]["role"] == "assistant"
    assert app.history[-1]["content"] == "Sure, I can help you with that. What day works?"
    lines = (app.turns.path and open(app.turns.path).read().splitlines())
    assert len(lines) == 2 and '"role": "caller"' in lines[0] and '"role": "agent"' in lines[1]


def test_caller_going_on_after_a_pause_cancels_the_held_reply(agent):
    app, hub, session = agent
    feed(app, SPEECH + SILENCE[:12])
    hub.stt_reqs[-1]["cb"]("I would like to book", 0.01, -0.2, 2.0, 0.3)
    assert app.reply is not None and app.reply.held
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
    feed(app, SPEECH[:15])                           # the caller talks over the agent
    assert hub.cancels == cancels + 1
    assert session.media.queued_out() == 0
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
