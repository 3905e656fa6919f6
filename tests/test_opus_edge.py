"""Opus toward the carrier, transcoded at the edge by rtpengine (issue 12).

The cells (pjsua2) speak PCMU/PCMA/G722 only. A trunk with ``codecs = ["opus", ...]`` has its
calls' media relayed by rtpengine at the front, which transcodes: an Opus-only offer from the
carrier is answered in Opus while the cell is offered what it speaks, and a cell's outbound
offer reaches the carrier with Opus added.

Real peers on loopback: SIPp as the carrier's signalling (sipp-scenarios/opus_call.xml,
uas_opus.xml), a Python RTP endpoint that encodes real speech (Piper) with libopus (opuslib)
and decodes what comes back, the generated Kamailio front, rtpengine and echo cells.
"""
from __future__ import annotations

import random
import re
import socket
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from support import Api, BoxProcess, create_key, next_ports, sipp, sipp_file

ROOT = Path(__file__).resolve().parent.parent
PHRASE = "Please read me the last four digits of the card you would like to use today."


# -- config and the rendered front ---------------------------------------------------------------
def _load(tmp_path, text: str):
    from bridge.core.config import load
    p = tmp_path / "t.toml"
    p.write_text(text)
    return load(str(p), environ={})


def test_trunk_codecs_are_checked(tmp_path):
    from bridge.box import kamailio
    from bridge.core.config import ConfigError
    plain = _load(tmp_path, "")
    assert plain.trunk_codecs("local") == [] and not plain.runs_front()          # default: as today
    assert kamailio.media_edge(plain, "127.0.0.1", 5062) is None                 # no rtpengine
    cfg = _load(tmp_path, '[[trunks]]\nname = "c"\naddress = "sip:127.0.0.1:5071"\ncodecs = ["OPUS", "pcmu"]\n')
    assert cfg.trunk_codecs("c") == ["opus", "PCMU"] and cfg.runs_front()
    assert kamailio.media_edge(cfg, "127.0.0.1", 5062).ng_port == 5063
    assert _load(tmp_path, '[[trunks]]\nname = "c"\ncodecs = "opus, G722"\n').trunk_codecs("c") == ["opus", "G722"]
    cases = [('codecs = ["opus", "G729"]', "trunks[0].codecs: unknown codec 'G729' (known: opus, PCMU, PCMA, G722)"),
             ('codecs = ["opus", "Opus"]', "trunks[0].codecs: codec 'Opus' is listed twice"),
             ("codecs = 5", "trunks[0].codecs: expected a list of strings, got 5")]
    for line, error in cases:
        with pytest.raises(ConfigError) as exc:
            _load(tmp_path, f'[[trunks]]\nname = "c"\n{line}\n')
        assert str(exc.value) == error, (line, str(exc.value))


def test_edge_flags_per_trunk():
    from bridge.box.kamailio import SRTP_FLAGS, edge_flags
    cells = ["PCMU", "PCMA", "G722"]
    assert edge_flags("off", [], cells) is None                                  # media not at the edge
    assert edge_flags("mandatory", [], cells) == (SRTP_FLAGS["in"], SRTP_FLAGS["mandatory"])   # SRTP as before
    to_cell, to_trunk = edge_flags("off", ["opus", "PCMU"], cells)
    assert to_cell == SRTP_FLAGS["in"] + " codec-mask-opus codec-transcode-PCMU codec-transcode-PCMA codec-transcode-G722"
    assert to_trunk == SRTP_FLAGS["in"] + " codec-mask-PCMA codec-mask-G722 codec-transcode-opus"
    to_cell, to_trunk = edge_flags("optional", ["opus"], ["pcma"])
    assert to_trunk == SRTP_FLAGS["optional"] + " codec-mask-PCMA codec-transcode-opus" and to_cell.endswith(
        "codec-mask-opus codec-transcode-PCMA")
    assert edge_flags("off", ["PCMA"], cells) == (SRTP_FLAGS["in"], SRTP_FLAGS["in"] + " codec-mask-PCMU codec-mask-G722")


