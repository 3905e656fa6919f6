"""Behind the front every call reaches a cell from the front's own address, which names no trunk:
the cell's records said "proxy" (or whichever trunk allowed the front's address) for every call.
The front now names the trunk it trusted (``X-Trunkline-Trunk``, set by Kamailio; a carrier's own
header of that name is removed there and never kept as a carrier header)."""
import time

from support import SCENARIOS, Api, BoxProcess, create_key, sipp


def test_a_cell_behind_the_front_records_the_trunk_the_call_came_from(tmp_path):
    cfg = ('[models]\nload = "never"\n'
           '[[trunks]]\nname = "first"\nallow = ["127.0.0.1/32"]\n'
           '[[trunks]]\nname = "second"\nallow = ["127.0.0.2/32"]\n')
    box = BoxProcess(tmp_path, 2, cfg).start(wait=False)
    try:
        box.wait_healthy(timeout=60)
        api = Api(box, create_key(box.data))
        spoof = tmp_path / "spoof.xml"                # a carrier naming another trunk itself
        spoof.write_text((SCENARIOS / "call_pcmu.xml").read_text()
                         .replace("Max-Forwards: 70", "Max-Forwards: 70\n      X-Trunkline-Trunk: t0\n      X-Account: 7"))
        for ip, scenario, port in (("127.0.0.1", "call_pcmu.xml", box.ports["sipp"]),
                                   ("127.0.0.2", str(spoof), box.ports["sipp"] + 1)):
            (tmp_path / ip).mkdir()
            res = sipp(scenario, box.sip, tmp_path / ip, "-d", "300", local_port=port, local_ip=ip)
            assert res.returncode == 0, res.stdout.decode(errors="replace")[-1500:]
        deadline = time.monotonic() + 15
        calls = []
        while time.monotonic() < deadline and len(calls) < 2:
            calls = [c for c in api.get("/v1/calls?state=ended")[1]["calls"]]
            time.sleep(0.3)
        by_source = {}
        for c in calls:
            full = api.get(f"/v1/calls/{c['id']}")[1]
            by_source["127.0.0.2" if "X-Account" in ((full.get("sip") or {}).get("headers") or {}) else "127.0.0.1"] = full
        assert by_source["127.0.0.1"]["trunk"] == "first", by_source
        assert by_source["127.0.0.2"]["trunk"] == "second", by_source     # not "t0"'s, whatever it said
        assert "X-Trunkline-Trunk" not in by_source["127.0.0.2"]["sip"]["headers"]
    finally:
        box.stop(timeout=60)
