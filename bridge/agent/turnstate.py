"""The turn machine's records: its states, a reply being produced, a decode, an async update.

Plain data for ``bridge.agent.turn.TurnMachine`` (which changes them); no clock, no I/O.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ai.text import SentenceCutter
from bridge.agent.actions import ToolChoice, Transcript


class State(enum.Enum):
    LISTENING = "listening"
    DECODING = "decoding"
    HOLDING = "holding"
    REPLYING = "replying"
    TOOL = "tool"
    PLAYING = "playing"
    HANGING_UP = "hanging_up"
    ENDED = "ended"


REPLY_STATES = frozenset({State.HOLDING, State.REPLYING, State.TOOL, State.PLAYING})
RELEASED = frozenset({State.REPLYING, State.TOOL, State.PLAYING})     # the caller hears (or waits for) it
AT_REST = frozenset({State.LISTENING, State.DECODING})                 # no reply: timers and updates may run


@dataclass(frozen=True)
class Transition:
    at: float
    old: State
    new: State
    why: str


@dataclass
class Timings:
    """When a reply's stages started and first answered (the machine's ``now``s)."""
    llm_at: float
    first_token_at: float | None = None
    tts_at: float | None = None
    first_audio_at: float | None = None
    measured: bool = False          # voice-to-voice observed

    def llm_first_token(self) -> float:
        return (self.first_token_at or self.llm_at) - self.llm_at


@dataclass
class Reply:
    """One agent turn being produced."""
    id: int
    turn: int
    user_text: str
    last_voice: float               # rx time of the caller's last voiced frame
    timings: Timings
    stt_seconds: float = 0.0
    llm_done: bool = False          # the current model round has finished (or there is none)
    tts_pending: int = 0            # sentences sent to TTS and not finished
    rounds: int = 0                 # model rounds that ended in a tool call
    sentences: list[str] = field(default_factory=list)
    first_text: dict[int, str] = field(default_factory=dict)    # seq -> sentence, until its first audio
    held: list[tuple[str, list[bytes]]] = field(default_factory=list)   # audio kept back while HOLDING
    cutter: SentenceCutter = field(default_factory=SentenceCutter)
    pending_tool: ToolChoice | None = None      # chosen while HOLDING: runs only if the turn stands
    filler_at: float | None = None              # when the filler line is due (a slow tool)

    @property
    def composed(self) -> bool:
        return self.llm_done and self.tts_pending == 0


@dataclass
class Decode:
    """A final-or-speculative STT request for the caller's utterance."""
    id: int
    frames: int
    sent_at: float
    result: Transcript | None = None
    turn_over: bool = False         # the endpointer has ended the turn


@dataclass(frozen=True)
class Update:
    """An async tool result waiting to be spoken."""
    tool: str
    result: dict
    say: str | None


class _Collect:
    """Stands in for the downlink while the playout tops it up."""
    def __init__(self):
        self.frames: list[bytes] = []

    def push(self, frame: bytes) -> None:
        self.frames.append(frame)
