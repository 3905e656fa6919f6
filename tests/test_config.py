import re

import pytest

from bridge.core.config import ConfigError, load
from sip.acl import SourceFilter, split_hostport


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_defaults_are_valid_and_trust_only_loopback():
    cfg = load(None, environ={})
    assert cfg.app == "echo" and cfg.raw["sip"]["capacity"] == 3
    assert [t.allow for t in cfg.trunks] == [["127.0.0.0/8", "::1/128"]]


def test_precedence_file_env_flags(tmp_path):
    path = _write(tmp_path, '[sip]\nretry_after = 7\nanswer_delay = 1.5\n[http]\nlisten = "127.0.0.1:9000"\n')
    cfg = load(path, {"http.listen": "127.0.0.1:9100"}, environ={"TRUNKLINE_SIP_RETRY_AFTER": "8"})
    assert cfg.raw["sip"]["retry_after"] == 8
    assert cfg.raw["sip"]["answer_delay"] == 1.5
    assert cfg.raw["http"]["listen"] == "127.0.0.1:9100"


@pytest.mark.parametrize("text, message", [
    ('[sip]\ncapacity = 4\n', "sip.capacity: expected an integer 1..3, got 4"),
    ('[media]\nrtp_ports = "9000"\n', "media.rtp_ports: expected LOW-HIGH"),
    ('[media]\nclock_rate = 44100\n', "media.clock_rate: expected auto, 8000 or 16000"),
    # pjmedia aborts the cell on every call unless min <= init <= max prefetch (and max <= ~400 ms)
    ('[media]\njitter_init_ms = 20\njitter_min_ms = 40\n', "media.jitter_init_ms: 20 is below media.jitter_min_ms (40)"),
    ('[media]\njitter_max_ms = 30\n', "media.jitter_min_ms: 40 is above media.jitter_max_ms (30)"),
    ('[media]\njitter_min_ms = 500\n', "media.jitter_min_ms: expected an integer -1..360, got 500"),
    ('[sip]\ncodecs = ["PCMU", "AMR"]\n', "sip.codecs: unknown codec 'AMR'"),
    ('[nope]\nx = 1\n', "nope: unknown key"),
    ('[[trunks]]\nallow = ["10.0.0.0/8"]\n', "trunks[0].name: required"),
    ('[[trunks]]\nname = "a"\nallow = ["10.0.0.300/8"]\n', "trunks[0].allow: not an IP network"),
    ('[[trunks]]\nname = "a"\nregister = true\n', "trunks[0].register: needs address and username"),
    ('[[trunks]]\nname = "a"\npassword_env = "NOPE_NOT_SET"\n', "NOPE_NOT_SET is not set"),
    ('[app]\nname = "playback"\n', "app.prompt: required"),
    ('[app]\ndtmf_transfer = { "x" = "sip:a@b" }\n', "app.dtmf_transfer"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(_write(tmp_path, text), environ={})


def test_unknown_env_setting_is_an_error():
    with pytest.raises(ConfigError, match="TRUNKLINE_SIP_LISEN"):
        load(None, environ={"TRUNKLINE_SIP_LISEN": "0.0.0.0:5060"})


def test_trunk_password_from_environment(tmp_path):
    path = _write(tmp_path, '[[trunks]]\nname = "c"\naddress = "sip:192.0.2.1"\nusername = "u"\n'
                            'password_env = "PW"\nregister = true\nrealm = "c.test"\n')
    import os
    os.environ["PW"] = "pw1"
    try:
        t = load(path, environ={}).trunks[0]
    finally:
        del os.environ["PW"]
    assert t.password == "pw1" and t.allow == ["192.0.2.1/32"]


def test_source_filter():
    f = SourceFilter(["192.0.2.0/24", "2001:db8::/32"])
    assert f.allows("192.0.2.7:5060") and f.allows("[2001:db8::1]:5060") and f.allows("::ffff:192.0.2.9")
    assert not f.allows("198.51.100.1:5060") and not f.allows("garbage") and not f.allows("[::1]:5060")
    assert split_hostport("[::1]:5080") == ("::1", 5080) and split_hostport("h") == ("h", None)


def test_clock_rate_auto_picks_8khz_unless_a_wideband_codec_meets_an_app_that_uses_the_audio(tmp_path):
    def rate(text: str, app: str | None = None) -> int:
        p = tmp_path / "c.toml"
        p.write_text(text)
        return load(str(p), {"app.name": app} if app else None).clock_rate
    assert rate("") == 8000                                           # the default echo app: media only
    assert rate("", "agent") == 16000                                 # G722 is enabled by default
    assert rate('[sip]\ncodecs = ["PCMU", "PCMA"]\n', "agent") == 8000  # G.711 only: 8 kHz on the wire
    assert rate('[media]\nclock_rate = 16000\n') == 16000
    assert rate('[media]\nclock_rate = "8000"\n', "agent") == 8000
    with pytest.raises(ConfigError):
        rate('[media]\nclock_rate = 44100\n')


def test_public_addresses_are_an_ip_or_a_host_name_and_nothing_more(tmp_path):
    p = tmp_path / "c.toml"
    for good in ("203.0.113.7", "2001:db8::7", "sip.example.com", ""):
        p.write_text(f'[sip]\npublic_address = "{good}"\nmedia_public_address = "{good}"\n')
        assert load(str(p)).raw["sip"]["public_address"] == good
    for bad in ("203.0.113.7:5060", "a.example.com\\nlisten=udp:1.2.3.4:5", "{{CELL_IP}}", "x y", "999.1.1.1"):
        p.write_text(f'[sip]\npublic_address = "{bad}"\n')
        with pytest.raises(ConfigError, match="sip.public_address"):
            load(str(p))
