"""The front dies by SIGKILL: its workers must not outlive it holding the SIP port, and the
supervisor must bring a working front back (found by the soak, tests/bench/soak.py: the
restart looped twice a second with "kamailio exited (255)" while orphaned workers held the port)."""
import os
import signal
import time

from support import BoxProcess, sipp


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
