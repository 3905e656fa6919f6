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
    m = cell.metrics()
    assert m['trunkline_tool_calls_total{outcome="ok",tool="lookup_invoices"}'] == 1
    assert m['trunkline_tool_async_results_total{outcome="delivered",tool="pay_invoice_later"}'] == 1
    assert m['trunkline_tool_breaker_state{tool="lookup_invoices"}'] == 0
