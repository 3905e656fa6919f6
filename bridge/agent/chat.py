"""``trunkline chat``: the configured agent over text, in the terminal.

Same model, system prompt, tools and history handling as a phone call
(``Dialog``, ``ToolRunner``, the inference process with only the LLM loaded),
so prompts and tools can be tried, and scripted, without a phone:

    $ printf 'what do I owe?\\npay INV-1002\\n' | trunkline chat --config my.toml --caller +15551230001
    agent: Hello! How can I help you today?
    tool> lookup_invoices {} -> ok 200 in 0.04 s: {"status":"ok","count":2,...}
    agent: You have 2 open invoices ...

Lines starting ``agent:`` are what a caller would hear (model output goes
through the same markup filter as on a call, ``bridge.agent.speakable``; a
``dropped>`` line shows what it removed);
``tool>`` lines show tool activity (a tool's result may lead to the next tool
call in the same turn, up to ``tools.max_per_turn``; id arguments the model
did not get from a tool or the caller are refused). ``/quit`` or end of input
ends the chat; then, with ``agent.call_summary``, an ``outcome>`` line shows
what a call's ``call_summary`` event would carry.
"""
from __future__ import annotations

import asyncio
import json
import re
import secrets
import sys

from ai.text import clean_for_speech
from bridge.agent import outcome as call_outcome
from bridge.agent.hub import AiHub
from bridge.agent.speakable import Speakable
from bridge.core.config import Config
from bridge.agent.dialog import Dialog
from bridge.core.metrics import Metrics


async def ask(hub: AiHub, key: str, messages: list[dict], params: dict) -> tuple[str, dict | None]:
    """One model round: the reply text, or the tool it chose."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    tokens: list[str] = []
    chosen: list[dict] = []
    hub.llm(key, messages, params, on_token=tokens.append,
            on_done=lambda *a: done.done() or done.set_result(None),
            on_error=lambda msg: done.done() or done.set_exception(RuntimeError(msg)),
            on_tool=chosen.append)
    await done
    return "".join(tokens), (chosen[0] if chosen else None)


async def run_chat(cfg: Config, caller: str = "", inp=None, out=None) -> int:
    inp = inp or sys.stdin
    out = out or sys.stdout
    a = cfg.raw["agent"]

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    hub = AiHub(cfg, Metrics(), 16000, engines=("llm",))
    await hub.start()
    runner = None
    if cfg.toolbox is not None and cfg.toolbox.tools:
        from bridge.agent.tools.runner import ToolRunner
        runner = ToolRunner(cfg.toolbox, cfg.raw["tools"], Metrics(),
                            callback_base=cfg.raw["tools"]["callback_base_url"], guard=cfg.outbound)
        await runner.start()
    dialog = Dialog(a, cfg.raw["tools"], runner)
    key = "chat-" + secrets.token_hex(4)
    ctx = None
    if runner is not None:
        from bridge.agent.tools.runner import CallContext
        ctx = CallContext(key, from_uri=f"sip:{caller or 'anonymous'}@chat", to_uri="sip:agent@trunkline")
    try:
        if a["greeting"]:
            say(f"agent: {a['greeting']}")
            dialog.add_assistant(a["greeting"])
        loop = asyncio.get_running_loop()
        while True:
            if inp.isatty():
                print("you> ", end="", file=out, flush=True)
            line = await loop.run_in_executor(None, inp.readline)
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                break
            dialog.add_user(text)
            if ctx is not None:
                ctx.evidence.caller(text)          # ids the caller said may be used by tools
            heard = set(re.findall(r"[a-z']+", text.lower()))
            if any(set(p.split()) <= heard for p in a["goodbye_phrases"]):
                say(f"agent: {a['goodbye_text']}")
                break
            await _turn(hub, key, dialog, runner, ctx, text, a, say)
        if a["call_summary"]:
            o = await summary(hub, key, dialog, a)
            say("outcome> " + json.dumps(o.as_dict(), separators=(",", ":")))
    finally:
        hub.release(key)
        if runner is not None:
            await runner.close()
        await hub.stop()
    return 0


async def summary(hub: AiHub, key: str, dialog: Dialog, a: dict) -> call_outcome.CallOutcome:
    """What a call's ``call_summary`` would say about this conversation."""
    fut = asyncio.get_running_loop().create_future()
    facts = call_outcome.facts_of(dialog.history, False, a["tool_fallback_text"])
    call_outcome.summarize(hub, key + ":outcome", list(dialog.history), facts,
                           lambda o: fut.done() or fut.set_result(o))
    return await fut


def speak(reply: str, fallback: str) -> tuple[str, list[str]]:
    """The speakable part of a model reply (the fallback if it was all markup) and what was dropped."""
    sp = Speakable(fallback)
    text = sp.feed(reply)
    return clean_for_speech(text + " " + sp.finish()), sp.dropped


async def _turn(hub, key, dialog: Dialog, runner, ctx, text: str, a: dict, say) -> None:
    rounds = 0
    while True:
        params = {"max_tokens": a["max_reply_tokens"], "temperature": a["temperature"],
                  "repeat_penalty": a["repeat_penalty"], "tools": dialog.tools_for(text, rounds)}
        try:
            reply, choice = await ask(hub, key, dialog.messages(), params)
        except RuntimeError as exc:
            say(f"error> the model failed: {exc}")
            say(f"agent: {a['apology_text']}")
            return
        if choice is None or runner is None:
            reply, dropped = speak(reply, a["markup_fallback_text"])
            if dropped:
                say(f"dropped> {json.dumps(dropped)}")
            say(f"agent: {reply}")
            dialog.add_assistant(reply)
            return
        rounds += 1
        args = choice.get("arguments")
        say(f"tool> {choice.get('tool')} {json.dumps(args, separators=(',', ':'))}")
        o = await runner.call(ctx, choice.get("tool", ""), args, choice.get("id"))
        say(f"tool> {o.tool} -> {o.status}" + (f" {o.http_status}" if o.http_status else "")
            + f" in {o.seconds:.2f} s, {o.attempts} attempt(s): {o.for_model()}")
        dialog.add_tool(o, args)
        if o.status in ("unavailable", "quota", "error"):
            line = f"{a['tool_unavailable_text']} {a['tool_fallback_text']}".strip()
            say(f"agent: {line}")
            dialog.add_assistant(line)
            return
        if o.say:
            say(f"agent: {o.say}")
            dialog.add_assistant(o.say)
            return
