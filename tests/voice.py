"""Caller speech for agent tests: real Piper speech, real whisper to check replies."""
from __future__ import annotations

import functools
import time

import numpy as np

from ai import models
from media import g711
from media.resample import resample
from media.vad import VoiceDetector


@functools.lru_cache(maxsize=1)
def _tts():
    from ai.tts import PiperTTS
    return PiperTTS(*models.piper_voice(), threads=1)


@functools.lru_cache(maxsize=1)
def _stt():
    from ai.stt import WhisperSTT
    return WhisperSTT(str(models.whisper_dir()), threads=2)


@functools.lru_cache(maxsize=32)
def say(text: str, rate: int = 8000) -> bytes:
    tts = _tts()
    return resample(b"".join(tts.synthesize(text)), tts.rate, rate)


def ulaw_packets(pcm8k: bytes) -> list[bytes]:
    pad = (-len(pcm8k)) % 320
    pcm8k += bytes(pad)
    return [g711.ulaw_encode(pcm8k[i:i + 320]) for i in range(0, len(pcm8k), 320)]


SILENCE_ULAW = bytes([0xFF]) * 160


def decode(received, start: float | None = None, end: float | None = None) -> bytes:
    """PCM (8 kHz) of PCMU packets received in [start, end) (peer.received tuples)."""
    return b"".join(g711.ulaw_decode(p) for t, pt, _, p in received
                    if pt == 0 and (start is None or t >= start) and (end is None or t < end))


def speech_seconds(pcm8k: bytes) -> float:
    vad = VoiceDetector(8000, mode=2)
    frames = [pcm8k[i:i + 320] for i in range(0, len(pcm8k) - 319, 320)]
    return 0.02 * sum(1 for f in frames if vad.is_speech(f))


def transcribe(pcm8k: bytes) -> str:
    return _stt().transcribe(resample(pcm8k, 8000, 16000)).text


def first_voice_time(received, after: float, level: int = 800) -> float | None:
    for t, pt, _, p in received:
        if pt == 0 and t >= after:
            x = np.frombuffer(g711.ulaw_decode(p), "<i2")
            if np.abs(x).max() > level:
                return t
    return None


def last_voice_time(received, level: int = 800) -> float | None:
    last = None
    for t, pt, _, p in received:
        if pt == 0 and np.abs(np.frombuffer(g711.ulaw_decode(p), "<i2")).max() > level:
            last = t
    return last


class Caller:
    """A SIPp-signalled call whose RTP we send and record ourselves, in real time."""

    def __init__(self, cell, tmp, seconds: float = 30.0, scenario: str = "wait_bye.xml"):
        from support import RtpPeer, sipp
        self.peer = RtpPeer(cell.ports["rtp_peer"])
        self.proc = sipp(scenario, cell.sip, tmp, "-d", str(int(seconds * 1000)), local_port=cell.ports["sipp"],
                         rtpport=cell.ports["rtp_peer"], background=True, timeout=seconds + 30)
        self.peer.wait_remote()

    def silence(self, seconds: float) -> None:
        self.peer.stream([SILENCE_ULAW] * int(seconds * 50))

    def speak(self, text: str) -> float:
        """Send the phrase; returns the time its last packet went out."""
        self.peer.stream(ulaw_packets(say(text)))
        return time.monotonic()

    def wait_reply(self, after: float, timeout: float = 40.0, quiet: float = 1.2) -> bytes:
        """Keep sending silence until the agent has spoken and then been quiet for ``quiet`` s."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.silence(0.2)
            first = first_voice_time(self.peer.received, after)
            last = last_voice_time(self.peer.received)
            if first and last and time.monotonic() - last > quiet:
                return decode(self.peer.received, after)
        raise AssertionError("the agent did not answer")

    def goodbye(self, timeout: float = 30.0) -> int:
        """Say goodbye and keep the line open until the agent hangs up (SIPp answers its BYE)."""
        self.speak("Goodbye.")
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            self.silence(0.2)
        return self.close()

    def close(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.peer.close()
        return self.proc.returncode


def agent_call(tmp, config: str, seconds: float):
    """An agent cell (``config``, bundled models) started in ``tmp`` and a ``Caller`` on it from
    ports of its own (a bench's long call): ``(cell, caller)``; the caller has not waited yet."""
    from support import CellProcess, next_ports
    cell = CellProcess(tmp, config, args=("--app", "agent")).start(wait=False)
    cell.wait_healthy(timeout=180)
    ports = next_ports()
    view = type("CellView", (), {"ports": dict(cell.ports, rtp_peer=ports["rtp_peer"], sipp=ports["sipp"]),
                                 "sip": cell.sip})()
    (tmp / "caller").mkdir()
    return cell, Caller(view, tmp / "caller", seconds=seconds)
