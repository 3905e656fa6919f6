"""Pure parts of recordings: Ogg Opus writer/reader, the sealed (AES-256-GCM) file format,
the key ring, pairing the two legs, and the recorder itself against a fake call."""
import base64
import io
import math
import os
import shutil
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest

from bridge.core.keys import KeyRing, KeyRingError, load_keyring, new_key_line, parse_keys
from bridge.records.sealed import (FINAL, SealedError, SealedKeyError, SealedReader, SealedWriter, decrypt_file, scan)
from media.ogg import OggError, OggOpusEncoder, OggWriter, decode_ogg_opus, ogg_crc, read_packets, read_pages
from media.stereo import StereoPairer, interleave, split_stereo, wav_header

RATE = 16000
FRAME = RATE // 50


def tone(freq: float, seconds: float, rate: int = RATE, amp: float = 8000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * math.pi * freq * t)).astype("<i2")


def peak_hz(x: np.ndarray, rate: int = RATE) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(float)))
    return float(np.argmax(spectrum) * rate / x.size)


def encode_stereo(left: np.ndarray, right: np.ndarray, flush_every: int = 50, rate: int = RATE) -> bytes:
    enc = OggOpusEncoder(rate, 2, serial=1234, bitrate=32000)
    out = enc.header()
    st = np.empty(left.size * 2, "<i2")
    st[0::2], st[1::2] = left, right
    pcm = st.tobytes()
    for n, i in enumerate(range(0, len(pcm), enc.frame_bytes)):
        out += enc.encode(pcm[i:i + enc.frame_bytes])
        if n % flush_every == flush_every - 1:
            out += enc.flush()
    return out + enc.close()


# -- Ogg ------------------------------------------------------------------------------------------

def test_ogg_crc_check_value():
    # Ogg's CRC is CRC-32/POSIX (poly 04C11DB7, init 0, not reflected) without its final xor:
    # the catalogue's check value for "123456789" is 0x765E7680, so ours is its complement.
    assert ogg_crc(b"123456789") == 0x765E7680 ^ 0xFFFFFFFF


def test_ogg_opus_round_trip_keeps_both_channels_and_exact_length():
    left, right = tone(440, 3.0), tone(1000, 3.0)
    data = encode_stereo(left, right)
    st = decode_ogg_opus(data, RATE)
    assert st.channels == 2 and st.ended and st.input_rate == RATE and st.pre_skip == 312
    assert st.vendor == "trunkline" and st.comments == []
    lch, rch = split_stereo(st.pcm)
    assert lch.size == left.size                         # pre-skip and end trimming exact
    assert abs(peak_hz(lch) - 440) < 5 and abs(peak_hz(rch) - 1000) < 5
    assert np.corrcoef(lch.astype(float), left.astype(float))[0, 1] > 0.95   # sample-aligned
    # one page per second of audio, granules in 48 kHz units, the last one trims the padding
    assert st.granules == [48000, 96000, 144000, 144000 + 312]
    pages = list(read_pages(data))
    assert pages[0].flags & 0x02 and pages[-1].flags & 0x04 and all(p.serial == 1234 for p in pages)
    assert [p.granule for p in pages[:2]] == [0, 0]        # OpusHead and OpusTags on pages of their own


def test_ogg_opus_is_readable_by_ffmpeg(tmp_path):
    av = pytest.importorskip("av")        # PyAV: FFmpeg's own Ogg demuxer and Opus decoder
    data = encode_stereo(tone(440, 2.0), tone(1000, 2.0))
    path = tmp_path / "x.opus"
    path.write_bytes(data)
    with av.open(str(path)) as c:
        s = c.streams.audio[0]
        assert c.format.name == "ogg" and s.codec_context.name == "opus" and s.codec_context.channels == 2
        frames = [f.to_ndarray() for f in c.decode(s)]
    pcm = np.concatenate(frames, axis=1)                 # planar float, 48 kHz
    assert pcm.shape[1] == 2 * 48000                       # FFmpeg applies pre-skip and end trim the same way
    assert abs(peak_hz(pcm[0], 48000) - 440) < 5 and abs(peak_hz(pcm[1], 48000) - 1000) < 5
    if shutil.which("file"):
        assert "Opus audio" in subprocess.run(["file", str(path)], capture_output=True, text=True).stdout


