"""The SIP engine's live view reaches the cell as ``CallsSnapshot`` events, and draining as a command:
the loop never reads or writes the engine's structures across threads (sip/engine.py, bridge/cell/cell.py)."""
import asyncio
import math
import time
import types

import numpy as np

from bridge.api.routes import Api
from bridge.cell.cell import Cell
from bridge.core import config
from bridge.core.states import CallState
from media import g711
from media.quality import Quality
from sip import commands as cmd
from sip import events as ev
from support import Api as HttpApi, RtpPeer, create_key, sipp


class SealedEngine:
    """Stands in for the engine after start: takes commands, and fails on any other use."""

    def __init__(self):
        object.__setattr__(self, "commands", [])

    def submit(self, command):
        self.commands.append(command)
        command.future.set_result(None)
        return command.future

    def alive(self) -> bool:
        return False

    def __getattr__(self, name):
        raise AssertionError(f"the cell read engine.{name} across threads")

    def __setattr__(self, name, value):
        raise AssertionError(f"the cell wrote engine.{name} across threads")


def _cell(tmp_path) -> Cell:
    cfg = config.load(None, {"data_dir": str(tmp_path / "data"), "models.load": "never"}, environ={})
    return Cell(cfg)


def test_calls_active_and_quality_come_from_snapshots(tmp_path):
    cell = _cell(tmp_path)
    cell.engine = SealedEngine()
    try:
        q = Quality(codec="PCMU", clock_rate=8000, rx_packets=321, tx_packets=300, rx_jitter_ms=2.5)
        cell._on_event(ev.CallsSnapshot(2, {"c1": q}, False, 10.0))
        assert cell.metrics.calls_active._value.get() == 2
        assert cell.services.live_quality("c1") == q and cell.services.live_quality("nope") is None
        assert cell._codec_of("c1") == "PCMU"
        # the API's view of a live call shows the snapshot's quality
        cell.sessions["c1"] = types.SimpleNamespace(state=CallState.PROGRESSING)
        row = {"id": "c1", "direction": "inbound", "from_uri": "a", "to_uri": "b", "trunk": None, "app": "echo",
               "state": "ringing", "codec": "", "created": 1.0, "answered": None, "ended": None, "result": None,
               "reason": None, "quality": None}
        view = Api(cell.services)._call_view(row)
        assert view["state"] == "progressing" and view["quality"]["rx_packets"] == 321
        assert view["quality"]["mos"] > 4
        # a later snapshot replaces the view; an ended call drops out of it
        cell._on_event(ev.CallsSnapshot(0, {}, False, 11.0))
        assert cell.metrics.calls_active._value.get() == 0 and cell.services.live_quality("c1") is None
    finally:
        cell.store.close()


def test_drain_is_a_command_to_the_engine(tmp_path):
    cell = _cell(tmp_path)
    engine = cell.engine = SealedEngine()
    try:
        asyncio.run(cell.drain(timeout=0.1))
        assert [type(c) for c in engine.commands] == [cmd.SetDraining]
        assert engine.commands[0].draining is True
        assert cell.draining and cell.metrics.draining._value.get() == 1
    finally:
        cell.store.close()


def test_events_dispatch_by_type_through_one_table(tmp_path):
    cell = _cell(tmp_path)
    try:
        declared = {v for v in vars(ev).values() if isinstance(v, type) and v.__module__ == ev.__name__}
        assert set(cell._handlers) == declared              # every event the engine can send is handled
        cell._on_event(object())                            # anything else is ignored
        cell._on_event(ev.EngineStopped("boom"))
        assert cell.engine_failed == "boom" and cell.stopped.is_set()
    finally:
        cell.store.close()


def test_a_real_call_is_seen_through_snapshots(cell_factory, tmp_path):
    """A SIPp call on a real cell: /metrics counts it and the API shows its live quality while it lasts."""
    cell = cell_factory("[media]\nclock_rate = 8000\n")
    api = HttpApi(cell, create_key(cell.data, "read"))
    peer = RtpPeer(cell.ports["rtp_peer"])
    try:
        proc = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "3500", local_port=cell.ports["sipp"],
                    rtpport=cell.ports["rtp_peer"], background=True)
        peer.wait_remote()
        t = np.arange(160 * 100) / 8000
        tone = (6000 * np.sin(2 * math.pi * 440 * t)).astype("<i2")
        peer.stream([g711.ulaw_encode(tone[i:i + 160].tobytes()) for i in range(0, tone.size, 160)])
        active, live = None, None
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not (live and live["quality"]):
            active = cell.metrics()["trunkline_calls_active"]
            calls = api.get("/v1/calls?state=active")[1]["calls"]
            live = calls[0] if calls else None
            time.sleep(0.2)
        assert active == 1
        assert live["state"] == "progressing" and live["quality"]["rx_packets"] > 0
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        peer.close()
    cell.wait_event("call_ended")
    deadline = time.monotonic() + 3
    while cell.metrics()["trunkline_calls_active"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cell.metrics()["trunkline_calls_active"] == 0
