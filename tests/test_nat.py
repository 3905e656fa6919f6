"""A box behind a real NAT (issue 12): ``trunkline serve --cells 2`` on a private network
(10.99.0.2) behind a router that forwards SIP and the RTP range from its public address
(192.0.2.1) and masquerades the box's traffic, with SIPp and our RTP endpoint as the carrier
(192.0.2.10) - all in network namespaces made for the test (tests/netns.py) and deleted after.

With ``sip.public_address = "192.0.2.1"`` a call in either direction connects, the echo comes
back bit-exact (8 kHz), either side's BYE ends it, the carrier's RTP from a port other than
its SDP's is latched onto (symmetric RTP), and nothing the carrier receives names 10.99.x.
Those are ``slow`` (root and ``ip netns`` needed, else skipped); the fast ones below check
where each address goes on a plain cell and in the front's and the cells' settings.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from media import g711
from netns import BOX_IP, CARRIER_IP, PUBLIC_IP, Nat, NetnsUnavailable, exec_prefix, in_netns
from support import SCENARIOS, Api, BoxProcess, RtpPeer, create_key, next_ports, sipp, sipp_file

pytestmark = pytest.mark.xdist_group("test_nat")

PRIVATE = re.compile(r"10\.99\.\d+\.\d+")


def _noise(seed: int, packets: int) -> list[bytes]:
    """G.711 u-law payloads of noise: an 8 kHz echo returns them byte for byte."""
    pcm = (3000 * np.random.default_rng(seed).standard_normal(160 * packets)).astype("<i2")
    return [g711.ulaw_encode(pcm[i:i + 160].tobytes()) for i in range(0, pcm.size, 160)]


def _echoed(payloads: list[bytes], peer: RtpPeer) -> int:
    # the bridge may re-cut the stream at another offset: look for each packet's bytes anywhere
    back = b"".join(p for _, pt, _, p in peer.received if pt == 0)
    return sum(p in back for p in payloads)


def _carrier_sipp(nat: Nat, scenario: str, target: str, cwd: Path, *args: str, local_port: int,
                  rtpport: int, timeout: float = 40.0) -> subprocess.Popen:
    """SIPp inside the carrier namespace, on the carrier's address, tracing every message to ``cwd``."""
    cwd.mkdir(parents=True, exist_ok=True)
    cmd = [*exec_prefix(nat.carrier), "sipp", "-sf", str(SCENARIOS / scenario), *([target] if target else []),
           "-i", CARRIER_IP, "-p", str(local_port), "-m", "1", "-timeout", f"{int(timeout)}s", "-timeout_error",
           "-nostdin", "-trace_err", "-trace_logs", "-trace_msg", "-set", "rtpport", str(rtpport), *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _received(messages: str) -> list[str]:
    """The SIP messages SIPp received (its trace holds what it sent too)."""
    chunks = re.split(r"^-{10,}.*$", messages, flags=re.M)
    return [c for c in chunks if c.strip() and "message received" in c.strip().splitlines()[0]]


def _wire_check(messages: str) -> list[str]:
    got = _received(messages)
    assert got, "SIPp traced no received message:\n" + messages[-2000:]
    leaks = sorted({m.group(0) for msg in got for m in PRIVATE.finditer(msg)})
    assert not leaks, f"the carrier received the box's private address {leaks}:\n" + "\n".join(got)[-4000:]
    return got


# -- fast: where each address goes, without a NAT ----------------------------------------------

def test_a_cell_puts_public_address_in_sip_and_media_public_address_in_sdp(cell_factory, tmp_path):
    """One cell on its own (no front): Via/Contact carry ``sip.public_address``, SDP c=/o=
    ``sip.media_public_address`` (a separate media address, e.g. another NAT or an RTP-only IP)."""
    cell = cell_factory('[models]\nload = "never"\n[sip]\npublic_address = "198.51.100.7"\n'
                        'media_public_address = "203.0.113.9"\n')
    res = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "100", local_port=cell.ports["sipp"],
               rtpport=cell.ports["rtp_peer"])
    assert res.returncode == 0, res.stdout.decode()[-2000:]
    ok = next(m for m in _received(sipp_file(tmp_path, "_messages.log")) if "SIP/2.0 200 OK" in m and "v=0" in m)
    contact = next(line for line in ok.splitlines() if line.lower().startswith("contact:"))
    assert f"198.51.100.7:{cell.ports['sip']}" in contact, ok
    assert "c=IN IP4 203.0.113.9" in ok and re.search(r"^o=.* IN IP4 203\.0\.113\.9\s*$", ok, re.M), ok
    assert "198.51.100.7" not in ok.split("v=0", 1)[1], ok


