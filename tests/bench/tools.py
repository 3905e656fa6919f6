"""How well the model picks tools: a fixed set of caller requests, each with the
tool (or none) and arguments a careful agent would use.

Runs the same path as a call: ``Dialog.tools_for`` (the shortlist), the
llama.cpp adapter's grammar-constrained choice, and the runner's argument
check. Two modes: every tool offered on every turn (``shortlist = 0``, the
model alone decides) and the default shortlist. Prints and saves accuracy
and the time the choice pass takes, per mode, so a bigger model
(``--model PATH``) can be compared with the bundled 135M one.

    python tests/bench/tools.py [--model PATH] [--out results/tools.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from ai import models  # noqa: E402
from ai.llm import GenParams, LlamaChat  # noqa: E402
from bridge.core.config import DEFAULTS  # noqa: E402
from bridge.agent.dialog import Dialog  # noqa: E402
from bridge.core.schema import SchemaError, validate  # noqa: E402
from bridge.core.toolspec import load_toolbox  # noqa: E402

SYSTEM = ("You are the phone assistant of Acme Power, an electricity company. You help callers with their "
          "bills and technician visits. Answer in one or two short sentences.")

TOOLS = [
    {"name": "lookup_invoices", "description": "Look up the caller's open invoices: how much they owe and when.",
     "examples": ["what do I owe", "my bill", "open invoices", "my balance"], "method": "GET",
     "url": "http://127.0.0.1:9/v1/invoices", "bind": {"phone": "call.from"},
     "parameters": {"type": "object", "properties": {"phone": {"type": "string", "format": "e164"}},
                    "required": ["phone"]}},
    {"name": "pay_invoice", "description": "Pay one of the caller's invoices with the card on file.",
     "examples": ["pay my invoice", "make a payment"], "method": "POST", "url": "http://127.0.0.1:9/v1/payments",
     "idempotency_key": "{call.id}-{args_hash}",
     "parameters": {"type": "object", "required": ["invoice_number"], "properties": {
         "invoice_number": {"type": "string", "pattern": "^INV-[0-9]{4}$", "description": "like INV-1001"}}}},
    {"name": "book_appointment", "description": "Book a technician visit on a date.",
     "examples": ["book a technician", "schedule a visit", "appointment"], "method": "POST",
     "url": "http://127.0.0.1:9/v1/visits", "idempotency_key": "{call.id}-{args_hash}",
     "parameters": {"type": "object", "required": ["date"], "properties": {
         "date": {"type": "string", "format": "date", "description": "YYYY-MM-DD"}}}},
]

# (what the caller says, expected tool or None, expected arguments)
REQUESTS = [
    ("How much do I owe?", "lookup_invoices", {}),
    ("What invoices do I have open?", "lookup_invoices", {}),
    ("Can you tell me my balance?", "lookup_invoices", {}),
    ("I have a question about my bill.", "lookup_invoices", {}),
    ("Do I have any unpaid invoices?", "lookup_invoices", {}),
    ("I'd like to pay invoice INV-1002.", "pay_invoice", {"invoice_number": "INV-1002"}),
    ("Please pay INV-1001 with my card.", "pay_invoice", {"invoice_number": "INV-1001"}),
    ("Can I make a payment on invoice INV-1002?", "pay_invoice", {"invoice_number": "INV-1002"}),
    ("Pay the bill INV-1003 now.", "pay_invoice", {"invoice_number": "INV-1003"}),
    ("Can you book a technician for 2026-12-03?", "book_appointment", {"date": "2026-12-03"}),
    ("I need an appointment on 2026-12-10.", "book_appointment", {"date": "2026-12-10"}),
    ("Please schedule a visit for 2026-12-05.", "book_appointment", {"date": "2026-12-05"}),
    ("What are your opening hours?", None, {}),
    ("Where is your office?", None, {}),
    ("Thank you, that's all.", None, {}),
    ("Can I speak to a human?", None, {}),
    ("Is the power out in my area?", None, {}),
    ("Hello, is anyone there?", None, {}),
]


def run_mode(llm: LlamaChat, box, shortlist: int) -> dict:
    agent_cfg = {**DEFAULTS["agent"], "system_prompt": SYSTEM}
    settings = {**DEFAULTS["tools"], "shortlist": shortlist}

    class Runner:                     # what Dialog needs of the runner: the specs
        specs = box.tools
    rows = []
    for text, want, want_args in REQUESTS:
        dialog = Dialog(agent_cfg, settings, Runner())
        dialog.add_user(text)
        tools = dialog.tools_for(text, 0)
        started = time.perf_counter()
        got, args = None, {}
        if tools:
            choice = llm.choose("bench", dialog.messages(), GenParams(tools=tools))
            if choice:
                got, args = choice["tool"], choice["arguments"]
        secs = time.perf_counter() - started
        llm.release("bench")
        valid = True
        if got:
            spec = box.tools[got]
            full = {**args, **({"phone": "+15551230001"} if "phone" in spec.bind else {})}
            try:
                validate(full, spec.parameters)
            except SchemaError:
                valid = False
        rows.append({"text": text, "want": want, "got": got, "args": args, "want_args": want_args,
                     "tool_ok": got == want, "args_ok": got == want and args == want_args, "valid": valid,
                     "offered": [t["name"] for t in tools], "seconds": round(secs, 3)})
    n = len(rows)
    timed = [r["seconds"] for r in rows if r["offered"]]
    return {"shortlist": shortlist, "requests": n,
            "tool_accuracy": round(sum(r["tool_ok"] for r in rows) / n, 3),
            "tool_and_args_accuracy": round(sum(r["tool_ok"] and (r["want"] is None or r["args_ok"])
                                                for r in rows) / n, 3),
            "tool_requests_right": sum(r["tool_ok"] for r in rows if r["want"]),
            "tool_requests": sum(1 for r in rows if r["want"]),
            "no_tool_right": sum(r["tool_ok"] for r in rows if not r["want"]),
            "no_tool_requests": sum(1 for r in rows if not r["want"]),
            "invalid_args": sum(1 for r in rows if not r["valid"]),
            "choice_seconds_median": round(statistics.median(timed), 3) if timed else 0.0,
            "choice_passes": len(timed), "rows": rows}


def main(out: str, model: str | None = None) -> dict:
    model = model or str(models.smollm2_gguf())
    box = load_toolbox(TOOLS, environ={})
    llm = LlamaChat(model, threads=2, conversations=1)
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": Path(model).name,
               "modes": [run_mode(llm, box, 0), run_mode(llm, box, DEFAULTS["tools"]["shortlist"])]}
    print(f"tool choice, {results['model']}, {len(REQUESTS)} requests")
    print(f"{'mode':>18} {'tool ok':>8} {'tool+args':>9} {'tools':>7} {'no-tool':>7} {'invalid':>7} {'choice s':>8}")
    for m in results["modes"]:
        name = "every tool" if m["shortlist"] == 0 else f"shortlist {m['shortlist']}"
        print(f"{name:>18} {m['tool_accuracy']:>8.0%} {m['tool_and_args_accuracy']:>9.0%} "
              f"{m['tool_requests_right']:>3}/{m['tool_requests']:<3} {m['no_tool_right']:>3}/{m['no_tool_requests']:<3}"
              f" {m['invalid_args']:>7} {m['choice_seconds_median']:>8.2f}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a GGUF file to compare with the bundled model")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "tools.json"))
    a = ap.parse_args()
    main(a.out, a.model)
