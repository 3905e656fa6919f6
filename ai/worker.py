"""The inference process: STT, LLM and TTS engines, served over a Pipe.

The cell starts this process (``python -m ai.worker FD CONFIG``, talking over
a socket pair) so model inference can never stall the media clock or crash
the calls. The messages are the dataclasses of ``ai/messages.py`` (requests
``SttRequest``/``LlmRequest``/``TtsRequest``/``TurnRequest``, ``Cancel``,
``Release``, ``Stop`` in; ``SttResult``, ``Token``/``ToolChoice``/``LlmDone``,
``Pcm``/``TtsDone``, ``TurnResult``, ``EngineError``, ``Ready``/``Fatal`` out).

The end-of-turn model (Smart Turn, ``ai/turn_model.py``) has its own thread and
queue so a decision (~60 ms) never waits behind a whisper decode; when it
cannot be loaded the worker still starts (``Ready.info["turn_error"]``) and
the cell falls back to its fixed silence window.

Each engine has one thread and a fair queue: requests are taken round-robin
across calls, so one chatty call cannot starve the others. llama.cpp streams
of different calls are interleaved token by token in its thread. Another
language's whisper model or Piper voice loads in a loader thread (``Extra``):
the configured ones at start, while the default models already serve calls.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from typing import NamedTuple

from ai import messages as m
from ai.llm import GenParams


class Job(NamedTuple):
    """A request waiting in an engine's queue; ``interim`` last (``FairQueue`` coalesces on it)."""
    request: m.SttRequest | m.LlmRequest | m.TtsRequest | m.TurnRequest
    queued_at: float
    params: GenParams | None = None      # an LLM request's generation parameters, checked on arrival
    interim: bool = False


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

    def put_front(self, call: str, item) -> None:
        """``item`` back at the head of its call's queue (a request that waited aside)."""
        with self.cv:
            self.calls.setdefault(call, deque()).appendleft(item)
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
        llm = OpenAIChat(cfg["llm_url"], cfg["llm_model"], api_key_from_env(cfg["llm_api_key_env"]),
                         context=cfg.get("llm_url_context", 0))
    else:
        llm = LlamaChat(cfg["llm_model_path"], n_ctx=cfg["llm_context"], threads=t,
                        conversations=cfg["conversations"])
    if "tts" in engines:
        tts = PiperTTS(cfg["tts_model"], cfg["tts_config"], threads=cfg["tts_threads"])
    return stt, llm, tts


def load_turn_model(cfg: dict):
    """The end-of-turn model, or ``(None, reason)``: its failure never stops the worker."""
    if cfg.get("turn_model", "none") != "smart-turn" or "stt" not in cfg.get("engines", ("stt",)):
        return None, ""
    try:
        from ai.turn_model import SmartTurn
        model = SmartTurn(cfg.get("turn_model_path") or None, threads=1)
        model.predict(bytes(3200))               # warm up (first run allocates)
        return model, ""
    except Exception as exc:  # noqa: BLE001 - the cell falls back to the fixed silence window
        return None, f"{type(exc).__name__}: {exc}"


MAX_EXTRA = 3         # other languages' whisper models / Piper voices kept loaded (each), at least
PENDING = object()    # Extra.ready(): the model is being loaded                 # all those preloaded


