"""Number routes: which app answers a dialled number.

A route is an app name (``echo``, ``playback``, ``agent``, ``api``) or a bot:
``{app = "stream", url = "wss://bot.example/ws", protocol = "twilio", parameters = {...}}``
(the call is answered and its audio goes both ways over a media stream to
``url``; the call ends with the stream), or the agent with a profile:
``{app = "agent", profile = "sales"}`` and/or the profile's fields inline
(``bridge.core.profiles``). The store keeps a route as text: an app name as is,
a table route as its JSON.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bridge.core.app import APPS
from bridge.core.profiles import PROFILE_NAME, Profile, parse_profile

PROTOCOLS = ("trunkline", "twilio")
ENCODINGS = ("mulaw", "pcm16", "opus")
MAX_PARAMETERS = 50
MAX_PARAMETER_CHARS = 1024


@dataclass(frozen=True)
class BotRoute:
    """A number routed straight to a bot over a bidirectional media stream."""
    url: str
    protocol: str = "trunkline"
    parameters: dict[str, str] = field(default_factory=dict)
    account_sid: str | None = None       # Twilio: the accountSid the bot is told (and may hang up with)
    encoding: str = "mulaw"              # Trunkline protocol only (Twilio carries mulaw)
    api_base: str | None = None          # told to the bot in customParameters: where to hang up

    def as_dict(self) -> dict:
        out: dict[str, Any] = {"app": "stream", "url": self.url, "protocol": self.protocol,
                               "parameters": dict(self.parameters)}
        if self.account_sid:
            out["account_sid"] = self.account_sid
        if self.encoding != "mulaw":
            out["encoding"] = self.encoding
        if self.api_base:
            out["api_base"] = self.api_base
        return out


@dataclass(frozen=True)
class AgentRoute:
    """A number answered by the agent with a profile: a named one, fields inline, or both
    (the inline fields win)."""
    profile: str = ""
    fields: Profile = field(default_factory=Profile)

    def as_dict(self) -> dict:
        return {"app": "agent", **({"profile": self.profile} if self.profile else {}), **self.fields.as_dict()}


def agent_route(value: dict) -> AgentRoute:
    """An agent route from a TOML table or a JSON body; ``ValueError`` says what is wrong."""
    if value.get("app") != "agent":
        raise ValueError("app: a profile route needs app = \"agent\"")
    name = value.get("profile", "")
    if not isinstance(name, str) or name and not PROFILE_NAME.match(name):
        raise ValueError("profile: expected a profile name (letters, digits, _ . -)")
    fields = parse_profile(value, extra=("app", "profile"))
    if not name and not fields.as_dict():
        raise ValueError("profile: an agent table route needs a profile name or profile fields")
    return AgentRoute(name, fields)


def _text(value: Any, name: str, limit: int = 2048) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise ValueError(f"{name}: expected a string of 1..{limit} characters")
    return value


def bot_route(value: dict) -> BotRoute:
    """A bot route from a TOML table or a JSON body; ``ValueError`` says what is wrong."""
    known = {"app", "url", "protocol", "parameters", "account_sid", "encoding", "api_base"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    if value.get("app") != "stream":
        raise ValueError("app: a table route needs app = \"stream\"")
    url = _text(value.get("url"), "url")
    if not url.lower().startswith(("ws://", "wss://")):
        raise ValueError("url: must start with ws:// or wss://")
    protocol = value.get("protocol", "trunkline")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: one of {', '.join(PROTOCOLS)}")
    encoding = value.get("encoding", "mulaw")
    if encoding not in ENCODINGS or protocol == "twilio" and encoding != "mulaw":
        raise ValueError("encoding: " + ("Twilio Media Streams carry mulaw only" if protocol == "twilio"
                                         else f"one of {', '.join(ENCODINGS)}"))
    params = value.get("parameters", {})
    if not isinstance(params, dict) or len(params) > MAX_PARAMETERS or not all(
            isinstance(k, str) and 0 < len(k) <= 128 and isinstance(v, str) and len(v) <= MAX_PARAMETER_CHARS
            for k, v in params.items()):
        raise ValueError(f"parameters: a table of at most {MAX_PARAMETERS} string values "
                         f"(names up to 128, values up to {MAX_PARAMETER_CHARS} characters)")
    account_sid = value.get("account_sid")
    if account_sid is not None:
        _text(account_sid, "account_sid", 64)
    api_base = value.get("api_base")
    if api_base is not None and not _text(api_base, "api_base").lower().startswith(("http://", "https://")):
        raise ValueError("api_base: must start with http:// or https://")
    return BotRoute(url, protocol, dict(params), account_sid, encoding, api_base)


def check_route(value: Any) -> str | BotRoute | AgentRoute:
    """An app name, a bot route or an agent (profile) route; ``ValueError`` otherwise."""
    if isinstance(value, str):
        if value not in APPS:
            raise ValueError(f"expected one of {', '.join(APPS)} or a stream table")
        return value
    if isinstance(value, dict):
        return agent_route(value) if value.get("app") == "agent" else bot_route(value)
    raise ValueError(f"expected one of {', '.join(APPS)} or a stream table")


def encode(route: str | BotRoute | AgentRoute) -> str:
    """A route as the store keeps it."""
    return route if isinstance(route, str) else json.dumps(route.as_dict(), sort_keys=True)


def decode(text: str) -> str | BotRoute | AgentRoute:
    """A stored route back (an unreadable one answers as the app name it was stored as)."""
    if text.startswith("{"):
        try:
            return check_route(json.loads(text))
        except (ValueError, TypeError):
            return text
    return text


def view(text: str) -> str | dict:
    """A stored route as the API shows it: an app name, or the bot route's table."""
    route = decode(text)
    return route.as_dict() if isinstance(route, (BotRoute, AgentRoute)) else route


def app_name(text: str) -> str:
    """The app a stored route runs: its name, ``stream`` for a bot, ``agent`` for a profile."""
    route = decode(text)
    return "stream" if isinstance(route, BotRoute) else "agent" if isinstance(route, AgentRoute) else text
