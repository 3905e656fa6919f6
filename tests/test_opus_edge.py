"""Opus toward the carrier, transcoded at the edge by rtpengine (issue 12).

The cells (pjsua2) speak PCMU/PCMA/G722 only. A trunk with ``codecs = ["opus", ...]`` has its
calls' media relayed by rtpengine at the front, which transcodes: an Opus-only offer from the
carrier is answered in Opus while the cell is offered what it speaks, and a cell's outbound
offer reaches the carrier with Opus added.

Real peers on loopback: SIPp as the carrier's signalling (sipp-scenarios/opus_call.xml,
uas_opus.xml, opus_dtmf.xml, opus_reinvite.xml, opus_late_offer.xml), a Python RTP endpoint that
encodes real speech (Piper) with libopus (opuslib) and decodes what comes back, the generated
Kamailio front, rtpengine and echo cells. Beyond the first call each way: RFC 4733 digits across
the transcoding, a re-INVITE from the carrier, a late-offer INVITE (no SDP), and SRTP
(``srtp = "mandatory"``, TLS signalling from Python's ssl, SRTP done in the test with
``cryptography``) together with Opus on one call.
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

from srtp_peer import Srtp
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

    def __init__(self, port: int, pt: int = 111, rate: int = 8000, host: str = "127.0.0.1"):
        from media.opus import OpusDecoder, OpusEncoder
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.sock.setblocking(False)
        self.pt, self.rate, self.step = pt, rate, 960           # step: the RTP clock's ticks per packet
        self.enc, self.dec = OpusEncoder(rate, 1, bitrate=24000), OpusDecoder(rate)
        self.got: list[tuple[int, int, bytes]] = []          # (pt, seq, payload)
        self.sources: set = set()
        self.seq, self.ts, self.ssrc = random.randint(0, 1000), random.getrandbits(31), random.getrandbits(32)
        self.drop = None                                     # n -> True when talk()'s n-th packet is lost

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
        """Send ``pcm8k`` (16-bit at ``rate``, with 0.5 s of silence before) to ``target`` in 20 ms
        packets (none for the packets ``drop(n)`` says are lost), then listen ``tail`` s more."""
        frame = self.rate // 50 * 2
        pcm8k = bytes(self.rate) + pcm8k + bytes(-len(pcm8k) % frame)
        start = time.monotonic()
        for n, i in enumerate(range(0, len(pcm8k), frame)):
            payload = self.enc.encode(pcm8k[i:i + frame])
            if not (self.drop and self.drop(n)):
                self._send(target, self.pt, payload, self.ts)
            self.seq, self.ts = self.seq + 1, self.ts + self.step
            self._pace(start + (n + 1) * 0.02)
        self.listen(tail)

    def _send(self, target: tuple[str, int], pt: int, payload: bytes, ts: int, marker: bool = False) -> None:
        head = struct.pack("!BBHII", 0x80, pt | (0x80 if marker else 0), self.seq & 0xFFFF, ts & 0xFFFFFFFF, self.ssrc)
        self.sock.sendto(head + payload, target)

    def _pace(self, until: float) -> None:
        while time.monotonic() < until:
            self._drain()
            time.sleep(0.002)

    def listen(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._drain()
            time.sleep(0.005)

    def digit(self, target: tuple[str, int], digit: str, pt: int, rate: int, ms: int = 200) -> None:
        """One RFC 4733 event (``digit``, payload type ``pt`` at clock ``rate``) of ``ms``, in
        20 ms packets in place of audio: the first marked, the last three with the E bit."""
        event = "0123456789*#".index(digit)
        step, ts = rate // 50, self.ts * rate // (self.step * 50)     # the event's own clock
        start = time.monotonic()
        packets = ms // 20
        for n in range(packets + 2):
            end = n >= packets - 1
            payload = struct.pack("!BBH", event, (0x80 if end else 0) | 10, min(n + 1, packets) * step)
            self._send(target, pt, payload, ts, marker=n == 0)
            self.seq += 1
            if n < packets:
                self.ts += self.step
                self._pace(start + (n + 1) * 0.02)

    def heard(self) -> np.ndarray:
        """What came back, decoded (at ``rate``), in arrival order (loopback does not reorder)."""
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


def _box(tmp_path, cells: int, far: dict, codecs: str = '["opus", "PCMU"]', extra: str = "",
         carrier: str = "") -> BoxProcess:
    """A box of echo cells with two trunks: "carrier" (127.0.0.1, ``codecs``, and the ``carrier``
    lines) and "plain" (127.0.0.2, no codecs: today's behaviour, no relay), and the ``extra`` ones."""
    b = BoxProcess(tmp_path, cells, "", cells_extra=f"front_port = {next_ports()['sip']}\n")
    edge = next_ports()["sip"]
    trunks = (f'[models]\nload = "never"\n[[trunks]]\nname = "carrier"\naddress = "sip:127.0.0.1:{far["sipp"]}"\n'
              f'allow = ["127.0.0.1/32"]\ncodecs = {codecs}\n{carrier}'
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


def _events(tmp_path: Path) -> tuple[int | None, int | None]:
    """(payload type, rate) of the telephone-event in the carrier's answer (opus_dtmf.xml), or Nones."""
    m = re.search(r"EVENTS ([0-9]*) ([0-9]*)", sipp_file(tmp_path, "_logs.log"))
    assert m, sipp_file(tmp_path, "_logs.log")[-1500:]
    return (int(m.group(1)), int(m.group(2))) if m.group(1) else (None, None)


def _digits(b: BoxProcess) -> list[tuple[str, str]]:
    """(method, digit) of every DTMF event the cells reported."""
    return [(e.get("method"), e.get("digit")) for i in range(b.n) for e in b.cell_events(i, "dtmf")]


def _dtmf_scenario(tmp_path: Path, rates: list[int]) -> str:
    """opus_dtmf.xml offering telephone-event at each of ``rates`` (payload types 101, 102, ...)."""
    text = (ROOT / "sipp-scenarios" / "opus_dtmf.xml").read_text()
    pts = [101 + i for i in range(len(rates))]
    text = text.replace("RTP/AVP 111 101", "RTP/AVP 111 " + " ".join(map(str, pts)))
    text = text.replace("      a=rtpmap:101 telephone-event/48000\n      a=fmtp:101 0-16\n", "".join(
        f"      a=rtpmap:{pt} telephone-event/{rate}\n      a=fmtp:{pt} 0-16\n" for pt, rate in zip(pts, rates)))
    path = tmp_path / ("opus_dtmf_" + "_".join(map(str, rates)) + ".xml")
    path.write_text(text)
    return str(path)


@pytest.mark.slow
def test_rfc4733_digits_cross_the_opus_transcoding(tmp_path):
    """The Opus carrier offers telephone-event next to Opus and presses a digit as RFC 4733
    events mid-call: at 48 kHz (RFC 7587's clock, what RFC 4733 asks: the audio's clock), and at
    48 and 8 kHz both (as WebRTC stacks offer). The answer it gets keeps telephone-event/48000,
    and the cell (G.711/G.722, telephone-event/8000 only: rtpengine rescales the events) reports
    that very digit as rfc4733, once, in its events and in the call record; speech before and
    after it still echoes. A carrier offering telephone-event/8000 only beside Opus (a clock
    that is not its audio's) either gets telephone-event in the answer and its digit arrives the
    same way, or gets none, and so knows not to send events (rtpengine 10.5 does the latter)."""
    far = next_ports()
    b = _box(tmp_path, 1, far, extra="[pii]\nshow_dtmf = true\n[records]\nlog_words = true\n")
    words = _speech()[:2 * 8000 * 2]                       # 2 s of 16-bit speech
    peer = None
    try:
        b.start()
        peer = OpusPeer(far["rtp_peer"])
        calls = 0
        for rates, digit in [([48000], "5"), ([48000, 8000], "#"), ([8000], "9")]:
            run = tmp_path / ("te" + "_".join(map(str, rates)))
            run.mkdir()
            peer.got.clear()
            call = sipp(_dtmf_scenario(run, rates), f"127.0.0.1:{b.ports['sip']}", run, "-d", "7000", "-s", "100",
                        local_port=far["sipp"], rtpport=far["rtp_peer"], background=True, timeout=40)
            ip, port, pt = _logged(run, "ANSWER")
            te_pt, te_rate = _events(run)
            assert pt == 111, pt
            if rates != [8000]:
                assert (te_pt, te_rate) == (101, 48000), (rates, te_pt, te_rate)
            peer.talk((ip, port), words, tail=0.2)
            if te_pt is not None:
                peer.digit((ip, port), digit, te_pt, te_rate)
            peer.talk((ip, port), words, tail=0.5)
            out, _ = call.communicate(timeout=40)
            assert call.returncode == 0, out.decode()[-2000:]
            calls += 1
            ended = [e for e in b.wait_cell_events(0, "call_ended", calls) if e.get("trunk") == "carrier"]
            assert len(ended) == calls, ended
            if te_pt is not None:
                assert _digits(b)[-1:] == [("rfc4733", digit)] and len(_digits(b)) == calls, (rates, _digits(b))
                assert ended[-1].get("dtmf") == digit, ended[-1]
            else:
                print(f"telephone-event/{rates[0]} only beside Opus: the answer has none "
                      "(RFC 4733 2.1: the audio's clock)")
            heard = peer.heard()
            assert len(heard) > 8000 * 4.5 and np.sqrt((heard ** 2).mean()) > 300    # the echo went on
    finally:
        if peer:
            peer.close()
        b.stop(40) if b.alive() else None


@pytest.mark.slow
def test_carrier_reinvite_keeps_the_opus_call(tmp_path):
    """Mid-call the Opus carrier re-INVITEs (same codec, new SDP version, its RTP moved to another
    port): the re-offer crosses rtpengine like the first (the cell is offered what it speaks, the
    carrier answered in Opus), the call survives on the same relay session, and speech sent from
    the new port comes back there like before the re-INVITE."""
    far = next_ports()
    b = _box(tmp_path, 1, far)
    sent = _speech()
    peer, moved = None, None
    try:
        b.start()
        peer, moved = OpusPeer(far["rtp_peer"]), OpusPeer(far["rtp_peer"] + 2)
        call = sipp("opus_reinvite.xml", f"127.0.0.1:{b.ports['sip']}", tmp_path, "-d", "7500", "-s", "100",
                    "-set", "rtpport2", str(far["rtp_peer"] + 2), local_port=far["sipp"], rtpport=far["rtp_peer"],
                    background=True, timeout=60)
        ip, port, pt = _logged(tmp_path, "ANSWER")
        assert pt == 111
        peer.talk((ip, port), sent, tail=1.0)
        ip2, port2, pt2 = _logged(tmp_path, "ANSWER2")
        assert pt2 == 111 and ip2 == "127.0.0.1"
        assert len(_relay_calls(b)) == 1                     # the same relay session, not a second one
        moved.talk((ip2, port2), sent)
        out, _ = call.communicate(timeout=40)
        assert call.returncode == 0, out.decode()[-2000:]
        reanswer = sipp_file(tmp_path, "_messages.log").split("CSeq: 2 INVITE")[-1]
        assert not re.search(r"a=rtpmap:\d+ (PCMU|PCMA|G722)", reanswer), reanswer
        before, _ = _check_echo(peer, sent)
        after, _ = _check_echo(moved, sent)
        print(f"opus re-INVITE: median correlation {before:.3f} before, {after:.3f} after")
        ended = [e for e in b.wait_cell_events(0, "call_ended", 1) if e.get("trunk") == "carrier"]
        assert len(ended) == 1 and ended[0]["reason"] == "remote bye", ended
        _no_relay_calls(b)
    finally:
        for p in (peer, moved):
            if p:
                p.close()
        b.stop(40) if b.alive() else None


@pytest.mark.slow
def test_late_offer_from_an_opus_carrier(tmp_path):
    """The Opus carrier sends an INVITE without SDP: the cell's offer (G.711/G.722) crosses
    rtpengine in the 200 and reaches the carrier with Opus in it and none of the cells' codecs
    the trunk does not list; the carrier's Opus answer in the ACK is translated back for the
    cell; speech comes back from the echo cell through the relay."""
    far = next_ports()
    b = _box(tmp_path, 1, far)
    sent = _speech()
    peer = None
    try:
        b.start()
        peer = OpusPeer(far["rtp_peer"])
        call = sipp("opus_late_offer.xml", f"127.0.0.1:{b.ports['sip']}", tmp_path, "-d", "7000", "-s", "100",
                    local_port=far["sipp"], rtpport=far["rtp_peer"], background=True, timeout=40)
        try:
            ip, port, pt = _logged(tmp_path, "OFFER")
        except AssertionError:
            call.kill()
            raise AssertionError("no Opus in the 200's offer: " + sipp_file(tmp_path, "_logs.log")[-800:])
        peer.pt = pt
        assert len(_relay_calls(b)) == 1
        peer.talk((ip, port), sent)
        out, _ = call.communicate(timeout=40)
        assert call.returncode == 0, out.decode()[-2000:]
        offer = sipp_file(tmp_path, "_messages.log").split("SIP/2.0 200 OK")[1].split("\n\n")[1]
        assert not re.search(r"a=rtpmap:\d+ (PCMA|G722)", offer), offer            # the trunk lists opus, PCMU
        corr, lag = _check_echo(peer, sent)
        print(f"opus late offer: median correlation {corr:.3f} per 0.25 s, delay {lag * 1000:.0f} ms")
        codecs = _cell_codecs(b)
        assert len(codecs) == 1 and codecs[0].split("/")[0].upper() in ("PCMU", "PCMA", "G722"), codecs
        _no_relay_calls(b)
    finally:
        if peer:
            peer.close()
        b.stop(40) if b.alive() else None


# -- SRTP and Opus on one call -------------------------------------------------------------------------
class SrtpOpusPeer(OpusPeer):
    """OpusPeer over SRTP: what it sends is protected with its own key, what comes back must
    authenticate with the answer's key (``bad`` counts the packets that did not)."""

    def __init__(self, port: int, key: str):
        super().__init__(port)
        self.tx, self.rx, self.bad, self.sizes = Srtp(key), None, 0, []

    def _send(self, target, pt, payload, ts, marker=False):
        head = struct.pack("!BBHII", 0x80, pt | (0x80 if marker else 0), self.seq & 0xFFFF, ts & 0xFFFFFFFF, self.ssrc)
        self.sock.sendto(self.tx.protect(head + payload), target)

    def _drain(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except (BlockingIOError, ConnectionRefusedError):
                return
            if len(data) > 22 and data[0] >> 6 == 2:
                plain = self.rx.unprotect(data) if self.rx else None
                if plain is None:
                    self.bad += 1
                    continue
                self.sources.add(addr)
                self.sizes.append(len(data) - len(plain))
                self.got.append((plain[1] & 0x7F, struct.unpack("!H", plain[2:4])[0], plain[12:]))


class TlsCaller:
    """The carrier's signalling over TLS (Python's ssl, its client certificate): one INVITE with
    the given SDP, the route set from the 200's Record-Route, ACK and BYE on the same connection."""

    def __init__(self, port: int, pki: dict):
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(pki["ca"]))
        ctx.load_cert_chain(str(pki["far"][0]), str(pki["far"][1]))
        self.port = port
        self.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 5), server_hostname="127.0.0.1")
        self.sock.settimeout(10)
        self.local = self.sock.getsockname()[1]
        self.buf = b""
        self.call_id, self.tag = f"{random.getrandbits(64):x}@opus-srtp", f"{random.getrandbits(32):x}"
        self.to = self.target = ""
        self.routes: list[str] = []

    def _request(self, method: str, uri: str, cseq: int, body: str = "", to: str = "", routes: list[str] = ()) -> None:
        head = [f"{method} {uri} SIP/2.0",
                f"Via: SIP/2.0/TLS 127.0.0.1:{self.local};branch=z9hG4bK{random.getrandbits(48):x};rport",
                "Max-Forwards: 70", f"From: <sip:carrier@127.0.0.1>;tag={self.tag}",
                f"To: {to or '<sip:100@127.0.0.1>'}", f"Call-ID: {self.call_id}", f"CSeq: {cseq} {method}",
                f"Contact: <sip:carrier@127.0.0.1:{self.local};transport=tls>", *[f"Route: {r}" for r in routes]]
        if body:
            head.append("Content-Type: application/sdp")
        body = body.replace("\n", "\r\n")
        self.sock.sendall(("\r\n".join(head) + f"\r\nContent-Length: {len(body.encode())}\r\n\r\n" + body).encode())

    def _response(self) -> tuple[int, dict, str]:
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        head, rest = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        length = int(next((ln.split(":", 1)[1] for ln in lines
                           if ln.lower().startswith(("content-length:", "l:"))), "0"))
        while len(rest) < length:
            rest += self.sock.recv(65536)
        self.buf = rest[length:]
        hdrs: dict = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            hdrs.setdefault(k.strip().lower(), []).append(v.strip())
        return int(lines[0].split()[1]), hdrs, rest[:length].decode()

    def invite(self, sdp: str) -> tuple[int, str]:
        """(final status, its SDP); a 2xx sets up the dialog for ``ack`` and ``bye``."""
        self._request("INVITE", f"sip:100@127.0.0.1:{self.port};transport=tls", 1, sdp)
        while True:
            status, hdrs, body = self._response()
            if status >= 200:
                break
        if status < 300:
            self.to = hdrs["to"][0]
            self.target = re.search(r"<([^>]+)>", hdrs["contact"][0]).group(1)
            self.routes = [r.strip() for rr in reversed(hdrs.get("record-route", [])) for r in reversed(rr.split(","))]
        else:
            self._request("ACK", f"sip:100@127.0.0.1:{self.port};transport=tls", 1, to=hdrs["to"][0])
        return status, body

    def ack(self) -> None:
        self._request("ACK", self.target, 1, to=self.to, routes=self.routes)

    def bye(self) -> int:
        self._request("BYE", self.target, 2, to=self.to, routes=self.routes)
        while True:
            status, _, _ = self._response()
            if status >= 200:
                return status

    def close(self) -> None:
        self.sock.close()


