"""media/ is pure: these tests feed it made-up timestamps and signals."""
import math
import wave

import numpy as np
import pytest

from media import emodel, g711
from media.callmedia import CallMedia
from media.frames import FrameQueue, FrameTimer, bytes_per_frame, percentile, split_frames
from media.quality import Quality
from media.resample import Resampler, resample
from media.wav import WavError, read_wav, write_wav


# ---- E-model (ITU-T G.107 / G.113) -----------------------------------------
def test_g107_default_values_give_r_93_2():
    # G.107 §7 / Table 3: with all default values R = 93.2 (Ro 94.77, Is 1.41, Id 0.15).
    assert emodel.R0 == pytest.approx(94.77, abs=0.01)
    assert emodel.IS == pytest.approx(1.41, abs=0.01)
    assert emodel.delay_impairment(0) == pytest.approx(0.15, abs=0.01)
    assert emodel.r_factor("PCMU") == pytest.approx(93.2, abs=0.05)
    assert emodel.mos("PCMU") == pytest.approx(4.41, abs=0.01)


@pytest.mark.parametrize("r, mos", [(0, 1.0), (50, 2.58), (60, 3.10), (70, 3.60), (80, 4.02), (90, 4.34), (100, 4.5)])
def test_g107_annex_b_r_to_mos(r, mos):
    assert emodel.mos_from_r(r) == pytest.approx(mos, abs=0.01)


def test_g113_codec_impairments():
    # G.113 Appendix I: G.729(A) Ie = 11; G.711 Ie = 0, Bpl 25.1 with PLC, 4.3 without.
    assert emodel.r_factor("G729") == pytest.approx(93.2 - 11, abs=0.05)
    # Ie,eff = Ie + (95 - Ie) * Ppl / (Ppl / BurstR + Bpl)
    assert emodel.effective_ie("PCMU", 2.0) == pytest.approx(95 * 2 / (2 + 25.1), abs=1e-9)
    assert emodel.effective_ie("G711_NOPLC", 2.0) == pytest.approx(95 * 2 / (2 + 4.3), abs=1e-9)
    assert emodel.effective_ie("PCMU", 5.0, burst_ratio=2.0) == pytest.approx(95 * 5 / (2.5 + 25.1))


def test_delay_impairment_idd_term():
    # Idd = 0 up to 100 ms; at Ta = 200 ms, X = 1: Idd = 25 * ((1+1)^(1/6) - 3 (1+1/729)^(1/6) + 2).
    x = 25 * (2 ** (1 / 6) - 3 * (1 + 1 / 729) ** (1 / 6) + 2)
    assert emodel._idd(100) == 0.0
    assert emodel._idd(200) == pytest.approx(x, abs=1e-9)
    rs = [emodel.r_factor(delay_ms=d) for d in (0, 100, 200, 300, 400, 600)]
    assert rs == sorted(rs, reverse=True)
    assert emodel.mos(loss_pct=100) < 1.5


def test_quality_mos_from_stream_stats():
    good = Quality(codec="PCMU", rx_packets=1000, rx_lost=0, jb_delay_ms=40, rtt_ms=20)
    lossy = Quality(codec="PCMU", rx_packets=950, rx_lost=50, jb_delay_ms=40, rtt_ms=20)
    assert good.loss_ratio == 0 and lossy.loss_ratio == pytest.approx(0.05)
    assert 4.3 < good.mos < 4.41
    assert lossy.mos < good.mos - 0.4
    d = lossy.as_dict()
    assert d["loss_ratio"] == 0.05 and d["mos"] == round(lossy.mos, 3)
    # 30 ms of jitter, no network loss: the jitter buffer threw 15 % away as too late; the caller
    # heard concealment for those, and the MOS says so (it did not: it read RTCP loss only)
    late = Quality(codec="PCMU", rx_packets=1000, rx_lost=0, jb_delay_ms=40, rtt_ms=20, jb_discarded=150)
    assert late.loss_ratio == 0 and late.late_ratio == pytest.approx(0.15)
    assert late.mos < lossy.mos and late.as_dict()["late_ratio"] == 0.15
    both = Quality(codec="PCMU", rx_packets=950, rx_lost=50, jb_delay_ms=40, jb_discarded=50)
    assert both.heard_loss_ratio == pytest.approx(0.1)


# ---- frames and queues -----------------------------------------------------
def test_frame_sizes_and_split():
    assert bytes_per_frame(8000) == 320 and bytes_per_frame(16000) == 640
    frames = split_frames(b"\x01" * 700, 8000)
    assert [len(f) for f in frames] == [320, 320, 320]
    assert frames[-1][60:] == bytes(260)
    assert len(split_frames(b"\x01" * 700, 8000, pad=False)) == 2


def test_frame_queue_drops_oldest_and_counts():
    q = FrameQueue(3)
    for i in range(5):
        q.push(i)
    assert q.dropped == 2 and q.pushed == 5
    assert q.drain() == [2, 3, 4]
    assert q.pop() is None
    q.push(9)
    assert q.clear() == 1 and len(q) == 0


