"""Outbound caller ID: the number a carrier sees on a call the box places (trunk ``caller_id``,
``caller_ids``, ``from_domain``, ``asserted_identity``; ``POST /v1/calls`` ``from`` and
``withhold_caller_id``). Carriers refuse or relabel calls whose From user is not a number they
gave the customer; before this, every outbound call said ``sip:trunkline@<the cell's host>``
(on a box of several hosts, a cell's private address). The far end is SIPp; what it received is
read from its message trace."""
from __future__ import annotations

import re
import time

import pytest

from bridge.core.config import ConfigError, load
from sip.config import TrunkSpec
from sip.uri import ANONYMOUS, Identity, caller_identity
from support import Api, create_key, next_ports, sipp, sipp_file

ECHO = '[models]\nload = "never"\n'


def test_the_identity_of_an_outbound_call():
    t = TrunkSpec("c", address="sip:203.0.113.5:5070", caller_id="+15550001111")
    # the trunk's number at the host the call goes to (no public address)
    assert caller_identity(t, "", False, "", t.address) == Identity("<sip:+15550001111@203.0.113.5>")
    # the public address, then from_domain, win over the trunk's host
    assert caller_identity(t, "", False, "198.51.100.9", t.address).from_uri == "<sip:+15550001111@198.51.100.9>"
    assert caller_identity(t, "", False, "2001:db8::9", t.address).from_uri == "<sip:+15550001111@[2001:db8::9]>"
    assert caller_identity(TrunkSpec("6", caller_id="123"), "", False, "", "sip:[2001:db8::7]:5070").from_uri == \
        "<sip:123@[2001:db8::7]>"
    d = TrunkSpec("d", address=t.address, caller_id="15550001111", from_domain="voice.example.com:5080",
                  asserted_identity=True)
    assert caller_identity(d, "", False, "198.51.100.9", d.address) == Identity(
        "<sip:15550001111@voice.example.com>", (("P-Asserted-Identity", "<sip:15550001111@voice.example.com>"),))
    # a call's own number replaces the trunk's
    assert caller_identity(t, "+15550002222", False, "", t.address).from_uri == "<sip:+15550002222@203.0.113.5>"
    # withheld: anonymous From, the number asserted for the carrier only (RFC 3325)
    assert caller_identity(t, "", True, "", t.address) == Identity(
        ANONYMOUS, (("P-Asserted-Identity", "<sip:+15550001111@203.0.113.5>"), ("Privacy", "id")))
    # nothing configured: the account's own identity, or anonymous with nothing asserted
    bare = TrunkSpec("b", address=t.address)
    assert caller_identity(bare, "", False, "", bare.address) == Identity()
    # through the default account (a URI, no trunk named): its user at the trunk's host, not the cell's
    assert caller_identity(bare, "", False, "", bare.address, "trunkline") == Identity("<sip:trunkline@203.0.113.5>")
    assert caller_identity(None, "", False, "", "sip:5551234@198.51.100.4:5060", "trunkline").from_uri == \
        "<sip:trunkline@198.51.100.4>"
    # no host to go by: the account's own From, never "sip:n@"
    assert caller_identity(TrunkSpec("p", caller_id="123"), "", False, "", "") == Identity()
    assert caller_identity(bare, "", True, "", bare.address) == Identity(ANONYMOUS, (("Privacy", "id"),))


@pytest.mark.parametrize("key,value", [("caller_id", "trunkline"), ("caller_id", "+1555\r\nX-Evil: 1"),
                                       ("caller_ids", ["+15550001111", "12"]), ("from_domain", "a.example>;x=1"),
                                       ("from_domain", "host:99999"), ("from_domain", "[::1"), ("from_domain", "2001:db8::1"),
                                       ("from_domain", "[::1]x"), ("caller_id", "+15550001111\n"), ("from_domain", "a.example\n"),
                                       ("from_domain", "[fe80::1%eth0]"), ("from_domain", "h:\u00b2")])
def test_the_config_refuses_what_would_ride_into_headers(tmp_path, key, value):
    import json
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[trunks]]\nname = "c"\naddress = "sip:127.0.0.1:5070"\n{key} = {json.dumps(value)}\n')
    with pytest.raises(ConfigError, match=rf"trunks\[0\]\.{key}"):
        load(str(cfg))


def _invites(tmp_path) -> list[str]:
    msgs = sipp_file(tmp_path, "_messages.log")
    return [m.split("\n\n", 1)[0] for m in re.split(r"\n(?=INVITE sip:)", msgs) if m.startswith("INVITE sip:")]


def _header(invite: str, name: str) -> str | None:
    m = re.search(rf"^{name}:\s*(.*)$", invite, re.M | re.I)
    return m.group(1).strip() if m else None


