"""The built-in agent against a stock Pipecat bot, side by side (issue 17), measured at the caller.

The same caller (tests/voice.py: SIPp-signalled calls whose PCMU RTP this process sends and records
in real time, 20 ms) calls the same number on the same kind of cell, which is either

- ``agent``: a cell running the built-in voice agent (``--app agent``: faster-whisper tiny,
  SmolLM2-135M on llama.cpp, Piper joe, in the cell's inference process), or
- ``pipecat``: a cell whose number routes to a Pipecat bot over a Twilio Media Stream
  (``[numbers] "service" = { app = "stream", url = ..., protocol = "twilio" }``); the bot is
  tests/bench/pipecat_bot.py (the same three models through Pipecat's own services, with
  llama.cpp's OpenAI-compatible server as its LLM).

Per conversation: wait for the greeting, then Piper-synthesized questions (and, when ``../shared``
is there, two clips of real human speech cut from a recorded call). Figures, all at the caller:

- voice-to-voice: the end of the caller's speech (the last loud sample of the clip, not the
  padding after it) to the first loud reply packet received;
- barge-in quiet time: the caller starts talking over the second answer (0.3 s after it began);
  the time from the onset of that speech to the last loud reply packet before the caller stops
  (a reply that had already ended does not count);
- CPU per call: utime+stime from /proc over the whole conversation window, of the cell and every
  process under it (the agent's inference worker) for ``agent``; of the cell, the bot process and
  the llama.cpp server for ``pipecat``; divided by wall time and by the number of calls.

    python tests/bench/pipecat_vs_agent.py [--calls 1 3] [--out tests/bench/results/pipecat.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

import voice  # noqa: E402
from media import g711  # noqa: E402
from support import ROOT, SHARED, CellProcess, next_ports  # noqa: E402

QUESTIONS = [
    "What are your opening hours?",
    "Can I book a cleaning next Monday?",
    "How much does a check up cost?",
    "Do you take new patients?",
]
BARGE = "Wait, stop. I have another question."
SYSTEM_PROMPT = ("You are the receptionist of Acme Dental, open Monday to Friday 9 to 5. "
                 "Answer in one short sentence.")
# the same prompt, reply length and temperature as the Pipecat bot (and as tests/bench/agent.py)
# both cells: a call the caller abandons (SIPp killed, no BYE) ends 5 s after its RTP stops, and a
# cell told to stop does not wait the default 60 s drain for it
CELL_BASE = 'drain_timeout = 5.0\n[sip]\nrtp_timeout = 5.0\n'
AGENT_CONFIG = (f'[agent]\nsystem_prompt = "{SYSTEM_PROMPT}"\nmax_reply_tokens = 40\ntemperature = 0.3\n'
                'reprompt_after = 0.0\nhangup_after = 0.0\n')
HUMAN_PCAP = "testdata/sipp-realworld/pcap/lundgrel__Kamilla_babblar_lite.pcap"
LEVEL = 800                     # a packet whose peak passes this is "voice" (as in tests/voice.py)
TICKS = os.sysconf("SC_CLK_TCK")


# ---- caller audio -------------------------------------------------------------------------------
@dataclass
class Clip:
    """Caller speech at 8 kHz and where its voice starts and ends inside it (seconds)."""
    name: str
    pcm: bytes
    onset: float = 0.0
    offset: float = 0.0

    def __post_init__(self):
        x = np.abs(np.frombuffer(self.pcm, "<i2").astype(np.int32))
        frames = [x[i:i + 160].max() if x[i:i + 160].size else 0 for i in range(0, x.size, 160)]
        loud = [i for i, f in enumerate(frames) if f > LEVEL]
        self.onset = 0.02 * loud[0] if loud else 0.0
        self.offset = 0.02 * (loud[-1] + 1) if loud else len(self.pcm) / 16000

    @property
    def packets(self) -> list[bytes]:
        return voice.ulaw_packets(self.pcm)


def piper_clip(text: str) -> Clip:
    return Clip(text, voice.say(text))


def _pcap_payloads(path: Path) -> list[tuple[int, bytes]]:
    """(payload type, payload) of every RTP packet over IPv4/UDP in a classic pcap (Ethernet or raw)."""
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    link = struct.unpack(endian + "I", data[20:24])[0]
    l2 = {1: 14, 101: 0, 113: 16, 0: 4}.get(link)
    if l2 is None:
        raise ValueError(f"{path}: link type {link} not handled")
    out, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[off + 8:off + 12])[0]
        pkt = data[off + 16:off + 16 + incl]
        off += 16 + incl
        ip = pkt[l2:]
        if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != 17:
            continue
        rtp = ip[(ip[0] & 15) * 4 + 8:]
        if len(rtp) > 12 and rtp[0] >> 6 == 2:
            cc = rtp[0] & 15
            out.append((rtp[1] & 0x7F, rtp[12 + 4 * cc:]))
    return out


def human_clips(count: int = 2, shortest: float = 1.5, longest: float = 4.0) -> list[Clip]:
    """Utterances of real human speech cut from a recorded call in ../shared (PCMA RTP): runs of
    voice between pauses of at least 0.6 s, ``shortest``..``longest`` s long, with 0.2 s of the
    recording's own background before. Empty when ../shared is absent."""
    path = SHARED / HUMAN_PCAP
    if not path.exists():             # a fresh clone has no ../shared: the human clips are skipped
        print(f"skipping the human clips: {path} is absent (../shared; TRUNKLINE_SHARED points elsewhere)",
              file=sys.stderr)
        return []
    pcm = b"".join(g711.decode(pt, p) for pt, p in _pcap_payloads(path) if pt in (0, 8) and len(p) == 160)
    from media.vad import VoiceDetector
    vad = VoiceDetector(8000, mode=2)
    speech = [vad.is_speech(pcm[i:i + 320]) for i in range(0, len(pcm) - 319, 320)]
    clips, start, quiet = [], None, 0
    for i, s in enumerate(speech + [False] * 40):
        if s:
            start = i if start is None else start
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet >= 30:                     # 0.6 s of pause ends the utterance
                end = i - quiet + 1
                if shortest <= 0.02 * (end - start) <= longest:
                    a = max(0, start - 10)
                    clips.append(Clip(f"human{len(clips) + 1}", pcm[a * 320:(end + 5) * 320]))
                    if len(clips) == count:
                        break
                start, quiet = None, 0
    return clips


