"""Registration through the front (issue 12): with ``trunkline serve --cells N`` a ``register = true``
trunk is registered by the Kamailio front (uac module, uac_reg), with the front's public address in
Contact, never by a cell; the carrier's INVITE to that Contact is dispatched to a cell like any
other call; the registration's state is on the box's /metrics (``trunkline_trunk_registered``) and
in ``registration`` events, and a lost registration comes back by itself.

The carrier is SIPp on 127.0.0.1 (sipp-scenarios/front_registrar.xml: 401, digest checked with
``<verifyauth>``, 200 with a short expiry so the front refreshes every few seconds). The box tests
share one box of 3 cells and run in file order (the last one breaks and restores the carrier).
"""
from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bridge.box import kamailio, uacreg
from bridge.box.registrations import RegState, changed, last_replies, read_states
from media import g711
from support import Api, BoxProcess, RtpPeer, create_key, sipp, wait_until

pytestmark = pytest.mark.xdist_group("test_front_register")

PASSWORD = "s3cret"
CARRIER_EXPIRES = 6          # what the carrier grants: the front refreshes every ~2 s
RETRY = 3                    # trunk register_retry


def _registrar(scenario: str, cwd: Path, port: int, *args: str) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    return sipp(scenario, "", cwd, *args, local_port=port, calls=10000, timeout=600, background=True)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait(10)


def _messages(cwd: Path) -> list[str]:
    """Every SIP message in SIPp's traces in ``cwd`` (sent and received), one string each."""
    text = "".join(p.read_text(errors="replace") for p in sorted(cwd.glob("*_messages.log")))
    return [c for c in re.split(r"^-{10,}.*$", text, flags=re.M) if c.strip()]


def _received(cwd: Path, method: str) -> list[str]:
    return [m for m in _messages(cwd) if "message received" in m.strip().splitlines()[0]
            and re.search(rf"^{method} ", m, re.M)]


def _gauge(box: BoxProcess) -> float | None:
    return box.metrics().get('trunkline_trunk_registered{trunk="carrier"}')


def _v1(box: BoxProcess) -> dict:
    """The trunk's entry in the box's ``GET /v1/registrations``."""
    status, body, _ = Api(box, create_key(box.data, "read")).get("/v1/registrations")
    assert status == 200, body
    return {r["trunk"]: r for r in body["registrations"]}["carrier"]


def _wait(what, timeout: float, message: str):
    return wait_until(what, timeout, message, 0.2)


def _reg_events(box: BoxProcess) -> list[dict]:
    return [e for e in box.events("registration") if e.get("trunk") == "carrier"]


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frontreg")
    box = BoxProcess(tmp, 3)
    carrier = box.ports["sipp"]
    config = (f'drain_timeout = 5\n[models]\nload = "never"\n[media]\nclock_rate = 8000\n'
              f'[sip]\nrtp_timeout = 0\n'
              f'[[trunks]]\nname = "carrier"\naddress = "sip:127.0.0.1:{carrier}"\nusername = "trunkuser"\n'
              f'password_env = "FRONTREG_PASS"\nrealm = "trunk.test"\nregister = true\nexpires = 60\n'
              f'register_retry = {RETRY}\nregister_retry_max = {2 * RETRY}\n')
    box.config_path.write_text(config + box.config_path.read_text())
    box.env["FRONTREG_PASS"] = PASSWORD
    registrar = _registrar("front_registrar.xml", tmp / "carrier1", carrier, "-set", "expires", str(CARRIER_EXPIRES))
    time.sleep(0.3)
    state = SimpleNamespace(box=box, tmp=tmp, carrier=carrier, registrar=registrar, dirs=[tmp / "carrier1"])
    box.start()
    try:
        yield state
    finally:
        _stop(state.registrar)
        try:
            box.stop(40)                                # drains (drain_timeout = 5) and stops the front
        finally:
            if box.alive():
                box.proc.kill()
                box.proc.wait(10)


def _noise(seed: int, packets: int) -> list[bytes]:
    pcm = (3000 * np.random.default_rng(seed).standard_normal(160 * packets)).astype("<i2")
    return [g711.ulaw_encode(pcm[i:i + 160].tobytes()) for i in range(0, pcm.size, 160)]


