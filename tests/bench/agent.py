"""Voice-agent figures: voice-to-voice latency (1 and 3 calls), stage breakdown,
barge-in, frame timing while the models run, and STT WER on 8 kHz G.711 speech.

Callers are SIPp-signalled calls whose RTP this process sends and records in
real time (PCMU, 20 ms). Caller speech is synthesized by Piper (the bundled
voice) - clean synthetic speech, which flatters STT compared with real callers.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import voice  # noqa: E402
from support import CellProcess  # noqa: E402

QUESTIONS = [
    "What are your opening hours?",
    "Can I book a cleaning next Monday?",
    "How much does a check up cost?",
    "Do you take new patients?",
]
BARGE = "Wait, stop. I have another question."
WER_SET = [
    "What are your opening hours on Saturday?",
    "I would like to book an appointment for a cleaning.",
    "My phone number is five five five, one two three four.",
    "Can you transfer me to the billing department please?",
    "I need to cancel my appointment for tomorrow morning.",
    "Is the clinic open during the holidays?",
    "My account number is four seven two nine.",
    "Please call me back after three o'clock.",
    "How long does a root canal usually take?",
    "Do you accept credit cards or only cash?",
    "I think I was charged twice last month.",
    "Can I speak to a real person?",
]
PROMPT = ('[agent]\nsystem_prompt = "You are the receptionist of Acme Dental, open Monday to Friday 9 to 5. '
          'Answer in one short sentence."\nmax_reply_tokens = 40\nreprompt_after = 0.0\nhangup_after = 0.0\n')


def _words(s: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", s.lower())


def wer(ref: str, hyp: str) -> tuple[int, int]:
    r, h = _words(ref), _words(hyp)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            cur = min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
            prev, d[j] = d[j], cur
    return d[len(h)], len(r)


def stt_wer() -> dict:
    from media import g711
    from media.resample import resample
    errors = words = 0
    samples = []
    for text in WER_SET:
        pcm8 = g711.ulaw_decode(g711.ulaw_encode(voice.say(text)))   # through the telephone codec
        hyp = voice._stt().transcribe(resample(pcm8, 8000, 16000)).text
        e, n = wer(text, hyp)
        errors, words = errors + e, words + n
        samples.append({"ref": text, "hyp": hyp, "errors": e})
    return {"utterances": len(WER_SET), "words": words, "wer": round(errors / words, 3), "samples": samples}


def _conversation(cell, tmp: Path, idx: int, out: dict) -> None:
    work = tmp / f"caller{idx}"
    work.mkdir()
    from support import next_ports
    ports = next_ports()
    cell_ports = dict(cell.ports, rtp_peer=ports["rtp_peer"], sipp=ports["sipp"])
    view = type("CellView", (), {"ports": cell_ports, "sip": cell.sip})()
    caller = voice.Caller(view, work, seconds=120)
    wire = []
    barge = None
    try:
        caller.wait_reply(time.monotonic())
        for i, q in enumerate(QUESTIONS):
            end = caller.speak(q)
            if i == 1:                            # barge in on the second answer
                deadline = time.monotonic() + 20
                while voice.first_voice_time(caller.peer.received, end) is None and time.monotonic() < deadline:
                    caller.silence(0.05)
                first = voice.first_voice_time(caller.peer.received, end)
                if first:
                    wire.append(first - end)
                caller.silence(0.4)
                t_b = time.monotonic()
                end = caller.speak(BARGE)
                during = [r for r in caller.peer.received if t_b <= r[0] < end]
                last = voice.last_voice_time(during)
                barge = (last - t_b) if last else 0.0
            caller.wait_reply(end)
            first = voice.first_voice_time(caller.peer.received, end)
            if first:
                wire.append(first - end)
        caller.goodbye()
    finally:
        caller.close()
    out[idx] = {"wire_v2v": wire, "barge_wire": barge}


def run_calls(n: int, config: str = "") -> dict:
    for text in QUESTIONS + [BARGE, "Thank you, goodbye."]:
        voice.say(text)                       # synthesize caller audio before the clock starts
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        cell = CellProcess(tmp, PROMPT + config, args=("--app", "agent")).start(wait=False)
        cell.wait_healthy(timeout=180)
        try:
            out: dict = {}
            threads = [threading.Thread(target=_conversation, args=(cell, tmp, i, out)) for i in range(n)]
            for i, th in enumerate(threads):
                th.start()
                time.sleep(1.5 * (i > 0))        # callers do not all talk in lockstep
            for th in threads:
                th.join()
            ended = cell.wait_event("call_ended", n, timeout=60)
            events = cell.events()
        finally:
            cell.stop()
    v2v = sorted(e["seconds"] for e in events if e.get("event") == "voice_to_voice")
    turns = [e for e in events if e.get("event") == "turn"]
    callers = [t for t in turns if t["role"] == "caller" and "stt_seconds" in t]
    agents = [t for t in turns if t["role"] == "agent" and "llm_first_token" in t]
    barges = [e["latency"] for e in events if e.get("event") == "barge_in"]
    wire = sorted(x for o in out.values() for x in o["wire_v2v"])

    def pct(v, p):
        return round(v[min(len(v) - 1, int(round(p / 100 * len(v) + 0.5)) - 1)], 3) if v else None
    return {
        "calls": n, "turns": len(v2v),
        "voice_to_voice_p50": pct(v2v, 50), "voice_to_voice_p95": pct(v2v, 95),
        "wire_reply_gap_p50": pct(wire, 50), "wire_reply_gap_p95": pct(wire, 95),
        "stt_p50": round(statistics.median(t["stt_seconds"] for t in callers), 3) if callers else None,
        "stt_wait_p50": round(statistics.median(t["stt_wait"] for t in callers), 3) if callers else None,
        "llm_first_token_p50": round(statistics.median(t["llm_first_token"] for t in agents), 3) if agents else None,
        "tts_first_audio_p50": round(statistics.median(t["tts_first_audio"] for t in agents
                                                       if t["tts_first_audio"] is not None), 3) if agents else None,
        "bargein_p50": round(statistics.median(barges), 3) if barges else None,
        "bargein_max": round(max(barges), 3) if barges else None,
        "bargein_wire_max": round(max(o["barge_wire"] or 0 for o in out.values()), 3),
        "frame_rate_min": min(e["frame_rate"] for e in ended),
        "frame_p99_ms_max": max(e["frame_p99_ms"] for e in ended),
        "frame_gaps": sum(e["frame_gaps"] for e in ended),
    }


def main(out_path: str, calls=(1, 3)) -> dict:
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": [], "stt": None}
    print("voice agent (bundled whisper tiny.en int8, SmolLM2-135M Q4_1, Piper joe-medium)")
    print(f"{'calls':>5} {'turns':>5} {'v2v p50':>7} {'v2v p95':>7} {'wire p50':>8} {'stt':>5} {'stt wait':>8} "
          f"{'llm 1st':>7} {'tts 1st':>7} {'barge p50':>9} {'barge max':>9} {'fps min':>7} {'p99 ms':>6} {'gaps':>4}")
    for n in calls:
        r = run_calls(n)
        res["runs"].append(r)
        print(f"{r['calls']:>5} {r['turns']:>5} {r['voice_to_voice_p50']:>7} {r['voice_to_voice_p95']:>7} "
              f"{r['wire_reply_gap_p50']:>8} {r['stt_p50']:>5} {r['stt_wait_p50']:>8} {r['llm_first_token_p50']:>7} "
              f"{r['tts_first_audio_p50']:>7} {r['bargein_p50']:>9} {r['bargein_max']:>9} {r['frame_rate_min']:>7} "
              f"{r['frame_p99_ms_max']:>6} {r['frame_gaps']:>4}")
    res["stt"] = stt_wer()
    print(f"STT WER on 8 kHz G.711 (Piper speech, {res['stt']['utterances']} utterances, "
          f"{res['stt']['words']} words): {res['stt']['wer']:.1%}")
    Path(out_path).write_text(json.dumps(res, indent=2) + "\n")
    print(f"saved {out_path}")
    return res


if __name__ == "__main__":
    main(str(Path(__file__).resolve().parent / "results" / "agent.json"))
