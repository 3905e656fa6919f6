"""Network impairment (issue 14): call quality and the agent's STT under loss, jitter, reordering and
a 2 s outage between the caller and a real cell.

`tc netem` is not available in this kernel (no sch_netem), so the impairment is a seeded userspace
relay in the caller's RTP path, both directions (tests/impair_net.py). Per condition:

- an echo call (``--app echo``, ``[media] clock_rate = 8000`` so the echoed audio is bit-exact):
  the caller streams pseudo-random G.711 frames for the call and records what comes back. Figures:
  the cell's own quality record for the call (``GET /v1/calls/{id}``: MOS, R, loss, jitter,
  jitter-buffer delay, lost and late-discarded packets), the E-model's MOS for the configured
  loss/delay (media/emodel.py, with the cell's own packet/look-ahead/jitter-buffer terms), what the
  relay did (packets lost, delayed, reordered, dropped by the outage), and the PLC frames: the
  echoed audio is the cell's jitter-buffer output, so each echoed sample either matches the
  caller's own audio (found by an 8-sample fingerprint), is silence, or was made up by the cell's
  packet-loss concealment; concealed samples / 160 = PLC frames (while the caller talks; the
  frames concealed after its last packet are counted apart). "MOS (E-model, unplayed)" is the
  E-model's MOS with, as the loss, the caller's frames the cell did not play: its PLC frames (late
  packets the jitter buffer could not use included), or the packets it counted lost when that is
  more (during the outage nothing comes back to show the concealment). Whether the call survived: the caller's
  BYE got its 200 and echoed audio came back after the outage.
- an agent call (``--app agent``, the bundled models): Piper phrases with known text (and, when
  ../shared is there, two clips of real human speech, scored against the clean call's transcript,
  as they have no reference text: JSON only, see ``score``), each followed by the agent's reply; the
  word error rate of the agent's own transcripts (turns.jsonl) against the reference text. Under the outage condition the
  outage starts 0.5 s into the first utterance.

    python tests/bench/impair.py [--seconds 15] [--no-agent] [--out tests/bench/results/impair.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from impair_net import Impairment, impaired_caller  # noqa: E402
from media import emodel  # noqa: E402
from support import Api, CellProcess, create_key  # noqa: E402

CONDITIONS = [
    Impairment("clean"),
    Impairment("loss 1%", loss=0.01),
    Impairment("loss 5%", loss=0.05),
    Impairment("jitter 30 ms", delay=0.030, jitter=0.030),
    Impairment("reorder 10%", reorder=0.10, reorder_gap=0.045),
    Impairment("outage 2 s", outage_at=4.0, outage=2.0),
]
ECHO_CONFIG = "[media]\nclock_rate = 8000\n"
AGENT_CONFIG = ('drain_timeout = 5.0\n[sip]\nrtp_timeout = 5.0\n'
                '[agent]\nsystem_prompt = "You are the receptionist of Acme Dental, open Monday to Friday 9 to 5. '
                'Answer in one short sentence."\nmax_reply_tokens = 24\nreprompt_after = 0.0\nhangup_after = 0.0\n')
PHRASES = [
    "I would like to book an appointment for a cleaning.",
    "Can you transfer me to the billing department please?",
    "How long does a root canal usually take?",
]
FRAME = 160
WINDOW = 8                      # samples in a fingerprint


# ---- the caller's audio and what came back ----------------------------------------------------------
def noise_frames(count: int, seed: int = 14) -> list[bytes]:
    """PCMU frames of pseudo-random loud noise: no byte is (near) silence, so any 8-byte window
    identifies its place in the stream."""
    rng = random.Random(seed)
    codes = [c for c in range(256) if c not in (0x7E, 0x7F, 0xFE, 0xFF)]
    return [bytes(rng.choice(codes) for _ in range(FRAME)) for _ in range(count)]


def _silent(b: int) -> bool:
    return b in (0x7E, 0x7F, 0xFE, 0xFF)


def classify_echo(sent: list[bytes], received: list[tuple]) -> dict:
    """Samples of the echoed PCMU that are the caller's own audio, silence, or concealment, and the
    downlink's sequence gaps. ``received`` are RtpPeer tuples (t, pt, seq, payload)."""
    index = {}
    stream = b"".join(sent)
    for k in range(len(stream) - WINDOW + 1):
        index.setdefault(stream[k:k + WINDOW], k)
    rows = []                                   # (t, own, silent, concealed) per packet
    for t, pt, _, p in received:
        if pt != 0:
            continue
        hit = bytearray(len(p))
        for k in range(len(p) - WINDOW + 1):
            if p[k:k + WINDOW] in index:
                hit[k:k + WINDOW] = b"\x01" * WINDOW
        m = sum(hit)
        s = sum(1 for i, b in enumerate(p) if not hit[i] and _silent(b))
        rows.append((t, m, s, len(p) - m - s))
    matched, silence, concealed = (sum(r[i] for r in rows) for i in (1, 2, 3))
    match_times = [r[0] for r in rows if r[1]]
    last_match_t = match_times[-1] if match_times else None
    # concealment while the caller was talking (not the few frames the cell conceals after its last packet)
    during = sum(r[3] for r in rows if match_times and match_times[0] <= r[0] <= last_match_t)
    seqs = sorted({seq for _, pt, seq, _ in received if pt == 0})
    # unwrap is not needed for a short call unless the start is near 65535: handle it anyway
    if seqs and seqs[-1] - seqs[0] > 0x8000:
        seqs = sorted((s + 0x10000) if s < 0x8000 else s for s in seqs)
    expected = seqs[-1] - seqs[0] + 1 if seqs else 0
    arrivals = sorted(t for t, pt, _, _ in received if pt == 0)
    gaps = np.diff(arrivals) if len(arrivals) > 1 else np.array([0.0])
    mgaps = np.diff(match_times) if len(match_times) > 1 else np.array([0.0])
    return {"echo_samples_own": matched, "echo_samples_silence": silence, "echo_samples_concealed": concealed,
            "plc_frames": round(during / FRAME, 1), "plc_frames_with_tail": round(concealed / FRAME, 1),
            "down_packets": len(arrivals), "down_lost": expected - len(seqs),
            "down_loss_ratio": round((expected - len(seqs)) / expected, 4) if expected else 0.0,
            "longest_rx_gap_s": round(float(gaps.max()), 3),
            "longest_echo_gap_s": round(float(mgaps.max()), 3),
            "last_echo_t": last_match_t}


