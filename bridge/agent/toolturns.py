"""The turn machine's tool inputs, sans I/O: a mixin of ``bridge.agent.turn.TurnMachine``.

The model chose a tool (``tool_chosen``): it runs now, or - while the reply is
a speculative one held back (HOLDING) - only once the caller has really
finished. A slow tool gets the filler line (``Reply.filler_at``, said by the
machine's ``tick``). ``tool_done`` puts the outcome in the dialogue and either
speaks the tool's own line, asks the model again with the result, or - the tool
failed - says the canned fallback. ``tool_result`` is an async result for this
call: kept in ``updates`` and spoken (``_speak_update``) when the line is free.
"""
from __future__ import annotations

from typing import Any

from bridge.agent.actions import Action, AuditTool, CallTool, Emit, LogTool, ToolChoice
from bridge.agent.turnstate import Reply, State, Timings, Update

FAILED_TOOL = ("unavailable", "quota", "error")


class ToolTurns:
    """Needs the machine's ``_current``, ``_set``, ``_act``, ``_take``, ``_say_canned``,
    ``_say_line``, ``_composed``, ``_model_round``, ``dialog``, ``tools``, ``tool_settings``,
    ``playout``, ``updates``, ``cfg``, ``turn_no``, ``_ids``, ``reply`` and ``state``."""

    def tool_chosen(self, reply: int, choice: ToolChoice, now: float) -> list[Action]:
        r = self._current(reply)
        if r is None or self.tools is None:
            return []
        if self.state is State.HOLDING:
            r.pending_tool = choice            # run it only if the caller really finished
        else:
            self._run_tool(r, choice, now)
        return self._take()

    def _run_tool(self, r: Reply, choice: ToolChoice, now: float) -> None:
        r.rounds += 1
        spec = self.tools.specs.get(choice.tool)
        after = self.tool_settings.get("filler_after", 1.0)
        if spec is not None and spec.filler and after:
            r.filler_at = now + after
        self._set(State.TOOL, f"tool {choice.tool}", now)
        self._act(CallTool(r.id, choice))

    def tool_done(self, reply: int, choice: ToolChoice, o: Any, now: float) -> list[Action]:
        """A tool call came back (``o``: the runner's ``Outcome``)."""
        self.dialog.add_tool(o, choice.arguments)
        self._act(AuditTool(o.audit),
                  Emit("tool_called", {k: o.audit.get(k) for k in (
                      "tool_call_id", "tool", "status", "kind", "http_status", "attempts", "seconds", "args",
                      "result")}),
                  LogTool(self.turn_no, o.tool, o.status, o.kind, o.seconds))
        r = self._current(reply)
        if r is None or self.state is not State.TOOL:      # barged in meanwhile: the result is in the history
            return self._take()
        r.filler_at = None
        if o.status in FAILED_TOOL:
            r.llm_done = True
            for key in ("tool_unavailable_text", "tool_fallback_text"):
                self._say_canned(key)
                r.sentences.append(self.cfg[key])
            self._set(State.PLAYING if r.composed else State.REPLYING, f"tool {o.status}", now)
        elif o.say:
            self._set(State.REPLYING, "tool answered", now)
            self._say_line(r, o.say, now)
            self._composed(r, now)
        else:
            self._set(State.REPLYING, "tool answered", now)
            self._model_round(r, [])
        return self._take()

    def tool_result(self, tool: str, result: dict, say: str | None, now: float) -> list[Action]:
        """An async tool result for this call: into the history now, spoken when the line is free."""
        self.dialog.add_update(tool, result)
        self.updates.append(Update(tool, result, say))
        return []

    def _speak_update(self, u: Update, now: float) -> None:
        r = Reply(next(self._ids), self.turn_no, "", now, Timings(now))
        self.playout.take_heard()
        self.reply = r
        self._set(State.REPLYING, f"update from {u.tool}", now)
        if u.say:
            self._say_line(r, u.say, now)
            self._composed(r, now)
        else:
            self._model_round(r, [])
