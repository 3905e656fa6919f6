"""media/streamcodec.py is pure: encoders, decoders, timestamps and messages with
made-up signals and clock times; and a MediaStream's buffer, marks and clear
driven by hand (no sockets, no cell)."""
import base64
import json
import math
import types

import numpy as np
import pytest

from bridge.core.metrics import Metrics
from bridge.api.streams import MediaStream, backoff
from media import g711
from media.callmedia import CallMedia
from media.frames import bytes_per_frame
from media.opus import OpusDecoder
from media.resample import resample
from media.streamcodec import (ENCODINGS, FrameDecoder, FrameEncoder, MediaClock, StreamProtocolError,
                               media_message, parse_client, start_message, stop_message)


def voice_like(rate: int, seconds: float, seed: int = 3) -> np.ndarray:
    """Harmonics of a gliding pitch under a syllable-rate envelope: speech-like, never periodic."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    f0 = 140 + 60 * np.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * np.cumsum(f0) / rate
    sig = sum(np.sin(k * phase) / k for k in range(1, 12) if k * 240 < rate / 2)
    knots = np.arange(0, seconds + 0.5, 0.25)
    env = np.interp(t, knots, rng.uniform(0.1, 1.0, knots.size))
    return (6000 * sig * env / np.max(np.abs(sig))).astype("<i2")


def best_corr(ref: np.ndarray, got: np.ndarray, max_lag: int) -> float:
    """Largest normalized correlation of ``got`` against ``ref`` over lags 0..max_lag."""
    best = 0.0
    for lag in range(0, max_lag + 1):
        n = min(ref.size, got.size - lag)
        a, b = ref[:n].astype(float), got[lag:lag + n].astype(float)
        c = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))
        best = max(best, c)
    return best


def frames_of(sig: np.ndarray, rate: int) -> list[bytes]:
    size = bytes_per_frame(rate)
    raw = sig.tobytes()
    return [raw[i:i + size] for i in range(0, len(raw) - size + 1, size)]


def decode_wire(encoding: str, payloads: list[bytes]) -> np.ndarray:
    if encoding == "mulaw":
        pcm = b"".join(g711.ulaw_decode(p) for p in payloads)
    elif encoding == "pcm16":
        pcm = b"".join(payloads)
    else:
        dec = OpusDecoder(16000)
        pcm = b"".join(dec.decode(p) for p in payloads)
    return np.frombuffer(pcm, "<i2")


# ---- encoders ------------------------------------------------------------------------
@pytest.mark.parametrize("call_rate", [8000, 16000])
@pytest.mark.parametrize("encoding, size, min_corr", [("mulaw", 160, 0.99), ("pcm16", 640, 0.99), ("opus", None, 0.8)])
def test_encoder_frames_round_trip(encoding, size, min_corr, call_rate):
    sig = voice_like(call_rate, 2.0)
    enc = FrameEncoder(encoding, call_rate)
    payloads = [enc.encode(f) for f in frames_of(sig, call_rate)]
    assert len(payloads) == 100
    if size:
        assert {len(p) for p in payloads} == {size}
    else:
        assert max(len(p) for p in payloads) < 200          # compressed: ~25 kbit/s or less
    wire_rate = ENCODINGS[encoding]
    got = decode_wire(encoding, payloads)
    assert got.size == 2 * wire_rate                        # 20 ms of wire audio per frame, exactly
    ref = resample(sig.tobytes(), call_rate, wire_rate)
    corr = best_corr(np.frombuffer(ref, "<i2"), got, max_lag=int(0.02 * wire_rate))
    assert corr > min_corr, corr


def test_pcm16_at_a_16k_call_is_bit_exact():
    sig = voice_like(16000, 0.5)
    enc = FrameEncoder("pcm16", 16000)
    frames = frames_of(sig, 16000)
    assert [enc.encode(f) for f in frames] == frames


def test_silent_tick_encodes_as_silence():
    for encoding in ENCODINGS:
        enc = FrameEncoder(encoding, 16000)
        got = decode_wire(encoding, [enc.encode(None) for _ in range(5)])
        assert np.abs(got).max() <= 8, encoding


@pytest.mark.parametrize("size", [0, 100, 400])
def test_a_frame_of_another_size_still_makes_one_20ms_payload(size):
    """Twilio's media messages hold 20 ms (160 bytes of mu-law at 8 kHz): a frame of another size
    from the call (an empty one made an empty payload) is padded, or its excess carried."""
    enc = FrameEncoder("mulaw", 8000)
    got = [enc.encode(bytes(size)), enc.encode(bytes(320)), enc.encode(bytes(320))]
    assert [len(p) for p in got] == [160, 160, 160]


def test_unknown_encoding_refused():
    with pytest.raises(ValueError):
        FrameEncoder("gsm", 8000)


# ---- decoders ------------------------------------------------------------------------
@pytest.mark.parametrize("call_rate", [8000, 16000])
@pytest.mark.parametrize("encoding", ["mulaw", "pcm16"])
def test_decoder_any_chunk_length_to_call_frames(encoding, call_rate):
    wire_rate = ENCODINGS[encoding]
    sig = voice_like(wire_rate, 1.0)
    raw = g711.ulaw_encode(sig.tobytes()) if encoding == "mulaw" else sig.tobytes()
    dec = FrameDecoder(encoding, call_rate)
    frames, pos, sizes = [], 0, [7, 100, 333, 2, 4000]
    i = 0
    while pos < len(raw):
        n = sizes[i % len(sizes)] * (2 if encoding == "pcm16" else 1)
        frames += dec.decode(raw[pos:pos + n])
        pos += n
        i += 1
    frames += dec.flush()
    assert dec.pending == 0
    assert {len(f) for f in frames} == {bytes_per_frame(call_rate)}
    got = np.frombuffer(b"".join(frames), "<i2")
    assert abs(got.size - call_rate) <= bytes_per_frame(call_rate) // 2     # 1 s in, 1 s out
    ref = np.frombuffer(resample(sig.tobytes(), wire_rate, call_rate), "<i2")
    assert best_corr(ref, got, 4) > 0.99


def test_decoder_opus_one_packet_per_message():
    sig = voice_like(16000, 0.4)
    enc = FrameEncoder("opus", 16000)
    packets = [enc.encode(f) for f in frames_of(sig, 16000)]
    dec = FrameDecoder("opus", 8000)
    frames = [f for p in packets for f in dec.decode(p)]
    assert len(frames) in (19, 20) and {len(f) for f in frames} == {320}
    with pytest.raises(StreamProtocolError) as e:
        dec.decode(b"\xff\xfe\xfd")
    assert e.value.code == "invalid_payload"


def test_decoder_rejects_half_samples_and_empty():
    dec = FrameDecoder("pcm16", 16000)
    with pytest.raises(StreamProtocolError):
        dec.decode(b"\x01\x02\x03")
    with pytest.raises(StreamProtocolError):
        dec.decode(b"")
    assert dec.decode(bytes(100)) == [] and dec.pending == 100
    assert dec.flush() == [bytes(640)]
    dec.decode(bytes(100))
    dec.reset()
    assert dec.pending == 0


# ---- timestamps ----------------------------------------------------------------------
def test_media_clock_on_the_20ms_grid():
    clock = MediaClock()
    rng = np.random.default_rng(1)
    t0 = 1000.0
    stamps = [clock.stamp("in", t0 + 0.02 * i + rng.uniform(-0.004, 0.004)) for i in range(200)]
    assert stamps[0] == 0 and np.all(np.diff(stamps) == 20)
    # the other direction shares the origin
    assert clock.stamp("out", t0 + 0.02 * 200) == 4000
    # a stalled clock shows as a longer step; a burst never repeats or goes back
    assert clock.stamp("in", t0 + 0.02 * 210) == 4200
    assert clock.stamp("in", t0 + 0.02 * 210) == 4220
    assert clock.stamp("in", t0 + 0.02 * 210 + 0.001) == 4240


# ---- messages ------------------------------------------------------------------------
def test_messages_are_json_with_the_documented_fields():
    m = json.loads(media_message(7, "st_c0_ab", "call-1", "in", 140, b"\x00\x01\xff"))
    assert m == {"event": "media", "sequence_number": 7, "stream_id": "st_c0_ab", "call_id": "call-1",
                 "media": {"direction": "in", "timestamp": 140, "payload": base64.b64encode(b"\x00\x01\xff").decode()}}
    s = json.loads(start_message(1, "st", "c", "mulaw", "both", True, 2))
    assert s["start"]["media_format"] == {"encoding": "mulaw", "sample_rate": 8000, "channels": 1, "frame_ms": 20,
                                          "frame_samples": 160}
    assert s["start"]["direction"] == "both" and s["start"]["bidirectional"] is True and s["start"]["connection"] == 2
    assert json.loads(stop_message(9, "st", "c", "api", {"frames_sent": 3}))["stop"] == {
        "reason": "api", "stats": {"frames_sent": 3}}


def test_parse_client_messages():
    b64 = base64.b64encode(b"\x01\x02").decode()
    m = parse_client(json.dumps({"event": "media", "stream_id": "x", "media": {"payload": b64}}))
    assert m.event == "media" and m.payload == b"\x01\x02"
    assert parse_client('{"event":"clear"}').event == "clear"
    assert parse_client('{"event":"mark","mark":{"name":"intro"}}').name == "intro"
    bad = {"{nope": "invalid_json", "[]": "invalid_message", '{"event":"dance"}': "unknown_event",
           '{"event":"media","media":{"payload":"***"}}': "invalid_payload",
           '{"event":"media"}': "invalid_message", '{"event":"mark","mark":{"name":""}}': "invalid_message",
           '{"event":"media","media":{"payload":"' + "A" * 100 + '"}}': "payload_too_large"}
    for text, code in bad.items():
        with pytest.raises(StreamProtocolError) as e:
            parse_client(text, max_payload=60)
        assert e.value.code == code, text


def test_backoff_doubles_to_the_cap_with_jitter():
    # the one rule of bridge/core/backoff.py: full jitter, uniform in [0, min(cap, base * 2**(attempt-1)))
    assert [backoff(n, 0.5, 4.0, rnd=lambda: 0.5) for n in range(1, 7)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert backoff(1, 1.0, 10.0, rnd=lambda: 0.0) == 0.0 and backoff(1, 1.0, 10.0, rnd=lambda: 0.999) < 1.0


# ---- a MediaStream driven by hand ------------------------------------------------------------
CFG = {"buffer_frames": 50, "max_per_call": 3, "reconnect_attempts": 2, "reconnect_base_delay": 0.1,
       "reconnect_max_delay": 1.0, "connect_timeout": 1.0, "send_timeout": 1.0, "playback_seconds": 2.0}


def hand_stream(direction="in", bidirectional=False, encoding="pcm16"):
    events = []
    manager = types.SimpleNamespace(cfg=CFG, metrics=Metrics(), ended=lambda st: None)
    session = types.SimpleNamespace(call_id="call-1", media=CallMedia(16000), services=types.SimpleNamespace(cell_id="0"),
                                    emit=lambda t, d: events.append((t, d)), remove_tap=lambda tap: None)
    return MediaStream(manager, session, None, direction, encoding, bidirectional), session, events


def sent_texts(st):
    """What the sender would write, in order, without a socket."""
    out = []
    for item in st._out:
        out.append(json.loads(item(len(out) + 1)) if callable(item) else item)
    return out


def test_send_buffer_drops_oldest_and_counts():
    st, _, _ = hand_stream("both")
    frame = bytes(640)
    for i in range(200):
        st.on_audio([(i * 0.02, frame)], [(i * 0.02, None)], i * 0.02)
    assert st._media_queued == 100 and len(st._out) == 100            # 50 frames per direction
    assert st.stats["frames_dropped"] == 300
    assert st.manager.metrics.stream_frames_dropped.labels("pcm16")._value.get() == 300
    # what is left is the newest second, in order
    left = [ts for d, ts, _ in st._out if d == "in"]
    assert left == list(range(3000, 4000, 20))


def _play_ticks(st, session, n, t0=0.0):
    """n clock ticks: the tap tops the downlink up, then the 'clock' takes one frame."""
    heard = []
    for i in range(n):
        st.on_audio([], [], t0 + i * 0.02)
        heard.append(session.media.downlink.pop())
    return heard


def test_marks_echo_when_played_and_clear_reports_the_rest():
    st, session, _ = hand_stream("in", bidirectional=True)
    tone = (8000 * np.sin(2 * math.pi * 500 * np.arange(1600) / 16000)).astype("<i2").tobytes()   # 100 ms
    st.on_client_message(json.dumps({"event": "media", "media": {"payload": base64.b64encode(tone).decode()}}))
    st.on_client_message('{"event":"mark","mark":{"name":"one"}}')
    assert not [m for m in sent_texts(st) if m["event"] == "mark"]
    heard = _play_ticks(st, session, 4)
    assert all(h is not None for h in heard) and not [m for m in sent_texts(st) if m["event"] == "mark"]
    _play_ticks(st, session, 2)                   # 5 frames played: mark reached (one extra tick to notice)
    marks = [m for m in sent_texts(st) if m["event"] == "mark"]
    assert marks == [{"event": "mark", "sequence_number": 1, "stream_id": st.id, "call_id": "call-1",
                      "mark": {"name": "one", "cleared": False}}]
    st._out.clear()
    # a mark with nothing queued comes straight back
    st.on_client_message('{"event":"mark","mark":{"name":"now"}}')
    assert [m["mark"] for m in sent_texts(st)] == [{"name": "now", "cleared": False}]
    st._out.clear()
    # 1 s queued, mark, play 10 frames, clear: the mark comes back as cleared, the line goes quiet
    st.on_client_message(json.dumps({"event": "media", "media": {"payload": base64.b64encode(tone * 10).decode()}}))
    st.on_client_message('{"event":"mark","mark":{"name":"long"}}')
    _play_ticks(st, session, 10)
    st.on_client_message('{"event":"clear"}')
    assert [m["mark"] for m in sent_texts(st)] == [{"name": "long", "cleared": True}]
    assert session.media.queued_out() == 0
    assert _play_ticks(st, session, 5) == [None] * 5
    assert st.stats["frames_received"] == 55


def test_partial_frame_played_after_a_pause_and_errors_keep_the_stream():
    st, session, _ = hand_stream("in", bidirectional=True)
    st.on_client_message(json.dumps({"event": "media", "media": {"payload": base64.b64encode(bytes(1000)).decode()}}))
    assert st.decoder.pending == 1000 - 640
    import time
    now = time.monotonic()
    st.on_audio([], [], now)
    assert st.decoder.pending == 360                                   # still expecting more
    st.on_audio([], [], now + 0.2)
    assert st.decoder.pending == 0 and st.stats["frames_received"] == 2
    for bad in ("{nope", '{"event":"dance"}', '{"event":"media","media":{"payload":"%%%"}}'):
        st.on_client_message(bad)
    big = base64.b64encode(bytes(640 * 150)).decode()                  # 3 s > playback_seconds = 2
    st.on_client_message(json.dumps({"event": "media", "media": {"payload": big}}))
    codes = [m["error"]["code"] for m in sent_texts(st) if m["event"] == "error"]
    assert codes == ["invalid_json", "unknown_event", "invalid_payload", "playback_full"]
    assert st.stats["client_errors"] == 4 and st.live


def test_one_way_stream_refuses_audio_but_echoes_marks():
    st, _, _ = hand_stream("in", bidirectional=False)
    st.on_client_message(json.dumps({"event": "media", "media": {"payload": base64.b64encode(bytes(640)).decode()}}))
    st.on_client_message('{"event":"mark","mark":{"name":"m"}}')
    msgs = sent_texts(st)
    assert msgs[0]["error"]["code"] == "not_bidirectional" and msgs[1]["mark"] == {"name": "m", "cleared": False}
