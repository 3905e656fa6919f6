"""The voice agent calling the business's API during a real call: a SIPp
caller with an E.164 caller id speaks (synthesized speech over PCMU), whisper
and Piper run for real, the billing API runs on loopback, and the model is a
scripted OpenAI-compatible server (this test is about the tool plumbing, not
the model's judgement: tests/bench/tools.py measures that)."""
import json
import time

import pytest

from billing import TOKEN, BillingApi, tools_toml
from bridge.records.journal import CallRecords
from fake_llm import FakeLLM
from support import SCENARIOS, Api, create_key
from voice import Caller, transcribe

CALLER_ID = "+15551230001"


@pytest.mark.slow
@pytest.mark.sample
def test_agent_looks_up_with_filler_then_pays_async(cell_factory, tmp_path):
    billing = BillingApi(slow_seconds=1.5)
    llm = FakeLLM()
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'billing_token = "{TOKEN}"\n')
    config = (f'[models]\nllm_backend = "openai"\nllm_url = "{llm.url}"\nllm_model = "big"\n'
              '[http]\noutbound_allow = ["127.0.0.1/32"]\n'     # the fake LLM and billing API are on loopback
              '[agent]\nspeculate = true\n' + tools_toml(billing.url, timeout=3.0).replace("{secrets}", str(secrets)))
    cell = cell_factory(config, args=("--app", "agent"))
    scenario = tmp_path / "caller.xml"
    scenario.write_text((SCENARIOS / "wait_bye.xml").read_text().replace("sip:sipp@", f"sip:{CALLER_ID}@"))
    billing.fail("/v1/invoices", "slow")              # 1.5 s: past filler_after (0.5 s), inside the timeout
    caller = Caller(cell, tmp_path, seconds=60, scenario=str(scenario))
    try:
        greeting = caller.wait_reply(time.monotonic())
        assert "help" in transcribe(greeting).lower()
        end = caller.speak("How much do I owe on my bill?")
        heard = transcribe(caller.wait_reply(end, quiet=2.5)).lower()
        assert "moment" in heard                                    # the filler while the API was slow
        assert "the first is" in heard and "120" in heard, heard     # the tool's `say` line, read out
        end = caller.speak("Please pay it later.")
        # The API accepts at once and confirms 0.5 s later, while the agent is still saying so:
        # the confirmation is held until that line is finished, then spoken.
        heard = transcribe(caller.wait_reply(end, quiet=2.0)).lower()
        assert "started the payment" in heard, heard
        assert "confirmed" in heard.split("started the payment", 1)[1], heard
        assert caller.goodbye() == 0
    finally:
        caller.close()
        billing.stop()
    # What the API saw: the caller id from SIP, the secret header, one payment.
    look = [r for r in billing.requests if r["path"] == "/v1/invoices"]
    assert look[0]["query"]["phone"] == CALLER_ID
    assert len(billing.payments) == 1 and billing.payments[0]["invoice_number"] == "INV-1001"
    assert billing.callbacks and billing.callbacks[0][0] == 202
    # The call's record carries the audit of every tool call, without the secret.
    ended = cell.wait_event("call_ended")[0]
    deadline = time.monotonic() + 15                            # the writer appends the journal
    records = []
    while not records and time.monotonic() < deadline:
        records = [r for r in CallRecords(str(cell.data)).read() if r["call_id"] == ended["call_id"]]
        time.sleep(0.1)
    audit = records[0]["tools"]                                 # the journal's copy, decrypted (the log's has no arguments)
    assert [(a["tool"], a["status"]) for a in audit] == [
        ("lookup_invoices", "ok"), ("pay_invoice_later", "accepted"), ("pay_invoice_later", "async_result")]
    assert audit[0]["request"]["query"]["phone"] == CALLER_ID and audit[0]["result"]["count"] == 2
    assert TOKEN not in json.dumps(ended) and TOKEN not in cell.log_path.read_text()
    # Tool events on the bus (WebSocket/webhooks read the same store).
    key = create_key(cell.data, "read")
    events = Api(cell, key).get("/v1/events?since=0")[1]["events"]
    kinds = [(e["type"], e["data"].get("tool")) for e in events if e["type"].startswith("tool_")]
    assert kinds == [("tool_called", "lookup_invoices"), ("tool_called", "pay_invoice_later"),
                     ("tool_result", "pay_invoice_later")]
    intents = [e["data"]["intent"] for e in events if e["type"] == "intent_detected"]
    assert intents == ["lookup_invoices", "pay_invoice_later"]                  # published as each tool is chosen
    assert [e["data"]["disposition"] for e in events if e["type"] == "call_summary"] == ["resolved"]
    m = cell.metrics()
    assert m['trunkline_tool_calls_total{outcome="ok",tool="lookup_invoices"}'] == 1
    assert m['trunkline_tool_async_results_total{outcome="delivered",tool="pay_invoice_later"}'] == 1
    assert m['trunkline_tool_breaker_state{tool="lookup_invoices"}'] == 0


