"""The states a call, a media stream, a transcribe/speaking and a recording can be in.

``StrEnum``s: each member *is* its string, so the API's JSON, the store's rows,
events and logs carry exactly the values they always did (``"progressing"``,
``"recording"``...), while the code names them and a typo fails at import.
"""
from __future__ import annotations

from enum import StrEnum


class CallState(StrEnum):
    """A call as the API shows it (``GET /v1/calls/{id}`` ``state``)."""
    RINGING = "ringing"
    PROGRESSING = "progressing"         # answered, media flowing
    ENDING = "ending"                   # hang-up asked for (the answer of ``POST .../hangup``)
    ENDED = "ended"


class StreamState(StrEnum):
    """A media stream (``bridge/api/streams.py``)."""
    CONNECTING = "connecting"           # the bridge is connecting out to ``url``
    WAITING = "waiting"                 # for a client to connect in at ``ws_path``
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"
    FAILED = "failed"


class TranscribeState(StrEnum):
    ACTIVE = "active"
    STOPPED = "stopped"


class SpeakingState(StrEnum):
    INITIATING = "initiating"           # created before the call is answered
    ACTIVE = "active"
    STOPPED = "stopped"


class RecordingState(StrEnum):
    """A call recording (``bridge/records/recorder.py``); its row's ``status``."""
    RECORDING = "recording"
    PAUSED = "paused"
    STOPPED = "stopped"                 # closed properly: the file is complete
    FAILED = "failed"                   # the disk or the encryption failed: the file is cut short
