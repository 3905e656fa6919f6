"""End-of-turn model: Smart Turn v3.2 (BSD-2, pipecat-ai) on onnxruntime.

``SmartTurn.predict(pcm16k)`` takes the caller's utterance so far (16 kHz mono
16-bit PCM, trailing silence included) and returns the probability that the
caller has finished their turn. The model looks at the last 8 s only (shorter
input is zero-padded at the front) through Whisper-style log-mel features:
80 Slaney mel bands, 25 ms Hann windows every 10 ms, log10, clamped to 8
decades below the peak and scaled to about [-1, 1]; the waveform is
normalized to zero mean and unit variance first.

The ONNX file ships inside the ``pipecat-ai`` wheel, which production
installs with ``--no-deps`` (``make deps``): only the file is used, pipecat
itself is never imported. ``model_path()`` finds it; ``ModelNotFound`` says
what to install when it is missing.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ai.models import ModelNotFound, _package_dir

RATE = 16000
WINDOW_S = 8
N_FFT = 400
HOP = 160
N_MELS = 80
FILE = "smart-turn-v3.2-cpu.onnx"


def model_path() -> Path:
    """The Smart Turn v3.2 CPU model inside the installed ``pipecat-ai`` wheel."""
    path = _package_dir("pipecat") / "audio" / "turn" / "smart_turn" / "data" / FILE
    if not path.exists():
        raise ModelNotFound(f"{path} is missing (pip install --no-deps pipecat-ai)")
    return path


# -- features --------------------------------------------------------------------------
def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    lin = f * 3.0 / 200.0
    return np.where(f < 1000.0, lin, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) * 27.0 / np.log(6.4))


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m < 15.0, m * 200.0 / 3.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0))


def _mel_bank() -> np.ndarray:
    """Triangular filters (n_mels, n_fft/2+1), each normalized to unit area (Slaney)."""
    bins = np.linspace(0.0, RATE / 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(RATE / 2), N_MELS + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lo) / (mid - lo)
    falling = (hi - bins[None, :]) / (hi - mid)
    tri = np.clip(np.minimum(rising, falling), 0.0, None)
    return tri * (2.0 / (hi - lo))


_BANK = _mel_bank()
_HANN = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)     # periodic


def last_window(x: np.ndarray) -> np.ndarray:
    """The last 8 s of ``x`` (float), zero-padded at the front when shorter."""
    n = RATE * WINDOW_S
    if x.size >= n:
        return x[-n:]
    return np.concatenate([np.zeros(n - x.size, dtype=x.dtype), x])


def log_mel(x: np.ndarray) -> np.ndarray:
    """Whisper-style log-mel features (80, 800) of exactly 8 s of 16 kHz float audio."""
    x = x.astype(np.float32)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * _HANN, axis=1)) ** 2          # (frames, bins)
    mel = np.log10(np.maximum(power @ _BANK.T, 1e-10)).T[:, :-1]       # (80, 800)
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


# -- the model ---------------------------------------------------------------------------
class SmartTurn:
    """One ONNX session (single-threaded: a decision is ~tens of ms on one core)."""

    name = "smart-turn"

    def __init__(self, path: str | Path | None = None, threads: int = 1):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path) if path else model_path()
        self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def predict(self, pcm16k: bytes) -> tuple[float, float]:
        """P(the turn is complete) for 16-bit mono 16 kHz PCM, and the seconds it took."""
        start = time.perf_counter()
        x = np.frombuffer(pcm16k, dtype="<i2").astype(np.float32) / 32768.0
        feats = log_mel(last_window(x))[None]
        out = self.session.run(None, {self.input: feats})[0]
        return float(np.asarray(out).reshape(-1)[0]), time.perf_counter() - start
