"""Outbound safety (issue 11): explicit digest realms, an allow-list of destinations for
API calls and transfers, trunk passwords masked in ``check-config``."""
import subprocess
import sys

import pytest

from bridge.core.config import ConfigError, load
from sip.config import TrunkSpec
from sip.uri import DestinationPolicy, check_destination
from support import ROOT, Api, create_key

CARRIER = TrunkSpec(name="carrier", address="sip:sip.carrier.example:5060", allow=["203.0.113.0/24"])
INBOUND = TrunkSpec(name="pbx", allow=["198.51.100.7/32"])


def _policy(patterns=(), fixed=()):
    return DestinationPolicy.of(patterns, fixed, [CARRIER, INBOUND])


# -- digest realm -------------------------------------------------------------------------

@pytest.mark.parametrize("realm", ["", 'realm = "*"\n'])
def test_credentials_without_an_explicit_realm_are_a_config_error(tmp_path, realm):
    """The realm used to default to "*": pjsua then answers any server's challenge."""
    path = tmp_path / "c.toml"
    path.write_text('[[trunks]]\nname = "carrier"\naddress = "sip:192.0.2.1"\nusername = "u"\n'
                    f'password = "pw"\nregister = true\n{realm}')
    with pytest.raises(ConfigError, match=r"trunks\[0\]\.realm: trunk 'carrier' has credentials"):
        load(str(path), environ={})


def test_an_explicit_realm_is_accepted(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[trunks]]\nname = "carrier"\naddress = "sip:192.0.2.1"\nusername = "u"\n'
                    'password = "pw"\nregister = true\nrealm = "carrier.example"\n')
    assert load(str(path), environ={}).trunks[0].realm == "carrier.example"


# -- destinations -------------------------------------------------------------------------

def test_default_rule_numbers_through_a_trunk_and_uris_only_at_trunks():
    p = _policy()
    assert check_destination("+15551230001", "carrier", p) is None
    assert "needs a trunk with an address" in check_destination("+15551230001", None, p)
    assert "needs a trunk with an address" in check_destination("+15551230001", "pbx", p)
    assert check_destination("sip:+15551230001@sip.carrier.example", None, p) is None
    assert check_destination("sip:bob@sip.carrier.example:5060;transport=udp", None, p) is None
    assert check_destination("sip:bob@198.51.100.7", None, p) is None          # inside a trunk's allow-list
    refusal = check_destination("sip:900123@evil.example", None, p)
    assert refusal and "default rule" in refusal and "sip.allowed_destinations" in refusal
    assert check_destination("sip:bob@sip.carrier.example:5099", None, p)      # another port, not the trunk
    assert check_destination("sip:bob@127.0.0.1:5060", None, p)
    assert check_destination("", "carrier", p) == "empty destination"


def test_operator_patterns():
    p = _policy(["+1*", "sip:*@pbx.example.com"])
    assert check_destination("+15551230001", "carrier", p) is None
    assert "sip.allowed_destinations" in check_destination("+449001234567", "carrier", p)
    assert check_destination("tel:+15551230001", "carrier", p) is None
    assert check_destination("sip:frontdesk@PBX.example.com", None, p) is None
    assert check_destination("sip:frontdesk@pbx.example.com.evil.example", None, p)
    assert check_destination("sip:+15551230001@sip.carrier.example", None, p) is None   # a number at a trunk
    assert check_destination("sip:+449001234567@sip.carrier.example", None, p)
    assert check_destination("sip:x@evil.example", None, p)


def test_operator_configured_transfer_targets_are_always_allowed():
    p = _policy(fixed=["sip:operator@192.0.2.50:5999"])
    assert check_destination("sip:operator@192.0.2.50:5999", None, p) is None
    assert check_destination("sip:other@192.0.2.50:5999", None, p)



