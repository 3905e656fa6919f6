"""Typed messages between the inference hub and the inference process (ai/messages.py).

Every message survives a real multiprocessing pipe; the worker, driven over a
real pipe with fake engines (the model boundary), answers every request with
the typed reply the hub dispatches on.
"""
import dataclasses
import pickle
import threading
from multiprocessing import Pipe

import pytest

from ai import messages as m
from ai.worker import Worker

SAMPLES = [
    m.SttRequest(1, "call-1", b"\x01\x00" * 160, True),
    m.LlmRequest(2, "call-1", [{"role": "user", "content": "hi"}], {"max_tokens": 5, "tools": [{"name": "x"}]}),
    m.TtsRequest(3, "call-1", "hello"), m.TurnRequest(4, "call-1", b"\x00\x00" * 160), m.TurnResult(4, 0.91, 0.05),
    m.Cancel("call-1"), m.Release("call-1"), m.Stop(),
    m.SttResult(1, "hi there", 0.1, -0.2, 1.5, 0.3),
    m.Token(2, "Hel"), m.ToolChoice(2, {"tool": "x", "arguments": {"a": 1}, "id": "t1"}), m.LlmDone(2, 0.5, 7),
    m.Pcm(3, b"\x00\x01" * 100, 22050), m.TtsDone(3, 0.2),
    m.EngineError(3, "tts", "boom"), m.Ready({"pid": 1, "tts_rate": 22050}), m.Fatal("no model", "trace"),
    m.Died(-9),
]


def test_every_message_type_is_sampled():
    declared = {v for v in vars(m).values() if dataclasses.is_dataclass(v) and v.__module__ == m.__name__}
    assert declared == {type(x) for x in SAMPLES}


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_pickles_through_a_pipe(msg):
    a, b = Pipe()
    a.send(msg)
    got = b.recv()
    assert got == msg and type(got) is type(msg)
    assert pickle.loads(pickle.dumps(msg)) == msg


def test_messages_are_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.Token(1, "a").text = "b"


class FakeStt:
    def transcribe(self, pcm):
        return type("R", (), {"text": f"{len(pcm)} bytes", "no_speech_prob": 0.0, "avg_logprob": -0.1,
                              "audio_seconds": len(pcm) / 32000, "seconds": 0.01})()


class FakeLlm:
    parallel = False

    def __init__(self):
        self.released = []

    def stream(self, key, messages, params):
        assert params.max_tokens == 5          # the dict became GenParams in the worker
        yield "Hel"
        yield "lo"
        if params.tools:
            yield {"tool": "x", "arguments": {}, "id": "t1"}

    def release(self, key):
        self.released.append(key)


class FakeTts:
    rate = 16000

    def synthesize(self, text):
        yield text.encode()
        yield b"!"


def _drain(conn, until, timeout=5.0):
    out = []
    while conn.poll(timeout):
        msg = conn.recv()
        out.append(msg)
        if until(msg):
            return out
    raise AssertionError(f"no final message; got {out}")


def test_worker_answers_typed_requests_over_a_pipe():
    hub_end, worker_end = Pipe()
    llm = FakeLlm()
    w = Worker(worker_end, FakeStt(), llm, FakeTts())
    th = threading.Thread(target=w.run, daemon=True)
    th.start()
    try:
        hub_end.send(m.SttRequest(1, "c", b"\x00" * 320, False))
        assert _drain(hub_end, lambda x: x.rid == 1) == [m.SttResult(1, "320 bytes", 0.0, -0.1, 0.01, 0.01)]
        hub_end.send(m.LlmRequest(2, "c", [{"role": "user", "content": "hi"}], {"max_tokens": 5, "tools": [{}]}))
        got = _drain(hub_end, lambda x: isinstance(x, m.LlmDone))
        assert got[:3] == [m.Token(2, "Hel"), m.Token(2, "lo"), m.ToolChoice(2, {"tool": "x", "arguments": {},
                                                                                  "id": "t1"})]
        assert isinstance(got[3], m.LlmDone) and got[3].rid == 2 and got[3].tokens == 2
        hub_end.send(m.TtsRequest(3, "c", "ok"))
        got = _drain(hub_end, lambda x: isinstance(x, m.TtsDone))
        assert got[:2] == [m.Pcm(3, b"ok", 16000), m.Pcm(3, b"!", 16000)] and got[2].rid == 3
        hub_end.send(m.LlmRequest(4, "c", [], {"no_such_param": 1}))      # refused, the worker lives on
        err = _drain(hub_end, lambda x: x.rid == 4)[0]
        assert isinstance(err, m.EngineError) and err.engine == "llm" and "no_such_param" in err.message
        hub_end.send(m.Release("c"))
        hub_end.send(m.Stop())
        th.join(5)
        assert not th.is_alive() and llm.released == ["c"]
    finally:
        w.stopping = True


