"""Silero VAD (v5, MIT; its ONNX file ships in the ``pipecat-ai`` wheel) on onnxruntime, frame by frame.

``SileroVoice.is_speech(pcm16k)`` takes the call's 20 ms frames (16 kHz,
16-bit mono) like ``media.vad.VoiceDetector`` and answers with the latest
speech probability against ``threshold``. The model wants 512-sample chunks
(32 ms) plus the last 64 samples of the previous chunk as context, and keeps a
recurrent state between chunks; frames are buffered to chunk size, so a
verdict lags the audio by up to 12 ms more than WebRTC's.

``SileroDetector`` is the call's voice detector when ``[agent] vad =
"silero"`` (the default): the same interface as ``media.vad.VoiceDetector``
(energy floor, DTMF veto, ``last_level``) with Silero deciding what is
speech. Compared with WebRTC on the phone path (``tests/bench/vad.py``) it
has no false triggers on hiss, hum or babble-like noise where WebRTC has up
to ~200 a minute, at ~25 ms later onset and ~0.1-0.3 ms a frame. One ONNX
session is shared by all calls (``run`` is thread-safe; the recurrent state
is per call). ``detector()`` falls back to WebRTC, with a warning, when the
model cannot be loaded.
"""
from __future__ import annotations

import functools
import logging

import numpy as np

from ai.models import ModelNotFound, _package_dir
from media import dtmf
from media.vad import VoiceDetector, rms_dbfs

log = logging.getLogger("trunkline.ai")
CHUNK = 512
CONTEXT = 64


def model_path():
    path = _package_dir("pipecat") / "audio" / "vad" / "data" / "silero_vad.onnx"
    if not path.exists():
        raise ModelNotFound(f"{path} is missing (pip install --no-deps pipecat-ai)")
    return path


@functools.lru_cache(maxsize=1)
def _session():
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path()), sess_options=so, providers=["CPUExecutionProvider"])


class SileroVoice:
    """Silero's speech probability over 20 ms frames at 8 or 16 kHz (chunks of 32 ms)."""
    name = "silero"

    def __init__(self, threshold: float = 0.5, rate: int = 16000):
        if rate not in (8000, 16000):
            raise ValueError(f"Silero VAD needs 8 or 16 kHz, not {rate}")
        self.session = _session()
        self.threshold = threshold
        self.rate = rate
        self.chunk, self.ctx = (CHUNK, CONTEXT) if rate == 16000 else (CHUNK // 2, CONTEXT // 2)
        self.reset()

    def reset(self) -> None:
        self.state = np.zeros((2, 1, 128), dtype=np.float32)
        self.context = np.zeros((1, self.ctx), dtype=np.float32)
        self.pending = np.zeros(0, dtype=np.float32)
        self.last_prob = 0.0

    def probability(self, chunk: np.ndarray) -> float:
        x = np.concatenate([self.context, chunk[None, :]], axis=1)
        out, self.state = self.session.run(None, {"input": x, "state": self.state,
                                                  "sr": np.array(self.rate, dtype=np.int64)})
        self.context = x[:, -self.ctx:]
        return float(np.asarray(out).reshape(-1)[0])

    def is_speech(self, pcm: bytes) -> bool:
        self.pending = np.concatenate([self.pending, np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0])
        while self.pending.size >= self.chunk:
            self.last_prob = self.probability(self.pending[:self.chunk])
            self.pending = self.pending[self.chunk:]
        return self.last_prob >= self.threshold


class SileroDetector:
    """``media.vad.VoiceDetector``'s interface (energy floor, DTMF veto) with Silero deciding speech."""

    def __init__(self, rate: int, floor_dbfs: float = -45.0, threshold: float = 0.5):
        self.rate = rate
        self.model = SileroVoice(threshold, rate)
        self.floor = floor_dbfs
        self.last_level = -120.0
        self.last_dtmf: str | None = None

    def reset(self) -> None:
        self.model.reset()

    def is_speech(self, pcm: bytes) -> bool:
        self.last_level = level = rms_dbfs(pcm)
        self.last_dtmf = None
        voiced = self.model.is_speech(pcm)          # always fed: its state follows the audio
        if level < self.floor or not voiced:
            return False
        self.last_dtmf = dtmf.detect(pcm, self.rate)
        return self.last_dtmf is None


_warned = False


def warm(kind: str) -> None:
    """Load the shared ONNX session now (a cell that routes calls to the agent, at start, off its
    loop): otherwise the first agent call of every cell loads onnxruntime (~50 MB, ~130 ms) on the
    cell's event loop. A failure is left to ``detector()``, which falls back and says so."""
    if kind == "silero":
        try:
            _session()
        except Exception:  # noqa: BLE001 - detector() reports it on the first call
            pass


def detector(kind: str, rate: int, mode: int = 3):
    """The call's voice detector: ``"silero"`` (falls back to WebRTC if it cannot load) or ``"webrtc"``."""
    global _warned
    if kind == "silero":
        try:
            return SileroDetector(rate)
        except Exception as exc:  # noqa: BLE001 - a call must not fail for its VAD
            if not _warned:
                _warned = True
                log.warning("Silero VAD did not load (%s: %s): using the WebRTC VAD", type(exc).__name__, exc)
    return VoiceDetector(rate, mode)
