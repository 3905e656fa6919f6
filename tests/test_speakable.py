"""Never speak markup: the filter alone (whole strings and token streams cut every
way), and on a call (``AgentApp`` with a fake at the model boundary) where the
model's markup must never reach TTS nor the history."""
import copy

import pytest

from bridge.agent.app import AgentApp
from bridge.agent.speakable import Speakable, is_stage_direction, speakable
from bridge.core.config import DEFAULTS
from bridge.core.metrics import Metrics
from bridge.records.journal import CallRecords
from media.callmedia import CallMedia
from media.frames import split_frames
from recorded import speech_frames, transcript
from test_agent_flow import AgentCalls

FB = "Could you tell me more?"

# (model output, what may be spoken); "" means nothing speakable: the fallback line is said.
CASES = [
    # the issue: the agent spoke its own tool syntax in `trunkline chat`
    ('(using tool createpayment {"amount":10, "invoiceId":"23456789"})', ""),
    ('agent: (using tool createpayment {"amount":10, "invoiceId":"23456789"})', ""),
    ('Sure. (using tool createpayment {"amount":10, "invoiceId":"23456789"}) It is paid.', "Sure. It is paid."),
    ('{"tool": "pay_invoice", "arguments": {"invoice_number": "INV-1002"}}', ""),
    ('[{"number": "INV-1001", "amount": 120.5}]', ""),
    ('pay_invoice(invoice_number="INV-1002")', ""),
    ("functions.lookup_invoices({})", ""),
    ('<tool_call>{"name": "lookup_invoices", "arguments": {}}</tool_call>', ""),
    ('<tool_call>\n{"name": "lookup_invoices"}\n</tool_call> One moment.', "One moment."),
    ("Let me check that for you: lookup_invoices {}", "Let me check that for you:"),
    ("Calling tool lookup_invoices now.", "now."),
    ('tool_call: {"name": "x"}', ""),
    # code
    ('```json\n{"a": 1}\n```\nHere you go.', "Here you go."),
    ("```python\nprint('hi')\n```", ""),
    ("Run `pip install x` first.", "Run first."),
    # stage directions
    ("*smiles* Hello there!", "Hello there!"),
    ("[laughs] That is a good question.", "That is a good question."),
    ("(pauses) Okay, let me see.", "Okay, let me see."),
    ("Sure *clears throat* we open at nine.", "Sure we open at nine."),
    ("(warmly) Welcome back!", "Welcome back!"),
    ("*smiles warmly*", ""),
    # role tags and chat templates
    ("assistant: We are open nine to five.", "We are open nine to five."),
    ("Assistant: Hi.\nUser: what about Sunday?", "Hi."),
    ("<|im_start|>assistant\nWe are open nine to five.<|im_end|>", "We are open nine to five."),
    ("We are open nine to five.<|im_end|>\n<|im_start|>user\nand Sunday?", "We are open nine to five."),
    ("We are open nine to five. User: what about Sunday?", "We are open nine to five."),
    ("[INST] hello [/INST] Hi!", "Hi!"),
    ("<s>Hello!</s>", "Hello!"),
    ("### Assistant: Sure.", "Sure."),
    ("<|im_start|>", ""),
]

PLAIN = [
    "We are open Monday to Friday, nine to five.",
    "You owe 42.50 dollars, due on 2026-12-01.",
    "Dr. Smith can see you at 9 a.m. on Tuesday.",
    "Your invoice INV-1002 is overdue; shall I pay it now?",
    "I really can help with that!",
    "That's 3 items: a cleaning, a check-up and an x-ray.",
    "Bonjour, comment puis-je vous aider ?",
]


def tidy(s: str) -> str:
    return " ".join(s.split())


def streamed(text: str, size: int, fallback: str = FB) -> str:
    s = Speakable(fallback)
    out = [s.feed(text[i:i + size]) for i in range(0, len(text), size)]
    return tidy("".join(out) + " " + s.finish())


@pytest.mark.parametrize("text,want", CASES)
def test_markup_never_spoken(text, want):
    expected = want or FB
    assert speakable(text, FB) == expected
    for size in (1, 2, 3, 5, 8, 1000):                   # however the tokens are cut
        assert streamed(text, size) == expected, size


@pytest.mark.parametrize("text", PLAIN)
def test_plain_speech_passes_unchanged(text):
    assert speakable(text, FB) == text
    for size in (1, 3, 7):
        assert streamed(text, size) == text


def test_parenthetical_aside_keeps_its_words():
    assert speakable("We are open (Monday to Friday) from nine.") == "We are open Monday to Friday from nine."
    assert speakable("I *really* mean it.") == "I really mean it."
    assert is_stage_direction("laughs softly") and is_stage_direction("brief pause")
    assert not is_stage_direction("Monday to Friday") and not is_stage_direction("room 12")


def test_streaming_holds_back_only_what_is_undecided():
    s = Speakable(FB)
    assert s.feed("Sure, I can ") == "Sure, I can "
    assert s.feed("help. {\"tool\": ") == "help. "               # an open object is held
    assert s.feed("\"x\"} Anything ") == " Anything "             # ... and dropped when it closes
    assert s.feed("else? assis") == "else? "                      # the word being typed is held
    assert s.feed("tant") == ""
    assert s.finish() == "assistant"                               # a plain word after all
    assert s.dropped == ['{"tool": "x"}']


