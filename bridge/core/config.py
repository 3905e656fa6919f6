"""Configuration: defaults < TOML file < TRUNKLINE_* environment < CLI flags.

Every key is declared in ``SCHEMA`` with its type; anything unknown or of
the wrong type stops the start with one line naming the key, e.g.
``config error: sip.listen: expected HOST:PORT, got 'nowhere'``.
"""
from __future__ import annotations

import copy
import ipaddress
import os
import tomllib
from dataclasses import dataclass
from typing import Any

from bridge.core import numbers, profiles
from bridge.core.toolspec import ToolBox, ToolConfigError, load_toolbox
from bridge.core.validators import (MEDIA_ONLY_APPS, WIDEBAND_CODECS, _address, _auto_bool, _bool, _caller_number,
                                    _caller_numbers, _sip_host, _choice,
                                     _cidrs, _clock_rate, _digit_map, _float, _hostport, _int, _number_flags,
                                     _outbound_allow, _port_range, _regex_list, _str, _str_list, _transfer_destinations,
                                     _trunk_codecs)
from sip.config import TrunkSpec as Trunk   # one trunk type, from file to engine


class ConfigError(ValueError):
    pass


SCHEMA: dict[str, dict[str, Any]] = {
    "": {"data_dir": _str, "log_level": _choice("debug", "info", "warning", "error"),
         "drain_timeout": _float(0, 86400)},
    "sip": {"listen": _hostport, "public_address": _address, "media_public_address": _address, "user_agent": _str,
            "capacity": _int(1, 3), "retry_after": _int(1, 3600), "answer_delay": _float(0, 60),
            "rtp_timeout": _float(0, 3600), "codecs": _str_list, "log_level": _int(0, 6),
            "trusted_proxies": _cidrs, "outbound_proxy": _str, "allowed_destinations": _str_list,
            "tcp": _auto_bool, "require_guard": _auto_bool, "trusted_proxy_port": _int(0, 65535),
            "tls_listen": _str, "tls_cert": _str, "tls_key": _str, "tls_ca": _str, "tls_verify": _bool,
            "tls_require_client_cert": _bool, "tls_server_name": _str,
            "topology_hiding": _bool},      # the front masks the cells' addresses toward trunks
    "media": {"rtp_ports": _port_range, "clock_rate": _clock_rate,
              "realtime_clock": _bool, "jitter_init_ms": _int(-1, 360), "jitter_min_ms": _int(-1, 360),
              "jitter_max_ms": _int(-1, 360)},
    "http": {"listen": _hostport, "ops_listen": _str, "ws_heartbeat": _float(1, 300),
             "outbound_allow": _outbound_allow, "outbound_strict": _bool,
             "rate_limit": _float(0, 100000), "rate_burst": _int(1, 100000),
             "tls_cert": _str, "tls_key": _str},
    "records": {"retention_days": _float(0, 36500), "require_keys": _bool, "local_key_file": _str,
                "log_words": _bool},
    "recordings": {"enabled": _bool, "format": _choice("opus", "wav"), "dir": _str, "numbers": _number_flags,
                   "key_file": _str, "key_env": _str, "current_key": _str, "retention_days": _float(0, 36500),
                   "opus_bitrate": _int(6000, 256000), "flush_interval": _float(0.2, 10), "dtmf_pause": _bool,
                   "dtmf_resume_after": _float(0.5, 60)},
    "pii": {"mask_cards": _bool, "patterns": _regex_list, "show_dtmf": _bool},
    "cells": {"host": _str, "sip_base": _int(0, 65535), "http_base": _int(0, 65535), "kamailio": _str,
              "ping_interval": _int(1, 60), "pike": _int(1, 100000), "children": _int(1, 64), "front_ip": _str,
              "front_port": _int(0, 65535), "rtpengine": _str, "rtpengine_ports": _port_range,
              "rtpengine_ng_port": _int(0, 65535)},
    "webhooks": {"max_attempts": _int(1, 50), "base_delay": _float(0.01, 3600), "max_delay": _float(0.1, 86400),
                 "timeout": _float(0.5, 60), "dispatch": _bool, "retry_for": _float(0, 604800)},
    "streams": {"buffer_frames": _int(5, 3000), "max_per_call": _int(1, 10), "reconnect_attempts": _int(0, 100),
                "reconnect_base_delay": _float(0.05, 60), "reconnect_max_delay": _float(0.1, 600),
                "connect_timeout": _float(0.5, 600), "send_timeout": _float(0.5, 120),
                "playback_seconds": _float(1, 3600)},
    "app": {"name": _choice("echo", "playback", "agent", "api"), "prompt": _str, "loop": _bool,
            "dtmf_transfer": _digit_map, "max_duration": _float(0, 86400)},
    "agent": {"system_prompt": _str, "greeting": _str, "language": _str, "reprompt_text": _str,
              "reprompt_after": _float(0, 3600), "hangup_after": _float(0, 3600), "goodbye_text": _str,
              "goodbye_phrases": _str_list, "not_understood_text": _str, "apology_text": _str,
              "max_reply_tokens": _int(8, 1024), "temperature": _float(0, 2), "repeat_penalty": _float(1, 3),
              "history_turns": _int(1, 100), "silence": _float(0.2, 5), "pause": _float(0.1, 2),
              "min_speech": _float(0.04, 1), "min_utterance": _float(0.05, 5), "bargein_floor_dbfs": _float(-90, 0),
              "vad": _choice("silero", "webrtc"), "vad_mode": _int(0, 3), "interim_every": _float(0, 30), "digits_extra": _float(0, 5),
              "speculate": _bool, "turn_model": _choice("smart-turn", "none"), "turn_min_silence": _float(0.1, 2),
              "turn_max_silence": _float(0.2, 5), "turn_threshold": _float(0, 1), "bargein_onset": _float(0.02, 1),
              "bargein_confirm": _float(0.02, 3), "tool_filler_text": _str, "tool_unavailable_text": _str,
              "tool_fallback_text": _str, "markup_fallback_text": _str, "call_summary": _bool},
    "tools": {"file": _str, "secrets_file": _str, "max_per_call": _int(1, 100), "max_per_turn": _int(1, 5),
              "shortlist": _int(0, 50), "filler_after": _float(0, 10), "breaker_failures": _int(1, 100),
              "breaker_cooldown": _float(1, 3600), "callback_base_url": _str},
    "transfer": {"destinations": _transfer_destinations, "ring_timeout": _float(1, 300), "whisper": _bool,
                 "whisper_text": _str, "say_text": _str, "no_answer_text": _str},
    "models": {"stt": _str, "stt_compute_type": _choice("int8", "int8_float32", "float32"),
               "llm_backend": _choice("llama", "openai"), "llm": _str, "llm_context": _int(256, 32768),
               "llm_url": _str, "llm_model": _str, "llm_api_key_env": _str, "llm_url_context": _int(0, 10_000_000),
               "tts": _str, "tts_config": _str,
               "threads": _int(1, 64), "tts_threads": _int(1, 64), "load_timeout": _float(1, 3600),
               "load": _choice("auto", "always", "never")},
}

