"""Long calls (issue 14): a 2-hour agent call, accelerated where the pipeline allows.

Three parts, each bounded in time:

- ``dialog``: the turn machine (``bridge.agent.turn.TurnMachine``, with its real
  endpointer, playout and ``Dialog``) on a synthetic clock, driven through two hours
  of back-and-forth dialogue with a fake at the model boundary. Every prompt the
  machine sends is counted in the bundled model's real tokens (its tokenizer only,
  ``vocab_only``): history truncation (``history_turns``) and the prompt size must
  stay flat however long the call.
- ``llm``: the real llama.cpp adapter (``ai.llm.LlamaChat``, what the inference
  process runs) for a few hundred rounds of a growing conversation: prompt tokens,
  tokens re-used from the KV cache, tokens evaluated and seconds per round, and
  whether the context window (``llm_context``) ever overflows.
- ``call``: one real agent call (a ``trunkline serve --app agent`` cell with the
  bundled models, a SIPp-signalled caller speaking Piper speech over PCMU) asking
  question after question for a few minutes, while /proc is sampled for the RSS/PSS
  of the cell and of its inference process.

    python tests/bench/run.py --only longcall       # all three, figures to results/longcall.json
"""
from __future__ import annotations

import copy
import functools
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.agent import actions as A  # noqa: E402
from bridge.agent.turn import AT_REST, TurnMachine  # noqa: E402
from bridge.core.config import DEFAULTS  # noqa: E402

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")
STEP = 0.02                                     # one 20 ms frame

# What the caller says, turn after turn: mostly short, now and then a long ramble.
CALLER_LINES = [
    "What are your opening hours?",
    "Can I book a cleaning next Monday?",
    "How much does a check up cost?",
    "Do you take new patients?",
    ("Well, let me explain, I moved here from another city last month and my old dentist told me that "
     "I should have my wisdom teeth looked at soon, and I also have a crown that feels a little loose "
     "when I eat something hard, so I was wondering whether you could fit me in this week, ideally in "
     "the morning before work, and whether my insurance from my new employer would cover any of it."),
    "My number is five five five, one two three four.",
    "Is there parking near the clinic?",
]
AGENT_LINES = [
    "We are open Monday to Friday from nine to five.",
    "Yes, Monday at ten is free. Shall I book it for you?",
    "A check up costs eighty dollars without insurance.",
    "Yes, we are happy to take new patients.",
    ("I am sorry to hear about the crown. We can see you on Thursday at eight, before work, and we will "
     "look at your wisdom teeth at the same visit. Most plans cover a check up, so please bring your card."),
]


# -- tokens ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _vocab():
    """The bundled model's tokenizer alone (no weights): a tenth of a second to load."""
    from llama_cpp import Llama

    from ai import models
    return Llama(model_path=str(models.smollm2_gguf()), vocab_only=True, verbose=False)


def count_tokens(text: str) -> int:
    return len(_vocab().tokenize(text.encode("utf-8"), add_bos=False, special=True))


@functools.lru_cache(maxsize=4096)
def _message_tokens(role: str, content: str) -> int:
    return count_tokens(f"<|im_start|>{role}\n{content}<|im_end|>\n")


def chatml_tokens(messages: list[dict]) -> int:
    """Tokens of ``messages`` as the bundled model's ChatML template renders them (with the
    generation prompt), the way llama.cpp sees the prompt. Each message starts with a special
    token, so the count is the sum of the messages' counts (cached)."""
    return sum(_message_tokens(m["role"], m.get("content") or "") for m in messages) + \
        _message_tokens("assistant", "") - 2          # the generation prompt: no <|im_end|>\n


# -- part 1: the turn machine at the model boundary ----------------------------------------------------
@dataclass
class Prompt:
    """One request the machine made to the model."""
    turn: int
    at: float                                   # synthetic call time (s since answer)
    messages: int
    tokens: int
    user: str                                   # the caller's last message in it