@pytest.mark.slow
@pytest.mark.sample
def test_the_front_registers_once_with_its_public_contact(front):
    box, public = front.box, front.box.ports["sip"]
    _wait(lambda: _gauge(box) == 1, 30, "the box never reported the trunk registered:\n"
          + box.log_path.read_text()[-3000:])
    ev = _wait(lambda: [e for e in _reg_events(box) if e["registered"]], 10, "no registration event")[0]
    assert ev["status"] == 200 and ev["registered"] is True, ev
    _wait(lambda: len(_received(front.dirs[0], "REGISTER")) >= 4, 20, "the front did not refresh")
    registers = _received(front.dirs[0], "REGISTER")
    contacts = {re.search(r"^Contact:\s*(.*?)\s*$", m, re.M).group(1) for m in registers}
    # one binding, the front's public address: not one per cell, never a cell's own port
    assert contacts == {f"<sip:trunkuser@127.0.0.1:{public}>"}, contacts
    cell_ports = {str(box.ports["sip"] + 100 + i) for i in range(3)}
    for m in registers:
        via = re.search(r"^Via:\s*SIP/2.0/UDP\s+([^;\s]+)", m, re.M).group(1)
        assert via == f"127.0.0.1:{public}", via            # it leaves from the public socket
        assert not any(p in m for p in cell_ports), m
    answered = [m for m in registers if "Authorization:" in m]
    assert answered and all('username="trunkuser"' in m and 'realm="trunk.test"' in m for m in answered)
    sent = "".join(m for m in _messages(front.dirs[0]) if "message sent" in m.strip().splitlines()[0])
    assert "SIP/2.0 200 OK" in sent and "403 Forbidden" not in sent     # the carrier checked the digest
    # no cell registered (nor tried to) and the password is nowhere in the front's files or logs
    for i in range(3):
        assert box.cell_events(i, "registration") == [], i
    ha1 = hashlib.md5(f"trunkuser:trunk.test:{PASSWORD}".encode()).hexdigest()
    for path in (box.run_dir / "kamailio.cfg", box.run_dir / "kamailio.log", box.log_path,
                 box.run_dir / "db" / "uacreg"):
        assert PASSWORD not in path.read_text(errors="replace"), path
        if path.name != "uacreg":                           # the digest is in the table only
            assert ha1 not in path.read_text(errors="replace"), path
    table = box.run_dir / "db" / "uacreg"
    assert stat.S_IMODE(table.stat().st_mode) == 0o600
    assert stat.S_IMODE((box.run_dir / "db").stat().st_mode) == 0o700


@pytest.mark.slow
def test_the_carriers_invite_to_the_registered_contact_reaches_a_cell(front, tmp_path):
    box = front.box
    # the carrier calls the Contact it was given (whoever registered it)
    registers = _wait(lambda: [m for m in _received(front.dirs[0], "REGISTER") if "Authorization:" in m], 30,
                      "the carrier got no registration")
    contact = re.search(r"^Contact:\s*<sip:([^@>]+)@([^>;]+)", registers[-1], re.M)
    user, target = contact.group(1), contact.group(2)
    sdp_port = box.ports["sipp"] + 4
    peer = RtpPeer(sdp_port)
    call = sipp("call_pcmu.xml", target, tmp_path, "-s", user, "-d", "4000",
                local_port=box.ports["sipp"] + 1, rtpport=sdp_port, background=True)
    try:
        peer.wait_remote(15)
        audio = _noise(7, 80)
        peer.stream(audio)
        peer.collect(0.3)
        back = b"".join(p for _, pt, _, p in peer.received if pt == 0)
        assert sum(p in back for p in audio) >= 0.9 * len(audio), "no echo through the front"
        out, _ = call.communicate(timeout=40)
        assert call.returncode == 0, out.decode(errors="replace")[-3000:]
    finally:
        peer.close()
        if call.poll() is None:
            call.kill()
    offered = [e for i in range(3) for e in box.cell_events(i, "call_offered")
               if e["direction"] == "inbound" and e["trunk"] == "carrier"]
    assert len(offered) == 1, "no cell (or more than one) saw the call"
    # through the front (its internal socket), not straight from the carrier to a cell
    assert offered[0]["source"] != f"127.0.0.1:{box.ports['sipp'] + 1}", offered[0]
    assert target == f"127.0.0.1:{box.ports['sip']}", target


