"""Bad input and failures lose nothing else: garbage RTP, a crashing call, a full disk."""
import os
import random
import struct
import sys
import time

import numpy as np

from media import g711
from support import CellProcess, RtpPeer, sipp


def test_garbage_rtp_does_not_break_the_call(cell, tmp_path):
    peer = RtpPeer(cell.ports["rtp_peer"])
    try:
        proc = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "4000", local_port=cell.ports["sipp"],
                    rtpport=cell.ports["rtp_peer"], background=True)
        peer.wait_remote()
        rnd = random.Random(3)
        junk = [bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 1400))) for _ in range(300)]
        junk += [b"\x80", b"\x80\x00", struct.pack("!BBHII", 0x8F, 0, 1, 2, 3),        # 15 CSRCs, no room
                 struct.pack("!BBHII", 0xA0, 0, 1, 2, 3) + b"\xff",                       # padding past end
                 struct.pack("!BBHII", 0x80, 99, 1, 2, 3) + b"x" * 160,                   # unknown PT
                 struct.pack("!BBHII", 0x90, 0, 1, 2, 3) + b"\x00\x01\xff\xff"]           # bad extension
        for j in junk:
            peer.send(b"", raw=j)
        t = np.arange(160 * 100) / 8000
        tone = (8000 * np.sin(2 * np.pi * 600 * t)).astype("<i2")
        peer.stream([g711.ulaw_encode(tone[i:i + 160].tobytes()) for i in range(0, tone.size, 160)])
        peer.collect(0.3)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()[-2000:]
    finally:
        peer.close()
    assert cell.alive()
    pcm = np.frombuffer(b"".join(g711.ulaw_decode(p) for _, pt, _, p in peer.received if pt == 0), "<i2")
    spectrum = np.abs(np.fft.rfft(pcm.astype(float)))
    assert abs(np.argmax(spectrum) * 8000 / pcm.size - 600) < 10, "the echo survived the junk"
    assert cell.wait_event("call_ended")[0]["reason"] == "remote bye"


def test_one_failing_call_leaves_the_others_alone(tmp_path):
    cell = CellProcess(tmp_path, "")
    cell.cmd = [sys.executable, "tests/faulty_cell.py", *cell.cmd[3:]]
    cell.start()
    try:
        res = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "4000", "-l", "3", "-r", "10",
                   local_port=cell.ports["sipp"], calls=3)
        out = res.stdout.decode()
        # SIPp's own view: two calls ran to their BYE; one was hung up by the cell (unexpected BYE).
        assert "Successful call        |        0                  |        2" in out, out[-2000:]
        ended = {e["reason"]: e for e in cell.wait_event("call_ended", 3)}
        assert set(ended) == {"app error", "remote bye"}
        others = [e for e in cell.events("call_ended") if e["reason"] == "remote bye"]
        assert len(others) == 2
        for e in others:
            assert 49 <= e["frame_rate"] <= 51 and e["frame_gaps"] == 0
        assert cell.metrics()["trunkline_app_errors_total"] == 1
        assert cell.alive() and cell.http_get("/healthz")[0] == 200
    finally:
        assert cell.stop() == 0


def test_full_disk_keeps_calls_going_and_records_in_memory(cell_factory, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink("/dev/full", data / "calls.jsonl")           # every write fails with ENOSPC
    cell = cell_factory()
    for i in range(2):
        res = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "200", local_port=cell.ports["sipp"] + i)
        assert res.returncode == 0
    cell.wait_event("call_ended", 2)
    time.sleep(0.2)
    assert cell.metrics()["trunkline_record_write_errors_total"] == 2
    log = cell.log_path.read_text()
    assert "No space left on device" in log and "(2 kept in memory)" in log
    # Space comes back: the next record write flushes the kept ones too.
    os.unlink(data / "calls.jsonl")
    res = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "200", local_port=cell.ports["sipp"] + 2)
    assert res.returncode == 0
    cell.wait_event("call_ended", 3)
    time.sleep(0.2)
    assert len((data / "calls.jsonl").read_text().splitlines()) == 3