@pytest.mark.parametrize("target", [
    "sip:bob@sip.carrier.example;maddr=203.0.113.66",            # pjsip sends to maddr
    "sip:bob@sip.carrier.example;MADDR=evil.example",
    "sip:bob@sip.carrier.example?Route=%3Csip:evil.example;lr%3E",  # copied into the INVITE
    "sip:bob@sip.carrier.example?route=<sip:evil.example;lr>",
    "sip:bob@sip.carrier.example?P-Asserted-Identity=%3Csip:+15550000000@x%3E",
    "SIP:bob@sip.carrier.example?P-ASSERTED-IDENTITY=sip:ceo@x",
    "sip:bob@sip.carrier.example;transport=udp?Route=<sip:evil.example;lr>",
    "sip:bob@sip.carrier.example;lr", "sip:bob@sip.carrier.example;method=REGISTER",
    "sip:bob@sip.carrier.example;transport=udp;maddr=evil.example",
    "sip:bob@sip.carrier.example;transport=evil",
    "sip:bob;maddr=evil.example@sip.carrier.example",
    "sip:bob@sip.carrier.example ;maddr=evil.example", "sip:bob@sip.carrier.example\t;maddr=evil.example",
    "sip:bob@sip.carrier.example\r\nRoute: <sip:evil.example;lr>",
    "sip:a@evil.example@sip.carrier.example", "<sip:bob@sip.carrier.example>",
    "tel:+15551230001;phone-context=evil.example", "tel:+15551230001?Route=<sip:evil.example;lr>",
    "TEL:+15551230001;maddr=evil.example", "+15551230001@evil.example", "+1555 1230001",
])
def test_uri_parameters_and_headers_cannot_steer_an_allowed_destination(target):
    """H3: the host check used to drop ``;params`` and ``?headers``, while pjsip honours
    maddr and copies header fields into the INVITE/REFER: every such URI is refused, with
    and without operator patterns."""
    for p in (_policy(), _policy(["+1*", "sip:*@sip.carrier.example", "sip:*@sip.carrier.example:5060"])):
        assert check_destination(target, "carrier", p), target


def test_plain_uris_with_transport_and_user_parameters_still_pass():
    p = _policy(["+1*"])
    for target in ("sip:+15551230001@sip.carrier.example;user=phone",
                   "sip:+15551230001@sip.carrier.example:5060;transport=TCP;user=phone",
                   "SIP:+15551230001@SIP.carrier.example", "tel:+15551230001", " +15551230001 "):
        assert check_destination(target, "carrier", p) is None, target

API = '[models]\nload = "never"\n[[trunks]]\nname = "carrier"\nallow = ["127.0.0.1/32"]\naddress = "sip:127.0.0.1:9"\n'


def test_api_refuses_calls_and_transfers_to_destinations_outside_the_rule(cell_factory):
    """403 naming the rule, in the API's error shape; nothing is dialled."""
    cell = cell_factory(API + '[sip]\nallowed_destinations = ["+1*"]\n', args=("--app", "api"))
    api = Api(cell, create_key(cell.data, "control"))
    status, body, _ = api.post("/v1/calls", {"to": "sip:900123@203.0.113.66"})
    assert status == 403, body
    assert body["error"]["code"] == "destination_not_allowed" and body["error"]["field"] == "to"
    assert "sip.allowed_destinations" in body["error"]["message"]
    status, body, _ = api.post("/v1/calls", {"to": "+449001234567", "trunk": "carrier"})
    assert status == 403 and "sip.allowed_destinations" in body["error"]["message"], body
    assert not cell.events("call_offered")
    status, body, _ = api.post("/v1/calls", {"to": "+15551230001", "trunk": "carrier"})
    assert status == 201, body                                       # allowed: dialled through the trunk


# -- check-config -------------------------------------------------------------------------

def test_check_config_masks_trunk_passwords(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[trunks]]\nname = "carrier"\naddress = "sip:192.0.2.1"\nusername = "u"\n'
                    'password = "pw-Secret-4711"\nrealm = "carrier.example"\n')
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "check-config", "--config", str(path),
                        "--data-dir", str(tmp_path / "d")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "pw-Secret-4711" not in r.stdout + r.stderr
    assert '"password": "********"' in r.stdout and '"username": "u"' in r.stdout
