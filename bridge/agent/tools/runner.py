"""Runs one tool call against the business's API, carefully.

``ToolRunner.call`` takes what the model chose and returns an ``Outcome``;
it never raises for anything the model, the network or the API does:

1. the arguments are checked (types, ranges, enums, formats such as E.164)
   after the bound ones are filled from the call — a bad call goes back to
   the model as an error, the API never sees it; so does an id argument
   whose value no tool result and no caller words of this call vouch for
   (``provenance``: the model may not make ids up);
2. quotas (per phone call, per tool per call, per tool per minute) and the
   tool's circuit breaker are consulted;
3. the request is sent with a per-attempt timeout, retried with exponential
   backoff and full jitter on connection errors, timeouts and 5xx, after
   ``Retry-After`` on 429, never on other 4xx; every attempt of one call
   carries the same idempotency key;
4. the response is mapped (``mapping.map_result``) and an audit record is
   made: sanitized request and response, outcome, timing, call id.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from bridge.core.guarded_http import RedirectRefused, RefusedConnection, guarded_session
from bridge.core.netguard import DEFAULT as DEFAULT_POLICY, Policy
from bridge.core.schema import SchemaError, validate
from bridge.agent.tools.breaker import CLOSED, STATE_NAMES, Breaker, RateWindow, backoff, retry_after
from bridge.agent.tools.mapping import map_result
from bridge.agent.tools.provenance import Evidence, unvouched
from bridge.core.toolspec import PLACEHOLDER, ToolBox, ToolSpec
from bridge.agent.tools.template import MissingValue, UnsafeValue, args_hash, lookup, render, render_url
from sip.uri import user_part

log = logging.getLogger("trunkline.tools")

MAX_BODY = 256 * 1024
# Failures that say the API is unwell (they open the breaker); a 4xx answer is the API working.
BREAKER_KINDS = {"connect", "timeout", "server_error", "rate_limited", "bad_response"}


@dataclass
class CallContext:
    """One phone call's view of the tools: its identity and how much it has used."""
    call_id: str
    from_uri: str = ""
    to_uri: str = ""
    used: dict[str, int] = field(default_factory=dict)
    total: int = 0
    evidence: Evidence = field(default_factory=Evidence)   # what tool results and the caller have shown
    context: dict = field(default_factory=dict)    # the call's context ({context.NAME}): SIP headers, ...

    def values(self) -> dict:
        return {"id": self.call_id, "from": user_part(self.from_uri), "to": user_part(self.to_uri),
                "from_uri": self.from_uri, "to_uri": self.to_uri}


@dataclass
class Outcome:
    tool: str
    tool_call_id: str
    status: str                      # ok | accepted | invalid | rejected | error | unavailable | quota
    message: str                     # one line for the model (and the logs)
    result: dict | None = None       # mapped response, what the model sees
    kind: str | None = None          # error kind: invalid_args, timeout, connect, server_error, ...
    say: str | None = None           # a line to speak as is (the tool's `say` template), or None
    http_status: int | None = None
    attempts: int = 0
    seconds: float = 0.0
    audit: dict = field(default_factory=dict)

    def for_model(self) -> str:
        """The tool message the model reads."""
        if self.status in ("ok", "accepted"):
            return json.dumps({"status": self.status, **(self.result or {})}, separators=(",", ":"))
        return json.dumps({"status": "error", "error": self.message}, separators=(",", ":"))


def _mask_secrets(text: str, values: list[str]) -> str:
    for v in values:
        if v and len(v) >= 4:
            text = text.replace(v, "***")
    return text


