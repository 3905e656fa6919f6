"""The API's transcribe (bridge/api/speaking.py Transcriber) at the model boundary: interim
decodes only while its call is the one call of the cell whose caller is transcribed."""
import copy
from types import SimpleNamespace

from bridge.api.speaking import Transcriber
from bridge.core.config import DEFAULTS
from recorded import speech_frames
from test_agent_flow import AgentCalls

RATE = 8000
SPEECH = speech_frames(rate=RATE)            # ~1.9 s of a spoken sentence


class Hub(AgentCalls):
    def __init__(self):
        self.calls, self.stt_reqs, self.cancelled = set(), [], []

    def stt(self, call, pcm, interim, on_result, on_error=None):
        self.stt_reqs.append((call, interim))

    def stt_backlog(self):
        return 0                              # the engine is idle: only the call count holds interims back

    def cancel(self, call):
        self.cancelled.append(call)


def session(call_id):
    return SimpleNamespace(call_id=call_id, services=SimpleNamespace(cell_id=0), media=SimpleNamespace(rate=RATE),
                           transcribers={}, emit=lambda *a: None, record_transcript=lambda *a, **k: None)


def transcriber(hub, call_id, direction="in"):
    s = session(call_id)
    cfg = copy.deepcopy(DEFAULTS["agent"])
    cfg["interim_every"] = 0.5
    tr = Transcriber(s, hub, s.emit, direction, cfg)
    s.transcribers[tr.id] = tr
    return tr


def talk(tr, start=0.0):
    for i, f in enumerate(SPEECH):
        tr.on_frame(start + i * 0.02, f)


def test_interims_only_while_the_call_is_the_one_being_transcribed():
    hub = Hub()
    a, b = transcriber(hub, "call-a"), transcriber(hub, "call-b")
    transcriber(hub, "call-c", direction="out")          # hears only our speech: needs no decodes
    assert hub.model_calls() == 2
    talk(a)
    assert [r for r in hub.stt_reqs if r[1]] == [], "an interim while another caller could stop any moment"
    b.stop()
    assert hub.calls == {"call-a"} and "call-b/tr" in hub.cancelled
    talk(a, 10.0)
    assert [r for r in hub.stt_reqs if r[1]], "alone, the call gets its live transcript again"
    a.stop()
    assert hub.calls == set()