def test_worker_refuses_an_engine_it_has_not_loaded():
    hub_end, worker_end = Pipe()
    w = Worker(worker_end, None, FakeLlm(), None)
    assert w.handle(m.TtsRequest(9, "c", "hi"), 0.0) is True
    assert hub_end.recv() == m.EngineError(9, "tts", "the tts engine is not loaded in this process")
    assert w.handle(m.Stop(), 0.0) is False


class LoopbackClient:
    """The hub's end of the pipe, kept in memory: what the hub sends, and ids."""

    def __init__(self):
        self.sent, self.rid = [], 0

    def next_id(self):
        self.rid += 1
        return self.rid

    def send(self, msg):
        self.sent.append(msg)


def loopback_hub(tmp_path, metrics=None):
    """An ``AiHub`` on placeholder model files whose worker is a ``LoopbackClient`` (what it sends)."""
    from bridge.agent.hub import AiHub
    from bridge.core import config
    from bridge.core.metrics import Metrics
    (tmp_path / "stt-dir").mkdir()
    (tmp_path / "voice.onnx").write_bytes(b"")
    (tmp_path / "voice.onnx.json").write_text("{}")
    cfg = config.load(None, {"data_dir": str(tmp_path), "models.stt": str(tmp_path / "stt-dir"),
                             "models.tts": str(tmp_path / "voice.onnx"),
                             "models.llm_backend": "openai", "models.llm_url": "https://llm.example/v1",
                             "models.llm_model": "m"}, environ={})
    hub = AiHub(cfg, metrics or Metrics(), 16000)
    hub.client, hub.up = LoopbackClient(), True
    return hub


def test_hub_sends_typed_requests_and_dispatches_typed_replies(tmp_path):
    from bridge.core.metrics import Metrics
    metrics = Metrics()
    hub = loopback_hub(tmp_path, metrics)
    got = []
    rid = hub.stt("c1", b"\x00" * 640, True, on_result=lambda *a: got.append(("stt", a)))
    assert hub.client.sent == [m.SttRequest(rid, "c1", b"\x00" * 640, True)] and hub.stt_backlog() == 1
    hub._dispatch(m.SttResult(rid, "hello", 0.1, -0.3, 0.02, 0.01))
    assert got == [("stt", ("hello", 0.1, -0.3, 0.02, 0.01))] and hub.stt_backlog() == 0
    rid = hub.llm("c1", [{"role": "user", "content": "hi"}], {"max_tokens": 5}, on_token=lambda t: got.append(t),
                  on_done=lambda *a: got.append(("done", a)), on_error=None,
                  on_tool=lambda c: got.append(("tool", c)))
    assert hub.client.sent[-1] == m.LlmRequest(rid, "c1", [{"role": "user", "content": "hi"}], {"max_tokens": 5})
    for msg in (m.Token(rid, "Hi"), m.ToolChoice(rid, {"tool": "t"}), m.LlmDone(rid, 0.2, 1), m.Token(rid, "late")):
        hub._dispatch(msg)
    assert got[1:] == ["Hi", ("tool", {"tool": "t"}), ("done", (0.2, 1))]    # nothing after done
    errors = []
    rid = hub.tts("c1", "hi", on_result=lambda pcm, rate: got.append((pcm, rate)), on_error=errors.append)
    hub._dispatch(m.Pcm(rid, b"ab", 22050))
    hub._dispatch(m.EngineError(rid, "tts", "boom"))
    assert got[-1] == (b"ab", 22050) and errors == ["boom"]
    assert metrics.model_errors.labels("tts")._value.get() == 1
    rid = hub.tts("c2", "bye", on_result=lambda *a: got.append("late"))
    hub.cancel("c2")
    hub.release("c2")
    assert hub.client.sent[-2:] == [m.Cancel("c2"), m.Release("c2")]
    hub._dispatch(m.Pcm(rid, b"zz", 22050))                 # a reply after cancel is dropped
    assert got[-1] != "late"