# ---- one caller's conversation ---------------------------------------------------------------------
@dataclass
class Conversation:
    v2v: list[float] = field(default_factory=list)          # Piper questions
    v2v_human: list[float] = field(default_factory=list)    # real speech clips
    greeting: float | None = None                           # call answered (first RTP) -> greeting heard
    barge: float | None = None                              # quiet time, or None when not measurable
    barge_wall: float | None = None                         # when the barge-in speech began (time.time())
    no_reply: int = 0
    talked_over: int = 0                                     # reply audio while the caller was talking
    reply_seconds: float = 0.0                               # loud reply audio heard in total
    error: str | None = None


def _loud_times(received, start: float, end: float | None = None) -> list[float]:
    out = []
    for t, pt, _, p in received:
        if pt == 0 and t >= start and (end is None or t < end):
            if np.abs(np.frombuffer(g711.ulaw_decode(p), "<i2")).max() > LEVEL:
                out.append(t)
    return out


def converse(cell, tmp: Path, idx: int, questions: list[Clip], barge: Clip | None, humans: list[Clip],
             reply_timeout: float = 40.0) -> Conversation:
    """One call: greeting, then each question (barge in on the second answer when ``barge``),
    then the human clips. Measured at the caller's RTP endpoint."""
    work = tmp / f"caller{idx}"
    work.mkdir()
    ports = next_ports()
    view = type("CellView", (), {"ports": dict(cell.ports, rtp_peer=ports["rtp_peer"], sipp=ports["sipp"]),
                                 "sip": cell.sip})()
    conv = Conversation()
    try:
        caller = voice.Caller(view, work, seconds=240)
    except AssertionError as exc:                                    # no call, or no RTP
        conv.error = f"call failed: {exc}"
        return conv
    answered = time.monotonic()
    try:
        caller.wait_reply(answered, timeout=60)
        first = _loud_times(caller.peer.received, answered)
        conv.greeting = round(first[0] - answered, 3) if first else None

        def turn(clip: Clip, out: list[float], interrupt: Clip | None = None) -> None:
            t0 = time.monotonic()
            caller.peer.stream(clip.packets)
            sent = time.monotonic()
            spoke_from, spoke_to = t0 + clip.onset, t0 + clip.offset
            conv.talked_over += len(_loud_times(caller.peer.received, spoke_from, spoke_to)) > 5
            deadline = sent + reply_timeout
            while time.monotonic() < deadline and not _loud_times(caller.peer.received, spoke_to):
                caller.silence(0.05)
            heard = _loud_times(caller.peer.received, spoke_to)
            if not heard:
                conv.no_reply += 1
                return
            out.append(heard[0] - spoke_to)
            if interrupt is not None:
                while time.monotonic() < heard[0] + 0.3:
                    caller.silence(0.02)
                tb = time.monotonic()
                caller.peer.stream(interrupt.packets)
                onset, offset = tb + interrupt.onset, tb + interrupt.offset
                conv.barge_wall = time.time() - (time.monotonic() - onset)
                playing = _loud_times(caller.peer.received, onset - 0.3, onset)
                during = _loud_times(caller.peer.received, onset, offset)
                if playing:
                    conv.barge = round((during[-1] - onset) if during else 0.0, 3)
                caller.wait_reply(offset, timeout=reply_timeout)       # the answer to the interruption
                late = _loud_times(caller.peer.received, offset)
                if late:
                    out.append(late[0] - offset)
                return
            caller.wait_reply(spoke_to, timeout=reply_timeout)

        for i, q in enumerate(questions):
            turn(q, conv.v2v, barge if i == 1 else None)
        for h in humans:
            turn(h, conv.v2v_human)
        caller.silence(0.5)
    except Exception as exc:             # noqa: BLE001 - no answer within the timeout (AssertionError) or worse
        conv.error = f"{type(exc).__name__}: {exc}"
    finally:
        conv.reply_seconds = round(0.02 * len(_loud_times(caller.peer.received, answered)), 2)
        caller.close()
    return conv


