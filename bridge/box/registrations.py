"""The front's trunk registrations (Kamailio ``uac_reg``) as the supervisor sees them.

The supervisor polls Kamailio over its ctl socket (``kamcmd uac.reg_dump`` and the ``uacreg``
htable where the front keeps each registrar's last final answer, see
deploy/kamailio/kamailio.cfg.tmpl) and turns what it reads into one ``RegState`` per trunk:
``trunkline_trunk_registered`` on the box's /metrics and a ``registration`` event on each change
(the same fields as a cell's: trunk, status, reason, registered).

uac_reg's flags: 1 = disabled, 2 = a REGISTER is in progress, 4 = registered; it clears
"registered" while it refreshes, so an in-progress record keeps the state it had. The dump also
carries the digest (HA1) and is never logged.

uac_reg retries a failed registration at one fixed interval; ``Backoff`` decides (no I/O) when
the supervisor holds a failed one back (``uac.reg_disable``) and lets it try again
(``uac.reg_enable``), so the waits grow after each failure in a row.
"""
from __future__ import annotations

import ipaddress
import random
import re
from dataclasses import dataclass
from typing import Callable

from bridge.box.sipaddr import split_address

DISABLED, ONGOING, ONLINE = 1 << 0, 1 << 1, 1 << 2


@dataclass
class RegState:
    """One trunk's registration at the front."""
    trunk: str
    registered: bool = False
    status: int = 0
    reason: str = ""
    known: bool = False           # set once a state was read (the first one is always reported)
    since: float = 0.0            # wall-clock time of the last change (0: not read yet)
    failures: int = 0             # failed attempts in a row (Backoff)
    next_attempt: float = 0.0     # wall-clock time the front may try again while held back (0: not held)


def registrar_net(address: str) -> str:
    """The registrar's address as a /32 (/128) when ``address`` names an IP literal, else ""."""
    host, _ = split_address(address)
    try:
        ip = ipaddress.ip_address(host)           # one address: never a network written as "address"
    except ValueError:
        return ""
    return f"{ip}/{ip.max_prefixlen}"


def _lines(text: str) -> list[str]:
    """Lines split on "\n" only (``str.splitlines`` also splits on form feeds, \x1c-\x1e, \x85 ...)."""
    return text.split("\n")


def parse_structs(text: str) -> list[dict[str, str]]:
    """``kamcmd``'s printout of an array of structs (``{ key: value ... }`` blocks, nested ones
    flattened) as dicts of strings."""
    out: list[dict[str, str]] = []
    cur: dict[str, str] | None = None
    depth = 0
    for line in _lines(text):
        s = line.strip()
        if s == "{":
            depth += 1
            if depth == 1:
                cur = {}
            continue
        if s == "}":
            depth -= 1
            if depth == 0 and cur is not None:
                out.append(cur)
                cur = None
            continue
        m = re.match(r"^([A-Za-z_][\w.]*):\s?(.*)$", s)
        if m and cur is not None:
            cur[m.group(1)] = m.group(2)
    return out


def parse_items(text: str) -> list[dict[str, str]]:
    """Every innermost ``{ name: ... value: ... }`` block of a ``kamcmd`` printout, each on its own
    (``htable.dump`` puts the items of one hash slot side by side in one slot block)."""
    out: list[dict[str, str]] = []
    stack: list[dict[str, str]] = []
    for line in _lines(text):
        s = line.strip()
        if s == "{" or s.endswith(": {"):
            stack.append({})
            continue
        if s == "}":
            if stack:
                d = stack.pop()
                if "name" in d and "value" in d:
                    out.append(d)
            continue
        m = re.match(r"^([A-Za-z_][\w.]*):\s?(.*)$", s)
        if m and stack:
            stack[-1][m.group(1)] = m.group(2)
    return out


SIP_REASONS = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
               407: "Proxy Authentication Required", 408: "Request Timeout", 423: "Interval Too Brief",
               480: "Temporarily Unavailable", 500: "Server Internal Error", 502: "Bad Gateway",
               503: "Service Unavailable", 504: "Server Time-out", 603: "Decline"}


def last_replies(htable_dump: str) -> dict[str, tuple[int, str]]:
    """``htable.dump uacreg``: registrar (From URI) -> (status, reason) of its last final answer.
    The front keeps the status only (no text of the registrar's reaches the supervisor); the reason
    is the standard phrase."""
    out: dict[str, tuple[int, str]] = {}
    for entry in parse_items(htable_dump):
        name, value = entry.get("name", ""), entry.get("value", "").strip()
        if name and re.fullmatch(r"[1-6]\d\d", value):
            status = int(value)
            out[name] = (status, SIP_REASONS.get(status, f"the registrar answered {status}"))
    return out


