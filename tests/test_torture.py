"""RFC 4475 / RFC 5118 torture messages over UDP: the cell never crashes or hangs."""
import json
import socket
import time

import pytest

from support import SHARED, needs_shared, sipp

TORTURE = [SHARED / "testdata/sip/rfc4475", SHARED / "testdata/sip/rfc5118"]

pytestmark = needs_shared("testdata/sip/rfc4475/index.json", "testdata/sip/rfc5118/index.json")
if not all((d / "index.json").exists() for d in TORTURE):     # (the mark above says the same, per test)
    pytest.skip(f"../shared is absent: {TORTURE[0]} not found (set TRUNKLINE_SHARED)", allow_module_level=True)


def _messages():
    out = []
    for d in TORTURE:
        index = json.loads((d / "index.json").read_text())
        out += [(d / m["file"]).read_bytes() for m in index["messages"]]
    return out


def _blast(port: int, source_ip: str) -> int:
    msgs = _messages()
    assert len(msgs) >= 50
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source_ip, 0))
    for data in msgs:
        s.sendto(data, ("127.0.0.1", port))
        time.sleep(0.02)
    s.close()
    return len(msgs)


def _normal_call_works(cell, tmp_path):
    res = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "500", local_port=cell.ports["sipp"])
    assert res.returncode == 0, res.stdout.decode()[-2000:]
    assert "ANSWERED" in "".join(p.read_text() for p in tmp_path.glob("*_logs.log"))


def test_torture_from_untrusted_source(cell_factory, tmp_path):
    cell = cell_factory('[[trunks]]\nname = "t"\nallow = ["127.0.0.1/32"]\n')
    _blast(cell.ports["sip"], "127.0.0.9")
    time.sleep(0.5)
    assert cell.alive()
    assert cell.http_get("/healthz")[0] == 200
    assert not cell.events("call_offered")
    _normal_call_works(cell, tmp_path)


@pytest.mark.slow
@pytest.mark.sample
def test_torture_from_trusted_source(cell, tmp_path):
    """Valid torture INVITEs are answered; with no ACK they end after 64*T1, then calls flow again."""
    _blast(cell.ports["sip"], "127.0.0.1")
    assert cell.alive()
    assert cell.http_get("/healthz")[0] == 200
    deadline = time.monotonic() + 45
    while cell.metrics()["trunkline_calls_active"] > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cell.metrics()["trunkline_calls_active"] == 0
    _normal_call_works(cell, tmp_path)
