"""A real cell answering real SIPp calls on 127.0.0.1."""
import math
import time

import numpy as np

from media import g711
from support import RtpPeer, sipp, sipp_file


def _ok(res):
    out = res.stdout.decode(errors="replace")
    assert res.returncode == 0, out[-3000:]
    return out


def test_pcmu_echo_audio_on_the_wire(cell_factory, tmp_path):
    """What the echo app sends back is exactly what was sent (G.711 at an 8 kHz bridge)."""
    cell = cell_factory("[media]\nclock_rate = 8000\n")
    peer = RtpPeer(cell.ports["rtp_peer"])
    try:
        proc = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "4500", local_port=cell.ports["sipp"],
                    rtpport=cell.ports["rtp_peer"], background=True)
        peer.wait_remote()
        rng = np.random.default_rng(7)
        t = np.arange(160 * 150) / 8000
        signal = (6000 * np.sin(2 * math.pi * 440 * t) + 2000 * rng.standard_normal(t.size)).astype("<i2")
        payloads = [g711.ulaw_encode(signal[i:i + 160].tobytes()) for i in range(0, signal.size, 160)]
        peer.stream(payloads)
        peer.collect(0.5)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()[-2000:]
    finally:
        peer.close()
    # The bridge's 20 ms frames need not line up with our packets, and the jitter buffer
    # may shift the stream by a frame: look for each sent packet's 160 bytes, bit-exact,
    # anywhere in what came back.
    back = b"".join(p for _, pt, _, p in peer.received if pt == 0)
    intact = sum(1 for p in payloads if p in back)
    assert intact >= 0.9 * len(payloads), f"only {intact}/{len(payloads)} packets came back bit-exact"
    # Packets keep a 20 ms cadence from the cell.
    times = np.array([t for t, pt, _, _ in peer.received if pt == 0])
    assert 45 <= 1 / np.median(np.diff(times)) <= 55
    ended = cell.wait_event("call_ended")[0]
    assert ended["result"] == "answered" and ended["codec"] == "PCMU"
    assert ended["reason"] == "remote bye"
    assert 49.0 <= ended["frame_rate"] <= 51.0
    assert ended["mos"] > 4.0


def test_echo_at_wideband_bridge_rate_keeps_the_signal(cell_factory, tmp_path):
    """At a 16 kHz bridge the echo is resampled twice; it must still be the same audio."""
    cell = cell_factory("[media]\nclock_rate = 16000\n")
    peer = RtpPeer(cell.ports["rtp_peer"])
    try:
        proc = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "3500", local_port=cell.ports["sipp"],
                    rtpport=cell.ports["rtp_peer"], background=True)
        peer.wait_remote()
        t = np.arange(160 * 100) / 8000
        tone = (8000 * np.sin(2 * math.pi * 700 * t)).astype("<i2")
        peer.stream([g711.ulaw_encode(tone[i:i + 160].tobytes()) for i in range(0, tone.size, 160)])
        peer.collect(0.4)
        proc.communicate(timeout=30)
    finally:
        peer.close()
    pcm = np.frombuffer(b"".join(g711.ulaw_decode(p) for _, pt, _, p in peer.received if pt == 0), "<i2")
    loud = pcm[np.abs(pcm) > 0]
    assert loud.size > 8000 * 1.0, "less than a second of echoed audio"
    spectrum = np.abs(np.fft.rfft(pcm.astype(float)))
    peak_hz = np.argmax(spectrum) * 8000 / pcm.size
    assert abs(peak_hz - 700) < 10


