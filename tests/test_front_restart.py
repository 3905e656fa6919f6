"""The front dies by SIGKILL: its workers must not outlive it holding the SIP port, and the
supervisor must bring a working front back (found by the soak, tests/bench/soak.py: the
restart looped twice a second with "kamailio exited (255)" while orphaned workers held the port)."""
import os
import signal
import time

from support import Api, BoxProcess, create_key, sipp


def _kamailios(config_path: str) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                args = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if config_path.encode() in args and os.path.basename(args[0]).startswith(b"kamailio"):
                out.append(int(p))
    return out


def test_front_killed_by_sigkill_comes_back_and_takes_calls(tmp_path):
    box = BoxProcess(tmp_path, 2, '[models]\nload = "never"\n').start(wait=False)
    try:
        box.wait_healthy(timeout=60)
        cfg = str(box.run_dir / "kamailio.cfg")
        res = sipp("call_pcmu.xml", box.sip, tmp_path, "-d", "200", local_port=box.ports["sipp"])
        assert res.returncode == 0, res.stdout.decode(errors="replace")[-1500:]
        before = _kamailios(cfg)
        main = [p for p in before if int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) == box.proc.pid]
        assert len(main) == 1 and len(before) > 1
        os.kill(main[0], signal.SIGKILL)
        # the old workers are gone and a new front answers calls
        deadline = time.monotonic() + 30
        ok = False
        while time.monotonic() < deadline and not ok:
            time.sleep(1.0)
            res = sipp("call_pcmu.xml", box.sip, tmp_path, "-d", "200", local_port=box.ports["sipp"] + 1,
                       timeout=5)
            ok = res.returncode == 0
        assert ok, (box.run_dir / "kamailio.log").read_text(errors="replace")[-2000:]
        assert not set(before) & set(_kamailios(cfg)), "workers of the killed front are still running"
        restarts = (box.run_dir / "kamailio.log").read_text(errors="replace").count("restarting it")
        assert restarts <= 3, f"the front was restarted {restarts} times"
    finally:
        box.stop(timeout=60)
    assert not _kamailios(cfg)


def _kill_front(box) -> None:
    cfg = str(box.run_dir / "kamailio.cfg")
    main = [p for p in _kamailios(cfg) if int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
            == box.proc.pid]
    assert len(main) == 1
    os.kill(main[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = [p for p in _kamailios(cfg) if p != main[0]]
        if now and "front_started" in box.log_path.read_text(errors="replace").split("kamailio exited")[-1]:
            time.sleep(1.0)                                   # its workers are up
            return
    raise AssertionError("the front did not come back")


def test_calls_up_across_a_front_restart_still_end_from_either_side(tmp_path):
    """Dialog state lives in the front's memory: after a kill -9 the new front did not know the
    calls in progress, answered their BYEs 481, and the cells kept them (with no RTP timeout: for
    ever), until every cell was full (the soak: minutes of 503s after the fault). Now a BYE from
    the carrier reaches the cell its Request-URI names, and a cell's BYE reaches the trunk."""
    box = BoxProcess(tmp_path, 2, '[models]\nload = "never"\n[sip]\nrtp_timeout = 0\n').start(wait=False)
    try:
        box.wait_healthy(timeout=60)
        api = Api(box, create_key(box.data, "control"))
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        # b: the carrier waits for the box to hang up; a: the carrier hangs up after 6 s
        b = sipp("wait_bye.xml", box.sip, tmp_path / "b", local_port=box.ports["sipp"] + 1, background=True,
                 timeout=40)
        deadline = time.monotonic() + 15
        active = []
        while time.monotonic() < deadline and not active:
            time.sleep(0.3)
            active = api.get("/v1/calls?state=active")[1].get("calls", [])
        assert len(active) == 1, active
        call_b = active[0]["id"]
        a = sipp("call_pcmu.xml", box.sip, tmp_path / "a", "-d", "6000", local_port=box.ports["sipp"],
                 background=True, timeout=40)
        # c: SIPp's built-in uac sends its BYE to the front's own address (no Contact, no Route)
        (tmp_path / "c").mkdir()
        c = sipp("builtin:uac", box.sip, tmp_path / "c", "-d", "6000", local_port=box.ports["sipp"] + 2,
                 background=True, timeout=40)
        time.sleep(1.5)
        assert len(api.get("/v1/calls?state=active")[1]["calls"]) == 3
        _kill_front(box)
        assert a.wait(40) == 0, a.stdout.read().decode(errors="replace")[-1500:]     # its BYE got 200
        assert c.wait(40) == 0, c.stdout.read().decode(errors="replace")[-1500:]
        status, _, _ = api.post(f"/v1/calls/{call_b}/hangup")
        assert status in (200, 202), status
        assert b.wait(40) == 0, b.stdout.read().decode(errors="replace")[-1500:]     # the cell's BYE arrived
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and api.get("/v1/calls?state=active")[1]["calls"]:
            time.sleep(0.3)
        assert api.get("/v1/calls?state=active")[1]["calls"] == []                  # no call held in a cell
        log = (box.run_dir / "kamailio.log").read_text(errors="replace")
        assert "a dialog from before the front restarted" in log
    finally:
        box.stop(timeout=60)


def test_front_socket_is_never_one_of_the_cells_rtp_ports(tmp_path):
    """The soak found cell 0's first RTP port taken by the front's internal socket: the port
    picked for it was the first free one after the cells' SIP ports, which is where
    `--rtp-ports` began."""
    from bridge.box.supervisor import Supervisor
    from bridge.core import config
    cfg = config.load(None, {"sip.listen": "127.0.0.1:20000", "http.listen": "127.0.0.1:20003",
                             "media.rtp_ports": "20106-20165", "data_dir": str(tmp_path),
                             "cells.sip_base": 20100, "cells.http_base": 20103})
    sup = Supervisor(cfg, 3, None)
    assert not 20106 <= sup.front_port <= 20165
    assert sup.front_port not in {c.sip_port for c in sup.cells} | {c.http_port for c in sup.cells}


def test_stopping_the_front_leaves_no_kamailio_behind(tmp_path):
    """A stopped box once left three Kamailio workers running (their main process had exited;
    they had SIGTERM blocked), holding the front's sockets until the next start. Stopping the
    front now also kills whatever still runs on its config. Fakes named "kamailio" stand in:
    the main process (it exits on SIGTERM) and a worker that ignores SIGTERM."""
    import subprocess
    import sys
    from bridge.box.supervisor import Supervisor
    from bridge.core import config

    cfg_path = tmp_path / "box.toml"
    cfg_path.write_text(f'data_dir = "{tmp_path}"\n[sip]\nlisten = "127.0.0.1:5060"\n')
    sup = Supervisor(config.load(str(cfg_path), environ={}), 2, str(cfg_path))
    front = str(tmp_path / "run" / "kamailio.cfg")
    main = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
            "[time.sleep(0.05) for _ in range(1200)]")
    worker = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    procs = [subprocess.Popen(["bash", "-c", f'exec -a kamailio {sys.executable} -c "$0" -DD -f {front}', code])
             for code in (main, worker)]
    try:
        time.sleep(0.5)
        sup.kamailio, sup.front_config = procs[0], front
        sup.stop_front()
        assert procs[0].wait(5) == 0
        assert procs[1].wait(5) == -signal.SIGKILL, "a worker outlived the front"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