class ToolRunner:
    def __init__(self, box: ToolBox, settings: dict, metrics=None, *, callback_base: str = "",
                 mask: Callable[[Any], Any] = lambda v: v, rand: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic, guard: Policy = DEFAULT_POLICY):
        self.box = box
        self.guard = guard               # the SSRF guard: where tool requests may connect
        self.settings = settings
        self.metrics = metrics
        self.callback_base = callback_base.rstrip("/")
        self.mask = mask
        self.rand = rand
        self.clock = clock
        self.breakers = {n: Breaker(settings["breaker_failures"], settings["breaker_cooldown"]) for n in box.tools}
        self.windows = {n: RateWindow(s.per_minute) for n, s in box.tools.items()}
        self.http: aiohttp.ClientSession | None = None
        self.key = secrets.token_bytes(32)                 # signs async-result callback URLs
        self.pending: dict[str, tuple[str, str, float]] = {}   # tool_call_id -> (call_id, tool, expires)
        for name in box.tools:
            self._breaker_metric(name)

    @property
    def specs(self) -> dict[str, ToolSpec]:
        return self.box.tools

    async def start(self) -> None:
        if self.http is None:
            self.http = guarded_session(self.guard, metric=getattr(self.metrics, "outbound_refused", None),
                                        use="tool", limit=32, headers={"User-Agent": "Trunkline"})

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None

    # -- async results ------------------------------------------------------
    def token(self, call_id: str, tool_call_id: str) -> str:
        return hmac.new(self.key, f"{call_id}/{tool_call_id}".encode(), hashlib.sha256).hexdigest()[:32]

    def callback_url(self, call_id: str, tool_call_id: str) -> str:
        return (f"{self.callback_base}/v1/calls/{call_id}/tool-results/{tool_call_id}"
                f"?sig={self.token(call_id, tool_call_id)}")

    def signed(self, call_id: str, tool_call_id: str, token: str) -> bool:
        """Whether ``token`` is this runner's signature for that callback URL (constant time)."""
        try:
            return hmac.compare_digest(token.encode(), self.token(call_id, tool_call_id).encode())
        except (UnicodeEncodeError, TypeError):
            return False

    def take_pending(self, call_id: str, tool_call_id: str, token: str) -> str | None:
        """The tool an async result belongs to, once; None if unknown, expired or forged."""
        if not self.signed(call_id, tool_call_id, token):
            return None
        entry = self.pending.get(tool_call_id)
        if entry is None or entry[0] != call_id or entry[2] < self.clock():
            return None
        del self.pending[tool_call_id]
        return entry[1]

    def forget_call(self, call_id: str) -> None:
        for k in [k for k, v in self.pending.items() if v[0] == call_id]:
            del self.pending[k]

    # -- metrics ------------------------------------------------------------
    def _breaker_metric(self, tool: str) -> None:
        if self.metrics is not None:
            self.metrics.tool_breaker.labels(tool).set(self.breakers[tool].state)

    def _count(self, o: Outcome) -> None:
        m = self.metrics
        if m is None:
            return
        m.tool_calls.labels(o.tool, o.status).inc()
        if o.kind:
            m.tool_errors.labels(o.tool, o.kind).inc()
        if o.attempts:
            m.tool_latency.labels(o.tool).observe(o.seconds)
        if o.attempts > 1:
            m.tool_retries.labels(o.tool).inc(o.attempts - 1)
        self._breaker_metric(o.tool)

    # -- the call -------------------------------------------------------------
    async def call(self, ctx: CallContext, name: str, args: Any, tool_call_id: str | None = None) -> Outcome:
        tool_call_id = tool_call_id or "tc_" + secrets.token_hex(6)
        started = self.clock()
        spec = self.box.tools.get(name)
        if spec is None:
            o = Outcome(name, tool_call_id, "invalid", f"there is no tool called {name!r}", kind="invalid_args")
            o.audit = self._audit(ctx, o, {}, None)
            return o
        o = await self._call(ctx, spec, args, tool_call_id)
        if o.status in ("ok", "accepted") and o.result:
            ctx.evidence.tool_result(o.result)        # ids the next tool call may use
        o.seconds = round(self.clock() - started, 3)
        o.audit = self._audit(ctx, o, o.audit.get("args", {}), o.audit.get("request"))
        self._count(o)
        event = {"tool": o.tool, "status": o.status, "kind": o.kind, "http": o.http_status,
                 "attempts": o.attempts, "seconds": o.seconds}
        log.info("tool %s", name, extra={"fields": {"event": "tool_called", "call_id": ctx.call_id, **event}})
        return o

    def _invalid(self, spec: ToolSpec, tcid: str, msg: str, args: dict) -> Outcome:
        return Outcome(spec.name, tcid, "invalid", msg, kind="invalid_args", audit={"args": args})

    async def _call(self, ctx: CallContext, spec: ToolSpec, args: Any, tcid: str) -> Outcome:
        if not isinstance(args, dict):
            return self._invalid(spec, tcid, "the arguments must be a JSON object", {})
        call_values = ctx.values()
        context = getattr(ctx, "context", None) or {}
        # a bound argument is never the model's: what it sent for one is dropped, and a bound
        # context value the call does not have makes the call invalid (never a model's guess)
        args = {k: v for k, v in args.items() if k not in spec.bind}
        missing = [src for src in spec.bind.values()
                   if src.startswith("context.") and src.split(".", 1)[1] not in context]
        if missing:
            return self._invalid(spec, tcid, f"this call has no {missing[0]}", args)
        args = {**args, **{k: call_values[src.split(".", 1)[1]] for k, src in spec.bind.items()
                           if src.startswith("call.")},
                **{k: context[src.split(".", 1)[1]] for k, src in spec.bind.items()
                   if src.startswith("context.")}}
        try:
            validate(args, spec.parameters)
        except SchemaError as exc:
            field_name = exc.field.removeprefix("body.") if exc.field != "body" else "arguments"
            return self._invalid(spec, tcid, f"invalid argument {field_name}: {exc.message}", args)
        # Carrier headers (the call's context) vouch for nothing: X- headers often pass through from
        # upstream parties, so a header value must never stand in for a tool's result or the caller.
        refusal = unvouched(spec.parameters, spec.bind, args, ctx.evidence)
        if refusal is not None:
            return Outcome(spec.name, tcid, "invalid", refusal, kind="unverified_id", audit={"args": args})
        now = self.clock()
        s = self.settings
        if ctx.total >= s["max_per_call"] or ctx.used.get(spec.name, 0) >= spec.per_call:
            return Outcome(spec.name, tcid, "quota", "this call has used this tool as often as allowed",
                           kind="quota", audit={"args": args})
        if not self.windows[spec.name].take(now):
            return Outcome(spec.name, tcid, "quota", "the tool is busy (rate limit reached)", kind="quota",
                           audit={"args": args})
        breaker = self.breakers[spec.name]
        if not breaker.allow(now):
            return Outcome(spec.name, tcid, "unavailable", "the service is unavailable right now",
                           kind="breaker_open", audit={"args": args})
        ctx.total += 1
        ctx.used[spec.name] = ctx.used.get(spec.name, 0) + 1
        values = {"args": args, "call": call_values, "context": ctx.context, "tool_call": {"id": tcid},
                  "args_hash": args_hash(args),
                  "callback_url": self.callback_url(ctx.call_id, tcid)}
        try:
            req = self._request(spec, values, args)
        except MissingValue as exc:
            breaker.release()
            return self._invalid(spec, tcid, f"missing value for {exc.args[0]}", args)
        except UnsafeValue as exc:
            breaker.release()
            return self._invalid(spec, tcid, f"invalid argument: {exc}", args)
        o = await self._send(spec, req, tcid)
        o.audit = {"args": args, "request": {k: v for k, v in req.items() if k != "headers"}}
        if o.kind in BREAKER_KINDS:
            breaker.failure(self.clock())
            if breaker.state != CLOSED:
                log.warning("tool %s: circuit breaker %s after %d failures", spec.name,
                            STATE_NAMES[breaker.state], breaker.failures)
        else:
            breaker.success()
        if o.status == "accepted":
            self.pending[tcid] = (ctx.call_id, spec.name, self.clock() + 3600)
        return o

    def _request(self, spec: ToolSpec, values: dict, args: dict) -> dict:
        url = render_url(spec.url, values)
        used = {p.split(".")[1] for p in _placeholders(spec.url) if p.startswith("args.")}
        if spec.query:
            query = {k: render(v, values) for k, v in spec.query.items()}
        elif spec.method in ("GET", "DELETE"):
            query = {k: _plain(v) for k, v in args.items() if k not in used}
        else:
            query = {}
        body = None
        if spec.method in ("POST", "PUT", "PATCH"):
            if spec.body is None:
                body = {k: v for k, v in args.items() if k not in used}
            else:
                body = {k: _render_value(v, values) for k, v in spec.body.items()}
        headers = {k: render(v, values) for k, v in self.box.secrets.get(spec.name, {}).items()}
        headers.setdefault("Accept", "application/json")
        if spec.idempotency_key:
            headers[spec.idempotency_header] = render(spec.idempotency_key, values)
        return {"method": spec.method, "url": url, "query": query, "body": body, "headers": headers,
                "idempotency_key": headers.get(spec.idempotency_header)}

    async def _send(self, spec: ToolSpec, req: dict, tcid: str) -> Outcome:
        policy = spec.retry
        kind, message, status, data = None, "", None, None
        attempt = 0
        for attempt in range(1, policy.attempts + 1):
            delay = None
            try:
                async with self.http.request(req["method"], req["url"], params=req["query"] or None,
                                             json=req["body"], headers=req["headers"], allow_redirects=False,
                                             timeout=aiohttp.ClientTimeout(total=spec.timeout)) as resp:
                    status = resp.status
                    raw = await resp.content.read(MAX_BODY + 1)
                    ra = resp.headers.get("Retry-After")
            except asyncio.TimeoutError:
                kind, message, status = "timeout", f"no answer within {spec.timeout:g} s", None
            except (RefusedConnection, RedirectRefused):
                kind, message, status = "refused", "the service's address is not allowed", None
                break                                  # asking again will not change the answer
            except aiohttp.ClientError as exc:
                kind, message, status = "connect", f"cannot reach the service ({type(exc).__name__})", None
            else:
                kind = None
                if 300 <= status < 400:
                    kind, message = "refused", "the service answered with a redirect (not followed)"
                    break
                if 200 <= status < 300:
                    if len(raw) > MAX_BODY:
                        kind, message = "bad_response", "the answer was too large"
                        break
                    try:
                        data = json.loads(raw) if raw.strip() else {}
                    except ValueError:
                        kind, message = "bad_response", "the service sent an answer that is not JSON"
                        break
                    break
                if status == 429:
                    kind, message = "rate_limited", "the service is rate limiting us"
                    wait = retry_after(ra, time.time())
                    if wait is not None and wait > policy.max_retry_after:
                        break                         # too long to keep a caller waiting
                    delay = wait
                elif status >= 500:
                    kind, message = "server_error", f"the service failed ({status})"
                else:
                    kind = "rejected"
                    message = spec.errors.get(status) or _error_text(raw, status)
                    break
            if attempt < policy.attempts:
                if delay is None:
                    delay = backoff(attempt - 1, policy.base_delay, policy.max_delay, self.rand())
                await asyncio.sleep(delay)
        if kind is not None:
            say = None
            if status in spec.errors:
                message = say = spec.errors[status]       # the operator's words for this answer
            return Outcome(spec.name, tcid, "rejected" if kind == "rejected" else "error", self.mask(message),
                           kind=kind, http_status=status, attempts=attempt, say=say)
        result = map_result(data, spec.result)
        accepted = status in spec.accepted
        say_t = spec.accepted_say if accepted else spec.say
        say = None
        if say_t:
            try:
                say = render(say_t, result)
            except MissingValue:
                say = None                            # the template does not fit this answer: the model speaks
        return Outcome(spec.name, tcid, "accepted" if accepted else "ok",
                       "accepted; the result will follow" if accepted else "done",
                       result=result, say=say, http_status=status, attempts=attempt)

    def map_async(self, tool: str, data: Any) -> tuple[dict, str | None]:
        """An async result, mapped like a normal answer, and the line to speak for it."""
        spec = self.box.tools[tool]
        result = map_result(data, spec.result)
        say = None
        if spec.result_say:
            try:
                say = render(spec.result_say, result)
            except MissingValue:
                pass
        return result, say

    def _audit(self, ctx: CallContext, o: Outcome, args: dict, request: dict | None) -> dict:
        hide = [v for h in self.box.secrets.values() for v in h.values()]
        rec = {"tool_call_id": o.tool_call_id, "tool": o.tool, "call_id": ctx.call_id, "at": round(time.time(), 3),
               "args": self.mask(json.loads(_mask_secrets(json.dumps(args), hide))),
               "status": o.status, "kind": o.kind, "http_status": o.http_status, "attempts": o.attempts,
               "seconds": o.seconds, "message": o.message, "result": self.mask(o.result)}
        if request is not None:
            rec["request"] = self.mask(json.loads(_mask_secrets(json.dumps(request), hide)))
        return rec


def _placeholders(template: str) -> list[str]:
    return PLACEHOLDER.findall(template)


def _plain(v: Any) -> str:
    return "true" if v is True else "false" if v is False else str(v)


def _render_value(v: Any, values: dict) -> Any:
    """A body template value: ``"{args.amount}"`` alone keeps its JSON type; strings are filled in."""
    if isinstance(v, str):
        found = _placeholders(v)
        if len(found) == 1 and v == "{" + found[0] + "}":
            return lookup(values, found[0])
        return render(v, values)
    return v


def _error_text(raw: bytes, status: int) -> str:
    """A 4xx body's own message, if it has a short one."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    msg = None
    if isinstance(data, dict):
        err = data.get("error")
        msg = (err.get("message") if isinstance(err, dict) else err) or data.get("message") or data.get("detail")
    if isinstance(msg, str) and msg.strip():
        return f"the service refused: {msg.strip()[:160]}"
    return f"the service refused the request ({status})"
