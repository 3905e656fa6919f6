"""Carrier headers of an incoming INVITE, parsed from its raw text (pure, no pjsua2).

What a carrier tells us about a call beyond From/To: ``P-Asserted-Identity`` (the
network-asserted caller), ``Diversion`` (who forwarded the call, newest first),
``Remote-Party-ID`` (the older draft of both) and ``X-*`` headers (whatever the carrier
or an upstream PBX adds: a customer id, a campaign, a queue). All of it is untrusted
input from the network: names must be tokens, values are stripped of control
characters and cut to ``MAX_VALUE`` characters, and at most ``MAX_VALUES`` values are
kept in all (the rest are counted in ``dropped``).

Parsing follows RFC 3261 section 7.3: header names are case-insensitive, a line that
starts with a space or tab continues the previous one (folding), a header may repeat
and a list header may hold several comma-separated values (commas inside quotes or
``<...>`` do not separate). Compact forms are expanded before matching, so ``x:``
(Session-Expires) is never mistaken for an ``X-`` header.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_VALUES = 20          # values kept in all (each Diversion entry counts as one)
MAX_VALUE = 256          # characters kept of one value
MAX_NAME = 64            # characters of an X- header name
MAX_SCAN = 65536         # characters of the message looked at

# RFC 3261 / 3515 / 3892 / 4028 / 3841 / 4474 compact forms
COMPACT = {"i": "call-id", "m": "contact", "e": "content-encoding", "l": "content-length",
           "c": "content-type", "f": "from", "s": "subject", "k": "supported", "t": "to", "v": "via",
           "o": "event", "u": "allow-events", "r": "refer-to", "b": "referred-by", "x": "session-expires",
           "a": "accept-contact", "j": "reject-contact", "d": "request-disposition", "y": "identity",
           "n": "identity-info"}
# the identity headers we keep (lower-case name -> the spelling we show); all are lists
IDENTITY = {"p-asserted-identity": "P-Asserted-Identity", "diversion": "Diversion",
            "remote-party-id": "Remote-Party-ID"}
_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")   # C0, DEL, C1; lone surrogates (undecodable bytes)
_URI_USER = re.compile(r"^(?:sips?|tel):([^@;>?]+)", re.I)


@dataclass
class CarrierHeaders:
    """The kept headers: canonical name -> values, in the order received."""
    values: dict[str, list[str]] = field(default_factory=dict)
    dropped: int = 0                 # values over MAX_VALUES that were not kept
    front_trunk: str = ""            # FRONT_TRUNK's value: the front's, never a carrier header

    def __bool__(self) -> bool:
        return bool(self.values)

    def first(self, name: str) -> str:
        for k, v in self.values.items():
            if k.lower() == name.lower() and v:
                return v[0]
        return ""

    def as_dict(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.values.items()}

    def context(self) -> dict[str, str]:
        """The call's context values from these headers: ``x_customer_id`` for ``X-Customer-ID``
        (repeated headers joined with ", "), ``p_asserted_identity`` / ``diversion`` /
        ``remote_party_id`` (the first value) and their numbers (``pai_number``,
        ``diversion_number``, ``rpid_number``: the user part of the URI)."""
        out: dict[str, str] = {}
        for name, vals in self.values.items():
            key = name.lower().replace("-", "_")
            if key in out:          # X-Customer_ID after X-Customer-ID: the first one stands
                continue
            if name.lower() in IDENTITY:
                out[key] = vals[0]
            else:
                out[key] = ", ".join(vals)
        for short, name in (("pai", "P-Asserted-Identity"), ("diversion", "Diversion"),
                            ("rpid", "Remote-Party-ID")):
            number = uri_user(self.first(name))
            if number:
                out[f"{short}_number"] = number
        return out


def clean(value: str) -> str:
    """A header value safe to keep: no control characters, at most MAX_VALUE characters."""
    return _CONTROL.sub("", value.replace("\t", " ")).strip()[:MAX_VALUE]


def uri_user(value: str) -> str:
    """The user part (a number, usually) of a name-addr or addr-spec value: ``"Bob"
    <sip:+15551230001@host;user=phone>;privacy=off`` gives ``+15551230001``."""
    s = value
    if "<" in s:
        s = s.split("<", 1)[1].split(">", 1)[0]
    m = _URI_USER.match(s.strip())
    return m.group(1) if m and len(m.group(1)) <= 64 else ""


def split_list(value: str) -> list[str]:
    """Comma-separated values of a list header; commas inside ``"..."`` or ``<...>`` do not split."""
    out, cur, quoted, angle, escaped = [], [], False, False, False
    for ch in value:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"' and not angle:
            quoted = not quoted
        elif not quoted and ch == "<":
            angle = True
        elif not quoted and ch == ">":
            angle = False
        elif ch == "," and not quoted and not angle:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return [v for v in out if v]


def header_lines(message: str) -> list[tuple[str, str]]:
    """(name as sent, value) of every header of a SIP message, folding undone; the start
    line and the body are skipped. Lines without a colon or with a bad name are ignored."""
    text = message[:MAX_SCAN]
    head = re.split(r"\r?\n\r?\n", text, maxsplit=1)[0]
    lines = re.split(r"\r?\n", head)[1:]
    out: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            if out:
                name, value = out[-1]
                out[-1] = (name, value + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not _TOKEN.fullmatch(name):
            continue
        out.append((name, value.strip()))
    return out


FRONT_TRUNK = "x-trunkline-trunk"   # set by the Kamailio front on a trunk's INVITE (any sent by a carrier
                                    # is removed there): which of the configured trunks it came from


def parse(message: str) -> CarrierHeaders:
    """The carrier headers of an INVITE's text (see the module docstring for the limits)."""
    found = CarrierHeaders()
    kept = 0
    for sent, value in header_lines(message):
        low = sent.lower()
        low = COMPACT.get(low, low)
        if low == FRONT_TRUNK:
            found.front_trunk = value.strip()[:16]
            continue
        if low in IDENTITY:
            name, items = IDENTITY[low], split_list(value)
        elif low.startswith("x-") and len(low) > 2 and len(sent) <= MAX_NAME:
            name = next((k for k in found.values if k.lower() == low), sent)
            items = [value]
        else:
            continue
        for item in items:
            item = clean(item)
            if not item:
                continue
            if kept >= MAX_VALUES:
                found.dropped += 1
                continue
            found.values.setdefault(name, []).append(item)
            kept += 1
    return found
