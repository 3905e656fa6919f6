"""Start-up errors, draining on SIGTERM, outbound calls and registration."""
import subprocess
import sys
import time

from support import ROOT, next_ports, sipp, sipp_file


def _trunkline(*args, timeout=60, env=None):
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_bad_config_fails_with_one_line_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[sip]\nlisten = "nowhere"\n')
    r = _trunkline("serve", "--config", str(cfg), "--data-dir", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip() == "trunkline: config error: sip.listen: expected HOST:PORT, got 'nowhere'"
    cfg.write_text('[sip]\nlisten_address = "0.0.0.0:5060"\n')
    r = _trunkline("serve", "--config", str(cfg))
    assert r.returncode == 2 and "sip.listen_address: unknown key" in r.stderr
    cfg.write_text('[sip\n')
    r = _trunkline("serve", "--config", str(cfg))
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    r = _trunkline("serve", "--app", "playback", "--prompt", str(tmp_path / "missing.wav"))
    assert r.returncode == 2 and r.stderr.startswith("trunkline: config error: app.prompt:")


def test_environment_overrides_file(tmp_path):
    import os
    cfg = tmp_path / "c.toml"
    cfg.write_text('[sip]\nretry_after = 7\n')
    env = {**os.environ, "TRUNKLINE_SIP_RETRY_AFTER": "9", "TRUNKLINE_DATA_DIR": str(tmp_path / "d")}
    r = _trunkline("check-config", "--config", str(cfg), env=env)
    assert r.returncode == 0, r.stderr
    assert '"retry_after": 9' in r.stdout and str(tmp_path / "d") in r.stdout
    env["TRUNKLINE_SIP_RETRY_AFTER"] = "soon"
    r = _trunkline("check-config", "--config", str(cfg), env=env)
    assert r.returncode == 2 and "sip.retry_after" in r.stderr


def test_sip_port_in_use_is_a_clear_error(cell_factory, tmp_path):
    first = cell_factory()
    r = _trunkline("serve", "--sip", first.sip, "--http", f"127.0.0.1:{next_ports()['http']}",
                   "--data-dir", str(tmp_path / "other"))
    assert r.returncode == 1
    assert "cannot listen on" in r.stderr and "Address already in use" in r.stderr
    assert first.alive()


def test_sigterm_drains_then_exits_cleanly(cell, tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    call = sipp("call_pcmu.xml", cell.sip, first, "-d", "4000", local_port=cell.ports["sipp"], background=True)
    cell.wait_event("call_answered")
    cell.proc.send_signal(15)
    cell.wait_event("drain_started")
    status, body = cell.http_get("/healthz")
    assert status == 503 and '"draining"' in body
    refused = sipp("call_pcmu.xml", cell.sip, tmp_path, "-d", "0", local_port=cell.ports["sipp"] + 1)
    assert refused.returncode == 0
    assert "REFUSED 503" in sipp_file(tmp_path, "_logs.log")
    out, _ = call.communicate(timeout=30)
    assert call.returncode == 0, out.decode()[-2000:]      # the live call finished normally
    assert cell.proc.wait(20) == 0
    assert cell.events("call_ended")[0]["reason"] == "remote bye"
    assert cell.events("cell_stopped")[0]["error"] is None
    assert "Assertion" not in cell.log_path.read_text()


def test_drain_timeout_hangs_up_remaining_calls(cell_factory, tmp_path):
    cell = cell_factory("drain_timeout = 1.0\n")
    call = sipp("wait_bye.xml", cell.sip, tmp_path, local_port=cell.ports["sipp"], background=True)
    cell.wait_event("call_answered")
    start = time.monotonic()
    assert cell.stop() == 0
    assert time.monotonic() - start < 10
    out, _ = call.communicate(timeout=20)
    assert call.returncode == 0, out.decode()[-2000:]      # SIPp got the cell's BYE
    assert cell.events("call_ended")[0]["reason"] == "drain timeout"


def test_outbound_call_through_a_trunk(tmp_path):
    ports = next_ports()
    far = sipp("uas_answer.xml", "", tmp_path, local_port=ports["sipp"], background=True)
    time.sleep(0.3)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[trunks]]\nname = "carrier"\naddress = "sip:127.0.0.1:{ports["sipp"]}"\n')
    r = _trunkline("call", "5551234", "--trunk", "carrier", "--config", str(cfg), "--duration", "1.5",
                   "--sip", f"127.0.0.1:{ports['sip']}", "--rtp-ports", f"{ports['rtp_lo']}-{ports['rtp_hi']}",
                   "--data-dir", str(tmp_path / "data"))
    out, _ = far.communicate(timeout=20)
    assert r.returncode == 0, r.stderr[-3000:]
    assert far.returncode == 0, out.decode()[-2000:]
    msgs = sipp_file(tmp_path, "_messages.log")
    assert f"INVITE sip:5551234@127.0.0.1:{ports['sipp']} SIP/2.0" in msgs
    assert "User-Agent: Trunkline" in msgs
    assert '"direction": "outbound"' in r.stderr and '"reason": "duration reached"' in r.stderr


def test_outbound_registration_with_digest(tmp_path):
    ports = next_ports()
    registrar = sipp("registrar.xml", "", tmp_path, local_port=ports["sipp"], background=True)
    time.sleep(0.3)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[trunks]]\nname = "carrier"\naddress = "sip:127.0.0.1:{ports["sipp"]}"\n'
                   'username = "trunkuser"\npassword_env = "TRUNK_PASS"\nregister = true\nrealm = "trunk.test"\n')
    from support import CellProcess
    cell = CellProcess(tmp_path, cfg.read_text(), env={"TRUNK_PASS": "s3cret"})
    cell.start()
    try:
        reg = cell.wait_event("registration")[0]
        assert reg["registered"] is True and reg["status"] == 200
        out, _ = registrar.communicate(timeout=20)
        assert registrar.returncode == 0, out.decode()[-2000:]
        assert "s3cret" not in cell.log_path.read_text()
    finally:
        cell.stop()
        if registrar.poll() is None:
            registrar.kill()
