"""Masking of card numbers and other configured patterns in text we keep.

Applied before a transcript line is stored, before an event is stored or
sent, before a call/turn record is written and inside the JSON log
formatter, so a card number the caller reads out never lands on disk or in a
webhook.

A card number is 13-19 digits, optionally grouped by single spaces or dashes,
that passes the Luhn check *and* has the prefix and length of a card of a major
network (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro). That test
keeps the 1-in-10 of ordinary long numbers that happen to pass Luhn (phone
numbers, order ids) visible. A run of digits glued to a letter, an
underscore or a leading ``+`` (an E.164 phone number) is never a card.
Cards are shown as ``[card ****1234]`` (last four, as PCI DSS allows).

Other patterns are regular expressions from ``[pii] patterns``; each match
becomes ``[redacted]``.

DTMF digits are masked too (``X``) in logs, events and call records unless
the operator sets ``[pii] show_dtmf = true``: callers key in card numbers,
PINs and account numbers, and a digit at a time escapes the card check. A
digit typed while the recording is paused is masked even then. The call's
app (an IVR menu, ``dtmf_transfer``) still gets the real digit.

The masker is process-wide (the log formatter has no other way to find it)
and configured once at start with ``configure``.
"""
from __future__ import annotations

import re
from typing import Any

_CANDIDATE = re.compile(r"(?<![\w+])\d(?:[ -]?\d){12,18}(?![\w])")
# Issuer prefixes (IIN ranges) and lengths of cards people read out on the phone. 13-digit
# Visa numbers are no longer issued; leaving them out keeps 13-digit numbers starting with 4
# (many phone numbers written without "+") visible.
_NETWORKS = [(re.compile(p), lengths) for p, lengths in (
    (r"^4", (16, 19)),                                          # Visa
    (r"^(?:5[1-5]|222[1-9]|22[3-9]|2[3-6]|27[01]|2720)", (16,)),  # Mastercard
    (r"^3[47]", (15,)),                                         # American Express
    (r"^(?:6011|64[4-9]|65)", (16, 17, 18, 19)),                # Discover
    (r"^35(?:2[89]|[3-8])", (16, 17, 18, 19)),                  # JCB
    (r"^3(?:0[0-5]|[689])", (14, 15, 16, 17, 18, 19)),          # Diners Club
    (r"^62", (16, 17, 18, 19)),                                 # UnionPay
    (r"^(?:5[06-9]|6)", (13, 14, 15, 16, 17, 18, 19)),          # Maestro
)]
CARD_MASK = "[card ****{last4}]"
REDACTED = "[redacted]"


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def is_card(digits: str) -> bool:
    n = len(digits)
    return any(n in lengths and p.match(digits) for p, lengths in _NETWORKS) and luhn_ok(digits)


def _card_sub(m: re.Match) -> str:
    text = m.group(0)
    digits = re.sub(r"[ -]", "", text)
    if is_card(digits):
        return CARD_MASK.format(last4=digits[-4:])
    # Not a card as a whole; a card may still sit inside a longer grouped run
    # ("ref 12 4111 1111 1111 1111"): try every run of whole groups, longest first.
    groups = re.split(r"([ -])", text)            # digits, sep, digits, sep, ...
    nums = groups[0::2]
    for size in range(len(nums) - 1, 0, -1):
        for start in range(0, len(nums) - size + 1):
            cand = "".join(nums[start:start + size])
            if is_card(cand):
                before = "".join(groups[:2 * start])
                after = "".join(groups[2 * (start + size) - 1:])
                return before + CARD_MASK.format(last4=cand[-4:]) + after
    return text


DTMF_MASK = "X"


class Masker:
    def __init__(self, cards: bool = True, patterns: list[str] | None = None, show_dtmf: bool = False):
        self.cards = cards
        self.patterns = [re.compile(p) for p in (patterns or [])]
        self.show_dtmf = show_dtmf

    @property
    def active(self) -> bool:
        return self.cards or bool(self.patterns)

    def text(self, s: str) -> str:
        if self.cards and len(s) >= 13:
            s = _CANDIDATE.sub(_card_sub, s)
        for p in self.patterns:
            s = p.sub(REDACTED, s)
        return s

    def value(self, v: Any) -> Any:
        """Strings masked anywhere inside dicts, lists and tuples; other values as they are."""
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, dict):
            return {k: self.value(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [self.value(x) for x in v]
        return v


def check_patterns(patterns: list[str]) -> None:
    """Raise ``ValueError`` naming the first pattern that is not a valid regular expression."""
    for i, p in enumerate(patterns):
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"patterns[{i}]: not a valid regular expression ({exc})") from None


_masker = Masker()


def configure(cards: bool = True, patterns: list[str] | None = None, show_dtmf: bool = False) -> None:
    global _masker
    _masker = Masker(cards, patterns, show_dtmf)


def dtmf(digit: str, paused: bool = False) -> str:
    """A received DTMF digit as logs, events and records show it: ``X`` unless ``show_dtmf``
    (and always ``X`` while the recording is paused)."""
    return DTMF_MASK if paused or not _masker.show_dtmf else digit


def mask_text(s: str) -> str:
    return _masker.text(s)


def mask(v: Any) -> Any:
    return _masker.value(v)
