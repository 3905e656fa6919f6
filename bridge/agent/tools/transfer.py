"""The built-in ``transfer`` tool: the model hands the caller to a person ("let me put you through").

The model sees one more tool, ``transfer``, whose ``destination`` is an enum of
the operator's ``[transfer] destinations`` names (with their descriptions), and
an optional one-line ``summary`` for the person who takes the call. It never
sees a number: it cannot make the bridge dial anything the operator did not
configure (toll fraud). Calling the tool does not move the call by itself: it
asks the call's handoff (``start(destination, summary)``, the cell's
``bridge.cell.handoff``) to begin once the agent's line is said, and answers
with that line (the destination's ``say`` or ``transfer.say_text``).

``AgentTools`` puts this tool next to the business's REST tools (``ToolRunner``,
maybe none) behind the interface the turn machine and the dialogue use:
``specs`` and ``call``.
"""
from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any, Callable

from bridge.agent.tools.runner import CallContext, Outcome
from bridge.core.handoff import Destination
from bridge.core.schema import SchemaError, validate
from bridge.core.toolspec import ToolSpec

log = logging.getLogger("trunkline.tools")

NAME = "transfer"
SUMMARY_MAX = 200
EXAMPLES = ("speak to a person", "talk to a human", "real person", "operator", "representative",
            "put me through", "connect me", "transfer me", "someone", "staff", "manager")


def transfer_spec(dests: dict[str, Destination], per_call: int = 2) -> ToolSpec:
    """The tool as the model sees it: the destinations are an enum, described one by one."""
    described = "; ".join(f"{d.name}: {d.description}" for d in dests.values())
    params = {"type": "object", "additionalProperties": False, "required": ["destination"], "properties": {
        "destination": {"type": "string", "enum": list(dests),
                        "description": f"Who to put the caller through to ({described})"},
        "summary": {"type": "string", "maxLength": SUMMARY_MAX,
                    "description": "One short sentence for the person taking the call: who is calling and why"}}}
    words = tuple(w for d in dests.values() for w in (d.name.replace("_", " "), d.description))
    return ToolSpec(name=NAME, description="Transfer the caller to a person: " + described, parameters=params,
                    method="POST", url="builtin:transfer", filler=False, per_call=per_call,
                    examples=EXAMPLES + words)


class TransferTool:
    """Checks the model's choice and starts the handoff; never dials anything itself."""

    def __init__(self, dests: dict[str, Destination], settings: dict,
                 start: Callable[[Destination, str], str | None], clock: Callable[[], float] = time.monotonic):
        self.dests = dests
        self.settings = settings                  # the [transfer] section (say_text, ...)
        self.start = start                        # -> None when started, else why not (one line)
        self.clock = clock
        self.spec = transfer_spec(dests)

    async def call(self, ctx: CallContext, args: Any, tcid: str) -> Outcome:
        started = self.clock()
        o = self._call(ctx, args, tcid)
        o.seconds = round(self.clock() - started, 3)
        o.audit = {"tool_call_id": o.tool_call_id, "tool": NAME, "call_id": ctx.call_id, "at": round(time.time(), 3),
                   "args": o.audit.get("args", {}), "status": o.status, "kind": o.kind, "http_status": None,
                   "attempts": o.attempts, "seconds": o.seconds, "message": o.message, "result": o.result}
        log.info("tool %s", NAME, extra={"fields": {"event": "tool_called", "call_id": ctx.call_id, "tool": NAME,
                                                    "status": o.status, "kind": o.kind}})
        return o

    def _call(self, ctx: CallContext, args: Any, tcid: str) -> Outcome:
        if isinstance(args, str):                 # some backends hand the arguments over as JSON text
            try:
                args = json.loads(args or "{}")
            except ValueError:
                args = None
        if not isinstance(args, dict):
            return Outcome(NAME, tcid, "invalid", "the arguments must be a JSON object", kind="invalid_args")
        try:
            validate(args, self.spec.parameters)
        except SchemaError as exc:
            return Outcome(NAME, tcid, "invalid", f"invalid argument {exc.field.removeprefix('body.')}: {exc.message}",
                           kind="invalid_args", audit={"args": {k: str(v)[:64] for k, v in args.items()}})
        if ctx.used.get(NAME, 0) >= self.spec.per_call:
            return Outcome(NAME, tcid, "quota", "this call has been transferred as often as allowed", kind="quota",
                           audit={"args": args})
        ctx.used[NAME] = ctx.used.get(NAME, 0) + 1
        dest = self.dests[args["destination"]]
        refusal = self.start(dest, " ".join(str(args.get("summary", "")).split())[:SUMMARY_MAX])
        if refusal:
            return Outcome(NAME, tcid, "error", refusal, kind="transfer_failed", audit={"args": args})
        say = dest.say or self.settings.get("say_text", "")
        say = say.replace("{description}", dest.description).replace("{destination}", dest.name)
        return Outcome(NAME, tcid, "ok", "transferring", result={"destination": dest.name, "mode": dest.mode},
                       say=say or None, attempts=1, audit={"args": args})


class AgentTools:
    """The business's tools (a ``ToolRunner``, or None) plus the built-in ``transfer`` tool, per call."""

    def __init__(self, runner, transfer: TransferTool):
        self.runner = runner
        self.transfer = transfer

    def only(self, names: tuple[str, ...]) -> "AgentTools":
        """The same tools with the transfer tool limited to the destinations ``names`` (a profile's)."""
        t = self.transfer
        dests = {k: d for k, d in t.dests.items() if k in names}
        return AgentTools(self.runner, TransferTool(dests, t.settings, t.start, t.clock))

    @property
    def specs(self) -> dict[str, ToolSpec]:
        specs = dict(self.runner.specs) if self.runner is not None else {}
        specs[NAME] = self.transfer.spec             # the built-in wins over a REST tool of the same name
        return specs

    async def call(self, ctx: CallContext, name: str, args: Any, tool_call_id: str | None = None) -> Outcome:
        tcid = tool_call_id or "tc_" + secrets.token_hex(6)
        if name == NAME:
            return await self.transfer.call(ctx, args, tcid)
        if self.runner is None:
            o = Outcome(name, tcid, "invalid", f"there is no tool called {name!r}", kind="invalid_args")
            o.audit = {"tool_call_id": tcid, "tool": name, "call_id": ctx.call_id, "status": "invalid",
                       "kind": "invalid_args", "args": {}}
            return o
        return await self.runner.call(ctx, name, args, tcid)
