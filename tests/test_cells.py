"""Many cells behind a real Kamailio on 127.0.0.1, loaded by SIPp."""
import os
import signal
import re
import time

import pytest

from support import Api, BoxProcess, create_key, sipp, sipp_file


@pytest.fixture
def box(tmp_path):
    boxes = []

    def make(cells=3, config="[models]\nload = \"never\"\n", args=(), cells_extra=""):
        b = BoxProcess(tmp_path, cells, config, args, cells_extra)
        boxes.append(b)
        b.start()
        return b
    yield make
    for b in boxes:
        if b.alive():
            b.proc.terminate()
            try:
                b.proc.wait(30)
            except Exception:  # noqa: BLE001
                b.proc.kill()
        for pid in _procs_with(str(b.data)):             # nothing may outlive the test
            os.kill(pid, signal.SIGKILL)


def _samples(text):
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _stats(res):
    out = res.stdout.decode(errors="replace")
    import re
    ok = int(re.search(r"Successful call\s+\|\s+\d+\s+\|\s+(\d+)", out).group(1))
    failed = int(re.search(r"Failed call\s+\|\s+\d+\s+\|\s+(\d+)", out).group(1))
    return ok, failed, out


def test_more_calls_than_a_cell_holds_with_builtin_uac(box, tmp_path):
    """9 concurrent calls over 3 cells; SIPp's built-in uac sends ACK/BYE with no Route."""
    b = box(3)
    res = sipp("builtin:uac", b.sip, tmp_path, "-d", "3000", "-l", "9", "-r", "30",
               local_port=b.ports["sipp"], calls=9, timeout=40)
    ok, failed, out = _stats(res)
    assert (ok, failed) == (9, 0), out[-2000:]
    per_cell = [len(b.wait_cell_events(i, "call_ended", 3)) for i in range(3)]
    assert per_cell == [3, 3, 3]                    # least-loaded, maxload 3 each
    for i in range(3):
        assert all(e["reason"] == "remote bye" for e in b.cell_events(i, "call_ended"))
    api = Api(b, create_key(b.data, "read"))
    calls = api.get("/v1/calls?limit=50")[1]["calls"]
    assert len(calls) == 9 and all(c["result"] == "answered" for c in calls)
    samples = _samples(b.http_get("/metrics")[1])
    for i in range(3):
        assert samples[("trunkline_calls_total", (("cell", str(i)), ("direction", "inbound"),
                                                  ("result", "answered")))] == 3
    assert samples[("trunkline_box_cell_up", (("cell", "2"),))] == 1


def test_full_box_answers_503_with_retry_after(box, tmp_path):
    b = box(2)
    sipp("call_pcmu.xml", b.sip, tmp_path, "-d", "3000", "-l", "8", "-r", "40",
         local_port=b.ports["sipp"], calls=8, timeout=40)
    logs = sipp_file(tmp_path, "_logs.log")
    assert logs.count("ANSWERED") == 6 and logs.count("REFUSED 503 Retry-After 5") == 2, logs


def test_reinvite_and_bye_reach_the_right_cell(box, tmp_path):
    b = box(2)
    res = sipp("hold_unhold.xml", b.sip, tmp_path, local_port=b.ports["sipp"])
    assert res.returncode == 0, res.stdout.decode()[-2000:]
    time.sleep(0.5)
    holds = [len(b.cell_events(i, "call_hold")) for i in range(2)]
    ended = [len(b.cell_events(i, "call_ended")) for i in range(2)]
    assert sorted(holds) == [0, 1] and holds == ended


