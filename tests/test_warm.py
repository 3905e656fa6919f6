"""What a first call would otherwise pay is paid at start: the inference process decodes once
before it says it is ready (CTranslate2 allocates ~57 MB and its threads on the first decode, on
the first caller's turn after every restart), and a cell that routes calls to the agent loads
the Silero VAD session before its first call (onnxruntime, ~50 MB, was loaded on the cell's
event loop by the first agent call). Found by the soak (tests/bench/soak.py): both showed up as
memory growth after warm-up. Real bundled models, real processes."""
import queue
import time

from ai import messages as m
from ai.client import InferenceClient
from bridge.agent.hub import worker_config
from bridge.core.config import load


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


def test_the_inference_process_has_decoded_once_when_it_says_ready():
    got: queue.Queue = queue.Queue()
    cfg = {**worker_config(load(None)), "engines": ["stt"], "turn_model": "none"}
    client = InferenceClient(cfg, got.put)
    client.start(timeout=120)
    try:
        time.sleep(0.5)
        before = _rss_kb(client.proc.pid)
        client.send(m.SttRequest(rid=1, call="c1", pcm=bytes(2 * 16000)))
        msg = got.get(timeout=30)
        assert isinstance(msg, m.SttResult), msg
        grew = _rss_kb(client.proc.pid) - before
        # without the decode at start the first request grew the process by ~57 MB
        assert grew < 20_000, f"the first decode after Ready grew the inference process by {grew} kB"
    finally:
        client.stop()


def test_a_cell_that_routes_to_the_agent_loads_its_vad_before_the_first_call(cell_factory):
    c = cell_factory('[numbers]\n"100" = "agent"\n')
    maps = open(f"/proc/{c.proc.pid}/maps").read()
    assert "onnxruntime" in maps, "the Silero VAD session was not loaded at start"


def test_an_echo_cell_does_not_load_the_vad(cell_factory):
    c = cell_factory()
    assert "onnxruntime" not in open(f"/proc/{c.proc.pid}/maps").read()