# ---- CPU from /proc -----------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(roots: list[int]) -> list[int]:
    """The roots and every process under them."""
    kids, out, todo = _children(), [], list(roots)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    out = {}
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[p] = sum(int(x) for x in f[11:15]) / TICKS        # utime stime cutime cstime
    return out


# ---- the two targets --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-3000:]}")


class Target:
    """A running stack a caller can call: ``agent`` (a cell with the built-in agent) or ``pipecat``
    (a cell routing the number to the Pipecat bot, the bot, and llama.cpp's server)."""

    def __init__(self, kind: str, tmp: Path, threads: int = 2):
        self.kind, self.tmp, self.threads = kind, tmp, threads
        self.procs: list[subprocess.Popen] = []
        self.cell: CellProcess | None = None

    def _spawn(self, name: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{name}.log"
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc, log

    def __enter__(self) -> "Target":
        try:
            if self.kind == "agent":
                self.cell = CellProcess(self.tmp, CELL_BASE + AGENT_CONFIG + f"[models]\nthreads = {self.threads}\n",
                                        args=("--app", "agent")).start(wait=False)
                self.cell.wait_healthy(timeout=180)
            elif self.kind == "pipecat":
                from ai import models
                llm_port, bot_port = free_port(), free_port()
                llm, log = self._spawn("llama-server", [
                    sys.executable, "-m", "llama_cpp.server", "--model", str(models.smollm2_gguf()),
                    "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(llm_port),
                    "--n_ctx", "2048", "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads),
                    # the server's default cancels a streaming answer when another request comes in:
                    # with several calls on one server, one call's question would cut another's reply
                    "--interrupt_requests", "False", "--verbose", "False"])
                _wait_http(f"http://127.0.0.1:{llm_port}/v1/models", llm, log, 120)
                bot, log = self._spawn("pipecat-bot", [
                    sys.executable, str(HERE / "pipecat_bot.py"), "--port", str(bot_port),
                    "--llm-url", f"http://127.0.0.1:{llm_port}/v1", "--threads", str(self.threads),
                    "--log-level", "DEBUG"])          # for the stage breakdown
                _wait_http(f"http://127.0.0.1:{bot_port}/healthz", bot, log, 120)
                self.cell = CellProcess(self.tmp, CELL_BASE + '[models]\nload = "never"\n[http]\noutbound_allow = ["127.0.0.1/32"]\n'
                                        '[numbers]\n"service" = { app = "stream", protocol = "twilio", '
                                        f'url = "ws://127.0.0.1:{bot_port}/ws" }}\n').start()
            else:
                raise ValueError(self.kind)
        except BaseException:
            self.__exit__()
            raise
        return self

    def roots(self) -> list[int]:
        return [self.cell.proc.pid] + [p.pid for p in self.procs]

    def __exit__(self, *exc) -> None:
        if self.cell is not None and self.cell.proc is not None:
            try:
                self.cell.stop()
            except AssertionError as e:
                print(f"warning: {e}"[:500], file=sys.stderr)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.tmp.glob("*.log")))