@pytest.mark.slow
@pytest.mark.sample
def test_a_lost_registration_is_reported_and_comes_back(front):
    box = front.box
    _wait(lambda: _gauge(box) == 1, 30, "not registered")
    before = len(_reg_events(box))
    # the carrier stops answering: the next refresh times out
    _stop(front.registrar)
    _wait(lambda: _gauge(box) == 0, 30, "the gauge stayed at 1 with no registrar")
    lost = _wait(lambda: [e for e in _reg_events(box)[before:] if e["registered"] is False], 5, "no event")[0]
    assert lost["status"] == 408, lost
    v1 = _wait(lambda: (r := _v1(box))["registered"] is False and r, 5, "/v1 still says registered")
    assert v1["status"] == 408 and v1["since"] > 0, v1
    # the carrier answers again, but 503: still down, and the event says why
    front.dirs.append(front.tmp / "carrier503")
    front.registrar = _registrar("front_registrar_503.xml", front.dirs[-1], front.carrier)
    e503 = _wait(lambda: [e for e in _reg_events(box)[before:] if e["status"] == 503], 30, "503 never reported")[0]
    assert e503["registered"] is False and _gauge(box) == 0
    # silence again: reported as no answer (408), not as the 503 kept from before
    _stop(front.registrar)
    n = len(_reg_events(box))
    _wait(lambda: [e for e in _reg_events(box)[n:] if e["status"] == 408], 30, "the silence after 503 not reported")
    # the carrier is back: registered again without any help
    front.dirs.append(front.tmp / "carrier2")
    front.registrar = _registrar("front_registrar.xml", front.dirs[-1], front.carrier,
                                 "-set", "expires", str(CARRIER_EXPIRES))
    _wait(lambda: _gauge(box) == 1, 30, "the registration did not come back")
    back = [e for e in _reg_events(box)[before:] if e["registered"] is True]
    assert back and back[-1]["status"] == 200, _reg_events(box)
    again = _wait(lambda: (r := _v1(box))["registered"] is True and r, 5, "/v1 does not say registered")
    assert again["status"] == 200 and again["since"] > v1["since"], again


class _Answerer:
    """A registrar on 127.0.0.1:``port`` that answers every REGISTER ``status`` (200: expires 3600,
    without a challenge), from ``source`` (an address of its own, or another loopback address:
    someone on the path answering first); ``times``: when each REGISTER came (monotonic)."""

    def __init__(self, port: int):
        import socket
        import threading
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.other.bind(("127.0.0.2", 0))
        self.source = self.other
        self.answered = {"127.0.0.1": 0, "127.0.0.2": 0}
        self.status = 200
        self.times: list[float] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                continue
            text = data.decode(errors="replace")
            if not text.startswith("REGISTER "):
                continue
            self.times.append(time.monotonic())
            head = text.split("\r\n\r\n", 1)[0].split("\r\n")
            keep = [h for h in head[1:] if re.match(r"(Via|v|From|f|Call-ID|i|CSeq):", h, re.I)]
            to = next(h for h in head[1:] if re.match(r"(To|t):", h, re.I))
            contact = next(h for h in head[1:] if re.match(r"(Contact|m):", h, re.I))
            if self.status == 200:
                reply = "\r\n".join(["SIP/2.0 200 OK", *keep, to + ";tag=onpath", contact + ";expires=3600",
                                      "Expires: 3600", "Content-Length: 0", "", ""])
            else:
                reply = "\r\n".join([f"SIP/2.0 {self.status} Refused", *keep, to + ";tag=onpath",
                                      "Content-Length: 0", "", ""])
            self.source.sendto(reply.encode(), addr)
            self.answered[self.source.getsockname()[0]] += 1

    def close(self):
        self.stopping = True
        self.thread.join(5)
        self.sock.close()
        self.other.close()


@pytest.mark.slow
def test_an_answer_to_the_fronts_register_counts_only_from_the_registrar(tmp_path):
    """Someone on the path sees the REGISTER's branch and answers first (200, a day's expires) from
    another address: the front drops it (the trunk stays unregistered); the same answer from the
    registrar's address registers."""
    box = BoxProcess(tmp_path, 2)                        # (one cell alone runs without the front)
    carrier = box.ports["sipp"]
    config = (f'drain_timeout = 5\n[models]\nload = "never"\n[[trunks]]\nname = "carrier"\n'
              f'address = "sip:127.0.0.1:{carrier}"\nusername = "trunkuser"\npassword = "pw"\n'
              f'realm = "trunk.test"\nregister = true\nexpires = 60\nregister_retry = {RETRY}\n')
    box.config_path.write_text(config + box.config_path.read_text())
    registrar = _Answerer(carrier)
    box.start()
    try:
        # its first REGISTER answered from elsewhere, the front must still be waiting for the registrar:
        # it times out and tries again (answered from elsewhere again), and is never registered
        _wait(lambda: registrar.answered["127.0.0.2"] >= 2 or _gauge(box) == 1, 40, "the front never registered")
        assert _gauge(box) == 0 and _v1(box)["registered"] is False, f"an on-path answer registered it: {_v1(box)}"
        log = (box.run_dir / "kamailio.log").read_text(errors="replace")
        assert "answer to the front's REGISTER from 127.0.0.2" in log, log[-2000:]
        registrar.source = registrar.sock               # now the registrar itself answers
        _wait(lambda: _gauge(box) == 1, 40, "the registrar's own answer did not register")
        assert _v1(box)["registered"] is True
    finally:
        registrar.close()
        box.stop(40)                # (kills it when SIGTERM does not stop it)


