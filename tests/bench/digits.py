"""Digit strings read slowly, measured at the caller's ear (issue 13's "digit-string cut-offs").

One real call to a cell with the bundled models and the default turn settings (Smart Turn,
``turn_max_silence``, the digits window). The caller (SIPp signalling, our own RTP endpoint,
Piper speech over PCMU in real time) reads numbers in groups with a pause of 0.8-1.2 s
(seeded) between groups, the way people read a phone or account number, then waits for the
agent's answer. Per number:

- **cut at the caller**: the agent's voice reached the caller during a pause between groups
  (it took the turn before the number was finished);
- **split in the record**: no caller turn of ``turns.jsonl`` holds all its groups in order, but
  each group is in some turn (whisper may add or drop a digit: a group not heard at all makes
  the number "misheard", reported, not counted as a cut);
- the reply gap after the last group (last caller packet to the agent's first voiced packet).

    python tests/bench/digits.py [--numbers 10] [--seed 7] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import voice  # noqa: E402

WORDS = "zero one two three four five six seven eight nine".split()
PROMPT = ('[agent]\nsystem_prompt = "You are the receptionist of Acme Dental. Answer in one short sentence."\n'
          'max_reply_tokens = 24\nreprompt_after = 0.0\nhangup_after = 0.0\n'
          '[records]\nlog_words = true\n')           # the bench's own synthetic numbers: log what STT heard
LEADS = ["My number is", "My account number is", "You can call me back on", "The reference is"]


def numbers(n: int, rnd: random.Random) -> list[list[str]]:
    """``n`` digit strings as groups: phone numbers (3-3-4) and account numbers (4-4 or 4-4-4)."""
    out = []
    for i in range(n):
        shape = [(3, 3, 4), (4, 4), (4, 4, 4), (3, 3, 4)][i % 4]
        out.append(["".join(rnd.choice("0123456789") for _ in range(k)) for k in shape])
    return out


def spoken(lead: str, groups: list[str]) -> list[str]:
    """The phrases the caller says: the lead with the first group, then one group each."""
    said = [" ".join(WORDS[int(d)] for d in g) for g in groups]
    return [f"{lead} {said[0]},"] + [s + ("," if i < len(said) - 2 else ".") for i, s in enumerate(said[1:])]


def digits(text: str) -> str:
    t = text.lower()
    for w, d in zip(WORDS, "0123456789"):
        t = re.sub(rf"\b{w}\b", d, t)
    t = re.sub(r"\boh\b", "0", t)
    return re.sub(r"\D", "", t)


def in_order(text: str, groups: list[str]) -> bool:
    at = 0
    for g in groups:
        j = text.find(g, at)
        if j < 0:
            return False
        at = j + len(g)
    return True


def run(count: int = 10, seed: int = 7, keep_log: str | None = None) -> dict:
    rnd = random.Random(seed)
    nums = numbers(count, rnd)
    plan = [(spoken(LEADS[i % len(LEADS)], g), [round(rnd.uniform(0.8, 1.2), 2) for _ in g[1:]], g)
            for i, g in enumerate(nums)]
    for phrases, _, _ in plan:
        for p in phrases:
            voice.say(p)                                  # synthesized before the clock matters
    rows = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        cell, caller = voice.agent_call(tmp, PROMPT, seconds=30 * count + 60)
        try:
            caller.wait_reply(time.monotonic())           # the greeting
            for phrases, pauses, groups in plan:
                cut_at = None
                for i, p in enumerate(phrases):
                    end = caller.speak(p)
                    if i < len(pauses):
                        caller.silence(pauses[i])
                        if cut_at is None and voice.first_voice_time(caller.peer.received, end) is not None:
                            cut_at = i + 1                # the agent spoke in the pause after group i+1
                first = None
                try:
                    caller.wait_reply(end, timeout=25.0, quiet=1.0)
                    first = voice.first_voice_time(caller.peer.received, end)
                except AssertionError:
                    pass
                rows.append({"number": "".join(groups), "groups": groups, "pauses_s": pauses,
                             "cut_after_group": cut_at, "reply_gap_s": round(first - end, 3) if first else None,
                             "said_at": end})
        finally:
            caller.close()
            if keep_log:
                Path(keep_log).write_text(cell.log_path.read_text(errors="replace"))
            try:
                cell.stop()
            except AssertionError:
                cell.proc.kill()
            from bridge.records.journal import CallRecords
            turns = [t for t in CallRecords(str(cell.data), name="turns.jsonl").read() if t.get("role") == "caller"]
    heard = [digits(t.get("text", "")) for t in turns]
    for r in rows:
        whole = any(in_order(h, r["groups"]) for h in heard)   # one turn holds every group (extra digits
                                                                # whisper adds, "66613" for "6613", are no cut)
        parts = all(any(g in h for h in heard) for g in r["groups"])
        r["record"] = "whole" if whole else ("split" if parts else "misheard")
        r.pop("said_at")
    cut = [r for r in rows if r["cut_after_group"] is not None or r["record"] == "split"]
    gaps = [r["reply_gap_s"] for r in rows if r["reply_gap_s"] is not None]
    return {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "numbers": len(rows), "seed": seed,
            "cut_off": len(cut), "cut_at_the_caller": sum(1 for r in rows if r["cut_after_group"] is not None),
            "split_in_record": sum(1 for r in rows if r["record"] == "split"),
            "misheard": sum(1 for r in rows if r["record"] == "misheard"),
            "reply_gap_p50_s": round(statistics.median(gaps), 3) if gaps else None,
            "reply_gap_max_s": max(gaps) if gaps else None,
            "turn_ends": sorted({t.get("end") for t in turns if t.get("end")}),
            "caller_turns": [{"text": t.get("text"), "end": t.get("end"), "turn_p": t.get("turn_p")} for t in turns],
            "rows": rows}


def main(out_path: str | None = None, count: int = 10, seed: int = 7) -> dict:
    res = run(count, seed)
    print(f"digit strings: {res['numbers']}  cut off: {res['cut_off']} (at the caller {res['cut_at_the_caller']}, "
          f"split in the record {res['split_in_record']})  misheard: {res['misheard']}  "
          f"reply gap p50 {res['reply_gap_p50_s']} s, max {res['reply_gap_max_s']} s")
    if out_path:
        Path(out_path).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numbers", type=int, default=10)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "digits.json"))
    ap.add_argument("--log")
    a = ap.parse_args()
    res = run(a.numbers, a.seed, a.log)
    print(json.dumps({k: v for k, v in res.items() if k not in ("rows", "caller_turns")}, indent=1))
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