def test_outbound_calls_present_the_trunks_numbers_and_only_those(cell_factory, tmp_path):
    far = next_ports()
    host = "127.0.0.2"          # the carrier, on another address than the cell's (127.0.0.1)
    addr = f"{host}:{far['sipp']}"
    uas = sipp("uas_answer.xml", "", tmp_path, local_port=far["sipp"], background=True, calls=5, timeout=40,
               local_ip=host)
    time.sleep(0.3)
    cell = cell_factory(ECHO + f'[[trunks]]\nname = "carrier"\naddress = "sip:{addr}"\n'
                        'caller_id = "+15550001111"\ncaller_ids = ["+15550002222"]\nasserted_identity = true\n'
                        f'[[trunks]]\nname = "plain"\naddress = "sip:{addr}"\n'
                        f'[[trunks]]\nname = "other"\naddress = "sip:127.0.0.3:{far["sipp"]}"\n')
    api = Api(cell, create_key(cell.data))
    placed = []
    try:
        # a number the trunk does not own is refused before anything is sent; so is one without a trunk
        for body, field in (({"to": "5551000", "trunk": "carrier", "from": "+19998887777"}, "from"),
                            ({"to": "5551000", "trunk": "plain", "from": "+15550001111"}, "from"),
                            ({"to": f"sip:5551000@{addr}", "from": "+15550001111"}, "from"),
                            ({"to": "5551000", "trunk": "carrier", "from": "+1555 0001111"}, "from"),
                            ({"to": "5551000", "trunk": "carrier", "from": "+15550001111\n"}, "from"),
                            # the trunk's number toward another trunk's carrier
                            ({"to": f"sip:5551000@127.0.0.3:{far['sipp']}", "trunk": "carrier",
                              "from": "+15550001111"}, "from"),
                            # nothing to assert: an anonymous call the carrier cannot trace
                            ({"to": "5551000", "trunk": "plain", "withhold_caller_id": True}, "withhold_caller_id")):
            status, err, _ = api.post("/v1/calls", body)
            assert status == 400 and err["error"]["field"] == field, (body, err)
        for body in ({"to": "5551001", "trunk": "carrier"},
                     {"to": "5551002", "trunk": "carrier", "from": "+15550002222"},
                     {"to": "5551003", "trunk": "carrier", "withhold_caller_id": True},
                     {"to": "5551004", "trunk": "plain"},
                     {"to": f"sip:5551005@{addr}"}):
            status, out, _ = api.post("/v1/calls", body)
            assert status == 201, out
            placed.append(out["id"])
            deadline = time.monotonic() + 10
            while api.get(f"/v1/calls/{out['id']}")[1].get("state") != "progressing":
                assert time.monotonic() < deadline, api.get(f"/v1/calls/{out['id']}")
                time.sleep(0.05)
            view = api.get(f"/v1/calls/{out['id']}")[1]
            assert api.post(f"/v1/calls/{out['id']}/hangup")[0] == 200
            placed[-1] = view
        out, _ = uas.communicate(timeout=30)
        assert uas.returncode == 0, out.decode()[-2000:]
    finally:
        if uas.poll() is None:
            uas.kill()
    invites = _invites(tmp_path)
    assert [re.match(r"INVITE sip:(\d+)@", i).group(1) for i in invites] == ["5551001", "5551002", "5551003", "5551004", "5551005"]
    first, second, withheld, plain, uri = invites
    assert re.fullmatch(rf"<sip:\+15550001111@{re.escape(host)}>;tag=\S+", _header(first, "From")), first
    assert _header(first, "P-Asserted-Identity") == f"<sip:+15550001111@{host}>"
    assert _header(first, "Privacy") is None
    assert _header(second, "From").startswith(f"<sip:+15550002222@{host}>")
    assert _header(second, "P-Asserted-Identity") == f"<sip:+15550002222@{host}>"
    assert _header(withheld, "From").startswith('"Anonymous" <sip:anonymous@anonymous.invalid>')
    assert _header(withheld, "P-Asserted-Identity") == f"<sip:+15550001111@{host}>"
    assert _header(withheld, "Privacy") == "id"
    # a trunk without a number: the box's own identity at the trunk's host, not the cell's address
    # (was sip:trunkline@127.0.0.1, the cell's host: on a box of several hosts, a private address)
    assert re.match(rf"<?sip:trunkline@{re.escape(host)}[>;]", _header(plain, "From")), plain
    assert _header(plain, "P-Asserted-Identity") is None
    # a URI at a trunk's address, no trunk named: that trunk's number (the first trunk at the address)
    assert _header(uri, "From").startswith(f"<sip:+15550001111@{host}>"), uri
    # the call record keeps what was presented
    assert "+15550001111" in placed[0]["from"] and "+15550002222" in placed[1]["from"]
    assert "anonymous" in placed[2]["from"] and placed[2]["sip"]["asserted_identity"] == "+15550001111"
