"""SIP over TLS at the edge (issue 12): the Kamailio front terminates TLS, cells never see it.

Real peers on loopback only: a throwaway CA, server and client certificates made with
``openssl`` in the test's tmp dir; the generated front (real Kamailio + tls module);
``openssl s_client`` for protocol versions; Python's ssl module as a bare TLS client; a
pjsua2 far end (tests/tls_peer.py, its own process) calling in and answering outbound
calls over TLS; tcpdump on ``lo`` for the trunk side of the wire.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import ssl
import struct
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from support import Api, BoxProcess, create_key, next_ports
from tls_peer import Peer, TlsFront, make_ca, tls_options

pytestmark = [pytest.mark.skipif(shutil.which("kamailio") is None, reason="kamailio is not installed"),
              pytest.mark.xdist_group("test_tls_front")]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """CA, the box's certificate, a far end's certificate (same CA) and a rogue one (another CA)."""
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    rogue_ca = make_ca(d, "rogue-ca")
    out = {"ca": ca.ca, "box": ca.issue("box"), "far": ca.issue("far"), "rogue": rogue_ca.issue("rogue")}
    return out


# -- config -----------------------------------------------------------------------------------------
def _load(tmp_path, text: str):
    from bridge.core.config import load
    p = tmp_path / "t.toml"
    p.write_text(text)
    return load(str(p), environ={})


def _sip(pki, **kw) -> str:
    vals = {"tls_listen": "127.0.0.1:5061", "tls_cert": str(pki["box"][0]), "tls_key": str(pki["box"][1]),
            "tls_ca": str(pki["ca"]), **kw}
    return "[sip]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"') if not isinstance(v, bool)
                               else f"{k} = {str(v).lower()}\n" for k, v in vals.items())


def test_tls_config_is_checked_with_clear_errors(tmp_path, pki):
    from bridge.core.config import ConfigError
    ok = _load(tmp_path, _sip(pki) + '[[trunks]]\nname = "c"\naddress = "sip:127.0.0.1:5071"\ntransport = "tls"\n')
    assert ok.transport("c") == "tls" and ok.runs_front() and ok.raw["sip"]["tls_verify"] is True
    assert not _load(tmp_path, "").runs_front()                                # default: as today
    assert _load(tmp_path, "").transport("local") == "udp"
    cases = [
        (_sip(pki, tls_cert=""), "sip.tls_cert: sip.tls_listen needs sip.tls_cert and sip.tls_key"),
        (_sip(pki, tls_cert=str(tmp_path / "nope.crt")), "sip.tls_cert: " + str(tmp_path / "nope.crt")
         + " does not exist"),
        (_sip(pki, tls_key=str(pki["rogue"][1])), "sip.tls_key: "),            # not the certificate's key
        (_sip(pki, tls_key=str(pki["ca"])), "sip.tls_key: "),                  # not a key at all
        (_sip(pki, tls_ca=""), "sip.tls_ca: peer verification (sip.tls_verify = true) needs the CA file"),
        (_sip(pki, tls_ca=str(pki["box"][1])), "sip.tls_ca: "),                # a key, not a certificate
        (_sip(pki, tls_listen="nowhere"), "sip.tls_listen: expected HOST:PORT"),
        (_sip(pki, tls_listen="0.0.0.0:5060"), "sip.tls_listen: 0.0.0.0:5060 uses the port of sip.listen"),
        ('[[trunks]]\nname = "c"\naddress = "sip:127.0.0.1:5071"\ntransport = "tls"\n',
         "trunks: trunk 'c' has transport = \"tls\" and needs sip.tls_listen"),
        ('[[trunks]]\nname = "c"\ntransport = "quic"\n', "trunks[0].transport: expected one of udp, tcp, tls"),
    ]
    for text, error in cases:
        with pytest.raises(ConfigError) as exc:
            _load(tmp_path, text)
        assert str(exc.value).startswith(error), (text, str(exc.value))
    unreadable = tmp_path / "locked.key"
    unreadable.write_bytes(Path(pki["box"][1]).read_bytes())
    unreadable.chmod(0)
    if os.geteuid() != 0:                  # root reads anything
        with pytest.raises(ConfigError, match="sip.tls_key: .* is not readable"):
            _load(tmp_path, _sip(pki, tls_key=str(unreadable)))
    no_verify = _load(tmp_path, _sip(pki, tls_ca="", tls_verify=False))
    assert no_verify.raw["sip"]["tls_verify"] is False


def test_cli_runs_the_front_for_tls_even_with_one_cell(tmp_path, pki, monkeypatch):
    """`serve` without --cells starts the supervisor when TLS is configured; a cell (TRUNKLINE_CELL) never does."""
    from bridge import cli
    from bridge.box import supervisor
    from bridge.core import logs, perms
    monkeypatch.setattr(perms, "secure_umask", lambda: None)     # no process-wide side effects in pytest
    monkeypatch.setattr(logs, "setup", lambda *a, **k: None)
    started = []

    class Fake:
        def __init__(self, cfg, n, path):
            started.append(n)

        async def run(self):
            return 0
    monkeypatch.setattr(supervisor, "Supervisor", Fake)
    cfgfile = tmp_path / "c.toml"
    cfgfile.write_text(_sip(pki) + '[models]\nload = "never"\n')
    monkeypatch.delenv("TRUNKLINE_CELL", raising=False)
    assert cli.main(["serve", "--config", str(cfgfile), "--data-dir", str(tmp_path / "d")]) == 0
    assert started == [1]
    monkeypatch.setenv("TRUNKLINE_CELL", "0")                      # a cell of that box: no front of its own
    monkeypatch.setattr("bridge.cell.run.run_serve", lambda cfg: _done())
    assert cli.main(["serve", "--config", str(cfgfile), "--data-dir", str(tmp_path / "d")]) == 0
    assert started == [1]


async def _done() -> int:
    return 0


def test_rendered_tls_profiles(pki, tmp_path):
    from bridge.box import kamailio
    tls = kamailio.Tls("127.0.0.1:5061", str(pki["box"][0]), str(pki["box"][1]), str(pki["ca"]),
                       server_name="sip.carrier.example")
    text = kamailio.tls_cfg(tls)
    server, client = text.split("[server:default]")[1].split("[client:default]")
    for part in (server, client):
        assert "method = TLSv1.2+" in part and f"ca_list = {pki['ca']}" in part
        assert "verify_certificate = yes" in part and "require_certificate = yes" in part
    assert "server_name = sip.carrier.example" in client
    lax = kamailio.tls_cfg(kamailio.Tls("127.0.0.1:5061", "/c", "/k", "", verify=False))
    assert "verify_certificate = yes" not in lax and "ca_list" not in lax
    with pytest.raises(ValueError):
        kamailio.render(["udp:127.0.0.1:5060"], str(tmp_path), [], 5, trunks=[("sip:127.0.0.1:5070", [])],
                        transports=["tls"])
    cfg = kamailio.render(["udp:127.0.0.1:5060"], str(tmp_path), [], 5, trunks=[("sip:127.0.0.1:5070", [])],
                          tls=tls, transports=["tls"])
    assert "listen=tls:127.0.0.1:5061" in cfg and 'loadmodule "tls.so"' in cfg
    assert 'if ($var(trunk) == "t0") { if (!has_totag() || $nh(P) != "tls") route(VIATLS); return 1; }' in cfg
    tcp = kamailio.render(["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"], str(tmp_path), [], 5,
                          trunks=[("sip:127.0.0.1:5070", []), ("sip:127.0.0.1:5080", [])], transports=["udp", "tcp"])
    assert 'if ($var(trunk) == "t1") { if (!has_totag() || $nh(P) != "tcp") route(VIATCP); return 1; }' in tcp
    assert '"t0")' not in tcp.split("route[TRUNKTRANSPORT]")[1].split("}")[0]
    plain = kamailio.render(["udp:127.0.0.1:5060"], str(tmp_path), [], 5)
    assert "tls.so" not in plain and "listen=tls" not in plain


def test_srtp_front_config_is_accepted_by_kamailio(pki, tmp_path):
    """With SRTP trunks the rendered config loads rtpengine and defines WITH_SRTP; Kamailio parses it."""
    from bridge.box import kamailio
    tls = kamailio.Tls("127.0.0.1:5061", str(pki["box"][0]), str(pki["box"][1]), str(pki["ca"]))
    media = kamailio.MediaEdge("rtpengine", "127.0.0.1", "", 2223, (20000, 20099))
    trunks = [("sip:127.0.0.1:5070", ["127.0.0.1/32"]), ("sip:127.0.0.2:5070", ["127.0.0.2/32"]), ("", [])]
    with pytest.raises(ValueError):
        kamailio.render(["udp:127.0.0.1:5060"], str(tmp_path), [], 5, trunks=trunks, tls=tls,
                        transports=["tls", "tls", "udp"], srtp=["mandatory", "optional", "off"])
    text = kamailio.render(["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"], str(tmp_path), [], 5, trunks=trunks,
                           tls=tls, transports=["tls", "tls", "udp"], srtp=["mandatory", "optional", "off"],
                           media=media, cell_socket="udp:127.0.0.1:5062")
    assert "#!define WITH_SRTP" in text and 'modparam("rtpengine", "rtpengine_sock", "udp:127.0.0.1:2223")' in text
    assert '{ $var(srtp) = "mandatory"; return 1; }' in text and '{ $var(srtp) = "optional"; return 1; }' in text
    assert '"t2") { $var(srtp)' not in text
    path = kamailio.write(str(tmp_path), text, kamailio.dispatcher_list([("127.0.0.1", 5063)], 3,
                                                                        socket="udp:127.0.0.1:5062"), tls)
    r = subprocess.run(["kamailio", "-c", "-f", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--table=-1" in media.command(str(tmp_path))            # userspace only, no kernel module


# -- the front on its own ------------------------------------------------------------------------
@pytest.fixture
def tls_front(tmp_path, pki):
    f = TlsFront(tmp_path, pki)
    yield f
    f.close()


def test_front_answers_a_verified_client_over_tls(tls_front, pki):
    reply = tls_options(tls_front.tls_port, pki, pki["far"])
    assert reply.startswith(b"SIP/2.0 200 "), reply


def test_front_refuses_a_client_certificate_not_signed_by_the_ca(tls_front, pki):
    for cert in (pki["rogue"], None):                # another CA's certificate, and none at all
        try:
            reply = tls_options(tls_front.tls_port, pki, cert)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            reply = b""
        assert reply == b"", (cert, reply)
    assert "certificate" in (tls_front.run_dir / "kamailio.log").read_text(errors="replace").lower()


def test_without_verification_any_client_certificate_is_accepted(tmp_path, pki):
    """The control for the test above: the refusal comes from tls_verify."""
    f = TlsFront(tmp_path, pki, verify=False)
    try:
        assert tls_options(f.tls_port, pki, pki["rogue"]).startswith(b"SIP/2.0 200 ")
    finally:
        f.close()


def _s_client(port: int, pki, *flags: str) -> subprocess.CompletedProcess:
    # SECLEVEL=0 lets this client offer TLS 1.0/1.1 at all: the refusal must come from the front
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-cert", str(pki["far"][0]),
                           "-key", str(pki["far"][1]), "-CAfile", str(pki["ca"]), "-cipher", "DEFAULT@SECLEVEL=0",
                           *flags], input=b"", capture_output=True, timeout=20)


def test_front_refuses_tls_1_0_and_1_1(tls_front, pki):
    for flag in ("-tls1_1", "-tls1"):
        r = _s_client(tls_front.tls_port, pki, flag)
        out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
        assert r.returncode != 0 and "Cipher is (NONE)" in out, (flag, out[-1500:])
        assert "alert protocol version" in out, out[-1500:]        # the server said no, not the client
    r = _s_client(tls_front.tls_port, pki, "-tls1_2")
    out = r.stdout.decode(errors="replace")
    assert "Protocol  : TLSv1.2" in out or "TLSv1.2" in out.split("New, ")[-1][:40], out[-1500:]


def test_the_tls_1_1_client_is_real(tmp_path, pki, monkeypatch):
    """The control for the test above: the same client gets TLS 1.1 from a front whose
    profile allows it (TLSv1+, security level 0), so the refusal is the rendered profile's."""
    from bridge.box import kamailio
    real = kamailio.tls_cfg
    monkeypatch.setattr(kamailio, "tls_cfg", lambda tls: real(tls).replace("TLSv1.2+", "TLSv1+")
                        .replace("!3DES", "!3DES:@SECLEVEL=0"))
    f = TlsFront(tmp_path, pki)
    try:
        r = _s_client(f.tls_port, pki, "-tls1_1")
        assert r.returncode == 0 and "Protocol  : TLSv1.1" in r.stdout.decode(errors="replace")
    finally:
        f.close()


