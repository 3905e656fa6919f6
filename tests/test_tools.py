"""Tools: declarations, argument checks, mapping, breaker, and the runner against
a real billing API on loopback (tests/billing.py) that can be made to fail."""
import asyncio
import json
import logging
import time
import tomllib

import pytest

from bridge.core import config
from bridge.core.metrics import Metrics
from bridge.core.netguard import Policy
from bridge.agent.tools.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, RateWindow, backoff, retry_after
from bridge.agent.tools.mapping import map_result
from bridge.agent.tools.runner import CallContext, ToolRunner
from sip.uri import user_part
from bridge.agent.tools.select import shortlist
from bridge.core.toolspec import ResultMap, ToolConfigError, load_toolbox
from bridge.agent.tools.template import render_url
from billing import TOKEN, BillingApi, tools_toml

pytestmark = pytest.mark.xdist_group("test_tools")


@pytest.fixture(scope="module")
def billing():
    api = BillingApi(slow_seconds=1.5)
    yield api
    api.stop()


@pytest.fixture()
def api(billing):
    """A fresh ledger per test on the same server."""
    from billing import _invoices
    billing.invoices = _invoices()
    billing.payments.clear()
    billing.idempotent.clear()
    billing.requests.clear()
    billing.faults.clear()
    return billing


def make_box(tmp_path, url, **kw):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'billing_token = "{TOKEN}"\n')
    data = tomllib.loads(tools_toml(url, **kw).replace("{secrets}", str(secrets)))
    return load_toolbox(data["tool"], str(secrets)), data["tools"]


def settings(**over):
    s = dict(config.DEFAULTS["tools"])
    s.update({"breaker_failures": 3, "breaker_cooldown": 2.0})
    s.update(over)
    return s


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def run(coro):
    return asyncio.run(coro)


async def with_runner(box, sets, fn, clock=None, metrics=None):
    r = ToolRunner(box, sets, metrics or Metrics(), callback_base="http://127.0.0.1:1",
                   guard=Policy.parse(["127.0.0.1/32"]),        # the test's API is on loopback
                   **({"clock": clock} if clock else {}))
    await r.start()
    try:
        return await fn(r)
    finally:
        await r.close()


def caller() -> CallContext:
    """A fresh phone call (quotas count per call)."""
    return CallContext("call-1", from_uri="<sip:+15551230001@10.0.0.1;user=phone>", to_uri="sip:+15550000000@x")


# -- declarations -------------------------------------------------------------------
def test_declarations_are_checked_with_the_key_named(tmp_path):
    good = {"name": "t", "description": "d", "url": "http://x/{args.id}",
            "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}
    cases = [
        ({**good, "name": "Bad Name"}, "tool[0].name"),
        ({**good, "timeout": 11}, "tool[t].timeout: expected a number 0.1..10"),
        ({**good, "url": "http://x/{args.nope}"}, "{args.nope} is not a parameter"),
        ({**good, "method": "POST", "retry": {"attempts": 3}}, "retried only with an idempotency_key"),
        ({**good, "url": "http://x/${env:HOME}"}, "only allowed in headers"),
        ({**good, "headers": {"X-Key": "${env:NOT_SET_ANYWHERE_42}"}}, "NOT_SET_ANYWHERE_42 is not set"),
        ({**good, "parameters": {"type": "object", "properties": {"p": {"type": "string", "format": "ssn"}}}},
         "unknown format 'ssn'"),
        ({**good, "bind": {"id": "call.nothing"}}, "tool[t].bind.id"),
        ({**good, "surprise": 1}, "tool[t].surprise: unknown key"),
    ]
    for spec, msg in cases:
        with pytest.raises(ToolConfigError, match=msg.replace("[", r"\[").replace("{", r"\{").replace("$", r"\$")):
            load_toolbox([spec], environ={})
    # The same errors stop the start through the config loader, as one line.
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[tool]]\nname = "t"\ndescription = "d"\nurl = "ftp://x"\n')
    with pytest.raises(config.ConfigError, match=r"tool\[t\].url: expected an http"):
        config.load(str(cfg), environ={})


