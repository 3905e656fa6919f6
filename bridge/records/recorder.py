"""One call's recording: the audio tap that writes an encrypted stereo file.

Pipeline, every 20 ms tick on the event loop::

    tap.on_audio(inbound, outbound) ─▶ StereoPairer (caller left, heard right)
      ─▶ 0.5 s hold-back (so a DTMF pause can still silence the digit just heard)
      ─▶ paused? silence : interleave ─▶ Ogg Opus or WAV ─▶ SealedWriter (AES-256-GCM chunks)

About once a second (``flush_interval``) the encoder cuts an Ogg page and the
sealed writer seals everything since the last flush as one chunk, written in
one ``write``: a process killed mid-call leaves a file that decrypts up to
the last second and is reported as truncated.

A failing disk or cipher never ends the call: the recording stops, the error
is counted (``trunkline_recording_write_errors_total`` /
``..._encryption_failures_total``) and logged, and ``recording_stopped``
says why.

Pauses (``pause``/``resume``) are kept as intervals of the recording's own
timeline; paused audio is written as silence in both channels so the file
keeps the call's timing. A pause has holders: ``api`` (a PCI moment started
through the API) and ``dtmf`` (any keypad digit, for ``dtmf_resume_after``
seconds after the last one). The recording resumes when no holder is left;
an API ``resume`` releases both.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import secrets
import time
from collections import deque
from typing import Protocol

from bridge.core.keys import KeyRing
from bridge.core.states import RecordingState
from bridge.records.sealed import SealError, SealedWriter
from media.ogg import OggOpusEncoder
from media.stereo import StereoPairer, WavStream, interleave

class Owner(Protocol):
    """What a recorder needs of the registry that owns it (``recording.Recordings``)."""
    cfg: dict
    metrics: object

    def changed(self, rec: "Recorder", event: str, data: dict) -> None: ...

    def finished(self, rec: "Recorder", reason: str) -> None: ...

log = logging.getLogger("trunkline.recording")

HOLD_BACK = 25               # frames (0.5 s) kept unencoded so a DTMF pause can reach back
DTMF_LOOKBACK = 0.3          # seconds before a digit's event that are silenced with it
ACTIVE = (RecordingState.RECORDING, RecordingState.PAUSED)


class Recorder:
    """One recording of one call: the audio tap and its encrypted file."""

    def __init__(self, reg: Owner, session, rec_id: str, path: str, fmt: str, keys: KeyRing,
                 started_by: str):
        self.reg = reg
        self.session = session
        self.id = rec_id
        self.call_id = session.call_id
        self.path = path
        self.fmt = fmt
        self.key_id = keys.current
        self.started_by = started_by
        self.rate = session.media.rate
        self.started = time.time()
        self.ended: float | None = None
        self.state: RecordingState = RecordingState.RECORDING
        self.error: str | None = None
        self.reason: str | None = None        # why it stopped
        self.pairer = StereoPairer(session.media.frame_bytes)
        self.held: deque = deque()            # (index, left, right) not yet encoded
        self.index = 0                        # frames paired so far (the recording's clock)
        self.encoded = 0
        self.holders: set[str] = set()
        self.intervals: list[dict] = []       # {"start": frame, "end": frame | None, "reasons": [...]}
        self.dtmf_at = 0.0
        cfg = reg.cfg
        self.flush_every = max(1, round(cfg["flush_interval"] * 50))
        self.stereo_silence = bytes(2 * session.media.frame_bytes)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.file = open(path, "xb")
        try:
            self.writer = SealedWriter(self.file, self.key_id, keys.key(self.key_id))
            if fmt == "opus":
                self.encoder = OggOpusEncoder(self.rate, 2, serial=secrets.randbits(32), bitrate=cfg["opus_bitrate"],
                                              comments=[f"TRUNKLINE_RECORDING={rec_id}", f"TRUNKLINE_CALL={self.call_id}",
                                                        "CHANNELS=left caller, right agent"])
            else:
                self.encoder = WavStream(self.rate, 2)
            self.writer.write(self.encoder.header())
            self.writer.flush()
        except BaseException:
            self.file.close()
            try:
                os.unlink(path)                   # no row points at it: do not leave it behind
            except OSError:
                pass
            raise
        self._counted = 0
        self._count_bytes()

    # -- the tap ---------------------------------------------------------------------------
    def on_audio(self, inbound: list, outbound: list, now: float) -> None:
        if self.state not in ACTIVE:
            return
        if "dtmf" in self.holders and now - self.dtmf_at >= self.reg.cfg["dtmf_resume_after"]:
            self.resume("dtmf")
        for left, right in self.pairer.push(inbound, outbound):
            self.held.append((self.index, left, right))
            self.index += 1
        while len(self.held) > HOLD_BACK and self.state in ACTIVE:
            self._encode(*self.held.popleft())

    def call_ended(self) -> None:
        self.stop("call ended")

    def failed(self, exc: BaseException) -> None:
        """The cell removed this tap because it raised: end the file as well as we can."""
        self._fail("error", exc)

    # -- encoding -------------------------------------------------------------------------------
    def _paused(self, i: int) -> bool:
        for iv in reversed(self.intervals):
            if iv["start"] <= i and (iv["end"] is None or i < iv["end"]):
                return True
            if iv["end"] is not None and iv["end"] <= i:
                return False
        return False

    def _encode(self, i: int, left: bytes, right: bytes) -> None:
        stereo = self.stereo_silence if self._paused(i) else interleave(left, right)
        try:
            data = self.encoder.encode(stereo)
            if data:
                self.writer.write(data)
            self.encoded += 1
            if self.encoded % self.flush_every == 0:
                self._flush()
        except OSError as exc:
            self._fail("write_error", exc)
        except SealError as exc:
            self._fail("encryption_error", exc)

    def _flush(self) -> None:
        page = self.encoder.flush()
        if page:
            self.writer.write(page)
        self.writer.flush()
        self._count_bytes()

    def _count_bytes(self) -> None:
        delta = self.writer.bytes_written - self._counted
        if delta:
            self.reg.metrics.recording_bytes.inc(delta)
            self._counted = self.writer.bytes_written

    # -- control ----------------------------------------------------------------------------------
    def pause(self, holder: str, back: float = 0.0) -> bool:
        """Start (or join) a pause; ``back`` seconds of audio not yet encoded are silenced too."""
        if self.state not in ACTIVE or holder in self.holders:
            return False
        self.holders.add(holder)
        if len(self.holders) > 1:
            self.intervals[-1]["reasons"].append(holder)
            return True
        start = max(self.encoded, self.index - round(back * 50))
        last = self.intervals[-1] if self.intervals else None
        if last is not None and last["end"] is not None and start <= last["end"]:
            last["end"] = None                        # reaches back into the last pause: one interval
            last["reasons"].append(holder)
        else:
            self.intervals.append({"start": start, "end": None, "reasons": [holder]})
        self.state = RecordingState.PAUSED
        self.reg.changed(self, "recording_paused", {"reason": holder, "at": round(start * 0.02, 3)})
        return True

    def resume(self, holder: str | None = None) -> bool:
        """Release ``holder`` (None: every holder); False if that did not pause it."""
        if self.state != RecordingState.PAUSED or (holder is not None and holder not in self.holders):
            return False
        self.holders = set() if holder is None else self.holders - {holder}
        if self.holders:
            return True
        self.intervals[-1]["end"] = self.index
        self.state = RecordingState.RECORDING
        self.reg.changed(self, "recording_resumed", {"reason": holder or "api",
                                                     "at": round(self.index * 0.02, 3)})
        return True

    def dtmf(self, digit: str, duration_ms: int) -> None:
        self.dtmf_at = time.monotonic()
        self.pause("dtmf", DTMF_LOOKBACK + duration_ms / 1000)

    def stop(self, reason: str) -> None:
        if self.state not in ACTIVE:
            return
        for left, right in self.pairer.drain():
            self.held.append((self.index, left, right))
            self.index += 1
        while self.held and self.state in ACTIVE:
            self._encode(*self.held.popleft())
        if self.state not in ACTIVE:          # the disk failed while draining
            return
        self._close_intervals()
        try:
            tail = self.encoder.close()
            if tail:
                self.writer.write(tail)
            self.writer.close(fsync=False)
            self._count_bytes()
        except OSError as exc:
            self._fail("write_error", exc)
            return
        except SealError as exc:
            self._fail("encryption_error", exc)
            return
        self.state = RecordingState.STOPPED
        self.ended = time.time()
        self._release_file(sync=True)
        self.reg.finished(self, reason)

    def _close_intervals(self) -> None:
        if self.intervals and self.intervals[-1]["end"] is None:
            self.intervals[-1]["end"] = self.index
        self.holders.clear()

    def _fail(self, kind: str, exc: BaseException) -> None:
        if self.state not in ACTIVE:
            return
        self.state = RecordingState.FAILED
        self.ended = time.time()
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            detail = "no space left on device"
        self.error = f"{kind}: {detail}"
        if kind == "write_error":
            self.reg.metrics.recording_write_errors.inc()
        elif kind == "encryption_error":
            self.reg.metrics.recording_encryption_failures.inc()
        log.error("recording %s of call %s stopped: %s", self.id, self.call_id, self.error,
                  extra={"fields": {"event": "recording_failed", "recording_id": self.id, "call_id": self.call_id,
                                    "error": self.error}})
        self._close_intervals()
        self._release_file(sync=False)
        self.reg.finished(self, kind)

    def _release_file(self, sync: bool) -> None:
        f = self.file

        def close() -> None:
            try:
                if sync:
                    os.fsync(f.fileno())
            except OSError:
                pass
            try:
                f.close()
            except OSError:
                pass
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and sync:
            loop.run_in_executor(None, close)          # fsync can take a while; not on the tick
        else:
            close()

    # -- views --------------------------------------------------------------------------------------
    def paused_view(self) -> list[dict]:
        return [{"start": round(iv["start"] * 0.02, 3),
                 "end": None if iv["end"] is None else round(iv["end"] * 0.02, 3),
                 "reasons": list(iv["reasons"])} for iv in self.intervals]

    @property
    def duration(self) -> float:
        return round(self.index * 0.02, 3)

    def as_row(self) -> dict:
        """What the store row says, from the live state (also when the row could not be written)."""
        return {"id": self.id, "call_id": self.call_id, "status": self.state, "format": self.fmt, "rate": self.rate,
                "key_id": self.key_id, "path": self.path, "started": self.started, "ended": self.ended,
                "duration": self.duration, "bytes": self.writer.bytes_written,
                "paused": json.dumps(self.paused_view()), "reason": self.reason, "error": self.error,
                "complete": 1 if self.state == RecordingState.STOPPED else 0 if self.state == RecordingState.FAILED else None,
                "started_by": self.started_by}