# ---- where the time goes, from each side's own logs (explanations only; the figures above are the caller's)
_LOGURU = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \| \w+\s*\| \S+ - (.*)$")


def pipecat_stages(log: str) -> dict:
    """Per answered turn of a one-call run, from the bot's DEBUG log: Smart Turn says the turn is
    complete (0.2 s of VAD silence after the speech) -> the user turn closes (it waits for Whisper's
    transcript of the whole segment) -> LLM request -> first sentence handed to TTS -> first audio out."""
    from datetime import datetime
    marks = []
    for line in log.splitlines():
        m = _LOGURU.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            marks.append((t, m.group(2)))
    turns, cur = [], None
    for t, msg in marks:
        if "End of Turn result: EndOfTurnState.COMPLETE" in msg and (cur is None or "stopped" not in cur):
            cur = cur if cur is not None and "eot" in cur else {"eot": t}
        elif "User stopped speaking" in msg:
            cur = {**(cur or {}), "stopped": t}
        elif cur is not None and "stopped" in cur:
            if msg.startswith("Transcription:") and "transcript" not in cur:
                cur["transcript"] = t
            elif "Generating LLM response" in msg and "llm" not in cur:
                cur["llm"] = t
            elif "Generating TTS" in msg and "llm" in cur and "tts" not in cur:
                cur["tts"] = t
            elif msg.startswith("Bot started speaking") and "tts" in cur:
                cur["audio"] = t
                turns.append(cur)
                cur = None

    def med(a: str, b: str) -> float | None:
        v = [x[b] - x[a] for x in turns if a in x and b in x]
        return round(statistics.median(v), 3) if v else None
    return {"turns": len(turns), "smart_turn_complete_to_turn_closed": med("eot", "stopped"),
            "turn_closed_to_llm_request": med("stopped", "llm"),
            "llm_first_sentence": med("llm", "tts"), "tts_first_audio": med("tts", "audio")}


