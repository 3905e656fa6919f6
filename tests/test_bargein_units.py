"""Backchannels over the agent (issue 13), the parts around the turn machine: how a short
utterance's transcript is read (``read_short``, on what whisper tiny.en really returned for
Piper clips heard through G.711, see tests/bench/bargein.py) and the whisper prompt reaching
the engine through the hub and the inference process (the engine faked at its boundary).
The machine itself: tests/test_turn_machine.py."""
from multiprocessing import Pipe

import pytest

from ai import messages as m
from ai.worker import Worker
from bridge.agent.actions import Transcript
from bridge.agent.bargein import SHORT_PROMPT, read_short

# (clip the caller said, what whisper wrote, no_speech_prob, avg_logprob): 8 kHz u-law, 0.3 s before
# and 0.2 s after, plain or with SHORT_PROMPT; and the real call's "Mhm." transcripts.
GO_ON = [("Mhm. (call)", "and make them.", 0.16, -0.745), ("Mhm. (call)", "and make sure", 0.16, -0.978),
         ("Mhm. (call, prompted)", "And make some.", 0.016, -0.495), ("Hmm. (call, prompted)", "Damn.", 0.03, -0.55),
         ("Mm-hmm. (call, prompted)", "And Mm-hmm.", 0.017, -0.323), ("Hmm. (call, late)", "Done.", 0.02, -0.05),
         ("Okay. (glued)", "Okay, so...", 0.05, -0.2), ("hum", "But...", 0.43, -0.76),
         ("Hmm. (call, HEAD)", "Em.", 0.26, -0.925),
         ("Mhm.", "M-H-M.", 0.17, -0.36), ("Mm-hmm.", "MMM.", 0.15, -0.88), ("Hmm.", "Emp.", 0.38, -0.71),
         ("hum", "Emmett.", 0.26, -0.35), ("Uh-huh.", "up", 0.24, -1.21), ("Uh-huh. (call)", "Oh", 0.3, -0.81),
         ("Mhm. prompted", "Mm-hmm.", 0.02, -0.09), ("Uh-huh. prompted", "Uh-huh.", 0.04, -0.37),
         ("Okay.", "Okay.", 0.13, -0.36), ("I see.", "I see.", 0.25, -0.18), ("Got it.", "Got it.", 0.19, -0.14),
         ("noise", "Thank you.", 0.3, -0.4), ("noise", "you", 0.5, -0.6), ("Yes.", "Yes.", 0.17, -0.28),
         ("silence", "", 0.9, -2.0)]
TAKE_TURN = [("No.", "No.", 0.09, -0.34), ("Nope.", "Nope.", 0.11, -0.22), ("Stop.", "Stop.", 0.21, -0.32),
             ("Wait.", "Wait.", 0.18, -0.46), ("Wait, (call)", "Wait.", 0.36, -0.49),
             ("Hold on.", "Hold on.", 0.16, -0.17),
             ("What?", "What?", 0.28, -0.22), ("Sorry?", "Sorry.", 0.13, -0.34), ("Hello?", "Hello.", 0.08, -0.35),
             ("Excuse me.", "Excuse me.", 0.16, -0.14), ("No, Tuesday.", "No Tuesday", 0.07, -0.52),
             ("Not now.", "Not now.", 0.13, -0.12), ("Goodbye.", "Goodbye.", 0.05, -0.37),
             ("I'm busy.", "I'm busy.", 0.09, -0.14), ("unsure No.", "No.", 0.2, -0.85),
             ("Okay, wait.", "Okay, wait.", 0.1, -0.3), ("Don't.", "Don't.", 0.1, -0.2),
             ("Yes, please.", "Yes, please.", 0.05, -0.1)]


@pytest.mark.parametrize("said,text,no_speech,logprob", GO_ON, ids=[f"{g[0]}->{g[1]}" for g in GO_ON])
def test_backchannels_hums_and_hallucinations_let_the_agent_go_on(said, text, no_speech, logprob):
    v = read_short(Transcript(text, no_speech, logprob, 0.6, 0.3))
    assert v.go_on, v


@pytest.mark.parametrize("said,text,no_speech,logprob", TAKE_TURN, ids=[f"{g[0]}->{g[1]}" for g in TAKE_TURN])
def test_interruptions_and_confident_words_take_the_turn(said, text, no_speech, logprob):
    v = read_short(Transcript(text, no_speech, logprob, 0.6, 0.3))
    assert not v.go_on and v.why == "words", v


def test_a_lone_word_that_is_no_interruption_lets_the_agent_finish():
    """The price of hums read as words ("Emmett.", "them."): "Tuesday." alone does not cut the reply
    either (the caller is heard when they say more, or after the reply)."""
    assert read_short(Transcript("Tuesday.", 0.14, -0.32, 0.6, 0.3)).why == "unsure"
    assert read_short(Transcript("Tuesday please.", 0.14, -0.32, 0.6, 0.3)).why == "words"
    assert read_short(Transcript("And make some.", 0.02, -0.495, 0.6, 0.3)).why == "unsure"  # Piper's "Mhm."
    assert read_short(Transcript("and make them.", 0.16, -0.2, 0.6, 0.3)).why == "words"    # sure of them


class RecordingStt:
    """The whisper engine's boundary: records what it was asked."""
    def __init__(self):
        self.calls = []

    def transcribe(self, pcm, **kw):
        self.calls.append(kw)
        return type("R", (), {"text": "Mm-hmm.", "no_speech_prob": 0.02, "avg_logprob": -0.1,
                              "audio_seconds": len(pcm) / 32000, "seconds": 0.01})()


def test_the_worker_hands_the_prompt_to_whisper_and_only_when_asked():
    _, worker_end = Pipe()
    stt = RecordingStt()
    w = Worker(worker_end, stt, None, None)
    assert w._transcribe(m.SttRequest(1, "c", b"\x00" * 640, prompt=SHORT_PROMPT)).text == "Mm-hmm."
    w._transcribe(m.SttRequest(2, "c", b"\x00" * 640))
    assert stt.calls == [{"prompt": SHORT_PROMPT}, {}]


def test_the_hub_sends_the_prompt(tmp_path):
    from test_messages import loopback_hub
    hub = loopback_hub(tmp_path)
    rid = hub.stt("c1", b"\x00" * 640, False, on_result=lambda *a: None, prompt=SHORT_PROMPT)
    assert hub.client.sent == [m.SttRequest(rid, "c1", b"\x00" * 640, False, prompt=SHORT_PROMPT)]