def test_secrets_resolve_but_are_never_shown(tmp_path):
    box, _ = make_box(tmp_path, "http://127.0.0.1:9")
    assert box.secrets["lookup_invoices"]["Authorization"] == f"Bearer {TOKEN}"
    assert box.tools["lookup_invoices"].headers["Authorization"] == "Bearer ${secret:billing_token}"
    assert TOKEN not in repr(box) and TOKEN not in repr(box.tools["lookup_invoices"])


def test_bound_arguments_are_hidden_from_the_model(tmp_path):
    box, _ = make_box(tmp_path, "http://127.0.0.1:9")
    assert box.tools["lookup_invoices"].model_parameters()["properties"] == {}
    assert "invoice_number" in box.tools["pay_invoice"].model_parameters()["properties"]


def test_url_arguments_cannot_change_the_path():
    url = render_url("http://api/v1/customers/{args.id}/invoices", {"args": {"id": "../admin?x=1#"}})
    assert url == "http://api/v1/customers/..%2Fadmin%3Fx%3D1%23/invoices"


def test_mapping_picks_renames_cuts_and_words():
    data = {"invoices": [{"id": f"in_{i}", "number": f"INV-{i}", "amount_due": i, "status": "ovd",
                          "customer_email": "a@b.c"} for i in range(5)]}
    m = ResultMap(path="invoices", fields={"number": "number", "amount_due": "amount", "status": "status"},
                  max_items=2, codes={"status": {"ovd": "overdue"}})
    out = map_result(data, m)
    assert out == {"count": 5, "items": [{"number": "INV-0", "amount": 0, "status": "overdue"},
                                         {"number": "INV-1", "amount": 1, "status": "overdue"}]}
    # Without an allow-list, ids and personal data are stripped.
    out = map_result({"id": "x", "customer_id": "c", "email": "a@b.c", "phone": "+1", "total": 3,
                      "lines": [{"sku_id": 1, "qty": 2}]}, ResultMap())
    assert out == {"total": 3, "lines": [{"qty": 2}]}


def test_breaker_opens_half_opens_and_closes():
    b = Breaker(threshold=3, cooldown=10)
    for _ in range(2):
        assert b.allow(0)
        b.failure(0)
    assert b.state == CLOSED
    b.failure(1)
    assert b.state == OPEN and not b.allow(5)
    assert b.allow(11) and b.state == HALF_OPEN
    assert not b.allow(11.5)                   # one trial at a time
    b.failure(12)
    assert b.state == OPEN and not b.allow(21)
    assert b.allow(22.1)
    b.success()
    assert b.state == CLOSED and b.failures == 0


def test_backoff_retry_after_and_rate_window():
    assert backoff(0, 0.2, 2.0, 0.999) < 0.2 and backoff(5, 0.2, 2.0, 0.999) <= 2.0
    assert backoff(3, 0.2, 2.0, 0.0) == 0.0
    assert retry_after("7", 0) == 7.0
    assert retry_after("Wed, 21 Oct 2015 07:28:10 GMT", 1445412480.0) == pytest.approx(10.0)
    assert retry_after("soon", 0) is None
    w = RateWindow(2, 60)
    assert w.take(0) and w.take(1) and not w.take(2) and w.take(60.5)


def test_shortlist_offers_only_tools_the_caller_talked_about(tmp_path):
    box, _ = make_box(tmp_path, "http://127.0.0.1:9")
    specs = list(box.tools.values())
    assert [s.name for s in shortlist("how much do I owe on my bill", specs, 2)][0] == "lookup_invoices"
    assert shortlist("where is your office located", specs, 2) == []
    assert len(shortlist("anything", specs, 0)) == 3            # 0: every tool, every turn


def test_user_part_of_caller_uri():
    assert user_part("<sip:+15551230001@10.0.0.1;user=phone>") == "+15551230001"
    assert user_part('"Bob" <tel:+4930123456>') == "+4930123456"
    assert user_part("sip:+15550000000@host:5060") == "+15550000000"
    assert user_part("sip:host.example") == "" and user_part("") == ""