def test_builtin_uac_pcap_alaw_and_rfc2833_dtmf(cell, tmp_path):
    (tmp_path / "pcap").symlink_to("/usr/share/sip-tester")
    _ok(sipp("builtin:uac_pcap", cell.sip, tmp_path, "-mp", str(cell.ports["rtp_peer"]),
             local_port=cell.ports["sipp"], timeout=40))
    ended = cell.wait_event("call_ended")[0]
    assert ended["codec"] == "PCMA"
    assert ended["dtmf"] == "X"                    # digits are masked in logs and records by default
    assert ended["rx_packets"] > 200
    dtmf = cell.wait_event("dtmf")[0]
    assert dtmf["method"] == "rfc4733" and dtmf["digit"] == "X"
    m = cell.metrics()
    assert m['trunkline_dtmf_total{method="rfc4733"}'] == 1
    assert m['trunkline_calls_total{direction="inbound",result="answered"}'] == 1
    assert m["trunkline_call_mos_count"] == 1
    assert m["trunkline_media_frame_interval_seconds_count"] > 300


def test_early_bye(cell, tmp_path):
    _ok(sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "0", local_port=cell.ports["sipp"]))
    ended = cell.wait_event("call_ended")[0]
    assert ended["result"] == "answered" and ended["reason"] == "remote bye"
    assert cell.metrics()["trunkline_calls_active"] == 0


def test_cancel_before_answer(cell_factory, tmp_path):
    cell = cell_factory("[sip]\nanswer_delay = 3.0\n")
    _ok(sipp("cancel.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"]))
    ended = cell.wait_event("call_ended")[0]
    assert ended["result"] == "cancelled" and ended["reason"] == "cancelled"
    assert cell.metrics()['trunkline_calls_total{direction="inbound",result="cancelled"}'] == 1


def test_hold_and_unhold(cell, tmp_path):
    _ok(sipp("hold_unhold.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"]))
    logs = sipp_file(tmp_path, "_logs.log")
    assert "HOLD answered a=recvonly" in logs or "HOLD answered a=inactive" in logs
    assert "UNHOLD answered a=sendrecv" in logs
    cell.wait_event("call_hold")
    cell.wait_event("call_unhold")
    cell.wait_event("call_ended")


def test_cell_hangs_up_after_playback(cell_factory, tmp_path):
    from media.wav import write_wav
    prompt = tmp_path / "prompt.wav"
    t = np.arange(22050) / 22050    # one second at 22.05 kHz: the cell must resample it
    write_wav(str(prompt), (5000 * np.sin(2 * math.pi * 500 * t)).astype("<i2").tobytes(), 22050)
    cell = cell_factory("", args=("--app", "playback", "--prompt", str(prompt)))
    peer = RtpPeer(cell.ports["rtp_peer"])
    try:
        proc = sipp("wait_bye.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"],
                    rtpport=cell.ports["rtp_peer"], background=True)
        peer.wait_remote()
        peer.stream([bytes([0xFF]) * 160] * 75)   # keep RTP flowing while the prompt plays
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()[-2000:]
    finally:
        peer.close()
    ended = cell.wait_event("call_ended")[0]
    assert ended["reason"] == "playback finished"
    pcm = np.frombuffer(b"".join(g711.ulaw_decode(p) for _, pt, _, p in peer.received if pt == 0), "<i2")
    voiced = np.abs(pcm) > 1000
    assert 0.8 < voiced.sum() / 8000 < 1.2, "about one second of prompt should have been heard"
    spectrum = np.abs(np.fft.rfft(pcm.astype(float)))
    assert abs(np.argmax(spectrum) * 8000 / pcm.size - 500) < 10


def test_capacity_refuses_with_503_retry_after(cell, tmp_path):
    """5 concurrent calls at a 3-call cell: 3 answered, the rest refused 503 with Retry-After."""
    _ok(sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "3000", "-l", "5", "-r", "10",
             local_port=cell.ports["sipp"], calls=5))
    logs = sipp_file(tmp_path, "_logs.log")
    assert logs.count("ANSWERED") == 3, logs
    assert logs.count("REFUSED 503 Retry-After 5") == 2, logs
    cell.wait_event("call_ended", 3)
    m = cell.metrics()
    assert m['trunkline_sip_rejected_total{reason="full"}'] == 2
    assert m['trunkline_calls_total{direction="inbound",result="answered"}'] == 3
    msgs = sipp_file(tmp_path, "_messages.log")
    assert "Server: Trunkline\r\n" in msgs or "Server: Trunkline\n" in msgs