def test_tls_worker_settings_follow_the_kamailio_version():
    from bridge.box import kamailio
    assert kamailio.tls_process_settings((5, 6, 3), 4) == (
        "# Kamailio < 5.7.4 with OpenSSL 3: one TCP/TLS worker (kamailio issue #3791)\n", 1)
    assert kamailio.tls_process_settings((5, 7, 4), 4) == ("tls_threads_mode=1\n", 4)
    assert kamailio.tls_process_settings((5, 8, 1), 4) == ("tls_threads_mode=2\n", 4)
    assert kamailio.kamailio_version() >= (5, 6, 0)


@pytest.mark.slow
def test_concurrent_handshakes_do_not_corrupt_the_front(tmp_path, pki):
    """Kamailio 5.6 + OpenSSL 3 corrupts shared memory when two processes do TLS at once
    (kamailio #3791). Two clients doing back-to-back handshakes for 8 s: the front stays up
    and logs no memory-corruption CRITICAL."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
    import tls as bench
    f = TlsFront(tmp_path, pki, children=2)
    try:
        p = {"ca": str(pki["ca"]), "far": tuple(map(str, pki["far"]))}
        r = bench.measure(f, p, "1.3", 2, False, 8.0)
        assert f.proc.poll() is None
        log = (f.run_dir / "kamailio.log").read_text(errors="replace")
        assert "CRITICAL" not in log and "BUG" not in log, log[-2000:]
        assert r["handshakes"] > 20 and r["failed"] <= 1, r
    finally:
        f.close()


# -- the whole box -------------------------------------------------------------------------------
def _tone(path: Path, seconds: float = 6.0, freq: float = 700.0) -> None:
    t = np.arange(int(8000 * seconds)) / 8000
    pcm = (8000 * np.sin(2 * math.pi * freq * t)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(pcm.tobytes())


def _dominant(path: Path) -> tuple[float, float]:
    """(rms, dominant frequency in Hz) of a recording, its first 0.5 s left out."""
    with wave.open(str(path)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(float)[4000:]
    if len(pcm) < 4000:
        return 0.0, 0.0
    spec = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
    return float(np.sqrt((pcm ** 2).mean())), float(np.fft.rfftfreq(len(pcm), 1 / 8000)[spec.argmax()])


class Capture:
    """tcpdump on ``lo`` for the given TCP/UDP ports (the trunk side of the front)."""

    def __init__(self, path: Path, ports: list[int]):
        self.path = path
        expr = " or ".join(f"port {p}" for p in ports)
        self.proc = subprocess.Popen(["tcpdump", "-i", "lo", "-U", "--immediate-mode", "-s", "0", "-w", str(path), expr],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (path.exists() and path.stat().st_size >= 24):
            time.sleep(0.05)
        time.sleep(0.3)

    def stop(self) -> list[bytes]:
        """TCP/UDP payloads captured (IPv4 over the loopback link type)."""
        time.sleep(0.5)
        self.proc.terminate()
        self.proc.wait(10)
        data = self.path.read_bytes()
        link = struct.unpack("<I", data[20:24])[0]
        off, out = 24, []
        while off + 16 <= len(data):
            incl = struct.unpack("<I", data[off + 8:off + 12])[0]
            pkt = data[off + 16:off + 16 + incl]
            off += 16 + incl
            ip = pkt[14:] if link == 1 else pkt[4:] if link == 0 else pkt
            if not ip or ip[0] >> 4 != 4:
                continue
            ihl = (ip[0] & 15) * 4
            if ip[9] == 6:
                l4 = ip[ihl:]
                out.append(l4[(l4[12] >> 4) * 4:])
            elif ip[9] == 17:
                out.append(ip[ihl + 8:])
        return [p for p in out if p]


def _box_config(pki, tls_port: int, far_port: int, transport: str = "tls") -> str:
    return (_sip(pki, tls_listen=f"127.0.0.1:{tls_port}") + '[models]\nload = "never"\n'
            + f'[[trunks]]\nname = "carrier"\naddress = "sip:127.0.0.1:{far_port}"\n'
              f'allow = ["127.0.0.1/32"]\ntransport = "{transport}"\n')


def _far(tmp_path: Path, pki, command: str, port: int, rtp: int, *extra: str) -> Peer:
    return Peer([command, "--listen", port, "--rtp", rtp, "--cert", pki["far"][0], "--key", pki["far"][1],
                 "--ca", pki["ca"], "--verify", *extra], tmp_path / f"far-{command}-{port}.log")


def _no_clear_sip(payloads: list[bytes]) -> None:
    assert payloads, "nothing captured on the trunk side"
    joined = b"\n".join(payloads)
    for marker in (b"SIP/2.0", b"INVITE sip:", b"Call-ID:", b"m=audio"):
        assert marker not in joined, f"clear SIP on the trunk side: {marker!r}"
    assert any(p[:1] == b"\x17" and p[1:3] == b"\x03\x03" for p in payloads), "no TLS application data seen"


@pytest.mark.slow
@pytest.mark.sample
def test_inbound_tls_call_is_echoed_and_the_wire_is_encrypted(tmp_path, pki):
    """A pjsua2 far end calls the box over TLS (client certificate, server verified); the
    front hands the call to an echo cell; the far end hears its own tone; tcpdump of the
    trunk side shows TLS records and no clear SIP."""
    b = BoxProcess(tmp_path, 1, "", cells_extra=f"front_port = {next_ports()['sip']}\n")
    tls_port, far_port, far_rtp = b.ports["sip"] + 5, b.ports["sip"] + 6, b.ports["rtp_lo"]
    b.config_path.write_text(_box_config(pki, tls_port, far_port) + b.config_path.read_text())
    b.cmd.remove("--cells"), b.cmd.remove("1")              # `serve` alone: TLS brings the front
    wav, rec = tmp_path / "tone.wav", tmp_path / "heard.wav"
    _tone(wav)
    cap = None
    try:
        b.start()
        cap = Capture(tmp_path / "trunk.pcap", [tls_port, far_port])
        far = _far(tmp_path, pki, "call", far_port, far_rtp, "--uri", f"sip:100@127.0.0.1:{tls_port};transport=tls",
                   "--wav", wav, "--record", rec, "--seconds", "4")
        res = far.result(60)
        payloads = cap.stop()
        cap = None
        assert res["confirmed"] and res["media"], res
        rms, freq = _dominant(rec)
        assert rms > 500 and abs(freq - 700) < 20, (rms, freq)       # its own tone came back
        _no_clear_sip(payloads)
        assert (b.run_dir / "tls.cfg").exists() and (b.run_dir / "cell0.log").exists()
    finally:
        if cap:
            cap.stop()
        b.stop(40) if b.alive() else None


@pytest.mark.slow
@pytest.mark.parametrize("srtp", ["off", "optional", "mandatory"])
def test_outbound_call_reaches_a_tls_trunk(tmp_path, pki, srtp):
    """POST /v1/calls to a transport = "tls" trunk: the cell sends to the front as today,
    the front opens TLS (verifying the trunk's certificate) to a pjsua2 UAS that answers
    and hears its tone back from the echo cell. With srtp = "mandatory" the UAS accepts
    SRTP only, with "optional" (an OSRTP offer) it takes SRTP when offered; then every RTP
    packet on its side carries the SRTP auth tag (12 + 160 + 10 bytes, plain: 172)."""
    b = BoxProcess(tmp_path, 2, "", cells_extra=f"front_port = {next_ports()['sip']}\n")
    edge = next_ports()["sip"]
    tls_port, far_port, far_rtp = b.ports["sip"] + 5, b.ports["sip"] + 6, b.ports["rtp_lo"]
    config = _box_config(pki, tls_port, far_port) + b.config_path.read_text()
    if srtp != "off":
        config = (config.replace('transport = "tls"\n', f'transport = "tls"\nsrtp = "{srtp}"\n')
                  + f'rtpengine_ng_port = {edge}\nrtpengine_ports = "{edge + 2}-{edge + 38}"\n')
    b.config_path.write_text(config)
    wav, rec = tmp_path / "tone.wav", tmp_path / "heard.wav"
    _tone(wav)
    far, cap = None, None
    try:
        b.start()
        far = _far(tmp_path, pki, "answer", far_port, far_rtp, "--timeout", "40", "--wav", wav, "--record", rec,
                   "--srtp", srtp)
        far.wait_event("started")
        cap = Capture(tmp_path / "trunk.pcap", [tls_port, far_port, far_rtp])
        api = Api(b, create_key(b.data))
        status, body, _ = api.post("/v1/calls", {"to": "5551234", "trunk": "carrier", "app": "echo"})
        assert status == 201, body
        deadline = time.time() + 15
        while time.time() < deadline and api.get(f"/v1/calls/{body['id']}")[1]["state"] != "progressing":
            time.sleep(0.1)
        assert api.get(f"/v1/calls/{body['id']}")[1]["state"] == "progressing"      # answered
        time.sleep(4.0)
        assert api.post(f"/v1/calls/{body['id']}/hangup")[0] == 200
        res = far.result(20)
        payloads = cap.stop()
        cap = None
        assert res["confirmed"] and res["state"] is not None, res
        assert any(e["event"] == "incoming" for e in res["events"]), res
        rms, freq = _dominant(rec)
        assert rms > 500 and abs(freq - 700) < 20, (rms, freq)       # the echo cell sent its tone back
        _no_clear_sip([p for p in payloads if p[:1] in (b"\x16", b"\x17", b"\x15") or b"SIP/2.0" in p])
        sizes = _rtp_sizes(tmp_path / "trunk.pcap", far_rtp)
        assert len(sizes) > 100 and set(sizes) == {172 if srtp == "off" else 182}, sorted(set(sizes))
    finally:
        if far:
            far.kill()
        if cap:
            cap.stop()
        b.stop(40) if b.alive() else None


# -- SRTP at the edge (rtpengine) -------------------------------------------------------------------
def _rtp_sizes(pcap: Path, port: int) -> list[int]:
    """UDP payload sizes of packets to or from ``port`` in a capture."""
    data, out, off = pcap.read_bytes(), [], 24
    while off + 16 <= len(data):
        incl = struct.unpack("<I", data[off + 8:off + 12])[0]
        ip = data[off + 16 + 14:off + 16 + incl]
        off += 16 + incl
        if ip and ip[0] >> 4 == 4 and ip[9] == 17:
            ihl = (ip[0] & 15) * 4
            sport, dport = struct.unpack("!HH", ip[ihl:ihl + 4])
            if port in (sport, dport):
                out.append(len(ip) - ihl - 8)
    return out


def test_srtp_config_needs_tls(tmp_path, pki):
    from bridge.core.config import ConfigError
    with pytest.raises(ConfigError, match=r'trunks\[0\].srtp: SRTP keys \(SDES\) travel in the SIP messages'):
        _load(tmp_path, '[[trunks]]\nname = "c"\naddress = "sip:127.0.0.1:5071"\nsrtp = "mandatory"\n')
    cfg = _load(tmp_path, _sip(pki) + '[[trunks]]\nname = "c"\naddress = "sip:127.0.0.1:5071"\ntransport = "tls"\n'
                'srtp = "optional"\n')
    assert cfg.srtp_mode("c") == "optional"
    with pytest.raises(ConfigError, match="trunks.0..srtp: expected one of off, optional, mandatory"):
        _load(tmp_path, '[[trunks]]\nname = "c"\nsrtp = "yes"\n')


@pytest.mark.slow
def test_srtp_mandatory_trunk_hears_the_echo_and_refuses_plain_rtp(tmp_path, pki):
    """A pjsua2 far end with SRTP (SDES, mandatory on its side) calls a srtp = "mandatory"
    TLS trunk: rtpengine at the edge terminates SRTP, the echo cell gets plain RTP, the far
    end hears its tone; on the trunk side every RTP packet carries the SRTP auth tag
    (160-byte G.711 payload + 12 header + 10 tag) and no SIP is clear. A far end that
    offers plain RTP gets 488."""
    b = BoxProcess(tmp_path, 1, "", cells_extra=f"front_port = {next_ports()['sip']}\n")
    edge = next_ports()["sip"]
    tls_port, far_port, far_rtp = b.ports["sip"] + 5, b.ports["sip"] + 6, b.ports["rtp_lo"]
    b.config_path.write_text(_box_config(pki, tls_port, far_port).replace('transport = "tls"\n',
                                                                         'transport = "tls"\nsrtp = "mandatory"\n')
                             + b.config_path.read_text()
                             + f'rtpengine_ng_port = {edge}\nrtpengine_ports = "{edge + 2}-{edge + 38}"\n')
    wav, rec = tmp_path / "tone.wav", tmp_path / "heard.wav"
    _tone(wav)
    cap = None
    try:
        b.start()
        cap = Capture(tmp_path / "trunk.pcap", [tls_port, far_port, far_rtp])
        far = _far(tmp_path, pki, "call", far_port, far_rtp, "--uri", f"sip:100@127.0.0.1:{tls_port};transport=tls",
                   "--wav", wav, "--record", rec, "--seconds", "4", "--srtp", "mandatory")
        res = far.result(60)
        payloads = cap.stop()
        cap = None
        assert res["confirmed"] and res["media"], res
        rms, freq = _dominant(rec)
        assert rms > 500 and abs(freq - 700) < 20, (rms, freq)
        sizes = _rtp_sizes(tmp_path / "trunk.pcap", far_rtp)
        assert len(sizes) > 100 and all(s == 182 for s in sizes), sorted(set(sizes))
        _no_clear_sip([p for p in payloads if p[:1] in (b"\x16", b"\x17", b"\x15") or b"SIP/2.0" in p])
        plain = _far(tmp_path, pki, "call", far_port + 1, far_rtp + 10, "--uri",
                     f"sip:100@127.0.0.1:{tls_port};transport=tls", "--seconds", "1", "--srtp", "off",
                     "--timeout", "15")
        res = plain.result(30)
        assert res["code"] == 488 and not res["confirmed"], res
        # the media relay dies: the supervisor starts it again and the next SRTP call is heard
        relay = [int(p) for p in os.listdir("/proc") if p.isdigit() and _cmd(int(p)).startswith("rtpengine")
                 and str(b.run_dir) in _cmd(int(p))]
        assert len(relay) == 1, relay
        os.kill(relay[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "rtpengine exited" not in b.log_path.read_text():
            time.sleep(0.2)
        time.sleep(1.0)
        again = _far(tmp_path, pki, "call", far_port + 2, far_rtp + 20, "--uri",
                     f"sip:100@127.0.0.1:{tls_port};transport=tls", "--wav", wav, "--record", tmp_path / "again.wav",
                     "--seconds", "3", "--srtp", "mandatory")
        res = again.result(60)
        assert res["confirmed"] and res["media"], res
        rms, freq = _dominant(tmp_path / "again.wav")
        assert rms > 500 and abs(freq - 700) < 20, (rms, freq)
    finally:
        if cap:
            cap.stop()
        b.stop(40) if b.alive() else None


def _cmd(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_tls_trunk_is_trusted_only_over_tls():
    """Security review: a spoofed UDP INVITE from a TLS trunk's address is not the trunk."""
    from bridge.box import kamailio
    groups = [("t0", "sip:tls.carrier.example", ["192.0.2.10/32"]), ("t1", "", ["198.51.100.0/24"])]
    text = kamailio.trusted_lines(groups, ["tls", "udp"])
    assert 'if ($pr == "tls" && is_in_subnet("$si", "192.0.2.10/32")) { $var(trunk) = "t0"; return 1; }' in text
    assert 'if (is_in_subnet("$si", "198.51.100.0/24")) { $var(trunk) = "t1"; return 1; }' in text