# -- the runner against the billing API -------------------------------------------------
def test_lookup_by_caller_phone_then_pay_once(api, tmp_path, caplog):
    box, _ = make_box(tmp_path, api.url)
    caplog.set_level(logging.INFO)

    async def go(r):
        ctx = CallContext("call-7", from_uri="sip:+15551230001@pbx")
        look = await r.call(ctx, "lookup_invoices", {})
        pay1 = await r.call(ctx, "pay_invoice", {"invoice_number": "INV-1002"})
        pay2 = await r.call(ctx, "pay_invoice", {"invoice_number": "INV-1002"})      # the model repeats itself
        return look, pay1, pay2
    look, pay1, pay2 = run(with_runner(box, settings(), go))
    assert look.status == "ok" and look.attempts == 1
    assert look.result == {"count": 2, "items": [
        {"number": "INV-1001", "amount": 120.5, "due": "2026-12-01", "status": "open"},
        {"number": "INV-1002", "amount": 42.0, "due": "2026-11-15", "status": "overdue"}]}
    assert look.say == "You have 2 open invoices. The first is INV-1001 for 120.5 dollars."
    req = [q for q in api.requests if q["path"] == "/v1/invoices"][0]
    assert req["query"] == {"phone": "+15551230001", "status": "open"}       # the caller id, not the model's guess
    assert req["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert pay1.status == "ok" and pay1.result == {"invoice": "INV-1002", "amount": 42.0, "status": "succeeded"}
    assert pay2.status == "ok" and pay2.result == pay1.result
    keys = [q["headers"]["Idempotency-Key"] for q in api.requests if q["path"] == "/v1/payments"]
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0].startswith("call-7-pay-")
    assert len(api.payments) == 1                                          # charged once
    # The audit has the request and outcome but never the secret.
    audit = json.dumps([look.audit, pay1.audit])
    assert TOKEN not in audit and TOKEN not in caplog.text
    assert pay1.audit["request"]["idempotency_key"] == keys[0] and pay1.audit["call_id"] == "call-7"


def test_invalid_arguments_never_reach_the_api(api, tmp_path):
    box, _ = make_box(tmp_path, api.url)

    async def go(r):
        return [await r.call(caller(), "pay_invoice", args) for args in
                ({"invoice_number": "1002"}, {}, {"invoice_number": 1002}, {"invoice_number": "INV-1002", "x": 1},
                 "INV-1002")] + [await r.call(caller(), "refund_everything", {})]
    outs = run(with_runner(box, settings(), go))
    assert [o.status for o in outs] == ["invalid"] * 6
    assert "invoice_number" in outs[0].message and "does not match" in outs[0].message
    assert "is required" in outs[1].message and "expected string" in outs[2].message
    assert "unknown field" in outs[3].message and "no tool called" in outs[5].message
    assert json.loads(outs[0].for_model())["status"] == "error"
    assert api.count("/v1/payments") == 0


def test_bad_caller_number_is_refused_before_the_request(api, tmp_path):
    box, _ = make_box(tmp_path, api.url)
    ctx = CallContext("c", from_uri="sip:alice@pbx")          # no E.164 caller id
    o = run(with_runner(box, settings(), lambda r: r.call(ctx, "lookup_invoices", {})))
    assert o.status == "invalid" and "E.164" in o.message and api.count("/v1/invoices") == 0


def test_500s_are_retried_with_backoff(api, tmp_path):
    box, _ = make_box(tmp_path, api.url)
    api.fail("/v1/invoices", "500", times=2)
    m = Metrics()
    o = run(with_runner(box, settings(), lambda r: r.call(caller(), "lookup_invoices", {}), metrics=m))
    assert o.status == "ok" and o.attempts == 3 and api.count("/v1/invoices") == 3
    assert m.registry.get_sample_value("trunkline_tool_retries_total", {"tool": "lookup_invoices"}) == 2
    assert m.registry.get_sample_value("trunkline_tool_calls_total", {"tool": "lookup_invoices", "outcome": "ok"}) == 1