def test_frame_timer_rate_percentiles_and_gaps():
    t = FrameTimer()
    now = 100.0
    for i in range(500):
        now += 0.020 if i % 100 else 0.080       # a stall every 100 frames...
        t.tick(now)
        if i % 100 == 0 and i:
            for _ in range(3):                   # ...followed by a burst of late ticks
                now += 0.0
                t.tick(now)
    s = t.summary()
    assert s.gaps == 4
    assert s.max == pytest.approx(0.080)
    assert s.p50 == pytest.approx(0.020)
    assert s.frames == 512
    assert len(t.take_intervals()) == 511 and t.take_intervals() == []


def test_percentile_nearest_rank():
    v = sorted(range(1, 101))
    assert percentile(v, 50) == 50 and percentile(v, 99) == 99 and percentile(v, 100) == 100
    assert percentile([], 99) == 0.0


def test_callmedia_counts_silence_and_flushes():
    m = CallMedia(8000, uplink_frames=2, downlink_frames=10)
    m.rx(b"a", 1.0)
    m.rx(b"b", 1.02)
    m.rx(b"c", 1.04)
    assert m.uplink.dropped == 1 and m.uplink.drain() == [(1.02, b"b"), (1.04, b"c")]
    assert m.tx(2.0) is None and m.tx_silence == 1
    x, y = bytes(4), bytes(4)
    m.downlink.push(x)
    m.downlink.push(y)
    m.mark_frame(y)
    assert m.tx(2.02) is x and m.mark_time is None
    assert m.tx(2.04) is y and m.mark_time == 2.04 and m.tx_frames == 2
    m.downlink.push(bytes(4))
    assert m.flush_out() == 1 and m.tx(2.06) is None


# ---- resampling, codecs, WAV -------------------------------------------------
def _tone(freq, rate, seconds=1.0, amp=8000):
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * math.pi * freq * t)).astype("<i2").tobytes()


@pytest.mark.parametrize("src, dst", [(8000, 16000), (16000, 8000), (22050, 8000), (22050, 16000), (48000, 8000)])
def test_resample_keeps_frequency_and_length(src, dst):
    out = np.frombuffer(resample(_tone(440, src), src, dst), "<i2").astype(float)
    assert abs(out.size - dst) <= 2
    peak = np.argmax(np.abs(np.fft.rfft(out))) * dst / out.size
    assert abs(peak - 440) < 2
    assert 0.9 < np.abs(out[dst // 10:-dst // 10]).max() / 8000 < 1.1


def test_resample_streaming_matches_whole_buffer():
    x = _tone(300, 22050, 0.5)
    r = Resampler(22050, 8000)
    chunks = b"".join(r.process(x[i:i + 882]) for i in range(0, len(x), 882))
    whole = resample(x, 22050, 8000)
    a, b = np.frombuffer(chunks, "<i2"), np.frombuffer(whole, "<i2")
    n = min(a.size, b.size)
    assert abs(a.size - b.size) <= 1 and np.abs(a[:n].astype(int) - b[:n]).max() <= 1


def test_downsampling_filters_what_would_alias():
    # 6 kHz does not exist at 8 kHz; without a low-pass it would fold to 2 kHz.
    out = np.frombuffer(resample(_tone(6000, 22050), 22050, 8000), "<i2").astype(float)
    assert np.abs(out[100:-100]).max() < 0.01 * 8000   # (the very start has the onset click)


def test_g711_round_trip_within_quantisation():
    x = np.frombuffer(_tone(1000, 8000, 0.1), "<i2").astype(int)
    for enc, dec in ((g711.ulaw_encode, g711.ulaw_decode), (g711.alaw_encode, g711.alaw_decode)):
        y = np.frombuffer(dec(enc(x.astype("<i2").tobytes())), "<i2").astype(int)
        assert np.all(np.abs(y - x) <= np.maximum(16, np.abs(x) // 16))
    assert g711.decode(0, g711.encode(0, b"\x00\x10" * 80)) == g711.ulaw_decode(g711.ulaw_encode(b"\x00\x10" * 80))
    with pytest.raises(ValueError):
        g711.decode(18, b"")


def test_read_wav_mixes_down_and_resamples(tmp_path):
    p = tmp_path / "s.wav"
    left = np.frombuffer(_tone(500, 44100, 0.5), "<i2")
    stereo = np.stack([left, left], axis=1).astype("<i2").tobytes()
    write_wav(str(p), stereo, 44100, channels=2)
    pcm, rate = read_wav(str(p), 8000)
    assert rate == 8000 and abs(len(pcm) // 2 - 4000) <= 2


def test_read_wav_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(WavError, match="not a PCM WAV"):
        read_wav(str(bad))
    with pytest.raises(WavError, match="No such file"):
        read_wav(str(tmp_path / "missing.wav"))
    p8 = tmp_path / "u8.wav"
    with wave.open(str(p8), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(bytes([128, 255, 0]))
    pcm, _ = read_wav(str(p8))
    assert np.frombuffer(pcm, "<i2").tolist() == [0, 127 << 8, -128 << 8]
