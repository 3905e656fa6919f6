"""The cell's connection to its inference process, on the asyncio side.

Requests carry callbacks; replies from the worker's reader thread are posted
onto the loop and dispatched by request id. If the worker dies, every open
request gets ``on_error`` and the worker is restarted with backoff; calls
meanwhile hear the canned apology rendered at start.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from ai import models
from ai.client import EngineLoadError, InferenceClient
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
        "llm_api_key_env": m["llm_api_key_env"], "tts_model": tts, "tts_config": tts_cfg,
    }


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
        self.canned: dict[str, list[bytes]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.up = False
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
        if self.cfg.toolbox is not None and self.cfg.toolbox.tools:
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
        event(log, "models_loaded", seconds=round(time.monotonic() - started, 2), worker_pid=info.get("pid"),
              stt=self.wcfg["stt_model"], llm=self.wcfg["llm_model_path"] or self.wcfg["llm_url"],
              tts=self.wcfg["tts_model"])

    async def stop(self) -> None:
        self._stopping = True
        if self.client is not None:
            await self.loop.run_in_executor(None, self.client.stop)

    async def render(self, text: str) -> list[bytes]:
        """Synthesize ``text`` to call-rate frames (used for canned phrases)."""
        fut = self.loop.create_future()
        chunks: list[tuple[bytes, int]] = []
        self.tts("_canned", text, lambda pcm, rate: chunks.append((pcm, rate)),
                 on_done=lambda *_: fut.done() or fut.set_result(None),
                 on_error=lambda msg: fut.done() or fut.set_exception(EngineLoadError(f"TTS failed: {msg}")))
        await asyncio.wait_for(fut, 60)
        return self.to_frames(b"".join(p for p, _ in chunks), chunks[0][1] if chunks else self.rate)

    def to_frames(self, pcm: bytes, rate: int) -> list[bytes]:
        return split_frames(normalize(resample(pcm, rate, self.rate)), self.rate)

    # -- requests -------------------------------------------------------------
    def _send(self, msg: tuple, req: Request) -> int | None:
        if not self.up or self.client is None:
            if req.on_error:
                req.on_error("inference process is restarting")
            return None
        rid = self.client.next_id()
        self.pending[rid] = req
        try:
            self.client.send((msg[0], rid, *msg[1:]))
        except RuntimeError as exc:
            self.pending.pop(rid, None)
            if req.on_error:
                req.on_error(str(exc))
            return None
        return rid

    def stt(self, call: str, pcm16k: bytes, interim: bool, on_result, on_error=None) -> int | None:
        return self._send(("stt", call, pcm16k, interim), Request(call, "stt", on_result=on_result, on_error=on_error))

    def stt_backlog(self) -> int:
        """STT requests sent and not answered yet, over all calls."""
        return sum(1 for r in self.pending.values() if r.engine == "stt")

    def llm(self, call: str, messages: list[dict], params: dict, on_token, on_done, on_error,
            on_tool=None) -> int | None:
        return self._send(("llm", call, messages, params),
                          Request(call, "llm", on_token=on_token, on_done=on_done, on_error=on_error,
                                  on_tool=on_tool))

    def tts(self, call: str, text: str, on_result, on_done=None, on_error=None) -> int | None:
        return self._send(("tts", call, text), Request(call, "tts", on_result=on_result, on_done=on_done,
                                                         on_error=on_error))

    def cancel(self, call: str) -> None:
        """Stop everything queued or running for this call; late replies are dropped."""
        for rid in [r for r, q in self.pending.items() if q.call == call]:
            del self.pending[rid]
        if self.up and self.client is not None:
            try:
                self.client.send(("cancel", call))
            except RuntimeError:
                pass

    def release(self, call: str) -> None:
        self.cancel(call)
        if self.up and self.client is not None:
            try:
                self.client.send(("release", call))
            except RuntimeError:
                pass

    # -- replies ----------------------------------------------------------------
    def _from_thread(self, msg: tuple) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._dispatch, msg)

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "died":
            self._died(msg[1])
            return
        req = self.pending.get(msg[1])
        if req is None:                      # cancelled or unknown: drop
            return
        try:
            if kind == "tok":
                req.on_token(msg[2])
            elif kind == "tool":
                if req.on_tool:
                    req.on_tool(msg[2])
            elif kind == "pcm":
                req.on_result(msg[2], msg[3])
            elif kind == "stt":
                del self.pending[msg[1]]
                req.on_result(*msg[2:])
            elif kind in ("llm_done", "tts_done"):
                del self.pending[msg[1]]
                if req.on_done:
                    req.on_done(*msg[2:])
            elif kind == "error":
                del self.pending[msg[1]]
                self.metrics.model_errors.labels(msg[2]).inc()
                log.error("%s error on call %s: %s", msg[2], req.call, msg[3])
                if req.on_error:
                    req.on_error(msg[3])
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
        delay = min(30.0, 1.0 * 2 ** self._restarts)
        self._restarts += 1
        await asyncio.sleep(delay)
        try:
            await self._spawn()
            self._restarts = 0
        except EngineLoadError as exc:
            log.error("inference process did not come back: %s", exc)
            if not self._stopping:
                asyncio.ensure_future(self._restart())
