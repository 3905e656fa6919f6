"""Recordings on a real call over loopback: the caller (our RTP peer) sends a 440 Hz tone, the
playback app plays a 1000 Hz prompt, so the caller's leg (left) and the agent's (right) can be
told apart in the decrypted file."""
import io
import math
import os
import threading
import time
import urllib.request
import wave

import numpy as np
import pytest

from bridge.core.keys import KeyRing, new_key_line
from bridge.records.sealed import SealedError, SealedReader
from media import g711
from media.ogg import decode_ogg_opus
from media.stereo import split_stereo
from media.wav import write_wav
from support import Api, RtpPeer, create_key, sipp

RATE = 16000


def _peak_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(float)))
    return float(np.argmax(spectrum) * RATE / x.size)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(float) ** 2))) if x.size else 0.0


def _setup(tmp_path, cell_factory, extra: str = ""):
    prompt = tmp_path / "agent.wav"
    t = np.arange(RATE) / RATE
    write_wav(str(prompt), (6000 * np.sin(2 * math.pi * 1000 * t)).astype("<i2").tobytes(), RATE)
    keys = tmp_path / "recording.keys"
    keys.write_text(new_key_line("old") + "\n" + new_key_line("k2026") + "\n")
    keys.chmod(0o600)
    config = (f'[models]\nload = "never"\n[media]\nclock_rate = 16000\n[app]\nloop = true\n'
              f'[recordings]\nkey_file = "{keys}"\ncurrent_key = "k2026"\nnumbers = {{"service" = true}}\n'
              f'flush_interval = 0.5\n{extra}')
    cell = cell_factory(config, args=("--app", "playback", "--prompt", str(prompt)))
    return cell, keys


def _caller_tone(seconds: float) -> list[bytes]:
    t = np.arange(int(8000 * seconds)) / 8000
    tone = (7000 * np.sin(2 * math.pi * 440 * t)).astype("<i2")
    return [g711.ulaw_encode(tone[i:i + 160].tobytes()) for i in range(0, tone.size - 159, 160)]


def _download(cell, rec_id: str, key: str):
    req = urllib.request.Request(f"http://127.0.0.1:{cell.ports['http']}/v1/recordings/{rec_id}/audio",
                                 headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=15) as r:
        return r.status, r.headers, r.read()


def _wait(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"waited {timeout}s for {what}")