def test_429_waits_for_retry_after(api, tmp_path):
    box, _ = make_box(tmp_path, api.url)
    api.fail("/v1/invoices", "429")
    o = run(with_runner(box, settings(), lambda r: r.call(caller(), "lookup_invoices", {})))
    times = [q["at"] for q in api.requests if q["path"] == "/v1/invoices"]
    assert o.status == "ok" and o.attempts == 2
    assert times[1] - times[0] >= 0.95                       # Retry-After: 1


def test_429_with_a_long_retry_after_gives_up_at_once(api, tmp_path):
    box, _ = make_box(tmp_path, api.url)
    api.fail("/v1/invoices", "429long")
    o = run(with_runner(box, settings(), lambda r: r.call(caller(), "lookup_invoices", {})))
    assert o.status == "error" and o.kind == "rate_limited" and o.attempts == 1


def test_4xx_is_not_retried_and_gets_the_operators_words(api, tmp_path):
    box, _ = make_box(tmp_path, api.url)

    async def go(r):
        return (await r.call(caller(), "pay_invoice", {"invoice_number": "INV-9999"}),
                await r.call(CallContext("c2", from_uri="sip:+15559999999@x"), "lookup_invoices", {}))
    pay, look = run(with_runner(box, settings(), go))
    assert pay.status == "rejected" and pay.http_status == 404 and pay.attempts == 1
    assert pay.say == "I could not find that invoice."
    assert look.status == "rejected" and look.say == "I could not find an account for this phone number."
    assert api.count("/v1/payments") == 1


def test_slow_api_times_out_after_every_attempt(api, tmp_path):
    box, _ = make_box(tmp_path, api.url, timeout=0.3, attempts=2)
    api.fail("/v1/invoices", "slow", times=2)
    started = time.monotonic()
    o = run(with_runner(box, settings(), lambda r: r.call(caller(), "lookup_invoices", {})))
    assert o.status == "error" and o.kind == "timeout" and o.attempts == 2
    assert time.monotonic() - started < 1.5                  # 2 x 0.3 s + a short backoff, not the 1.5 s answer


def test_garbage_json_is_an_error_not_a_crash(api, tmp_path):
    box, _ = make_box(tmp_path, api.url)
    api.fail("/v1/invoices", "garbage")
    o = run(with_runner(box, settings(), lambda r: r.call(caller(), "lookup_invoices", {})))
    assert o.status == "error" and o.kind == "bad_response" and o.attempts == 1
    assert "not JSON" in o.message


