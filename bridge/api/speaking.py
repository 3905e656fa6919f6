"""Call resources driven through the API: transcribes and speakings.

``Transcriber`` listens to the caller (direction ``in``) with the same VAD and
endpointer as the agent and publishes speech-started / interim / ended and
``transcript_created``; for direction ``out`` it publishes what the caller
heard of our speech. ``Speaking`` queues text, synthesizes it in order and
plays it; ``flush`` stops it at once and says what the caller heard.
"""
from __future__ import annotations

import time
from collections import deque

from bridge.core.states import SpeakingState, TranscribeState
from bridge.records.store import new_id
from media.endpoint import EndpointConfig, Endpointer
from media.playout import Playout
from media.resample import Resampler
from media.vad import VoiceDetector


class Transcriber:
    def __init__(self, session, hub, emit, direction: str, cfg: dict):
        self.id = new_id(f"tr_c{session.services.cell_id}")
        self.session = session
        self.hub = hub
        self.emit = emit
        self.direction = direction
        self.status: TranscribeState = TranscribeState.ACTIVE
        self.key = f"{session.call_id}/tr"
        rate = session.media.rate
        self.vad = VoiceDetector(rate, cfg["vad_mode"])
        self.ep = Endpointer(EndpointConfig(min_speech=cfg["min_speech"], pause=cfg["pause"],
                                            silence=cfg["silence"], min_utterance=cfg["min_utterance"]))
        self.to16k = None if rate == 16000 else Resampler(rate, 16000)
        self.interim_every = cfg["interim_every"]
        self.preroll: deque[bytes] = deque(maxlen=15)
        self.utterance: list[bytes] = []
        self.last_interim = 0.0
        self.interim_busy = False
        if self.hears_caller():
            hub.joined(session.call_id)        # the hub's count of calls being transcribed (interims)

    def as_dict(self) -> dict:
        return {"id": self.id, "call_id": self.session.call_id, "direction": self.direction, "status": self.status}

    def hears_caller(self) -> bool:
        return self.status == TranscribeState.ACTIVE and self.direction in ("in", "both")

    def on_frame(self, t: float, pcm: bytes) -> None:
        pcm16 = pcm if self.to16k is None else self.to16k.process(pcm)
        ev = self.ep.push(self.vad.is_speech(pcm), t)
        if ev == "start":
            self.utterance = list(self.preroll)
            self.emit("transcribe_speech_started", {"transcribe_id": self.id, "direction": "in"})
        if self.ep.in_speech or ev in ("end", "noise"):
            self.utterance.append(pcm16)
        else:
            self.preroll.append(pcm16)
        if ev in ("end", "noise"):
            self.emit("transcribe_speech_ended", {"transcribe_id": self.id, "direction": "in"})
            if ev == "end":
                pcm_all = b"".join(self.utterance)
                self.hub.stt(self.key, pcm_all, False, self._final, on_error=lambda m: None)
            self.utterance = []
        elif self.ep.in_speech and self.interim_every and not self.interim_busy and self.hub.stt_backlog() == 0 \
                and self.hub.model_calls() <= 1 \
                and t - max(self.last_interim, self.ep.speech_started or t) >= self.interim_every:
            # as the agent's (bridge/agent/turn.py): only while this is the one call being transcribed
            self.last_interim = t
            self.interim_busy = True
            self.hub.stt(self.key, b"".join(self.utterance), True, self._interim,
                         on_error=lambda m: setattr(self, "interim_busy", False))

    def _interim(self, text, no_speech, logprob, audio_s, secs) -> None:
        self.interim_busy = False
        if self.status == TranscribeState.ACTIVE and text and no_speech < 0.6:
            self.emit("transcribe_speech_interim", {"transcribe_id": self.id, "direction": "in", "message": text})

    def _final(self, text, no_speech, logprob, audio_s, secs) -> None:
        if self.status != TranscribeState.ACTIVE or not text.strip() or no_speech > 0.6:
            return
        self.session.record_transcript("in", text, self.id, {"stt_seconds": round(secs, 3)})

    def spoken(self, text: str) -> None:
        if self.status == TranscribeState.ACTIVE and self.direction in ("out", "both") and text:
            self.session.record_transcript("out", text, self.id)

    def stop(self) -> None:
        if self.status == TranscribeState.ACTIVE:
            self.status = TranscribeState.STOPPED
            self.hub.cancel(self.key)
            if not any(t.hears_caller() for t in self.session.transcribers.values()):
                self.hub.left(self.session.call_id)
            self.emit("transcribe_stopped", {"transcribe_id": self.id})


class Speaking:
    def __init__(self, session, hub, emit, direction: str = "in"):
        self.id = new_id(f"spk_c{session.services.cell_id}")
        self.session = session
        self.hub = hub
        self.emit = emit
        self.direction = direction
        self.status: SpeakingState = SpeakingState.INITIATING
        self.key = f"{session.call_id}/spk"
        self.playout = Playout(ahead=3)
        self.pending = 0              # texts sent to TTS, not fully synthesized
        self.created = time.time()

    def as_dict(self) -> dict:
        return {"id": self.id, "call_id": self.session.call_id, "direction": self.direction,
                "status": self.status, "queued": self.pending + len(self.playout.queue)}

    def activate(self) -> None:
        if self.status == SpeakingState.INITIATING:
            self.status = SpeakingState.ACTIVE
            self.emit("speaking_started", {"speaking_id": self.id})

    def say(self, text: str) -> None:
        self.pending += 1
        gen = self.session.speak_generation

        def on_pcm(pcm, rate):
            if gen == self.session.speak_generation and self.status == SpeakingState.ACTIVE:
                self.playout.add(text_box[0], self.hub.to_frames(pcm, rate))
                text_box[0] = ""            # only the first chunk carries the text

        def on_done(*_):
            if gen == self.session.speak_generation:
                self.pending -= 1
        text_box = [text]
        self.hub.tts(self.key, text, on_pcm, on_done=on_done, on_error=lambda m: on_done())

    def tick(self) -> None:
        media = self.session.media
        self.playout.fill(media.downlink, media.queued_out())
        heard = self.playout.take_heard()
        if heard:
            self.session.heard_out(heard)

    def flush(self) -> str:
        """Stop now, drop the queue; returns what the caller heard of the flushed speech."""
        self.session.speak_generation += 1
        self.hub.cancel(self.key)
        self.pending = 0
        cleared = self.session.media.flush_out()
        heard = self.playout.flush(cleared)
        if heard.text:
            self.session.heard_out(heard.text)
        return heard.text

    def stop(self) -> str:
        heard = self.flush()
        if self.status != SpeakingState.STOPPED:
            self.status = SpeakingState.STOPPED
            self.emit("speaking_stopped", {"speaking_id": self.id})
        return heard
