"""The inference process: STT, LLM and TTS engines, served over a Pipe.

The cell starts this process (``python -m ai.worker FD CONFIG``, talking over
a socket pair) so model inference can never stall the media clock or crash
the calls. Messages are plain tuples:

  cell -> worker                               worker -> cell
  ("stt", rid, call, pcm16k, interim)          ("stt", rid, text, no_speech, logprob, audio_s, secs)
  ("llm", rid, call, messages, params)         ("tok", rid, text) ... ("llm_done", rid, secs, ntok)
                                               or ("tool", rid, {"tool", "arguments", "id"}), ("llm_done", ...)
  ("tts", rid, call, text)                     ("pcm", rid, pcm, rate) ... ("tts_done", rid, secs)
  ("cancel", call)                             ("error", rid, engine, message)
  ("release", call)                            ("ready", info) | ("fatal", message)
  ("stop",)

Each engine has one thread and a fair queue: requests are taken round-robin
across calls, so one chatty call cannot starve the others. llama.cpp streams
of different calls are interleaved token by token in its thread.
"""
from __future__ import annotations

import os
import threading
import time
import traceback
from collections import OrderedDict, deque

from ai.llm import GenParams


class FairQueue:
    """Per-call FIFO queues served round-robin; interim STT requests coalesce."""

    def __init__(self):
        self.calls: OrderedDict[str, deque] = OrderedDict()
        self.cv = threading.Condition()
        self.closed = False

    def put(self, call: str, item, replace_interim: bool = False) -> None:
        with self.cv:
            q = self.calls.setdefault(call, deque())
            if replace_interim:
                for i, old in enumerate(q):
                    if old[-1] is True:            # an interim still waiting: replace it
                        q[i] = item
                        return
            q.append(item)
            self.cv.notify()

    def get(self, timeout: float | None = None):
        with self.cv:
            end = None if timeout is None else time.monotonic() + timeout
            while not self.closed:
                for call in list(self.calls):
                    q = self.calls[call]
                    if q:
                        item = q.popleft()
                        self.calls.move_to_end(call)   # next time start after this call
                        return call, item
                    del self.calls[call]
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self.cv.wait(left)
            return None

    def drop(self, call: str) -> int:
        with self.cv:
            q = self.calls.pop(call, None)
            return len(q) if q else 0

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()


def load_engines(cfg: dict):
    from ai.llm import LlamaChat, OpenAIChat, api_key_from_env
    from ai.stt import WhisperSTT
    from ai.tts import PiperTTS
    t = cfg["threads"]
    engines = cfg.get("engines", ("stt", "llm", "tts"))
    stt = tts = None
    if "stt" in engines:
        stt = WhisperSTT(cfg["stt_model"], threads=t, compute_type=cfg["stt_compute_type"], language=cfg["language"])
    if cfg["llm_backend"] == "openai":
        llm = OpenAIChat(cfg["llm_url"], cfg["llm_model"], api_key_from_env(cfg["llm_api_key_env"]))
    else:
        llm = LlamaChat(cfg["llm_model_path"], n_ctx=cfg["llm_context"], threads=t,
                        conversations=cfg["conversations"])
    if "tts" in engines:
        tts = PiperTTS(cfg["tts_model"], cfg["tts_config"], threads=cfg["tts_threads"])
    return stt, llm, tts