TRUNK_SCHEMA = {"name": _str, "address": _str, "allow": _cidrs, "username": _str,
                "password": _str, "password_env": _str, "realm": _str, "register": _bool,
                "expires": _int(60, 86400), "transport": _choice("udp", "tcp", "tls"),
                "srtp": _choice("off", "optional", "mandatory"),
                "addresses": _str_list, "cps": _float(0, 1000), "max_calls": _int(0, 100000),
                "failover_timeout": _float(0.5, 120),
                "codecs": _trunk_codecs,     # on the wire toward the trunk; "opus" is transcoded at the edge
                "register_retry": _int(1, 3600),      # the front's first retry after a failed registration (s)
                "register_retry_max": _int(1, 3600),  # ... doubling after each failure in a row up to this (s)
                "caller_id": _caller_number,          # From user of outbound calls over this trunk
                "caller_ids": _caller_numbers,        # further numbers a call may present (POST /v1/calls from)
                "from_domain": _sip_host,             # From host (default: public_address, else the trunk's)
                "asserted_identity": _bool}           # P-Asserted-Identity with the caller's number too

DEFAULTS: dict[str, Any] = {
    "data_dir": "./data",
    "log_level": "info",
    "drain_timeout": 60.0,
    "sip": {"listen": "0.0.0.0:5060", "public_address": "", "media_public_address": "", "user_agent": "Trunkline",
            "capacity": 3, "retry_after": 5, "answer_delay": 0.0, "rtp_timeout": 30.0,
            "codecs": ["PCMU", "PCMA", "G722"], "log_level": 1, "trusted_proxies": [], "outbound_proxy": "",
            "allowed_destinations": [], "tcp": "auto", "require_guard": "auto", "trusted_proxy_port": 0,
            "tls_listen": "", "tls_cert": "", "tls_key": "", "tls_ca": "", "tls_verify": True,
            "tls_require_client_cert": True, "tls_server_name": "", "topology_hiding": True},
    "media": {"rtp_ports": "10000-10999", "clock_rate": "auto", "realtime_clock": True,
              "jitter_init_ms": 40, "jitter_min_ms": 40, "jitter_max_ms": -1},
    "http": {"listen": "127.0.0.1:8080", "ops_listen": "", "ws_heartbeat": 15.0,
             "outbound_allow": [], "outbound_strict": False, "rate_limit": 50.0, "rate_burst": 200,
             "tls_cert": "", "tls_key": ""},
    "records": {"retention_days": 30.0, "require_keys": False, "local_key_file": "", "log_words": False},
    "recordings": {"enabled": False, "format": "opus", "dir": "", "numbers": {}, "key_file": "",
                   "key_env": "TRUNKLINE_RECORDING_KEYS", "current_key": "", "retention_days": 90.0,
                   "opus_bitrate": 32000, "flush_interval": 1.0, "dtmf_pause": True, "dtmf_resume_after": 5.0},
    "pii": {"mask_cards": True, "patterns": [], "show_dtmf": False},
    "cells": {"host": "127.0.0.1", "sip_base": 0, "http_base": 0, "kamailio": "kamailio", "ping_interval": 2,
              "pike": 60, "children": 1, "front_ip": "", "front_port": 0, "rtpengine": "rtpengine",
              "rtpengine_ports": "20000-20999", "rtpengine_ng_port": 0},
    "webhooks": {"max_attempts": 16, "base_delay": 1.0, "max_delay": 300.0, "timeout": 5.0, "dispatch": True,
                 "retry_for": 1800.0},
    "streams": {"buffer_frames": 50, "max_per_call": 3, "reconnect_attempts": 5, "reconnect_base_delay": 0.5,
                "reconnect_max_delay": 10.0, "connect_timeout": 10.0, "send_timeout": 5.0, "playback_seconds": 60.0},
    "numbers": {},
    "profiles": {},             # [profiles.NAME]: per-number agent settings (bridge/core/profiles.py)
    "languages": {},            # [languages.xx]: stt_model, tts_voice per language
    "app": {"name": "echo", "prompt": "", "loop": False, "dtmf_transfer": {}, "max_duration": 3600.0},
    "agent": {
        "system_prompt": ("You are a helpful receptionist answering the phone. Answer in one or two short, "
                          "plain sentences that sound natural when spoken. Never use lists or markdown."),
        "greeting": "Hello! How can I help you today?",
        "language": "en",
        "reprompt_text": "Are you still there?",
        "reprompt_after": 8.0,
        "hangup_after": 25.0,
        "goodbye_text": "Thank you for calling. Goodbye!",
        "goodbye_phrases": ["goodbye", "bye", "that's all", "hang up"],
        "not_understood_text": "Sorry, could you repeat that?",
        "apology_text": "Sorry, I'm having trouble right now. Please bear with me.",
        "max_reply_tokens": 60, "temperature": 0.3, "repeat_penalty": 1.3, "history_turns": 6,
        "silence": 0.6, "pause": 0.2, "min_speech": 0.12, "min_utterance": 0.25,
        "bargein_floor_dbfs": -38.0, "vad": "silero", "vad_mode": 3, "interim_every": 1.0, "digits_extra": 0.8,
        "speculate": True,
        "turn_model": "smart-turn", "turn_min_silence": 0.25, "turn_max_silence": 2.0, "turn_threshold": 0.5,
        "bargein_onset": 0.06, "bargein_confirm": 0.8,
        "tool_filler_text": "One moment, let me check.",
        "tool_unavailable_text": "Sorry, I can't do that right now.",
        "tool_fallback_text": "I'll have someone call you back.",
        "markup_fallback_text": "Could you tell me a little more about what you need?",
        "call_summary": True,
    },
    "tools": {"file": "", "secrets_file": "", "max_per_call": 8, "max_per_turn": 2, "shortlist": 2,
              "filler_after": 1.0, "breaker_failures": 5, "breaker_cooldown": 30.0, "callback_base_url": ""},
    "tool": [],
    "transfer": {"destinations": {}, "ring_timeout": 20.0, "whisper": True,
                 "whisper_text": "A caller from the voice agent. {summary}",
                 "say_text": "Let me put you through to {description}. Please hold.",
                 "no_answer_text": "Sorry, nobody is available to take your call right now. "
                                   "Is there anything else I can help you with?"},
    "models": {"stt": "", "stt_compute_type": "int8", "llm_backend": "llama", "llm": "", "llm_context": 2048,
               "llm_url": "", "llm_model": "", "llm_api_key_env": "OPENAI_API_KEY", "llm_url_context": 0,
               "tts": "", "tts_config": "",
               "threads": 2, "tts_threads": 1, "load_timeout": 180.0,
               "load": "auto"},
    "trunks": [{"name": "local", "allow": ["127.0.0.0/8", "::1/128"]}],
}

