"""Agent profiles and languages: who the agent is on a number, and which models hear and speak it.

A profile (``[profiles.NAME]``, or the same fields inline on a number route) overrides the
``[agent]`` settings for the calls it answers::

    [profiles.sales]
    system_prompt = "You sell solar panels. The caller is customer {context.x_customer_id}."
    greeting = "Solar sales, how can I help?"
    voice = "/models/en_US-amy-medium.onnx"        # a Piper voice (its .onnx.json beside it)
    language = "en"                                # [agent] language, or a [languages.xx] table
    tools = ["lookup_invoices"]                    # a subset of the [[tool]]s (default: all)
    transfer = ["sales_desk"]                      # transfer destinations by name

A language (``[languages.xx]``) names the models for it: ``stt_model`` (a faster-whisper
CTranslate2 directory) and ``tts_voice`` (a Piper ``.onnx``; ``tts_config`` defaults to the
file beside it). The ``[agent] language`` without a table uses ``[models]``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

PROFILE_KEYS = ("system_prompt", "greeting", "voice", "language", "tools", "transfer")
LANGUAGE_KEYS = ("stt_model", "tts_voice", "tts_config", "backchannels", "interrupt_words", "short_prompt")
WORD_LISTS = ("backchannels", "interrupt_words")
CODE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")
PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_TEXT = 8192


@dataclass(frozen=True)
class Profile:
    """What a profile sets; ``None`` (or empty) leaves the ``[agent]`` setting as it is."""
    system_prompt: str | None = None
    greeting: str | None = None
    voice: str = ""
    language: str = ""
    tools: tuple[str, ...] | None = None
    transfer: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        out: dict[str, Any] = {}
        for k in PROFILE_KEYS:
            v = getattr(self, k)
            if v is None or v == "" or v == ():
                continue
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    def over(self, base: "Profile") -> "Profile":
        """This profile's settings over ``base``'s (inline fields over a named profile)."""
        return Profile(*(getattr(self, k) if getattr(self, k) not in (None, "", ()) else getattr(base, k)
                         for k in PROFILE_KEYS))


@dataclass(frozen=True)
class Language:
    code: str
    stt_model: str = ""          # "" : [models] stt
    tts_voice: str = ""          # "" : [models] tts
    tts_config: str = ""
    backchannels: tuple[str, ...] | None = None      # None: the language's defaults (bridge/agent/bargein.py)
    interrupt_words: tuple[str, ...] | None = None
    short_prompt: str | None = None

    def short_words(self) -> dict:
        """What reads a short utterance over the agent in this language (what is set of it)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k in (*WORD_LISTS, "short_prompt")
                if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class Routing:
    """The models of one call: a whisper directory and language, a Piper voice and its config
    (empty strings: the inference process's defaults)."""
    stt_model: str = ""
    language: str = ""
    tts_voice: str = ""
    tts_config: str = ""


def _names(v: Any, key: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v) or len(v) > 100:
        raise ValueError(f"{key}: expected a list of names")
    return tuple(v)


def parse_profile(value: Any, extra: tuple[str, ...] = ()) -> Profile:
    """A profile from a TOML table or a JSON body; ``ValueError`` names the key. Keys in
    ``extra`` (a route's ``app``, ``profile``) are skipped."""
    if not isinstance(value, dict):
        raise ValueError("expected a table of " + ", ".join(PROFILE_KEYS))
    out: dict[str, Any] = {}
    for k, v in value.items():
        if k in extra:
            continue
        if k not in PROFILE_KEYS:
            raise ValueError(f"{k}: unknown key (known: {', '.join(PROFILE_KEYS)})")
        if k in ("tools", "transfer"):
            out[k] = _names(v, k)
        elif not isinstance(v, str) or len(v) > MAX_TEXT:
            raise ValueError(f"{k}: expected a string of at most {MAX_TEXT} characters")
        elif k == "language" and not CODE.match(v):
            raise ValueError(f"language: expected a language code like en or pt-BR, got {v!r}")
        else:
            out[k] = v
    return Profile(**out)


def parse_language(code: str, value: Any) -> Language:
    if not CODE.match(code):
        raise ValueError(f"expected a language code like en or pt-BR, got {code!r}")
    if not isinstance(value, dict):
        raise ValueError("expected a table of " + ", ".join(LANGUAGE_KEYS))
    words: dict[str, Any] = {}
    for k, v in value.items():
        if k not in LANGUAGE_KEYS:
            raise ValueError(f"{k}: unknown key (known: {', '.join(LANGUAGE_KEYS)})")
        if k in WORD_LISTS:
            if not isinstance(v, list) or len(v) > 200 or not all(isinstance(x, str) and 0 < len(x) <= 64 for x in v):
                raise ValueError(f"{k}: expected a list of at most 200 words or short phrases")
            words[k] = tuple(v)
        elif k == "short_prompt":
            if not isinstance(v, str) or len(v) > 200:
                raise ValueError(f"{k}: expected a string of at most 200 characters")
            words[k] = v
        elif not isinstance(v, str):
            raise ValueError(f"{k}: expected a path")
    return Language(code, value.get("stt_model", ""), value.get("tts_voice", ""), value.get("tts_config", ""),
                    **words)


def voice_config(voice: str, config: str = "") -> str:
    return config or voice + ".json"


def check_language_files(lang: Language) -> None:
    """The language's model files exist (``ValueError`` names the key)."""
    if lang.stt_model and not os.path.isdir(os.path.expanduser(lang.stt_model)):
        raise ValueError(f"stt_model: {lang.stt_model} is not a CTranslate2 model directory")
    if lang.tts_voice:
        check_voice(lang.tts_voice, lang.tts_config, "tts_voice")


def check_voice(voice: str, config: str = "", key: str = "voice") -> None:
    if not os.path.isfile(os.path.expanduser(voice)):
        raise ValueError(f"{key}: {voice} does not exist")
    if not os.path.isfile(os.path.expanduser(voice_config(voice, config))):
        raise ValueError(f"{key}: the voice's config {voice_config(voice, config)} does not exist")


def routing(profile: Profile, default_language: str, languages: dict[str, Language],
            language: str = "") -> tuple[Routing, str]:
    """The call's models: the call's ``language`` (the API), else the profile's, else the
    ``[agent]`` one, through ``languages``; the profile's voice over the language's. Returns the
    routing and a reason when the wanted language is not configured (the defaults are used)."""
    code = language or profile.language or default_language
    why = ""
    lang = languages.get(code)
    if lang is None:
        if code != default_language:
            why = f"language {code!r} is not configured ([languages.{code}])"
        lang = languages.get(default_language) or Language(default_language)
        code = lang.code
    voice, cfg = (profile.voice, "") if profile.voice else (lang.tts_voice, lang.tts_config)
    return Routing(lang.stt_model, code, voice, voice_config(voice, cfg) if voice else ""), why


@dataclass
class Catalog:
    """The configured profiles and languages (``Config.raw["profiles"]`` / ``["languages"]``)."""
    profiles: dict[str, Profile] = field(default_factory=dict)
    languages: dict[str, Language] = field(default_factory=dict)

    @classmethod
    def of(cls, raw: dict) -> "Catalog":
        """From the config's checked tables (plain dicts, so ``config show`` prints them)."""
        return cls({n: parse_profile(p) for n, p in (raw.get("profiles") or {}).items()},
                   {c: parse_language(c, v) for c, v in (raw.get("languages") or {}).items()})
