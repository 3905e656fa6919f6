"""Topology hiding at the front (issue 12): what a carrier receives from a box names the front's
public address only, never a cell's address, the front's internal socket or pjsip.

A box of 2 echo cells behind the Kamailio front; the carrier is SIPp on 127.0.0.1 (``-trace_msg``
keeps every message it receives). Three calls, each checked on every message the carrier got:
an inbound call the carrier ends (BYE to the Contact it was given, through the Record-Route set),
an inbound call the cell ends (``POST /v1/calls/{id}/hangup``), and an outbound call
(``POST /v1/calls``) in which the carrier re-INVITEs the cell and the cell hangs up. Each call
must also complete (echo heard, re-INVITE answered, BYE answered, no 481): hiding must not break
the routing of in-dialog requests either way. Then: forged masked values (topoh decodes whatever
arrives, strangers' included) are harmless, and the per-box mask key stays in its 0600 file. The
rendering tests need no box. With ``[sip] topology_hiding = false`` (today's front) the three call
tests fail on the cells' Contact/Via, the internal Record-Route entry and ``s=pjmedia``.
"""
from __future__ import annotations

import re
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bridge.box import kamailio, sipaddr
from media import g711
from support import Api, BoxProcess, RtpPeer, create_key, next_ports, sipp, sipp_file, wait_until

pytestmark = pytest.mark.xdist_group("test_topology")

PRODUCT = re.compile(r"pjsip|pjsua|pjmedia|pjproject", re.I)
ROUTING = ("via", "v", "record-route", "route", "contact", "m")      # headers that carry addresses


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("topo")
    far = next_ports()                  # the carrier's UAS (outbound calls)
    box = BoxProcess(tmp, 2, '[models]\nload = "never"\n[sip]\nrtp_timeout = 0\n'
                     f'[[trunks]]\nname = "carrier"\naddress = "sip:127.0.0.1:{far["sipp"]}"\n'
                     'allow = ["127.0.0.1/32"]\n')
    box.start()
    try:
        yield SimpleNamespace(box=box, far=far, api=Api(box, create_key(box.data)))
    finally:
        box.stop(40)                # (kills it when SIGTERM does not stop it)


def _inside(box: BoxProcess) -> set[str]:
    """ip:port of every cell and of the front's internal socket (from the rendered front)."""
    run = box.run_dir
    cells = set(re.findall(r"sip:([^\s;]+)", (run / "dispatcher.list").read_text()))
    m = re.search(r'\$Ri == "([^"]+)" && \$Rp == (\d+)', (run / "kamailio.cfg").read_text())
    assert cells and m, "cannot read the box's inside addresses"
    return cells | {f"{m.group(1)}:{m.group(2)}"}


def _received(cwd: Path) -> list[str]:
    """Every SIP message SIPp received (its -trace_msg file in ``cwd``), one string each."""
    text = sipp_file(cwd, "_messages.log")
    chunks = [c for c in re.split(r"^-{10,}.*$", text, flags=re.M) if c.strip()]
    return [c.strip().split("\n", 1)[1].strip() for c in chunks if "message received" in c.strip().splitlines()[0]]


def _head(msg: str) -> str:
    return re.split(r"\r?\n\r?\n", msg, maxsplit=1)[0]