def test_untrusted_source_gets_403(cell_factory, tmp_path):
    cell = cell_factory('[[trunks]]\nname = "carrier"\nallow = ["127.0.0.1/32"]\n')
    _ok(sipp("untrusted.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"], local_ip="127.0.0.3"))
    rejected = cell.wait_event("call_rejected")[0]
    assert rejected["reason"] == "untrusted" and rejected["status"] == 403
    assert cell.metrics()['trunkline_sip_rejected_total{reason="untrusted"}'] == 1
    assert not cell.events("call_offered")


def test_options_probe(cell, tmp_path):
    _ok(sipp("options.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"]))


def test_rtp_timeout_hangs_up_a_dead_call(cell_factory, tmp_path):
    cell = cell_factory("[sip]\nrtp_timeout = 2.0\n")
    start = time.monotonic()
    _ok(sipp("wait_bye.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"], timeout=20))
    assert time.monotonic() - start < 10
    assert cell.wait_event("call_ended")[0]["reason"] == "rtp timeout"


def test_dtmf_info_triggers_blind_transfer(cell_factory, tmp_path):
    cell = cell_factory('[app]\ndtmf_transfer = { "0" = "sip:operator@127.0.0.1:5999" }\n'
                        '[pii]\nshow_dtmf = true\n'         # the operator opts in to digits in clear ...
                        '[records]\nlog_words = true\n')   # ... in the logs too
    _ok(sipp("transfer_dtmf.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"]))
    assert "REFER to sip:operator@127.0.0.1:5999" in sipp_file(tmp_path, "_logs.log")
    dtmf = cell.wait_event("dtmf")[0]
    assert dtmf["method"] == "info" and dtmf["digit"] == "0"
    assert cell.wait_event("call_ended")[0]["reason"] == "transferred"


def test_codec_offer_answers_only_configured_codecs(cell, tmp_path):
    _ok(sipp("offer_many.xml", cell.sip, tmp_path, "-d", "300", local_port=cell.ports["sipp"]))
    answered = [l for l in sipp_file(tmp_path, "_logs.log").splitlines() if l.startswith("ANSWERED")][0]
    pts = answered.split("RTP/AVP")[1].split()
    assert pts[0] in ("9", "8", "0") and set(pts) <= {"9", "8", "0", "101"}, answered
    assert not {"3", "97", "98"} & set(pts)
    msgs = sipp_file(tmp_path, "_messages.log")
    assert "telephone-event/8000" in msgs.split("SIP/2.0 200 OK")[1]


def test_playback_loops_until_the_caller_hangs_up(cell_factory, tmp_path):
    from media.wav import write_wav
    prompt = tmp_path / "short.wav"
    t = np.arange(int(0.3 * 8000)) / 8000          # 0.3 s of 800 Hz
    write_wav(str(prompt), (5000 * np.sin(2 * math.pi * 800 * t)).astype("<i2").tobytes(), 8000)
    cell = cell_factory('[app]\nloop = true\n', args=("--app", "playback", "--prompt", str(prompt)))
    peer = RtpPeer(cell.ports["rtp_peer"])
    try:
        proc = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "2500", local_port=cell.ports["sipp"],
                    rtpport=cell.ports["rtp_peer"], background=True)
        peer.wait_remote()
        peer.stream([bytes([0xFF]) * 160] * 120)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()[-2000:]     # the caller hung up; the cell did not
    finally:
        peer.close()
    pcm = np.frombuffer(b"".join(g711.ulaw_decode(p) for _, pt, _, p in peer.received if pt == 0), "<i2")
    assert (np.abs(pcm) > 1000).sum() / 8000 > 1.5, "a 0.3 s prompt looped for most of the call"
    assert cell.wait_event("call_ended")[0]["reason"] == "remote bye"