def predicted_mos(imp: Impairment, seconds: float, jb_delay_ms: float) -> tuple[float, float, float]:
    """The E-model's MOS for the configured impairment: loss (the outage counts as loss over the
    call) and one-way delay = the configured network delay + the terms the cell adds itself
    (one 20 ms packet, 5 ms look-ahead, its jitter buffer)."""
    loss = imp.loss + (imp.outage / seconds if imp.outage_at is not None else 0.0)
    delay = 1000 * imp.mean_delay + 20 + 5 + jb_delay_ms
    return round(emodel.mos("PCMU", 100 * loss, delay, imp.burst_ratio), 3), round(100 * loss, 2), round(delay, 1)


def read_call(api: Api, call_id: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st, body, _ = api.get(f"/v1/calls/{call_id}")
        if st == 200 and body.get("quality") or time.monotonic() > deadline:
            return body if st == 200 else {}
        time.sleep(0.2)


def echo_call(cell: CellProcess, api: Api, tmp: Path, imp: Impairment, seconds: float, slot: int = 0) -> dict:
    """One echo call through the impairer; ``seconds`` of the caller's audio, then its BYE."""
    work = tmp / f"echo-{imp.name.replace(' ', '_').replace('%', 'pct')}"
    work.mkdir()
    ended_before = len(cell.events("call_ended"))
    frames = noise_frames(int(seconds * 50))
    caller = impaired_caller(cell, work, imp, seconds=seconds + 1.5, scenario="call_pcmu.xml", slot=slot)
    t_first = time.monotonic()
    try:
        caller.peer.stream(frames)
        caller.peer.collect(0.5)
        try:
            rc = caller.proc.wait(seconds + 30)
        except Exception:  # noqa: BLE001 - reported as a failed call below
            rc = None
        relay = caller.relay.stats()
        received = list(caller.peer.received)
    finally:
        caller.close()
    ended = cell.wait_event("call_ended", ended_before + 1, timeout=30)[ended_before]
    body = read_call(api, ended["call_id"])
    q = body.get("quality") or {}
    echo = classify_echo(frames, received)
    pred, pred_loss, pred_delay = predicted_mos(imp, seconds, q.get("jb_delay_ms", 0.0))
    unplayed = max(echo["plc_frames"], (q.get("rx_lost") or 0) + (q.get("rx_discarded") or 0))
    heard_loss = min(1.0, unplayed / len(frames))
    mos_heard = emodel.mos("PCMU", 100 * heard_loss, q.get("delay_ms", pred_delay))
    out = {"condition": imp.name, "impairment": {k: v for k, v in vars(imp).items() if k != "name"},
           "sipp_rc": rc, "reason": ended.get("reason"), "duration": ended.get("duration"),
           "mos": q.get("mos"), "r_factor": q.get("r_factor"), "mos_emodel": pred,
           "mos_unplayed": round(mos_heard, 3), "unplayed_ratio": round(heard_loss, 4),
           "emodel_loss_pct": pred_loss, "emodel_delay_ms": pred_delay,
           "cell_loss_ratio": q.get("loss_ratio"), "cell_late_ratio": q.get("late_ratio"),
           "cell_rx_lost": q.get("rx_lost"), "cell_jb_discarded": q.get("jb_discarded"),
           "cell_rx_discarded": q.get("rx_discarded"), "cell_rx_packets": q.get("rx_packets"),
           "jitter_ms": q.get("rx_jitter_ms"), "jb_delay_ms": q.get("jb_delay_ms"),
           "cell_delay_ms": q.get("delay_ms"), "relay": relay, **echo}
    last = echo.pop("last_echo_t")
    out.pop("last_echo_t", None)
    if imp.outage_at is not None:
        out["outage_end_s"] = imp.outage_at + imp.outage
        out["echo_after_outage_s"] = round(last - t_first - (imp.outage_at + imp.outage), 2) if last else None
    return out


def run_echo(seconds: float, conditions=CONDITIONS) -> list[dict]:
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        cell = CellProcess(tmp, ECHO_CONFIG, ("--app", "echo")).start()
        try:
            api = Api(cell, create_key(cell.data, scope="read"))
            return [echo_call(cell, api, tmp, imp, seconds, i % 2) for i, imp in enumerate(conditions)]
        finally:
            cell.stop()


# ---- the agent's STT ---------------------------------------------------------------------------------
def _utterances() -> list[tuple[str, bytes, str | None]]:
    """(name, 8 kHz PCM, reference text or None) for Piper phrases and, with ../shared, human clips."""
    import voice
    from pipecat_vs_agent import human_clips
    out = [(f"piper{i + 1}", voice.say(text), text) for i, text in enumerate(PHRASES)]
    clips = human_clips()
    if not clips:                       # a fresh clone has no ../shared: Piper phrases only
        print("impair: skipping the human clips (../shared is absent; TRUNKLINE_SHARED points at it)", flush=True)
    out += [(c.name, c.pcm, None) for c in clips]
    return out


def agent_call(cell: CellProcess, tmp: Path, imp: Impairment, utterances, slot: int = 0) -> dict:
    import voice
    from bridge.records.journal import CallRecords
    work = tmp / f"agent-{imp.name.replace(' ', '_').replace('%', 'pct')}"
    work.mkdir()
    answered_before = len(cell.events("call_answered"))
    hand_outage = imp.outage_at is not None
    caller = impaired_caller(cell, work, replace(imp, outage_at=None) if hand_outage else imp, seconds=300,
                             slot=slot)
    starts, no_reply = [], 0
    try:
        call_id = cell.wait_event("call_answered", answered_before + 1)[answered_before]["call_id"]
        caller.wait_reply(time.monotonic(), timeout=60)          # the greeting
        for i, (name, pcm, _) in enumerate(utterances):
            starts.append(time.time())
            if hand_outage and i == 0:
                threading.Timer(0.5, caller.relay.outage, (imp.outage,)).start()
            caller.peer.stream(voice.ulaw_packets(pcm))
            try:
                caller.wait_reply(time.monotonic(), timeout=45)
            except AssertionError:
                no_reply += 1
        caller.silence(1.0)
        relay = caller.relay.stats()
    finally:
        caller.close()
    time.sleep(1.0)
    turns = [t for t in CallRecords(str(cell.data), name="turns.jsonl").read()
             if t.get("call_id") == call_id and t.get("role") == "caller"]
    heard = {name: [] for name, _, _ in utterances}
    for t in turns:
        i = max([k for k, s in enumerate(starts) if s <= t.get("at", 0)], default=None)
        if i is not None:
            heard[utterances[i][0]].append(t.get("text") or "")
    return {"condition": imp.name, "call_id": call_id, "no_reply": no_reply, "relay": relay,
            "heard": {k: " ".join(v).strip() for k, v in heard.items()}}


def score(results: list[dict], utterances) -> None:
    """Add the WER of each condition: Piper phrases against their text, human clips against what
    the agent heard of them on the clean call (kept in the JSON only: the clips in ../shared are
    Swedish, and the English tiny model's transcripts of them change from run to run even on a
    clean line, so that figure says little about the network)."""
    from agent import wer
    clean = next((r for r in results if r["condition"] == "clean"), None)
    for r in results:
        pe = pn = he = hn = 0
        for name, _, ref in utterances:
            hyp = r["heard"].get(name, "")
            if ref is not None:
                e, n = wer(ref, hyp)
                pe, pn = pe + e, pn + n
            elif clean is not None and clean["heard"].get(name):
                e, n = wer(clean["heard"][name], hyp)
                he, hn = he + e, hn + n
        r["wer_piper"] = round(pe / pn, 3) if pn else None
        r["piper_words"] = pn
        r["wer_human_vs_clean"] = round(he / hn, 3) if hn else None
        r["human_words"] = hn


def run_agent(conditions=CONDITIONS) -> dict:
    utterances = _utterances()
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        cell = CellProcess(tmp, AGENT_CONFIG, ("--app", "agent")).start()
        try:
            cell.wait_healthy(120)
            results = [agent_call(cell, tmp, imp, utterances, i % 2) for i, imp in enumerate(conditions)]
        finally:
            cell.stop()
    score(results, utterances)
    return {"utterances": [{"name": n, "seconds": round(len(p) / 16000, 2), "reference": ref}
                           for n, p, ref in utterances], "calls": results}


# ---- the report ------------------------------------------------------------------------------------------
def table(echo: list[dict], agent: dict | None) -> str:
    wers = {r["condition"]: r for r in (agent or {}).get("calls", [])}
    lines = ["| condition | MOS (cell) | MOS (E-model, configured) | MOS (E-model, unplayed) | loss up (relay / cell) "
             "| jitter ms | JB delay ms | PLC frames | STT WER | call survived |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in echo:
        a = wers.get(r["condition"], {})
        up = r["relay"]["up"]
        survived = r["sipp_rc"] == 0 and r["reason"] == "remote bye"
        lines.append(
            f"| {r['condition']} | {r['mos']} | {r['mos_emodel']} | {r['mos_unplayed']} | {up['loss_ratio']:.1%} / "
            f"{(r['cell_loss_ratio'] or 0):.1%} | {r['jitter_ms']:.1f} | "
            f"{r['jb_delay_ms']:.0f} | {r['plc_frames']:.0f} | "
            f"{'' if a.get('wer_piper') is None else format(a['wer_piper'], '.0%')} | "
            f"{'yes' if survived else 'NO'} |")
    return "\n".join(lines)


def main(out_path: str, seconds: float = 15.0, agent: bool = True) -> dict:
    res = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "impairer": "userspace UDP relay in the caller's RTP path, both directions (tests/impair_net.py); "
                       "tc netem is not available in this kernel",
           "seconds_per_echo_call": seconds}
    res["echo"] = run_echo(seconds)
    res["agent"] = run_agent() if agent else None
    res["table"] = table(res["echo"], res["agent"])
    print(res["table"])
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nsaved {out_path}\n")
    return res


def jitter_sweep(specs: list[str], seconds: float) -> list[dict]:
    """The echo conditions that the jitter buffer decides (clean, 1 % loss, 30 ms jitter,
    reordering) once per ``[media] jitter_init_ms/jitter_min_ms`` pair ("40/40", "-1/-1")."""
    global ECHO_CONFIG
    base, rows = ECHO_CONFIG, []
    names = ("clean", "loss 1%", "jitter 30 ms", "reorder 10%")
    try:
        for spec in specs:
            init, _, low = spec.partition("/")
            ECHO_CONFIG = base + f"jitter_init_ms = {int(init)}\njitter_min_ms = {int(low or init)}\n"
            for r in run_echo(seconds, [c for c in CONDITIONS if c.name in names]):
                row = {"jb": spec, "condition": r["condition"], "jb_delay_ms": r["jb_delay_ms"],
                       "late": r["cell_late_ratio"], "plc_frames": r["plc_frames"], "mos_unplayed": r["mos_unplayed"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        ECHO_CONFIG = base
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--no-agent", action="store_true")
    ap.add_argument("--jb", action="append", default=[], metavar="INIT/MIN",
                    help="only the jitter-buffer sweep: echo calls per prefetch pair, e.g. --jb=-1/-1 --jb=40/40")
    ap.add_argument("--out", default=str(HERE / "results" / "impair.json"))
    a = ap.parse_args()
    if a.jb:
        jitter_sweep(a.jb, a.seconds)
    else:
        main(a.out, a.seconds, not a.no_agent)