@pytest.mark.slow
@pytest.mark.sample
def test_killing_a_cell_fails_only_its_calls(box, tmp_path):
    b = box(3, "[models]\nload = \"never\"\n[sip]\nrtp_timeout = 0\n")
    first = tmp_path / "first"
    first.mkdir()
    long_calls = sipp("call_pcmu.xml", b.sip, first, "-d", "8000", "-l", "6", "-r", "30",
                      local_port=b.ports["sipp"], calls=6, background=True, timeout=40)
    deadline = time.time() + 15
    while sum(len(b.cell_events(i, "call_answered")) for i in range(3)) < 6 and time.time() < deadline:
        time.sleep(0.1)
    victim = next(i for i in range(3) if b.cell_events(i, "call_answered"))
    lost = len(b.cell_events(victim, "call_answered"))
    api = Api(b, create_key(b.data, "read"))
    pid = next(c["pid"] for c in api.get("/v1/cells")[1]["cells"] if c["index"] == victim)
    os.kill(pid, signal.SIGKILL)
    # new calls while the cell is down go to the others
    second = tmp_path / "second"
    second.mkdir()
    res = sipp("call_pcmu.xml", b.sip, second, "-d", "500", "-l", "3", "-r", "10",
               local_port=b.ports["sipp"] + 1, calls=3, timeout=40)
    assert _stats(res)[:2] == (3, 0), res.stdout.decode()[-1500:]
    out, _ = long_calls.communicate(timeout=60)
    ok, failed, text = _stats(type("R", (), {"stdout": out})())
    assert failed == lost and ok == 6 - lost, text[-1500:]
    # the supervisor brings the cell back
    deadline = time.time() + 20
    cell = None
    while time.time() < deadline:
        cell = next(c for c in api.get("/v1/cells")[1]["cells"] if c["index"] == victim)
        if cell["alive"] and cell["pid"] != pid and b.cell_events(victim, "cell_ready")[-1:]:
            break
        time.sleep(0.3)
    assert cell["alive"] and cell["pid"] != pid and cell["deaths"] == 1
    assert _samples(b.http_get("/metrics")[1])[("trunkline_box_cell_deaths_total", (("cell", str(victim)),))] == 1


def test_drained_cell_gets_no_new_calls(box, tmp_path):
    b = box(2)
    api = Api(b, create_key(b.data))
    status, body, _ = api.post("/v1/cells/0/drain")
    assert status == 200 and body["drained"] is True
    res = sipp("call_pcmu.xml", b.sip, tmp_path, "-d", "500", "-l", "3", "-r", "20",
               local_port=b.ports["sipp"], calls=3, timeout=30)
    assert _stats(res)[:2] == (3, 0)
    assert len(b.wait_cell_events(1, "call_ended", 3)) == 3 and not b.cell_events(0, "call_offered")
    assert api.post("/v1/cells/0/undrain")[0] == 200


def test_box_api_acts_on_a_call_in_any_cell(box, tmp_path):
    b = box(2)
    api = Api(b, create_key(b.data))
    call = sipp("wait_bye.xml", b.sip, tmp_path, local_port=b.ports["sipp"], background=True, timeout=30)
    deadline = time.time() + 10
    active = []
    while not active and time.time() < deadline:
        active = api.get("/v1/calls?state=active")[1]["calls"]
        time.sleep(0.1)
    assert active and active[0]["state"] in ("ringing", "progressing")
    time.sleep(0.3)
    status, body, _ = api.post(f"/v1/calls/{active[0]['id']}/hangup")
    assert status == 200, body
    out, _ = call.communicate(timeout=20)
    assert call.returncode == 0, out.decode()[-1500:]       # SIPp got the cell's BYE through Kamailio


def test_untrusted_source_is_refused_at_the_front(box, tmp_path):
    b = box(2, '[models]\nload = "never"\n[[trunks]]\nname = "carrier"\nallow = ["127.0.0.1/32"]\n')
    # the front drops untrusted sources unanswered (no 403 to enumerate or reflect; issue 11)
    from sipwire import UdpPeer
    peer = UdpPeer("127.0.0.3")
    try:
        assert peer.ask("INVITE", ("127.0.0.1", b.ports["sip"]), seconds=2.0, sdp=True) == []
    finally:
        peer.close()
    assert not any(b.cell_events(i, "call_offered") for i in range(2))