def read_states(dump: str, replies: dict[str, tuple[int, str]], trunks: dict[str, str],
                previous: dict[str, RegState]) -> dict[str, RegState]:
    """New states from ``uac.reg_dump`` (``dump``) and the registrars' last answers. ``trunks``:
    the registration's id (l_uuid) -> trunk name. A registration in progress keeps its state; a
    failed one reports the registrar's last final answer, or 408 when it did not answer (its last
    answer was a success)."""
    out: dict[str, RegState] = {}
    for rec in parse_structs(dump):
        trunk = trunks.get(rec.get("l_uuid", ""))
        if trunk is None:
            continue
        old = previous.get(trunk, RegState(trunk))
        try:
            flags, left = int(rec.get("flags", "0")), int(rec.get("diff_expires", "0"))
        except ValueError:
            continue
        if flags & ONGOING:             # a REGISTER in flight: nothing new yet
            out[trunk] = old
            continue
        registered = bool(flags & ONLINE) and left > 0
        domain = rec.get("r_domain", "")
        status, reason = replies.get(f"sip:{rec.get('r_username', '')}@{domain}", (0, ""))
        if registered:
            status, reason = (status, reason) if 200 <= status < 300 else (200, "OK")
        elif status == 0 or 200 <= status < 300:
            status, reason = 408, "no answer from the registrar"
        out[trunk] = RegState(trunk, registered, status, reason, True)
    return out


def changed(old: RegState | None, new: RegState) -> bool:
    """A ``registration`` event is due: the first state read, or a different one."""
    return new.known and (old is None or not old.known or (old.registered, old.status) != (new.registered, new.status))


def records(dump: str, trunks: dict[str, str]) -> dict[str, tuple[int, int]]:
    """``uac.reg_dump`` as trunk -> (uac_reg flags, seconds until its timer is due: the refresh
    when registered, its own retry after a failure, 1 right after an enable/disable)."""
    out: dict[str, tuple[int, int]] = {}
    for rec in parse_structs(dump):
        trunk = trunks.get(rec.get("l_uuid", ""))
        try:
            if trunk is not None:
                out[trunk] = (int(rec.get("flags", "0")), int(rec.get("diff_expires", "0")))
        except ValueError:
            continue
    return out


class Backoff:
    """When a failed registration tries again: exponential backoff with jitter (RFC 5626 §4.5),
    per trunk ``(base, cap)`` = (``register_retry``, ``register_retry_max``). After the n-th
    failure in a row the front waits W·U(0.5, 1) s, W = min(cap, base·2^(n-1)); a registration
    resets n. No I/O: ``step`` takes a monotonic ``now`` and ``records``' view of uac_reg and
    returns the commands for the front, ``("disable" | "enable", trunk)``.

    uac_reg marks its own retry right after a failure (its timer due more than 2 s ahead, not
    registered, nothing in flight, not disabled): that failure is counted, the registration is
    disabled and held until its time, then enabled (uac_reg sends on its next timer tick, which
    also makes the timer due in 1 s: never taken for a failure). A front that restarts loads its
    table enabled and registers at once: a hold it no longer has is dropped, the count kept. A
    record disabled by anyone else (an operator's ``uac.reg_disable``) is enabled again: the
    supervisor owns these records."""

    def __init__(self, limits: dict[str, tuple[float, float]], rand: Callable[[], float] = random.random):
        self.limits = limits
        self.failures = {t: 0 for t in limits}
        self.until: dict[str, float] = {}          # trunk -> when its hold ends (monotonic)
        self.rand = rand

    def step(self, now: float, recs: dict[str, tuple[int, int]]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for trunk, (flags, left) in recs.items():
            if trunk not in self.limits or flags & ONGOING:
                continue
            if flags & ONLINE and left > 0:
                self.failures[trunk] = 0
                self.until.pop(trunk, None)
                if flags & DISABLED:                # held just after uac_reg had sent: it must refresh
                    out.append(("enable", trunk))
            elif trunk in self.until:
                if not flags & DISABLED:
                    del self.until[trunk]
                elif now >= self.until[trunk]:
                    del self.until[trunk]
                    out.append(("enable", trunk))
            elif flags & DISABLED:                  # held by no one here: let it try
                out.append(("enable", trunk))
            elif not flags & ONLINE and left > 2:
                n = self.failures[trunk] = self.failures[trunk] + 1
                base, cap = self.limits[trunk]
                wait = min(cap, base * 2 ** min(n - 1, 30))
                self.until[trunk] = now + wait * (0.5 + 0.5 * self.rand())
                out.append(("disable", trunk))
        return out

    def retry_now(self, trunk: str) -> None:
        """An operator asks for a registration now (``POST /v1/registrations/{trunk}/register``):
        no hold, and the count starts over."""
        self.until.pop(trunk, None)
        if trunk in self.failures:
            self.failures[trunk] = 0

    def undo(self, trunk: str) -> None:
        """The front did not take the hold (``step``'s disable failed): uac_reg's own retry stands,
        and the failure is counted again when uac_reg reports its next one."""
        if self.until.pop(trunk, None) is not None:
            self.failures[trunk] = max(0, self.failures[trunk] - 1)

    def retry_in(self, trunk: str, now: float) -> float | None:
        """Seconds until a held registration may try again (None: not held)."""
        until = self.until.get(trunk)
        return None if until is None else max(0.0, until - now)