def test_front_and_cells_settings_behind_nat(tmp_path, monkeypatch):
    """``sip.public_address``: the front's public sockets advertise it (never the cells' socket);
    cells get no SIP public address (Via/Contact name their socket behind the front), the media
    public address for SDP, and bind RTP on the box's public-side address. Without it: nothing."""
    from bridge.box import kamailio
    from bridge.box.supervisor import Supervisor
    from bridge.cell.cell import engine_config
    from bridge.core import config

    lines = kamailio.listen_lines(["udp:10.99.0.2:5060", "tcp:10.99.0.2:5060", "tls:10.99.0.2:5061"],
                                  "udp:127.0.0.1:6060", "192.0.2.1")
    assert lines.splitlines() == ["listen=udp:10.99.0.2:5060 advertise 192.0.2.1:5060",
                                  "listen=tcp:10.99.0.2:5060 advertise 192.0.2.1:5060",
                                  "listen=tls:10.99.0.2:5061 advertise 192.0.2.1:5061", "listen=udp:127.0.0.1:6060"]
    assert kamailio.listen_lines(["udp:0.0.0.0:5060"], "udp:127.0.0.1:6060") == \
        "listen=udp:0.0.0.0:5060\nlisten=udp:127.0.0.1:6060"
    with pytest.raises(ValueError):
        kamailio.listen_lines(["udp:10.99.0.2:5060"], "udp:127.0.0.1:6060", "192.0.2.1\nlisten=udp:1.2.3.4:5")
    # rtpengine behind NAT: the public address for trunks only, the cells get its own (no hairpin)
    edge = kamailio.MediaEdge("rtpengine", "10.99.0.2", "192.0.2.1", 7000, (7002, 7038))
    assert [a for a in edge.command("/run") if a.startswith("--interface")] == \
        ["--interface=internal/10.99.0.2", "--interface=external/10.99.0.2!192.0.2.1"]
    to_cell, to_trunk = kamailio.edge_flags("off", ["PCMU"], nat=True)
    assert to_cell.endswith("direction=external direction=internal") and \
        to_trunk.endswith("direction=internal direction=external")
    assert "direction" not in "".join(kamailio.edge_flags("off", ["PCMU"]))

    def box(sip: str) -> Supervisor:
        path = tmp_path / "box.toml"
        path.write_text(f'data_dir = "{tmp_path}"\n[sip]\nlisten = "10.99.0.2:5060"\n{sip}')
        return Supervisor(config.load(str(path), environ={}), 2, str(path))

    plain = box("")                                # no NAT: RTP still binds the public side, not loopback
    assert plain._nat_env() == {"TRUNKLINE_CELL_RTP_HOST": "10.99.0.2"}
    assert "advertise" not in plain.render_front()[0]
    cfg = engine_config(config.load(None, environ={}))
    assert (cfg.public_address, cfg.media_public_address, cfg.rtp_host) == ("", "", "")

    natted = box('public_address = "192.0.2.1"\n')
    assert "listen=udp:10.99.0.2:5060 advertise 192.0.2.1:5060" in natted.render_front()[0]
    env = natted._nat_env()
    assert env == {"TRUNKLINE_SIP_PUBLIC_ADDRESS": "", "TRUNKLINE_SIP_MEDIA_PUBLIC_ADDRESS": "192.0.2.1",
                   "TRUNKLINE_CELL_RTP_HOST": "10.99.0.2"}
    for k, v in env.items():                       # what the supervisor hands a cell process
        monkeypatch.setenv(k, v)
    cell = engine_config(config.load(str(tmp_path / "box.toml"), {"sip.listen": "127.0.0.1:5061"}))
    assert (cell.host, cell.public_address, cell.media_public_address, cell.rtp_host) == \
        ("127.0.0.1", "", "192.0.2.1", "10.99.0.2")
    split = box('public_address = "192.0.2.1"\nmedia_public_address = "192.0.2.2"\n')
    assert split._nat_env()["TRUNKLINE_SIP_MEDIA_PUBLIC_ADDRESS"] == "192.0.2.2"


