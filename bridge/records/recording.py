"""Call recordings of a cell: when to record, the live recorders (``bridge/records/recorder.py``),
their rows in the store, retention, and reading a file back decrypted for the API.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import AsyncIterator

from bridge.core.keys import KeyRing, KeyRingError, configured_keyring
from bridge.core.logs import event
from bridge.core.states import CallState, RecordingState
from bridge.records.recorder import ACTIVE, Recorder
from bridge.records.sealed import SealError, SealedError, SealedKeyError, SealedReader, scan
from bridge.records.store import new_id
from media.ogg import OggError, read_pages
from media.stereo import WAV_HEADER_BYTES, wav_header
from sip.uri import user_part

log = logging.getLogger("trunkline.recording")

FORMATS = {"opus": ("audio/ogg", "ogg"), "wav": ("audio/wav", "wav")}


class RecordingError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


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
        num = user_part(s.to_uri)
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
        if s.state != CallState.PROGRESSING:
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
                 rec.error, 1 if rec.state == RecordingState.STOPPED else 0 if rec.state == RecordingState.FAILED else None, rec.id))
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
        return rec.state == RecordingState.PAUSED

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
            from bridge.records.lifecycle import purged_counter
            counter = purged_counter(self.metrics)
            if counter is not None:
                counter.labels("recordings").inc(len(rows))
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