@pytest.mark.slow
def test_a_refused_registration_backs_off_and_comes_back(tmp_path):
    """The registrar refuses every REGISTER (503): the waits between the front's attempts grow
    (register_retry = 4, register_retry_max = 32: W = 4, 8, 16, 32 s, each W x U(0.5, 1), plus up
    to ~3 s of polling and uac_reg's 1 s timer), where uac_reg alone retries at one interval (4 s here);
    the failures in a row and the next attempt are on /metrics, /v1 and in the log; once the
    registrar accepts, the trunk registers again and the count is reset."""
    box = BoxProcess(tmp_path, 2)
    carrier = box.ports["sipp"]
    config = (f'drain_timeout = 5\n[models]\nload = "never"\n[[trunks]]\nname = "carrier"\n'
              f'address = "sip:127.0.0.1:{carrier}"\nusername = "trunkuser"\npassword = "pw"\n'
              f'realm = "trunk.test"\nregister = true\nexpires = 60\nregister_retry = 4\n'
              f'register_retry_max = 32\n')
    box.config_path.write_text(config + box.config_path.read_text())
    registrar = _Answerer(carrier)
    registrar.source, registrar.status = registrar.sock, 503
    box.start()
    try:
        _wait(lambda: len(registrar.times) >= 5, 150, "the front stopped trying")
        gaps = [round(b - a, 1) for a, b in zip(registrar.times, registrar.times[1:5])]
        assert gaps[3] >= 14 and gaps[3] >= 2 * gaps[0], f"no backoff: {gaps}"     # uac_reg alone: 4 s each
        assert max(gaps) <= 32 + 5, f"waited longer than register_retry_max: {gaps}"
        v1 = _v1(box)
        assert v1["registered"] is False and v1["status"] == 503 and v1["failures"] >= 4, v1
        assert v1["next_attempt"] is None or 0 < v1["next_attempt"] - time.time() <= 32 + 1, v1
        assert box.metrics()['trunkline_trunk_registration_failures{trunk="carrier"}'] >= 4
        held = [e for e in box.events("registration_retry") if e.get("trunk") == "carrier"]
        assert [e["failures"] for e in held[:4]] == [1, 2, 3, 4], held
        assert all(0 < e["retry_in"] <= 32 for e in held), held
        registrar.status = 200                          # the registrar is back: the operator asks now
        held = _v1(box)
        api = Api(box, create_key(box.data, "control"))
        assert api.post("/v1/registrations/nosuch/register")[0] == 404
        assert Api(box, create_key(box.data, "read")).post("/v1/registrations/carrier/register")[0] == 403
        asked = time.time()
        status, body, _ = api.post("/v1/registrations/carrier/register")
        assert status == 202 and body == {"trunk": "carrier", "registering": True}, body
        _wait(lambda: _gauge(box) == 1, 45, "the registration did not come back")
        if held["next_attempt"] and held["next_attempt"] - asked > 8:     # it did not wait for the hold
            assert time.time() < held["next_attempt"] - 2, (held, time.time())
        again = _wait(lambda: (r := _v1(box))["failures"] == 0 and r, 5, "the failures were not reset")
        assert again["registered"] is True and again["next_attempt"] is None, again
    finally:
        registrar.close()
        box.stop(40)


def test_the_backoff_doubles_the_wait_after_each_failure_in_a_row():
    """``Backoff`` on uac_reg's records as the front reports them: (flags, seconds until due)."""
    from bridge.box.registrations import DISABLED, ONGOING, ONLINE, Backoff
    b = Backoff({"carrier": (30, 100), "other": (5, 5)}, rand=lambda: 1.0)
    failed, held, enabled = (0, 38), (DISABLED, 1), (0, 1)     # uac_reg after a 503 sets its own retry
    assert b.step(0, {"carrier": (ONGOING, -5)}) == []                         # first REGISTER in flight
    assert b.step(1, {"carrier": failed}) == [("disable", "carrier")]
    assert (b.failures["carrier"], b.retry_in("carrier", 1)) == (1, 30)
    assert b.step(20, {"carrier": held}) == []                                 # still held
    assert b.step(31, {"carrier": held}) == [("enable", "carrier")] and b.retry_in("carrier", 31) is None
    assert b.step(32, {"carrier": enabled}) == []                              # due in 1 s: not a failure
    assert b.step(33, {"carrier": (ONGOING, 0)}) == []
    assert b.step(34, {"carrier": failed}) == [("disable", "carrier")]         # the second one: 60 s
    assert (b.failures["carrier"], b.retry_in("carrier", 34)) == (2, 60)
    b.step(94, {"carrier": held})
    b.step(96, {"carrier": failed})
    assert (b.failures["carrier"], b.retry_in("carrier", 96)) == (3, 100)     # 120 capped at 100
    # a front that restarts loads its table enabled and registers: the hold it lost is dropped
    assert b.step(97, {"carrier": enabled}) == [] and b.retry_in("carrier", 97) is None
    assert b.step(98, {"carrier": (ONLINE, 55)}) == [] and b.failures["carrier"] == 0
    # a refresh that fails starts again from register_retry, and the jitter takes up to half off
    b.rand = lambda: 0.0
    assert b.step(99, {"carrier": (ONLINE, 0)}) == []                          # expired: uac_reg refreshes
    assert b.step(100, {"carrier": failed}) == [("disable", "carrier")] and b.retry_in("carrier", 100) == 15
    # disabled with no hold of ours (nothing else disables it): enabled again
    assert b.step(0, {"other": (DISABLED, 1)}) == [("enable", "other")]
    assert b.step(0, {"other": (0, 7), "unknown": (0, 7)}) == [("disable", "other")]
    # the hold landed after uac_reg had sent a REGISTER that succeeded: registered but disabled, it
    # would never refresh; it is enabled again at once
    assert b.step(1, {"other": (ONLINE | DISABLED, 50)}) == [("enable", "other")] and b.failures["other"] == 0
    # a hold the front did not take is undone: the same failure is not counted twice
    b.step(2, {"other": (0, 7)})
    b.undo("other")
    assert b.failures["other"] == 0 and b.retry_in("other", 2) is None