def test_connection_refused_is_retried_then_reported(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                                 # nothing listens there
    box, _ = make_box(tmp_path, f"http://127.0.0.1:{port}")
    o = run(with_runner(box, settings(), lambda r: r.call(caller(), "lookup_invoices", {})))
    assert o.status == "error" and o.kind == "connect" and o.attempts == 3


def test_breaker_opens_then_closes_after_cooldown(api, tmp_path):
    box, _ = make_box(tmp_path, api.url, attempts=1)
    clock = Clock()
    m = Metrics()

    async def go(r):
        api.fail("/v1/invoices", "500", times=3)
        fails = [await r.call(CallContext(f"c{i}", from_uri="sip:+15551230001@x"), "lookup_invoices", {})
                 for i in range(3)]
        state_open = m.registry.get_sample_value("trunkline_tool_breaker_state", {"tool": "lookup_invoices"})
        seen = api.count("/v1/invoices")
        blocked = await r.call(CallContext("c9", from_uri="sip:+15551230001@x"), "lookup_invoices", {})
        not_sent = api.count("/v1/invoices") == seen
        clock.t += 2.5                                         # past the 2 s cooldown: one trial goes through
        trial = await r.call(CallContext("c10", from_uri="sip:+15551230001@x"), "lookup_invoices", {})
        return fails, state_open, blocked, not_sent, trial
    fails, state_open, blocked, not_sent, trial = run(with_runner(box, settings(), go, clock=clock, metrics=m))
    assert [f.kind for f in fails] == ["server_error"] * 3
    assert state_open == OPEN
    assert blocked.status == "unavailable" and blocked.kind == "breaker_open" and not_sent
    assert trial.status == "ok"
    assert m.registry.get_sample_value("trunkline_tool_breaker_state", {"tool": "lookup_invoices"}) == CLOSED
    assert m.registry.get_sample_value("trunkline_tool_errors_total",
                                       {"tool": "lookup_invoices", "kind": "breaker_open"}) == 1


def test_quotas_per_call_and_per_tool(api, tmp_path):
    box, _ = make_box(tmp_path, api.url)

    async def go(r):
        ctx = CallContext("runaway", from_uri="sip:+15551230001@x")
        return [await r.call(ctx, "lookup_invoices", {}) for _ in range(5)]
    outs = run(with_runner(box, settings(), go))
    assert [o.status for o in outs] == ["ok"] * 3 + ["quota"] * 2          # per_call = 3 by default
    assert api.count("/v1/invoices") == 3

    async def go2(r):
        ctx = CallContext("runaway2", from_uri="sip:+15551230001@x")
        return [await r.call(ctx, name, {"invoice_number": "INV-9999"} if name == "pay_invoice" else {})
                for name in ("lookup_invoices", "pay_invoice", "lookup_invoices")]
    outs = run(with_runner(box, settings(max_per_call=2), go2))
    assert [o.status for o in outs] == ["ok", "rejected", "quota"]


def test_async_result_url_is_signed_and_single_use(api, tmp_path):
    box, _ = make_box(tmp_path, api.url)

    async def go(r):
        o = await r.call(caller(), "pay_invoice_later", {"invoice_number": "INV-1001"})
        body = json.loads([q for q in api.requests if q["path"] == "/v1/payments/async"][0]["body"])
        sig = body["callback_url"].split("sig=")[1]
        forged = r.take_pending("call-1", o.tool_call_id, "0" * 32)
        good = r.take_pending("call-1", o.tool_call_id, sig)
        again = r.take_pending("call-1", o.tool_call_id, sig)
        return o, body, forged, good, again, r.map_async("pay_invoice_later", {"status": "confirmed"})
    o, body, forged, good, again, mapped = run(with_runner(box, settings(), go))
    assert o.status == "accepted" and o.say.startswith("I have started the payment")
    assert body["callback_url"].startswith(f"http://127.0.0.1:1/v1/calls/call-1/tool-results/{o.tool_call_id}?sig=")
    assert (forged, good, again) == (None, "pay_invoice_later", None)
    assert mapped == ({"status": "confirmed"}, "Your payment is confirmed.")


def test_llama_adapter_renders_tools_and_builds_a_grammar_for_them(tmp_path):
    from llama_cpp import LlamaGrammar

    from ai.llm import choice_schema, plain_messages
    from bridge.agent.dialog import Dialog
    box, _ = make_box(tmp_path, "http://127.0.0.1:9")

    class R:
        specs = box.tools
    d = Dialog({**config.DEFAULTS["agent"], "system_prompt": "Be brief."}, settings(), R())
    d.add_user("pay my invoice INV-1002")
    tools = d.tools_for("pay my invoice INV-1002", 0)
    assert [t["name"] for t in tools] == ["pay_invoice", "pay_invoice_later"]
    assert d.tools_for("pay my invoice", 2) == []               # max_per_turn rounds used up
    from bridge.agent.tools.runner import Outcome
    d.add_tool(Outcome("pay_invoice", "tc_1", "ok", "done", result={"amount": 42}), {"invoice_number": "INV-1002"})
    msgs = plain_messages(d.messages(), tools)
    assert msgs[0]["content"].startswith("Be brief.\n\nYou can use these tools:\n- pay_invoice:")
    assert msgs[2] == {"role": "assistant", "content": '(using tool pay_invoice {"invoice_number":"INV-1002"})'}
    assert msgs[3]["role"] == "tool" and '"amount":42' in msgs[3]["content"]
    schema = choice_schema(tools)
    assert [a["properties"]["tool"]["const"] for a in schema["anyOf"]] == ["none", "pay_invoice", "pay_invoice_later"]
    LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)     # compiles
    # A history cut never starts inside a tool exchange.
    d.cfg = {**d.cfg, "history_turns": 1}
    cut = d.messages()
    assert [m["role"] for m in cut] == ["system", "assistant", "tool"] and cut[1]["tool_calls"]