def test_sigterm_stops_the_whole_box(box, tmp_path):
    b = box(2)
    assert b.stop() == 0
    time.sleep(0.5)
    assert not _procs_with(str(b.data)) and not _procs_with(str(b.run_dir / "kamailio.cfg"))


def _procs_with(needle: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd and int(pid) != os.getpid():
                out.append(int(pid))
    return out


def test_cells_on_another_host_address(box, tmp_path):
    """The across-hosts layout on one machine: front on 127.0.0.1, cells on 127.0.0.2."""
    b = box(2, '[models]\nload = "never"\n', cells_extra='host = "127.0.0.2"\nfront_ip = "127.0.0.1"\n')
    res = sipp("builtin:uac", b.sip, tmp_path, "-d", "1000", "-l", "4", "-r", "20",
               local_port=b.ports["sipp"], calls=4, timeout=30)
    assert _stats(res)[:2] == (4, 0), res.stdout.decode()[-1500:]
    api = Api(b, create_key(b.data, "read"))
    assert all(c["sip"].startswith("127.0.0.2:") for c in api.get("/v1/cells")[1]["cells"])
    offered = [e for i in range(2) for e in b.wait_cell_events(i, "call_offered", 2)]
    assert offered and all(e["source"].startswith("127.0.0.1:") for e in offered)


def test_nothing_outlives_a_killed_supervisor(box, tmp_path):
    b = box(2)
    b.proc.kill()
    b.proc.wait(5)
    deadline = time.time() + 30
    while _procs_with(str(b.data)) and time.time() < deadline:
        time.sleep(0.2)
    left = {}
    for pid in _procs_with(str(b.data)):
        try:
            left[pid] = open(f"/proc/{pid}/cmdline", "rb").read()[:150]
        except OSError:
            pass
    assert not left


def test_outbound_calls_leave_through_the_front(box, tmp_path):
    from support import next_ports
    far = next_ports()
    trunk = f'[[trunks]]\nname = "carrier"\naddress = "sip:127.0.0.1:{far["sipp"]}"\ncaller_id = "+15550004444"\n'
    b = box(2, '[models]\nload = "never"\n' + trunk)
    uas = sipp("uas_answer.xml", "", tmp_path, local_port=far["sipp"], background=True, timeout=30)
    time.sleep(0.3)
    api = Api(b, create_key(b.data))
    status, err, _ = api.post("/v1/calls", {"to": "5551234", "trunk": "carrier", "from": "+15559999999"})
    assert status == 400 and err["error"]["field"] == "from", err      # the box refuses a number not the trunk's
    status, body, _ = api.post("/v1/calls", {"to": "5551234", "trunk": "carrier", "app": "echo",
                                             "from": "+15550004444"})
    assert status == 201, body
    deadline = time.time() + 10
    while time.time() < deadline and api.get(f"/v1/calls/{body['id']}")[1].get("state") != "progressing":   # (404 until the cell has it)
        time.sleep(0.1)
    assert api.post(f"/v1/calls/{body['id']}/hangup")[0] == 200
    out, _ = uas.communicate(timeout=20)
    assert uas.returncode == 0, out.decode()[-1500:]
    msgs = sipp_file(tmp_path, "_messages.log")
    invite = msgs[msgs.index("INVITE sip:5551234@"):]
    top_via = next(l for l in invite.splitlines() if l.startswith("Via:"))
    assert f"127.0.0.1:{b.ports['sip']}" in top_via            # the trunk sees the front, not a cell
    assert re.search(r"^From: <sip:\+15550004444@127\.0\.0\.1>;tag=", invite, re.M), invite    # the trunk's number
    head = invite.split("\n\n", 1)[0]
    assert not [l for l in head.splitlines() if l.startswith("Route:")], head    # no internal socket named
