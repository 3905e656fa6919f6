"""One conversation's history and what the model is sent each turn.

Shared by the phone agent (``bridge.agent.app``) and ``trunkline chat``, so a
prompt or a tool tried in the terminal behaves as it will on a call. The
history is kept in the OpenAI message shape (assistant ``tool_calls``, role
``tool`` results); each model adapter renders it its own way.
"""
from __future__ import annotations

import json

from bridge.agent.tools.select import shortlist


class Dialog:
    def __init__(self, agent_cfg: dict, tool_settings: dict | None = None, runner=None):
        self.cfg = agent_cfg
        self.tool_settings = tool_settings or {}
        self.runner = runner
        self.history: list[dict] = []

    # -- history ------------------------------------------------------------
    def add_user(self, text: str) -> None:
        self.history.append({"role": "user", "content": text})

    def add_assistant(self, text: str) -> None:
        if text:
            self.history.append({"role": "assistant", "content": text})

    def add_tool(self, outcome, arguments) -> None:
        """A tool call the model made and what came of it (the model reads both next round)."""
        args = arguments if isinstance(arguments, str) else json.dumps(arguments, separators=(",", ":"))
        self.history.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": outcome.tool_call_id, "type": "function", "function": {"name": outcome.tool, "arguments": args}}]})
        self.history.append({"role": "tool", "tool_call_id": outcome.tool_call_id, "name": outcome.tool,
                             "content": outcome.for_model()})

    def add_update(self, tool: str, result: dict) -> None:
        """An asynchronous tool result that arrived later (payment confirmed, ...)."""
        self.history.append({"role": "system", "content": f"Update from {tool}: "
                             + json.dumps(result, separators=(",", ":"))})

    # -- what the model gets ----------------------------------------------------
    def messages(self, extra: list[dict] | None = None) -> list[dict]:
        start = max(0, len(self.history) - 2 * self.cfg["history_turns"])
        # Never start inside a tool exchange: a result without its call confuses every backend.
        while start > 0 and self.history[start]["role"] == "tool":
            start -= 1
        history = self.history[start:]
        return [{"role": "system", "content": self.cfg["system_prompt"]}] + history + list(extra or [])

    def tools_for(self, text: str, round_no: int) -> list[dict]:
        """Tool definitions to offer the model on this round of a turn (maybe none)."""
        if self.runner is None or not self.runner.specs or round_no >= self.tool_settings.get("max_per_turn", 2):
            return []
        specs = shortlist(text, list(self.runner.specs.values()), self.tool_settings.get("shortlist", 2))
        return [{"name": s.name, "description": s.description, "parameters": _for_model(s.model_parameters())}
                for s in specs]


def _for_model(schema: dict) -> dict:
    """A tool's parameter schema without the operator's annotations (``x-source`` ...)."""
    props = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("x-")}
             for k, v in schema.get("properties", {}).items()}
    return {**schema, "properties": props}
