"""What goes into the turn machine and what comes out of it (``bridge.agent.turn``).

Inputs are small records the adapter builds from the call and the inference
process (a frame with its VAD verdict, a transcript, a tool choice, a snapshot
of the call's downlink); actions are what the machine wants done, executed in
order by ``AgentApp``. Plain data only: no clock, no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union


# -- inputs --------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    """One 20 ms uplink frame: arrival time, 16 kHz PCM for STT, the VAD's verdict and level."""
    t: float
    pcm16k: bytes
    voiced: bool
    level_dbfs: float


@dataclass(frozen=True)
class Line:
    """The call's downlink and the STT engine as they are now (read by the adapter)."""
    queued_out: int = 0                # frames queued for the media clock, not sent yet
    mark_time: float | None = None     # when the clock sent the marked frame (voice-to-voice), if it did
    stt_backlog: int = 0               # STT requests out over all calls (interim decodes wait for 0)
    model_calls: int = 1               # the cell's calls whose caller is transcribed (interims only while 1)


@dataclass(frozen=True)
class Transcript:
    """An STT result."""
    text: str
    no_speech: float
    logprob: float
    audio_s: float
    seconds: float

    @property
    def unclear(self) -> bool:
        return not self.text.strip() or self.no_speech > 0.6 or self.logprob < -1.0


@dataclass(frozen=True)
class ToolChoice:
    """The model chose a tool."""
    tool: str
    arguments: Any = None
    id: str | None = None

    @classmethod
    def of(cls, choice: dict) -> ToolChoice:
        return cls(str(choice.get("tool") or ""), choice.get("arguments"), choice.get("id"))


# -- actions -------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestStt:
    """Decode ``pcm16k``; answer with ``stt_result``/``interim_result`` (or ``*_failed``) for ``decode``."""
    decode: int
    pcm16k: bytes
    interim: bool = False
    prompt: str = ""          # words whisper should expect (a short utterance over the agent: backchannels)


@dataclass(frozen=True)
class RequestReply:
    """One model round for reply ``reply`` (None: the KV-cache warm-up, its answer is ignored).
    ``speculative``: the caller may not be finished; the audio is held back."""
    reply: int | None
    messages: list[dict]
    params: dict
    speculative: bool = False


@dataclass(frozen=True)
class ScoreTurn:
    """Ask the end-of-turn model about ``pcm16k`` (the utterance so far, trailing quiet included);
    answer with ``turn_score(decision, probability, seconds)`` or ``turn_failed(decision, msg)``."""
    decision: int
    pcm16k: bytes


@dataclass(frozen=True)
class Synthesize:
    """Speak ``text`` for reply ``reply``; audio comes back as ``speech_audio(reply, seq, ...)``."""
    reply: int
    seq: int
    text: str


@dataclass(frozen=True)
class Cancel:
    """Stop every model request of this call (late answers are dropped)."""


@dataclass(frozen=True)
class Release:
    """The call is over: drop its conversation in the inference process."""


@dataclass(frozen=True)
class CallTool:
    """Run ``choice`` through the tool runner; answer with ``tool_done(reply, choice, outcome)``."""
    reply: int
    choice: ToolChoice


@dataclass(frozen=True)
class Send:
    """Push these frames onto the call's downlink (the playout keeps only a few ahead)."""
    frames: list[bytes]


@dataclass(frozen=True)
class Flush:
    """Barge-in: drop the downlink's queued audio now."""


@dataclass(frozen=True)
class MarkFrame:
    """Note when the media clock sends this frame (the first audio of a reply)."""
    pcm: bytes


@dataclass(frozen=True)
class ClearMark:
    """Forget the mark; ``time_only``: keep a frame still waiting to be sent."""
    time_only: bool = False


@dataclass(frozen=True)
class HangUp:
    reason: str


@dataclass(frozen=True)
class LogTurn:
    """A turn record (turns.jsonl, the ``turn`` log line, and the transcript)."""
    turn: int
    role: str
    text: str
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LogTool:
    """A tool call's line in turns.jsonl."""
    turn: int
    tool: str
    status: str
    kind: str | None
    seconds: float


@dataclass(frozen=True)
class AuditTool:
    """A tool call's audit entry for the call record."""
    audit: dict


@dataclass(frozen=True)
class Emit:
    """A call event on the bus (``turn_latency``, ``tool_called``)."""
    type: str
    data: dict


@dataclass(frozen=True)
class LogEvent:
    """A structured log line (``voice_to_voice``, ``barge_in``, ``transcript_interim``)."""
    name: str
    fields: dict


@dataclass(frozen=True)
class Metric:
    """``metrics.<name>[.labels(label)].observe(value)``, or ``.inc()`` when ``count``."""
    name: str
    value: float = 1.0
    label: str | None = None
    count: bool = False


Action = Union[RequestStt, RequestReply, ScoreTurn, Synthesize, Cancel, Release, CallTool, Send, Flush, MarkFrame, ClearMark,
               HangUp, LogTurn, LogTool, AuditTool, Emit, LogEvent, Metric]