@pytest.mark.slow
@pytest.mark.sample
def test_recorded_call_is_encrypted_stereo_with_a_silent_pause(cell_factory, tmp_path):
    cell, keyfile = _setup(tmp_path, cell_factory)
    control, read = create_key(cell.data, "control"), create_key(cell.data, "read")
    rec_key = create_key(cell.data, "recordings")
    api = Api(cell, control)
    peer = RtpPeer(cell.ports["rtp_peer"])
    try:
        proc = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "6000", local_port=cell.ports["sipp"],
                    rtpport=cell.ports["rtp_peer"], background=True)
        peer.wait_remote()
        sender = threading.Thread(target=peer.stream, args=(_caller_tone(6.4),), daemon=True)
        sender.start()
        # recorded from the answer by the per-number rule ("service" is the number SIPp dials)
        calls = _wait(lambda: api.get("/v1/calls?state=active")[1]["calls"], 10, "the call")
        call_id = calls[0]["id"]
        recs = _wait(lambda: api.get(f"/v1/recordings?call_id={call_id}")[1]["recordings"], 5, "a recording")
        first = recs[0]
        assert first["status"] == "recording" and first["started_by"] == "number" and first["key_id"] == "k2026"
        time.sleep(1.5)
        status, body, _ = api.post(f"/v1/calls/{call_id}/recording", {"action": "pause"})
        assert status == 200 and body["status"] == "paused", body
        assert api.post(f"/v1/calls/{call_id}/recording", {"action": "pause"})[0] == 409
        assert api.post(f"/v1/calls/{call_id}/recording", {"action": "pause"}, key=read)[0] == 403
        assert api.post(f"/v1/calls/{call_id}/recording", {"action": "pause"}, key=rec_key)[0] == 403
        time.sleep(1.0)
        status, body, _ = api.post(f"/v1/calls/{call_id}/recording", {"action": "resume"})
        assert status == 200 and body["status"] == "recording"
        time.sleep(1.0)
        # stop it, and start a second one through the API, as WAV
        status, body, _ = api.post(f"/v1/calls/{call_id}/recording", {"action": "stop"})
        assert status == 200 and body["status"] == "stopped" and body["complete"] is True
        status, second, _ = api.post(f"/v1/calls/{call_id}/recording", {"action": "start", "format": "wav"})
        assert status == 201 and second["format"] == "wav" and second["started_by"] == "api"
        assert api.post(f"/v1/calls/{call_id}/recording", {"action": "start"})[0] == 409
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()[-2000:]
        sender.join(10)
    finally:
        peer.close()
    stopped = cell.wait_event("recording_stopped", 2)
    assert {e["recording_id"] for e in stopped} == {first["id"], second["id"]}
    assert [e["reason"] for e in stopped] == ["api", "call ended"]

    meta = api.get(f"/v1/recordings/{first['id']}")[1]
    assert meta["status"] == "stopped" and meta["complete"] is True and meta["format"] == "opus"
    assert meta["channels"] == {"left": "caller", "right": "agent"}
    assert 3.2 < meta["duration"] < 4.5 and len(meta["paused"]) == 1
    pause = meta["paused"][0]
    assert pause["reasons"] == ["api"] and 0.7 < pause["end"] - pause["start"] < 1.3

    # at rest: nothing in clear, and a ring with the right ids but other keys cannot open it
    row_path = next(p for p in (cell.data / "recordings").rglob(f"{first['id']}.ogg.sealed"))
    raw = row_path.read_bytes()
    assert len(raw) == meta["bytes"] and b"OggS" not in raw and b"OpusHead" not in raw
    impostor = KeyRing({"k2026": os.urandom(32), "old": os.urandom(32)}, "k2026")
    with pytest.raises(SealedError):
        list(SealedReader(io.BytesIO(raw), impostor))

    # only a recordings key downloads it
    for k in (read, control):
        status, body, _ = api.get(f"/v1/recordings/{first['id']}/audio", key=k)
        assert status == 403 and body["error"]["code"] == "forbidden"
    status, headers, data = _download(cell, first["id"], rec_key)
    assert status == 200 and headers["Content-Type"] == "audio/ogg" and headers["X-Recording-Complete"] == "true"
    st = decode_ogg_opus(data, RATE)
    assert st.ended and st.channels == 2
    left, right = split_stereo(st.pcm)
    assert abs(left.size / RATE - meta["duration"]) < 0.03
    a, b = int((pause["start"] + 0.06) * RATE), int((pause["end"] - 0.06) * RATE)
    assert _rms(left[a:b]) < 30 and _rms(right[a:b]) < 30, "the paused interval is silent in both channels"
    before = slice(int(0.3 * RATE), int((pause["start"] - 0.1) * RATE))
    after = slice(int((pause["end"] + 0.1) * RATE), left.size - int(0.2 * RATE))
    for part in (before, after):
        assert _rms(left[part]) > 1500 and _rms(right[part]) > 1500
        assert abs(_peak_hz(left[part]) - 440) < 8, "the caller is on the left"
        assert abs(_peak_hz(right[part]) - 1000) < 8, "the agent is on the right"

    # the second recording, WAV
    meta2 = api.get(f"/v1/recordings/{second['id']}")[1]
    assert meta2["complete"] is True and meta2["paused"] == [] and meta2["key_id"] == "k2026"
    status, headers, data = _download(cell, second["id"], rec_key)
    assert headers["Content-Type"] == "audio/wav"
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, RATE)
        assert abs(w.getnframes() / RATE - meta2["duration"]) < 0.03      # sizes filled in on download
        left, right = split_stereo(w.readframes(w.getnframes()))
    mid = slice(int(0.3 * RATE), left.size - int(0.5 * RATE))
    assert abs(_peak_hz(left[mid]) - 440) < 8 and abs(_peak_hz(right[mid]) - 1000) < 8

    events = [e["type"] for e in api.get("/v1/events")[1]["events"] if e["type"].startswith("recording_")]
    assert events == ["recording_started", "recording_paused", "recording_resumed", "recording_stopped",
                      "recording_started", "recording_stopped"]
    m = cell.metrics()
    assert m["trunkline_recordings_active"] == 0 and m["trunkline_recording_write_errors_total"] == 0
    assert m["trunkline_recording_bytes_total"] == meta["bytes"] + meta2["bytes"]

    # one flipped byte in the middle: authentication fails, no audio is served
    tampered = bytearray(raw)
    tampered[len(raw) // 2] ^= 0x01
    row_path.write_bytes(bytes(tampered))
    status, body, _ = api.get(f"/v1/recordings/{first['id']}/audio", key=rec_key)
    assert status == 422 and body["error"]["code"] == "recording_corrupt"
    assert cell.metrics()["trunkline_recording_encryption_failures_total"] == 1
    # cut short (as by a crash): served up to the last whole chunk, marked incomplete
    row_path.write_bytes(raw[:len(raw) * 2 // 3])
    status, headers, data = _download(cell, first["id"], rec_key)
    assert status == 200 and headers["X-Recording-Complete"] == "false"
    partial = decode_ogg_opus(data, RATE)
    assert not partial.ended and 0.3 * meta["duration"] < len(partial.pcm) / 4 / RATE < meta["duration"]

    # delete: a recordings key only; the file goes with the row
    wav_path = next((cell.data / "recordings").rglob(f"{second['id']}.wav.sealed"))
    assert api.call("DELETE", f"/v1/recordings/{second['id']}")[0] == 403
    assert api.call("DELETE", f"/v1/recordings/{second['id']}", key=rec_key)[0] == 200
    assert not wav_path.exists() and api.get(f"/v1/recordings/{second['id']}")[0] == 404
    # no key material in the logs
    log = cell.log_path.read_text()
    for line in keyfile.read_text().splitlines():
        assert line.split(":", 1)[1] not in log
    assert cell.stop() == 0


@pytest.mark.slow
@pytest.mark.sample
def test_retention_deletes_the_file_and_the_row(cell_factory, tmp_path):
    # 0.00003 days = 2.6 s; the cell checks every second at that retention
    cell, _ = _setup(tmp_path, cell_factory, "retention_days = 0.00003\n")
    key = create_key(cell.data, "recordings")
    api = Api(cell, key)
    peer = RtpPeer(cell.ports["rtp_peer"])
    try:
        proc = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "1500", local_port=cell.ports["sipp"],
                    rtpport=cell.ports["rtp_peer"], background=True)
        peer.wait_remote()
        peer.stream(_caller_tone(1.4))
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()[-2000:]
    finally:
        peer.close()
    rec_id = cell.wait_event("recording_stopped")[0]["recording_id"]
    path = next((cell.data / "recordings").rglob(f"{rec_id}.ogg.sealed"))
    assert api.get(f"/v1/recordings/{rec_id}")[1]["complete"] is True
    t0 = time.monotonic()
    _wait(lambda: not path.exists() and api.get(f"/v1/recordings/{rec_id}")[0] == 404, 15, "the purge")
    assert time.monotonic() - t0 < 6
    assert cell.wait_event("recordings_purged")[0]["count"] == 1
    assert cell.stop() == 0


@pytest.mark.slow
@pytest.mark.sample
def test_a_keypad_digit_pauses_the_recording_and_is_masked(cell_factory, tmp_path):
    """SIPp's built-in A-law call sends RFC 4733 digit 1; recordings on by default, key from the environment."""
    key_line = new_key_line("env1")
    cell = cell_factory('[models]\nload = "never"\n[media]\nclock_rate = 16000\n'
                        '[recordings]\nenabled = true\nformat = "wav"\n'
                        'dtmf_resume_after = 1.0\n', env={"TRUNKLINE_RECORDING_KEYS": key_line})
    rec_key = create_key(cell.data, "recordings")
    (tmp_path / "pcap").symlink_to("/usr/share/sip-tester")
    res = sipp("builtin:uac_pcap", cell.sip, tmp_path, "-mp", str(cell.ports["rtp_peer"]),
               local_port=cell.ports["sipp"], timeout=40)
    assert res.returncode == 0, res.stdout.decode()[-2000:]
    ended = cell.wait_event("call_ended")[0]
    assert ended["dtmf"] == "X" and cell.wait_event("dtmf")[0]["digit"] == "X"
    api = Api(cell, rec_key)
    dtmf_events = [e for e in api.get("/v1/events")[1]["events"] if e["type"] == "dtmf_received"]
    assert [e["data"]["digit"] for e in dtmf_events] == ["X"] and dtmf_events[0]["data"]["masked"] is True
    rec_id = cell.wait_event("recording_stopped")[0]["recording_id"]
    meta = api.get(f"/v1/recordings/{rec_id}")[1]
    assert meta["key_id"] == "env1" and meta["started_by"] == "config" and len(meta["paused"]) == 1
    pause = meta["paused"][0]
    assert pause["reasons"] == ["dtmf"] and 1.2 < pause["end"] - pause["start"] < 2.5
    status, headers, data = _download(cell, rec_id, rec_key)
    with wave.open(io.BytesIO(data)) as w:
        left, right = split_stereo(w.readframes(w.getnframes()))
    a, b = int((pause["start"] + 0.03) * RATE), int((pause["end"] - 0.03) * RATE)
    assert np.abs(left[a:b]).max() == 0 and np.abs(right[a:b]).max() == 0
    assert _rms(left[:int(pause["start"] * RATE)]) > 100         # the pcap's speech is there before it
    assert key_line.split(":", 1)[1] not in cell.log_path.read_text()
    assert cell.stop() == 0


@pytest.mark.slow
@pytest.mark.sample
def test_box_controls_and_serves_recordings_through_the_cells(tmp_path):
    """With several cells behind one API, recording control goes to the call's cell and the
    decrypted download is streamed through from the cell that wrote the file."""
    from support import BoxProcess
    keys = tmp_path / "recording.keys"
    keys.write_text(new_key_line("k1") + "\n")
    keys.chmod(0o600)
    b = BoxProcess(tmp_path, 2, f'[models]\nload = "never"\n[recordings]\nenabled = true\nkey_file = "{keys}"\n'
                   f'current_key = "k1"\nflush_interval = 0.5\n').start()
    peer = RtpPeer(b.ports["rtp_peer"])
    try:
        api = Api(b, create_key(b.data, "control"))
        rec_key = create_key(b.data, "recordings")
        proc = sipp("call_pcmu.xml", b.sip, tmp_path, "-d", "4000", local_port=b.ports["sipp"],
                    rtpport=b.ports["rtp_peer"], background=True)
        peer.wait_remote()
        sender = threading.Thread(target=peer.stream, args=(_caller_tone(4.4),), daemon=True)
        sender.start()
        call_id = _wait(lambda: api.get("/v1/calls?state=active")[1]["calls"], 10, "the call")[0]["id"]
        _wait(lambda: api.get(f"/v1/recordings?call_id={call_id}")[1]["recordings"], 5, "a recording")
        time.sleep(1.0)
        status, body, _ = api.post(f"/v1/calls/{call_id}/recording", {"action": "pause"})
        assert status == 200 and body["status"] == "paused", body
        time.sleep(0.5)
        assert api.post(f"/v1/calls/{call_id}/recording", {"action": "resume"})[0] == 200
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()[-2000:]
        sender.join(10)
        rec = _wait(lambda: [r for r in api.get(f"/v1/recordings?call_id={call_id}")[1]["recordings"]
                             if r["status"] == "stopped"], 10, "the recording to stop")[0]
        assert api.get(f"/v1/recordings/{rec['id']}")[1]["paused"][0]["reasons"] == ["api"]
        assert api.get(f"/v1/recordings/{rec['id']}/audio")[0] == 403          # a control key: no audio
        status, headers, data = _download(b, rec["id"], rec_key)
        assert status == 200 and headers["X-Recording-Complete"] == "true"
        assert int(headers["Content-Length"]) == len(data)
        left, _ = split_stereo(decode_ogg_opus(data, RATE).pcm)
        assert abs(_peak_hz(left[RATE // 2:RATE * 3 // 2]) - 440) < 10           # the caller's tone, left
        assert api.call("DELETE", f"/v1/recordings/{rec['id']}", key=rec_key)[0] == 200
        assert api.get(f"/v1/recordings/{rec['id']}")[0] == 404
    finally:
        peer.close()
        b.stop()