class Worker:
    def __init__(self, conn, stt, llm, tts):
        self.conn = conn
        self.stt, self.llm, self.tts = stt, llm, tts
        self.send_lock = threading.Lock()
        self.q = {"stt": FairQueue(), "llm": FairQueue(), "tts": FairQueue()}
        self.cancelled: dict[str, float] = {}        # call -> time of the last cancel
        self.stopping = False

    def send(self, msg) -> None:
        with self.send_lock:
            self.conn.send(msg)

    def _is_cancelled(self, call: str, queued_at: float) -> bool:
        return self.cancelled.get(call, 0.0) > queued_at

    # -- engine loops -------------------------------------------------------
    def stt_loop(self) -> None:
        while not self.stopping:
            got = self.q["stt"].get(0.5)
            if got is None:
                continue
            call, (rid, pcm, queued_at, interim) = got
            if self._is_cancelled(call, queued_at):
                continue
            try:
                r = self.stt.transcribe(pcm)
                self.send(("stt", rid, r.text, r.no_speech_prob, r.avg_logprob, r.audio_seconds, r.seconds))
            except Exception as exc:  # noqa: BLE001
                self.send(("error", rid, "stt", f"{type(exc).__name__}: {exc}"))

    def tts_loop(self) -> None:
        while not self.stopping:
            got = self.q["tts"].get(0.5)
            if got is None:
                continue
            call, (rid, text, queued_at, _) = got
            start = time.perf_counter()
            try:
                for pcm in self.tts.synthesize(text):
                    if self._is_cancelled(call, queued_at):
                        break
                    self.send(("pcm", rid, pcm, self.tts.rate))
                self.send(("tts_done", rid, time.perf_counter() - start))
            except Exception as exc:  # noqa: BLE001
                self.send(("error", rid, "tts", f"{type(exc).__name__}: {exc}"))

    def _llm_one(self, call, rid, messages, params, queued_at):
        start = time.perf_counter()
        n = 0
        try:
            for tok in self.llm.stream(call, messages, params):
                if self._is_cancelled(call, queued_at) or self.stopping:
                    break
                if isinstance(tok, dict):
                    self.send(("tool", rid, tok))
                    continue
                n += 1
                self.send(("tok", rid, tok))
            self.send(("llm_done", rid, time.perf_counter() - start, n))
        except Exception as exc:  # noqa: BLE001
            self.send(("error", rid, "llm", f"{type(exc).__name__}: {exc}"))

    def llm_loop(self) -> None:
        if self.llm.parallel:
            while not self.stopping:
                got = self.q["llm"].get(0.5)
                if got is None:
                    continue
                call, (rid, (messages, params), queued_at, _) = got
                threading.Thread(target=self._llm_one, args=(call, rid, messages, params, queued_at),
                                 daemon=True).start()
            return
        active: deque = deque()       # (call, rid, generator, started, ntok, queued_at)
        while not self.stopping:
            got = self.q["llm"].get(0 if active else 0.5)
            while got is not None:
                call, (rid, (messages, params), queued_at, _) = got
                if not self._is_cancelled(call, queued_at):
                    gen = self.llm.stream(call, messages, params)
                    active.append([call, rid, gen, time.perf_counter(), 0, queued_at])
                got = self.q["llm"].get(0)
            if not active:
                continue
            item = active.popleft()
            call, rid, gen, started, ntok, queued_at = item
            if self._is_cancelled(call, queued_at):
                gen.close()
                continue
            try:
                tok = next(gen)
            except StopIteration:
                self.send(("llm_done", rid, time.perf_counter() - started, ntok))
                continue
            except Exception as exc:  # noqa: BLE001
                self.send(("error", rid, "llm", f"{type(exc).__name__}: {exc}"))
                continue
            if isinstance(tok, dict):
                self.send(("tool", rid, tok))
            else:
                item[4] = ntok + 1
                self.send(("tok", rid, tok))
            active.append(item)

    # -- reader -------------------------------------------------------------
    def run(self) -> None:
        threads = [threading.Thread(target=f, name=n, daemon=True) for f, n, e in
                   ((self.stt_loop, "stt", self.stt), (self.llm_loop, "llm", self.llm), (self.tts_loop, "tts", self.tts))
                   if e is not None]
        for th in threads:
            th.start()
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            now = time.monotonic()
            if kind in ("stt", "tts") and getattr(self, kind) is None:
                self.send(("error", msg[1], kind, f"the {kind} engine is not loaded in this process"))
            elif kind == "stt":
                _, rid, call, pcm, interim = msg
                self.q["stt"].put(call, (rid, pcm, now, interim), replace_interim=interim)
            elif kind == "llm":
                _, rid, call, messages, params = msg
                self.q["llm"].put(call, (rid, (messages, GenParams(**params)), now, False))
            elif kind == "tts":
                _, rid, call, text = msg
                self.q["tts"].put(call, (rid, text, now, False))
            elif kind == "cancel":
                self.cancelled[msg[1]] = now
                for q in self.q.values():
                    q.drop(msg[1])
            elif kind == "release":
                self.cancelled.pop(msg[1], None)
                try:
                    self.llm.release(msg[1])
                except Exception:  # noqa: BLE001
                    pass
            elif kind == "stop":
                break
        self.stopping = True
        for q in self.q.values():
            q.close()


def main(conn, cfg: dict) -> None:
    """Entry point of the spawned process."""
    try:
        os.nice(cfg.get("nice", 5))          # the cell's media and loop come first
    except OSError:
        pass
    try:
        engines = load_engines(cfg)
    except BaseException as exc:  # noqa: BLE001
        conn.send(("fatal", f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=3)))
        return
    conn.send(("ready", {"pid": os.getpid(), "tts_rate": engines[2].rate if engines[2] else 0}))
    Worker(conn, *engines).run()


if __name__ == "__main__":
    import json
    import sys
    from multiprocessing.connection import Connection
    main(Connection(int(sys.argv[1])), json.loads(sys.argv[2]))