def test_the_supervisor_holds_a_phone_number_registration_as_a_string(tmp_path, monkeypatch):
    """kamcmd sends an argument that parses as a number as an int (``0049301234567`` would reach
    Kamailio as ``2056594311``) and reads one starting with "-" as its own option: the record id
    goes as ``s:<id>``. A disable the front refuses leaves no hold and counts nothing."""
    from bridge.box.registrations import Backoff
    reg = 'username = "0049301234567"\npassword = "p"\nrealm = "r"\nregister = true\n'
    sup, _ = _render(_cfg(tmp_path, reg), tmp_path)
    assert [r.uuid for r in sup.front_registrations] == ["0049301234567"]
    calls = []
    monkeypatch.setattr(sup, "kamcmd", lambda *a: calls.append(a) or "")
    holds = Backoff({"carrier": (30, 300)}, rand=lambda: 1.0)
    asyncio.run(sup._hold_or_release(holds, {"carrier": (0, 38)}))
    assert calls == [("uac.reg_disable", "l_uuid", "s:0049301234567")] and holds.failures["carrier"] == 1

    def refuse(*a):
        raise RuntimeError("kamcmd: 404 Record not found")
    monkeypatch.setattr(sup, "kamcmd", refuse)
    holds = Backoff({"carrier": (30, 300)}, rand=lambda: 1.0)
    asyncio.run(sup._hold_or_release(holds, {"carrier": (0, 38)}))
    assert holds.failures["carrier"] == 0 and holds.retry_in("carrier", 0) is None


def test_register_now_drops_the_hold_and_enables_the_record(tmp_path, monkeypatch):
    """``POST /v1/registrations/{trunk}/register`` (``Supervisor.register_now``): no waiting out the
    backoff after a carrier's outage; an unknown trunk is a KeyError (404)."""
    from bridge.box.registrations import DISABLED, Backoff
    reg = 'username = "trunkuser"\npassword = "p"\nrealm = "r"\nregister = true\n'
    sup, _ = _render(_cfg(tmp_path, reg), tmp_path)
    calls = []
    monkeypatch.setattr(sup, "kamcmd", lambda *a: calls.append(a) or "")
    sup.reg_holds = Backoff({"carrier": (30, 300)}, rand=lambda: 1.0)
    for now, rec in ((0, (0, 38)), (31, (DISABLED, 1)), (32, (0, 38))):    # failed, held, enabled, failed
        sup.reg_holds.step(now, {"carrier": rec})
    assert sup.reg_holds.failures["carrier"] == 2
    asyncio.run(sup.register_now("carrier"))
    assert calls == [("uac.reg_enable", "l_uuid", "s:trunkuser")]
    assert sup.reg_holds.failures["carrier"] == 0 and sup.reg_holds.retry_in("carrier", 41) is None
    with pytest.raises(KeyError):
        asyncio.run(sup.register_now("nosuch"))


