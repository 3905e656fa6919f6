"""Barge-in and backchannels measured at the caller's ear (issue 13).

One real call to a cell with the bundled models; the caller (SIPp signalling,
our own RTP endpoint, Piper speech over PCMU in real time) asks for a long
answer, waits until the agent is audibly talking, then either barges in
("Wait, stop. I have another question.") or says a backchannel ("Mhm.",
"Okay." ...). Figures:

- quiet time: from the caller's first speech packet to the last agent packet
  with voice the caller receives (the agent must have been talking just before);
- backchannel false interruptions: the agent's reply was cancelled (a
  ``barge_in`` event) after a backchannel, or its voice did not come back.

    python tests/bench/bargein.py [--rounds 6] [--backchannels N] [--out FILE.json] [--log CELL.log]

``--rounds`` barge-ins and as many backchannels (or ``--backchannels N``); each
backchannel round records what STT returned for it (the cell's
``short_utterance`` events) and when the agent's voice came back.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import voice  # noqa: E402

ASK = "Tell me about your cleaning and whitening services."
BARGE = "Wait, stop. I have another question."
# Piper reads "Mhm." and "Mm-hmm." as spelled letters ("em-aitch-em"; whisper tiny.en writes "and make sure"),
# "Hmm." as a short hum: all kept, as the hardest short sounds to read.
BACKCHANNELS = ["Mhm.", "Okay.", "Uh-huh.", "Hmm.", "Right.", "Yeah.", "Mm-hmm.", "Sure."]
PROMPT = ('[agent]\nsystem_prompt = "You are the receptionist of Acme Dental. Answer in three long sentences."\n'
          'max_reply_tokens = 80\nreprompt_after = 0.0\nhangup_after = 0.0\n'
          '[records]\nlog_words = true\n')           # the bench's own synthetic words: log what STT heard


def voiced_in(received, start: float, end: float) -> list[float]:
    return [t for t, pt, _, p in received if start <= t < end and pt == 0 and voice.first_voice_time([(t, pt, 0, p)],
                                                                                                       start)]


def _talking(caller, after: float, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while voice.first_voice_time(caller.peer.received, after) is None and time.monotonic() < deadline:
        caller.silence(0.1)
    if voice.first_voice_time(caller.peer.received, after) is None:
        return False
    caller.silence(0.8)                                   # well into the answer
    return bool(voiced_in(caller.peer.received, time.monotonic() - 0.3, time.monotonic()))


def _wait(caller, after: float) -> None:
    try:
        caller.wait_reply(after, timeout=25.0, quiet=1.0)
    except AssertionError:                                # no answer (a short or empty reply): go on
        pass


def _events(cell, name: str) -> list[dict]:
    return [e for e in cell.events() if e.get("event") == name]


def run(rounds: int = 6, backchannels: int | None = None, keep_log: str | None = None) -> dict:
    """``rounds`` barge-ins and ``backchannels`` (default ``rounds``) backchannels, alternating. A round
    where the agent was not audibly talking, or had stopped before the caller's words reached it (no
    agent voice after a barge-in began; a backchannel that became a caller turn of its own, nothing
    paused), is not counted and tried again (``skipped``, at most twice as many as the rounds asked for)."""
    want_bc = rounds if backchannels is None else backchannels
    for text in [ASK, BARGE, *BACKCHANNELS]:
        voice.say(text)
    quiet, back, skipped = [], [], 0
    not_over = {"barge": 0, "backchannel": 0}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        total = rounds + want_bc
        cell, caller = voice.agent_call(tmp, PROMPT, seconds=40 * (total + rounds) + 60)
        try:
            caller.wait_reply(time.monotonic())
            i = 0
            while (len(quiet) < rounds or len(back) < want_bc) and skipped <= 2 * total:
                barge = (len(quiet) < rounds) and (i % 2 == 0 or len(back) >= want_bc)
                i += 1
                end = caller.speak(ASK)
                if not _talking(caller, end):
                    skipped += 1
                    _wait(caller, end)
                    continue
                barges_before = len(_events(cell, "barge_in"))
                shorts_before = len(_events(cell, "short_utterance"))
                bcs_before = len(_events(cell, "backchannel"))
                turns_before = len(_events(cell, "turn"))
                t_b = time.monotonic()
                if barge:
                    end2 = caller.speak(BARGE)
                    caller.silence(0.3)
                    after = voiced_in(caller.peer.received, t_b, time.monotonic())
                    if after:
                        quiet.append(round(after[-1] - t_b, 3))
                    else:                                 # the agent had stopped already: nothing to measure
                        not_over["barge"] += 1
                        skipped += 1
                    _wait(caller, end2)
                else:
                    word = BACKCHANNELS[len(back) % len(BACKCHANNELS)]
                    end2 = caller.speak(word)
                    caller.silence(2.0)
                    again = voiced_in(caller.peer.received, end2 + 0.2, time.monotonic())
                    time.sleep(0.2)
                    cut = len(_events(cell, "barge_in")) > barges_before
                    shorts = [{k: v for k, v in e.items() if k in ("text", "voiced", "no_speech", "logprob", "wait",
                                                                    "why", "late", "talking")}
                              for e in _events(cell, "short_utterance")[shorts_before:]]
                    heard = shorts or cut or len(_events(cell, "backchannel")) > bcs_before
                    own_turn = [e for e in _events(cell, "turn")[turns_before:] if e.get("role") == "caller"]
                    if not heard and own_turn:            # the agent had finished: a caller turn, not a backchannel
                        not_over["backchannel"] += 1
                        skipped += 1
                    else:
                        back.append({"word": word, "resumed": bool(again), "cancelled": cut,
                                     "resumed_after": round(again[0] - end2, 3) if again else None, "stt": shorts})
                    _wait(caller, end2)
        finally:
            caller.close()
            try:
                cell.stop()
            except AssertionError:
                cell.proc.kill()
            if keep_log:
                Path(keep_log).write_bytes(cell.log_path.read_bytes())
    res = {"rounds": rounds, "skipped": skipped, "not_over_the_agent": not_over, "quiet_s": quiet,
           "quiet_p50": round(statistics.median(quiet), 3) if quiet else None,
           "quiet_max": max(quiet) if quiet else None,
           "quiet_p50_nonzero": round(statistics.median([q for q in quiet if q]), 3) if any(quiet) else None,
           "backchannels": len(back), "backchannel_false_interruptions": sum(b["cancelled"] for b in back),
           "backchannel_agent_went_on": sum(b["resumed"] and not b["cancelled"] for b in back),
           "backchannel_rounds": back, "loadavg": _loadavg()}
    return res


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


if __name__ == "__main__":
    n = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 6
    bc = int(sys.argv[sys.argv.index("--backchannels") + 1]) if "--backchannels" in sys.argv else None
    print("load average at start:", " ".join(Path("/proc/loadavg").read_text().split()[:3]), file=sys.stderr)
    log_to = sys.argv[sys.argv.index("--log") + 1] if "--log" in sys.argv else None
    r = run(n, bc, log_to)
    print(json.dumps(r))
    if "--out" in sys.argv:
        Path(sys.argv[sys.argv.index("--out") + 1]).write_text(json.dumps(r, indent=2) + "\n")