def _opus_sdp(port: int, key: str = "") -> str:
    proto, crypto = ("RTP/SAVP", f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{key}\n") if key else ("RTP/AVP", "")
    return (f"v=0\no=carrier 1 1 IN IP4 127.0.0.1\ns=-\nc=IN IP4 127.0.0.1\nt=0 0\nm=audio {port} {proto} 111\n"
            f"a=rtpmap:111 opus/48000/2\na=fmtp:111 minptime=10;useinbandfec=1\n{crypto}a=ptime:20\na=sendrecv\n")


@pytest.mark.slow
def test_srtp_mandatory_and_opus_on_one_call(tmp_path):
    """One TLS trunk with ``srtp = "mandatory"`` and ``codecs = ["opus", "PCMU"]``: the carrier
    calls over TLS offering Opus only over SRTP (SDES); rtpengine answers SRTP and Opus, with
    its own key, and gives the echo cell plain G.711. Every packet the carrier gets back
    authenticates with the answer's key (SRTP, 10-byte tag) and its speech comes back like the
    plain-RTP Opus call's. The same Opus offer over plain RTP is refused with 488."""
    import base64
    from tls_peer import make_ca
    ca = make_ca(tmp_path / "pki")
    pki = {"ca": ca.ca, "box": ca.issue("box"), "far": ca.issue("far")}
    far = next_ports()
    tls_port = far["sipp"] + 3
    sip = (f'[sip]\ntls_listen = "127.0.0.1:{tls_port}"\ntls_cert = "{pki["box"][0]}"\ntls_key = "{pki["box"][1]}"\n'
           f'tls_ca = "{pki["ca"]}"\n')
    b = _box(tmp_path, 1, far, carrier='transport = "tls"\nsrtp = "mandatory"\n', extra=sip)
    sent = _speech()
    key = base64.b64encode(random.randbytes(30)).decode()
    peer, caller = None, None
    try:
        b.start()
        peer = SrtpOpusPeer(far["rtp_peer"], key)
        caller = TlsCaller(tls_port, pki)
        status, answer = caller.invite(_opus_sdp(far["rtp_peer"], key))
        assert status == 200, (status, answer)
        caller.ack()
        m = re.search(r"m=audio (\d+) RTP/SAVP (\d+)", answer)
        crypto = re.search(r"a=crypto:\d+ AES_CM_128_HMAC_SHA1_80 inline:(\S+)", answer)
        assert m and crypto and m.group(2) == "111" and "opus/48000" in answer, answer
        assert not re.search(r"a=rtpmap:\d+ (PCMU|PCMA|G722)", answer), answer
        assert len(_relay_calls(b)) == 1
        peer.rx = Srtp(crypto.group(1))
        peer.talk(("127.0.0.1", int(m.group(1))), sent)
        assert caller.bye() == 200
        assert peer.bad == 0 and set(peer.sizes) == {10}, (peer.bad, set(peer.sizes))   # all SRTP, all authentic
        corr, lag = _check_echo(peer, sent)
        print(f"opus over SRTP: median correlation {corr:.3f} per 0.25 s, delay {lag * 1000:.0f} ms")
        codecs = _cell_codecs(b)
        assert len(codecs) == 1 and codecs[0].split("/")[0].upper() in ("PCMU", "PCMA", "G722"), codecs
        _no_relay_calls(b)
        caller.close()
        caller = TlsCaller(tls_port, pki)
        status, _ = caller.invite(_opus_sdp(far["rtp_peer"]))
        assert status == 488, status
    finally:
        for x in (peer, caller):
            if x:
                x.close()
        b.stop(40) if b.alive() else None
