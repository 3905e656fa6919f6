"""An inference process's memory and speed with Piper's arena kept, shrunk after long inputs, or
shrunk after every run (issue 14: memory flat after warm-up).

Each setting runs in a process of its own, pinned to one core, with the bundled whisper and Piper
models: ``--rounds`` times (at least 30), whisper transcribes 0.5-4.5 s of a Piper sentence, then
Piper speaks a sentence of 3-40 words (seeded, the same for every setting). After each round, the
process's RSS. Reported: the median RSS over the first and the last third of the rounds, the
highest, and the median time of whisper and of Piper on the 10-14-word sentences. A fourth
setting keeps the arena but calls ``malloc_trim`` after every sentence: what the trim alone gives
back (glibc's free pages, whisper's included).

    python tests/bench/ttsmem.py [--rounds 120] [--out tests/bench/results/ttsmem.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# keep: phoneme ids above which a run shrinks the arena; -1: never shrink, but malloc_trim after every
# sentence (tells the arena's share from glibc's and whisper's)
SETTINGS = {"arena kept (no shrink)": 10**9, "arena kept, malloc_trim after each sentence": -1,
            "shrink above 200 phonemes (the default)": 200, "shrink after every run": 0}

_ROUNDS = r"""
import json, os, random, re, statistics, sys, time
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})       # one core, the same for every setting
sys.path.insert(0, sys.argv[1])
import numpy as np
from ai import models
from ai.stt import WhisperSTT
from ai.tts import PiperTTS, _malloc_trim
keep, rounds = int(sys.argv[2]), int(sys.argv[3])
def rss():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) // 1024
tts = PiperTTS(*models.piper_voice(), threads=1)
tts.voice.session.keep = 10**9 if keep < 0 else keep
pcm = np.frombuffer(b"".join(tts.synthesize(
    "Hello, I would like to book a table for four people tomorrow evening.")), np.int16)
speech = np.interp(np.arange(0, len(pcm), tts.rate / 16000), np.arange(len(pcm)), pcm).astype(np.int16)
stt = WhisperSTT(str(models.whisper_dir()), threads=1)
stt.warm()
words = ("we can check the delivery date of that order for you right now and call you back "
         "tomorrow morning before nine if the warehouse has not shipped it yet").split()
rnd = random.Random(4)
series, t_stt, t_tts = [], [], []
for _ in range(rounds):
    clip = speech[: rnd.randint(8000, len(speech))].tobytes()
    a = time.perf_counter(); stt.transcribe(clip); t_stt.append(time.perf_counter() - a)
    n = rnd.choice([3, 6, 8, 10, 12, 12, 14, 18, 25, 40])
    k = rnd.randrange(len(words))
    text = " ".join((words[k:] + words[:k]) * 2)
    text = " ".join(text.split()[:n]) + "."
    a = time.perf_counter(); b"".join(tts.synthesize(text))
    if keep < 0:
        _malloc_trim()
    d = time.perf_counter() - a
    if 10 <= n <= 14:
        t_tts.append(d)
    series.append(rss())
k = len(series) // 3
print(json.dumps({"rss_mb_first_third": statistics.median(series[:k]),
                  "rss_mb_last_third": statistics.median(series[-k:]), "rss_mb_max": max(series),
                  "stt_ms_median": round(1000 * statistics.median(t_stt)),
                  "tts_12_words_ms_median": round(1000 * statistics.median(t_tts)),
                  "shrinks": tts.voice.session.shrinks, "series": series}))
"""


def run(keep: int, rounds: int) -> dict:
    cmd = [sys.executable, "-c", _ROUNDS, str(ROOT), str(keep), str(rounds)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + 10 * rounds)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {60 + 10 * rounds} s"}
    if out.returncode != 0:
        return {"error": out.stderr[-1500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(out_path: str, rounds: int = 120) -> dict:
    rounds = max(rounds, 30)                     # thirds of at least 10, and some 10-14-word sentences
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": rounds, "settings": {}}
    print(f"{'setting':45s} {'RSS MB first/last third':>23} {'max':>5} {'whisper ms':>10} {'Piper 12w ms':>12}")
    for name, keep in SETTINGS.items():
        r = res["settings"][name] = {"keep_phonemes": keep, **run(keep, rounds)}
        if "error" in r:
            print(f"{name:45s} failed: {r['error'][-300:]}")
            continue
        growth = 100 * (r["rss_mb_last_third"] - r["rss_mb_first_third"]) / r["rss_mb_first_third"]
        r["growth_pct"] = round(growth, 1)
        print(f"{name:45s} {r['rss_mb_first_third']:>9.0f} -> {r['rss_mb_last_third']:.0f} ({growth:+.1f} %)"
              f" {r['rss_mb_max']:>5} {r['stt_ms_median']:>10} {r['tts_12_words_ms_median']:>12}")
    Path(out_path).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=120)
    ap.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "ttsmem.json"))
    a = ap.parse_args()
    main(a.out, a.rounds)
