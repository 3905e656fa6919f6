"""Handoff to a person: the operator's transfer destinations (``[transfer]``), checked once at start.

::

    [transfer]
    destinations = { sales = { to = "sip:sales@pbx.example.com", description = "Sales: new orders",
                               mode = "attended" },
                     billing = { to = "+15551230000", trunk = "carrier", description = "Billing questions",
                                 mode = "attended" } }
    ring_timeout = 20        # attended: seconds the person has to answer, then the caller is back with the agent
    whisper = true           # attended: the person hears a one-line summary before the caller is put through

The model is offered a ``transfer`` tool whose ``destination`` is an enum of these
names: it can never dial a number of its own (toll fraud). The ``to`` targets are
operator configuration, so the engine's destination guard always allows them (as it
does ``app.dtmf_transfer``). Pure: no I/O.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
MODES = ("blind", "attended")
_TARGET = re.compile(r"^(sips?:|tel:)?[A-Za-z0-9+\-_.!~*'()&=$,%#@:\[\];]+$")
KEYS = {"to", "description", "mode", "trunk", "say"}


@dataclass(frozen=True)
class Destination:
    name: str                     # what the model picks (the tool's enum)
    to: str                       # SIP URI or number (through ``trunk``)
    description: str              # what the model reads about it
    mode: str = "blind"           # blind (REFER) | attended (the bridge calls, whispers, then bridges)
    trunk: str | None = None      # attended: the trunk the call to ``to`` goes through
    say: str = ""                 # the agent's line before the handoff ("" : transfer.say_text)


def destinations(v: Any) -> dict[str, dict]:
    """``transfer.destinations``: a table of name -> { to, description, mode?, trunk?, say? }.
    Raises ``TypeError`` with the offending name and key (config.py adds the setting's name)."""
    if not isinstance(v, dict):
        raise TypeError(f"expected a table of name = {{ to = \"sip:...\", description = \"...\" }}, got {v!r}")
    for name, d in v.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise TypeError(f"{name!r}: a destination's name is lower-case letters, digits and _ (at most 32)")
        if not isinstance(d, dict):
            raise TypeError(f"{name}: expected a table {{ to = ..., description = ... }}, got {d!r}")
        unknown = set(d) - KEYS
        if unknown:
            raise TypeError(f"{name}.{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(KEYS))})")
        to = d.get("to")
        if not isinstance(to, str) or not _TARGET.fullmatch(to) or "?" in to:
            raise TypeError(f"{name}.to: expected a SIP URI or a number (no headers, no spaces), got {to!r}")
        desc = d.get("description")
        if not isinstance(desc, str) or not desc.strip():
            raise TypeError(f"{name}.description: expected a non-empty string (the model reads it)")
        if d.get("mode", "blind") not in MODES:
            raise TypeError(f"{name}.mode: expected one of {', '.join(MODES)}, got {d.get('mode')!r}")
        if d.get("mode", "blind") == "blind":
            # a REFER names the target for the caller's side to dial: a full URI, and no trunk of ours
            if not to.startswith(("sip:", "sips:", "tel:")):
                raise TypeError(f"{name}.to: a blind transfer (REFER) needs a sip:, sips: or tel: URI, got {to!r}")
            if "trunk" in d:
                raise TypeError(f"{name}.trunk: only an attended transfer goes through one of our trunks")
        for key in ("trunk", "say"):
            if key in d and not isinstance(d[key], str):
                raise TypeError(f"{name}.{key}: expected a string, got {d[key]!r}")
    return v


def parse(raw: dict) -> dict[str, Destination]:
    """The checked ``transfer.destinations`` table as ``Destination`` records, in order."""
    return {name: Destination(name, d["to"].strip(), d["description"].strip(), d.get("mode", "blind"),
                              d.get("trunk") or None, d.get("say", ""))
            for name, d in (raw or {}).items()}


def targets(transfer_cfg: dict) -> tuple[str, ...]:
    """Every configured ``to`` (the engine's destination guard allows these, like dtmf_transfer's)."""
    return tuple(d.to for d in parse(transfer_cfg.get("destinations", {})).values())
