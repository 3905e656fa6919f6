"""Turn-taking pieces of the agent, with made-up timestamps and real signals."""
import math

import numpy as np
import pytest

from ai.text import SentenceCutter, clean_for_speech
from ai.worker import FairQueue
from media import dtmf
from media.endpoint import EndpointConfig, Endpointer
from media.frames import FrameQueue
from media.level import normalize
from media.playout import Playout
from media.vad import VoiceDetector, rms_dbfs

RATE = 8000


def tone(freqs, seconds=0.02, amp=6000, rate=RATE):
    t = np.arange(int(rate * seconds)) / rate
    x = sum(amp * np.sin(2 * math.pi * f * t) for f in freqs)
    return x.astype("<i2").tobytes()


# ---- endpointing ------------------------------------------------------------------
def run(ep, pattern, start=0.0):
    """pattern: string of '1' (voiced) / '0' frames -> list of (frame index, event)."""
    out = []
    for i, c in enumerate(pattern):
        ev = ep.push(c == "1", start + i * 0.02)
        if ev:
            out.append((i, ev))
    return out


def test_short_noise_does_not_start_a_turn():
    ep = Endpointer()
    assert run(ep, "0011000100001100000" * 3) == []


def test_start_pause_end():
    ep = Endpointer(EndpointConfig(min_speech=0.12, pause=0.2, silence=0.6, min_utterance=0.25))
    events = run(ep, "0" * 5 + "1" * 40 + "0" * 40)
    assert [e for _, e in events] == ["start", "pause", "end"]
    (i_start, _), (i_pause, _), (i_end, _) = events
    assert i_start == 5 + 5            # 6 voiced frames = 120 ms
    assert i_pause == 45 + 9           # 10 quiet frames after the last voiced one (frame 44)
    assert i_end == 45 + 29


def test_speech_resuming_after_a_pause_is_one_turn():
    ep = Endpointer(EndpointConfig(pause=0.2, silence=0.6))
    events = [e for _, e in run(ep, "1" * 30 + "0" * 15 + "1" * 30 + "0" * 40)]
    assert events == ["start", "pause", "pause", "end"]


def test_too_short_utterance_is_noise():
    ep = Endpointer(EndpointConfig(min_speech=0.1, min_utterance=0.3, silence=0.4))
    assert [e for _, e in run(ep, "1" * 8 + "0" * 30)] == ["start", "noise"]


def test_extend_waits_longer_for_digits():
    ep = Endpointer(EndpointConfig(silence=0.6))
    run(ep, "1" * 20)
    ep.extend(0.8)
    events = run(ep, "0" * 100, start=0.4)
    assert events[-1][1] == "end" and events[-1][0] >= 69     # 1.4 s of quiet instead of 0.6


# ---- VAD and DTMF ---------------------------------------------------------------------
@pytest.mark.parametrize("key", list("123A456B789C*0#D"))
def test_dtmf_keys_detected(key):
    row = next(i for i, r in enumerate(dtmf.KEYS) if key in r)
    col = dtmf.KEYS[row].index(key)
    assert dtmf.detect(tone((dtmf.LOW[row], dtmf.HIGH[col])), RATE) == key


def test_vad_rejects_dtmf_silence_and_line_noise():
    vad = VoiceDetector(RATE, mode=3)
    assert not vad.is_speech(tone((697, 1209)))
    assert vad.last_dtmf == "1" or vad.last_dtmf is None
    assert not vad.is_speech(bytes(320))
    rng = np.random.default_rng(1)
    hiss = (rng.standard_normal(160) * 60).astype("<i2").tobytes()    # about -55 dBFS
    assert rms_dbfs(hiss) < -50 and not vad.is_speech(hiss)


def test_vad_hears_real_speech():
    from recorded import speech
    pcm = speech(rate=RATE)                 # stored Piper speech (tests/fixtures/)
    vad = VoiceDetector(RATE, mode=3)
    frames = [pcm[i:i + 320] for i in range(0, len(pcm) - 319, 320)]
    voiced = sum(vad.is_speech(f) for f in frames)
    assert voiced > 0.5 * len(frames)


# ---- sentence cutting -----------------------------------------------------------------
def feed_all(text, **kw):
    c = SentenceCutter(**kw)
    out = []
    for tok in text.replace(" ", " \x00").split("\x00"):    # word-sized tokens, spaces kept
        out += c.feed(tok)
    return out + c.flush()


def test_sentences_cut_as_tokens_arrive():
    assert feed_all("We open at 9 a.m. on Saturdays. Dr. Smith costs $3.50 per visit! Anything else?") == \
        ["We open at 9 a.m. on Saturdays.", "Dr. Smith costs $3.50 per visit!", "Anything else?"]


def test_first_chunk_may_cut_at_a_comma():
    out = feed_all("Sure thing, the cleaning appointment is available next Tuesday, at ten in the morning.")
    assert out[0] == "Sure thing, the cleaning appointment is available next Tuesday,"
    assert out[1] == "at ten in the morning."


def test_runaway_sentence_is_cut():
    out = feed_all(" ".join(["word"] * 95), max_words=40)
    assert all(len(s.split()) <= 41 for s in out) and sum(len(s.split()) for s in out) == 95


def test_clean_for_speech():
    assert clean_for_speech("**Sure!** Here's `code` # and [link]") == "Sure! Here's code and link"


# ---- playout and what the caller heard --------------------------------------------------
def test_flush_reports_heard_words():
    q = FrameQueue(100)
    p = Playout(ahead=3)
    p.add("Hello there.", [bytes(4)] * 4)
    p.add("We open at nine and close at five.", [bytes(4)] * 8)
    played = 0
    while played < 6:                        # the clock takes 6 frames
        p.fill(q, len(q))
        q.pop()
        played += 1
    p.fill(q, len(q))
    heard = p.flush(q.clear())
    assert heard.text == "Hello there. We open" and not heard.complete
    assert not p.active


def test_everything_heard_when_played_out():
    q = FrameQueue(100)
    p = Playout(ahead=2)
    p.add("One.", [bytes(2)] * 3)
    for _ in range(10):
        p.fill(q, len(q))
        q.pop()
    p.fill(q, len(q))
    assert p.take_heard() == "One." and not p.active


def test_normalize_level_and_peak():
    quiet = tone((440,), seconds=0.5, amp=300)
    out = np.frombuffer(normalize(quiet), "<i2")
    assert abs(rms_dbfs(out.tobytes()) - (-18)) < 1.0
    loud_spiky = np.zeros(4000, dtype="<i2")
    loud_spiky[::400] = 30000
    assert np.abs(np.frombuffer(normalize(loud_spiky.tobytes()), "<i2")).max() <= 0.9 * 32767


# ---- fair scheduling in the inference process --------------------------------------------
def test_fair_queue_round_robin_and_interim_coalescing():
    q = FairQueue()
    for i in range(3):
        q.put("a", ("a", i, False))
    q.put("b", ("b", 0, False))
    q.put("c", ("c", 0, True), replace_interim=True)
    q.put("c", ("c", 1, True), replace_interim=True)      # replaces the waiting interim
    order = [q.get(0)[1][:2] for _ in range(5)]
    assert order == [("a", 0), ("b", 0), ("c", 1), ("a", 1), ("a", 2)]
    assert q.get(0) is None
    q.put("a", ("a", 9, False))
    assert q.drop("a") == 1 and q.get(0) is None
