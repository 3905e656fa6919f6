"""WebRTC VAD (the cell's, media/vad.py) against Silero VAD (ai/vad_silero.py) on the phone path.

Every clip goes through 8 kHz G.711 mu-law and up to 16 kHz, as a caller's
audio reaches the agent. Figures per detector:

- onset: from the true start of a Piper phrase (behind 0.5 s of line hiss) to
  the first voiced frame and to the first 3-frame voiced run (what pauses the
  agent, ``bargein_onset``);
- false triggers: 3-frame voiced runs per minute on noise only (hiss, hum,
  babble-like modulated noise, clicks) - each would pause the agent;
- backchannels ("Mhm.", "Okay." ...): detected at all, and the voiced time
  (under ``bargein_confirm`` = 0.4 s they must stay short of a barge-in);
- the real A-law capture in ../shared (support.SHARED; skipped when absent):
  the share of frames each calls speech and how often the two agree;
- cost per 20 ms frame.

    python tests/bench/vad.py [--out tests/bench/results/vad.json]
"""
from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from media import g711  # noqa: E402
from media.resample import resample  # noqa: E402
from media.vad import VoiceDetector  # noqa: E402

FRAME = 640                     # bytes: 20 ms at 16 kHz
PHRASES = ["What are your opening hours?", "Can I book a cleaning next Monday?", "Wait, stop. I have a question.",
           "My number is four one five.", "No.", "I think I was charged twice last month."]
BACKCHANNELS = ["Mhm.", "Okay.", "Uh-huh.", "Right.", "Yeah."]
CAPTURE = "testdata/sipp-realworld/pcap/lundgrel__Kamilla_babblar_lite.pcap"


def phone(pcm8k: bytes) -> bytes:
    return resample(g711.ulaw_decode(g711.ulaw_encode(pcm8k)), 8000, 16000)


def frames(pcm16k: bytes) -> list[bytes]:
    return [pcm16k[i:i + FRAME] for i in range(0, len(pcm16k) - FRAME + 1, FRAME)]


def hiss(seconds: float, dbfs: float, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(int(8000 * seconds)) * 32768 * 10 ** (dbfs / 20)
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


def noises(seconds: float = 20.0) -> dict[str, bytes]:
    n = int(8000 * seconds)
    t = np.arange(n) / 8000
    rng = np.random.default_rng(3)
    babble = rng.standard_normal(n) * (0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)) * 1500    # syllable-rate AM
    hum = 2000 * np.sin(2 * np.pi * 50 * t) + 800 * np.sin(2 * np.pi * 150 * t)
    clicks = np.zeros(n)
    clicks[rng.integers(0, n, 40)] = 20000
    return {"hiss -50 dBFS": hiss(seconds, -50), "hiss -35 dBFS": hiss(seconds, -35, 1),
            "hiss -25 dBFS": hiss(seconds, -25, 2),
            "babble-like": np.clip(babble, -32768, 32767).astype("<i2").tobytes(),
            "hum 50 Hz": hum.astype("<i2").tobytes(), "clicks": clicks.astype("<i2").tobytes()}


class Webrtc:
    name = "webrtc"

    def __init__(self):
        self.v = VoiceDetector(16000, 3)

    def is_speech(self, pcm):
        return self.v.is_speech(pcm)

    def reset(self):
        self.v = VoiceDetector(16000, 3)


class Silero:
    name = "silero"

    def __init__(self):
        from ai.vad_silero import SileroDetector
        self.make = lambda: SileroDetector(16000)
        self.v = self.make()

    def is_speech(self, pcm):
        return self.v.is_speech(pcm)

    def reset(self):
        self.v = self.make()


def verdicts(det, pcm16k: bytes) -> list[bool]:
    det.reset()
    return [det.is_speech(f) for f in frames(pcm16k)]


def runs(v: list[bool], need: int = 3) -> list[int]:
    """Indexes where a run of ``need`` voiced frames completes (separate runs)."""
    out, n = [], 0
    for i, x in enumerate(v):
        n = n + 1 if x else 0
        if n == need:
            out.append(i)
    return out


def true_onset(pcm8k: bytes) -> float:
    x = np.abs(np.frombuffer(pcm8k, "<i2").astype(float))
    return float(np.argmax(x > 0.05 * x.max()) / 8000)


