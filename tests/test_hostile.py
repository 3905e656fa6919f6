"""Hostile traffic against a cell: refused INVITEs without SDP, scanners (issue 11)."""
import shutil
import subprocess
import time

import pytest

from sipwire import UdpPeer
from support import sipp, sipp_file

TRUSTED_ONLY = '[[trunks]]\nname = "carrier"\nallow = ["127.0.0.1/32"]\n'


def _call_works(cell, tmp_path):
    res = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "300", local_port=cell.ports["sipp"])
    assert res.returncode == 0, res.stdout.decode()[-2000:]


def test_untrusted_invite_without_sdp_is_refused_and_the_cell_lives(cell_factory, tmp_path):
    """A late-offer INVITE from outside the allow-list used to abort the cell
    (pjsip_rx_data_free_cloned: Assertion 'rdata' failed) when refused inside the callback."""
    cell = cell_factory(TRUSTED_ONLY)
    dest = ("127.0.0.1", cell.ports["sip"])
    peer = UdpPeer("127.0.0.9")
    try:
        for _ in range(3):
            codes = peer.ask("INVITE", dest, sdp=False)
            assert codes and codes[-1] == 403, codes
    finally:
        peer.close()
    time.sleep(0.3)
    assert cell.alive(), cell.log_path.read_text()[-3000:]
    assert len(cell.wait_event("call_rejected", 3)) == 3
    _call_works(cell, tmp_path)


def test_full_cell_refuses_invite_without_sdp_with_503_and_keeps_its_calls(cell, tmp_path):
    """Three calls hold every slot; a late-offer INVITE from a trusted source gets 503
    and the three calls finish normally."""
    busy = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "4000", "-l", "3", "-r", "10",
                local_port=cell.ports["sipp"], calls=3, background=True)
    try:
        deadline = time.monotonic() + 10
        while cell.metrics()["trunkline_calls_active"] < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cell.metrics()["trunkline_calls_active"] == 3
        peer = UdpPeer("127.0.0.1")
        try:
            codes = peer.ask("INVITE", ("127.0.0.1", cell.ports["sip"]), sdp=False)
        finally:
            peer.close()
        assert codes and codes[-1] == 503, codes
        assert cell.alive(), cell.log_path.read_text()[-3000:]
        out, _ = busy.communicate(timeout=30)
    finally:
        if busy.poll() is None:
            busy.kill()
    assert busy.returncode == 0, out.decode()[-2000:]
    assert sipp_file(tmp_path, "_logs.log").count("ANSWERED") == 3
    assert cell.alive()


@pytest.mark.skipif(shutil.which("svwar") is None, reason="sipvicious (svwar) is not installed")
def test_svwar_invite_scan_does_not_kill_the_cell(cell_factory, tmp_path):
    """The stock scan from the issue: ``svwar -m INVITE`` over 100 extensions."""
    cell = cell_factory(TRUSTED_ONLY)
    r = subprocess.run(["svwar", "-m", "INVITE", "-e", "100-199", "--force", "-p", str(cell.ports["sip"]),
                        "127.0.0.1"], capture_output=True, text=True, timeout=120)
    assert cell.alive(), cell.log_path.read_text()[-3000:]
    report = r.stdout + r.stderr
    assert "weird" not in report.lower(), report
    _call_works(cell, tmp_path)
