"""Tool declarations: what the operator writes, checked once at start.

A tool is one REST operation on the business's own API::

    [[tool]]
    name = "lookup_invoices"
    description = "Find the caller's open invoices"
    method = "GET"
    url = "https://billing.example.com/v1/invoices"
    query = { phone = "{call.from}", status = "open" }
    headers = { Authorization = "Bearer ${secret:billing_token}" }
    result = { path = "invoices", fields = { number = "number", amount_due = "amount" }, max_items = 3 }

Secrets (``${env:NAME}``, ``${secret:NAME}``) are allowed in headers only and
are resolved here, into a separate mapping that nothing prints: the spec keeps
the template, so audits, logs and ``repr`` show ``${secret:billing_token}``.
Every error names the tool and key, e.g. ``tool[lookup_invoices].timeout:
expected a number 0.1..10``.
"""
from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from bridge.core.schema import FORMATS

NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
SECRET = re.compile(r"\$\{(env|secret):([A-Za-z_][A-Za-z0-9_.-]*)\}")
PLACEHOLDER = re.compile(r"\{([a-z_]+(?:\.[A-Za-z0-9_]+|\[[0-9]+\])*)\}")
CONTEXT = {"call.id", "call.from", "call.to", "call.from_uri", "call.to_uri", "tool_call.id", "args_hash",
           "callback_url"}
CALL_CONTEXT = re.compile(r"context\.[A-Za-z0-9_]+")     # a per-call context value (SIP headers: x_customer_id)
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
ERROR_KINDS = ("connect", "timeout", "server_error", "rate_limited", "bad_response", "rejected")
MAX_TIMEOUT = 10.0
ID_SOURCES = ("tool", "caller", "tool|caller", "caller|tool", "model")   # a parameter's "x-source" (agent provenance)


class ToolConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3              # total tries, the first included
    base_delay: float = 0.2        # backoff: base * 2**n, full jitter, capped
    max_delay: float = 2.0
    max_retry_after: float = 5.0   # a 429's Retry-After longer than this is not waited for


@dataclass(frozen=True)
class ResultMap:
    path: str = ""                 # where the interesting part of the response is ("" = all of it)
    fields: dict = field(default_factory=dict)   # source path -> name shown to the model (allow-list)
    max_items: int = 3             # lists are cut to this many, and a count is added
    codes: dict = field(default_factory=dict)    # field -> {code: words}
    drop: tuple = ()               # extra key names to strip when no allow-list is given


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict
    method: str
    url: str
    query: dict = field(default_factory=dict)
    body: Any = None               # None: the arguments as JSON (POST/PUT/PATCH); or a template table
    headers: dict = field(default_factory=dict)       # templates; secrets resolved separately
    bind: dict = field(default_factory=dict)          # argument -> context value the model never sets
    timeout: float = 5.0
    retry: RetryPolicy = RetryPolicy()
    idempotency_key: str = ""      # template, e.g. "{call.id}-{args_hash}"
    idempotency_header: str = "Idempotency-Key"
    result: ResultMap = ResultMap()
    say: str = ""                  # template spoken with the mapped result instead of asking the model
    errors: dict = field(default_factory=dict)        # HTTP status -> words for the model and caller
    accepted: tuple = ()           # statuses that mean "accepted, the result comes later" (async)
    accepted_say: str = ""
    result_say: str = ""           # spoken when an async result arrives
    per_call: int = 3              # calls of this tool allowed per phone call
    per_minute: int = 60           # calls of this tool per minute, whole cell
    filler: bool = True            # say the filler line if the API is slow
    examples: tuple = ()           # things a caller might say for this tool (helps pick it)

    def model_parameters(self) -> dict:
        """The JSON Schema the model sees: bound arguments are not the model's to choose."""
        props = {k: v for k, v in self.parameters.get("properties", {}).items() if k not in self.bind}
        out = {"type": "object", "properties": props, "additionalProperties": False}
        req = [k for k in self.parameters.get("required", []) if k not in self.bind]
        if req:
            out["required"] = req
        return out


