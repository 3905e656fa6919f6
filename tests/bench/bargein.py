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

    python tests/bench/bargein.py [--rounds 6] [--out tests/bench/results/bargein.json]
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
from support import CellProcess, next_ports  # noqa: E402

ASK = "Tell me about your cleaning and whitening services."
BARGE = "Wait, stop. I have another question."
BACKCHANNELS = ["Mhm.", "Okay.", "Uh-huh.", "Right.", "Yeah.", "Okay."]
PROMPT = ('[agent]\nsystem_prompt = "You are the receptionist of Acme Dental. Answer in three long sentences."\n'
          'max_reply_tokens = 80\nreprompt_after = 0.0\nhangup_after = 0.0\n')


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


def run(rounds: int = 6) -> dict:
    for text in [ASK, BARGE, *BACKCHANNELS]:
        voice.say(text)
    quiet, back, skipped = [], [], 0
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        cell = CellProcess(tmp, PROMPT, args=("--app", "agent")).start(wait=False)
        cell.wait_healthy(timeout=180)
        ports = next_ports()
        view = type("CellView", (), {"ports": dict(cell.ports, rtp_peer=ports["rtp_peer"], sipp=ports["sipp"]),
                                     "sip": cell.sip})()
        (tmp / "caller").mkdir()
        caller = voice.Caller(view, tmp / "caller", seconds=60 * rounds)
        try:
            caller.wait_reply(time.monotonic())
            for i in range(2 * rounds):
                end = caller.speak(ASK)
                if not _talking(caller, end):
                    skipped += 1
                    _wait(caller, end)
                    continue
                barges_before = len([e for e in cell.events() if e.get("event") == "barge_in"])
                t_b = time.monotonic()
                if i % 2 == 0:
                    end2 = caller.speak(BARGE)
                    caller.silence(0.3)
                    after = voiced_in(caller.peer.received, t_b, time.monotonic())
                    quiet.append(round((after[-1] - t_b) if after else 0.0, 3))
                    _wait(caller, end2)
                else:
                    end2 = caller.speak(BACKCHANNELS[(i // 2) % len(BACKCHANNELS)])
                    caller.silence(2.0)
                    resumed = bool(voiced_in(caller.peer.received, end2 + 0.2, time.monotonic()))
                    time.sleep(0.2)
                    cut = len([e for e in cell.events() if e.get("event") == "barge_in"]) > barges_before
                    back.append({"resumed": resumed, "cancelled": cut})
                    _wait(caller, end2)
        finally:
            caller.close()
            try:
                cell.stop()
            except AssertionError:
                cell.proc.kill()
    res = {"rounds": rounds, "skipped": skipped, "quiet_s": quiet,
           "quiet_p50": round(statistics.median(quiet), 3) if quiet else None,
           "quiet_max": max(quiet) if quiet else None,
           "backchannels": len(back), "backchannel_false_interruptions": sum(b["cancelled"] for b in back),
           "backchannel_agent_went_on": sum(b["resumed"] and not b["cancelled"] for b in back)}
    return res


if __name__ == "__main__":
    n = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 6
    r = run(n)
    print(json.dumps(r))
    if "--out" in sys.argv:
        Path(sys.argv[sys.argv.index("--out") + 1]).write_text(json.dumps(r, indent=2) + "\n")