def test_ogg_large_packets_span_pages_and_crc_damage_is_caught():
    w = OggWriter(7)
    packets = [bytes([i]) * n for i, n in enumerate((10, 255, 300, 70000, 5))]
    data = b"".join(w.add(p, g) for g, p in enumerate(packets, 1)) + w.flush() + w.close()
    got = [p for p, _ in read_packets(data)]
    assert got == packets
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x01
    with pytest.raises(OggError):
        list(read_packets(bytes(bad)))
    with pytest.raises(OggError):
        list(read_pages(data[:-3]))


def test_truncated_ogg_decodes_to_its_last_whole_page():
    data = encode_stereo(tone(440, 3.0), tone(1000, 3.0))
    pages = list(read_pages(data))
    sizes = [27 + len(p.segments) + len(p.body) for p in pages]
    cut = data[:sum(sizes[:4])]                        # head, tags, 2 s of audio
    st = decode_ogg_opus(cut, RATE)
    assert not st.ended and 1.9 < len(st.pcm) / 4 / RATE < 2.01


# -- sealed files ------------------------------------------------------------------------------------

def ring(*ids: str, current: str | None = None) -> KeyRing:
    keys = {i: os.urandom(32) for i in ids}
    return KeyRing(keys, current or ids[-1])


def seal(keys: KeyRing, pieces: list[bytes], close: bool = True) -> bytes:
    buf = io.BytesIO()
    w = SealedWriter(buf, keys.current, keys.key(keys.current))
    for p in pieces:
        w.write(p)
        w.flush()
    if close:
        w.close(fsync=False)
    return buf.getvalue()


def test_sealed_round_trip_and_nothing_in_clear(tmp_path):
    keys = ring("k1")
    secret = b"OggS" + b"RIFF" + tone(440, 0.5).tobytes()
    blob = seal(keys, [secret[i:i + 4000] for i in range(0, len(secret), 4000)])
    assert b"OggS" not in blob and b"RIFF" not in blob and secret[100:132] not in blob
    assert blob.startswith(b"TLSEAL\r\n") and b"k1" in blob[:20]
    r = SealedReader(io.BytesIO(blob), keys)
    assert b"".join(r) == secret and r.complete
    sc = scan(io.BytesIO(blob))
    assert sc.complete and sc.plain_bytes == len(secret) and sc.key_id == "k1" and sc.trailing == 0
    path = tmp_path / "f.sealed"
    path.write_bytes(blob)
    assert decrypt_file(str(path), keys) == (secret, True)


def test_every_flipped_byte_fails_authentication():
    keys = ring("k1")
    plain = b"a" * 100 + b"b" * 100
    blob = seal(keys, [plain[:100], plain[100:]])
    failed = cut = 0
    for pos in range(len(blob)):
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        try:
            r = SealedReader(io.BytesIO(bytes(bad)), keys)
            out = b"".join(r)
        except SealedError:
            failed += 1
            continue
        # Only a length field grown past the end of the file gets here: it reads as cut short,
        # gives back the verified chunks before it, and is never called complete.
        assert not r.complete and plain.startswith(out), pos
        cut += 1
    assert failed + cut == len(blob) and cut <= 3 * 4


def _chunks(blob: bytes, header_len: int) -> list[bytes]:
    out, pos = [], header_len
    while pos < len(blob):
        n = int.from_bytes(blob[pos + 1:pos + 5], "big")
        out.append(blob[pos:pos + 5 + n])
        pos += 5 + n
    return out


