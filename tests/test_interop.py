"""Carrier interop on a real cell with SIPp as the carrier: a mid-call re-INVITE that changes
the codec, reliable provisional responses (100rel/PRACK), session timers (RFC 4028) and
early media (183) on outbound calls."""
from __future__ import annotations

import time

import numpy as np
import pytest

from media import g711
from support import Api, RtpPeer, create_key, next_ports, sipp, sipp_file

ECHO = '[models]\nload = "never"\n'


def _noise(seed: int, packets: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (3000 * rng.standard_normal(160 * packets)).astype("<i2")


def _wait_log(tmp_path, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in sipp_file(tmp_path, "_logs.log"):
            return
        time.sleep(0.02)
    raise AssertionError(f"SIPp never logged {text!r}:\n" + sipp_file(tmp_path, "_messages.log")[-3000:])


def test_reinvite_changes_the_codec_and_the_echo_follows(cell_factory, tmp_path):
    """PCMU, then a re-INVITE offering PCMA only: the cell answers PCMA and echoes PCMA from then on."""
    cell = cell_factory(ECHO + "[media]\nclock_rate = 8000\n")      # 8 kHz: the echo is bit-exact G.711
    peer = RtpPeer(cell.ports["rtp_peer"])
    try:
        call = sipp("reinvite_codec.xml", cell.sip, tmp_path, "-d", "1500", local_port=cell.ports["sipp"],
                    rtpport=cell.ports["rtp_peer"], background=True)
        peer.wait_remote()
        first = _noise(1, 40)
        ulaw = [g711.ulaw_encode(first[i:i + 160].tobytes()) for i in range(0, first.size, 160)]
        peer.stream(ulaw)
        _wait_log(tmp_path, "SECOND ANSWER")
        second = _noise(2, 40)
        alaw = [g711.alaw_encode(second[i:i + 160].tobytes()) for i in range(0, second.size, 160)]
        peer.stream(alaw, pt=8)
        peer.collect(0.4)
        out, _ = call.communicate(timeout=20)
        assert call.returncode == 0, out.decode()[-3000:]
    finally:
        peer.close()
    back = {pt: b"".join(p for _, t, _, p in peer.received if t == pt) for pt in (0, 8)}
    assert sum(p in back[0] for p in ulaw) >= 0.8 * len(ulaw), "PCMU was not echoed before the re-INVITE"
    assert sum(p in back[8] for p in alaw) >= 0.8 * len(alaw), "PCMA was not echoed after the re-INVITE"
    last_pcmu = max(t for t, pt, _, _ in peer.received if pt == 0)
    assert all(t >= last_pcmu for t, pt, _, _ in peer.received if pt == 8)    # a clean switch
    ended = cell.wait_event("call_ended")[0]
    assert ended["result"] == "answered" and ended["reason"] == "remote bye"
    assert cell.alive() and "Assertion" not in cell.log_path.read_text()


def test_a_carrier_requiring_100rel_gets_a_reliable_180_and_its_prack_answered(cell_factory, tmp_path):
    cell = cell_factory(ECHO + "[sip]\nanswer_delay = 0.5\n")     # ringing long enough for the PRACK first
    res = sipp("prack.xml", cell.sip, tmp_path, "-d", "500", local_port=cell.ports["sipp"],
               rtpport=cell.ports["rtp_peer"], timeout=20)
    assert res.returncode == 0, res.stdout.decode(errors="replace")[-3000:] + sipp_file(tmp_path, "_messages.log")
    logs = sipp_file(tmp_path, "_logs.log")
    assert "RELIABLE 180 RSeq" in logs and "PRACK ANSWERED" in logs
    ended = cell.wait_event("call_ended")[0]
    assert ended["result"] == "answered" and ended["reason"] == "remote bye"


@pytest.mark.slow
def test_session_timers_are_honoured_both_ways(cell_factory, tmp_path):
    """90 s sessions: the cell refreshes when it is the refresher, and answers the carrier's refresh."""
    cell = cell_factory(ECHO + "[sip]\nrtp_timeout = 0\n")     # SIPp sends no RTP: only timers in play
    t0 = time.monotonic()
    res = sipp("session_timer.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"],
               rtpport=cell.ports["rtp_peer"], timeout=120)
    assert res.returncode == 0, res.stdout.decode(errors="replace")[-3000:] + sipp_file(tmp_path, "_messages.log")[-4000:]
    logs = sipp_file(tmp_path, "_logs.log")
    assert "TIMER AGREED" in logs and "CELL REFRESHED WITH" in logs and "CARRIER REFRESH ANSWERED" in logs
    assert time.monotonic() - t0 < 90                      # the refresh came before the session expired
    ended = cell.wait_event("call_ended")[0]
    assert ended["result"] == "answered" and ended["reason"] == "remote bye"


def _stamp(logs: str, label: str) -> float:
    """Wall-clock seconds SIPp logged as ``<label> <sec> <usec>`` (``gettimeofday``, as doubles)."""
    for line in logs.splitlines():
        if label in line:
            sec, usec = line.split(label, 1)[1].split()[:2]
            return float(sec) + float(usec) / 1e6
    raise AssertionError(f"SIPp never logged {label!r}:\n{logs[-2000:]}")


def _no_call_left(cell, api: Api, call_id: str) -> dict:
    """The call is over everywhere: no active call in /v1/calls or the gauge; returns its record."""
    _wait(lambda: api.get("/v1/calls?state=active")[1]["calls"] == [])
    assert cell.metrics()["trunkline_calls_active"] == 0
    status, row, _ = api.get(f"/v1/calls/{call_id}")
    assert status == 200 and row["state"] == "ended", row
    return row


@pytest.mark.slow
def test_a_carrier_that_stops_refreshing_gets_a_bye_before_the_session_expires(cell_factory, tmp_path):
    """RFC 4028 10: the carrier is the refresher of a 90 s session (the cell's minimum, Min-SE 90)
    and never refreshes - a dead SBC that forgot the call. The cell sends BYE before the session
    expires (pjsip: at expiry - max(SE/3, 32) = 60 s), frees the slot and records why."""
    cell = cell_factory(ECHO + "[sip]\nrtp_timeout = 0\n")     # no RTP from SIPp: only the timer in play
    api = Api(cell, create_key(cell.data))
    res = sipp("session_timer_silent.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"],
               rtpport=cell.ports["rtp_peer"], timeout=120)
    assert res.returncode == 0, res.stdout.decode(errors="replace")[-3000:] + sipp_file(tmp_path, "_messages.log")[-4000:]
    logs = sipp_file(tmp_path, "_logs.log")
    waited = _stamp(logs, "CELL BYE AT") - _stamp(logs, "TIMER AGREED 90;refresher=uac AT")
    assert waited < 90, f"the BYE came {waited:.1f} s after the answer: after the session expired"
    assert waited >= 45, f"the BYE came {waited:.1f} s after the answer: before a refresh was even due"
    ended = cell.wait_event("call_ended")[0]
    assert ended["result"] == "answered" and ended["reason"] == "session expired", ended
    row = _no_call_left(cell, api, ended["call_id"])
    assert row["reason"] == "session expired"


