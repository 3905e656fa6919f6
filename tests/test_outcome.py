"""What came of a call: the model's rough answer parsed defensively and checked
against the call's records; stored sealed with the call; on a real call, the
``call_summary`` event delivered to a webhook receiver on loopback."""
import json
import sqlite3
import subprocess
import sys
import time

import pytest
from aiohttp import web

from bridge.agent.outcome import DISPOSITIONS, Facts, decide, facts_of, parse, rule_disposition
from bridge.records.store import Store
from support import ROOT, Api, create_key, serve_on_loopback

HISTORY = [
    {"role": "assistant", "content": "Hello! How can I help you today?"},
    {"role": "user", "content": "How much do I owe on my bill?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "lookup_invoices", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "name": "lookup_invoices", "content": '{"status":"ok","count":2}'},
    {"role": "assistant", "content": "You have 2 open invoices."},
]


@pytest.mark.parametrize("answer,summary,disposition,intent", [
    ('{"summary": "The caller asked about their bill.", "disposition": "resolved", "intent": "billing"}',
     "The caller asked about their bill.", "resolved", "billing"),
    ('Sure! Here it is:\n{"summary": "Caller checked invoices", "disposition": "Resolved.", "intent": "bill"}\n',
     "Caller checked invoices", "resolved", "bill"),
    ("Summary: The caller wanted to know their balance.\nOutcome: callback\nIntent: balance",
     "The caller wanted to know their balance.", "callback", "balance"),
    ('"summary": "Asked about the bill", "disposition": "unresolved"', "Asked about the bill", "unresolved", None),
])
def test_rough_answers_are_read(answer, summary, disposition, intent):
    got = parse(answer)
    assert got.get("summary") == summary and got.get("intent") == intent
    o = decide(answer, facts_of(HISTORY), HISTORY)
    assert o.disposition == disposition and o.summary == summary and o.source == "model"


def test_the_small_model_s_plain_sentence_is_the_summary_and_intent():
    from bridge.agent.outcome import messages
    answer = "The caller wanted to know how much they owe on a bill, which is an example of customer service."
    o = decide(answer, facts_of(HISTORY), HISTORY)
    assert o.summary == "The caller wanted to know how much they owe on a bill."
    assert o.intent == "know how much they owe on a bill" and o.disposition == "resolved" and o.source == "model"
    plain = messages(HISTORY, structured=False)
    assert len(plain) == 1 and plain[0]["content"].endswith("In one sentence, what did the caller want?")
    assert "Caller: How much do I owe on my bill?" in plain[0]["content"]
    assert "lookup_invoices" in plain[0]["content"] and "{" not in plain[0]["content"]   # no JSON for it to copy


@pytest.mark.parametrize("answer", ["", "I am a helpful assistant.", "I'm sorry, the caller cannot be helped.",
                                    "This phone call is a classic example of a call.", "{", '{"summary": 3}',
                                    "disposition: maybe",
                                    '{"summary": "ok", "disposition": "great"}', "x" * 5000])
def test_unusable_answers_fall_back_to_the_rules(answer):
    o = decide(answer, facts_of(HISTORY), HISTORY)
    assert o.disposition == "resolved"                    # a tool worked and nothing failed
    assert o.source == "rules" and "How much do I owe on my bill" in o.summary and "lookup_invoices" in o.summary
    assert o.intent == "How much do I owe on my bill?" and len(o.summary) < 400


def test_the_records_win_over_the_model():
    good = '{"summary": "The caller was helped with a bill.", "disposition": "resolved", "intent": "bill"}'
    silent = [{"role": "assistant", "content": "Hello! How can I help you today?"}]
    assert decide(good, facts_of(silent), silent).disposition == "abandoned"
    assert decide(good, facts_of(HISTORY, transferred=True), HISTORY).disposition == "transferred"
    failed = HISTORY[:3] + [{"role": "tool", "tool_call_id": "c1", "name": "lookup_invoices",
                             "content": '{"status":"error","error":"timeout"}'},
                            {"role": "assistant", "content": "Sorry, I can't do that right now. "
                                                             "I'll have someone call you back."}]
    f = facts_of(failed, callback_text="I'll have someone call you back.")
    assert f.callback_promised and f.tools_failed == 1
    assert decide(None, f, failed).disposition == "callback"
    assert decide('{"disposition": "unresolved"}', f, failed).disposition == "callback"
    assert rule_disposition(Facts(caller_turns=1)) == "unresolved"
    accepted = HISTORY[:3] + [{"role": "tool", "tool_call_id": "c1", "name": "pay_invoice_later",
                               "content": '{"status":"pending","reference":"req_77"}'}]   # an async tool's answer
    assert facts_of(accepted).tools_ok == 1 and decide(None, facts_of(accepted), accepted).disposition == "resolved"
    assert set(DISPOSITIONS) >= {"resolved", "transferred", "callback", "abandoned"}


def test_outcome_is_stored_sealed_with_the_call(tmp_path):
    store = Store(str(tmp_path))
    row = {"id": "call-9", "direction": "inbound", "from_uri": "sip:+15551230001@pbx", "to_uri": "sip:+1555@us",
           "state": "ended", "created": time.time(), "ended": time.time()}
    staged = store.stage_call(row)
    store.upsert_call(staged)
    store.call_saved(staged)
    outcome = {"summary": "Ada asked about invoice INV-1001.", "disposition": "resolved", "intent": "billing",
               "source": "model"}
    store.set_call_outcome("call-9", outcome)
    assert store.get_call("call-9")["outcome"] == outcome
    raw = sqlite3.connect(store.path).execute("SELECT outcome FROM calls WHERE id = 'call-9'").fetchone()[0]
    assert "INV-1001" not in raw and "Ada" not in raw                   # sealed at rest, like the transcript
    store.erase_caller("+15551230001", "test")                             # erased with the caller
    assert store.get_call("call-9") is None


# -- on a real call ------------------------------------------------------------------------------------------
class SummaryLLM:
    """An OpenAI-compatible model server on loopback: short replies, and the outcome as JSON."""

    def __init__(self):
        self.requests: list[dict] = []
        self.port, self.loop = serve_on_loopback(self._app)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def _app(self):
        async def chat(request):
            body = await request.json()
            self.requests.append(body)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            if body["messages"][0]["content"].startswith("Read the phone call"):
                text = ('{"summary": "The caller asked about opening hours.", "disposition": "resolved", '
                        '"intent": "opening hours"}')
            else:
                text = "We are open nine to five."
            await resp.write(f"data: {json.dumps({'choices': [{'delta': {'content': text}}]})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app


@pytest.mark.slow
@pytest.mark.sample
def test_call_summary_reaches_a_webhook_and_the_call_record(cell_factory, tmp_path):
    from voice import Caller
    hooks: list[dict] = []

    def receiver():
        async def hook(request):
            hooks.append(json.loads(await request.read()))
            return web.Response(status=204)
        app = web.Application()
        app.router.add_post("/hook", hook)
        return app
    hook_port, hook_loop = serve_on_loopback(receiver)
    llm = SummaryLLM()
    config = (f'[models]\nllm_backend = "openai"\nllm_url = "{llm.url}"\nllm_model = "big"\n'
              '[http]\noutbound_allow = ["127.0.0.1/32"]\n'               # the fake LLM, the receiver: loopback
              '[agent]\nspeculate = false\n')
    cell = cell_factory(config, args=("--app", "agent"))
    control = create_key(cell.data, "control")
    status, _, _ = Api(cell, control).post("/v1/webhooks", {"url": f"http://127.0.0.1:{hook_port}/hook",
                                                            "topics": ["event:call_summary", "event:call_hangup"]})
    assert status == 201
    caller = Caller(cell, tmp_path)
    try:
        caller.wait_reply(time.monotonic())
        end = caller.speak("What are your opening hours?")
        caller.wait_reply(end)
        assert caller.goodbye() == 0
    finally:
        caller.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(h["type"] == "call_summary" for h in hooks):
        time.sleep(0.1)
    hook_loop.call_soon_threadsafe(hook_loop.stop)
    llm.loop.call_soon_threadsafe(llm.loop.stop)
    summary = next(h for h in hooks if h["type"] == "call_summary")
    assert summary["data"] == {"summary": "The caller asked about opening hours.", "disposition": "resolved",
                               "intent": "opening hours", "source": "model"}
    hangup = next(h for h in hooks if h["type"] == "call_hangup")
    assert summary["seq"] > hangup["seq"] and summary["call_seq"] > hangup["call_seq"]    # after the call, in order
    asked = next(r for r in llm.requests if r["messages"][0]["content"].startswith("Read the phone call"))
    assert "caller: what are your opening" in asked["messages"][1]["content"].lower()     # it read the transcript
    read = create_key(cell.data, "read")
    call = Api(cell, read).get(f"/v1/calls/{summary['call_id']}")[1]
    assert call["outcome"] == summary["data"]


@pytest.mark.slow
def test_chat_summary_with_the_bundled_model(tmp_path):
    """The default 135M model writes the outcome: rough, but the fields are always usable."""
    cfg = tmp_path / "chat.toml"
    cfg.write_text("")
    p = subprocess.run([sys.executable, "-m", "bridge.cli", "chat", "--config", str(cfg)],
                       input="Hi, I'd like to book a cleaning for next Monday.\n/quit\n", capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    line = next(x for x in p.stdout.splitlines() if x.startswith("outcome> "))
    o = json.loads(line[len("outcome> "):])
    assert o["disposition"] in DISPOSITIONS and o["summary"].strip() and o["intent"].strip()
    assert o["source"] in ("model", "rules")


def test_events_after_the_call_go_on_counting_its_call_seq(tmp_path):
    from bridge.api.events import EventBus
    bus = EventBus(Store(str(tmp_path)))
    bus.publish("call_ringing", "c1", {})
    bus.publish("call_hangup", "c1", {"reason": "bye"})
    bus.forget_call("c1")                                   # the cell forgets a call when it ends
    bus.publish("call_summary", "c1", {"summary": "x", "disposition": "abandoned", "intent": "", "source": "rules"})
    rows = bus.store.events_since(0)
    assert [(r["type"], json.loads(r["data"])["call_seq"]) for r in rows] == [
        ("call_ringing", 1), ("call_hangup", 2), ("call_summary", 3)]
    assert "c1" not in bus.call_seq                         # nothing kept per live call


def test_agent_call_end_asks_the_model_off_the_call_and_publishes(tmp_path):
    """``AgentApp.on_end`` with a fake at the model boundary: one request under its own key, the event after."""
    from test_speakable import caller_turn, make_agent, play_out
    app, hub, session = make_agent(tmp_path)
    req = caller_turn(app, hub)
    req["tok"]("We are open nine to five. ")
    req["done"](0.1, 8)
    play_out(app, hub)
    app.on_end()
    ask = hub.llm_reqs[-1]
    assert ask["call"] == "call-1:outcome" and ask["messages"][0]["content"].startswith("Read the phone call")
    assert "Caller: " in ask["messages"][1]["content"] and "nine to five" in ask["messages"][1]["content"]
    assert not [e for e, _ in session.events if e == "call_summary"]        # not yet: the model is working
    ask["tok"]('{"summary": "The caller asked when we are open.", "disposition": "resolved", "intent": "hours"}')
    ask["done"](0.5, 20)
    (data,) = [d for e, d in session.events if e == "call_summary"]
    assert data == {"summary": "The caller asked when we are open.", "disposition": "resolved", "intent": "hours",
                    "source": "model"}


def test_a_silent_caller_is_abandoned_without_asking_the_model(tmp_path):
    from test_speakable import make_agent
    app, hub, session = make_agent(tmp_path)
    before = len(hub.llm_reqs)
    app.on_end()
    assert len(hub.llm_reqs) == before
    (data,) = [d for e, d in session.events if e == "call_summary"]
    assert data["disposition"] == "abandoned" and data["source"] == "rules"