class Extra:
    """Models a call's language or voice asks for beyond the worker's own (another language's
    whisper model, a profile's Piper voice). They are loaded in this kind's loader thread, one at a
    time and never in an engine's thread: those the config names at start (``preload``), any other
    on first use. A request whose model is still loading waits aside (``park``) while its engine
    serves the other calls, and goes back to the head of its call's queue (``requeue``) when the
    load ends. Loaded models are kept, the least recently used first out past ``keep``; one that
    fails to load is remembered: its calls get the default engine, and one log line says so."""

    def __init__(self, kind: str, load, requeue=None, keep: int = MAX_EXTRA):
        self.kind = kind
        self.load = load
        self.requeue = requeue
        self.keep = keep
        self.engines: OrderedDict[tuple, object] = OrderedDict()
        self.failed: dict[tuple, str] = {}
        self.loading: dict[tuple, threading.Event] = {}
        self.parked: dict[tuple, list] = {}
        self.lock = threading.Lock()
        self.todo: deque = deque()
        self.todo_cv = threading.Condition(self.lock)
        self.thread: threading.Thread | None = None

    def _state(self, key: tuple, reason: str):
        """``(engine, None)`` when loaded, ``(None, None)`` when it cannot be, ``(PENDING, event)``
        while it loads (queued for the loader here if it was not yet)."""
        with self.lock:
            if key in self.failed:
                return None, None
            if key in self.engines:
                self.engines.move_to_end(key)
                return self.engines[key], None
            ev = self.loading.get(key)
            if ev is None:
                ev = self.loading[key] = threading.Event()
                self.todo.append((key, reason))
                if self.thread is None:
                    self.thread = threading.Thread(target=self._loader, name=f"load-{self.kind}", daemon=True)
                    self.thread.start()
                self.todo_cv.notify()
            return PENDING, ev

    def get(self, key: tuple):
        """The engine ``key`` names, waiting for its load; ``None`` when it cannot be loaded."""
        while True:
            engine, ev = self._state(key, "first use")
            if engine is not PENDING:
                return engine
            ev.wait()

    def ready(self, key: tuple):
        """The engine, ``None`` (cannot be loaded) or ``PENDING`` (loading): never waits."""
        return self._state(key, "first use")[0]

    def preload(self, key: tuple) -> None:
        self._state(key, "preload")

    def park(self, key: tuple, item: tuple) -> bool:
        """Keep ``item`` (call, job) until ``key`` has loaded; False when it is not loading (any more)."""
        with self.lock:
            if key not in self.loading:
                return False
            self.parked.setdefault(key, []).append(item)
            return True

    def _loader(self) -> None:
        while True:
            with self.lock:
                while not self.todo:
                    self.todo_cv.wait()
                key, reason = self.todo.popleft()
            self._load(key, reason)

    def _load(self, key: tuple, reason: str) -> None:
        started = time.perf_counter()
        engine, error = None, ""
        try:
            engine = self.load(*key)
        except Exception as exc:  # noqa: BLE001 - the call falls back to the default model
            error = f"{type(exc).__name__}: {exc}"
        with self.lock:
            if error:
                self.failed[key] = error
            else:
                self.engines[key] = engine
                while len(self.engines) > self.keep:
                    self.engines.popitem(last=False)
            ev = self.loading.pop(key)
            parked = self.parked.pop(key, [])
        if error:
            _log("language_model_failed", kind=self.kind, model=key[0], error=error, fallback="default",
                 reason=reason)
        else:
            _log("language_model_loaded", kind=self.kind, model=key[0], reason=reason,
                 seconds=round(time.perf_counter() - started, 2))
        ev.set()
        for call, job in reversed(parked):       # each goes to the head of its queue: last first keeps
            if self.requeue is not None:           # their order (a reply's sentences)
                self.requeue(call, job)

    def loaded(self) -> list[str]:
        with self.lock:
            return [k[0] for k in self.engines]


def stt_key(req: m.SttRequest) -> tuple | None:
    return (req.model,) if req.model else None


def tts_key(req: m.TtsRequest) -> tuple | None:
    return (req.voice, req.voice_config or req.voice + ".json") if req.voice else None


def _log(name: str, **fields) -> None:
    """A JSON line on stderr (the cell's log)."""
    print(json.dumps({"event": name, "logger": "trunkline.ai.worker", **fields}), file=sys.stderr, flush=True)