def agent_stages(events: list[dict]) -> dict:
    """The built-in agent's own per-turn figures from the cell's events (as tests/bench/agent.py)."""
    callers = [e for e in events if e.get("event") == "turn" and e.get("role") == "caller" and "stt_seconds" in e]
    agents = [e for e in events if e.get("event") == "turn" and e.get("role") == "agent" and "llm_first_token" in e]

    def med(rows, key):
        v = [r[key] for r in rows if r.get(key) is not None]
        return round(statistics.median(v), 3) if v else None
    return {"turns": len(agents), "stt_seconds": med(callers, "stt_seconds"), "stt_wait": med(callers, "stt_wait"),
            "llm_first_token": med(agents, "llm_first_token"), "tts_first_audio": med(agents, "tts_first_audio"),
            "voice_to_voice_in_cell": round(statistics.median(v), 3) if (v := [
                e["seconds"] for e in events if e.get("event") == "voice_to_voice"]) else None}


# ---- a run: n callers at once against one target ---------------------------------------------------
def pct(v: list[float], p: float) -> float | None:
    """Nearest-rank percentile (as tests/bench/agent.py)."""
    v = sorted(v)
    return round(v[min(len(v) - 1, int(round(p / 100 * len(v) + 0.5)) - 1)], 3) if v else None


def run(kind: str, n: int, questions: list[Clip] | None = None, barge: Clip | None = None,
        humans: list[Clip] | None = None, reply_timeout: float = 40.0) -> dict:
    questions = [piper_clip(q) for q in QUESTIONS] if questions is None else questions
    humans = humans or []
    with tempfile.TemporaryDirectory() as td, Target(kind, Path(td)) as target:
        out: dict[int, Conversation] = {}

        def one(i: int) -> None:
            out[i] = converse(target.cell, Path(td), i, questions, barge, humans, reply_timeout)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        pids = tree(target.roots())
        c0, w0 = cpu_seconds(pids), time.monotonic()
        for i, th in enumerate(threads):
            th.start()
            time.sleep(1.5 * (i < n - 1))        # callers do not all talk in lockstep
        for th in threads:
            th.join()
        w1 = time.monotonic()
        c1 = cpu_seconds(sorted(set(pids) | set(tree(target.roots()))))
        cpu = sum(c1[p] - c0.get(p, 0.0) for p in c1)
        logs = target.logs() if any(c.error for c in out.values()) else ""
        load = os.getloadavg()[0]
        if kind == "agent":
            stages = agent_stages(target.cell.events())
        else:
            bot_log = (Path(td) / "pipecat-bot.log").read_text(errors="replace")
            stages = pipecat_stages(bot_log) if n == 1 else {}
    convs = [out[i] for i in range(n)]
    raw = {"target": kind, "calls": n,
           "v2v": [round(x, 3) for c in convs for x in c.v2v],
           "v2v_human": [round(x, 3) for c in convs for x in c.v2v_human],
           "barge": [c.barge for c in convs if c.barge is not None],
           "greetings": [c.greeting for c in convs if c.greeting is not None],
           "cpu_seconds": round(cpu, 2), "seconds": round(w1 - w0, 1),
           "no_reply": sum(c.no_reply for c in convs), "talked_over": sum(c.talked_over for c in convs),
           "reply_seconds": round(sum(c.reply_seconds for c in convs), 1),
           "errors": [c.error for c in convs if c.error], "stages": [stages] if stages else [],
           "load_1m": [round(load, 2)]}
    res = summarize(raw)
    if logs:
        res["logs_tail"] = logs[-6000:]
    return res


def summarize(raw: dict) -> dict:
    """The figures of one run, or of several runs of the same target and size pooled (``merge``)."""
    v2v, human, barges = raw["v2v"], raw["v2v_human"], raw["barge"]
    turns = len(v2v) + len(human)
    return {
        "target": raw["target"], "calls": raw["calls"], "turns": turns,
        "v2v_p50": pct(v2v, 50), "v2v_p95": pct(v2v, 95),
        "v2v_human_p50": pct(human, 50), "v2v_human_p95": pct(human, 95), "human_turns": len(human),
        "all_v2v_p50": pct(v2v + human, 50), "all_v2v_p95": pct(v2v + human, 95),
        "bargein_p50": pct(barges, 50), "bargein_max": max(barges) if barges else None,
        "bargein_measured": len(barges), "greeting_p50": pct(raw["greetings"], 50),
        "cpu_pct_per_call": round(100 * raw["cpu_seconds"] / raw["seconds"] / raw["calls"], 1),
        "cpu_seconds_per_turn": round(raw["cpu_seconds"] / max(1, turns), 2),
        "load_1m_max": max(raw["load_1m"]),
        **raw,
    }


