"""``trunkline chat``: the configured agent over text, as a real subprocess, with
its tools calling the billing API on loopback."""
import json
import subprocess
import sys

import pytest

from billing import TOKEN, BillingApi, tools_toml
from fake_llm import FakeLLM
from support import ROOT

pytestmark = pytest.mark.xdist_group("test_chat")


def chat(tmp_path, config: str, lines: list[str], caller="+15551230001", timeout=240):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'billing_token = "{TOKEN}"\n')
    cfg = tmp_path / "chat.toml"
    cfg.write_text(config.replace("{secrets}", str(secrets)))
    p = subprocess.run([sys.executable, "-m", "bridge.cli", "chat", "--config", str(cfg), "--caller", caller],
                       input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return p


@pytest.fixture(scope="module")
def billing():
    api = BillingApi()
    yield api
    api.stop()


def test_chat_looks_up_and_pays_with_native_tool_calls(tmp_path, billing):
    llm = FakeLLM()
    config = (f'[models]\nllm_backend = "openai"\nllm_url = "{llm.url}"\nllm_model = "big"\n'
              '[http]\noutbound_allow = ["127.0.0.1/32"]\n'     # the fake LLM and billing API are on loopback
              + tools_toml(billing.url))
    p = chat(tmp_path, config, ["Hi, what are your hours?", "How much do I owe?", "Pay it please",
                                "pay it please", "/quit"])
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout.splitlines()
    assert out[0] == "agent: Hello! How can I help you today?"
    assert "agent: We are open nine to five." in out
    assert 'tool> lookup_invoices {}' in out
    assert "agent: You have 2 open invoices. The first is INV-1001 for 120.5 dollars." in out
    assert out.count('tool> pay_invoice {"invoice_number":"INV-1002"}') == 2
    assert "agent: Done. I paid INV-1002, 42 dollars." in out
    assert len(billing.payments) == 1                          # asked twice, charged once
    # The model was offered the shortlisted tools natively and then read the result as a tool message.
    asked = [r for r in llm.requests if r.get("tools")]
    assert {t["function"]["name"] for t in asked[0]["tools"]} <= {"lookup_invoices", "pay_invoice",
                                                                    "pay_invoice_later"}
    assert not llm.requests[0].get("tools")                   # "hours" matches no tool: none offered
    # The phone number is bound from the caller id, never asked of the model.
    look = next(t for r in asked for t in r["tools"] if t["function"]["name"] == "lookup_invoices")
    assert look["function"]["parameters"]["properties"] == {}
    assert TOKEN not in p.stdout and TOKEN not in p.stderr


def test_chat_says_the_fallback_when_the_api_is_down(tmp_path, billing):
    llm = FakeLLM()
    config = (f'[models]\nllm_backend = "openai"\nllm_url = "{llm.url}"\nllm_model = "big"\n'
              '[http]\noutbound_allow = ["127.0.0.1/32"]\n'     # the fake LLM and billing API are on loopback
              + tools_toml(billing.url, attempts=2))
    billing.fail("/v1/invoices", "500", times=2)
    p = chat(tmp_path, config, ["what do I owe?"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "tool> lookup_invoices -> error 500 in" in p.stdout
    assert "agent: Sorry, I can't do that right now. I'll have someone call you back." in p.stdout


@pytest.mark.slow
@pytest.mark.sample
def test_chat_with_the_bundled_model_and_tools(tmp_path, billing):
    """The default 135M model with the tools offered: whatever it picks, the
    chat runs, and a tool line is always followed by its outcome."""
    p = chat(tmp_path, '[http]\noutbound_allow = ["127.0.0.1/32"]\n' + tools_toml(billing.url),   # loopback API
             ["How much do I owe on my bill?", "Where is your office?"])
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout.splitlines()
    agent = [line for line in out if line.startswith("agent: ")]
    assert len(agent) == 3 and all(len(a) > len("agent: ") for a in agent), out
    for i, line in enumerate(out):
        if line.startswith("tool> ") and " -> " not in line:
            assert " -> " in out[i + 1], out
            json.loads(line.split(" ", 2)[2])