CODEC_IDS = {"PCMU": "PCMU/8000", "PCMA": "PCMA/8000", "G722": "G722/16000",
             "GSM": "GSM/8000", "SPEEX": "speex", "ILBC": "iLBC/8000", "L16": "L16"}


@dataclass
class Config:
    raw: dict
    trunks: list[Trunk]
    toolbox: ToolBox | None = None
    transports: dict[str, str] | None = None     # trunk name -> "udp" | "tcp" | "tls" (the front's side)
    srtp: dict[str, str] | None = None           # trunk name -> "off" | "optional" | "mandatory" (rtpengine)
    codecs: dict[str, list[str]] | None = None   # trunk name -> its ``codecs`` (none: the cells' own, as offered)

    def transport(self, trunk: str) -> str:
        return (self.transports or {}).get(trunk, "udp")

    def runs_front(self) -> bool:
        """TLS (or a TCP trunk, or a trunk's ``codecs``) is the front's job: such a deployment always runs it."""
        return (bool(self.raw["sip"]["tls_listen"]) or "tcp" in (self.transports or {}).values()
                or any((self.codecs or {}).values()))     # a trunk's codecs are transcoded at the edge

    def srtp_mode(self, trunk: str) -> str:
        return (self.srtp or {}).get(trunk, "off")

    def trunk_codecs(self, trunk: str) -> list[str]:
        """The trunk's ``codecs`` ([] = not set: media goes as the cells offer and answer it)."""
        return list((self.codecs or {}).get(trunk, []))

    def get(self, section: str, key: str) -> Any:
        return self.raw[key] if section == "" else self.raw[section][key]

    @property
    def data_dir(self) -> str:
        return self.raw["data_dir"]

    @property
    def app(self) -> str:
        return self.raw["app"]["name"]

    @property
    def clock_rate(self) -> int:
        """The conference bridge's rate (``media.clock_rate``; "auto": 8 kHz for a media-only cell
        or when no wideband codec is enabled - G.711 audio is 8 kHz on the wire, so the bridge
        would only resample it up and down again - else 16 kHz)."""
        rate = self.raw["media"]["clock_rate"]
        if rate != "auto":
            return rate
        wideband = any(c.upper() in WIDEBAND_CODECS for c in self.raw["sip"]["codecs"])
        return 16000 if wideband and self.app not in MEDIA_ONLY_APPS else 8000

    @property
    def outbound(self):
        """The SSRF guard's policy (``http.outbound_allow``, ``http.outbound_strict``)."""
        from bridge.core.netguard import Policy
        return Policy.from_config(self.raw["http"])

    def apps(self) -> set[str]:
        """The apps this configuration routes calls to: the default and the numbers' (the
        numbers the API adds at run time are not known here)."""
        return {self.app, *(v if isinstance(v, str) else v.get("app") for v in self.raw["numbers"].values())}

    def needs_models(self) -> bool:
        load = self.raw["models"]["load"]
        if load != "auto":
            return load == "always"
        return bool(self.apps() & {"agent", "api"})