def merge(runs: list[dict]) -> dict:
    """Pool repeated runs of one target and size: every turn counts once; CPU over all the time."""
    raw = {"target": runs[0]["target"], "calls": runs[0]["calls"]}
    for k in ("v2v", "v2v_human", "barge", "greetings", "errors", "stages", "load_1m"):
        raw[k] = [x for r in runs for x in r[k]]
    for k in ("cpu_seconds", "seconds", "no_reply", "talked_over", "reply_seconds"):
        raw[k] = round(sum(r[k] for r in runs), 2)
    return summarize(raw)


COLUMNS = [("target", 8), ("calls", 5), ("turns", 5), ("v2v_p50", 7), ("v2v_p95", 7), ("v2v_human_p50", 9),
           ("bargein_p50", 9), ("bargein_max", 9), ("greeting_p50", 8), ("cpu_pct_per_call", 9),
           ("cpu_seconds_per_turn", 10), ("no_reply", 5), ("load_1m_max", 5)]
HEADS = ["target", "calls", "turns", "v2v p50", "v2v p95", "human p50", "barge p50", "barge max", "greeting",
         "cpu%/call", "cpu s/turn", "miss", "load"]


def row(r: dict) -> str:
    return " ".join(f"{('-' if r[k] is None else r[k])!s:>{w}}" for k, w in COLUMNS)


def main(out_path: str, calls=(1, 3), kinds=("agent", "pipecat"), rounds: int = 2) -> dict:
    """``rounds`` rounds, the order of the targets reversed each round (the machine's load drifts:
    neither target always runs first); the table pools the rounds."""
    for text in QUESTIONS + [BARGE]:
        voice.say(text)                       # synthesize the caller's audio before any clock starts
    humans = human_clips()
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                       "load_before": os.getloadavg()[0], "note": "a shared machine: other jobs may run at once"},
           "command": "python tests/bench/run.py --only pipecat",
           "human_clips": [{"name": h.name, "seconds": round(len(h.pcm) / 16000, 2)} for h in humans],
           "runs": []}
    print("built-in agent vs Pipecat bot (same models: whisper tiny int8, SmolLM2-135M Q4_1, Piper joe), at the caller"
          + ("" if humans else f"\n(no real speech clips: {SHARED / HUMAN_PCAP} is absent)"))
    print(" ".join(f"{h:>{w}}" for h, (_, w) in zip(HEADS, COLUMNS)))
    for rnd in range(rounds):
        for n in calls:
            for kind in (kinds if rnd % 2 == 0 else kinds[::-1]):
                r = run(kind, n, barge=piper_clip(BARGE), humans=humans)
                res["runs"].append({"round": rnd + 1, **r})
                print(row(r), f" (round {rnd + 1})", flush=True)
                for e in r["errors"]:
                    print(f"  {kind}: {e}")
    res["pooled"] = [merge([r for r in res["runs"] if r["target"] == k and r["calls"] == n])
                     for n in calls for k in kinds]
    print(f"pooled over {rounds} round(s):")
    for r in res["pooled"]:
        print(row(r), flush=True)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(res, indent=2) + "\n")
    print(f"saved {out_path}")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--only", choices=["agent", "pipecat"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "pipecat.json"))
    a = ap.parse_args()
    main(a.out, calls=a.calls, kinds=(a.only,) if a.only else ("agent", "pipecat"), rounds=a.rounds)