def test_reordered_dropped_or_spliced_chunks_are_detected():
    keys = ring("k1")
    blob = seal(keys, [b"one" * 50, b"two" * 50, b"three" * 50])
    hlen = 8 + 2 + 2 + 16
    head, chunks = blob[:hlen], _chunks(blob, hlen)
    assert len(chunks) == 4 and chunks[-1][0] == FINAL
    swapped = head + chunks[1] + chunks[0] + b"".join(chunks[2:])
    with pytest.raises(SealedError):
        list(SealedReader(io.BytesIO(swapped), keys))
    dropped = head + chunks[0] + b"".join(chunks[2:])
    with pytest.raises(SealedError):
        list(SealedReader(io.BytesIO(dropped), keys))
    other = seal(keys, [b"one" * 50, b"EVIL" * 30])             # same key, another file
    spliced = head + chunks[0] + _chunks(other, hlen)[1] + b"".join(chunks[2:])
    with pytest.raises(SealedError):
        list(SealedReader(io.BytesIO(spliced), keys))
    unflagged = bytearray(blob)                                  # claim a middle chunk is the final one
    unflagged[hlen] |= FINAL
    with pytest.raises(SealedError):
        list(SealedReader(io.BytesIO(bytes(unflagged)), keys))
    with pytest.raises(SealedError):                             # junk after the final chunk
        list(SealedReader(io.BytesIO(blob + b"\0" * 30), keys))


def test_truncation_is_reported_never_complete():
    keys = ring("k1")
    pieces = [bytes([65 + i]) * 1000 for i in range(5)]
    blob = seal(keys, pieces)
    hlen = 28
    chunks = _chunks(blob, hlen)
    for cut in (len(blob) - 1, len(blob) - len(chunks[-1]), len(blob) - len(chunks[-1]) - 7, hlen + 3):
        r = SealedReader(io.BytesIO(blob[:cut]), keys)
        got = b"".join(r)
        assert not r.complete
        whole = [c for c in pieces if c in got]
        assert got == b"".join(whole)                               # a prefix of whole chunks
        assert not scan(io.BytesIO(blob[:cut])).complete
    # a crash: chunks flushed, never closed
    crashed = seal(keys, pieces[:3], close=False)
    r = SealedReader(io.BytesIO(crashed), keys)
    assert b"".join(r) == b"".join(pieces[:3]) and not r.complete


def test_wrong_key_unknown_key_and_rotation():
    old = ring("2026a")
    blob_old = seal(old, [b"old secret" * 10])
    with pytest.raises(SealedError):                         # same id, different material
        list(SealedReader(io.BytesIO(blob_old), ring("2026a")))
    with pytest.raises(SealedKeyError):
        SealedReader(io.BytesIO(blob_old), ring("other"))
    rotated = KeyRing({"2026a": old.key("2026a"), "2026b": os.urandom(32)}, "2026b")
    blob_new = seal(rotated, [b"new secret" * 10])
    assert blob_new[10:15] == b"2026b"
    assert b"".join(SealedReader(io.BytesIO(blob_old), rotated)) == b"old secret" * 10
    assert b"".join(SealedReader(io.BytesIO(blob_new), rotated)) == b"new secret" * 10
    # the header's key id is authenticated: relabelling the file breaks it
    relabelled = blob_new.replace(b"2026b", b"2026a", 1)
    with pytest.raises(SealedError):
        list(SealedReader(io.BytesIO(relabelled), rotated))


def test_not_a_sealed_file():
    with pytest.raises(SealedError):
        SealedReader(io.BytesIO(b"OggS" + bytes(100)), ring("k"))


# -- key ring ---------------------------------------------------------------------------------------

def test_key_file_parsing_and_errors(tmp_path):
    a, b = new_key_line("a"), new_key_line("b.2")
    f = tmp_path / "keys"
    f.write_text(f"# recording keys\n{a}\n\n{b}\n")
    f.chmod(0o600)
    kr = load_keyring(str(f), "", "b.2", {})
    assert kr.ids == ["a", "b.2"] and kr.current == "b.2" and not kr.warnings
    secret_b64 = a.split(":", 1)[1]
    assert secret_b64 not in repr(kr)
    with pytest.raises(KeyRingError, match="current_key"):
        load_keyring(str(f), "", "", {})                      # two keys: which one encrypts?
    with pytest.raises(KeyRingError, match="current_key"):
        load_keyring(str(f), "", "zzz", {})
    env = {"RK": f"{a}, c:{base64.b64encode(os.urandom(32)).decode()}"}
    kr = load_keyring("", "RK", "c", env)
    assert kr.ids == ["a", "c"]
    bad_len = "k:" + base64.b64encode(os.urandom(16)).decode()
    with pytest.raises(KeyRingError) as e:
        parse_keys(bad_len, "key_file")
    assert "16 bytes" in str(e.value) and bad_len.split(":")[1] not in str(e.value)
    with pytest.raises(KeyRingError, match="base64"):
        parse_keys("k:not*base64", "key_file")
    with pytest.raises(KeyRingError, match="KEY_ID:BASE64"):
        parse_keys("just-a-line-without-colon", "key_file")
    with pytest.raises(KeyRingError, match="no recording keys"):
        load_keyring("", "RK", "", {})
    f.chmod(0o644)
    assert load_keyring(str(f), "", "a", {}).warnings