def _check(section: str, key: str, value: Any) -> Any:
    name = f"{section}.{key}" if section else key
    checks = SCHEMA.get(section)
    if checks is None or key not in checks:
        raise ConfigError(f"{name}: unknown key")
    try:
        return checks[key](value)
    except TypeError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _check_jitter(media: dict) -> None:
    """pjmedia asserts (aborting the cell on every call) unless min <= init <= max prefetch, and
    its own maximum is ~400 ms of its 500 ms buffer: the keys are held to that (-1: pjmedia's own)."""
    init, low, high = media["jitter_init_ms"], media["jitter_min_ms"], media["jitter_max_ms"]
    if init >= 0 and low >= 0 and init < low:
        raise ConfigError(f"media.jitter_init_ms: {init} is below media.jitter_min_ms ({low})")
    for key, value in (("jitter_min_ms", low), ("jitter_init_ms", init)):
        if high >= 0 and value > high:
            raise ConfigError(f"media.{key}: {value} is above media.jitter_max_ms ({high})")


def _trunk(i: int, t: Any) -> Trunk:
    where = f"trunks[{i}]"
    if not isinstance(t, dict):
        raise ConfigError(f"{where}: expected a table")
    out: dict[str, Any] = {}
    for k, v in t.items():
        if k not in TRUNK_SCHEMA:
            raise ConfigError(f"{where}.{k}: unknown key")
        try:
            out[k] = TRUNK_SCHEMA[k](v)
        except TypeError as exc:
            raise ConfigError(f"{where}.{k}: {exc}") from None
    if not out.get("name"):
        raise ConfigError(f"{where}.name: required")
    out.pop("transport", None)                   # the front's concern (Config.transports)
    retry, retry_max = out.pop("register_retry", 30), out.pop("register_retry_max", None)
    if retry_max is not None and retry_max < retry:     # the front's too (bridge/box/uacreg.py, uac_reg)
        raise ConfigError(f"{where}.register_retry_max: {retry_max} is below register_retry ({retry})")
    out.pop("codecs", None)                      # the front's too: rtpengine at the edge (Config.codecs)
    if out.pop("srtp", "off") != "off" and t.get("transport") != "tls":
        raise ConfigError(f"{where}.srtp: SRTP keys (SDES) travel in the SIP messages: "
                          "it needs transport = \"tls\"")
    env = out.pop("password_env", "")
    if env:
        if env not in os.environ:
            raise ConfigError(f"{where}.password_env: environment variable {env} is not set")
        out["password"] = os.environ[env]
    if out.get("addresses"):            # ordered failover list; ``address`` (if given) must be its first
        if out.get("address") and out["address"] != out["addresses"][0]:
            raise ConfigError(f"{where}.addresses: must start with address ({out['address']!r}) when both are set")
        out["address"] = out["addresses"][0]
    if not out.get("allow") and out.get("address"):
        # A trunk with IP-literal addresses and no allow-list trusts those addresses.
        for address in out.get("addresses") or [out["address"]]:
            host = address.removeprefix("sip:").split(";")[0].split("@")[-1]
            host = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
            try:
                out.setdefault("allow", []).append(str(ipaddress.ip_network(host)))
            except ValueError:
                pass
    if out.get("register") and not (out.get("address") and out.get("username")):
        raise ConfigError(f"{where}.register: needs address and username")
    if (out.get("username") or out.get("password")) and out.get("realm", "").strip() in ("", "*"):
        # without it pjsua answers any server's challenge (realm "*"): a digest response
        # for the trunk's credentials to whoever asks
        raise ConfigError(f"{where}.realm: trunk {out['name']!r} has credentials and needs an explicit "
                          "realm (the digest realm its server challenges with)")
    return Trunk(**out)