@dataclass
class DialogRun:
    cfg: dict
    turns: int = 0
    call_seconds: float = 0.0
    prompts: list[Prompt] = field(default_factory=list)
    history_len: int = 0
    history_bytes: int = 0
    apologies: int = 0
    wall_seconds: float = 0.0

    def summary(self) -> dict:
        toks = [p.tokens for p in self.prompts]
        msgs = [p.messages for p in self.prompts]
        k = max(1, len(toks) // 10)
        return {"turns": self.turns, "call_minutes": round(self.call_seconds / 60, 1),
                "history_turns": self.cfg["history_turns"], "prompts": len(self.prompts),
                "prompt_messages_max": max(msgs), "prompt_tokens_max": max(toks),
                "prompt_tokens_first_tenth_mean": round(statistics.mean(toks[:k]), 1),
                "prompt_tokens_last_tenth_mean": round(statistics.mean(toks[-k:]), 1),
                "history_messages_kept": self.history_len, "history_kb": round(self.history_bytes / 1024, 1),
                "apologies": self.apologies, "wall_seconds": round(self.wall_seconds, 2)}


class MachineCall:
    """Drives a ``TurnMachine`` as ``AgentApp`` and the media clock do, on a synthetic clock, with
    a fake at the model boundary: every STT request is answered with the caller's line, every reply
    request with the agent's next line (as tokens), every sentence synthesized to a few frames."""

    def __init__(self, **cfg):
        conf = copy.deepcopy(DEFAULTS["agent"])
        conf.update(reprompt_after=0.0, hangup_after=0.0, interim_every=0.0, turn_model="none")
        conf.update(cfg)
        self.cfg = conf
        self.canned = {k: [bytes(320)] * 5 for k in (
            "greeting", "reprompt_text", "goodbye_text", "not_understood_text", "apology_text")}
        self.t0 = self.now = 100.0
        self.m = TurnMachine(conf, self.canned, call_id="long", now=self.now)
        self.downlink: list[bytes] = []
        self.mark_time: float | None = None
        self.marked: bytes | None = None
        self.saying = ""                         # what the caller says this turn (STT's answer)
        self.replies = 0
        self.run = DialogRun(conf)

    def _line(self) -> A.Line:
        return A.Line(len(self.downlink), self.mark_time, 0)

    def _do(self, actions: list[A.Action]) -> None:
        todo = list(actions)
        while todo:
            a = todo.pop(0)
            m, now = self.m, self.now
            match a:
                case A.Send(frames=frames):
                    self.downlink.extend(frames)
                case A.MarkFrame(pcm=pcm):
                    self.marked = pcm
                case A.ClearMark():
                    self.mark_time = None
                case A.RequestStt(decode=d, interim=False):
                    todo += m.stt_result(d, A.Transcript(self.saying, 0.01, -0.2, 2.0, 0.1), now)
                case A.RequestStt(decode=d):
                    todo += m.interim_failed(d, now)
                case A.ScoreTurn(decision=d):
                    todo += m.turn_failed(d, "no end-of-turn model loaded", now)
                case A.RequestReply(reply=None):
                    pass                             # the KV-cache warm-up
                case A.RequestReply(reply=r, messages=msgs):
                    users = [x for x in msgs if x["role"] == "user"]
                    self.run.prompts.append(Prompt(self.m.turn_no, now - self.t0, len(msgs), chatml_tokens(msgs),
                                                   users[-1]["content"] if users else ""))
                    text = AGENT_LINES[self.replies % len(AGENT_LINES)]
                    self.replies += 1
                    for tok in re.findall(r"\S+\s*", text):
                        todo += m.token(r, tok, now)
                    todo += m.reply_done(r, 0.2, len(text.split()), now)
                case A.Synthesize(reply=r, seq=seq, text=text):
                    frames = [bytes(320)] * max(2, len(text) // 15)     # ~15 characters a frame: quick playout
                    todo += m.speech_audio(r, seq, frames, now)
                    todo += m.speech_done(r, now)
                case A.LogTurn(extra=extra) if extra.get("kind") == "apology_text":
                    self.run.apologies += 1
                case _:
                    pass

    def step(self, voiced: bool) -> None:
        """20 ms: one uplink frame, the tick, and the clock sending one downlink frame."""
        self.now += STEP
        f = A.Frame(self.now, bytes(640), voiced, -20.0 if voiced else -70.0)
        self._do(self.m.frame(f, self.now, self._line()))
        self._do(self.m.tick(self.now, self._line()))
        if self.downlink:
            sent = self.downlink.pop(0)
            if self.marked is not None and sent is self.marked:
                self.mark_time, self.marked = self.now, None

    def answer(self) -> None:
        self._do(self.m.answered(self.now))
        self._settle()

    def _settle(self, limit: float = 30.0) -> None:
        """Silence until the agent has finished talking and the machine is at rest."""
        end = self.now + limit
        while self.now < end:
            self.step(False)
            if self.m.state in AT_REST and not self.m.speaking() and not self.downlink and \
                    not self.m.ep.in_speech and self.m.decode is None:
                return
        raise AssertionError(f"the machine did not come to rest (state {self.m.state})")

    def turn(self, text: str) -> None:
        """The caller says ``text`` (about 15 characters a second of voice, at most 8 s), then waits
        for the reply."""
        self.saying = text
        for _ in range(int(min(8.0, max(0.5, len(text) / 15)) / STEP)):
            self.step(True)
        self._settle()
        self.run.turns += 1

    def finish(self) -> DialogRun:
        h = self.m.history
        self.run.call_seconds = self.now - self.t0
        self.run.history_len = len(h)
        self.run.history_bytes = len(json.dumps(h))
        return self.run


def dialog_run(minutes: float = 120.0, max_turns: int = 5000, **cfg) -> DialogRun:
    """Back-and-forth dialogue until ``minutes`` of call time (synthetic clock) have passed."""
    start = time.perf_counter()
    call = MachineCall(**cfg)
    call.answer()
    i = 0
    while call.now - call.t0 < minutes * 60 and i < max_turns:
        call.turn(CALLER_LINES[i % len(CALLER_LINES)])
        i += 1
    run = call.finish()
    run.wall_seconds = time.perf_counter() - start
    return run


# -- part 2: the real llama.cpp adapter --------------------------------------------------------------
def _prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def llm_rounds(rounds: int = 200, n_ctx: int = 2048, history_turns: int = 6, max_tokens: int = 60,
               system_prompt: str | None = None, threads: int = 2, deadline: float | None = None) -> dict:
    """``rounds`` real LLM rounds of one growing conversation through ``LlamaChat`` (the adapter
    the inference process runs), its history cut by ``Dialog`` as on a call. Per round: prompt
    tokens, tokens re-used from the KV cache, tokens evaluated, seconds; errors by message."""
    from ai import models
    from ai.llm import GenParams, LlamaChat
    from bridge.agent.dialog import Dialog
    cfg = {**DEFAULTS["agent"], "history_turns": history_turns}
    if system_prompt is not None:
        cfg["system_prompt"] = system_prompt
    chat = LlamaChat(str(models.smollm2_gguf()), n_ctx=n_ctx, threads=threads, conversations=1)
    dialog = Dialog(cfg)
    dialog.add_assistant(cfg["greeting"])
    p = GenParams(max_tokens=max_tokens, temperature=0.0, repeat_penalty=cfg["repeat_penalty"])
    rows, errors = [], {}
    for i in range(rounds):
        if deadline is not None and time.monotonic() > deadline:
            break
        dialog.add_user(CALLER_LINES[i % len(CALLER_LINES)])
        msgs = dialog.messages()
        llm = chat._llama("call")
        before = list(llm.input_ids[:llm.n_tokens])
        t, cpu = time.perf_counter(), time.process_time()
        pieces = []
        try:
            pieces = [c for c in chat.stream("call", msgs, p) if isinstance(c, str)]
        except Exception as exc:  # noqa: BLE001 - counted: the point is whether this happens
            key = f"{type(exc).__name__}: {re.sub(r'[0-9]+', 'N', str(exc))}"
            errors[key] = errors.get(key, 0) + 1
        secs, cpu = time.perf_counter() - t, time.process_time() - cpu
        after = list(llm.input_ids[:llm.n_tokens])
        prompt = max(0, len(after) - len(pieces))        # what was evaluated minus what was generated
        reused = min(_prefix(before, after), prompt)
        reply = "".join(pieces).strip()
        dialog.add_assistant(reply or AGENT_LINES[i % len(AGENT_LINES)])
        rows.append({"round": i + 1, "sent_messages": len(msgs), "sent_tokens": chatml_tokens(msgs),
                     "prompt_tokens": prompt if pieces else None, "reused": reused if pieces else None,
                     "evaluated": prompt - reused if pieces else None, "seconds": round(secs, 3),
                     "cpu_seconds": round(cpu, 3),
                     "ok": bool(pieces)})
    ok = [r for r in rows if r["ok"]]
    half = ok[len(ok) // 2:]
    early = ok[3:3 + max(1, len(ok) // 4)]                # after the first (cold) rounds
    return {
        "n_ctx": n_ctx, "history_turns": history_turns, "max_tokens": max_tokens, "rounds": len(rows),
        "ok": len(ok), "errors": errors, "trimmed": chat.trimmed,
        "sent_tokens_max": max(r["sent_tokens"] for r in rows) if rows else None,
        "prompt_tokens_max": max((r["prompt_tokens"] for r in ok), default=None),
        "reused_median": statistics.median(r["reused"] for r in ok) if ok else None,
        "evaluated_median": statistics.median(r["evaluated"] for r in ok) if ok else None,
        "seconds_early_median": round(statistics.median(r["seconds"] for r in early), 3) if early else None,
        "seconds_late_median": round(statistics.median(r["seconds"] for r in half), 3) if half else None,
        # CPU seconds (this process, llama.cpp's threads included): unlike wall time, not inflated
        # by whatever else runs on the machine.
        "cpu_early_median": round(statistics.median(r["cpu_seconds"] for r in early), 3) if early else None,
        "cpu_late_median": round(statistics.median(r["cpu_seconds"] for r in half), 3) if half else None,
        "per_round": rows,
    }


# -- part 3: a real call, /proc sampled --------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def proc_memory(pid: int) -> dict | None:
    """RSS, its anonymous part (the heap: what a leak grows; the rest is mapped files such as the
    model weights, paged in as they are used), PSS (kB) and CPU seconds of a process, or None."""
    status = _read(f"/proc/{pid}/status")
    if not status:
        return None

    def kb(pattern: str, text: str) -> int:
        m = re.search(pattern, text, re.M)
        return int(m.group(1)) if m else 0
    st = _read(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
    return {"rss_kb": kb(r"^VmRSS:\s+(\d+)", status), "anon_kb": kb(r"^RssAnon:\s+(\d+)", status),
            "pss_kb": kb(r"^Pss:\s+(\d+)", _read(f"/proc/{pid}/smaps_rollup")),
            "cpu_s": (int(st[11]) + int(st[12])) / TICKS if len(st) > 12 else 0.0}


def inference_pid(cell_pid: int) -> int | None:
    """The cell's inference process: its child running ``ai.worker``."""
    for p in os.listdir("/proc"):
        if p.isdigit():
            st = _read(f"/proc/{p}/stat")
            try:
                ppid = int(st.rsplit(")", 1)[1].split()[1]) if st else -1
            except (IndexError, ValueError):
                continue
            if ppid == cell_pid and "ai.worker" in _read(f"/proc/{p}/cmdline").replace("\0", " "):
                return int(p)
    return None


class Sampler:
    """Samples the memory of the cell and its inference process every ``period`` s in a thread."""

    def __init__(self, cell_pid: int, period: float = 2.0):
        self.pids = {"cell": cell_pid}
        self.period = period
        self.samples: list[dict] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            if "inference" not in self.pids:
                w = inference_pid(self.pids["cell"])
                if w:
                    self.pids["inference"] = w
            row = {"t": round(time.monotonic() - self.t0, 1)}
            for role, pid in self.pids.items():
                s = proc_memory(pid)
                if s:
                    row[role] = s
            self.samples.append(row)
            self._stop.wait(self.period)

    def growth(self, after: float, until: float | None = None) -> dict:
        """Per process: median PSS/RSS of the first and the last third of the samples taken between
        ``after`` s (the warm-up) and ``until``, and the growth between them. (PSS also moves when
        other processes sharing the same libraries come and go; RSS is this process's own.)"""
        out = {}
        for role in self.pids:
            pts = [s[role] for s in self.samples if s["t"] >= after and role in s
                   and (until is None or s["t"] <= until)]
            if len(pts) < 6:
                out[role] = {"samples": len(pts), "note": "too few samples after warm-up"}
                continue
            k = len(pts) // 3
            g = {"samples": len(pts)}
            for m in ("pss_kb", "rss_kb", "anon_kb"):
                a = statistics.median(p[m] for p in pts[:k])
                b = statistics.median(p[m] for p in pts[-k:])
                g[m] = {"from": a, "to": b, "growth_pct": round(100 * (b - a) / a, 2) if a else 0.0}
            g["peak_pss_kb"] = max(p["pss_kb"] for p in pts)
            out[role] = g
        return out


CALL_PROMPT = ('[agent]\nsystem_prompt = "You are the receptionist of Acme Dental, open Monday to Friday 9 to 5. '
               'Answer in one short sentence."\nmax_reply_tokens = {tokens}\nreprompt_after = 0.0\n'
               'hangup_after = 0.0\nhistory_turns = {history}\n')
QUESTIONS = CALLER_LINES[:4] + [CALLER_LINES[5], CALLER_LINES[6]]


def real_call(seconds: float = 240.0, warmup_turns: int = 3, history_turns: int = 4, max_tokens: int = 24,
              period: float = 2.0, tmp: Path | None = None) -> dict:
    """One real agent call of about ``seconds``: question after question, each as soon as the
    agent has answered the last. /proc sampled all along; growth measured over the second half of
    the questions (and after at least ``warmup_turns``)."""
    import voice
    from support import CellProcess
    for q in QUESTIONS + ["Goodbye."]:
        voice.say(q)                             # caller audio made before the clock starts
    with tempfile.TemporaryDirectory() as td:
        work = Path(tmp or td)
        cell = CellProcess(work, CALL_PROMPT.format(tokens=max_tokens, history=history_turns),
                           args=("--app", "agent")).start(wait=False)
        caller = None
        sampler = None
        try:
            cell.wait_healthy(timeout=180)
            sampler = Sampler(cell.proc.pid, period).start()
            caller = voice.Caller(cell, work, seconds=seconds + 120)
            start = time.monotonic()
            caller.wait_reply(start)                               # the greeting
            talk_start = time.monotonic() - sampler.t0
            gaps, missed, warm_at = [], 0, None
            i = 0
            while time.monotonic() - start < seconds:
                end = caller.speak(QUESTIONS[i % len(QUESTIONS)])
                i += 1
                try:
                    caller.wait_reply(end, timeout=30)
                    first = voice.first_voice_time(caller.peer.received, end)
                    if first:
                        gaps.append(first - end)
                except AssertionError:
                    missed += 1
                if i == warmup_turns:
                    warm_at = time.monotonic() - sampler.t0
                if len(caller.peer.received) > 200_000:               # keep our own memory bounded
                    del caller.peer.received[:100_000]
            talked = time.monotonic() - start
            talk_end = time.monotonic() - sampler.t0        # then the goodbye and the call summary
            rc = caller.goodbye()
            caller = None
            ended = cell.wait_event("call_ended", 1, timeout=60)[0]
            sampler.stop()
            events = cell.events()
            metrics = cell.metrics()
        finally:
            if sampler is not None:
                sampler.stop()
            if caller is not None:
                caller.close()
            cell.stop()
    turns = [e for e in events if e.get("event") == "turn"]
    model_errors = sum(v for k, v in metrics.items() if k.startswith("trunkline_model_errors_total"))
    return {
        "seconds": round(talked, 1), "questions": i, "answered": i - missed, "missed": missed,
        "history_turns": history_turns, "max_reply_tokens": max_tokens,
        "caller_turns": sum(1 for t in turns if t.get("role") == "caller"),
        "agent_turns": sum(1 for t in turns if t.get("role") == "agent" and t.get("kind") is None),
        "apologies": sum(1 for t in turns if t.get("kind") == "apology_text"),
        "model_errors": int(model_errors), "sipp_rc": rc, "end_reason": ended.get("reason"),
        "frame_rate": ended.get("frame_rate"), "frame_gaps": ended.get("frame_gaps"),
        "reply_gap_p50": round(statistics.median(gaps), 3) if gaps else None,
        "reply_gap_max": round(max(gaps), 3) if gaps else None,
        # Warm-up: the later of ``warmup_turns`` answered and the call's midpoint. The inference
        # process keeps growing for a while after the first turns: onnxruntime's arena (Piper) grows
        # in steps to the longest sentence synthesized so far, and each of llama.cpp's pooled
        # conversations allocates its buffers when first used; both level off (see the README).
        "warmup_s": round(max(warm_at or 0.0, (talk_start + talk_end) / 2), 1),
        "memory": sampler.growth(max(warm_at or 0.0, (talk_start + talk_end) / 2), talk_end),
        "memory_after_warmup_turns": sampler.growth(warm_at or 0.0, talk_end),
        "samples": [{"t": s["t"], **{f"{r}_{k}": s[r][k] for r in ("cell", "inference") if r in s
                                     for k in ("rss_kb", "anon_kb", "pss_kb")}} for s in sampler.samples],
    }


# -- the report -------------------------------------------------------------------------------------------
def main(out_path: str, call_seconds: float = 180.0, llm_round_count: int = 200, budget: float = 570.0) -> dict:
    """All three parts within about ``budget`` seconds; figures printed and saved."""
    t_end = time.monotonic() + budget
    res: dict = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    print("long call, part 1: the turn machine at the model boundary, 2 hours of dialogue (synthetic clock)")
    print(f"{'history_turns':>13} {'turns':>5} {'minutes':>7} {'msgs max':>8} {'tok max':>7} {'tok first':>9} "
          f"{'tok last':>8} {'history kB':>10} {'wall s':>6}")
    res["dialog"] = []
    for ht in (DEFAULTS["agent"]["history_turns"], 20):
        d = dialog_run(120.0, history_turns=ht).summary()
        res["dialog"].append(d)
        print(f"{d['history_turns']:>13} {d['turns']:>5} {d['call_minutes']:>7} {d['prompt_messages_max']:>8} "
              f"{d['prompt_tokens_max']:>7} {d['prompt_tokens_first_tenth_mean']:>9} "
              f"{d['prompt_tokens_last_tenth_mean']:>8} {d['history_kb']:>10} {d['wall_seconds']:>6}")

    print("\npart 2: the real llama.cpp adapter, many rounds of one conversation (SmolLM2-135M Q4_1, 24-token replies)")
    print(f"{'case':>16} {'n_ctx':>5} {'rounds':>6} {'ok':>4} {'errors':>6} {'trimmed':>7} {'sent max':>8} "
          f"{'prompt max':>10} {'reused p50':>10} {'eval p50':>8} {'s early':>7} {'s late':>6} {'cpu early':>9} "
          f"{'cpu late':>8}")
    res["llm"] = []
    # The defaults' window (history_turns 6, llm_context 2048) with the real call's 24-token replies
    # (200 rounds fit the time on 2 shared cores); then a window that outgrows the context
    # (history_turns 100 in 512 tokens: every prompt is refused without ai.llm.fit_context).
    cases = [("defaults", llm_round_count, dict(n_ctx=2048, history_turns=6, max_tokens=24)),
             ("100 turns, 512", 40, dict(n_ctx=512, history_turns=100, max_tokens=24))]
    for name, count, kw in cases:
        left = t_end - time.monotonic() - call_seconds - 90
        share = left * (0.8 if not res["llm"] else 1.0)
        r = llm_rounds(count, deadline=time.monotonic() + max(30.0, share), **kw)
        r["case"] = name
        res["llm"].append(r)
        print(f"{name:>16} {r['n_ctx']:>5} {r['rounds']:>6} {r['ok']:>4} {sum(r['errors'].values()):>6} "
              f"{r['trimmed']:>7} {r['sent_tokens_max']:>8} {r['prompt_tokens_max']!s:>10} "
              f"{r['reused_median']!s:>10} {r['evaluated_median']!s:>8} {r['seconds_early_median']!s:>7} "
              f"{r['seconds_late_median']!s:>6} {r['cpu_early_median']!s:>9} {r['cpu_late_median']!s:>8}")
        for err, n in r["errors"].items():
            print(f"{'':>16} {n} x {err}")

    seconds = max(60.0, min(call_seconds, t_end - time.monotonic() - 60))
    print(f"\npart 3: one real agent call, {seconds:.0f} s of questions back to back, /proc every 2 s")
    c = real_call(seconds)
    res["call"] = c
    print(f"questions {c['questions']}  answered {c['answered']}  apologies {c['apologies']}  "
          f"model errors {c['model_errors']}  reply gap p50 {c['reply_gap_p50']} s  max {c['reply_gap_max']} s  "
          f"frame gaps {c['frame_gaps']}")
    for role, g in c["memory"].items():
        if "pss_kb" in g:
            print(f"  {role:10s} " + "  ".join(
                f"{name} {g[k]['from']:.0f} -> {g[k]['to']:.0f} kB ({g[k]['growth_pct']:+.2f} %)"
                for name, k in (("RSS", "rss_kb"), ("anon", "anon_kb"), ("PSS", "pss_kb")))
                  + f"  samples {g['samples']}")
        else:
            print(f"  {role:10s} {g}")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_text(json.dumps(res, indent=2) + "\n")
    print(f"saved {out_path}")
    return res


if __name__ == "__main__":
    main(str(HERE / "results" / "longcall.json"))