def test_opus_front_config_is_accepted_by_kamailio(tmp_path):
    from bridge.box import kamailio
    media = kamailio.MediaEdge("rtpengine", "127.0.0.1", "", 2223, (20000, 20099))
    trunks = [("sip:127.0.0.1:5070", ["127.0.0.1/32"]), ("sip:127.0.0.2:5070", ["127.0.0.2/32"])]
    with pytest.raises(ValueError, match="codecs needs rtpengine"):
        kamailio.render(["udp:127.0.0.1:5060"], str(tmp_path), [], 5, trunks=trunks, codecs=[["opus"], []])
    text = kamailio.render(["udp:127.0.0.1:5060"], str(tmp_path), [], 5, trunks=trunks, codecs=[["opus", "PCMU"], []],
                           media=media, cell_socket="udp:127.0.0.1:5062", cell_codecs=["PCMU", "PCMA", "G722"])
    assert "#!define WITH_MEDIAEDGE" in text and "#!define WITH_SRTP" not in text
    assert '"t0") { $var(edge) = 1;' in text and '"t1") { $var(edge)' not in text
    assert "codec-mask-opus codec-transcode-PCMU" in text and "codec-transcode-opus" in text
    path = kamailio.write(str(tmp_path), text, kamailio.dispatcher_list([("127.0.0.1", 5063)], 3,
                                                                        socket="udp:127.0.0.1:5062"))
    r = subprocess.run(["kamailio", "-c", "-f", path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    plain = kamailio.render(["udp:127.0.0.1:5060"], str(tmp_path), [], 5, trunks=trunks)
    assert 'loadmodule "rtpengine.so"' not in plain and "#!define WITH_MEDIAEDGE" not in plain


# -- an Opus endpoint ----------------------------------------------------------------------------------
class OpusPeer:
    """The carrier's media: real speech encoded with libopus into RTP (RFC 7587: 48 kHz clock,
    20 ms packets), sent at real-time pace, and every packet that comes back decoded."""

    def __init__(self, port: int, pt: int = 111):
        from media.opus import OpusDecoder, OpusEncoder
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.pt = pt
        self.enc, self.dec = OpusEncoder(8000, 1, bitrate=24000), OpusDecoder(8000)
        self.got: list[tuple[int, int, bytes]] = []          # (pt, seq, payload)
        self.sources: set = set()

    def _drain(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except (BlockingIOError, ConnectionRefusedError):
                return
            if len(data) > 12 and data[0] >> 6 == 2:
                self.sources.add(addr)
                self.got.append((data[1] & 0x7F, struct.unpack("!H", data[2:4])[0], data[12:]))

    def talk(self, target: tuple[str, int], pcm8k: bytes, tail: float = 2.0) -> None:
        """Send ``pcm8k`` (with 0.5 s of silence before) to ``target``, then listen ``tail`` s more."""
        pcm8k = bytes(8000) + pcm8k + bytes(-len(pcm8k) % 320)
        seq, ts, ssrc = random.randint(0, 1000), random.getrandbits(31), random.getrandbits(32)
        start = time.monotonic()
        for i in range(0, len(pcm8k), 320):
            payload = self.enc.encode(pcm8k[i:i + 320])
            self.sock.sendto(struct.pack("!BBHII", 0x80, self.pt, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload, target)
            seq, ts = seq + 1, ts + 960
            while time.monotonic() < start + (i // 320 + 1) * 0.02:
                self._drain()
                time.sleep(0.002)
        end = time.monotonic() + tail
        while time.monotonic() < end:
            self._drain()
            time.sleep(0.005)

    def heard(self) -> np.ndarray:
        """What came back, decoded (8 kHz), in arrival order (loopback does not reorder)."""
        pcm = b"".join(self.dec.decode(p) for pt, _, p in self.got if pt == self.pt)
        return np.frombuffer(pcm, "<i2").astype(float)

    def close(self) -> None:
        self.sock.close()


def similarity(sent: np.ndarray, heard: np.ndarray, window: float = 0.25, search: float = 0.2) -> tuple[list, float]:
    """How much ``heard`` sounds like ``sent``: the best normalized cross-correlation of each
    ``window`` s of ``sent`` that has speech in it, searched within ``search`` s of the whole
    signal's delay (the echo cell's jitter buffer may add or drop a frame or two mid-call, which
    shifts the rest), and that delay in s (over 0..3 s)."""
    n, w, r = len(sent), int(8000 * window), int(8000 * search)
    xc = np.correlate(heard[:n + 24000], sent, "valid")[:24001]
    lag = int(np.argmax(xc))
    out = []
    for i in range(0, n - w + 1, w):
        a = sent[i:i + w]
        if np.sqrt((a ** 2).mean()) < 300:
            continue                            # silence between words
        lo, hi = max(0, lag + i - r), min(len(heard), lag + i + w + r)
        seg = heard[lo:hi]
        if len(seg) < w:
            out.append(0.0)
            continue
        dots = np.correlate(seg, a, "valid")
        norms = np.sqrt(np.convolve(seg ** 2, np.ones(w), "valid"))
        out.append(float(np.max(dots / (norms * np.linalg.norm(a) + 1e-9))))
    return out, lag / 8000


def _speech() -> bytes:
    import voice
    return voice.say(PHRASE)


def _other_speech() -> bytes:
    import voice
    return voice.say("The weather will be cold and windy over the weekend, with rain on Sunday night.")


def _box(tmp_path, cells: int, far: dict, codecs: str = '["opus", "PCMU"]', extra: str = "") -> BoxProcess:
    """A box of echo cells with two trunks: "carrier" (127.0.0.1, ``codecs``) and "plain"
    (127.0.0.2, no codecs: today's behaviour, no relay), and the ``extra`` ones."""
    b = BoxProcess(tmp_path, cells, "", cells_extra=f"front_port = {next_ports()['sip']}\n")
    edge = next_ports()["sip"]
    trunks = (f'[models]\nload = "never"\n[[trunks]]\nname = "carrier"\naddress = "sip:127.0.0.1:{far["sipp"]}"\n'
              f'allow = ["127.0.0.1/32"]\ncodecs = {codecs}\n'
              f'[[trunks]]\nname = "plain"\naddress = "sip:127.0.0.2:{far["sipp"]}"\nallow = ["127.0.0.2/32"]\n' + extra)
    b.config_path.write_text(trunks + b.config_path.read_text()
                             + f'rtpengine_ng_port = {edge}\nrtpengine_ports = "{edge + 2}-{edge + 38}"\n')
    return b


def _logged(tmp_path: Path, word: str, timeout: float = 20.0) -> tuple[str, int, int]:
    """(ip, port, payload type) a SIPp scenario logged as ``WORD ip port pt``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(rf"{word} ([0-9.]+) ([0-9]+) ([0-9]+)", sipp_file(tmp_path, "_logs.log"))
        if m:
            return m.group(1), int(m.group(2)), int(m.group(3))
        time.sleep(0.05)
    raise AssertionError(f"SIPp logged no {word}: " + sipp_file(tmp_path, "_logs.log")[-1500:])


def _relay_calls(b: BoxProcess) -> list[str]:
    """The call-ids rtpengine holds now (its ng protocol's "list" command, bencoded, over UDP)."""
    port = int(re.search(r"rtpengine_ng_port = (\d+)", b.config_path.read_text()).group(1))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        cookie = f"{random.getrandbits(48):x}".encode()       # a reused cookie gets the cached old reply
        s.sendto(cookie + b" d7:command4:liste", ("127.0.0.1", port))
        reply = s.recv(65536).decode(errors="replace")
    assert "6:result2:ok" in reply, reply
    body = reply.split("5:callsl", 1)[1] if "5:callsl" in reply else ""
    out = []
    while body and body[0].isdigit():                    # "<len>:<call-id>" items up to "e"
        n, _, rest = body.partition(":")
        out.append(rest[:int(n)])
        body = rest[int(n):]
    return out


def _no_relay_calls(b: BoxProcess, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _relay_calls(b) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _relay_calls(b) == []


def _cell_codecs(b: BoxProcess) -> list[str]:
    """The codec of every call the cells ended (the call record's), on the "carrier" trunk."""
    return [e.get("codec") for i in range(b.n) for e in b.cell_events(i, "call_ended") if e.get("trunk") == "carrier"]


def _check_echo(peer: OpusPeer, sent: bytes) -> tuple[float, float]:
    """The speech that came back matches what was sent, window by window (two transcodings
    each way: similar, never bit-exact), and not just any speech: the same measure against
    another phrase stays low. Returns (median window correlation, delay in s)."""
    heard = peer.heard()
    ref = np.frombuffer(sent, "<i2").astype(float)
    assert len(heard) > len(ref), (len(heard), len(ref))
    windows, lag = similarity(ref, heard)
    good = sum(c > 0.7 for c in windows) / len(windows)
    assert len(windows) >= 6 and np.median(windows) > 0.8 and good >= 0.7, ([round(c, 2) for c in windows], lag)
    other = np.frombuffer(_other_speech(), "<i2").astype(float)[:len(ref)]
    wrong, _ = similarity(other, heard)
    assert np.median(wrong) < 0.5, [round(c, 2) for c in wrong]
    return float(np.median(windows)), lag - 0.5                  # talk() leads with 0.5 s of silence


@pytest.mark.slow
@pytest.mark.sample
def test_opus_only_carrier_calls_in_and_hears_its_echo(tmp_path):
    """The carrier offers opus/48000/2 only: the answer it gets is Opus, the echo cell spoke
    G.711/G.722 behind rtpengine, and the speech the carrier sent comes back (decoded from
    Opus) like what it sent. The same offer from the "plain" trunk (no ``codecs``) is refused
    by the cell with 488, as every Opus-only offer was before."""
    far = next_ports()
    b = _box(tmp_path, 2, far)
    sent = _speech()
    peer = None
    try:
        b.start()
        peer = OpusPeer(far["rtp_peer"])
        call = sipp("opus_call.xml", f"127.0.0.1:{b.ports['sip']}", tmp_path, "-d", "8000", "-s", "100",
                    local_port=far["sipp"], rtpport=far["rtp_peer"], background=True, timeout=40)
        ip, port, pt = _logged(tmp_path, "ANSWER")
        assert pt == 111 and ip == "127.0.0.1"
        assert len(_relay_calls(b)) == 1                     # the call's media crosses rtpengine
        peer.talk((ip, port), sent)
        out, _ = call.communicate(timeout=40)
        assert call.returncode == 0, out.decode()[-2000:]
        answer = sipp_file(tmp_path, "_messages.log").split("SIP/2.0 200 OK")[1]
        assert "m=audio" in answer and "a=rtpmap:111 opus/48000" in answer.split("\n\n")[1]
        assert not re.search(r"a=rtpmap:\d+ (PCMU|PCMA|G722)", answer.split("\n\n")[1]), answer
        corr, lag = _check_echo(peer, sent)
        print(f"opus inbound echo: median correlation {corr:.3f} per 0.25 s, delay {lag * 1000:.0f} ms")
        codecs = _cell_codecs(b)
        assert len(codecs) == 1 and codecs[0].split("/")[0].upper() in ("PCMU", "PCMA", "G722"), codecs
        _no_relay_calls(b)                                   # BYE ended rtpengine's session
        # control: the same offer through a trunk without codecs reaches the cell untouched: 488
        refused = tmp_path / "plain"
        refused.mkdir()
        res = sipp("opus_call.xml", f"127.0.0.1:{b.ports['sip']}", refused, "-d", "1000", "-s", "100",
                   local_port=far["sipp"], rtpport=far["rtp_peer"] + 2, local_ip="127.0.0.2", timeout=20)
        assert "REFUSED 488" in sipp_file(refused, "_logs.log"), res.stdout.decode()[-2000:]
    finally:
        if peer:
            peer.close()
        b.stop(40) if b.alive() else None


@pytest.mark.slow
def test_outbound_call_to_an_opus_only_carrier(tmp_path):
    """POST /v1/calls through a ``codecs = ["opus"]`` trunk: the carrier (SIPp) finds Opus in
    the offer and answers Opus only; the cell's call is G.711/G.722; speech the carrier sends
    in Opus comes back from the echo cell. The cell's BYE, and a call the trunk refuses (503),
    end rtpengine's session."""
    far = next_ports()
    down = far["sipp"] + 1
    b = _box(tmp_path, 1, far, codecs='["opus"]', extra=f'[[trunks]]\nname = "down"\naddress = "sip:127.0.0.1:{down}"\n'
             'codecs = ["opus"]\n')
    sent = _speech()
    peer, uas = None, None
    try:
        b.start()
        peer = OpusPeer(far["rtp_peer"])
        uas = sipp("uas_opus.xml", "", tmp_path, local_port=far["sipp"], rtpport=far["rtp_peer"],
                   background=True, timeout=40)
        time.sleep(0.3)
        api = Api(b, create_key(b.data))
        status, body, _ = api.post("/v1/calls", {"to": "5551234", "trunk": "carrier", "app": "echo"})
        assert status == 201, body
        ip, port, pt = _logged(tmp_path, "OFFER")
        deadline = time.time() + 15
        while time.time() < deadline and api.get(f"/v1/calls/{body['id']}")[1].get("state") != "progressing":
            time.sleep(0.1)
        assert api.get(f"/v1/calls/{body['id']}")[1].get("state") == "progressing"
        peer.pt = pt
        peer.talk((ip, port), sent)
        assert api.post(f"/v1/calls/{body['id']}/hangup")[0] == 200
        out, _ = uas.communicate(timeout=30)
        assert uas.returncode == 0, out.decode()[-2000:]
        offer = sipp_file(tmp_path, "_messages.log").split("INVITE sip:5551234@")[1].split("SIP/2.0 ")[0]
        assert re.search(r"a=rtpmap:\d+ opus/48000", offer), offer
        corr, lag = _check_echo(peer, sent)
        print(f"opus outbound echo: median correlation {corr:.3f} per 0.25 s, delay {lag * 1000:.0f} ms")
        codecs = _cell_codecs(b)
        assert len(codecs) == 1 and codecs[0].split("/")[0].upper() in ("PCMU", "PCMA", "G722"), codecs
        _no_relay_calls(b)                                   # the cell's BYE ended rtpengine's session
        refusing = tmp_path / "down"
        refusing.mkdir()
        uas = sipp("uas_503.xml", "", refusing, local_port=down, background=True, timeout=30)
        time.sleep(0.3)
        status, body, _ = api.post("/v1/calls", {"to": "5551234", "trunk": "down", "app": "echo"})
        assert status == 201, body
        out, _ = uas.communicate(timeout=30)
        assert uas.returncode == 0, out.decode()[-2000:]
        assert "opus/48000" in sipp_file(refusing, "_messages.log")          # it went through the relay
        _no_relay_calls(b)                                   # and the 503 ended its session
    finally:
        if uas and uas.poll() is None:
            uas.kill()
        if peer:
            peer.close()
        b.stop(40) if b.alive() else None
