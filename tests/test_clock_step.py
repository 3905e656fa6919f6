"""The wall clock stepped under a running cell (issue 14's fault list): an NTP correction of an
hour, forward in the middle of a call and back after it. ``tests/clockstep.c``, preloaded into
the cell, moves CLOCK_REALTIME (and gettimeofday/time) of that process only, as a step does;
CLOCK_MONOTONIC is left alone, as the kernel leaves it.

What must hold: the call goes on through the step with its audio (pjsip's and the cell's timers
run on the monotonic clock); its record's duration is the real one, not an hour off; and a
webhook retry scheduled before the clock went back is still sent within its backoff, not an hour
later (retries are kept on the wall clock so they outlive a restart)."""
from __future__ import annotations

import time

from support import Api, build_clockstep, create_key, sipp, step_clock
from test_api import ECHO, Receiver

HOUR = 3600.0


def wait_for(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def test_a_wall_clock_step_keeps_the_call_and_does_not_stall_webhook_retries(cell_factory, tmp_path):
    shim, offset = build_clockstep(tmp_path), tmp_path / "offset"
    step_clock(offset, 0)
    # a retry is due within 600 s (backoff is uniform below the cap): seconds, not the hour the clock went back
    cell = cell_factory(ECHO + "[webhooks]\nbase_delay = 600\nmax_delay = 600\n",
                        env={"LD_PRELOAD": str(shim), "CLOCKSTEP_FILE": str(offset)})
    api = Api(cell, create_key(cell.data))
    rx = Receiver(cell.ports["sip"] + 30, {"/hook": [500, 200]})
    status, wh, _ = api.post("/v1/webhooks", {"url": f"http://127.0.0.1:{rx.port}/hook", "topics": ["event:call_hangup"]})
    assert status == 201
    (tmp_path / "pcap").symlink_to("/usr/share/sip-tester")
    t0 = time.monotonic()
    caller = sipp("builtin:uac_pcap", cell.sip, tmp_path, "-mp", str(cell.ports["rtp_peer"]),
                  local_port=cell.ports["sipp"], background=True)
    time.sleep(2.0)
    step_clock(offset, HOUR)                                   # forward an hour, in the middle of the call
    assert caller.wait(40) == 0, caller.stdout.read().decode()[-2000:]
    length = time.monotonic() - t0
    # the hang-up's delivery failed once (500) at the stepped clock; its retry is set on that clock
    # (wait for the failure to be recorded, not only for the request: stepping back between the two
    # would set the retry on the corrected clock, and there would be nothing to correct)
    assert wait_for(lambda: len(rx.got) >= 1, 20)
    assert wait_for(lambda: (api.get("/v1/webhook-deliveries")[1]["deliveries"] or [{}])[0].get("attempts") == 1, 10)
    step_clock(offset, 0)                                      # NTP corrects it: an hour back
    assert wait_for(lambda: len(rx.got) >= 2, 30), "the retry waits out the clock step"
    assert wait_for(lambda: api.get("/v1/webhook-deliveries")[1]["deliveries"][0]["status"] == "delivered", 10)
    (d,) = api.get("/v1/webhook-deliveries")[1]["deliveries"]
    assert d["attempts"] == 2
    (ended,) = cell.wait_event("call_ended")
    call = api.get(f"/v1/calls/{ended['call_id']}")[1]
    assert call["result"] == "answered", call
    # the record's times keep their distances: talk time is the real length, not an hour more
    assert 2.0 < call["ended"] - call["answered"] < length + 1.0, call
    q = call["quality"]
    assert q["rx_packets"] > 150 and q["mos"] > 4.0       # audio went on through the step
    assert cell.alive() and "Traceback" not in cell.log_path.read_text()
    assert "the wall clock went back" in cell.log_path.read_text()