def test_fallback_only_when_nothing_but_markup():
    s = Speakable(FB)
    s.feed('{"a": 1}')
    assert s.finish() == FB
    s = Speakable(FB)
    assert s.feed("") == "" and s.finish() == ""                 # an empty reply is not markup
    s = Speakable(FB)
    s.feed('{"tool": "lookup_invoices"}')
    s.chose_tool()                                                 # the round ended in a real tool call
    assert s.finish() == ""
    assert Speakable("").feed("(pauses) ") == "" and speakable("(pauses)") == ""


def test_unclosed_markup_is_dropped_at_the_end():
    assert speakable('Okay. {"tool": "pay_invoice", "arguments": {', FB) == "Okay."
    assert speakable("Okay. ```python\nx = 1", FB) == "Okay."
    assert speakable("Okay (and then", FB) == "Okay and then"


# -- on a call -----------------------------------------------------------------------------------
RATE = 8000


class FakeHub(AgentCalls):
    """The inference process's interface; the test plays the model."""
    def __init__(self):
        self.stt_reqs, self.llm_reqs, self.tts_reqs = [], [], []
        self.calls = set()
        self.canned = {k: split_frames(bytes(3200), RATE) for k in
                       ("greeting", "reprompt_text", "goodbye_text", "not_understood_text", "apology_text")}

    def stt(self, call, pcm, interim, on_result, on_error=None):
        self.stt_reqs.append({"interim": interim, "cb": on_result})

    def llm(self, call, messages, params, on_token, on_done, on_error, on_tool=None):
        self.llm_reqs.append({"messages": copy.deepcopy(messages), "tok": on_token, "done": on_done,
                              "tool": on_tool, "params": params, "call": call})

    def tts(self, call, text, on_result, on_done=None, on_error=None):
        self.tts_reqs.append({"text": text, "cb": on_result, "done": on_done})

    def cancel(self, call):
        pass

    def release(self, call):
        pass

    def stt_backlog(self):
        return 0


    def to_frames(self, pcm, rate):
        return split_frames(pcm, RATE)


class Session:
    def __init__(self):
        self.media = CallMedia(RATE)
        self.call_id = "call-1"
        self.from_uri, self.to_uri = "sip:+15551230001@pbx", "sip:+15550000000@us"
        self.tool_calls, self.hangups, self.events = [], [], []

    def hangup(self, reason, status=0):
        self.hangups.append(reason)

    def emit(self, etype, data):
        self.events.append((etype, data))

    def record_transcript(self, direction, text, transcribe_id=None, extra=None):
        self.events.append(("transcript_created", {"direction": direction, "message": text}))


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make_agent(tmp_path):
    cfg = copy.deepcopy(DEFAULTS["agent"])
    cfg.update(greeting="", interim_every=0.0, reprompt_after=0.0, hangup_after=0.0, speculate=False,
               markup_fallback_text=FB)
    if "turn_model" in cfg:
        cfg["turn_model"] = "none"                  # the silence window ends the turn (no turn model here)
    hub, session = FakeHub(), Session()
    app = AgentApp(session, hub, cfg, Metrics(), CallRecords(str(tmp_path), name="turns.jsonl"), clock=Clock())
    app.on_answered()
    return app, hub, session


def feed(app, frames):
    for f in frames:
        app.clock.t += 0.02
        now = app.clock.t
        app.on_frames([(now, f)], now)
        app.on_tick(now)
        app.session.media.tx(now)


def caller_turn(app, hub):
    """The caller says a sentence and stops; returns the model request for the reply."""
    before = len(hub.llm_reqs)
    feed(app, speech_frames(rate=RATE) + [bytes(320)] * 60)
    for r in hub.stt_reqs:
        if not r["interim"] and not r.get("done"):
            r["done"] = True
            r["cb"](*transcript().values())
    feed(app, [bytes(320)] * 5)
    assert len(hub.llm_reqs) > before
    return hub.llm_reqs[-1]


def play_out(app, hub):
    for t in hub.tts_reqs:
        if not t.get("played"):
            t["played"] = True
            t["cb"](bytes(1600), RATE)
            t["done"](0.01)
    feed(app, [bytes(320)] * 100)


@pytest.mark.parametrize("pieces", [
    ['(using tool ', 'createpayment {"amount":10, ', '"invoiceId":"23456789"})'],
    ['assistant: ', '{"tool": "pay_invoice"}'],
    ['*smiles* ', '[laughs]'],
])
def test_a_reply_of_only_markup_says_the_clarifying_line(tmp_path, pieces):
    app, hub, session = make_agent(tmp_path)
    req = caller_turn(app, hub)
    for p in pieces:
        req["tok"](p)
    req["done"](0.1, 10)
    assert [t["text"] for t in hub.tts_reqs] == [FB]
    play_out(app, hub)
    assert app.history[-1] == {"role": "assistant", "content": FB}       # the model never re-reads its markup


def test_markup_inside_a_reply_is_cut_out_sentence_by_sentence(tmp_path):
    app, hub, session = make_agent(tmp_path)
    req = caller_turn(app, hub)
    text = ('Sure. (using tool createpayment {"amount":10, "invoiceId":"23456789"}) I have started '
            'the payment. *smiles* Anything else?')
    for i in range(0, len(text), 4):
        req["tok"](text[i:i + 4])
    req["done"](0.1, 30)
    said = [t["text"] for t in hub.tts_reqs]
    assert " ".join(said) == "Sure. I have started the payment. Anything else?", said
    for s in said:
        assert not any(ch in s for ch in "{}[]()*\"") and "tool" not in s
    play_out(app, hub)
    assert app.history[-1]["content"] == "Sure. I have started the payment. Anything else?"
