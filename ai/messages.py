"""The messages between the cell's inference hub and the inference process (``ai/worker.py``).

Every message is a frozen dataclass of plain values, pickled across the
socket pair (``multiprocessing.connection``); both processes import this
module, so a field added here is seen by both sides. Requests carry the
hub's request id (``rid``) and the call they belong to; every reply carries
the ``rid`` it answers.

  hub -> worker                       worker -> hub
  SttRequest(rid, call, pcm, interim) SttResult(rid, text, no_speech, logprob, audio_s, secs)
  LlmRequest(rid, call, messages, p)  Token(rid, text) ... LlmDone(rid, secs, ntok)
                                      or ToolChoice(rid, choice), LlmDone(...)
  TtsRequest(rid, call, text)         Pcm(rid, pcm, rate) ... TtsDone(rid, secs)
  TurnRequest(rid, call, pcm)         TurnResult(rid, probability, secs)
  Cancel(call) / Release(call)        EngineError(rid, engine, message)
  Stop()                              Ready(info) | Fatal(message, trace)

``Died(exitcode)`` never crosses the pipe: the client's reader thread makes
it when the worker process has gone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union


# -- hub -> worker ------------------------------------------------------------------
@dataclass(frozen=True)
class SttRequest:
    """Transcribe 16 kHz mono PCM; an ``interim`` request still waiting is replaced by a newer one.
    ``model`` / ``language``: the call's language (a whisper directory, loaded on first use; "" is the
    worker's own model and language)."""
    rid: int
    call: str
    pcm: bytes = field(repr=False)
    interim: bool = False
    model: str = ""
    language: str = ""
    prompt: str = ""              # whisper's initial prompt ("" none): words to expect
    engine = "stt"


@dataclass(frozen=True)
class LlmRequest:
    """Stream a reply to ``messages`` (chat format) with generation ``params`` (``ai.llm.GenParams`` fields)."""
    rid: int
    call: str
    messages: list[dict]
    params: dict
    engine = "llm"


@dataclass(frozen=True)
class TtsRequest:
    """Synthesize ``text``; the audio comes back as ``Pcm`` chunks then ``TtsDone``. ``voice`` /
    ``voice_config``: the call's Piper voice (loaded on first use; "" is the worker's own)."""
    rid: int
    call: str
    text: str
    voice: str = ""
    voice_config: str = ""
    engine = "tts"


@dataclass(frozen=True)
class TurnRequest:
    """Score the end of the caller's turn (Smart Turn): ``pcm`` is the utterance so far, 16 kHz mono,
    trailing silence included (the model uses the last 8 s). A newer request of the call still
    waiting replaces this one."""
    rid: int
    call: str
    pcm: bytes = field(repr=False)
    engine = "turn"


@dataclass(frozen=True)
class Cancel:
    """Drop everything queued for ``call`` and stop what is running for it."""
    call: str


@dataclass(frozen=True)
class Release:
    """The call is over: forget its state (e.g. the LLM's cached conversation)."""
    call: str


@dataclass(frozen=True)
class Stop:
    """End the worker process."""


# -- worker -> hub ------------------------------------------------------------------
@dataclass(frozen=True)
class SttResult:
    rid: int
    text: str
    no_speech: float
    logprob: float
    audio_seconds: float
    seconds: float


@dataclass(frozen=True)
class Token:
    rid: int
    text: str


@dataclass(frozen=True)
class ToolChoice:
    """The model chose a tool: ``choice`` is ``{"tool", "arguments", "id"}``."""
    rid: int
    choice: dict


@dataclass(frozen=True)
class LlmDone:
    rid: int
    seconds: float
    tokens: int


@dataclass(frozen=True)
class Pcm:
    rid: int
    pcm: bytes = field(repr=False)
    rate: int = 0


@dataclass(frozen=True)
class TtsDone:
    rid: int
    seconds: float


@dataclass(frozen=True)
class TurnResult:
    """P(the caller's turn is complete) and the seconds the decision took."""
    rid: int
    probability: float
    seconds: float


@dataclass(frozen=True)
class EngineError:
    rid: int
    engine: str             # stt | llm | tts | turn
    message: str


@dataclass(frozen=True)
class Ready:
    """The models are loaded: ``info`` has ``pid``, ``tts_rate`` and ``turn_model`` (its name, or ``""``
    with the reason in ``turn_error`` when it did not load: the cell then uses the fixed silence window)."""
    info: dict[str, Any]


@dataclass(frozen=True)
class Fatal:
    """The models could not be loaded; the process exits."""
    message: str
    trace: str = ""


@dataclass(frozen=True)
class Died:
    """Made on the cell's side when the worker process has exited."""
    exitcode: int | None


Request = Union[SttRequest, LlmRequest, TtsRequest, TurnRequest]
ToWorker = Union[SttRequest, LlmRequest, TtsRequest, TurnRequest, Cancel, Release, Stop]
Reply = Union[SttResult, Token, ToolChoice, LlmDone, Pcm, TtsDone, TurnResult, EngineError]
FromWorker = Union[SttResult, Token, ToolChoice, LlmDone, Pcm, TtsDone, TurnResult, EngineError, Ready, Fatal, Died]
