"""What the control API and a call's session use of whoever runs them: one declared interface.

A cell builds one ``Services`` with everything (its live calls, the engine's
commands, the inference hub); the box builds one with only the shared store,
event tailer, webhooks and metrics (no live calls: it forwards call actions to
the cell that owns them). ``Api``, ``StreamManager``, ``Recordings`` and
``Session`` take a ``Services`` and never reach into a cell, so the box needs
no fake cell. Everything here is used on the cell's asyncio loop only; the SIP
engine is reached through ``submit`` (commands) and seen through
``live_quality`` (the latest ``CallsSnapshot`` the engine published).
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Optional

from media.quality import Quality
from sip import commands as cmd

if TYPE_CHECKING:
    from bridge.api.events import EventBus, Tailer
    from bridge.api.stream_manager import StreamManager
    from bridge.api.webhooks import WebhookDispatcher
    from bridge.core.config import Config
    from bridge.core.metrics import Metrics
    from bridge.records.recording import Recordings
    from bridge.records.store import Store


def _no_engine(command: cmd.Command) -> Future:
    command.future.set_exception(RuntimeError("no SIP engine here"))
    return command.future


def _no_quality(call_id: str) -> Optional[Quality]:
    return None


async def _no_calls(uri: str, trunk: str | None = None, app: str | None = None) -> str:
    raise RuntimeError("no SIP engine here")


@dataclass
class Services:
    """The services of a cell (or of the box) that the API and the sessions use."""
    cfg: "Config"
    store: "Store"
    metrics: "Metrics"
    tailer: "Tailer"                         # follows the store's events: WebSocket and webhooks
    webhooks: "WebhookDispatcher"
    cell_id: str = "0"                       # prefixes the ids of transcribes, speakings, streams
    bus: "EventBus | None" = None            # publish an event (stored, then sent); a cell's
    calls: Mapping[str, Any] = field(default_factory=dict)   # live sessions by call id (none in the box)
    submit: Callable[[cmd.Command], Future] = _no_engine      # a command to the SIP engine (any thread)
    make_call: Callable[..., Awaitable[str]] = _no_calls      # place an outbound call -> call id
    live_quality: Callable[[str], Optional[Quality]] = _no_quality   # latest snapshot of a live call
    hub: Any = None                          # the inference hub (agent, transcribes, speakings), if loaded
    tools: Any = None                        # the business-API tool runner, if configured
    streams: "StreamManager | None" = None
    recordings: "Recordings | None" = None
