"""Card numbers and configured patterns are masked before transcripts, events, records and logs."""
import json
import logging
from types import SimpleNamespace

import pytest

from bridge.core import pii
from bridge.core.pii import Masker, is_card, luhn_ok


@pytest.fixture(autouse=True)
def _reset_masker():
    yield
    pii.configure()


# Test card numbers published by the networks (all Luhn-valid).
CARDS = ["4111111111111111", "4012888888881881", "5555555555554444", "2223003122003222", "378282246310005",
         "6011111111111117", "3530111333300000", "30569309025904", "6200000000000005", "4000056655665556"]


def test_luhn():
    assert all(luhn_ok(c) for c in CARDS)
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710") and luhn_ok("79927398713")


@pytest.mark.parametrize("card", CARDS)
def test_cards_are_masked_in_any_grouping(card):
    m = Masker()
    groups = " ".join(card[i:i + 4] for i in range(0, len(card), 4))
    for text in (card, groups, groups.replace(" ", "-")):
        out = m.text(f"my card is {text}, thanks")
        assert out == f"my card is [card ****{card[-4:]}], thanks", out
        assert card[:-4] not in out.replace(" ", "").replace("-", "")


def test_numbers_that_are_not_cards_stay():
    m = Masker()
    kept = [
        "4111111111111112",                 # fails Luhn
        "+4915112345678",                   # E.164 phone number (even a Luhn-valid one)
        "+1 555 123 4567",
        "4915112345678",                    # 13 digits starting 4 (no 13-digit Visa any more): Luhn-valid
        "1234567890123452",                 # Luhn-valid, but no card network starts with 1
        "order 9876543210987654321",        # 19 digits, no network
        "call_4111111111111111",            # glued to an identifier
        "at 1732251234.123 seq 42",         # timestamps and counters
        "2026-11-22T04:30:00.123Z",
    ]
    assert luhn_ok("4915112345678") and luhn_ok("1234567890123452") and luhn_ok("4111111111111111")
    for text in kept:
        assert m.text(text) == text, text
    assert not is_card("1234567890123452") and not is_card("4915112345678")


def test_card_inside_a_longer_grouped_run_and_more_than_one():
    m = Masker()
    assert m.text("ref 12 4111 1111 1111 1111 ok") == "ref 12 [card ****1111] ok"
    assert m.text("4111 1111 1111 1111 1234") == "[card ****1111] 1234"        # card then CVV/expiry
    two = m.text("first 5555555555554444 then 378282246310005")
    assert two == "first [card ****4444] then [card ****0005]"


def test_configured_patterns_and_nested_values():
    m = Masker(True, [r"\b\d{3}-\d{2}-\d{4}\b", r"(?i)passcode \w+"])
    v = m.value({"a": "ssn 123-45-6789", "b": ["Passcode swordfish", 4111111111111111], "c": {"d": "4111111111111111"}})
    assert v == {"a": "ssn [redacted]", "b": ["[redacted]", 4111111111111111], "c": {"d": "[card ****1111]"}}
    off = Masker(False, [])
    assert off.text("4111111111111111") == "4111111111111111"


def test_log_formatter_masks_message_and_fields():
    from bridge.core.logs import JsonFormatter
    pii.configure(True, [r"secret-\w+"])
    rec = logging.LogRecord("trunkline.call", logging.INFO, __file__, 1, "caller said %s", ("4111 1111 1111 1111",),
                            None)
    rec.fields = {"event": "transcript", "text": "it is 5555-5555-5555-4444", "token": "secret-abc",
                  "to": "sip:+4915112345678@example.com", "n": 4111111111111111}
    from bridge.core import logs
    logs.show_words(True)              # the operator's opt-in (records.log_words): words kept, still masked
    try:
        line = json.loads(JsonFormatter().format(rec))
    finally:
        logs.show_words(False)
    assert line["msg"] == "caller said [card ****1111]"
    assert line["text"] == "it is [card ****4444]" and line["token"] == "[redacted]"
    assert line["to"] == "sip:+4915112345678@example.com" and line["n"] == 4111111111111111
    line = json.loads(JsonFormatter().format(rec))          # by default no words at all
    assert line["text"] == line["to"] == "[redacted]" and line["n"] == 4111111111111111


def test_transcripts_events_and_records_are_masked(tmp_path):
    from bridge.api.events import EventBus
    from bridge.records.journal import CallRecords
    from bridge.cell.session import Session
    from bridge.records.store import Store
    pii.configure(True, [r"\b\d{3}-\d{2}-\d{4}\b"])
    store = Store(str(tmp_path))
    bus = EventBus(store)
    cell = SimpleNamespace(store=store, bus=bus, metrics=None)
    offered = SimpleNamespace(call_id="c1", direction="inbound", from_uri="sip:a@b", to_uri="sip:c@d", source="",
                              trunk=None, media=None)
    s = Session(cell, offered)
    s.record_transcript("in", "card 4111 1111 1111 1111, ssn 123-45-6789, phone +15551234567",
                        extra={"words": "4111111111111111"})
    row = store.transcript("c1")[0]
    assert row["text"] == "card [card ****1111], ssn [redacted], phone +15551234567"
    assert row["extra"] == {"words": "[card ****1111]"}
    stored = [json.loads(e["data"]) for e in store.events_since(0)]
    assert stored[-1]["data"]["message"] == row["text"]
    bus.publish("transcribe_speech_interim", "c1", {"text": "my number is 5555 5555 5555 4444"})
    assert json.loads(store.events_since(0)[-1]["data"])["data"]["text"] == "my number is [card ****4444]"
    records = CallRecords(str(tmp_path), name="turns.jsonl")
    records.append({"user": "it's 378282246310005", "dtmf": "6011111111111117"})
    text = (tmp_path / "turns.jsonl").read_text()           # sealed at rest; masked inside the seal too
    (rec,) = records.read()
    assert "378282246310005" not in text and "[card ****0005]" in rec["user"] and "[card ****1117]" in rec["dtmf"]
    store.close()