def test_config_refuses_to_start_recording_without_a_usable_key(tmp_path):
    from bridge.core.config import ConfigError, load
    cfg = tmp_path / "t.toml"
    cfg.write_text("[recordings]\nenabled = true\n")
    with pytest.raises(ConfigError, match="recordings: no recording keys"):
        load(str(cfg), environ={})
    cfg.write_text('[recordings]\nnumbers = {"+15551230000" = true}\nkey_file = "/nonexistent/keys"\n')
    with pytest.raises(ConfigError, match="recordings.key_file: cannot read"):
        load(str(cfg), environ={})
    with pytest.raises(ConfigError, match="AES-256"):
        load(None, environ={"TRUNKLINE_RECORDING_KEYS": "k:" + base64.b64encode(b"short").decode()})
    key = new_key_line("k1")
    c = load(None, environ={"TRUNKLINE_RECORDING_KEYS": key, "TRUNKLINE_RECORDINGS_ENABLED": "true"})
    assert c.raw["recordings"]["enabled"] and key.split(":")[1] not in str(c.raw)
    cfg.write_text('[recordings]\nnumbers = {"+1555" = "yes please"}\n')
    with pytest.raises(ConfigError, match="recordings.numbers"):
        load(str(cfg), environ={})
    cfg.write_text('[pii]\npatterns = ["(unclosed"]\n')
    with pytest.raises(ConfigError, match=r"pii.patterns: patterns\[0\]"):
        load(str(cfg), environ={})
    assert load(None, environ={}).raw["recordings"]["enabled"] is False     # nothing configured: fine


# -- the two legs -------------------------------------------------------------------------------------

def test_pairer_keeps_legs_aligned_across_ticks_and_pads_a_dead_leg():
    fb = 2 * FRAME
    a = [bytes([i]) * fb for i in range(10)]
    b = [bytes([100 + i]) * fb for i in range(10)]
    p = StereoPairer(fb, hold=3)
    pairs = p.push([(0, a[0])], [])                 # tx of this clock tick not drained yet
    pairs += p.push([(0, a[1])], [(0, b[0]), (0, b[1])])
    pairs += p.push([(0, a[2])], [(0, None)])       # None: the tick sent silence
    assert pairs == [(a[0], b[0]), (a[1], b[1]), (a[2], bytes(fb))] and p.padded == 0
    out = []
    for i in range(3, 9):                           # the caller's leg stops (held)
        out += p.push([], [(0, b[i])])
    assert len(out) == 6 - 3 and all(left == bytes(fb) for left, _ in out) and p.padded == 3
    assert len(p.drain()) == 3
    assert interleave(b"\x01\x00\x02\x00", b"\x03\x00\x04\x00") == b"\x01\x00\x03\x00\x02\x00\x04\x00"
    h = wav_header(16000, 2, 64000)
    assert h[:4] == b"RIFF" and int.from_bytes(h[40:44], "little") == 64000 and len(h) == 44


# -- the recorder against a fake call -------------------------------------------------------------------

