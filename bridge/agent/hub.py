"""The cell's connection to its inference process, on the asyncio side.

Requests carry callbacks; replies from the worker's reader thread are posted
onto the loop and dispatched by request id. If the worker dies, every open
request gets ``on_error`` and the worker is restarted with backoff; calls
meanwhile hear the canned apology rendered at start. The messages both ways
are the typed dataclasses of ``ai/messages.py``.

The end-of-turn model (``[agent] turn_model``) runs in the inference process
too, on its own thread: ``turn()`` asks it, and answers ``on_error`` at once
when it did not load (the turn machine then keeps the fixed silence window).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from ai import messages as m
from ai import models
from ai.client import EngineLoadError, InferenceClient
from bridge.core import backoff, profiles
from bridge.core.config import Config
from bridge.core.logs import event
from media.frames import split_frames
from media.level import normalize
from media.resample import resample

log = logging.getLogger("trunkline.ai")


def worker_config(cfg: Config) -> dict:
    m, a = cfg.raw["models"], cfg.raw["agent"]
    try:
        stt = m["stt"] or str(models.whisper_dir())
        llm = m["llm"] or (str(models.smollm2_gguf()) if m["llm_backend"] == "llama" else "")
        if m["tts"]:
            tts, tts_cfg = m["tts"], m["tts_config"] or m["tts"] + ".json"
        else:
            tts, tts_cfg = (str(p) for p in models.piper_voice())
    except models.ModelNotFound as exc:
        raise EngineLoadError(str(exc)) from None
    return {
        "threads": m["threads"], "tts_threads": m["tts_threads"], "stt_model": stt,
        "stt_compute_type": m["stt_compute_type"], "language": a["language"] or None,
        "llm_backend": m["llm_backend"], "llm_model_path": llm, "llm_context": m["llm_context"],
        "conversations": 4, "llm_url": m["llm_url"], "llm_model": m["llm_model"],
        "llm_api_key_env": m["llm_api_key_env"], "llm_url_context": m["llm_url_context"],
        "tts_model": tts, "tts_config": tts_cfg,
        "turn_model": a.get("turn_model", "none"),
        **preload(cfg.raw, stt, (tts, tts_cfg)),
    }


def preload(raw: dict, default_stt: str = "", default_tts: tuple = ()) -> dict:
    """The models the configured languages and profiles name, loaded when the inference process
    starts (not by the first call that needs one, in front of the other calls); the worker's own
    (``default_stt``, ``default_tts``) is not loaded twice. Each stays loaded: its memory is the
    price of a configured language."""
    cat = profiles.Catalog.of(raw)
    stt = {lang.stt_model for lang in cat.languages.values() if lang.stt_model} - {default_stt}
    tts = {(lang.tts_voice, profiles.voice_config(lang.tts_voice, lang.tts_config))
           for lang in cat.languages.values() if lang.tts_voice}
    tts |= {(p.voice, profiles.voice_config(p.voice)) for p in cat.profiles.values() if p.voice}
    tts -= {tuple(default_tts)}
    return {"preload_stt": sorted(stt), "preload_tts": [list(v) for v in sorted(tts)]}


@dataclass
class Request:
    call: str
    engine: str
    on_result: Callable | None = None     # stt: (text, no_speech, logprob, audio_s, secs); tts: (pcm, rate)
    on_token: Callable | None = None
    on_done: Callable | None = None
    on_error: Callable | None = None
    on_tool: Callable | None = None       # llm: the model chose a tool ({"tool", "arguments", "id"})
    sent_at: float = field(default_factory=time.monotonic)


class AiHub:
    def __init__(self, cfg: Config, metrics, rate: int, engines: tuple = ("stt", "llm", "tts")):
        self.cfg = cfg
        self.metrics = metrics
        self.rate = rate
        self.engines = engines
        self.wcfg = {**worker_config(cfg), "engines": list(engines)}
        self.client: InferenceClient | None = None
        self.pending: dict[int, Request] = {}
        self.listening: set[str] = set()     # calls whose caller is transcribed now (``joined``/``left``)
        self.canned: dict[str, list[bytes]] = {}
        self.rendered: dict[tuple[str, str, str], list[bytes]] = {}   # (text, voice, config) -> frames
        self.loop: asyncio.AbstractEventLoop | None = None
        self.up = False
        self.turn_model = ""                  # the end-of-turn model the worker loaded ("" if none)
        self._restarts = 0
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self._spawn()
        if "tts" not in self.engines:
            return
        a = self.cfg.raw["agent"]
        keys = ["greeting", "reprompt_text", "goodbye_text", "not_understood_text", "apology_text"]
        transfer = self.cfg.raw.get("transfer", {}).get("destinations")      # the built-in transfer tool
        if (self.cfg.toolbox is not None and self.cfg.toolbox.tools) or transfer:
            keys += ["tool_filler_text", "tool_unavailable_text", "tool_fallback_text"]
        phrases = {k: a[k] for k in keys if a[k]}
        for key, text in phrases.items():
            self.canned[key] = await self.render(text)

    async def _spawn(self) -> None:
        client = InferenceClient(self.wcfg, self._from_thread)
        started = time.monotonic()
        info = await self.loop.run_in_executor(None, client.start, self.cfg.raw["models"]["load_timeout"])
        self.client = client
        self.up = True
        self.turn_model = info.get("turn_model") or ""
        event(log, "models_loaded", seconds=round(time.monotonic() - started, 2), worker_pid=info.get("pid"),
              stt=self.wcfg["stt_model"], llm=self.wcfg["llm_model_path"] or self.wcfg["llm_url"],
              tts=self.wcfg["tts_model"], turn=self.turn_model or "none")
        wanted = self.wcfg.get("turn_model", "none")
        if wanted != "none" and "stt" in self.engines:
            if self.turn_model:
                log.info("end-of-turn model: %s (decisions in the inference process)", self.turn_model)
            else:
                log.warning("end-of-turn model %s did not load (%s): ending turns after the fixed %.2f s "
                            "silence window", wanted, info.get("turn_error") or "unknown error",
                            self.cfg.raw["agent"]["silence"])

    async def stop(self) -> None:
        self._stopping = True
        if self.client is not None:
            await self.loop.run_in_executor(None, self.client.stop)

    async def render(self, text: str, voice: str = "", voice_config: str = "") -> list[bytes]:
        """Synthesize ``text`` to call-rate frames (used for canned phrases), in ``voice`` if given."""
        fut = self.loop.create_future()
        chunks: list[tuple[bytes, int]] = []
        self.tts("_canned", text, lambda pcm, rate: chunks.append((pcm, rate)),
                 on_done=lambda *_: fut.done() or fut.set_result(None),
                 on_error=lambda msg: fut.done() or fut.set_exception(EngineLoadError(f"TTS failed: {msg}")),
                 voice=voice, voice_config=voice_config)
        await asyncio.wait_for(fut, 60)
        return self.to_frames(b"".join(p for p, _ in chunks), chunks[0][1] if chunks else self.rate)

    async def render_cached(self, text: str, voice: str = "", voice_config: str = "") -> list[bytes]:
        """``render`` kept for the next call (a profile's phrases, in its voice; at most 200 kept)."""
        key = (text, voice, voice_config)
        if key not in self.rendered:
            frames = await self.render(text, voice, voice_config)
            if len(self.rendered) >= 200:
                self.rendered.pop(next(iter(self.rendered)))
            self.rendered[key] = frames
        return self.rendered[key]

    def to_frames(self, pcm: bytes, rate: int) -> list[bytes]:
        return split_frames(normalize(resample(pcm, rate, self.rate)), self.rate)

    # -- requests -------------------------------------------------------------
    def _send(self, make: Callable[[int], m.Request], req: Request) -> int | None:
        """Send the request ``make(rid)`` builds; ``req`` waits in ``pending`` for its replies."""
        if not self.up or self.client is None:
            if req.on_error:
                req.on_error("inference process is restarting")
            return None
        rid = self.client.next_id()
        self.pending[rid] = req
        try:
            self.client.send(make(rid))
        except RuntimeError as exc:
            self.pending.pop(rid, None)
            if req.on_error:
                req.on_error(str(exc))
            return None
        return rid

    def stt(self, call: str, pcm16k: bytes, interim: bool, on_result, on_error=None, model: str = "",
            language: str = "", prompt: str = "") -> int | None:
        """``model``/``language``: the call's language (``bridge.core.profiles.Routing``), "" the defaults;
        ``prompt``: words to expect (whisper's initial prompt)."""
        return self._send(lambda rid: m.SttRequest(rid, call, pcm16k, interim, model, language, prompt),
                          Request(call, "stt", on_result=on_result, on_error=on_error))

    def stt_backlog(self) -> int:
        """STT requests sent and not answered yet, over all calls."""
        return sum(1 for r in self.pending.values() if r.engine == "stt")

    def joined(self, call: str) -> None:
        """A call of this cell has its caller transcribed from now on: an answered agent call, or an API
        call's transcribe (``left`` when that ends; the cell also calls it when the call ends)."""
        self.listening.add(call)

    def left(self, call: str) -> None:
        self.listening.discard(call)

    def model_calls(self) -> int:
        """Calls whose caller is transcribed now: each may stop talking and need a decode at once, and
        a decode cannot be stopped, so interim decodes run only while there is one."""
        return len(self.listening)

    def llm(self, call: str, messages: list[dict], params: dict, on_token, on_done, on_error,
            on_tool=None) -> int | None:
        return self._send(lambda rid: m.LlmRequest(rid, call, messages, params),
                          Request(call, "llm", on_token=on_token, on_done=on_done, on_error=on_error,
                                  on_tool=on_tool))

    def turn(self, call: str, pcm16k: bytes, on_result, on_error) -> int | None:
        """Ask the end-of-turn model; ``on_result(probability, seconds)`` or ``on_error(msg)``."""
        if not self.turn_model:
            on_error("no end-of-turn model loaded")
            return None
        return self._send(lambda rid: m.TurnRequest(rid, call, pcm16k),
                          Request(call, "turn", on_result=on_result, on_error=on_error))

    def tts(self, call: str, text: str, on_result, on_done=None, on_error=None, voice: str = "",
            voice_config: str = "") -> int | None:
        return self._send(lambda rid: m.TtsRequest(rid, call, text, voice, voice_config),
                          Request(call, "tts", on_result=on_result, on_done=on_done, on_error=on_error))

    def cancel(self, call: str) -> None:
        """Stop everything queued or running for this call; late replies are dropped."""
        for rid in [r for r, q in self.pending.items() if q.call == call]:
            del self.pending[rid]
        if self.up and self.client is not None:
            try:
                self.client.send(m.Cancel(call))
            except RuntimeError:
                pass

    def release(self, call: str) -> None:
        self.cancel(call)
        if self.up and self.client is not None:
            try:
                self.client.send(m.Release(call))
            except RuntimeError:
                pass

    # -- replies ----------------------------------------------------------------
    def _from_thread(self, msg: m.FromWorker) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._dispatch, msg)

    def _dispatch(self, msg: m.FromWorker) -> None:
        if isinstance(msg, m.Died):
            self._died(msg.exitcode)
            return
        rid = getattr(msg, "rid", None)
        req = self.pending.get(rid) if rid is not None else None
        if req is None:                      # cancelled, unknown or not a reply: drop
            return
        try:
            if isinstance(msg, m.Token):
                req.on_token(msg.text)
            elif isinstance(msg, m.ToolChoice):
                if req.on_tool:
                    req.on_tool(msg.choice)
            elif isinstance(msg, m.Pcm):
                req.on_result(msg.pcm, msg.rate)
            elif isinstance(msg, m.SttResult):
                del self.pending[rid]
                req.on_result(msg.text, msg.no_speech, msg.logprob, msg.audio_seconds, msg.seconds)
            elif isinstance(msg, m.TurnResult):
                del self.pending[rid]
                req.on_result(msg.probability, msg.seconds)
            elif isinstance(msg, m.LlmDone):
                del self.pending[rid]
                if req.on_done:
                    req.on_done(msg.seconds, msg.tokens)
            elif isinstance(msg, m.TtsDone):
                del self.pending[rid]
                if req.on_done:
                    req.on_done(msg.seconds)
            elif isinstance(msg, m.EngineError):
                del self.pending[rid]
                self.metrics.model_errors.labels(msg.engine).inc()
                log.error("%s error on call %s: %s", msg.engine, req.call, msg.message)
                if req.on_error:
                    req.on_error(msg.message)
        except Exception:  # noqa: BLE001 - a bad handler hurts only its call
            log.exception("AI reply handler failed for call %s", req.call)

    def _died(self, code) -> None:
        self.up = False
        self.metrics.model_errors.labels("worker").inc()
        log.error("inference process died (exit code %s); restarting", code)
        pending, self.pending = self.pending, {}
        for req in pending.values():
            if req.on_error:
                try:
                    req.on_error("inference process died")
                except Exception:  # noqa: BLE001
                    log.exception("error handler failed")
        if not self._stopping:
            asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        delay = backoff.delay(self._restarts, 1.0, 30.0)
        self._restarts += 1
        await asyncio.sleep(delay)
        try:
            await self._spawn()
            self._restarts = 0
        except EngineLoadError as exc:
            log.error("inference process did not come back: %s", exc)
            if not self._stopping:
                asyncio.ensure_future(self._restart())
