"""Handoff to a person in a box of cells (issue 13): ``trunkline serve --cells 2`` with the agent,
the caller's call placed through the Kamailio front.

In a box a cell reaches nobody directly: its outbound calls go through the front
(``sip.outbound_proxy``), which lets them out only to a configured trunk's address or allow-list
(route TRUNKDEST), and a blind transfer's REFER reaches the caller in-dialog through the front.

- attended: the person (SIPp on 127.0.0.2, a ``[[trunks]]`` address of the box) is called through
  the front, hears the whisper, then caller and person hear each other; ``call_transferred``; the
  person's leg gets its BYE when the call is hung up.
- blind: the caller gets the REFER through the front, accepts it, and the call is ``transferred``.
- a destination no trunk reaches: ``transfer_failed`` with reason ``unreachable`` before anything
  is dialled (fast, the engine and the model faked as in test_transfer.py).

The slow tests run whisper and Piper for real in both cells, with the scripted model
(``HandoffLLM``) at the model boundary; run them one at a time.
"""
import asyncio
import os
import signal
import time
from contextlib import contextmanager
from functools import partial
from unittest import mock

import pytest

import support
from bridge.cell.handoff import Phase, leg_trunk
from bridge.core import config as config_mod
from bridge.core.handoff import parse
from support import Api, BoxProcess, create_key, next_ports, sipp_file
from test_cells import _procs_with
from test_transfer import (DESTS, HandoffLLM, Human, ask_blind_transfer, ask_for, caller_scenario, events, handoff_agent,
                           handoff_cell, until, wait_event_on_line)

pytestmark = pytest.mark.xdist_group("test_transfer_box")

PERSON_IP = "127.0.0.2"          # the person's phone: its own address, so the front tells it from the caller's trunk


class CellsView:
    """The box's cells as one event source (what ``wait_event_on_line`` reads)."""

    def __init__(self, box: BoxProcess):
        self.box = box

    def events(self, name: str) -> list[dict]:
        return [e for i in range(self.box.n) for e in self.box.cell_events(i, name)]


def person(ports: dict, tmp, scenario: str = "uas_answer.xml") -> Human:
    """``Human`` (SIPp answering, our RTP endpoint) bound to ``PERSON_IP`` instead of 127.0.0.1."""
    with mock.patch.object(support, "sipp", partial(support.sipp, local_ip=PERSON_IP)), \
            mock.patch.object(support, "RtpPeer", partial(support.RtpPeer, host=PERSON_IP)):
        return Human(ports, tmp, scenario)


def box_config(llm, person_port: int, person_trunk: bool = True) -> str:
    """The single-cell handoff config of test_transfer.py (sales: attended, to the person; billing:
    blind), with the person at ``PERSON_IP`` and the box's trunks: the caller's carrier on 127.0.0.1
    and, unless ``person_trunk`` is off, the person's PBX as a trunk address."""
    cfg = handoff_cell(lambda config, args: config, llm, person_port)
    cfg = cfg.replace(f"127.0.0.1:{person_port}", f"{PERSON_IP}:{person_port}")
    trunks = '[[trunks]]\nname = "carrier"\nallow = ["127.0.0.1/32"]\n'
    if person_trunk:
        trunks += f'[[trunks]]\nname = "frontdesk"\naddress = "sip:{PERSON_IP}:{person_port}"\n'
    return trunks + cfg + '[sip]\nrtp_timeout = 0\n'