@pytest.mark.slow
def test_a_refresh_answered_481_ends_the_call(cell_factory, tmp_path):
    """The cell is the refresher; its refresh (at half the 90 s) gets 481 - the carrier lost the
    call (RFC 3261 12.2.1.2): the cell ends the call, frees the slot and records why."""
    cell = cell_factory(ECHO + "[sip]\nrtp_timeout = 0\n")
    api = Api(cell, create_key(cell.data))
    res = sipp("session_timer_481.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"],
               rtpport=cell.ports["rtp_peer"], timeout=120)
    assert res.returncode == 0, res.stdout.decode(errors="replace")[-3000:] + sipp_file(tmp_path, "_messages.log")[-4000:]
    logs = sipp_file(tmp_path, "_logs.log")
    assert "TIMER AGREED 90;refresher=uas" in logs and "CELL REFRESHED WITH" in logs and "REFRESH ANSWERED 481" in logs
    ended = cell.wait_event("call_ended")[0]
    assert ended["result"] == "answered" and ended["reason"] == "call lost 481", ended
    row = _no_call_left(cell, api, ended["call_id"])
    assert row["reason"] == "call lost 481"


def test_who_ended_an_answered_call_is_told_apart():
    """The classification behind the two slow tests above (cheap): a far-end BYE leaves 200;
    pjsip's own BYEs leave the cause it put in their Reason header."""
    from sip.engine import _answered_end_reason
    assert _answered_end_reason(200, "Normal call clearing") == "remote bye"
    assert _answered_end_reason(408, "No session refresh received.") == "session expired"
    assert _answered_end_reason(481, "Call/Transaction Does Not Exist") == "call lost 481"
    assert _answered_end_reason(408, "Request Timeout") == "call lost 408"     # our refresh unanswered


def test_early_media_on_an_outbound_call_reaches_the_app_before_the_answer(cell_factory, tmp_path):
    """The far end sends 183 with SDP and plays a prompt before 200: the cell's app (echo) gets it
    before the answer - it comes straight back - and the INVITE offers session timers."""
    far = next_ports()
    uas = sipp("uas_early_media.xml", "", tmp_path, "-d", "3000", local_port=far["sipp"],
               rtpport=far["rtp_peer"], background=True, timeout=30)
    peer = RtpPeer(far["rtp_peer"])
    try:
        cell = cell_factory(ECHO + "[media]\nclock_rate = 8000\n"
                            f'[[trunks]]\nname = "carrier"\naddress = "sip:127.0.0.1:{far["sipp"]}"\n')
        api = Api(cell, create_key(cell.data))
        status, body, _ = api.post("/v1/calls", {"to": "5550100", "trunk": "carrier", "app": "echo"})
        assert status == 201, body
        peer.wait_remote()
        prompt = _noise(4, 50)
        payloads = [g711.ulaw_encode(prompt[i:i + 160].tobytes()) for i in range(0, prompt.size, 160)]
        peer.stream(payloads)
        peer.collect(0.2)
        before = api.get(f"/v1/calls/{body['id']}")[1]
        assert "ANSWERING" not in sipp_file(tmp_path, "_logs.log")      # all of it before the 200
        assert before["state"] == "ringing", before                  # ("progressing" once answered)
        back = b"".join(p for _, pt, _, p in peer.received if pt == 0)
        assert sum(p in back for p in payloads) >= 0.8 * len(payloads), "the early media did not reach the app"
        _wait(lambda: api.get(f"/v1/calls/{body['id']}")[1]["state"] == "progressing")
        assert api.post(f"/v1/calls/{body['id']}/hangup")[0] == 200
        out, _ = uas.communicate(timeout=20)
        assert uas.returncode == 0, out.decode()[-3000:]
    finally:
        peer.close()
        if uas.poll() is None:
            uas.kill()
    invite = sipp_file(tmp_path, "_messages.log").split("INVITE sip:", 1)[1].split("\n\n", 1)[0]
    assert "timer" in invite and "Session-Expires:" in invite, invite
    ended = cell.wait_event("call_ended")[0]
    assert ended["result"] == "answered" and ended["direction"] == "outbound"


def _wait(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")