class FakeSession:
    def __init__(self, rate=RATE):
        self.call_id = "call-1"
        self.to_uri = "sip:+15551230000@127.0.0.1"
        self.state = "progressing"
        self.media = SimpleNamespace(rate=rate, frame_bytes=rate // 50 * 2)
        self.taps = []
        self.events = []

    def add_tap(self, t):
        self.taps.append(t)

    def remove_tap(self, t):
        if t in self.taps:
            self.taps.remove(t)

    def emit(self, etype, data):
        self.events.append((etype, data))


def make_registry(tmp_path, cell_id="0", **rec_cfg):
    from bridge.core.config import DEFAULTS
    from bridge.core.metrics import Metrics
    from bridge.records.recording import Recordings
    from bridge.records.store import Store
    cfg = {**DEFAULTS["recordings"], **rec_cfg}
    keyfile = tmp_path / "keys"
    if not keyfile.exists():
        keyfile.write_text(new_key_line("k1") + "\n")
        keyfile.chmod(0o600)
    cfg.setdefault("key_file", str(keyfile))
    cfg["key_file"] = cfg["key_file"] or str(keyfile)
    cell = SimpleNamespace(cfg=SimpleNamespace(raw={"recordings": cfg}, data_dir=str(tmp_path / "data")),
                           store=Store(str(tmp_path / "data")), metrics=Metrics(), cell_id=cell_id)
    return Recordings(cell)


def feed(rec, seconds, left_hz=440, right_hz=1000, t0=0.0, rate=RATE):
    left, right = tone(left_hz, seconds, rate), tone(right_hz, seconds, rate, 6000)
    n = rate // 50
    for i in range(left.size // n):
        rec.on_audio([(t0, left[i * n:(i + 1) * n].tobytes())], [(t0, right[i * n:(i + 1) * n].tobytes())],
                     t0 + i * 0.02)


def decrypt_rec(reg, rec_id):
    row = reg.row(rec_id)
    data, complete = decrypt_file(row["path"], reg.keys)
    return row, data, complete


@pytest.mark.parametrize("fmt", ["opus", "wav"])
def test_recorder_writes_both_legs_pauses_as_silence_and_closes(tmp_path, fmt):
    reg = make_registry(tmp_path)
    s = FakeSession()
    rec = reg.start(s, fmt)
    assert s.taps == [rec] and reg.metrics.recordings_active._value.get() == 1
    feed(rec, 2.0)
    assert rec.pause("api")
    feed(rec, 1.0, t0=2.0)
    assert rec.resume()
    feed(rec, 1.0, t0=3.0)
    rec.call_ended()
    assert s.taps == [] and rec.state == "stopped" and reg.metrics.recordings_active._value.get() == 0
    row, data, complete = decrypt_rec(reg, rec.id)
    assert complete and row["status"] == "stopped" and row["complete"] == 1 and row["duration"] == 4.0
    assert row["bytes"] == os.path.getsize(row["path"]) == reg.metrics.recording_bytes._value.get()
    if fmt == "opus":
        pcm = decode_ogg_opus(data, RATE).pcm
    else:
        assert data[:4] == b"RIFF" and data[40:44] == b"\xff\xff\xff\xff"      # sizes filled in on download
        pcm = data[44:]
    left, right = split_stereo(pcm)
    assert left.size == 4 * RATE
    sec = [slice(int(a * RATE), int(b * RATE)) for a, b in ((0.1, 1.9), (2.05, 2.95), (3.1, 3.9))]
    for sl, live in zip(sec, (True, False, True)):
        lr = np.sqrt(np.mean(left[sl].astype(float) ** 2))
        rr = np.sqrt(np.mean(right[sl].astype(float) ** 2))
        if live:
            assert lr > 3000 and rr > 2000 and abs(peak_hz(left[sl]) - 440) < 10 and abs(peak_hz(right[sl]) - 1000) < 10
        else:
            assert lr < 50 and rr < 50, (lr, rr)
    paused = reg.view(reg.row(rec.id))["paused"]
    assert paused == [{"start": 2.0, "end": 3.0, "reasons": ["api"]}]
    types = [e for e, _ in s.events]
    assert types == ["recording_started", "recording_paused", "recording_resumed", "recording_stopped"]


def test_dtmf_pause_reaches_back_and_resumes_after_quiet(tmp_path, monkeypatch):
    reg = make_registry(tmp_path, dtmf_resume_after=1.0)
    s = FakeSession()
    rec = reg.start(s, "wav")
    feed(rec, 1.0)                                         # 0..1 s; the last 0.5 s not yet encoded
    clock = [100.0]
    monkeypatch.setattr("bridge.records.recording.time.monotonic", lambda: clock[0])
    assert reg.on_dtmf(s, "4", 100) is True                # masked: the recording is paused
    assert rec.state == "paused"
    start = rec.intervals[0]["start"] * 0.02
    assert start == pytest.approx(1.0 - 0.4, abs=0.021)    # 0.3 s lookback + the digit's 0.1 s
    feed(rec, 0.5, t0=100.0)
    clock[0] = 100.5
    assert reg.on_dtmf(s, "1", 80) is True                 # more digits keep it paused
    feed(rec, 0.98, t0=100.5)                              # < 1 s since the last digit: still paused
    assert rec.state == "paused"
    feed(rec, 0.5, t0=101.5)                               # quiet for 1 s: resumed by the tick
    assert rec.state == "recording"
    rec.stop("test")
    iv = reg.view(reg.row(rec.id))["paused"]
    assert len(iv) == 1 and iv[0]["reasons"] == ["dtmf"] and iv[0]["end"] == pytest.approx(2.5, abs=0.03)
    _, data, _ = decrypt_rec(reg, rec.id)
    left, right = split_stereo(data[44:])
    quiet = slice(int(0.62 * RATE), int(2.48 * RATE))
    assert np.abs(left[quiet]).max() == 0 and np.abs(right[quiet]).max() == 0
    assert np.abs(left[int(0.1 * RATE):int(0.55 * RATE)]).max() > 5000


def test_full_disk_stops_the_recording_not_the_call(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    reg = make_registry(tmp_path)
    s = FakeSession()
    rec = reg.start(s, "wav")
    rec.file.close()
    rec.file = open("/dev/full", "wb", buffering=0)        # every write now fails with ENOSPC
    rec.writer.f = rec.file
    feed(rec, 2.0)                                         # raises nothing: the tap handles it
    assert rec.state == "failed" and s.taps == [] and "no space left" in rec.error
    assert reg.metrics.recording_write_errors._value.get() == 1
    etype, data = s.events[-1]
    assert etype == "recording_stopped" and data["reason"] == "write_error" and data["status"] == "failed"
    row = reg.row(rec.id)
    assert row["status"] == "failed" and row["complete"] == 0
    rec.on_audio([(0, bytes(640))], [(0, None)], 5.0)      # later ticks are ignored
    # the registry lets a new recording start on the same call
    assert reg.start(s, "opus").id != rec.id


def test_unwritable_directory_refuses_the_start_cleanly(tmp_path):
    from bridge.records.recording import RecordingError
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the directory should be")
    reg = make_registry(tmp_path, dir=str(blocker))
    s = FakeSession()
    with pytest.raises(RecordingError) as e:
        reg.start(s)
    assert e.value.code == "recording_failed" and s.taps == []
    assert reg.metrics.recording_write_errors._value.get() == 1


def test_restart_marks_a_crashed_recording_interrupted_and_keeps_its_audio(tmp_path):
    reg = make_registry(tmp_path)
    s = FakeSession()
    rec = reg.start(s, "opus")
    feed(rec, 3.0)                        # ~2.5 s encoded (0.5 s held back), 2 chunks flushed
    rec.file.close()                      # the process "dies" here: no final chunk
    reg2 = make_registry(tmp_path)
    row = reg2.row(rec.id)
    assert row["status"] == "interrupted" and row["complete"] == 0 and row["reason"] == "bridge restarted"
    assert row["duration"] == pytest.approx(2.0, abs=0.05)
    data, complete = decrypt_file(row["path"], reg2.keys)
    assert not complete
    st = decode_ogg_opus(data, RATE)
    assert not st.ended and abs(peak_hz(split_stereo(st.pcm)[0]) - 440) < 10


def test_retention_purges_files_and_rows(tmp_path):
    reg = make_registry(tmp_path, retention_days=1.0)
    s = FakeSession()
    rec = reg.start(s, "wav")
    feed(rec, 0.5)
    live = make_registry(tmp_path, "1", retention_days=1.0)    # another cell: live rows are never purged
    assert live.purge(time.time() + 3 * 86400) == 0 and os.path.exists(rec.path)
    rec.stop("done")
    assert reg.purge(time.time() + 0.5 * 86400) == 0
    assert reg.purge(time.time() + 2 * 86400) == 1
    assert not os.path.exists(rec.path) and reg.row(rec.id) is None