def _addresses(msg: str) -> list[tuple[str, str]]:
    """(header, host[:port]) for every address in the routing headers of ``msg``."""
    out = []
    for line in _head(msg).splitlines()[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() not in ROUTING:
            continue
        if name.strip().lower() in ("via", "v"):
            hosts = re.findall(r"SIP/2\.0/[A-Za-z]+\s+([^;,\s]+)", value)
        else:
            hosts = [h.split("@")[-1] for h in re.findall(r"sips?:([^;>,\s?]+)", value)]
        out += [(name.strip(), h) for h in hosts]
    return out


def _leaks(msgs: list[str], box: BoxProcess, own: set[str]) -> list[str]:
    """What the carrier was told about the box's insides: an inside ip:port anywhere, a routing
    header naming anything but the front's public socket (masked entries name its address alone:
    topoh's mask_ip) or the carrier itself, pjsip's product tokens, an X-/P- header naming a cell."""
    inside = _inside(box)
    public = {f"127.0.0.1:{box.ports['sip']}", "127.0.0.1"}
    found = []
    for msg in msgs:
        first = msg.splitlines()[0]
        found += [f"{first}: names {a}" for a in inside if a in msg]
        found += [f"{first}: {h} names {a}" for h, a in _addresses(msg) if a not in own | public]
        found += [f"{first}: product token {m.group(0)!r}" for m in PRODUCT.finditer(msg)]
        found += [f"{first}: {line.strip()}" for line in _head(msg).splitlines()
                  if re.match(r"(X|P)-[A-Za-z-]*(cell|trunkline)", line, re.I)]
    return found


def _completed(msgs: list[str]) -> None:
    statuses = [m.splitlines()[0] for m in msgs if m.startswith("SIP/2.0 ")]
    assert not [s for s in statuses if re.match(r"SIP/2.0 (4|5|6)\d\d", s)], statuses


def _noise(seed: int, packets: int) -> list[bytes]:
    pcm = (3000 * np.random.default_rng(seed).standard_normal(160 * packets)).astype("<i2")
    return [g711.ulaw_encode(pcm[i:i + 160].tobytes()) for i in range(0, pcm.size, 160)]


def _wait(what, timeout: float, message: str):
    return wait_until(what, timeout, message, 0.1)


@pytest.mark.slow
@pytest.mark.sample
def test_an_inbound_call_the_carrier_ends_shows_only_the_front(topo, tmp_path):
    box = topo.box
    carrier = box.ports["sipp"]
    sdp_port = box.ports["rtp_peer"]
    peer = RtpPeer(sdp_port)
    call = sipp("call_pcmu.xml", box.sip, tmp_path, "-s", "5550001", "-d", "2500",
                local_port=carrier, rtpport=sdp_port, background=True)
    try:
        peer.wait_remote(15)
        audio = _noise(3, 60)
        peer.stream(audio)
        peer.collect(0.3)
        back = b"".join(p for _, pt, _, p in peer.received if pt == 0)
        assert sum(p in back for p in audio) >= 0.9 * len(audio), "no echo through the front"
        out, _ = call.communicate(timeout=40)
        assert call.returncode == 0, out.decode(errors="replace")[-3000:]   # 200 to its BYE (no 481)
    finally:
        peer.close()
        if call.poll() is None:
            call.kill()
    msgs = _received(tmp_path)
    assert any(m.startswith("SIP/2.0 200") and "CSeq: 2 BYE" in m for m in msgs), msgs
    _completed(msgs)
    leaks = _leaks(msgs, box, {f"127.0.0.1:{carrier}"})
    assert not leaks, "\n".join(leaks)


@pytest.mark.slow
def test_an_inbound_call_the_cell_ends_shows_only_the_front(topo, tmp_path):
    box, api = topo.box, topo.api
    carrier = box.ports["sipp"]
    call = sipp("wait_bye.xml", box.sip, tmp_path, "-s", "5550002", local_port=carrier, background=True, timeout=30)
    try:
        active = _wait(lambda: [c for c in api.get("/v1/calls?state=active")[1]["calls"]
                                if c["state"] == "progressing"], 15, "the call never got to a cell")
        time.sleep(0.5)
        status, body, _ = api.post(f"/v1/calls/{active[0]['id']}/hangup")
        assert status == 200, body
        out, _ = call.communicate(timeout=20)
        assert call.returncode == 0, out.decode(errors="replace")[-3000:]   # the cell's BYE reached it
    finally:
        if call.poll() is None:
            call.kill()
    msgs = _received(tmp_path)
    assert any(m.startswith("BYE ") for m in msgs), msgs
    _completed(msgs)
    leaks = _leaks(msgs, box, {f"127.0.0.1:{carrier}"})
    assert not leaks, "\n".join(leaks)


@pytest.mark.slow
def test_an_outbound_call_with_a_reinvite_shows_only_the_front(topo, tmp_path):
    box, api, far = topo.box, topo.api, topo.far["sipp"]
    uas = sipp("uas_topo_reinvite.xml", "", tmp_path, local_port=far, background=True, timeout=30)
    try:
        time.sleep(0.3)
        status, body, _ = api.post("/v1/calls", {"to": "5551234", "trunk": "carrier", "app": "echo"})
        assert status == 201, body
        _wait(lambda: "REINVITE ANSWERED" in sipp_file(tmp_path, "_logs.log"), 20,
              "the cell never answered the carrier's re-INVITE:\n" + sipp_file(tmp_path, "_errors.log")[-2000:])
        status, _, _ = api.post(f"/v1/calls/{body['id']}/hangup")
        assert status == 200
        out, _ = uas.communicate(timeout=20)
        assert uas.returncode == 0, out.decode(errors="replace")[-3000:]
    finally:
        if uas.poll() is None:
            uas.kill()
    msgs = _received(tmp_path)
    assert [m.splitlines()[0].split()[0] for m in msgs if not m.startswith("SIP/2.0")] == ["INVITE", "ACK", "BYE"]
    _completed(msgs)
    leaks = _leaks(msgs, box, {f"127.0.0.1:{far}"})
    assert not leaks, "\n".join(leaks)


@pytest.mark.slow
def test_forged_masked_values_are_harmless(topo):
    """topoh decodes every message before the script sees it, strangers' included: garbage where
    a masked value goes (Request-URI, Route, a reply's second Via, empty or huge) never crashes
    the front nor opens a dialog; the front still answers its trunk."""
    from sipwire import UdpPeer, request
    box = topo.box
    front = ("127.0.0.1", box.ports["sip"])
    target = f"{front[0]}:{front[1]}"
    pid = int((box.run_dir / "kamailio.pid").read_text())
    garbage = ["sr-", "sr-" + "A" * 3000, "sr-%%%;;==", "sr-" + "Zm9v" * 40, ""]
    for source in ("127.0.0.1", "127.0.0.9"):              # a trunk (allow 127.0.0.1/32), a stranger
        peer = UdpPeer(source)
        try:
            for g in garbage:
                bye = request("BYE", target, peer.addr, to_tag="x1",
                              extra=f"Route: <sip:127.0.0.1:{front[1]};lr>, <sip:127.0.0.1;tlh={g}>\r\n")
                bye = bye.replace(f"BYE sip:100@{target}".encode(), f"BYE sip:127.0.0.1;tlh={g}".encode(), 1)
                peer.send(bye, front)
                statuses = [m.split(b"\r\n", 1)[0] for m in peer.gather(0.3)]
                assert all(b" 481 " in st or b" 400 " in st for st in statuses), statuses
                reply = (f"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP {target};branch=z9hG4bKnothing\r\n"
                         f"Via: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKsr-{g}\r\nFrom: <sip:a@b>;tag=1\r\n"
                         f"To: <sip:c@d>;tag=2\r\nCall-ID: forged\r\nCSeq: 1 INVITE\r\n"
                         f"Record-Route: <sip:127.0.0.1;tlh={g}>\r\nContent-Length: 0\r\n\r\n").encode()
                peer.send(reply, front)
                assert peer.gather(0.2) == []
        finally:
            peer.close()
    assert int((box.run_dir / "kamailio.pid").read_text()) == pid
    ok = UdpPeer("127.0.0.1")
    try:
        assert ok.ask("OPTIONS", front) == [405]                 # alive, and still answering its trunk
    finally:
        ok.close()
    assert not [e for i in range(2) for e in box.cell_events(i, "call_offered") if e.get("from") == "scanner"]


@pytest.mark.slow
def test_the_mask_key_stays_private(topo):
    """The key is random per box, in run/topoh.cfg (0600) only: never in kamailio.cfg or a log."""
    box = topo.box
    key_file = box.run_dir / kamailio.TOPOH_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = re.search(r'"mask_key", "([^"]+)"', key_file.read_text()).group(1)
    assert len(key) >= 32
    cfg = (box.run_dir / "kamailio.cfg").read_text()
    assert key not in cfg and f'include_file "{box.run_dir}/{kamailio.TOPOH_FILE}"' in cfg
    for log in [box.log_path, *box.run_dir.glob("*.log")]:
        assert key not in log.read_text(errors="replace"), log


# -- rendering (no box) ----------------------------------------------------------------------

def _front(tmp_path, sip: str = ""):
    from bridge.box.supervisor import Supervisor
    from bridge.core.config import load
    p = tmp_path / "c.toml"
    p.write_text(f'data_dir = "{tmp_path}/data"\n[sip]\nlisten = "127.0.0.1:5060"\n{sip}'
                 '[[trunks]]\nname = "carrier"\naddress = "sip:127.0.0.1:5090"\n')
    sup = Supervisor(load(str(p)), 2, None)
    text, _, _ = sup.render_front()
    return sup, text


def test_a_box_hides_its_topology_by_default_on_its_public_address(tmp_path):
    sup, text = _front(tmp_path, 'public_address = "203.0.113.5"\n')
    assert 'loadmodule "topoh.so"' in text and 'modparam("topoh", "mask_ip", "203.0.113.5")' in text
    assert "mask_key" not in text
    # toward cells (the internal socket) nothing is masked
    assert f'$sndfrom(ip) == "127.0.0.1" && $sndfrom(port) == {sup.front_port}) drop;' in text
    path = kamailio.write(sup.run_dir, text, kamailio.dispatcher_list([("127.0.0.1", 5061)], 3))
    key_file = Path(sup.run_dir) / kamailio.TOPOH_FILE
    first = key_file.read_text()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    kamailio.write(sup.run_dir, text, kamailio.dispatcher_list([("127.0.0.1", 5061)], 3))
    assert key_file.read_text() == first                  # the same key after a restart of the front
    other = tmp_path / "other"
    kamailio.write_topoh(str(other))
    assert (other / kamailio.TOPOH_FILE).read_text() != first     # random per box
    check = subprocess.run(["kamailio", "-c", "-f", path], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr[-2000:]


def test_topology_hiding_can_be_turned_off(tmp_path):
    from bridge.core.config import ConfigError
    _, text = _front(tmp_path, "topology_hiding = false\n")
    assert 'loadmodule "topoh.so"' not in text and "#!define WITH_TOPOH" not in text
    with pytest.raises(ConfigError, match="topology_hiding"):
        _front(tmp_path, 'topology_hiding = "maybe"\n')


def test_the_mask_address_is_the_public_one():
    assert kamailio.mask_address("", ["udp:192.0.2.7:5080", "tcp:192.0.2.7:5080"]) == "192.0.2.7"
    assert kamailio.mask_address("[2001:db8::5]", ["udp:[::]:5060"]) == "[2001:db8::5]"
    assert kamailio.mask_address("", ["udp:0.0.0.0:5060"]) == sipaddr.primary_address()
    with pytest.raises(ValueError):
        kamailio.mask_address('x"y', ["udp:127.0.0.1:5060"])