def read_capture(path: Path) -> bytes:
    """A-law RTP payloads (PT 8) of the capture's busiest stream, as 8 kHz PCM."""
    data = path.read_bytes()
    endian = "<" if data[:4] == b"\xd4\xc3\xb2\xa1" else ">"
    link = struct.unpack(endian + "I", data[20:24])[0]
    pos, streams = 24, {}
    while pos + 16 <= len(data):
        _, _, incl, _ = struct.unpack(endian + "IIII", data[pos:pos + 16])
        pkt = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        off = 14 if link == 1 else 16 if link == 113 else 0
        if len(pkt) < off + 28 or pkt[off] >> 4 != 4:
            continue
        ihl = (pkt[off] & 15) * 4
        if pkt[off + 9] != 17:
            continue
        udp = off + ihl
        rtp = pkt[udp + 8:]
        if len(rtp) < 12 or rtp[0] >> 6 != 2 or rtp[1] & 0x7F != 8:
            continue
        ssrc = rtp[8:12]
        head = 12 + 4 * (rtp[0] & 15)
        streams.setdefault(ssrc, []).append(rtp[head:])
    best = max(streams.values(), key=len)
    return b"".join(g711.alaw_decode(p) for p in best)


def main(out_path: str | None = None) -> dict:
    import voice
    dets = [Webrtc(), Silero()]                # both with the cell's energy floor and DTMF veto
    res: dict = {"detectors": {}}
    lead = hiss(0.5, -50, 9)
    for det in dets:
        r: dict = {}
        onset_first, onset_run, missed = [], [], 0
        for text in PHRASES:
            pcm8 = voice.say(text)
            t0 = 0.5 + true_onset(pcm8)
            v = verdicts(det, phone(lead + pcm8 + hiss(0.5, -50, 8)))
            first = next((i for i, x in enumerate(v) if x and (i + 1) * 0.02 > 0.5), None)
            run = next((i for i in runs(v) if (i + 1) * 0.02 > 0.5), None)
            if first is None or run is None:
                missed += 1
                continue
            onset_first.append((first + 1) * 0.02 - t0)
            onset_run.append((run + 1) * 0.02 - t0)
        r["onset_first_frame_ms"] = round(1000 * float(np.median(onset_first)), 1) if onset_first else None
        r["onset_3_frames_ms"] = round(1000 * float(np.median(onset_run)), 1) if onset_run else None
        r["phrases_missed"] = missed
        r["false_triggers_per_min"] = {name: round(len(runs(verdicts(det, phone(pcm)))) / (len(pcm) / 16000 / 60), 1)
                                       for name, pcm in noises().items()}
        bc = []
        for text in BACKCHANNELS:
            v = verdicts(det, phone(lead + voice.say(text) + hiss(0.5, -50, 8)))
            bc.append({"text": text, "detected": bool(runs(v)), "voiced_s": round(0.02 * sum(v), 2)})
        r["backchannels"] = bc
        r["backchannels_detected"] = sum(b["detected"] for b in bc)
        r["backchannels_over_confirm"] = sum(b["voiced_s"] >= 0.4 for b in bc)
        speech = phone(voice.say(PHRASES[0]))
        det.reset()
        fs = frames(speech) * 10
        start = time.perf_counter()
        for f in fs:
            det.is_speech(f)
        r["cost_us_per_frame"] = round(1e6 * (time.perf_counter() - start) / len(fs), 1)
        res["detectors"][det.name] = r
    from support import SHARED
    cap = SHARED / CAPTURE
    if cap.exists():
        pcm = phone(read_capture(cap))
        a, b = verdicts(dets[0], pcm), verdicts(dets[1], pcm)
        res["capture"] = {"file": CAPTURE, "seconds": round(len(pcm) / 32000, 1),
                          "webrtc_speech_share": round(sum(a) / len(a), 3),
                          "silero_speech_share": round(sum(b) / len(b), 3),
                          "agreement": round(sum(x == y for x, y in zip(a, b)) / len(a), 3),
                          "webrtc_runs_per_min": round(len(runs(a)) / (len(a) * 0.02 / 60), 1),
                          "silero_runs_per_min": round(len(runs(b)) / (len(b) * 0.02 / 60), 1)}
    else:
        res["capture"] = f"skipped: {cap} is absent (../shared)"
    print(json.dumps(res, indent=1))
    if out_path:
        Path(out_path).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main(sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None)