@dataclass
class ToolBox:
    tools: dict[str, ToolSpec]
    secrets: dict[str, dict[str, str]]     # tool -> header -> resolved value (never printed)

    def __repr__(self) -> str:            # the secrets are not for logs
        return f"ToolBox(tools={list(self.tools)})"


def _num(where: str, v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ToolConfigError(f"{where}: expected a number {lo}..{hi}, got {v!r}")
    return float(v)


def _int(where: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ToolConfigError(f"{where}: expected an integer {lo}..{hi}, got {v!r}")
    return v


def _text(where: str, v: Any, required: bool = False) -> str:
    if not isinstance(v, str) or (required and not v.strip()):
        raise ToolConfigError(f"{where}: expected {'a non-empty' if required else 'a'} string, got {v!r}")
    return v


def _table(where: str, v: Any) -> dict:
    if not isinstance(v, dict):
        raise ToolConfigError(f"{where}: expected a table, got {v!r}")
    return v


def _placeholders(where: str, template: str, args: set[str]) -> None:
    if SECRET.search(template) and ".headers." not in where:
        raise ToolConfigError(f"{where}: secrets (${{env:..}}/${{secret:..}}) are only allowed in headers")
    for name in PLACEHOLDER.findall(SECRET.sub("", template)):
        if name.startswith("args."):
            if name.split(".")[1].split("[")[0] not in args:
                raise ToolConfigError(f"{where}: {{{name}}} is not a parameter of this tool")
        elif name not in CONTEXT and not name.startswith("result") and not CALL_CONTEXT.fullmatch(name):
            raise ToolConfigError(f"{where}: unknown placeholder {{{name}}} "
                                  f"(use args.NAME or one of {', '.join(sorted(CONTEXT))})")


def _check_schema(where: str, schema: Any) -> dict:
    schema = _table(where, schema)
    if schema.get("type", "object") != "object":
        raise ToolConfigError(f"{where}: the parameters must be a JSON Schema object")
    props = _table(f"{where}.properties", schema.get("properties", {}))
    for name, sub in props.items():
        w = f"{where}.properties.{name}"
        sub = _table(w, sub)
        t = sub.get("type")
        if t not in ("string", "integer", "number", "boolean"):
            raise ToolConfigError(f"{w}.type: expected string, integer, number or boolean, got {t!r}")
        if "format" in sub and sub["format"] not in FORMATS:
            raise ToolConfigError(f"{w}.format: unknown format {sub['format']!r} (known: {', '.join(FORMATS)})")
        if sub.get("x-source", "model") not in ID_SOURCES:
            raise ToolConfigError(f"{w}.x-source: expected one of {', '.join(ID_SOURCES)}, got {sub['x-source']!r}")
        if "enum" in sub and (not isinstance(sub["enum"], list) or not sub["enum"]):
            raise ToolConfigError(f"{w}.enum: expected a non-empty list")
        if "pattern" in sub:
            try:
                re.compile(sub["pattern"])
            except re.error as exc:
                raise ToolConfigError(f"{w}.pattern: not a regular expression ({exc})") from None
    for r in schema.get("required", []):
        if r not in props:
            raise ToolConfigError(f"{where}.required: {r!r} is not a property")
    return {"type": "object", "properties": props, "required": list(schema.get("required", [])),
            "additionalProperties": False}


def parse_tool(i: int, t: Any, secrets: dict[str, str], environ: dict[str, str]) -> tuple[ToolSpec, dict]:
    t = _table(f"tool[{i}]", t)
    name = t.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ToolConfigError(f"tool[{i}].name: expected lower_snake_case (a-z, 0-9, _), got {name!r}")
    w = f"tool[{name}]"
    known = set(ToolSpec.__dataclass_fields__) | {"async"}
    for k in t:
        if k not in known:
            raise ToolConfigError(f"{w}.{k}: unknown key")
    params = _check_schema(f"{w}.parameters", t.get("parameters", {"type": "object", "properties": {}}))
    args = set(params["properties"])
    method = _text(f"{w}.method", t.get("method", "GET")).upper()
    if method not in METHODS:
        raise ToolConfigError(f"{w}.method: expected one of {', '.join(METHODS)}, got {method!r}")
    url = _text(f"{w}.url", t.get("url"), required=True)
    if not re.match(r"^https?://", url):
        raise ToolConfigError(f"{w}.url: expected an http:// or https:// URL template, got {url!r}")
    _placeholders(f"{w}.url", url, args)
    query = {k: _text(f"{w}.query.{k}", v) for k, v in _table(f"{w}.query", t.get("query", {})).items()}
    for k, v in query.items():
        _placeholders(f"{w}.query.{k}", v, args)
    body = t.get("body")
    if body is not None:
        body = _table(f"{w}.body", body)
        for k, v in body.items():
            if isinstance(v, str):
                _placeholders(f"{w}.body.{k}", v, args)
    headers = {k: _text(f"{w}.headers.{k}", v) for k, v in _table(f"{w}.headers", t.get("headers", {})).items()}
    resolved: dict[str, str] = {}
    for k, v in headers.items():
        _placeholders(f"{w}.headers.{k}", v, args)

        def sub(m: re.Match, k=k) -> str:
            src, key = m.group(1), m.group(2)
            pool = environ if src == "env" else secrets
            if key not in pool:
                where = "environment variable" if src == "env" else "secret in tools.secrets_file"
                raise ToolConfigError(f"{w}.headers.{k}: {where} {key} is not set")
            return pool[key]
        resolved[k] = SECRET.sub(sub, v)
    bind = {k: _text(f"{w}.bind.{k}", v) for k, v in _table(f"{w}.bind", t.get("bind", {})).items()}
    for k, v in bind.items():
        if k not in args:
            raise ToolConfigError(f"{w}.bind.{k}: not a parameter of this tool")
        if v not in CONTEXT and not CALL_CONTEXT.fullmatch(v):
            raise ToolConfigError(f"{w}.bind.{k}: expected one of {', '.join(sorted(CONTEXT))} or "
                                  f"context.NAME, got {v!r}")
    timeout = _num(f"{w}.timeout", t.get("timeout", 5.0), 0.1, MAX_TIMEOUT)
    idem = _text(f"{w}.idempotency_key", t.get("idempotency_key", ""))
    if idem:
        _placeholders(f"{w}.idempotency_key", idem, args)
    r = _table(f"{w}.retry", t.get("retry", {}))
    for k in r:
        if k not in RetryPolicy.__dataclass_fields__:
            raise ToolConfigError(f"{w}.retry.{k}: unknown key")
    # Retrying a request that changes something is only safe with an idempotency key.
    default_attempts = 3 if method == "GET" or idem else 1
    retry = RetryPolicy(attempts=_int(f"{w}.retry.attempts", r.get("attempts", default_attempts), 1, 6),
                        base_delay=_num(f"{w}.retry.base_delay", r.get("base_delay", 0.2), 0.0, 5.0),
                        max_delay=_num(f"{w}.retry.max_delay", r.get("max_delay", 2.0), 0.0, 10.0),
                        max_retry_after=_num(f"{w}.retry.max_retry_after", r.get("max_retry_after", 5.0), 0, 30))
    if method != "GET" and not idem and retry.attempts > 1:
        raise ToolConfigError(f"{w}.retry.attempts: a {method} is retried only with an idempotency_key "
                              "(a retry could otherwise do it twice)")
    m = _table(f"{w}.result", t.get("result", {}))
    for k in m:
        if k not in ResultMap.__dataclass_fields__:
            raise ToolConfigError(f"{w}.result.{k}: unknown key")
    fields = {k: _text(f"{w}.result.fields.{k}", v) for k, v in _table(f"{w}.result.fields", m.get("fields", {})).items()}
    codes = {k: {str(c): _text(f"{w}.result.codes.{k}.{c}", words) for c, words in _table(f"{w}.result.codes.{k}", v).items()}
             for k, v in _table(f"{w}.result.codes", m.get("codes", {})).items()}
    drop = m.get("drop", [])
    if not isinstance(drop, list) or not all(isinstance(x, str) for x in drop):
        raise ToolConfigError(f"{w}.result.drop: expected a list of key names")
    result = ResultMap(path=_text(f"{w}.result.path", m.get("path", "")), fields=fields,
                       max_items=_int(f"{w}.result.max_items", m.get("max_items", 3), 1, 20), codes=codes,
                       drop=tuple(drop))
    errors = {}
    for code, words in _table(f"{w}.errors", t.get("errors", {})).items():
        if not str(code).isdigit() or not 400 <= int(code) <= 599:
            raise ToolConfigError(f"{w}.errors.{code}: expected an HTTP status 400..599")
        errors[int(code)] = _text(f"{w}.errors.{code}", words)
    a = _table(f"{w}.async", t.get("async", {}))
    for k in a:
        if k not in ("accepted", "say", "result_say"):
            raise ToolConfigError(f"{w}.async.{k}: unknown key (accepted, say, result_say)")
    accepted = a.get("accepted", [202] if a else [])
    if not isinstance(accepted, list) or not all(isinstance(c, int) and 200 <= c < 300 for c in accepted):
        raise ToolConfigError(f"{w}.async.accepted: expected a list of 2xx statuses")
    spec = ToolSpec(
        name=name, description=_text(f"{w}.description", t.get("description"), required=True), parameters=params,
        method=method, url=url, query=query, body=body, headers=headers, bind=bind, timeout=timeout, retry=retry,
        idempotency_key=idem,
        idempotency_header=_text(f"{w}.idempotency_header", t.get("idempotency_header", "Idempotency-Key"), True),
        result=result, say=_text(f"{w}.say", t.get("say", "")), errors=errors, accepted=tuple(accepted),
        accepted_say=_text(f"{w}.async.say", a.get("say", "")),
        result_say=_text(f"{w}.async.result_say", a.get("result_say", "")),
        per_call=_int(f"{w}.per_call", t.get("per_call", 3), 1, 100),
        per_minute=_int(f"{w}.per_minute", t.get("per_minute", 60), 1, 100000),
        filler=bool(t.get("filler", True)), examples=_examples(f"{w}.examples", t.get("examples", [])))
    return spec, resolved


def _examples(where: str, v: Any) -> tuple:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ToolConfigError(f"{where}: expected a list of strings")
    return tuple(v)


def read_secrets(path: str) -> dict[str, str]:
    """A TOML file of ``name = "value"`` lines (mode 0600 recommended)."""
    if not path:
        return {}
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ToolConfigError(f"tools.secrets_file: {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ToolConfigError(f"tools.secrets_file: {path}: not valid TOML ({exc})") from None
    if not all(isinstance(v, str) for v in data.values()):
        raise ToolConfigError(f"tools.secrets_file: {path}: expected name = \"value\" lines")
    return data


def read_tools_file(path: str) -> list:
    """``[[tool]]`` tables from a TOML file, or a JSON list of tools."""
    try:
        raw = open(os.path.expanduser(path), "rb").read()
    except OSError as exc:
        raise ToolConfigError(f"tools.file: {path}: {exc.strerror}") from None
    try:
        if path.endswith(".json"):
            data = json.loads(raw)
            return data if isinstance(data, list) else data.get("tool", [])
        return tomllib.loads(raw.decode()).get("tool", [])
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ToolConfigError(f"tools.file: {path}: cannot be parsed ({exc})") from None


def load_toolbox(tools: list, secrets_file: str = "", tools_file: str = "",
                 environ: dict[str, str] | None = None) -> ToolBox:
    environ = dict(os.environ if environ is None else environ)
    secrets = read_secrets(secrets_file)
    entries = list(tools) + (read_tools_file(tools_file) if tools_file else [])
    specs: dict[str, ToolSpec] = {}
    resolved: dict[str, dict[str, str]] = {}
    for i, t in enumerate(entries):
        spec, headers = parse_tool(i, t, secrets, environ)
        if spec.name in specs:
            raise ToolConfigError(f"tool[{spec.name}]: defined twice")
        specs[spec.name] = spec
        resolved[spec.name] = headers
    return ToolBox(specs, resolved)