class Worker:
    def __init__(self, conn, stt, llm, tts, turn=None, cfg: dict | None = None):
        self.conn = conn
        self.stt, self.llm, self.tts, self.turn = stt, llm, tts, turn
        cfg = cfg or {}
        self.q = {"stt": FairQueue(), "llm": FairQueue(), "tts": FairQueue(), "turn": FairQueue()}

        def load_stt(model):
            from ai.stt import WhisperSTT
            return WhisperSTT(model, threads=cfg.get("threads", 1), compute_type=cfg.get("stt_compute_type", "int8"),
                              language=None)

        def load_tts(voice, config):
            from ai.tts import PiperTTS
            return PiperTTS(voice, config, threads=cfg.get("tts_threads", 1))
        self.preload = {"stt": [(p,) for p in cfg.get("preload_stt", ())],
                        "tts": [tuple(v) for v in cfg.get("preload_tts", ())]}
        self.extra = {k: Extra(k, load, requeue=self.q_put_front(k), keep=max(MAX_EXTRA, len(self.preload[k])))
                      for k, load in (("stt", load_stt), ("tts", load_tts))}
        self.send_lock = threading.Lock()
        self.cancelled: dict[str, float] = {}        # call -> time of the last cancel
        self.stopping = False
        self.warmed = threading.Event()              # the STT thread's first decode is done
        self.warm_error: BaseException | None = None
        self._started = False

    def q_put_front(self, engine: str):
        return lambda call, job: self.q[engine].put_front(call, job)

    def send(self, msg: m.FromWorker) -> None:
        with self.send_lock:
            self.conn.send(msg)

    def _is_cancelled(self, call: str, queued_at: float) -> bool:
        return self.cancelled.get(call, 0.0) > queued_at

    # -- engine loops -------------------------------------------------------
    def _parked(self, kind: str, key: tuple | None, call: str, job: Job) -> bool:
        """Whether ``job`` waits aside until its model ``key`` has loaded (the engine's thread goes
        on with the other calls meanwhile)."""
        if key is None:
            return False
        extra = self.extra[kind]
        return extra.ready(key) is PENDING and extra.park(key, (call, job))

    def _serve(self, engine: str, answer, key_of=None) -> None:
        """One engine's loop: take its queued requests in order, skip cancelled calls' work, send
        ``answer(request)`` back, or an ``EngineError`` naming the engine if it raises."""
        while not self.stopping:
            got = self.q[engine].get(0.5)
            if got is None:
                continue
            call, job = got
            req = job.request
            if self._is_cancelled(call, job.queued_at):
                continue
            if key_of is not None and self._parked(engine, key_of(req), call, job):
                continue
            try:
                self.send(answer(req))
            except Exception as exc:  # noqa: BLE001
                self.send(m.EngineError(req.rid, engine, f"{type(exc).__name__}: {exc}"))

    def stt_for(self, req: m.SttRequest):
        """The request's whisper model and language (the worker's own when it names none or failed)."""
        engine = self.extra["stt"].get(stt_key(req)) if req.model else None
        if engine is None and req.model:
            return self.stt, None                 # fallen back: the default model in its own language
        return engine or self.stt, req.language.split("-")[0] or None

    def tts_for(self, req: m.TtsRequest):
        """The request's Piper voice (the worker's own when it names none or failed)."""
        engine = self.extra["tts"].get(tts_key(req)) if req.voice else None
        return engine or self.tts

    def _transcribe(self, req) -> m.FromWorker:
        engine, language = self.stt_for(req)
        kw = {"prompt": req.prompt} if getattr(req, "prompt", "") else {}
        r = engine.transcribe(req.pcm, language=language, **kw) if language else engine.transcribe(req.pcm, **kw)
        return m.SttResult(req.rid, r.text, r.no_speech_prob, r.avg_logprob, r.audio_seconds, r.seconds)

    def _score_turn(self, req) -> m.FromWorker:
        p, secs = self.turn.predict(req.pcm)
        return m.TurnResult(req.rid, p, secs)

    def stt_loop(self) -> None:
        # One decode of a second of silence on this thread, before the worker says it is ready:
        # CTranslate2 (and glibc, an arena per thread) allocate on a thread's first decode (~57 MB,
        # ~70 ms here), which would otherwise land on the first caller's turn after every (re)start.
        try:
            if hasattr(self.stt, "warm"):
                self.stt.warm()
        except Exception as exc:  # noqa: BLE001 - reported by start(): a model that cannot decode did not load
            self.warm_error = exc
        finally:
            self.warmed.set()
        self._serve("stt", self._transcribe, stt_key)

    def turn_loop(self) -> None:
        self._serve("turn", self._score_turn)

    def tts_loop(self) -> None:
        while not self.stopping:
            got = self.q["tts"].get(0.5)
            if got is None:
                continue
            call, job = got
            rid = job.request.rid
            if self._parked("tts", tts_key(job.request), call, job):
                continue
            start = time.perf_counter()
            try:
                engine = self.tts_for(job.request)
                for pcm in engine.synthesize(job.request.text):
                    if self._is_cancelled(call, job.queued_at):
                        break
                    self.send(m.Pcm(rid, pcm, engine.rate))
                self.send(m.TtsDone(rid, time.perf_counter() - start))
            except Exception as exc:  # noqa: BLE001
                self.send(m.EngineError(rid, "tts", f"{type(exc).__name__}: {exc}"))

    def _llm_one(self, call, rid, messages, params, queued_at):
        start = time.perf_counter()
        n = 0
        try:
            for tok in self.llm.stream(call, messages, params):
                if self._is_cancelled(call, queued_at) or self.stopping:
                    break
                if isinstance(tok, dict):
                    self.send(m.ToolChoice(rid, tok))
                    continue
                n += 1
                self.send(m.Token(rid, tok))
            self.send(m.LlmDone(rid, time.perf_counter() - start, n))
        except Exception as exc:  # noqa: BLE001
            self.send(m.EngineError(rid, "llm", f"{type(exc).__name__}: {exc}"))

    def llm_loop(self) -> None:
        if self.llm.parallel:
            while not self.stopping:
                got = self.q["llm"].get(0.5)
                if got is None:
                    continue
                call, job = got
                req = job.request
                threading.Thread(target=self._llm_one, args=(call, req.rid, req.messages, job.params,
                                                             job.queued_at), daemon=True).start()
            return
        active: deque = deque()       # (call, rid, generator, started, ntok, queued_at)
        while not self.stopping:
            got = self.q["llm"].get(0 if active else 0.5)
            while got is not None:
                call, job = got
                req = job.request
                if not self._is_cancelled(call, job.queued_at):
                    gen = self.llm.stream(call, req.messages, job.params)
                    active.append([call, req.rid, gen, time.perf_counter(), 0, job.queued_at])
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
                self.send(m.LlmDone(rid, time.perf_counter() - started, ntok))
                continue
            except Exception as exc:  # noqa: BLE001
                self.send(m.EngineError(rid, "llm", f"{type(exc).__name__}: {exc}"))
                continue
            if isinstance(tok, dict):
                self.send(m.ToolChoice(rid, tok))
            else:
                item[4] = ntok + 1
                self.send(m.Token(rid, tok))
            active.append(item)

    # -- reader -------------------------------------------------------------
    def handle(self, msg: m.ToWorker, now: float) -> bool:
        """One message from the hub; False when the worker is to stop."""
        if isinstance(msg, (m.SttRequest, m.TtsRequest, m.TurnRequest)) and getattr(self, msg.engine) is None:
            self.send(m.EngineError(msg.rid, msg.engine, f"the {msg.engine} engine is not loaded in this process"))
        elif isinstance(msg, m.SttRequest):
            self.q["stt"].put(msg.call, Job(msg, now, interim=msg.interim), replace_interim=msg.interim)
        elif isinstance(msg, m.LlmRequest):
            try:
                params = GenParams(**msg.params)
            except TypeError as exc:
                self.send(m.EngineError(msg.rid, "llm", f"bad generation parameters: {exc}"))
            else:
                self.q["llm"].put(msg.call, Job(msg, now, params))
        elif isinstance(msg, m.TtsRequest):
            self.q["tts"].put(msg.call, Job(msg, now))
        elif isinstance(msg, m.TurnRequest):          # only the newest question per call matters
            self.q["turn"].put(msg.call, Job(msg, now, interim=True), replace_interim=True)
        elif isinstance(msg, m.Cancel):
            self.cancelled[msg.call] = now
            for q in self.q.values():
                q.drop(msg.call)
        elif isinstance(msg, m.Release):
            self.cancelled.pop(msg.call, None)
            try:
                self.llm.release(msg.call)
            except Exception:  # noqa: BLE001
                pass
        elif isinstance(msg, m.Stop):
            return False
        return True

    def start(self) -> BaseException | None:
        """Start the engine threads; return once the STT thread has warmed up (its error, if any)."""
        if self._started:
            return self.warm_error
        self._started = True
        threads = [threading.Thread(target=f, name=n, daemon=True) for f, n, e in
                   ((self.stt_loop, "stt", self.stt), (self.llm_loop, "llm", self.llm),
                    (self.tts_loop, "tts", self.tts), (self.turn_loop, "turn", self.turn))
                   if e is not None]
        for kind, keys in self.preload.items():          # the configured languages' models, in the background
            if getattr(self, kind) is not None:
                for key in keys:
                    self.extra[kind].preload(key)
        for th in threads:
            th.start()
        if self.stt is not None and hasattr(self.stt, "warm"):
            self.warmed.wait()
        return self.warm_error

    def run(self) -> None:
        self.start()
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            if not self.handle(msg, time.monotonic()):
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
        conn.send(m.Fatal(f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=3)))
        return
    turn, turn_error = load_turn_model(cfg)
    worker = Worker(conn, *engines, turn=turn, cfg=cfg)
    error = worker.start()
    if error is not None:                    # a model that cannot decode is a model that did not load
        conn.send(m.Fatal(f"speech-to-text failed its first decode: {type(error).__name__}: {error}", ""))
        return
    conn.send(m.Ready({"pid": os.getpid(), "tts_rate": engines[2].rate if engines[2] else 0,
                       "turn_model": turn.name if turn is not None else "", "turn_error": turn_error}))
    worker.run()


if __name__ == "__main__":
    from multiprocessing.connection import Connection
    main(Connection(int(sys.argv[1])), json.loads(sys.argv[2]))