@contextmanager
def agent_box(tmp_path, config: str):
    """A box of 2 agent cells, both ready (models loaded, pinged by the front); killed afterwards
    with everything it started (found by its data directory)."""
    box = BoxProcess(tmp_path, 2, config, args=("--app", "agent"))
    try:
        box.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not all(box.cell_events(i, "cell_ready") for i in range(2)):
            assert box.alive(), box.log_path.read_text()[-3000:]
            time.sleep(0.3)
        assert all(box.cell_events(i, "cell_ready") for i in range(2)), "the cells never got ready"
        time.sleep(2.5)                                  # both cells answered the front's OPTIONS pings
        yield box
    finally:
        if box.alive():
            box.proc.terminate()
            try:
                box.proc.wait(30)
            except Exception:  # noqa: BLE001
                box.proc.kill()
        for pid in _procs_with(str(box.data)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def box_events(box: BoxProcess) -> list[dict]:
    return Api(box, create_key(box.data, "read")).get("/v1/events?since=0")[1]["events"]


@pytest.mark.slow
def test_attended_transfer_through_the_front_to_a_person_who_answers(tmp_path):
    from voice import Caller, decode, say, transcribe
    llm = HandoffLLM()
    far = next_ports()
    human = person(far, tmp_path)
    try:
        with agent_box(tmp_path, box_config(llm, human.sip_port)) as box:
            cells = CellsView(box)
            caller = Caller(box, tmp_path, seconds=90, scenario=caller_scenario(tmp_path))
            try:
                caller.wait_reply(time.monotonic())                                # the greeting
                end = caller.speak("Can I speak to a person in sales, please?")
                heard = transcribe(caller.wait_reply(end, quiet=2.0)).lower()
                assert "put you through" in heard, heard
                moved, bridged_at = wait_event_on_line(caller, cells, "call_transferred", timeout=60)
                whisper = transcribe(decode(human.peer.received, end=bridged_at)).lower()
                assert "caller" in whisper and "quot" in whisper, whisper          # the person heard the summary
                human.say = say("Hello, this is Sales speaking.")
                caller.speak("Hi, I would like a price for ten chairs.")
                caller.silence(3.0)
                to_caller = transcribe(decode(caller.peer.received, bridged_at)).lower()
                assert "speaking" in to_caller, to_caller                          # the person, not the agent
                to_human = transcribe(decode(human.peer.received, bridged_at)).lower()
                assert "price" in to_human, to_human                               # the caller reaches the person
                status, _, _ = Api(box, create_key(box.data, "control")).post(f"/v1/calls/{moved['call_id']}/hangup")
                assert status in (200, 202), status
                assert human.proc.wait(30) == 0                                    # the person's leg got its BYE
            finally:
                caller.close()
            # the leg went out through the front (its Record-Route), not from the cell straight to the person
            seen = _person_trace(tmp_path)
            assert f"Record-Route: <sip:127.0.0.1:{box.ports['sip']};" in seen, seen[-3000:]
            events = box_events(box)
            deadline = time.monotonic() + 20                 # the summary comes after the hang-up
            while time.monotonic() < deadline and not [e for e in events if e["type"] == "call_summary"]:
                time.sleep(0.3)
                events = box_events(box)
            leg_id = [e["data"] for e in events if e["type"] == "call_transferred"][0]["transfer_call_id"]
            leg = Api(box, create_key(box.data, "read")).get(f"/v1/calls/{leg_id}")[1]
    finally:
        human.close()
        llm.stop()
    kinds = [(e["type"], e["call_id"]) for e in events if e["type"] in ("call_transferred", "transfer_failed")]
    assert kinds == [("call_transferred", moved["call_id"])], kinds
    data = [e["data"] for e in events if e["type"] == "call_transferred"][0]
    assert data["destination"] == "sales" and data["mode"] == "attended" and data["transfer_call_id"]
    assert (leg["direction"], leg["trunk"]) == ("outbound", "frontdesk"), leg     # placed through the trunk
    assert [e["data"]["disposition"] for e in events
            if e["type"] == "call_summary" and e["call_id"] == moved["call_id"]] == ["transferred"]


def _message(trace: str, start: str) -> str:
    """The first message in a SIPp trace that starts with ``start`` (its headers), or ""."""
    for block in trace.split("-----------------------------------------------"):
        body = block.split("\n\n", 1)[-1].lstrip("\n")
        if body.startswith(start):
            return body
    return ""


def _person_trace(tmp_path) -> str:
    """What the person's SIPp saw (its message trace)."""
    return "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("uas_answer_*_messages.log")))


@pytest.mark.slow
def test_blind_transfer_refers_the_caller_through_the_front(tmp_path):
    from voice import Caller
    llm = HandoffLLM()
    try:
        with agent_box(tmp_path, box_config(llm, 9, person_trunk=False)) as box:
            cells = CellsView(box)
            caller = Caller(box, tmp_path, seconds=60, scenario=caller_scenario(tmp_path, "refer_accept.xml"))
            try:
                moved = ask_blind_transfer(
                    caller, lambda: wait_event_on_line(caller, cells, "call_transferred", timeout=60)[0])
            finally:
                caller.close()
            assert "REFER to sip:billing@127.0.0.1:5999" in sipp_file(tmp_path, "_logs.log")
            refer = _message(sipp_file(tmp_path, "_messages.log"), "REFER sip:")
            assert f"Via: SIP/2.0/UDP 127.0.0.1:{box.ports['sip']};" in refer, refer   # relayed by the front
            ended = [e for e in cells.events("call_ended") if e["call_id"] == moved["call_id"]]
            assert [e["reason"] for e in ended] == ["transferred"], ended
            events = box_events(box)
            deadline = time.monotonic() + 20                 # the summary comes after the hang-up
            while time.monotonic() < deadline and not [e for e in events if e["type"] == "call_summary"]:
                time.sleep(0.3)
                events = box_events(box)
    finally:
        llm.stop()
    assert [e["data"] for e in events if e["type"] == "call_transferred"] == [{"destination": "billing",
                                                                               "mode": "blind"}]
    assert not [e for e in events if e["type"] == "transfer_failed"]
    assert [e["data"]["disposition"] for e in events if e["type"] == "call_summary"] == ["transferred"]


# -- which trunk the person's leg takes behind the front (fast: the engine and the model faked) ----------
def _cfg(tmp_path, text: str, front: bool = True):
    path = tmp_path / "box.toml"
    path.write_text(text)
    env = {"TRUNKLINE_SIP_OUTBOUND_PROXY": "sip:127.0.0.1:5070", "TRUNKLINE_SIP_TRUSTED_PROXIES": "127.0.0.1/32"}
    return config_mod.load(str(path), environ=env if front else {})


TRUNKS = ('[[trunks]]\nname = "carrier"\nallow = ["127.0.0.1/32"]\n'
          '[[trunks]]\nname = "frontdesk"\naddress = "sip:127.0.0.2:5999"\n'
          '[[trunks]]\nname = "pbx"\naddress = "sip:pbx.example.com"\n')


def test_behind_the_front_a_leg_goes_through_the_trunk_that_reaches_its_destination(tmp_path):
    cfg = _cfg(tmp_path, TRUNKS)

    def route(to, trunk=None):
        d = {"to": to, "description": "x", "mode": "attended", **({"trunk": trunk} if trunk else {})}
        return leg_trunk(parse({"d": d})["d"], cfg)
    assert route("sip:sales@127.0.0.2:5999") == ("frontdesk", "")          # the trunk's address (and port)
    assert route("sip:sales@pbx.example.com") == ("pbx", "")               # no port in the address: any
    assert route("sip:sales@pbx.example.com:5080") == ("pbx", "")
    assert route("sip:sales@127.0.0.1:7000") == ("carrier", "")            # inside a trunk's allow-list
    assert route("sip:sales@127.0.0.2:6000") == ("frontdesk", "")          # (an IP-literal address allows its host)
    assert route("+15550100", "frontdesk") == ("frontdesk", "")            # a number: the destination's trunk
    assert route("sip:sales@127.0.0.2:5999", "frontdesk") == ("frontdesk", "")     # its own trunk, agreeing
    # its own trunk, but the front sends the host to another trunk (whose transport and SRTP would
    # apply while pjsua answered challenges with frontdesk's credentials): refused
    trunk, why = route("sip:sales@127.0.0.1:7000", "frontdesk")
    assert trunk is None and "front sends 127.0.0.1 to trunk 'carrier'" in why, why
    trunk, why = route("sip:sales@127.0.0.3:5999", "frontdesk")            # but the front would answer 403
    assert trunk is None and "no [[trunks]] entry holds 127.0.0.3:5999" in why
    for to in ("sip:sales@127.0.0.3:5999", "sip:sales@10.9.9.9", "sip:sales@other.example.com", "+15550100",
               "tel:+15550100"):
        trunk, why = route(to)
        assert trunk is None and why.startswith("d: "), (to, why)      # the front would refuse it
    assert "[[trunks]]" in route("sip:sales@10.9.9.9")[1]
    single = _cfg(tmp_path, TRUNKS, front=False)                           # one cell: as before, no trunk
    assert leg_trunk(parse({"d": {"to": "sip:a@10.9.9.9", "description": "x", "mode": "attended"}})["d"],
                     single) == (None, "")


def _box_handoff(tmp_path, to):
    dests = {"sales": {**DESTS["sales"], "to": to}}

    async def scenario():
        app, hub, session, handoff = handoff_agent(tmp_path, dests)
        session.services.cfg = _cfg(tmp_path, TRUNKS)
        await ask_for(app, hub, session, "sales")
        until(session, hub, lambda: handoff.phase is not Phase.PENDING)
        await asyncio.sleep(0.01)
        return session, app, handoff
    return asyncio.run(scenario())


def test_behind_the_front_the_leg_is_dialled_through_the_person_s_trunk(tmp_path):
    session, _, handoff = _box_handoff(tmp_path, "sip:sales@127.0.0.2:5999")
    assert session.services.dialed == [("sip:sales@127.0.0.2:5999", "frontdesk", "handoff")]
    assert handoff.phase is Phase.DIALING and not events(session, "transfer_failed")


def test_behind_the_front_a_destination_no_trunk_reaches_fails_unreachable(tmp_path):
    session, app, handoff = _box_handoff(tmp_path, "sip:sales@10.9.9.9")
    assert session.services.dialed == []                                  # nothing dialled
    assert events(session, "transfer_failed") == [{"destination": "sales", "mode": "attended",
                                                   "reason": "unreachable"}]
    assert session.app is app and handoff.phase is Phase.IDLE              # the caller is back with the agent