def test_a_front_that_cannot_take_holds_is_polled_calmly(tmp_path, monkeypatch):
    """A hold that is due while the front is down (or restarting) is not applied in a tight loop:
    the poller sleeps at least 1 s, and a front that is down drops the holds (a new one loads its
    table enabled); the failures in a row stay on the state."""
    from bridge.box import supervisor as sup_mod
    reg = 'username = "u"\npassword = "p"\nrealm = "r"\nregister = true\n'
    sup, _ = _render(_cfg(tmp_path, reg), tmp_path)
    sup.kamailio = None                              # the front is down
    sup.registrations["carrier"] = RegState("carrier")
    sleeps = []
    real_sleep = asyncio.sleep

    async def sleep(d):
        sleeps.append(d)
        if len(sleeps) >= 5:
            sup.stopping = True
        await real_sleep(0)
    monkeypatch.setattr(sup_mod.asyncio, "sleep", sleep)
    real_backoff = sup_mod.Backoff

    def held(limits):                                # a hold already due when the front went down
        b = real_backoff(limits)
        b.failures["carrier"], b.until["carrier"] = 3, 0.0
        return b
    monkeypatch.setattr(sup_mod, "Backoff", held)
    asyncio.run(sup._poll_registrations())
    assert min(sleeps) >= 1.0, sleeps
    assert sup.registrations["carrier"].failures == 3 and sup.registrations["carrier"].registered is False


def test_retry_max_below_retry_is_refused(tmp_path):
    from bridge.core.config import ConfigError
    reg = 'username = "u"\npassword = "p"\nrealm = "r"\nregister = true\n'
    with pytest.raises(ConfigError, match="register_retry_max: 10 is below register_retry .30."):
        _cfg(tmp_path, reg + "register_retry_max = 10\n")
    with pytest.raises(ConfigError, match="register_retry_max"):
        _cfg(tmp_path, reg + "register_retry_max = 86400\n")
    # a config valid before the key existed still loads: the cap follows a longer register_retry
    sup, _ = _render(_cfg(tmp_path, reg + "register_retry = 600\n"), tmp_path)
    assert [(r.retry, r.retry_max) for r in sup.front_registrations] == [(600, 600)]
    sup, _ = _render(_cfg(tmp_path, reg + "register_retry = 5\nregister_retry_max = 600\n"), tmp_path)
    assert [(r.retry, r.retry_max) for r in sup.front_registrations] == [(5, 600)]
    sup, _ = _render(_cfg(tmp_path, reg), tmp_path)
    assert [(r.retry, r.retry_max) for r in sup.front_registrations] == [(30, 300)]


# -- the rendered config and the poller's reading, without a box ------------------------------

def _cfg(tmp_path, trunk_extra: str, sip: str = ""):
    from bridge.core.config import load
    p = tmp_path / "c.toml"
    p.write_text(f'data_dir = "{tmp_path}/data"\n[sip]\nlisten = "127.0.0.1:5060"\n{sip}'
                 f'[[trunks]]\nname = "carrier"\naddress = "sip:127.0.0.1:5090"\n{trunk_extra}')
    return load(str(p))


def _render(cfg, tmp_path):
    from bridge.box.supervisor import Supervisor
    sup = Supervisor(cfg, 2, None)
    text, _, _ = sup.render_front()
    return sup, text