# -- tool chains and id provenance (`trunkline chat` and the runner, billing API on loopback) ---------------
import asyncio  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from aiohttp import web  # noqa: E402

from support import ROOT, serve_on_loopback  # noqa: E402

SAY_LOOKUP = 'say = "You have {count} open invoices. The first is {items[0].number} for {items[0].amount} dollars."\n'


class ChainLLM:
    """A scripted OpenAI-compatible model that chains tools: asked what is owed and to pay, it looks the
    invoices up, then pays the one the lookup returned (``guess``: an id it made up instead)."""

    def __init__(self, guess: str | None = None, says: str = "Okay."):
        self.guess = guess
        self.says = says                  # the reply to anything else
        self.requests: list[dict] = []
        self.port, self.loop = serve_on_loopback(self._app)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)

    def _app(self):
        async def chat(request):
            body = await request.json()
            self.requests.append(body)
            msgs, offered = body["messages"], {t["function"]["name"] for t in body.get("tools", [])}
            last = msgs[-1]
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)

            async def send(delta):
                await resp.write(f"data: {json.dumps({'choices': [{'delta': delta}]})}\n\n".encode())

            async def call(name, args):
                await send({"tool_calls": [{"index": 0, "id": f"call_{len(self.requests)}", "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})
                await send({"tool_calls": [{"index": 0, "function": {"arguments": json.dumps(args)}}]})
            if msgs[0]["content"].startswith("Read the phone call"):          # the call's outcome
                await send({"content": '{"summary": "The caller paid invoice INV-1001.", '
                                       '"disposition": "resolved", "intent": "pay a bill"}'})
            elif last["role"] == "user" and "lookup_invoices" in offered:
                await call("lookup_invoices", {})
            elif last["role"] == "tool" and last.get("name") == "lookup_invoices" and "pay_invoice" in offered:
                found = json.loads(last["content"])["items"][0]["number"]
                await call("pay_invoice", {"invoice_number": self.guess or found})
            elif last["role"] == "tool":
                await send({"content": "I could not do that. " if '"error"' in last["content"] else "Done. "})
            else:
                for i in range(0, len(self.says), 5):
                    await send({"content": self.says[i:i + 5]})
            await resp.write(b"data: [DONE]\n\n")
            return resp

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app


def chain_config(llm_url: str, billing_url: str, source: str = "tool") -> str:
    tools = tools_toml(billing_url).replace(SAY_LOOKUP, "")               # the model reads the lookup's result
    tools = tools.replace('description = "like INV-1001" }',
                          f'description = "like INV-1001", "x-source" = "{source}" }}')
    tools = tools.split("[[tool]]\nname = \"pay_invoice_later\"")[0]
    return (f'[models]\nllm_backend = "openai"\nllm_url = "{llm_url}"\nllm_model = "big"\n'
            '[http]\noutbound_allow = ["127.0.0.1/32"]\n'                   # the fake LLM, billing API: loopback
            + tools.replace("[tools]\n", "[tools]\nshortlist = 0\nmax_per_turn = 3\n"))


def run_chat(tmp_path, config: str, lines: list[str]):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'billing_token = "{TOKEN}"\n')
    cfg = tmp_path / "chat.toml"
    cfg.write_text(config.replace("{secrets}", str(secrets)))
    return subprocess.run([sys.executable, "-m", "bridge.cli", "chat", "--config", str(cfg), "--caller", CALLER_ID],
                          input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_chat_chains_lookup_then_pay_with_the_looked_up_id(tmp_path):
    billing, llm = BillingApi(), ChainLLM()
    try:
        p = run_chat(tmp_path, chain_config(llm.url, billing.url), ["What do I owe? Please pay it.", "/quit"])
    finally:
        billing.stop()
        llm.stop()
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout.splitlines()
    assert "tool> lookup_invoices {}" in out
    assert 'tool> pay_invoice {"invoice_number":"INV-1001"}' in out                 # the id the lookup returned
    assert "agent: Done. I paid INV-1001, 120.5 dollars." in out
    assert [x["invoice_number"] for x in billing.payments] == ["INV-1001"]
    summary = json.loads(next(x for x in out if x.startswith("outcome> "))[len("outcome> "):])
    assert summary == {"summary": "The caller paid invoice INV-1001.", "disposition": "resolved",
                       "intent": "pay a bill", "source": "model"}
    # the model was never shown the operator's annotation
    offered = [t for r in llm.requests for t in r.get("tools", []) if t["function"]["name"] == "pay_invoice"]
    assert offered and "x-source" not in json.dumps(offered)


def test_chat_refuses_a_made_up_id_and_tells_the_model(tmp_path):
    billing, llm = BillingApi(), ChainLLM(guess="INV-2001")       # a real invoice, of another customer
    try:
        p = run_chat(tmp_path, chain_config(llm.url, billing.url), ["What do I owe? Please pay it.", "/quit"])
    finally:
        billing.stop()
        llm.stop()
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout.splitlines()
    assert "tool> lookup_invoices {}" in out and 'tool> pay_invoice {"invoice_number":"INV-2001"}' in out
    refused = next(x for x in out if x.startswith("tool> pay_invoice -> invalid"))
    assert "did not come from a tool result" in refused
    assert billing.count("/v1/payments") == 0 and billing.payments == []         # never sent to the API
    tool_msgs = [m for m in llm.requests[-2]["messages"] if m["role"] == "tool" and m["name"] == "pay_invoice"]
    assert "refused" in tool_msgs[-1]["content"]                                   # the model read the refusal
    assert "agent: I could not do that." in out


def _runner_box(url: str):
    from bridge.core.toolspec import load_toolbox
    pay = {"name": "create_payment", "description": "Pay an invoice.", "method": "POST", "url": url + "/v1/payments",
           "parameters": {"type": "object", "properties": {"amount": {"type": "number"},
                                                           "invoiceId": {"type": "string"}},
                          "required": ["invoiceId"]},
           "body": {"invoice_number": "{args.invoiceId}"},
           "headers": {"Authorization": "Bearer " + TOKEN}, "idempotency_key": "{call.id}-{args_hash}"}
    return load_toolbox([pay])


def test_runner_refuses_the_issue_s_hallucinated_invoice_id_until_the_caller_says_it():
    """``invoiceId`` is an id by its name: the exact call from the issue is refused before any request."""
    from bridge.agent.tools.runner import CallContext, ToolRunner
    from bridge.core.config import DEFAULTS
    from bridge.core.netguard import Policy
    billing = BillingApi()

    async def scenario():
        runner = ToolRunner(_runner_box(billing.url), DEFAULTS["tools"], guard=Policy.parse(["127.0.0.1/32"]))
        await runner.start()
        try:
            ctx = CallContext("c1", "sip:+15551230001@pbx", "sip:+15550000000@us")
            ctx.evidence.caller("I want to pay my bill")
            o = await runner.call(ctx, "create_payment", {"amount": 10, "invoiceId": "23456789"})
            assert o.status == "invalid" and o.kind == "unverified_id" and "refused" in o.for_model()
            assert billing.count("/v1/payments") == 0
            ctx.evidence.caller("it is invoice I N V dash one zero zero two")     # the caller says it
            o = await runner.call(ctx, "create_payment", {"amount": 10, "invoiceId": "INV-1002"})
            assert o.status == "ok", o.message
            assert [x["invoice_number"] for x in billing.payments] == ["INV-1002"]
            ctx.evidence.dtmf("1001")                                           # keyed on the phone
            o = await runner.call(ctx, "create_payment", {"invoiceId": "INV-1001"})
            assert o.status == "ok", o.message
        finally:
            await runner.close()
    try:
        asyncio.run(scenario())
    finally:
        billing.stop()


def test_chat_never_prints_the_model_s_markup_as_speech(tmp_path):
    """The issue's transcript: the model wrote its tool syntax as its reply; the caller hears a clarifying line."""
    billing = BillingApi()
    llm = ChainLLM(says='(using tool createpayment {"amount":10, "invoiceId":"23456789"})')
    try:
        config = chain_config(llm.url, billing.url).replace("shortlist = 0", "shortlist = 2")   # no tool fits
        p = run_chat(tmp_path, config, ["Hello there.", "/quit"])
    finally:
        billing.stop()
        llm.stop()
    assert p.returncode == 0, p.stderr[-2000:]
    agent = [x for x in p.stdout.splitlines() if x.startswith("agent: ")]
    assert agent == ["agent: Hello! How can I help you today?",
                     "agent: Could you tell me a little more about what you need?"], agent
    assert any(x.startswith("dropped> ") and "createpayment" in x for x in p.stdout.splitlines())
    assert billing.requests == []