# -- slow: a real NAT -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def natbox(tmp_path_factory):
    yield from _natbox(tmp_path_factory.mktemp("nat"))


@pytest.fixture(scope="module")
def natedge(tmp_path_factory):
    """The same NAT, with the trunk's media through rtpengine at the edge (``codecs`` on the trunk,
    as ``srtp`` or Opus put it there): rtpengine binds the box's private address, advertises the
    public one, and the router forwards its port range."""
    edge = next_ports()["sip"]
    yield from _natbox(tmp_path_factory.mktemp("natedge"), 'codecs = ["PCMU"]\n',
                       f'rtpengine_ng_port = {edge}\nrtpengine_ports = "{edge + 2}-{edge + 38}"\n',
                       [("udp", f"{edge + 2}:{edge + 38}")], tag="e")


def _natbox(tmp: Path, trunk_extra: str = "", cells_extra: str = "", forward: list | None = None, tag: str = "",
            tls: dict | None = None):
    """``tls``: {"cert", "key", "ca"} PEM paths: the front listens for TLS on the box's address at
    SIP port + 5 (``box.tls_port``), forwarded by the router like the rest."""
    box = BoxProcess(tmp, 2, cells_extra=cells_extra)  # ports from this suite's TEST_PORT_BLOCK
    sip_port = box.ports["sip"]
    rtp = box.cmd[box.cmd.index("--rtp-ports") + 1]
    uas_port = box.ports["sipp"] + 1
    sip_tls = ""
    if tls:
        box.tls_port = sip_port + 5
        forward = [*(forward or []), ("tcp", str(box.tls_port))]
        sip_tls = (f'tls_listen = "{BOX_IP}:{box.tls_port}"\ntls_cert = "{tls["cert"]}"\ntls_key = "{tls["key"]}"\n'
                   f'tls_ca = "{tls["ca"]}"\n')
    config = (f'drain_timeout = 5\n[models]\nload = "never"\n[media]\nclock_rate = 8000\n'
              f'[sip]\npublic_address = "{PUBLIC_IP}"\n{sip_tls}'
              f'[[trunks]]\nname = "carrier"\naddress = "sip:{CARRIER_IP}:{uas_port}"\nallow = ["{CARRIER_IP}/32"]\n'
              + trunk_extra)
    box.config_path.write_text(config + box.config_path.read_text())
    nat = Nat(forward=[("udp", str(sip_port)), ("udp", rtp.replace("-", ":")), *(forward or [])],
              tag=f"{os.getpid()}{tag}")                # namespaces of its own: both boxes may be up at once
    box.cmd[box.cmd.index("--sip") + 1] = f"{BOX_IP}:{sip_port}"
    box.cmd = [*exec_prefix(nat.box), *box.cmd]       # `trunkline serve --cells 2` inside the box's namespace
    try:
        nat.open()
    except NetnsUnavailable as exc:
        pytest.skip(f"cannot build the NAT with network namespaces here: {exc}")
    try:
        box.start(wait=False)
        deadline = time.monotonic() + 60
        while True:
            assert box.alive(), box.log_path.read_text()[-3000:]
            try:
                if in_netns(nat.box, box.http_get, "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "box not healthy:\n" + box.log_path.read_text()[-3000:]
            time.sleep(0.3)
        api = Api(box, create_key(box.data))
        yield nat, box, api, uas_port
    finally:
        try:
            if box.proc is not None:
                box.stop()
        finally:
            nat.close()
            assert not nat.exists(), "network namespaces left behind"


def _api(nat: Nat, api: Api, method: str, path: str, body=None):
    """The box API listens on 127.0.0.1 inside the box's namespace."""
    return in_netns(nat.box, api.call, method, path, body)


def _ended(box: BoxProcess, match) -> dict:
    """The first call_ended event of either cell for which ``match(event)`` holds."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for e in box.cell_events(0, "call_ended") + box.cell_events(1, "call_ended"):
            if match(e):
                return e
        time.sleep(0.1)
    raise AssertionError("no such call_ended; cell logs:\n" + "".join(
        (box.run_dir / f"cell{i}.log").read_text()[-2000:] for i in range(2)))


@pytest.mark.slow
@pytest.mark.sample
def test_inbound_call_through_nat_echoes_latches_and_hides_the_private_network(natbox, tmp_path):
    nat, box, api, _ = natbox
    sdp_port = box.ports["rtp_peer"]
    peer = in_netns(nat.carrier, RtpPeer, sdp_port, CARRIER_IP)
    moved = in_netns(nat.carrier, RtpPeer, sdp_port + 6, CARRIER_IP)    # the carrier's NAT picked another port
    call = _carrier_sipp(nat, "call_pcmu.xml", f"{PUBLIC_IP}:{box.ports['sip']}", tmp_path / "in", "-d", "7000",
                         local_port=box.ports["sipp"], rtpport=sdp_port)
    try:
        remote = peer.wait_remote(15)
        assert remote[0] == PUBLIC_IP, f"RTP came from {remote}, not the public address"
        first = _noise(1, 100)
        peer.stream(first)
        peer.collect(0.3)
        assert _echoed(first, peer) >= 0.9 * len(first), "the echo did not come back bit-exact through the NAT"
        # symmetric RTP: the carrier's NAT rebinds and the same RTP stream (SSRC, sequence, timestamps)
        # now comes from another port than its SDP names. pjmedia discards the first 10 packets from the
        # new source (its NAT probation), then sends there; collect long enough for a slow machine's
        # jitter buffer to play the tail out.
        moved.remote, moved.ssrc, moved.seq, moved.ts = remote, peer.ssrc, peer.seq, peer.ts
        second = _noise(2, 100)
        moved.stream(second)
        moved.collect(1.0)
        back = b"".join(p for _, pt, _, p in moved.received if pt == 0)
        missing = [i for i, p in enumerate(second) if p not in back]
        assert len(missing) <= 30 and _echoed(second, peer) == 0, \
            f"the box kept sending to the SDP's port: no latching onto the RTP's source (missing {missing})"
        out, _ = call.communicate(timeout=40)
        assert call.returncode == 0, out.decode()[-3000:]             # SIPp's BYE got its 200 OK
    finally:
        peer.close()
        moved.close()
        if call.poll() is None:
            call.kill()
    ended = _ended(box, lambda e: e["direction"] == "inbound")
    assert ended["reason"] == "remote bye" and ended["result"] == "answered", ended
    got = _wire_check(sipp_file(tmp_path / "in", "_messages.log"))
    ok = next(m for m in got if "SIP/2.0 200 OK" in m and "INVITE" in m and "v=0" in m)
    assert f"c=IN IP4 {PUBLIC_IP}" in ok, ok                    # SDP: the public media address
    assert re.search(rf"^o=.* IN IP4 {re.escape(PUBLIC_IP)}\s*$", ok, re.M), ok
    assert re.search(rf"^Record-Route: <sip:{re.escape(PUBLIC_IP)}:{box.ports['sip']}\b", ok, re.M | re.I), ok


@pytest.mark.slow
def test_inbound_call_through_nat_with_rtpengine_at_the_edge(natedge, tmp_path):
    """Media through rtpengine behind the NAT: the carrier is told the public address and an
    rtpengine port, its RTP from another port than its SDP names (its own NAT) is answered there,
    the echo is bit-exact, and nothing the carrier receives names the private network."""
    nat, box, api, _ = natedge
    edge = box.config_path.read_text()
    lo, hi = map(int, re.search(r'rtpengine_ports = "(\d+)-(\d+)"', edge).groups())
    sdp_port = box.ports["rtp_peer"]
    announced = in_netns(nat.carrier, RtpPeer, sdp_port, CARRIER_IP)     # what its SDP names: never used
    peer = in_netns(nat.carrier, RtpPeer, sdp_port + 8, CARRIER_IP)       # where its RTP really comes from
    call = _carrier_sipp(nat, "call_pcmu.xml", f"{PUBLIC_IP}:{box.ports['sip']}", tmp_path / "in", "-d", "6000",
                         local_port=box.ports["sipp"], rtpport=sdp_port)
    try:
        deadline = time.monotonic() + 15
        while "v=0" not in sipp_file(tmp_path / "in", "_messages.log").split("SIP/2.0 200 OK", 1)[-1]:
            assert time.monotonic() < deadline and call.poll() is None, "no answer to the INVITE"
            time.sleep(0.1)
        answer = sipp_file(tmp_path / "in", "_messages.log").split("SIP/2.0 200 OK", 1)[1]
        port = int(re.search(r"^m=audio (\d+)", answer, re.M).group(1))
        assert f"c=IN IP4 {PUBLIC_IP}" in answer and lo <= port <= hi, answer[:1500]
        peer.remote = (PUBLIC_IP, port)
        audio = _noise(4, 100)
        peer.stream(audio)
        peer.collect(1.0)
        announced.collect(0.1)
        assert _echoed(audio, peer) >= 0.8 * len(audio), \
            f"the echo did not come back to the RTP's source through the NAT ({_echoed(audio, peer)} of 100)"
        assert _echoed(audio, announced) == 0
        out, _ = call.communicate(timeout=40)
        assert call.returncode == 0, out.decode()[-3000:]
    finally:
        peer.close()
        announced.close()
        if call.poll() is None:
            call.kill()
    _wire_check(sipp_file(tmp_path / "in", "_messages.log"))


@pytest.mark.slow
def test_outbound_call_through_nat_and_the_box_hangs_up(natbox, tmp_path):
    nat, box, api, uas_port = natbox
    rtp_port = box.ports["rtp_peer"] + 20
    peer = in_netns(nat.carrier, RtpPeer, rtp_port, CARRIER_IP)
    uas = _carrier_sipp(nat, "uas_answer_rr.xml", "", tmp_path / "out", local_port=uas_port, rtpport=rtp_port)
    try:
        time.sleep(0.5)
        status, body, _ = _api(nat, api, "POST", "/v1/calls", {"to": "5550100", "trunk": "carrier", "app": "echo"})
        assert status == 201, body
        call_id = body["id"]
        remote = peer.wait_remote(15)
        assert remote[0] == PUBLIC_IP, f"RTP came from {remote}, not the public address"
        audio = _noise(3, 100)
        peer.stream(audio)
        peer.collect(0.3)
        assert _echoed(audio, peer) >= 0.9 * len(audio), "the echo did not come back bit-exact through the NAT"
        status, body, _ = _api(nat, api, "POST", f"/v1/calls/{call_id}/hangup")
        assert status == 200, body
        out, _ = uas.communicate(timeout=30)
        assert uas.returncode == 0, out.decode()[-3000:]              # the box's BYE reached the carrier
    finally:
        peer.close()
        if uas.poll() is None:
            uas.kill()
    ended = _ended(box, lambda e: e["call_id"] == call_id)
    assert ended["direction"] == "outbound" and ended["result"] == "answered", ended
    assert ended["reason"] == "api hangup", ended
    got = _wire_check(sipp_file(tmp_path / "out", "_messages.log"))
    invite = next(m for m in got if re.search(r"^\s*INVITE sip:", m, re.M))
    top_via = next(line for line in invite.splitlines() if line.startswith("Via:"))
    assert f"{PUBLIC_IP}:{box.ports['sip']}" in top_via, invite            # Kamailio advertises the public address
    assert f"c=IN IP4 {PUBLIC_IP}" in invite, invite
    assert re.search(rf"^From: .*sip:trunkline@{re.escape(PUBLIC_IP)}\b", invite, re.M), invite   # the box's identity
    bye = next(m for m in got if re.search(r"^\s*BYE sip:", m, re.M))
    assert f"{PUBLIC_IP}:{box.ports['sip']}" in next(line for line in bye.splitlines() if line.startswith("Via:"))


@pytest.mark.slow
def test_carrier_keepalive_options_to_the_public_address_are_answered(natbox):
    """A carrier's OPTIONS keepalive names the public address (sip:192.0.2.1:PORT): the front
    counts its advertised address as its own and answers 200, as on a box with a public IP."""
    from sipwire import UdpPeer, request, status_of
    nat, box, _, _ = natbox
    peer = in_netns(nat.carrier, UdpPeer, CARRIER_IP, box.ports["sipp"] + 3)
    try:
        target = f"{PUBLIC_IP}:{box.ports['sip']}"
        msg = request("OPTIONS", target, peer.addr).replace(f"OPTIONS sip:100@{target}".encode(),
                                                             f"OPTIONS sip:{target}".encode(), 1)
        peer.send(msg, (PUBLIC_IP, box.ports["sip"]))
        got = peer.gather(3.0, until_final=True)
    finally:
        peer.close()
    assert [status_of(m) for m in got] == [200], got
    assert not any(PRIVATE.search(m.decode(errors="replace")) for m in got), got



@pytest.mark.slow
def test_srtp_call_over_tls_through_nat(tmp_path_factory, tmp_path):
    """An encrypted trunk behind the NAT: a pjsua2 carrier (TLS + SDES SRTP, mandatory on its side)
    calls the box's public address over TLS; the front terminates TLS, rtpengine behind the NAT
    terminates SRTP and advertises the public address; the carrier hears its own tone back (the
    echo cell), so SRTP crossed the router both ways on the advertised address and port."""
    import wave

    from tls_peer import Peer, make_ca
    d = tmp_path_factory.mktemp("natsrtp")
    ca = make_ca(d / "pki")
    (cert, key), (far_cert, far_key) = ca.issue("box"), ca.issue("far")
    edge = next_ports()["sip"]
    gen = _natbox(d, 'transport = "tls"\nsrtp = "mandatory"\n',
                  f'rtpengine_ng_port = {edge}\nrtpengine_ports = "{edge + 2}-{edge + 38}"\n',
                  [("udp", f"{edge + 2}:{edge + 38}")], tag="s", tls={"cert": cert, "key": key, "ca": ca.ca})
    nat, box, api, far_port = next(gen)
    try:
        t = np.arange(8000 * 6) / 8000
        wav, rec = tmp_path / "tone.wav", tmp_path / "heard.wav"
        with wave.open(str(wav), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes((8000 * np.sin(2 * np.pi * 700 * t)).astype("<i2").tobytes())
        far = in_netns(nat.carrier, Peer, [
            "call", "--host", CARRIER_IP, "--listen", far_port, "--rtp", box.ports["rtp_peer"], "--cert", far_cert,
            "--key", far_key,
            "--ca", ca.ca, "--uri", f"sip:100@{PUBLIC_IP}:{box.tls_port};transport=tls", "--wav", wav,
            "--record", rec, "--seconds", "4", "--srtp", "mandatory"], tmp_path / "far.log")
        res = far.result(60)
        assert res.get("confirmed") and res.get("media"), (res, box.log_path.read_text()[-3000:])
        with wave.open(str(rec)) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(float)[4000:]
        assert len(pcm) > 8000, "nothing recorded at the carrier"
        spec = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
        rms, freq = float(np.sqrt((pcm ** 2).mean())), float(np.fft.rfftfreq(len(pcm), 1 / 8000)[spec.argmax()])
        assert rms > 500 and abs(freq - 700) < 20, f"the carrier did not hear its tone back: rms {rms:.0f}, {freq:.0f} Hz"
        ended = _ended(box, lambda e: e["direction"] == "inbound")
        assert ended["result"] == "answered", ended
    finally:
        gen.close()