def test_rendered_front_registers_only_register_trunks(tmp_path, monkeypatch):
    monkeypatch.setenv("FR_PASS", "Zq7:pw\\x9")
    reg = ('username = "trunkuser"\npassword_env = "FR_PASS"\nrealm = "trunk.test"\nregister = true\n'
           'register_retry = 7\nallow = ["198.51.100.0/24"]\n')
    sup, text = _render(_cfg(tmp_path, reg, 'public_address = "203.0.113.5"\n'), tmp_path)
    assert 'loadmodule "uac.so"' in text and 'loadmodule "db_text.so"' in text
    assert f'modparam("uac", "reg_db_url", "text://{sup.run_dir}/db")' in text
    assert "Zq7" not in text
    assert "route(REGCONTACT)" in text and "uac_reg_lookup" in text
    # an answer to the front's REGISTER counts only from the registrar's address
    assert ('if ($fu == "sip:trunkuser@127.0.0.1:5090") { if (is_in_subnet("$si", "127.0.0.1/32")) return 1; '
            'return -1; }') in text
    [r] = sup.front_registrations
    assert (r.contact, r.socket, r.proxy, r.domain) == ("203.0.113.5:5060", "udp:127.0.0.1:5060",
                                                          "sip:127.0.0.1:5090", "127.0.0.1:5090")
    assert r.ha1 == hashlib.md5(b"trunkuser:trunk.test:Zq7:pw\\x9").hexdigest()
    # uac_reg sends again retry - timer - 3 s after a failure: the margin is added back
    timer = int(re.search(r'"reg_timer_interval", (\d+)', text).group(1))
    assert f'"reg_retry_interval", {7 + timer + 3})' in text
    uacreg.write_uacreg(str(tmp_path / "run"), sup.front_registrations)
    table = (tmp_path / "run" / "db" / "uacreg").read_text()
    assert "Zq7" not in table and r.ha1 in table and "203.0.113.5\\:5060" in table
    assert stat.S_IMODE((tmp_path / "run" / "db" / "uacreg").stat().st_mode) == 0o600
    # the registrar is trusted (its answers and calls), besides the trunk's own allow-list
    assert 'is_in_subnet("$si", "127.0.0.1/32")' in text and 'is_in_subnet("$si", "198.51.100.0/24")' in text
    # Kamailio itself accepts the config (modules, parameters, routes)
    path = kamailio.write(sup.run_dir, text, kamailio.dispatcher_list([("127.0.0.1", 5061)], 3), None,
                          sup.front_registrations)
    check = subprocess.run(["kamailio", "-c", "-f", path], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr[-2000:]


def test_a_tcp_trunk_registers_over_tcp_and_retry_is_validated(tmp_path):
    from bridge.core.config import ConfigError
    reg = 'username = "trunkuser"\npassword = "p"\nrealm = "trunk.test"\nregister = true\ntransport = "tcp"\n'
    sup, text = _render(_cfg(tmp_path, reg), tmp_path)
    [r] = sup.front_registrations
    assert (r.contact, r.socket, r.proxy, r.retry) == ("127.0.0.1:5060;transport=tcp", "tcp:127.0.0.1:5060",
                                                       "sip:127.0.0.1:5090;transport=tcp", 30)
    for bad in ("0", "3601", '"soon"'):
        with pytest.raises(ConfigError, match="register_retry"):
            _cfg(tmp_path, reg + f"register_retry = {bad}\n")


def test_two_trunks_registering_one_address_of_record_are_refused(tmp_path):
    """The front tells its registrars' answers apart by their From (sip:username@domain): two
    trunks registering the same one would share one state and one registrar's answers."""
    reg = 'username = "trunkuser"\npassword = "p"\nrealm = "trunk.test"\nregister = true\n'
    cfg = _cfg(tmp_path, reg + '[[trunks]]\nname = "again"\naddress = "sip:127.0.0.1:5090"\n' + reg)
    with pytest.raises(ValueError, match="registers sip:trunkuser@127.0.0.1:5090 like trunk 'carrier'"):
        _render(cfg, tmp_path)


def test_rendered_front_without_register_trunks_has_no_uac(tmp_path):
    sup, text = _render(_cfg(tmp_path, 'username = "u"\npassword = "p"\nrealm = "r"\n'), tmp_path)
    assert "uac.so" not in text and "db_text" not in text and "WITH_UACREG" not in text.replace(
        "#!ifdef WITH_UACREG", "")
    assert sup.front_registrations == []


def test_the_cells_of_a_box_never_register(tmp_path, monkeypatch):
    from bridge.cell.cell import engine_config
    cfg = _cfg(tmp_path, 'username = "u"\npassword = "p"\nrealm = "r"\nregister = true\n')
    monkeypatch.delenv("TRUNKLINE_CELL", raising=False)
    assert [t.register for t in engine_config(cfg).trunks if t.name == "carrier"] == [True]   # alone: it does
    for cell in ("0", "1"):
        monkeypatch.setenv("TRUNKLINE_CELL", cell)
        assert [t.register for t in engine_config(cfg).trunks if t.name == "carrier"] == [False]


DUMP = """{
\tl_uuid: trunkuser
\tr_username: trunkuser
\tr_domain: 127.0.0.1:5090
\tauth_ha1: 0123456789abcdef0123456789abcdef
\tflags: %d
\tdiff_expires: %d
}
"""


def test_reading_the_fronts_registrations():
    ids = {"trunkuser": "carrier"}
    ok = read_states(DUMP % (4 | 16, 250), {"sip:trunkuser@127.0.0.1:5090": (200, "OK")}, ids, {})
    assert ok["carrier"] == RegState("carrier", True, 200, "OK", True)
    # a refresh in flight keeps the state it had (uac_reg clears "registered" meanwhile)
    assert read_states(DUMP % (2 | 16, -1), {}, ids, ok)["carrier"] == ok["carrier"]
    assert read_states(DUMP % (2 | 16, -1), {}, ids, {})["carrier"].known is False
    lost = read_states(DUMP % (16, 0), {"sip:trunkuser@127.0.0.1:5090": (200, "OK")}, ids, ok)["carrier"]
    assert (lost.registered, lost.status) == (False, 408) and changed(ok["carrier"], lost)
    refused = read_states(DUMP % (16, 0), {"sip:trunkuser@127.0.0.1:5090": (503, "Service Unavailable")}, ids, ok)
    assert (refused["carrier"].registered, refused["carrier"].status) == (False, 503)
    assert not changed(refused["carrier"], refused["carrier"])
    expired = read_states(DUMP % (4 | 16, -3), {}, ids, ok)["carrier"]
    assert expired.registered is False
    table = "{\n\tentry: 0\n\tsize: 1\n\tslot: {\n\t\t{\n\t\t\tname: sip:trunkuser@127.0.0.1:5090\n" \
            "\t\t\tvalue: 503\n\t\t\ttype: int\n\t\t}\n\t}\n}\n"
    assert last_replies(table) == {"sip:trunkuser@127.0.0.1:5090": (503, "Service Unavailable")}
    # two trunks hashed to one slot are two items (they were merged: the last one won)
    two = "{\n\tentry: 1\n\tsize: 2\n\tslot: {\n\t\t{\n\t\t\tname: sip:a@h\n\t\t\tvalue: 200\n\t\t}\n" \
          "\t\t{\n\t\t\tname: sip:b@h\n\t\t\tvalue: 403\n\t\t}\n\t}\n}\n"
    assert last_replies(two) == {"sip:a@h": (200, "OK"), "sip:b@h": (403, "Forbidden")}
    # only a status is read: no text of the registrar's (nor lines a form feed would have made)
    forged = "{\n\tslot: {\n\t\t{\n\t\t\tname: sip:a@h\n\t\t\tvalue: 403 x\x0c}\x0c{\x0cname: sip:b@h\n\t\t}\n\t}\n}\n"
    assert last_replies(forged) == {}


def test_the_registrar_is_trusted_as_one_address_only():
    from bridge.box.registrations import registrar_net
    assert registrar_net("sip:127.0.0.1:5090") == "127.0.0.1/32"
    assert registrar_net("sip:[::1]:5060") == "::1/128"
    assert registrar_net("sip:10.0.0.0/8") == "" and registrar_net("sip:carrier.example") == ""


def test_the_front_keeps_only_its_own_registrations_status():
    """A REGISTER reply cannot add htable entries (a registrar could fill the front's shared memory,
    one ~8 KB forged From a reply): only keys created when the front sent its own REGISTER are
    updated, and only with the status."""
    tpl = (Path(kamailio.__file__).resolve().parents[2] / "deploy/kamailio/kamailio.cfg.tmpl").read_text()
    assert '$sht(uacreg=>$fu) != $null) $sht(uacreg=>$fu) = $rs;' in tpl
    assert '$sht(uacreg=>$fu) = "0";' in tpl and "$rr" not in tpl


def test_box_metrics_escape_label_values():
    """A trunk's name is operator text: a quote, backslash or newline in it must not break /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    from bridge.box.api import _render_families
    name = 'a "carrier"\\ with\nnewline'
    text = _render_families({"trunkline_trunk_registered": ("gauge", "help\\text\nmore", [
        ("trunkline_trunk_registered", {"trunk": name}, 1)])})
    fams = list(text_string_to_metric_families(text))
    assert [(s.labels["trunk"], s.value) for s in fams[0].samples] == [(name, 1.0)]
    assert fams[0].documentation == "help\\text\nmore"


def test_an_unreadable_front_never_leaves_a_stale_registered(tmp_path, monkeypatch):
    """kamcmd failing read after read (a reply text it could not decode did this for good) must
    not leave the last "registered" on /metrics and /v1 while calls have stopped coming."""
    import asyncio
    from types import SimpleNamespace as NS
    from bridge.box import supervisor as sup_mod
    sup, _ = _render(_cfg(tmp_path, 'username = "u"\npassword = "p"\nrealm = "r"\nregister = true\n'), tmp_path)
    sup.kamailio = NS(poll=lambda: None)                 # the front runs ...
    sup.registrations = {"carrier": RegState("carrier", True, 200, "OK", True, 1.0)}

    def unreadable():
        raise ValueError("'utf-8' codec can't decode byte 0xe8")
    sup.read_registrations = unreadable                  # ... but its registrations cannot be read
    monkeypatch.setattr(sup_mod, "REG_POLL", 0.01)

    async def run():
        task = asyncio.create_task(sup._poll_registrations())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not sup.registrations["carrier"].registered:
                break
        sup.stopping = True
        await task
    asyncio.run(run())
    assert sup.registrations["carrier"].registered is False
    assert "cannot be read" in sup.registrations["carrier"].reason


def test_no_digest_is_left_when_no_trunk_registers_any_more(tmp_path):
    run = tmp_path / "run"
    reg = uacreg.Registration("carrier", "u", "u", "127.0.0.1:5090", "r", "0" * 32, "sip:127.0.0.1:5090",
                                "127.0.0.1:5060", "udp:127.0.0.1:5060", 300, 30)
    kamailio.write(str(run), "cfg", "", regs=[reg])
    assert "0" * 32 in (run / "db" / "uacreg").read_text()
    assert "0" * 32 not in repr(reg)                          # nor in a log line that prints one
    kamailio.write(str(run), "cfg", "", regs=[])             # register = false now
    assert not (run / "db" / "uacreg").exists()