def _check_outbound(raw: dict, m: dict) -> None:
    """The SSRF guard at load for the OpenAI-compatible LLM backend (its requests leave from the
    inference process): the URL must be http(s), and its host, an address or what a name
    resolves to now, allowed by ``http.outbound_allow`` (tools, webhooks and streams are
    also checked on every connection)."""
    if m["llm_backend"] != "openai":
        return
    import socket
    from urllib.parse import urlsplit
    from bridge.core.netguard import OutboundRefused, Policy, parse_ip
    policy = Policy.from_config(raw["http"])
    try:
        policy.check_url(m["llm_url"], ("http", "https"))
        host = urlsplit(m["llm_url"]).hostname or ""
        if parse_ip(host) is None and not policy.host_allowed(host):
            try:
                found = {i[4][0] for i in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
            except (OSError, UnicodeError):
                found = set()                    # unresolvable now: the connection will fail
            policy.check_host(host, sorted(found))
    except OutboundRefused as exc:
        raise ConfigError(f"models.llm_url: {exc.reason} address refused "
                          "(allow it with http.outbound_allow)") from None
    except ValueError as exc:
        raise ConfigError(f"models.llm_url: {exc}") from None


def _check_tls(h: dict) -> None:
    """``http.tls_cert`` and ``http.tls_key`` (PEM files): both or neither, and readable."""
    if bool(h["tls_cert"]) != bool(h["tls_key"]):
        raise ConfigError("http.tls_cert: HTTPS needs both http.tls_cert and http.tls_key")
    for key in ("tls_cert", "tls_key"):
        if h[key] and not os.access(os.path.expanduser(h[key]), os.R_OK):
            raise ConfigError(f"http.{key}: {h[key]} is not a readable file")


def _check_tool_urls(raw: dict, toolbox) -> None:
    """A tool URL whose host is a literal address must be allowed by ``http.outbound_allow``."""
    if toolbox is None:
        return
    from bridge.core.netguard import OutboundRefused, Policy
    policy = Policy.from_config(raw["http"])
    for name, spec in toolbox.tools.items():
        try:
            policy.check_url(spec.url, ("http", "https"))
        except OutboundRefused as exc:
            raise ConfigError(f"tool {name}: url: {exc.reason} address refused "
                              "(allow it with http.outbound_allow)") from None
        except ValueError:
            pass                                 # a templated host: checked when connecting


def _check_number_urls(raw: dict) -> None:
    """A number routed to a bot whose URL's host is a literal address must be allowed by
    ``http.outbound_allow`` (names are checked on every connection)."""
    from bridge.core.netguard import OutboundRefused, Policy
    policy = Policy.from_config(raw["http"])
    for number, route in raw["numbers"].items():
        if isinstance(route, dict) and route.get("app") == "stream":
            try:
                policy.check_url(route["url"], ("ws", "wss"))
            except OutboundRefused as exc:
                raise ConfigError(f"numbers.{number}: url: {exc.reason} address refused "
                                  "(allow it with http.outbound_allow)") from None


def check_profile(where: str, p: "profiles.Profile", raw: dict, tool_names: set[str] | None) -> None:
    """A profile's references: its language configured, its voice's files there, its tools
    among the configured ones (``tool_names``: None when the caller does not check them)."""
    langs = raw["languages"]
    if p.language and p.language not in langs and p.language != raw["agent"]["language"]:
        raise ConfigError(f"{where}.language: {p.language!r} is not configured (add [languages.{p.language}] "
                          "with stt_model and tts_voice, or use the [agent] language "
                          f"{raw['agent']['language']!r})")
    if p.voice:
        try:
            profiles.check_voice(p.voice)
        except ValueError as exc:
            raise ConfigError(f"{where}.{exc}") from None
    known = (raw.get("transfer") or {}).get("destinations") or {}
    unknown = [d for d in p.transfer if d not in known]
    if unknown:
        raise ConfigError(f"{where}.transfer: {unknown[0]!r} is not a transfer destination "
                          f"(configured: {', '.join(sorted(known)) or 'none'})")
    if p.tools is not None and tool_names is not None:
        unknown = [t for t in p.tools if t not in tool_names]
        if unknown:
            raise ConfigError(f"{where}.tools: {unknown[0]!r} is not a configured tool "
                              f"(configured: {', '.join(sorted(tool_names)) or 'none'})")


def _check_profiles(raw: dict, toolbox) -> None:
    """Languages' model files exist; profiles and agent number routes refer to what is configured."""
    for code, table in raw["languages"].items():
        try:
            profiles.check_language_files(profiles.parse_language(code, table))
        except ValueError as exc:
            raise ConfigError(f"languages.{code}.{exc}") from None
    tool_names = set(toolbox.tools) if toolbox is not None else set()
    for name, table in raw["profiles"].items():
        check_profile(f"profiles.{name}", profiles.parse_profile(table), raw, tool_names)
    for number, route in raw["numbers"].items():
        if isinstance(route, dict) and route.get("app") == "agent":
            r = numbers.agent_route(route)
            if r.profile and r.profile not in raw["profiles"]:
                raise ConfigError(f"numbers.{number}.profile: no [profiles.{r.profile}] "
                                  f"(configured: {', '.join(sorted(raw['profiles'])) or 'none'})")
            check_profile(f"numbers.{number}", r.fields, raw, tool_names)


def _merge_file(raw: dict, data: dict) -> None:
    for key, value in data.items():
        if key == "numbers":
            if not isinstance(value, dict):
                raise ConfigError("numbers: expected a table of \"number\" = \"echo|playback|agent|api\" "
                                  "or { app = \"stream\", url = ... }")
            for number, route in value.items():
                try:
                    numbers.check_route(route)
                except ValueError as exc:
                    raise ConfigError(f"numbers.{number}: {exc}") from None
            raw["numbers"] = value
        elif key in ("profiles", "languages"):
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ConfigError(f"{key}: expected tables ([{key}.NAME])")
            for name, table in value.items():
                try:
                    if key == "profiles":
                        if not profiles.PROFILE_NAME.match(name):
                            raise ValueError("a profile name is letters, digits, _ . -")
                        raw[key][name] = profiles.parse_profile(table).as_dict()
                    else:
                        profiles.parse_language(name, table)
                        raw[key][name] = dict(table)
                except ValueError as exc:
                    raise ConfigError(f"{key}.{name}: {exc}") from None
        elif key == "trunks":
            if not isinstance(value, list):
                raise ConfigError("trunks: expected an array of tables ([[trunks]])")
            raw["trunks"] = value
        elif key == "tool":
            if not isinstance(value, list):
                raise ConfigError("tool: expected an array of tables ([[tool]])")
            raw["tool"] = value
        elif isinstance(value, dict) and key in SCHEMA and key != "":
            for k, v in value.items():
                raw[key][k] = _check(key, k, v)
        else:
            raw[key] = _check("", key, value)


# TRUNKLINE_* variables that are not settings: the cell index (and, behind NAT, the address
# its RTP binds) a supervisor gives each cell process, and where the tests find ../shared.
NOT_SETTINGS = {"TRUNKLINE_CELL", "TRUNKLINE_CELL_RTP_HOST", "TRUNKLINE_SHARED", "TRUNKLINE_RECORDING_KEYS"}


def _env_overrides(raw: dict, environ: dict[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith("TRUNKLINE_") or name in NOT_SETTINGS or name == raw["recordings"]["key_env"]:
            continue
        rest = name[len("TRUNKLINE_"):].lower()
        if rest in SCHEMA[""]:
            raw[rest] = _check("", rest, value)
            continue
        section, _, key = rest.partition("_")
        if section in SCHEMA and section and key:
            if key not in SCHEMA[section]:
                raise ConfigError(f"{name}: unknown setting {section}.{key}")
            raw[section][key] = _check(section, key, value)
        else:
            raise ConfigError(f"{name}: unknown setting")


def load(path: str | None = None, overrides: dict[str, Any] | None = None,
         environ: dict[str, str] | None = None) -> Config:
    """``overrides`` maps 'section.key' (or 'key') to values from CLI flags."""
    raw = copy.deepcopy(DEFAULTS)
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
        _merge_file(raw, data)
    _env_overrides(raw, dict(os.environ if environ is None else environ))
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.rpartition(".")
        if section:
            raw[section][key] = _check(section, key, value)
        else:
            raw[key] = _check("", key, value)
    for c in raw["sip"]["codecs"]:
        if c.upper() not in CODEC_IDS:
            raise ConfigError(f"sip.codecs: unknown codec {c!r} (known: {', '.join(CODEC_IDS)})")
    trunks = [_trunk(i, t) for i, t in enumerate(raw["trunks"])]
    transports = {t.name: raw["trunks"][i].get("transport", "udp") for i, t in enumerate(trunks)}
    srtp = {t.name: raw["trunks"][i].get("srtp", "off") for i, t in enumerate(trunks)}
    trunk_codecs = {t.name: _trunk_codecs(raw["trunks"][i].get("codecs", [])) for i, t in enumerate(trunks)}
    if raw["sip"]["trusted_proxies"]:
        # A SIP front (Kamailio) checks the trunks' source addresses; the cell trusts the front.
        trunks.append(Trunk(name="proxy", allow=list(raw["sip"]["trusted_proxies"])))
    names = [t.name for t in trunks]
    if len(set(names)) != len(names):
        raise ConfigError("trunks: names must be unique")
    m = raw["models"]
    for key, is_dir in (("stt", True), ("llm", False), ("tts", False), ("tts_config", False)):
        if m[key] and not os.path.exists(os.path.expanduser(m[key])):
            raise ConfigError(f"models.{key}: {m[key]} does not exist")
        if m[key] and is_dir and not os.path.isdir(os.path.expanduser(m[key])):
            raise ConfigError(f"models.{key}: {m[key]} is not a CTranslate2 model directory")
    if m["llm_backend"] == "openai" and not (m["llm_url"] and m["llm_model"]):
        raise ConfigError("models.llm_url: the openai backend needs llm_url and llm_model")
    _check_jitter(raw["media"])
    if 0 < m["llm_url_context"] < 256:
        raise ConfigError(f"models.llm_url_context: expected 0 (send everything) or at least 256 tokens, "
                          f"got {m['llm_url_context']}")
    _check_outbound(raw, m)
    if raw["http"]["ops_listen"]:
        try:
            _hostport(raw["http"]["ops_listen"])
        except TypeError as exc:
            raise ConfigError(f"http.ops_listen: {exc}") from None
    _check_tls(raw["http"])
    from bridge.core.siptls import check as _check_sip_tls
    try:
        _check_sip_tls(raw["sip"], transports)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if raw["app"]["name"] == "playback" and not raw["app"]["prompt"]:
        raise ConfigError("app.prompt: required for the playback app")
    from bridge.core.keys import KeyRingError, configured_keyring
    try:      # recording keys: a missing or bad key stops the start, never a call
        configured_keyring(raw["recordings"], os.environ if environ is None else environ)
    except KeyRingError as exc:
        raise ConfigError(f"recordings.{exc}" if str(exc).split(":")[0] in ("key_file", "current_key")
                          else f"recordings: {exc}") from None
    from bridge.core.keys import configure_records
    configure_records(raw["data_dir"], raw["recordings"], raw["records"], environ)   # how records are sealed
    if raw["records"]["require_keys"] and not (raw["recordings"]["key_file"] or (
            raw["recordings"]["key_env"] and (os.environ if environ is None else environ).get(
                raw["recordings"]["key_env"]))):
        raise ConfigError("records.require_keys: no key ring is configured ([recordings] key_file or key_env)")
    t = raw["tools"]
    try:
        toolbox = load_toolbox(raw["tool"], t["secrets_file"], t["file"], environ)
    except ToolConfigError as exc:
        raise ConfigError(str(exc)) from None
    _check_tool_urls(raw, toolbox)
    _check_number_urls(raw)
    _check_profiles(raw, toolbox)
    for name, dest in raw["transfer"]["destinations"].items():      # attended handoffs dial through a trunk
        if dest.get("trunk") and dest["trunk"] not in names:
            raise ConfigError(f"transfer.destinations.{name}.trunk: no trunk called {dest['trunk']!r}")
    return Config(raw, trunks, toolbox, transports, srtp, trunk_codecs)
