"""The soak harness (tests/bench/soak.py, `make soak`) run for two minutes: a 3-cell box
behind its front under ~80 % load, every fault injected once at its known time, and the
harness's own verdict (growth, failed calls outside fault windows, events lost) must be clean.
The full run is `make soak DURATION=3600`; its figures are in the README."""
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))


# ~3.5 min on 2 cores, in `make test` (issue 14 asks for the 2-minute sample there). Short calls no
# longer fail outside the fault windows (an ended pjsua2 Call destroyed after its slot was reused hung
# up the next call, tests/test_slot_reuse.py; the front's failover, tests/test_front_failover.py).
@pytest.mark.slow
@pytest.mark.sample
def test_two_minute_soak_with_faults(tmp_path):
    import soak
    out = tmp_path / "soak.json"
    rc = soak.main(["--duration", "120", "--interval", "5", "--cells", "3", "--out", str(out),
                    "--keep", str(tmp_path / "run")])
    res = json.loads(out.read_text())
    kinds = {f["kind"] for f in res["faults"]}
    assert {"webhook_down", "kill_cell", "kill_inference", "stop_cell", "kill_front", "db_locked"} <= kinds
    if os.geteuid() == 0:
        assert "disk_full" in kinds
    for f in res["faults"]:
        if f["kind"] != "webhook_down":
            assert f["note"], f"fault {f['kind']} was not injected"
    # traffic really ran, through every fault
    assert res["calls"]["long"]["successful"] >= 5 and res["calls"]["short"]["successful"] >= 40
    # agent calls ran with their models, had turns both ways, a summary and a clean media stream each
    # (the verdict's problems list any that did not); the inference kill hit and was recovered from
    a = res["agent"]
    assert res["calls"]["agent"]["successful"] >= 3 and a["answered"] >= 3, (res["calls"]["agent"], a)
    assert a["caller_turns"] >= 2 and a["agent_turns"] >= 2 and a["streams"]["clean"] >= 2, a
    kill = next(f for f in res["faults"] if f["kind"] == "kill_inference")
    assert kill["note"].startswith("inference") and kill["result"] == {"cell_same": True, "inference_back": True}, kill
    assert res["transcript_rows"] == res["transcript_events"] > 0
    assert res["call_hangup_events"] >= res["calls"]["long"]["successful"] + res["calls"]["short"]["successful"]
    # Failed calls outside every fault's window: `make soak` counts any as a failure. This sample
    # shares 2 cores with the harness, SIPp and Kamailio (SIPp's own watchdog trips under that load
    # and bunches calls), so it allows 2 % of the calls, and never more than that, in the verdict.
    calls = res["calls"]["long"]["successful"] + res["calls"]["short"]["successful"]
    outside = res["calls"]["long"]["failed_outside_faults"] + res["calls"]["short"]["failed_outside_faults"]
    rest = [p for p in res["problems"] if "outside any fault's window" not in p]
    # The supervisor's descriptors that stepped up at faults (+6-7 after db_locked) were its webhook
    # keep-alive pool widening to the deliveries in flight after a backlog (tests/test_box_fds.py):
    # the verdict counts that pool apart and bounds it, so no tolerance is needed here any more.
    assert outside <= max(2, 0.02 * calls), res["calls"]
    assert rest == [], rest
    assert rc == (0 if outside == 0 and not rest else 1)
