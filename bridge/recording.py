"""Call recordings: a per-call audio tap that writes an encrypted stereo file.

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
from typing import AsyncIterator

from bridge.keys import KeyRing, KeyRingError, configured_keyring
from bridge.logs import event
from bridge.sealed import SealError, SealedError, SealedKeyError, SealedReader, SealedWriter, scan
from bridge.store import new_id
from media.ogg import OggError, OggOpusEncoder, read_pages
from media.stereo import WAV_HEADER_BYTES, StereoPairer, WavStream, interleave, wav_header

log = logging.getLogger("trunkline.recording")

FORMATS = {"opus": ("audio/ogg", "ogg"), "wav": ("audio/wav", "wav")}
HOLD_BACK = 25               # frames (0.5 s) kept unencoded so a DTMF pause can reach back
DTMF_LOOKBACK = 0.3          # seconds before a digit's event that are silenced with it
ACTIVE = ("recording", "paused")


class RecordingError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def number_of(uri: str) -> str:
    """The user part of a SIP URI (the number), '' if there is none."""
    if "@" not in uri:
        return ""
    return uri.split("sip:", 1)[-1].split("@", 1)[0].split(";", 1)[0]


class Recorder:
    """One recording of one call: the audio tap and its encrypted file."""

    def __init__(self, reg: "Recordings", session, rec_id: str, path: str, fmt: str, keys: KeyRing,
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
        self.state = "recording"
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
        self.state = "paused"
        self.reg.changed(self, "recording_paused", {"reason": holder, "at": round(start * 0.02, 3)})
        return True

    def resume(self, holder: str | None = None) -> bool:
        """Release ``holder`` (None: every holder); False if that did not pause it."""
        if self.state != "paused" or (holder is not None and holder not in self.holders):
            return False
        self.holders = set() if holder is None else self.holders - {holder}
        if self.holders:
            return True
        self.intervals[-1]["end"] = self.index
        self.state = "recording"
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
        self.state = "stopped"
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
        self.state = "failed"
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
                "complete": 1 if self.state == "stopped" else 0 if self.state == "failed" else None,
                "started_by": self.started_by}


class Recordings:
    """Every recording of this cell: when to record, the live recorders, the rows, retention."""

    def __init__(self, cell):
        self.cell = cell
        self.cfg = cell.cfg.raw["recordings"]
        self.store = cell.store
        self.metrics = cell.metrics
        self.cell_id = getattr(cell, "cell_id", "0")
        self.dir = os.path.abspath(os.path.expanduser(self.cfg["dir"] or os.path.join(cell.cfg.data_dir,
                                                                                        "recordings")))
        self.active: dict[str, Recorder] = {}      # call id -> its live recording
        self.keys: KeyRing | None = None
        try:
            self.keys = configured_keyring(self.cfg)
        except KeyRingError as exc:              # config.load refuses this when recordings can start
            log.error("recordings are unavailable: %s", exc)
        for w in (self.keys.warnings if self.keys else []):
            log.warning(w)
        self._recover()

    # -- starting ---------------------------------------------------------------------------------
    def wanted(self, s) -> str | None:
        """Why this call is recorded from the answer on: "number" rule, "config" default, or None."""
        rules = self.cfg["numbers"]
        num = number_of(s.to_uri)
        for candidate in (num, num.lstrip("+"), "+" + num.lstrip("+")):
            if candidate in rules:
                return "number" if rules[candidate] else None
        return "config" if self.cfg["enabled"] else None

    def on_answered(self, s) -> None:
        why = self.wanted(s)
        if why is None or s.call_id in self.active:
            return
        try:
            self.start(s, started_by=why)
        except RecordingError as exc:
            log.error("cannot record call %s: %s", s.call_id, exc.message,
                      extra={"fields": {"call_id": s.call_id}})

    def start(self, s, fmt: str | None = None, started_by: str = "api") -> Recorder:
        if self.keys is None:
            raise RecordingError(409, "recordings_not_configured",
                                 "no recording key is configured ([recordings] key_file / key_env)")
        if s.call_id in self.active:
            raise RecordingError(409, "wrong_state", "the call is already being recorded")
        if s.state != "progressing":
            raise RecordingError(409, "wrong_state", "the call is not answered")
        fmt = fmt or self.cfg["format"]
        rec_id = new_id("rec")
        day = time.strftime("%Y-%m-%d", time.gmtime())
        path = os.path.join(self.dir, day, f"{rec_id}.{FORMATS[fmt][1]}.sealed")
        try:
            rec = Recorder(self, s, rec_id, path, fmt, self.keys, started_by)
        except OSError as exc:
            self.metrics.recording_write_errors.inc()
            log.error("cannot create recording file %s: %s", path, exc.strerror or exc)
            raise RecordingError(500, "recording_failed", f"cannot create the recording file: {exc.strerror or exc}") \
                from None
        except SealError as exc:
            self.metrics.recording_encryption_failures.inc()
            raise RecordingError(500, "recording_failed", str(exc)) from None
        self.active[s.call_id] = rec
        s.add_tap(rec)
        self.metrics.recordings_active.set(len(self.active))
        try:
            self.store.db.execute(
                "INSERT INTO recordings (id, call_id, status, format, rate, key_id, path, started, bytes, paused, "
                "started_by, cell) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (rec.id, rec.call_id, rec.state, fmt, rec.rate, rec.key_id, path, rec.started,
                 rec.writer.bytes_written, "[]", started_by, self.cell_id))
        except Exception:  # noqa: BLE001 - the recording goes on; the row is written again at the end
            log.exception("cannot store recording %s", rec.id)
            self.metrics.record_errors.inc()
        event(log, "recording_started", recording_id=rec.id, call_id=rec.call_id, format=fmt,
              key_id=rec.key_id, started_by=started_by)
        s.emit("recording_started", {"recording_id": rec.id, "format": fmt, "started_by": started_by})
        return rec

    # -- callbacks from recorders ---------------------------------------------------------------------
    def changed(self, rec: Recorder, etype: str, data: dict) -> None:
        self._update(rec)
        event(log, etype, recording_id=rec.id, call_id=rec.call_id, **data)
        rec.session.emit(etype, {"recording_id": rec.id, **data})

    def finished(self, rec: Recorder, reason: str) -> None:
        rec.reason = reason
        rec.session.remove_tap(rec)
        if self.active.get(rec.call_id) is rec:
            del self.active[rec.call_id]
        self.metrics.recordings_active.set(len(self.active))
        self._update(rec, reason=reason)
        data = {"recording_id": rec.id, "reason": reason, "status": rec.state, "duration": rec.duration,
                "bytes": rec.writer.bytes_written, "paused": rec.paused_view()}
        if rec.error:
            data["error"] = rec.error
        event(log, "recording_stopped", call_id=rec.call_id, **data)
        rec.session.emit("recording_stopped", data)

    def _update(self, rec: Recorder, reason: str | None = None) -> None:
        try:
            self.store.db.execute(
                "INSERT INTO recordings (id, call_id, status, format, rate, key_id, path, started, started_by, cell) "
                "VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET status = excluded.status",
                (rec.id, rec.call_id, rec.state, rec.fmt, rec.rate, rec.key_id, rec.path, rec.started,
                 rec.started_by, self.cell_id))
            self.store.db.execute(
                "UPDATE recordings SET ended = ?, duration = ?, bytes = ?, paused = ?, reason = COALESCE(?, reason), "
                "error = ?, complete = ? WHERE id = ?",
                (rec.ended, rec.duration, rec.writer.bytes_written, json.dumps(rec.paused_view()), reason,
                 rec.error, 1 if rec.state == "stopped" else 0 if rec.state == "failed" else None, rec.id))
        except Exception:  # noqa: BLE001 - a full disk must not end the call
            log.exception("cannot store recording %s", rec.id)
            self.metrics.record_errors.inc()

    # -- PII hooks ----------------------------------------------------------------------------------
    def on_dtmf(self, s, digit: str, duration_ms: int = 0) -> bool:
        """A keypad digit on a call: pauses its recording (``dtmf_pause``). True when the digit
        must be kept out of logs, events and records (the recording is paused: a PCI moment)."""
        rec = self.active.get(s.call_id)
        if rec is None:
            return False
        if self.cfg["dtmf_pause"]:
            rec.dtmf(digit, duration_ms)
        return rec.state == "paused"

    def for_call(self, call_id: str) -> Recorder | None:
        return self.active.get(call_id)

    def stop_all(self, reason: str) -> None:
        """Close every live recording properly (the cell is stopping)."""
        for rec in list(self.active.values()):
            try:
                rec.stop(reason)
            except Exception:  # noqa: BLE001
                log.exception("cannot close recording %s", rec.id)

    # -- rows -----------------------------------------------------------------------------------------
    def row(self, rec_id: str) -> dict | None:
        return self.store._one("SELECT * FROM recordings WHERE id = ?", rec_id)

    def rows(self, call_id: str | None = None, limit: int = 50) -> list[dict]:
        if call_id:
            return self.store._all("SELECT * FROM recordings WHERE call_id = ? ORDER BY started DESC LIMIT ?",
                                   call_id, limit)
        return self.store._all("SELECT * FROM recordings ORDER BY started DESC LIMIT ?", limit)

    def view(self, row: dict) -> dict:
        live = self.active.get(row["call_id"])
        if live is not None and live.id == row["id"]:
            status, duration, size, paused = live.state, live.duration, live.writer.bytes_written, live.paused_view()
        else:
            status, duration, size = row["status"], row["duration"], row["bytes"]
            paused = json.loads(row["paused"]) if row["paused"] else []
        return {"id": row["id"], "call_id": row["call_id"], "status": status, "format": row["format"],
                "content_type": FORMATS[row["format"]][0], "channels": {"left": "caller", "right": "agent"},
                "rate": row["rate"], "key_id": row["key_id"], "started": row["started"], "ended": row["ended"],
                "duration": duration, "bytes": size, "paused": paused, "started_by": row["started_by"],
                "reason": row["reason"], "error": row["error"],
                "complete": None if status in ACTIVE else bool(row["complete"])}

    def delete(self, rec_id: str) -> None:
        row = self.row(rec_id)
        if row is None:
            raise RecordingError(404, "not_found", "no such recording")
        if row["status"] in ACTIVE and row["call_id"] in self.active:
            raise RecordingError(409, "wrong_state", "the recording is still running; stop it first")
        self._remove(row)

    def _remove(self, row: dict) -> None:
        try:
            os.unlink(row["path"])
        except FileNotFoundError:
            pass
        self.store.db.execute("DELETE FROM recordings WHERE id = ?", (row["id"],))

    # -- restart and retention ---------------------------------------------------------------------------
    def _recover(self) -> None:
        """Recordings this cell left running when it died: close their rows as interrupted."""
        rows = self.store._all("SELECT * FROM recordings WHERE status IN ('recording', 'paused') AND "
                               "(cell = ? OR cell IS NULL)", self.cell_id)
        for row in rows:
            info = self._inspect(row)
            paused = json.loads(row["paused"] or "[]")
            for iv in paused:
                if iv.get("end") is None:
                    iv["end"] = info.get("duration")
            self.store.db.execute(
                "UPDATE recordings SET status = 'interrupted', reason = 'bridge restarted', ended = ?, duration = ?, "
                "bytes = ?, complete = 0, paused = ? WHERE id = ?",
                (info.get("ended"), info.get("duration"), info.get("bytes"), json.dumps(paused), row["id"]))
            log.warning("recording %s was interrupted by a restart; kept up to its last whole chunk", row["id"])

    def _inspect(self, row: dict) -> dict:
        out: dict = {"ended": row["started"], "bytes": 0, "duration": None}
        try:
            out["ended"] = os.path.getmtime(row["path"])
            out["bytes"] = os.path.getsize(row["path"])
            with open(row["path"], "rb") as f:
                sc = scan(f)
                if row["format"] == "wav":
                    out["duration"] = round(max(0, sc.plain_bytes - WAV_HEADER_BYTES) / (4 * row["rate"]), 3)
                elif self.keys is not None:
                    out["duration"] = ogg_duration(b"".join(SealedReader(f, self.keys)))
        except (OSError, SealedError):
            pass
        return out

    def purge(self, now: float | None = None) -> int:
        days = self.cfg["retention_days"]
        if not days:
            return 0
        cutoff = (now or time.time()) - days * 86400
        rows = self.store._all("SELECT * FROM recordings WHERE status NOT IN ('recording', 'paused') AND "
                               "COALESCE(ended, started) < ?", cutoff)
        for row in rows:
            try:
                self._remove(row)
            except OSError as exc:
                log.error("cannot delete recording file %s: %s", row["path"], exc.strerror)
        if rows:
            event(log, "recordings_purged", count=len(rows), retention_days=days)
        return len(rows)

    async def run_retention(self) -> None:
        """Purge expired recordings now and then (at most hourly; sooner for short retentions)."""
        days = self.cfg["retention_days"]
        if not days:
            return
        every = min(3600.0, max(1.0, days * 86400 / 4))
        while True:
            await asyncio.sleep(every)
            try:
                self.purge()
            except Exception:  # noqa: BLE001 - e.g. the database is locked for a moment
                log.exception("recording retention")

    # -- reading back ------------------------------------------------------------------------------------
    async def open_audio(self, rec_id: str) -> tuple[dict, int, bool, "AsyncIterator[bytes]"]:
        """(row, plaintext length, complete, async iterator of plaintext) after authenticating the whole
        file once; raises RecordingError. The iterator re-authenticates every chunk as it goes."""
        row = self.row(rec_id)
        if row is None:
            raise RecordingError(404, "not_found", "no such recording")
        if row["call_id"] in self.active and self.active[row["call_id"]].id == rec_id:
            raise RecordingError(409, "wrong_state", "the recording is still running; stop it first")
        if self.keys is None:
            raise RecordingError(409, "recordings_not_configured", "no recording key is configured")
        loop = asyncio.get_running_loop()
        try:
            total, complete = await loop.run_in_executor(None, verify_file, row["path"], self.keys)
        except FileNotFoundError:
            raise RecordingError(410, "recording_missing", "the recording's file is gone") from None
        except OSError as exc:
            raise RecordingError(500, "recording_unreadable", f"cannot read the recording: {exc.strerror}") from None
        except SealedKeyError as exc:
            raise RecordingError(409, "recording_key_unavailable", str(exc)) from None
        except SealedError as exc:
            self.metrics.recording_encryption_failures.inc()
            log.error("recording %s failed authentication: %s", rec_id, exc,
                      extra={"fields": {"event": "recording_corrupt", "recording_id": rec_id}})
            raise RecordingError(422, "recording_corrupt", f"the recording failed authentication: {exc}") from None
        return row, total, complete, self._chunks(row, total)

    async def _chunks(self, row: dict, total: int):
        wav = row["format"] == "wav"
        with open(row["path"], "rb") as f:
            reader = SealedReader(f, self.keys)
            head = b""
            for plain in reader:
                if wav and len(head) < WAV_HEADER_BYTES:
                    # The header was written before the length was known: fill it in now.
                    head += plain
                    if len(head) < WAV_HEADER_BYTES:
                        continue
                    plain = wav_header(row["rate"], 2, total - WAV_HEADER_BYTES) + head[WAV_HEADER_BYTES:]
                yield plain
                await asyncio.sleep(0)
            if wav and 0 < len(head) < WAV_HEADER_BYTES:
                yield head


def verify_file(path: str, keys: KeyRing) -> tuple[int, bool]:
    """Authenticate every chunk (nothing is kept): (plaintext bytes, complete). Raises SealedError."""
    total = 0
    with open(path, "rb") as f:
        reader = SealedReader(f, keys)
        for plain in reader:
            total += len(plain)
        return total, reader.complete


def ogg_duration(plain: bytes) -> float | None:
    """Seconds in a (possibly truncated) Ogg Opus stream, from its last whole page."""
    granule, pre_skip = -1, 0
    try:
        for n, page in enumerate(read_pages(plain)):
            if n == 0 and page.body[:8] == b"OpusHead":
                pre_skip = int.from_bytes(page.body[10:12], "little")
            granule = max(granule, page.granule)
    except OggError:
        pass
    return round(max(0, granule - pre_skip) / 48000, 3) if granule > 0 else None
